"""Token usage as each model API reports it, for whole JSON bodies and for streams.

Every API counts differently, so each is mapped onto one `Usage` whose fields never overlap:
`input_tokens` is the uncached input only, cache reads and writes are separate, and
`output_tokens` is all billed output, reasoning or thinking included. `reasoning_tokens` is the
part of `output_tokens` that was reasoning, kept for reports.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from tokencap.errors import UpstreamProtocolError
from tokencap.sse import Event, SSEParser


class Api(StrEnum):
    """The model APIs tokencap meters."""

    ANTHROPIC_MESSAGES = "anthropic-messages"
    OPENAI_CHAT = "openai-chat"
    OPENAI_RESPONSES = "openai-responses"
    GEMINI_GENERATE = "gemini-generate"


@dataclass(slots=True)
class Usage:
    """Token counts of one call, split so that no two fields count the same token."""

    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_input_tokens(self) -> int:
        """Return every input token, cached or not."""
        return (
            self.input_tokens
            + self.cache_read_tokens
            + self.cache_write_5m_tokens
            + self.cache_write_1h_tokens
        )

    def as_dict(self) -> dict[str, int]:
        """Return the counts keyed by field name, as the ledger stores them."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Byte-level tokenizers rarely pack fewer than two UTF-8 bytes into a token of prose, code or
# JSON, so bytes / 2 overestimates the token count for nearly all text. It is an estimate.
BYTES_PER_TOKEN_ESTIMATE = 2

# Images, audio and documents arrive base64-encoded. Providers bill them by size or per item,
# not by their encoded length, so each is counted as this many tokens.
ATTACHMENT_TOKEN_ESTIMATE = 2_000


def estimate_tokens(text: str) -> int:
    """Return a deliberately high token count for generated or prompt text."""
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN_ESTIMATE)


# --- Requests -------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestInfo:
    """The fields of a model request that the meter reads before sending it."""

    model: str | None
    streamed: bool
    max_output_tokens: int | None
    input_tokens_estimate: int
    cache_write_ttl: str | None  # "5m" or "1h" when the request asks to write the cache
    agent_prompt_id: str | None
    wants_stream_usage: bool = True  # False: an OpenAI chat stream that did not ask for usage


def read_request(api: Api, body: Any, path: str, query: dict[str, str]) -> RequestInfo:
    """Extract the model, stream flag, output limit and an input estimate from a request body."""
    if not isinstance(body, dict):
        body = {}
    model = body.get("model") if isinstance(body.get("model"), str) else None
    streamed = bool(body.get("stream"))
    max_output = None
    cache_ttl = None
    prompt_id = None
    wants_usage = True

    if api is Api.ANTHROPIC_MESSAGES:
        max_output = _int_or_none(body.get("max_tokens"))
        cache_ttl = _anthropic_cache_ttl(body)
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
            prompt_id = metadata["user_id"][:200]
    elif api is Api.OPENAI_CHAT:
        max_output = _int_or_none(body.get("max_completion_tokens", body.get("max_tokens")))
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    elif api is Api.OPENAI_RESPONSES:
        max_output = _int_or_none(body.get("max_output_tokens"))
        if isinstance(body.get("prompt_cache_key"), str):
            prompt_id = body["prompt_cache_key"][:200]
    elif api is Api.GEMINI_GENERATE:
        # Gemini names the model and the streaming mode in the path, not the body.
        model_part = path.rsplit("/models/", 1)[-1]
        model = model_part.split(":", 1)[0] or None
        streamed = path.endswith(":streamGenerateContent")
        config = body.get("generationConfig") or body.get("generation_config") or {}
        if isinstance(config, dict):
            max_output = _int_or_none(
                config.get("maxOutputTokens", config.get("max_output_tokens"))
            )

    return RequestInfo(
        model=model,
        streamed=streamed,
        max_output_tokens=max_output,
        input_tokens_estimate=_estimate_input_tokens(body),
        cache_write_ttl=cache_ttl,
        agent_prompt_id=prompt_id,
        wants_stream_usage=wants_usage,
    )


def _anthropic_cache_ttl(body: dict) -> str | None:
    # Walk the whole body: cache_control may sit on tools, system blocks or message blocks.
    ttl = None
    stack: list[Any] = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            control = item.get("cache_control")
            if isinstance(control, dict):
                if control.get("ttl") == "1h":
                    return "1h"
                ttl = "5m"
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return ttl


def _estimate_input_tokens(body: Any) -> int:
    text_bytes = 0
    attachments = 0
    stack: list[Any] = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _looks_like_attachment(item):
                attachments += 1
            else:
                text_bytes += len(item.encode("utf-8"))
        elif isinstance(item, dict):
            stack.extend(item.values())
            # Keys such as "role" and "content" carry a few tokens of framing each.
            text_bytes += sum(len(str(k)) for k in item)
        elif isinstance(item, list):
            stack.extend(item)
        elif item is not None:
            text_bytes += len(str(item))
    return (
        math.ceil(text_bytes / BYTES_PER_TOKEN_ESTIMATE) + attachments * ATTACHMENT_TOKEN_ESTIMATE
    )


def _looks_like_attachment(value: str) -> bool:
    if value.startswith("data:") and ";base64," in value[:100]:
        return True
    # Long runs of base64 with no spaces are encoded files, not prose.
    return len(value) > 4_096 and " " not in value[:4_096] and "\n" not in value[:200]


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if value >= 0 else None


# --- Whole JSON responses -------------------------------------------------------------------


@dataclass(slots=True)
class ResponseInfo:
    """The usage, model, id and error that a model response body reported."""

    usage: Usage | None = None
    model: str | None = None
    response_id: str | None = None
    error: str | None = None


def read_response(api: Api, body: bytes) -> ResponseInfo:
    """Parse a complete JSON response body.

    Raises UpstreamProtocolError when the body is not the JSON shape the API promises.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UpstreamProtocolError(f"response body is not JSON: {exc}") from None

    # A Gemini stream requested without alt=sse arrives as one JSON array of chunks.
    if api is Api.GEMINI_GENERATE and isinstance(data, list):
        info = ResponseInfo()
        for chunk in data:
            _gemini_chunk(chunk, info)
        return info
    if not isinstance(data, dict):
        raise UpstreamProtocolError(f"response body is a JSON {type(data).__name__}, not an object")

    info = ResponseInfo(error=_error_message(data))
    if api is Api.ANTHROPIC_MESSAGES:
        info.model = _str(data.get("model"))
        info.response_id = _str(data.get("id"))
        if isinstance(data.get("usage"), dict):
            info.usage = anthropic_usage(data["usage"])
    elif api is Api.OPENAI_CHAT:
        info.model = _str(data.get("model"))
        info.response_id = _str(data.get("id"))
        if isinstance(data.get("usage"), dict):
            info.usage = openai_chat_usage(data["usage"])
    elif api is Api.OPENAI_RESPONSES:
        _responses_object(data, info)
    elif api is Api.GEMINI_GENERATE:
        _gemini_chunk(data, info)
    return info


def anthropic_usage(raw: dict) -> Usage:
    """Map an Anthropic `usage` object, whose four input counts are disjoint."""
    cache_write = _count(raw, "cache_creation_input_tokens")
    split = raw.get("cache_creation")
    if isinstance(split, dict):
        write_5m = _count(split, "ephemeral_5m_input_tokens")
        write_1h = _count(split, "ephemeral_1h_input_tokens")
    else:
        # Without the split by TTL, price every write at the 1-hour rate, the higher one.
        write_5m, write_1h = 0, cache_write
    reasoning = 0
    details = raw.get("output_tokens_details")
    if isinstance(details, dict):
        reasoning = _count(details, "thinking_tokens")
    return Usage(
        input_tokens=_count(raw, "input_tokens"),
        cache_read_tokens=_count(raw, "cache_read_input_tokens"),
        cache_write_5m_tokens=write_5m,
        cache_write_1h_tokens=write_1h,
        output_tokens=_count(raw, "output_tokens"),
        reasoning_tokens=reasoning,
    )


def openai_chat_usage(raw: dict) -> Usage:
    """Map a Chat Completions `usage`, where cached tokens are part of the prompt tokens."""
    return _openai_usage(
        raw,
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
    )


def openai_responses_usage(raw: dict) -> Usage:
    """Map a Responses API `usage`, where cached tokens are part of the input tokens."""
    return _openai_usage(
        raw, "input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"
    )


def _openai_usage(raw: dict, input_key: str, output_key: str, in_details: str, out_details: str):
    prompt = _count(raw, input_key)
    input_details = raw.get(in_details) if isinstance(raw.get(in_details), dict) else {}
    output_details = raw.get(out_details) if isinstance(raw.get(out_details), dict) else {}
    cached = min(_count(input_details, "cached_tokens"), prompt)
    # NOTE: cache writes are assumed to be part of the prompt count, like cached reads.
    written = min(_count(input_details, "cache_write_tokens"), prompt - cached)
    return Usage(
        input_tokens=prompt - cached - written,
        cache_read_tokens=cached,
        cache_write_5m_tokens=written,
        output_tokens=_count(raw, output_key),
        reasoning_tokens=_count(output_details, "reasoning_tokens"),
    )


def gemini_usage(raw: dict) -> Usage:
    """Map Gemini `usageMetadata`; thinking tokens are billed as output but counted apart."""
    prompt = _count(raw, "promptTokenCount") + _count(raw, "toolUsePromptTokenCount")
    cached = min(_count(raw, "cachedContentTokenCount"), prompt)
    thoughts = _count(raw, "thoughtsTokenCount")
    return Usage(
        input_tokens=prompt - cached,
        cache_read_tokens=cached,
        output_tokens=_count(raw, "candidatesTokenCount") + thoughts,
        reasoning_tokens=thoughts,
    )


def _responses_object(data: dict, info: ResponseInfo) -> None:
    info.model = _str(data.get("model")) or info.model
    info.response_id = _str(data.get("id")) or info.response_id
    if isinstance(data.get("usage"), dict):
        info.usage = openai_responses_usage(data["usage"])
    error = data.get("error")
    if isinstance(error, dict) and error.get("message"):
        info.error = str(error["message"])


def _gemini_chunk(chunk: Any, info: ResponseInfo) -> bool:
    """Fold one Gemini response or stream chunk into `info`; return True on the final chunk."""
    if not isinstance(chunk, dict):
        return False
    info.error = _error_message(chunk) or info.error
    info.model = _str(chunk.get("modelVersion")) or info.model
    info.response_id = _str(chunk.get("responseId")) or info.response_id
    # Each chunk repeats the running totals, so the last one seen wins.
    if isinstance(chunk.get("usageMetadata"), dict):
        info.usage = gemini_usage(chunk["usageMetadata"])
    candidates = chunk.get("candidates")
    return isinstance(candidates, list) and any(
        isinstance(c, dict) and c.get("finishReason") for c in candidates
    )


def _error_message(data: dict) -> str | None:
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)[:500]
    if isinstance(error, str):
        return error[:500]
    return None


def _count(raw: dict, key: str) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return 0
    return int(value)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# --- Streams --------------------------------------------------------------------------------


@dataclass
class StreamMeter:
    """Follows one streamed response event by event and keeps its usage up to date.

    `usage` is what the provider has reported so far. While a stream runs, output that the
    provider has not counted yet is estimated from the text received (`running_usage`).
    """

    api: Api
    info: ResponseInfo = field(default_factory=ResponseInfo)
    final: bool = False
    garbled: bool = False  # an event's data was not the JSON the API promises
    output_text_bytes: int = 0
    events: int = 0
    _parser: SSEParser = field(default_factory=SSEParser)
    _anthropic_raw_usage: dict = field(default_factory=dict)

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse bytes from upstream; return the whole events they complete, already metered."""
        events = self._parser.feed(chunk)
        for event in events:
            self.observe(event)
        return events

    def flush(self) -> tuple[list[Event], bytes]:
        """End the stream: meter and return an unterminated last event and the leftover bytes."""
        events, rest = self._parser.flush()
        for event in events:
            self.observe(event)
        return events, rest

    def observe(self, event: Event) -> None:
        """Update usage, model and error from one event; malformed data is skipped."""
        if event.is_comment or not event.data:
            return
        self.events += 1
        if event.data == "[DONE]":
            return
        try:
            data = json.loads(event.data)
        except json.JSONDecodeError:
            self.garbled = True
            self.info.error = self.info.error or "stream event data is not JSON"
            return
        if not isinstance(data, dict):
            return
        if self.api is Api.ANTHROPIC_MESSAGES:
            self._anthropic(event.name, data)
        elif self.api is Api.OPENAI_CHAT:
            self._openai_chat(data)
        elif self.api is Api.OPENAI_RESPONSES:
            self._openai_responses(data)
        elif self.api is Api.GEMINI_GENERATE:
            self._gemini(data)

    def running_usage(self, input_tokens_estimate: int) -> tuple[Usage, bool]:
        """Return the best usage known so far, and whether any of it is an estimate."""
        usage = Usage(**self.info.usage.as_dict()) if self.info.usage else None
        estimated = False
        if usage is None or usage.total_input_tokens == 0:
            usage = usage or Usage()
            usage.input_tokens = input_tokens_estimate
            estimated = True
        if not self.final:
            # Until the final count arrives, output is what was reported or what the text
            # received implies, whichever is higher.
            text_estimate = math.ceil(self.output_text_bytes / BYTES_PER_TOKEN_ESTIMATE)
            usage.output_tokens = max(usage.output_tokens, text_estimate)
            estimated = True
        return usage, estimated

    def _anthropic(self, name: str, data: dict) -> None:
        kind = data.get("type", name)
        if kind == "message_start" and isinstance(data.get("message"), dict):
            message = data["message"]
            self.info.model = _str(message.get("model"))
            self.info.response_id = _str(message.get("id"))
            if isinstance(message.get("usage"), dict):
                self._anthropic_raw_usage = dict(message["usage"])
                self.info.usage = anthropic_usage(self._anthropic_raw_usage)
        elif kind == "content_block_delta" and isinstance(data.get("delta"), dict):
            delta = data["delta"]
            for key in ("text", "thinking", "partial_json"):
                if isinstance(delta.get(key), str):
                    self.output_text_bytes += len(delta[key].encode("utf-8"))
        elif kind == "message_delta" and isinstance(data.get("usage"), dict):
            # Counts in message_delta are cumulative: each one replaces the last, never adds.
            reported = {k: v for k, v in data["usage"].items() if v is not None}
            self._anthropic_raw_usage.update(reported)
            self.info.usage = anthropic_usage(self._anthropic_raw_usage)
        elif kind == "message_stop":
            self.final = True
        elif kind == "error":
            self.info.error = _error_message(data) or "error event"

    def _openai_chat(self, data: dict) -> None:
        self.info.model = _str(data.get("model")) or self.info.model
        self.info.response_id = _str(data.get("id")) or self.info.response_id
        if data.get("error"):
            self.info.error = _error_message(data)
        for choice in data.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict):
                self.output_text_bytes += _text_bytes(delta)
        if isinstance(data.get("usage"), dict):
            self.info.usage = openai_chat_usage(data["usage"])
            self.final = True

    def _openai_responses(self, data: dict) -> None:
        kind = data.get("type")
        if isinstance(data.get("response"), dict):
            _responses_object(data["response"], self.info)
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self.final = self.info.usage is not None
        elif str(kind).endswith(".delta") and isinstance(data.get("delta"), str):
            self.output_text_bytes += len(data["delta"].encode("utf-8"))
        elif kind == "error":
            self.info.error = str(data.get("message") or data.get("code") or "error event")[:500]

    def _gemini(self, data: dict) -> None:
        for candidate in data.get("candidates") or []:
            content = candidate.get("content") if isinstance(candidate, dict) else None
            if isinstance(content, dict):
                for part in content.get("parts") or []:
                    if isinstance(part, dict):
                        self.output_text_bytes += _text_bytes(part)
        if _gemini_chunk(data, self.info):
            self.final = self.info.usage is not None


def _text_bytes(delta: dict) -> int:
    # Text, reasoning text and tool-call arguments all become billed output tokens.
    total = 0
    for key in ("content", "text", "reasoning_content", "reasoning"):
        if isinstance(delta.get(key), str):
            total += len(delta[key].encode("utf-8"))
    for call in delta.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            total += len(function["arguments"].encode("utf-8"))
    function_call = delta.get("functionCall")
    if isinstance(function_call, dict):
        total += len(json.dumps(function_call.get("args", {})).encode("utf-8"))
    return total


def is_usage_only_chunk(event: Event) -> bool:
    """Return True for the extra final Chat Completions chunk that carries only usage."""
    if not event.data.startswith("{"):
        return False
    try:
        data = json.loads(event.data)
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("choices") == [] and bool(data.get("usage"))
