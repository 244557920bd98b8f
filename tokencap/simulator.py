"""A simulated model provider on 127.0.0.1, for trying tokencap without an API key or network.

`SimulatedProvider` speaks enough of three wire formats for the official SDKs (anthropic,
openai, google-genai) to parse every response, streamed or not:

- Anthropic: `POST /v1/messages`, `POST /v1/messages/count_tokens`.
- OpenAI: `POST /v1/chat/completions`, `POST /v1/responses`.
- Gemini: `POST /{v1,v1beta,v1alpha}/models/{model}:generateContent`, `:streamGenerateContent`
  (server-sent events with `?alt=sse`, otherwise one JSON array) and `:countTokens`.
- `GET /v1/models` and `GET /v1beta/models` return one list that all three SDKs can read.
  `GET /` and `HEAD /` return 200, for health checks.

Reply text and usage are deterministic. The reply is one of `REPLIES`, chosen by the number of
user turns in the request, so a growing conversation gets a different reply each turn. Usage is
reported the way each API reports it: input tokens are ceil(request body bytes / 4), output
tokens are the number of words in the reply, and the model is the one the request named. A
request's output limit (`max_tokens` and its equivalents) truncates the reply to that many words.
Any API key is accepted.

The server is a `ThreadingHTTPServer` speaking HTTP/1.1. Streams use chunked transfer encoding
with one chunk per event, written as soon as the event is ready, and `event_delay` seconds
between events so that a client visibly streams.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import re
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

# The simulator only ever listens on the loopback interface.
HOST = "127.0.0.1"
DEFAULT_EVENT_DELAY = 0.02

BYTES_PER_INPUT_TOKEN = 4
MAX_REQUEST_BYTES = 32 * 1024 * 1024

# Replies of a coding agent working through a small bug, one per user turn and then repeated.
# Words are separated by single spaces, so joining the streamed words rebuilds the same text.
REPLIES = (
    "Hello from the simulated provider. I will start by reading the project layout and the "
    "failing test, then propose a small fix. No real model wrote this text.",
    "Looking at the test output, the failure comes from an off-by-one error in the pagination "
    "helper. I will open that module next and check how the page count is computed.",
    "The helper divides the item count by the page size and rounds down, so the last partial "
    "page is lost. Rounding up with a ceiling division should fix it.",
    "Here is the patch: replace the floor division with a ceiling division, and add a test for "
    "a list whose length is not a multiple of the page size.",
    "Running the test suite again, every test passes, including the new one. I will also check "
    "the two callers of the helper for the same assumption.",
    "Both callers pass the page size through unchanged, so they need no change. I will update "
    "the changelog and summarise the fix for the review.",
    "Summary: the pagination helper lost the last partial page because it rounded down. The fix "
    "rounds up, and a new test covers lists of uneven length.",
    "Is there anything else I should look at? The same module has a few broad exception "
    "handlers that hide errors, and I could narrow them next.",
)

# API names of the inference routes. Requests to other routes are not counted as model calls.
ANTHROPIC_MESSAGES = "anthropic-messages"
OPENAI_CHAT = "openai-chat"
OPENAI_RESPONSES = "openai-responses"
GEMINI_GENERATE = "gemini-generate"

_GEMINI_ROUTE = re.compile(
    r"^/(?P<version>v1|v1beta|v1alpha)/models/(?P<model>[^/:]+):(?P<method>[A-Za-z]+)$"
)


@dataclass(frozen=True, slots=True)
class SimulatedCall:
    """One model request the simulator received, recorded before its response was sent."""

    api: str
    path: str
    model: str | None
    streamed: bool
    body: bytes = field(repr=False)
    status: int
    input_tokens: int = 0
    output_tokens: int = 0


def count_input_tokens(body: bytes) -> int:
    """Return the input tokens the simulator reports for a request body."""
    return math.ceil(len(body) / BYTES_PER_INPUT_TOKEN)


def reply_words(turn: int, max_output_tokens: int | None = None) -> list[str]:
    """Return the words of the reply to user turn `turn` (1-based), cut to the output limit."""
    words = REPLIES[(max(turn, 1) - 1) % len(REPLIES)].split(" ")
    if max_output_tokens is not None:
        words = words[:max_output_tokens]
    return words


# --- Completions and their wire formats -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completion:
    """The simulated reply to one model request, before it is encoded in an API's format."""

    response_id: str
    model: str
    words: list[str]
    input_tokens: int
    truncated: bool
    created: int

    @property
    def text(self) -> str:
        """Return the whole reply text."""
        return " ".join(self.words)

    @property
    def output_tokens(self) -> int:
        """Return the output token count, one token per word."""
        return len(self.words)

    def deltas(self) -> list[str]:
        """Return the reply as stream deltas, one word each, which concatenate to `text`."""
        return [word if i == 0 else " " + word for i, word in enumerate(self.words)]


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def _anthropic_usage(completion: Completion, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": completion.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def anthropic_message(completion: Completion) -> dict[str, Any]:
    """Return a Messages API response body."""
    return {
        "id": completion.response_id,
        "type": "message",
        "role": "assistant",
        "model": completion.model,
        "content": [{"type": "text", "text": completion.text}],
        "stop_reason": "max_tokens" if completion.truncated else "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(completion, completion.output_tokens),
    }


def anthropic_events(completion: Completion) -> Iterator[bytes]:
    """Yield a Messages API stream in the order the API sends it."""
    message = anthropic_message(completion) | {
        "content": [],
        "stop_reason": None,
        # The API reports a small placeholder count at the start and the total at the end.
        "usage": _anthropic_usage(completion, 1),
    }
    yield _sse({"type": "message_start", "message": message}, "message_start")
    block_start = {"type": "content_block_start", "index": 0, "content_block": _text_block("")}
    yield _sse(block_start, "content_block_start")
    yield _sse({"type": "ping"}, "ping")
    for delta in completion.deltas():
        text_delta = {"type": "text_delta", "text": delta}
        yield _sse(
            {"type": "content_block_delta", "index": 0, "delta": text_delta}, "content_block_delta"
        )
    yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    final = anthropic_message(completion)
    message_delta = {
        "type": "message_delta",
        "delta": {"stop_reason": final["stop_reason"], "stop_sequence": None},
        "usage": final["usage"],
    }
    yield _sse(message_delta, "message_delta")
    yield _sse({"type": "message_stop"}, "message_stop")


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _openai_chat_usage(completion: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": completion.input_tokens,
        "completion_tokens": completion.output_tokens,
        "total_tokens": completion.input_tokens + completion.output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def openai_chat_completion(completion: Completion) -> dict[str, Any]:
    """Return a Chat Completions response body."""
    message = {"role": "assistant", "content": completion.text, "refusal": None, "annotations": []}
    return {
        "id": completion.response_id,
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "length" if completion.truncated else "stop",
            }
        ],
        "usage": _openai_chat_usage(completion),
        "service_tier": "default",
        "system_fingerprint": None,
    }


def openai_chat_events(completion: Completion, include_usage: bool) -> Iterator[bytes]:
    """Yield a Chat Completions stream; the usage-only chunk comes only when it was requested."""
    head = {
        "id": completion.response_id,
        "object": "chat.completion.chunk",
        "created": completion.created,
        "model": completion.model,
        "service_tier": "default",
        "system_fingerprint": None,
    }
    # With include_usage the API adds `"usage": null` to every chunk before the last.
    if include_usage:
        head["usage"] = None

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse(head | {"choices": [choice]})

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    for delta in completion.deltas():
        yield chunk({"content": delta})
    yield chunk({}, "length" if completion.truncated else "stop")
    if include_usage:
        yield _sse(head | {"choices": [], "usage": _openai_chat_usage(completion)})
    yield b"data: [DONE]\n\n"


def openai_response(completion: Completion, status: str = "completed") -> dict[str, Any]:
    """Return a Responses API response object; an unfinished one has no output or usage."""
    finished = status != "in_progress"
    if finished and completion.truncated:
        status = "incomplete"
    output = [_responses_message(completion, "completed")] if finished else []
    usage = None
    if finished:
        usage = {
            "input_tokens": completion.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": completion.input_tokens + completion.output_tokens,
        }
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": completion.response_id,
        "object": "response",
        "created_at": completion.created,
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": None,
        "model": completion.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "metadata": {},
    }


def _responses_message(completion: Completion, status: str) -> dict[str, Any]:
    content = [_output_text(completion.text)] if status == "completed" else []
    return {
        "id": "msg_" + completion.response_id.removeprefix("resp_"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def openai_response_events(completion: Completion) -> Iterator[bytes]:
    """Yield a Responses API stream, each event numbered by `sequence_number`."""
    numbers = itertools.count()
    item_id = _responses_message(completion, "in_progress")["id"]
    part = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **fields: Any) -> bytes:
        return _sse({"type": kind, "sequence_number": next(numbers), **fields}, kind)

    running = openai_response(completion, "in_progress")
    yield event("response.created", response=running)
    yield event("response.in_progress", response=running)
    yield event(
        "response.output_item.added",
        output_index=0,
        item=_responses_message(completion, "in_progress"),
    )
    yield event("response.content_part.added", **part, part=_output_text(""))
    for delta in completion.deltas():
        yield event("response.output_text.delta", **part, delta=delta, logprobs=[])
    yield event("response.output_text.done", **part, text=completion.text, logprobs=[])
    yield event("response.content_part.done", **part, part=_output_text(completion.text))
    yield event(
        "response.output_item.done",
        output_index=0,
        item=_responses_message(completion, "completed"),
    )
    final = openai_response(completion)
    kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
    yield event(kind, response=final)


def gemini_response(
    completion: Completion, words: list[str] | None = None, final: bool = True
) -> dict[str, Any]:
    """Return a generateContent response, or with `words` and `final` one stream chunk.

    Each stream chunk carries the running output count, and the last one the total.
    """
    words = completion.words if words is None else words
    candidate: dict[str, Any] = {
        "content": {"parts": [{"text": " ".join(words)}], "role": "model"},
        "index": 0,
    }
    if final:
        candidate["finishReason"] = "MAX_TOKENS" if completion.truncated else "STOP"
    output_tokens = completion.output_tokens if final else len(words)
    return {
        "candidates": [candidate],
        "usageMetadata": {
            "promptTokenCount": completion.input_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": completion.input_tokens + output_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": completion.input_tokens}],
        },
        "modelVersion": completion.model,
        "responseId": completion.response_id,
    }


def gemini_chunks(completion: Completion) -> list[dict[str, Any]]:
    """Return the chunks of a streamGenerateContent response, one word of text each."""
    deltas = completion.deltas() or [""]
    chunks = []
    for i, delta in enumerate(deltas):
        chunk = gemini_response(completion, [delta], final=i == len(deltas) - 1)
        chunk["usageMetadata"]["candidatesTokenCount"] = min(i + 1, completion.output_tokens)
        chunk["usageMetadata"]["totalTokenCount"] = (
            completion.input_tokens + chunk["usageMetadata"]["candidatesTokenCount"]
        )
        chunks.append(chunk)
    return chunks


def models_list() -> dict[str, Any]:
    """Return one model list in the shapes of all three APIs: `data` for Anthropic and OpenAI,
    `models` for Gemini."""
    names = ["claude-sonnet-4-5", "claude-haiku-4-5", "gpt-4.1-mini", "gpt-5-mini"]
    data = [
        {
            "id": name,
            "type": "model",
            "object": "model",
            "display_name": name,
            "created_at": "2025-01-01T00:00:00Z",
            "created": 1735689600,
            "owned_by": "tokencap-simulator",
        }
        for name in names
    ]
    gemini = [
        {
            "name": f"models/{name}",
            "displayName": name,
            "supportedGenerationMethods": ["generateContent", "countTokens"],
        }
        for name in ("gemini-2.5-flash", "gemini-2.5-pro")
    ]
    return {
        "object": "list",
        "data": data,
        "has_more": False,
        "first_id": names[0],
        "last_id": names[-1],
        "models": gemini,
    }


# --- Requests ---------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the simulator rejects with HTTP 400, as the real API would."""


def _user_turns(items: Any) -> int:
    # An item without a role counts as a user turn, as Gemini reads a content without one.
    if not isinstance(items, list):
        return 1
    turns = sum(
        1 for item in items if isinstance(item, dict) and item.get("role", "user") == "user"
    )
    return max(turns, 1)


def _positive_int(body: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(f"{key}: expected a positive integer, got {value!r}")
        return value
    return None


def _require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model: field required")
    return model


def _require_list(body: dict[str, Any], key: str) -> list[Any]:
    value = body.get(key)
    if not isinstance(value, list) or not value:
        raise RequestError(f"{key}: expected a non-empty list")
    return value


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """The fields of a model request that the reply depends on."""

    model: str
    turn: int
    max_output_tokens: int | None
    streamed: bool
    include_usage: bool = False


def parse_request(api: str, body: Any, model_in_path: str | None, streamed: bool) -> ParsedRequest:
    """Validate a model request body and extract the fields that the reply depends on.

    Raises RequestError naming the field when a required field is missing or invalid.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if api == ANTHROPIC_MESSAGES:
        model = _require_model(body)
        if body.get("max_tokens") is None:
            raise RequestError("max_tokens: field required")
        max_tokens = _positive_int(body, "max_tokens")
        turn = _user_turns(_require_list(body, "messages"))
        return ParsedRequest(model, turn, max_tokens, bool(body.get("stream")))
    if api == OPENAI_CHAT:
        model = _require_model(body)
        turn = _user_turns(_require_list(body, "messages"))
        max_tokens = _positive_int(body, "max_completion_tokens", "max_tokens")
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return ParsedRequest(model, turn, max_tokens, bool(body.get("stream")), include_usage)
    if api == OPENAI_RESPONSES:
        model = _require_model(body)
        if not isinstance(body.get("input"), str | list) or not body["input"]:
            raise RequestError("input: expected a string or a non-empty list")
        max_tokens = _positive_int(body, "max_output_tokens")
        return ParsedRequest(
            model, _user_turns(body["input"]), max_tokens, bool(body.get("stream"))
        )
    # Gemini names the model and the streaming mode in the path, not the body.
    assert model_in_path is not None
    turn = _user_turns(_require_list(body, "contents"))
    config = body.get("generationConfig") or {}
    max_tokens = _positive_int(config, "maxOutputTokens") if isinstance(config, dict) else None
    return ParsedRequest(model_in_path, turn, max_tokens, streamed)


def _error_body(api: str | None, status: int, message: str) -> dict[str, Any]:
    if api == ANTHROPIC_MESSAGES:
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        return {"type": "error", "error": {"type": kind, "message": message}}
    if api == GEMINI_GENERATE:
        kind = "NOT_FOUND" if status == 404 else "INVALID_ARGUMENT"
        return {"error": {"code": status, "message": message, "status": kind}}
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


# --- The HTTP server --------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tokencap-simulator"
    # Idle keep-alive connections close after this many seconds.
    timeout = 120
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes; without TCP_NODELAY, Nagle's algorithm
        # and the client's delayed ACK hold the body back by about 40 ms per response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        if urlsplit(self.path).path == "/":
            self._send_bytes(200, b"", "text/plain; charset=utf-8", head_only=True)
        else:
            self._send_bytes(404, b"", "text/plain; charset=utf-8", head_only=True)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        if path == "/":
            text = b"tokencap simulated model provider: no real model, no API key needed\n"
            self._send_bytes(200, text, "text/plain; charset=utf-8")
        elif path in ("/v1/models", "/v1beta/models"):
            self._send_json(200, models_list())
        else:
            self._send_not_found(path)

    def do_POST(self) -> None:
        try:
            body = self._read_body()
        except RequestError as exc:
            logger.info("rejected POST %s: %s", self.path, exc)
            # The rest of the body was not read, so the connection cannot carry another request.
            self.close_connection = True
            self._send_json(400, _error_body(None, 400, str(exc)))
            return
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/")

        if path == "/v1/messages":
            self._answer_model_call(ANTHROPIC_MESSAGES, path, body)
        elif path == "/v1/messages/count_tokens":
            self._send_json(200, {"input_tokens": count_input_tokens(body)})
        elif path == "/v1/chat/completions":
            self._answer_model_call(OPENAI_CHAT, path, body)
        elif path == "/v1/responses":
            self._answer_model_call(OPENAI_RESPONSES, path, body)
        elif match := _GEMINI_ROUTE.match(path):
            self._answer_gemini(path, match, parse_qs(parts.query), body)
        else:
            self._send_not_found(path)

    # --- Model calls ----------------------------------------------------------------------

    def _answer_gemini(
        self, path: str, match: re.Match[str], query: dict[str, list[str]], body: bytes
    ) -> None:
        method = match["method"]
        if method == "countTokens":
            tokens = count_input_tokens(body)
            details = [{"modality": "TEXT", "tokenCount": tokens}]
            self._send_json(200, {"totalTokens": tokens, "promptTokensDetails": details})
        elif method in ("generateContent", "streamGenerateContent"):
            streamed = method == "streamGenerateContent"
            sse = query.get("alt") == ["sse"]
            self._answer_model_call(GEMINI_GENERATE, path, body, match["model"], streamed, sse)
        else:
            self._send_not_found(path)

    def _answer_model_call(
        self,
        api: str,
        path: str,
        body: bytes,
        model_in_path: str | None = None,
        streamed: bool = False,
        sse: bool = False,
    ) -> None:
        provider = self.server.provider
        try:
            request = parse_request(api, _load_json(body), model_in_path, streamed)
        except RequestError as exc:
            logger.info("rejected POST %s: %s", path, exc)
            provider.record(SimulatedCall(api, path, model_in_path, streamed, body, 400))
            self._send_json(400, _error_body(api, 400, str(exc)))
            return

        words = reply_words(request.turn, request.max_output_tokens)
        completion = Completion(
            response_id=provider.next_id(api),
            model=request.model,
            words=words,
            input_tokens=count_input_tokens(body),
            truncated=len(words) < len(reply_words(request.turn)),
            created=int(time.time()),
        )
        provider.record(
            SimulatedCall(
                api,
                path,
                request.model,
                request.streamed,
                body,
                200,
                completion.input_tokens,
                completion.output_tokens,
            )
        )
        time.sleep(provider.latency)

        if api == ANTHROPIC_MESSAGES:
            if request.streamed:
                self._send_stream(anthropic_events(completion))
            else:
                self._send_json(200, anthropic_message(completion))
        elif api == OPENAI_CHAT:
            if request.streamed:
                self._send_stream(openai_chat_events(completion, request.include_usage))
            else:
                self._send_json(200, openai_chat_completion(completion))
        elif api == OPENAI_RESPONSES:
            if request.streamed:
                self._send_stream(openai_response_events(completion))
            else:
                self._send_json(200, openai_response(completion))
        elif not request.streamed:
            self._send_json(200, gemini_response(completion))
        elif sse:
            self._send_stream(_sse(chunk) for chunk in gemini_chunks(completion))
        else:
            # Without alt=sse, Gemini streams one JSON array, an element at a time.
            self._send_stream(_json_array_pieces(gemini_chunks(completion)), "application/json")

    # --- Reading and writing --------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return self._read_chunked_body()
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            raise RequestError("invalid content-length header") from None
        if length > MAX_REQUEST_BYTES:
            raise RequestError(f"the request body is larger than {MAX_REQUEST_BYTES} bytes")
        return self.rfile.read(length)

    def _read_chunked_body(self) -> bytes:
        pieces = []
        total = 0
        while True:
            size_line = self.rfile.readline().split(b";", 1)[0].strip()
            try:
                size = int(size_line or b"0", 16)
            except ValueError:
                raise RequestError(f"invalid chunk size {size_line[:20]!r}") from None
            if size == 0:
                # Skip trailer fields up to the blank line that ends the body.
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(pieces)
            total += size
            if total > MAX_REQUEST_BYTES:
                raise RequestError(f"the request body is larger than {MAX_REQUEST_BYTES} bytes")
            pieces.append(self.rfile.read(size))
            self.rfile.readline()

    def _send_json(self, status: int, data: Any) -> None:
        self._send_bytes(status, json.dumps(data).encode(), "application/json")

    def _send_not_found(self, path: str) -> None:
        message = f"the simulated provider has no route {self.command} {path}"
        logger.info("%s", message)
        if path in ("/chat/completions", "/responses"):
            message += "; OpenAI routes are under /v1, so set OPENAI_BASE_URL to end in /v1"
        self._send_json(404, _error_body(None, 404, message))

    def _send_bytes(
        self, status: int, payload: bytes, content_type: str, head_only: bool = False
    ) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.send_header("request-id", self.server.provider.next_id("request"))
        self.end_headers()
        if not head_only:
            self.wfile.write(payload)

    def _send_stream(
        self, events: Iterable[bytes], content_type: str = "text/event-stream; charset=utf-8"
    ) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("request-id", self.server.provider.next_id("request"))
        self.end_headers()
        delay = self.server.provider.event_delay
        try:
            for i, event in enumerate(events):
                if i and delay:
                    time.sleep(delay)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as exc:
            # A client that stops reading (tokencap cutting a stream, for one) is expected.
            logger.debug("stream to %s ended early: %s", self.address_string(), exc)
            self.close_connection = True


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None


def _json_array_pieces(chunks: list[dict[str, Any]]) -> Iterator[bytes]:
    for i, chunk in enumerate(chunks):
        yield ("[" if i == 0 else ",\r\n").encode() + json.dumps(chunk).encode()
    yield b"]"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, provider: SimulatedProvider) -> None:
        self.provider = provider
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__((HOST, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up with getfqdn, which can stall for
        # seconds where reverse DNS is slow; the loopback address needs no lookup.
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints the traceback on stderr by default; it goes to the log instead.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            # Clients close idle keep-alive connections whenever they like.
            logger.debug("connection from %s closed: %s", client_address, error)
        else:
            logger.exception("handling a request from %s failed", client_address)

    def close_connections(self) -> None:
        """Shut down every open client connection, which ends its handler thread."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            # A connection the client closed already raises OSError, which is harmless here.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class SimulatedProvider:
    """A model provider simulated on 127.0.0.1, running in a background thread.

    Use it as a context manager, which starts it and stops it::

        with SimulatedProvider() as simulator:
            os.environ["ANTHROPIC_BASE_URL"] = simulator.url

    `port=0` picks a free port. `latency` is the delay in seconds before each model response
    starts, and `event_delay` the delay between two stream events. `on_call` is called from a
    handler thread with each model request as it is received.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        latency: float = 0.0,
        event_delay: float = DEFAULT_EVENT_DELAY,
        on_call: Callable[[SimulatedCall], None] | None = None,
    ) -> None:
        self.requested_port = port
        self.latency = latency
        self.event_delay = event_delay
        self.on_call = on_call
        self._calls: list[SimulatedCall] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """Return the port the simulator listens on; raise RuntimeError before `start`."""
        if self._server is None:
            raise RuntimeError("the simulated provider is not running; call start() first")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """Return the base URL, such as http://127.0.0.1:7086, without a trailing slash."""
        return f"http://{HOST}:{self.port}"

    @property
    def calls(self) -> list[SimulatedCall]:
        """Return a copy of the model requests received so far, in arrival order."""
        with self._lock:
            return list(self._calls)

    @property
    def inference_requests(self) -> int:
        """Return how many model requests arrived, rejected ones included."""
        with self._lock:
            return len(self._calls)

    def environment(self) -> dict[str, str]:
        """Return the base-URL variables that point the three SDKs at this simulator."""
        return {
            "ANTHROPIC_BASE_URL": self.url,
            "OPENAI_BASE_URL": self.url + "/v1",
            "GOOGLE_GEMINI_BASE_URL": self.url,
        }

    def start(self) -> SimulatedProvider:
        """Start listening; raise OSError when the port cannot be bound."""
        if self._server is not None:
            return self
        self._server = _Server(self.requested_port, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"tokencap-simulator-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("simulated provider listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop accepting requests and close open connections, ending any stream in progress."""
        if self._server is None:
            return
        url = self.url
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None
        logger.info("simulated provider on %s stopped", url)

    def __enter__(self) -> SimulatedProvider:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def record(self, call: SimulatedCall) -> None:
        """Store a received model request and pass it to `on_call`."""
        with self._lock:
            self._calls.append(call)
        logger.debug(
            "%s %s model=%s status=%d input=%d output=%d",
            call.api,
            call.path,
            call.model,
            call.status,
            call.input_tokens,
            call.output_tokens,
        )
        if self.on_call is not None:
            self.on_call(call)

    def next_id(self, kind: str) -> str:
        """Return a fresh id in the style of the API that `kind` names."""
        number = next(self._ids)
        prefix = {
            ANTHROPIC_MESSAGES: "msg_sim",
            OPENAI_CHAT: "chatcmpl-sim",
            OPENAI_RESPONSES: "resp_sim",
            GEMINI_GENERATE: "sim-",
        }.get(kind, "req_sim")
        return f"{prefix}{number:06d}"
