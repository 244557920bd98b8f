"""A fake model-provider HTTP server for tests: Anthropic, OpenAI and Gemini on 127.0.0.1.

Start it as a context manager. It listens on a free port of 127.0.0.1 in a background thread
and stops, closing every open connection, when the block ends::

    with FakeUpstream(input_tokens=100, output_tokens=20) as up:
        client = anthropic.Anthropic(api_key="test", base_url=up.url, max_retries=0)
        client.messages.create(model="claude-test", max_tokens=10, messages=[...])
        assert len(up.inference_requests()) == 1

Routes (the query string is ignored for routing, so `/v1/messages?beta=true` works):

- Anthropic: `POST /v1/messages`, `POST /v1/messages/count_tokens`, `GET /v1/models`.
- OpenAI: `POST /v1/chat/completions` and `POST /v1/responses`, each also without `/v1`.
  `GET /v1/models` returns one list that both the Anthropic and the OpenAI SDK can parse.
- Gemini: `POST /{v1,v1beta,v1alpha}/models/{model}:generateContent`,
  `:streamGenerateContent` (SSE with `?alt=sse`, otherwise one streamed JSON array) and
  `:countTokens`; `GET /{version}/models`.
- `HEAD /` and `GET /` return 200. Anything else returns 404 with a JSON error.

Behaviour of model calls
------------------------
Every model call (the routes of `INFERENCE_ROUTES`) gets its reply from a `Behavior`, which sets
usage numbers, text, stream shape and faults. The server's `default` applies unless a scripted
one is queued:

- `FakeUpstream(**fields)` or `FakeUpstream(Behavior(...))` sets the default, and
  `up.default = Behavior(...)` replaces it later.
- `up.script(Behavior(...), Behavior(...))` queues behaviours that the next model calls take in
  order, one each. `up.script(status=429)` queues one made from the current default with those
  fields changed. `api="anthropic"` (or `"openai_chat"`, `"openai_responses"`, `"gemini"`)
  reserves the queued behaviours for calls to that API, so parallel agents on different
  providers don't take each other's. `count_tokens`, model lists and unknown routes never take
  a scripted behaviour.

Requests that ask for JSON output matching a schema (Gemini `responseJsonSchema` or
`responseSchema`, OpenAI `response_format` or `text.format` of type `json_schema`, Anthropic
`output_format` or `output_config.format`) get the same replies as any other call, unless
`up.schema_behavior` is set. Then they get that behaviour with a JSON instance of the schema as
their text, and take no scripted behaviour. Agents that route or check themselves with such
calls (Gemini CLI asks for a complexity score before each prompt) then keep working while the
script drives their main calls.

Usage fields are reported verbatim in each API's own field, and totals are computed the way the
API computes them:

=====================  ===========================  ===================  =======================
Behavior field         Anthropic                    OpenAI chat / resp.  Gemini
=====================  ===========================  ===================  =======================
input_tokens           input_tokens                 prompt_tokens /      promptTokenCount
                                                    input_tokens
output_tokens          output_tokens (final)        completion_tokens /  candidatesTokenCount
                                                    output_tokens
cache_read_tokens      cache_read_input_tokens      cached_tokens        cachedContentTokenCount
cache_write_tokens     ephemeral_5m_input_tokens    (not reported)       (not reported)
cache_write_1h_tokens  ephemeral_1h_input_tokens    (not reported)       (not reported)
reasoning_tokens       (not reported)               reasoning_tokens     thoughtsTokenCount
=====================  ===========================  ===================  =======================

Anthropic's `cache_creation_input_tokens` is the sum of the two cache-write fields. OpenAI's
`total_tokens` is input plus output, and Gemini's `totalTokenCount` is prompt plus candidates
plus thoughts.

Streams split `text` into `events` content events (by code point, so some are empty when the
text is shorter), around the fixed events that each API sends first and last. `delay` seconds
pass between consecutive events. `drop_after_events` counts every event written, fixed ones
included; a `data: [DONE]` line counts as one.

TLS and WebSockets
------------------
`TestCA()` makes a throwaway certificate authority in memory, and `ca.issue("api.openai.com")`
a server certificate for those names. `FakeUpstream(tls=ca.issue(...))` serves HTTPS with it;
`ca.write(path)` writes the CA certificate for clients to trust. `tls=None` (the default)
serves plain HTTP as before.

`GET /v1/responses` (or `/responses`) with `Upgrade: websocket` opens a Responses API
WebSocket. Each `{"type": "response.create", ...}` message the client sends is one model call:
it takes a behaviour like a `POST /v1/responses` and is answered with the same events as the
stream, one text message each. A scripted error status is sent as an error event
`{"type": "error", "status": N, "error": {...}}`. The handshake is logged as a request of route
`openai.responses_websocket`, and each turn as a model call of route
`openai.responses_websocket_turn` whose `body` is the message.

What is logged
--------------
`up.requests` is a snapshot list of `RequestRecord`, one per HTTP request in arrival order, and
`up.inference_requests()` keeps only model calls. A record is added as soon as the request body
has been read, and its `finished` event is set once the server is done with it. An SDK call can
return before that, so call `record.wait()` or `up.wait_for_requests(n)` before reading
`completed`, `disconnected`, `dropped` or `events_sent`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import hashlib
import json
import logging
import re
import select
import socket
import socketserver
import ssl
import struct
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit

logger = logging.getLogger(__name__)

__all__ = [
    "API_ANTHROPIC",
    "API_GEMINI",
    "API_OPENAI_CHAT",
    "API_OPENAI_RESPONSES",
    "INFERENCE_ROUTES",
    "Behavior",
    "FakeUpstream",
    "RequestRecord",
    "ServerCertificate",
    "TestCA",
]

API_ANTHROPIC = "anthropic"
API_OPENAI_CHAT = "openai_chat"
API_OPENAI_RESPONSES = "openai_responses"
API_GEMINI = "gemini"
APIS = (API_ANTHROPIC, API_OPENAI_CHAT, API_OPENAI_RESPONSES, API_GEMINI)

ROUTE_ANTHROPIC_MESSAGES = "anthropic.messages"
ROUTE_ANTHROPIC_COUNT_TOKENS = "anthropic.count_tokens"
ROUTE_OPENAI_CHAT = "openai.chat_completions"
ROUTE_OPENAI_RESPONSES = "openai.responses"
ROUTE_GEMINI_GENERATE = "gemini.generate_content"
ROUTE_GEMINI_STREAM = "gemini.stream_generate_content"
ROUTE_GEMINI_COUNT_TOKENS = "gemini.count_tokens"
ROUTE_MODELS = "models"
ROUTE_GEMINI_MODELS = "gemini.models"
ROUTE_RESPONSES_WEBSOCKET = "openai.responses_websocket"
ROUTE_RESPONSES_WEBSOCKET_TURN = "openai.responses_websocket_turn"
ROUTE_ROOT = "root"
ROUTE_NOT_FOUND = "not_found"

INFERENCE_ROUTES = frozenset(
    {
        ROUTE_ANTHROPIC_MESSAGES,
        ROUTE_OPENAI_CHAT,
        ROUTE_OPENAI_RESPONSES,
        ROUTE_GEMINI_GENERATE,
        ROUTE_GEMINI_STREAM,
        ROUTE_RESPONSES_WEBSOCKET_TURN,
    }
)

# `slow=True` raises the event count and delay to at least these, a stream of about 20 s that a
# test cuts long before it ends.
SLOW_EVENTS = 400
SLOW_DELAY = 0.05

# Pause between the pieces of a split event, long enough that the pieces leave in separate
# TCP segments on loopback (TCP_NODELAY is set) and reach the client in separate reads.
SPLIT_PAUSE = 0.003

# Handler sockets time out so that a client that stops reading cannot hold a thread forever.
SOCKET_TIMEOUT = 30.0

_GEMINI_MODEL_PATH = re.compile(
    r"^/(?P<version>v1|v1beta|v1alpha)/models/(?P<model>[^/:]+)"
    r":(?P<method>generateContent|streamGenerateContent|countTokens)$"
)
_GEMINI_MODELS_LIST = re.compile(r"^/(v1|v1beta|v1alpha)/models$")


@dataclass(frozen=True)
class Behavior:
    """Reply settings for one model call. Every field has a default that makes a valid reply."""

    text: str = "Hello from the fake upstream."
    # Model name put in the response. None echoes the model of the request.
    model: str | None = None

    input_tokens: int = 25
    output_tokens: int = 12
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    # Cumulative `usage.output_tokens` of Anthropic's `message_delta` events, one event each.
    # Empty sends one `message_delta` with `output_tokens`. The last value must equal
    # `output_tokens`, which the JSON reply and the other APIs report.
    output_token_steps: tuple[int, ...] = ()

    # Content events of a stream: text deltas, or tool-argument deltas in tool-loop mode.
    events: int = 4
    # Seconds between consecutive stream events.
    delay: float = 0.0
    # Seconds to wait before answering at all, so that a call stays in flight (JSON or stream).
    response_delay: float = 0.0
    # Raises events and delay to at least SLOW_EVENTS and SLOW_DELAY, a stream to cut.
    slow: bool = False
    # Writes each stream event in several pieces, cut inside the field name, inside the JSON,
    # inside the first multibyte UTF-8 character and between the two final line breaks.
    split_events: bool = False
    # Ends SSE lines with CRLF instead of LF. The SSE format allows both.
    crlf: bool = False
    # Compresses the body when the request's Accept-Encoding allows gzip, flushing per event.
    gzip: bool = False

    # HTTP status. An error status (400-599) returns the API's error body with no usage.
    status: int = 200
    # Error `type` (Anthropic, OpenAI) or `status` (Gemini). None picks the API's one for `status`.
    error_type: str | None = None
    # Answers 200 with a body that is not JSON, or with one SSE event whose data is not JSON.
    garbled: bool = False
    # Closes the connection after this many stream events, with no chunked terminator. A JSON
    # reply, error bodies included, is cut halfway through instead.
    drop_after_events: int | None = None

    # Answers with a tool call (Anthropic tool_use, OpenAI tool_calls or function_call, Gemini
    # functionCall), so an agent that runs tools calls the model again and again.
    tool_loop: bool = False
    # Tool called in tool-loop mode. None takes the first tool of the request, else "bash".
    tool_name: str | None = None
    tool_arguments: Mapping[str, Any] = field(default_factory=lambda: {"command": "echo tokencap"})

    # Extra response headers for model calls, such as `retry-after`.
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "cache_write_1h_tokens",
            "reasoning_tokens",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.events < 1:
            raise ValueError(f"events must be 1 or more, got {self.events}")
        if self.delay < 0:
            raise ValueError(f"delay must be 0 or more seconds, got {self.delay}")
        if self.response_delay < 0:
            raise ValueError(f"response_delay must be 0 or more, got {self.response_delay}")
        if self.status != 200 and not 400 <= self.status <= 599:
            raise ValueError(f"status must be 200 or an error status 400-599, got {self.status}")
        if self.drop_after_events is not None and self.drop_after_events < 0:
            raise ValueError(f"drop_after_events must be 0 or more, got {self.drop_after_events}")
        if self.output_token_steps and self.output_token_steps[-1] != self.output_tokens:
            raise ValueError(
                f"the last of output_token_steps {self.output_token_steps} must equal "
                f"output_tokens ({self.output_tokens}), the final count"
            )

    @property
    def stream_events(self) -> int:
        """Number of content events in a stream, after `slow` has raised it."""
        return max(self.events, SLOW_EVENTS) if self.slow else self.events

    @property
    def event_delay(self) -> float:
        """Seconds between stream events, after `slow` has raised them."""
        return max(self.delay, SLOW_DELAY) if self.slow else self.delay

    @property
    def delta_output_steps(self) -> tuple[int, ...]:
        """Cumulative output token counts of Anthropic's `message_delta` events."""
        return self.output_token_steps or (self.output_tokens,)


@dataclass(eq=False)
class RequestRecord:
    """One HTTP request the fake received and what it did with it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    raw_body: bytes
    route: str
    # One of APIS for a model call, else None.
    api: str | None = None
    stream: bool = False
    # Model named by the request: the body's `model`, or the Gemini path segment.
    model: str | None = None
    behavior: Behavior | None = None
    # The request asked for JSON matching a schema and got `schema_behavior` with an instance.
    schema_reply: bool = False
    status: int | None = None
    # Value of the `request-id` (Anthropic) or `x-request-id` (OpenAI) response header.
    request_id: str | None = None
    # Id inside the response body: `msg_...`, `chatcmpl-...`, `resp_...` or Gemini's responseId.
    response_id: str | None = None
    gzipped: bool = False
    # The whole response, error bodies included, was written.
    completed: bool = False
    # The client closed the connection before the response was written.
    disconnected: bool = False
    # The fake closed the connection on purpose (`drop_after_events`).
    dropped: bool = False
    # Stream events written in full before the response ended for any reason.
    events_sent: int = 0
    # time.monotonic() when the request body had been read and when the server was done.
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    finished: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def inference(self) -> bool:
        """True for a model call, the requests that a budget meters."""
        return self.route in INFERENCE_ROUTES

    def wait(self, timeout: float = 5.0) -> bool:
        """Block until the server is done with this request, returning False on timeout."""
        return self.finished.wait(timeout)


class _ClientGone(Exception):
    """The peer closed the connection while a response was being written."""


class _Dropped(Exception):
    """The fake closed the connection on purpose, because of `drop_after_events`."""


@dataclass
class _Call:
    """Request, behaviour and reply ids of the model call being served."""

    api: str
    behavior: Behavior
    body: dict[str, Any]
    model: str
    stream: bool
    response_id: str
    include_usage: bool = False

    @property
    def response_model(self) -> str:
        return self.behavior.model or self.model


# ---------------------------------------------------------------------------------------------
# Payloads. Each builder is pure and returns the JSON body, or the stream events as bytes.
# ---------------------------------------------------------------------------------------------


def _new_id(prefix: str, length: int = 24) -> str:
    return prefix + uuid.uuid4().hex[:length]


def _json_bytes(payload: Any) -> bytes:
    # ensure_ascii=False keeps multibyte characters as raw UTF-8, so a split event can cut one.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _sse(payload: Any, event: str | None = None, *, crlf: bool = False) -> bytes:
    data = payload if isinstance(payload, bytes) else _json_bytes(payload)
    newline = b"\r\n" if crlf else b"\n"
    head = b"event: " + event.encode() + newline if event else b""
    return head + b"data: " + data + newline + newline


def _split_text(text: str, count: int) -> list[str]:
    """Split text into `count` pieces of nearly equal numbers of code points."""
    bounds = [round(i * len(text) / count) for i in range(count + 1)]
    return [text[bounds[i] : bounds[i + 1]] for i in range(count)]


def _first_tool_name(body: Mapping[str, Any], api: str) -> str | None:
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    tool = tools[0]
    if api == API_OPENAI_CHAT:
        function = tool.get("function")
        return function.get("name") if isinstance(function, dict) else None
    if api == API_GEMINI:
        declarations = tool.get("functionDeclarations") or tool.get("function_declarations")
        if isinstance(declarations, list) and declarations and isinstance(declarations[0], dict):
            return declarations[0].get("name")
        return None
    return tool.get("name")


def _tool_name(call: _Call) -> str:
    return call.behavior.tool_name or _first_tool_name(call.body, call.api) or "bash"


def _tool_arguments_json(call: _Call) -> str:
    return json.dumps(dict(call.behavior.tool_arguments), ensure_ascii=False)


# Anthropic Messages ---------------------------------------------------------------------------


def _anthropic_usage(behavior: Behavior, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": behavior.input_tokens,
        "cache_creation_input_tokens": behavior.cache_write_tokens + behavior.cache_write_1h_tokens,
        "cache_read_input_tokens": behavior.cache_read_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": behavior.cache_write_tokens,
            "ephemeral_1h_input_tokens": behavior.cache_write_1h_tokens,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _anthropic_tool_block(call: _Call, tool_id: str, *, with_input: bool) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": tool_id,
        "name": _tool_name(call),
        "input": dict(call.behavior.tool_arguments) if with_input else {},
    }


def _anthropic_message(call: _Call) -> dict[str, Any]:
    behavior = call.behavior
    if behavior.tool_loop:
        content = [_anthropic_tool_block(call, _new_id("toolu_"), with_input=True)]
        stop_reason = "tool_use"
    else:
        content = [{"type": "text", "text": behavior.text}]
        stop_reason = "end_turn"
    return {
        "id": call.response_id,
        "type": "message",
        "role": "assistant",
        "model": call.response_model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _anthropic_usage(behavior, behavior.output_tokens),
    }


def _anthropic_stream(call: _Call) -> list[bytes]:
    behavior = call.behavior
    crlf = behavior.crlf

    def event(name: str, payload: dict[str, Any]) -> bytes:
        return _sse({"type": name, **payload}, name, crlf=crlf)

    start_message = {
        "id": call.response_id,
        "type": "message",
        "role": "assistant",
        "model": call.response_model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        # A placeholder output count, as in a real stream. The final one is in message_delta.
        "usage": _anthropic_usage(behavior, 1),
    }
    events = [event("message_start", {"message": start_message})]

    if behavior.tool_loop:
        block = _anthropic_tool_block(call, _new_id("toolu_"), with_input=False)
        pieces = _split_text(_tool_arguments_json(call), behavior.stream_events)
        deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in pieces]
        stop_reason = "tool_use"
    else:
        block = {"type": "text", "text": ""}
        pieces = _split_text(behavior.text, behavior.stream_events)
        deltas = [{"type": "text_delta", "text": piece} for piece in pieces]
        stop_reason = "end_turn"

    events.append(event("content_block_start", {"index": 0, "content_block": block}))
    events.append(event("ping", {}))
    events.extend(event("content_block_delta", {"index": 0, "delta": delta}) for delta in deltas)
    events.append(event("content_block_stop", {"index": 0}))

    steps = behavior.delta_output_steps
    for position, output_tokens in enumerate(steps):
        is_last = position == len(steps) - 1
        # NOTE: whether the live API repeats the input-side counts in every message_delta is not
        # checked here. The anthropic 2.17 accumulator reads them as cumulative totals.
        usage = {
            "input_tokens": behavior.input_tokens,
            "cache_creation_input_tokens": behavior.cache_write_tokens
            + behavior.cache_write_1h_tokens,
            "cache_read_input_tokens": behavior.cache_read_tokens,
            "output_tokens": output_tokens,
        }
        delta = {"stop_reason": stop_reason if is_last else None, "stop_sequence": None}
        events.append(event("message_delta", {"delta": delta, "usage": usage}))
    events.append(event("message_stop", {}))
    return events


# OpenAI Chat Completions ----------------------------------------------------------------------


def _chat_usage(behavior: Behavior) -> dict[str, Any]:
    return {
        "prompt_tokens": behavior.input_tokens,
        "completion_tokens": behavior.output_tokens,
        "total_tokens": behavior.input_tokens + behavior.output_tokens,
        "prompt_tokens_details": {"cached_tokens": behavior.cache_read_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": behavior.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_completion(call: _Call) -> dict[str, Any]:
    behavior = call.behavior
    message: dict[str, Any] = {"role": "assistant", "refusal": None, "annotations": []}
    if behavior.tool_loop:
        message["content"] = None
        message["tool_calls"] = [
            {
                "id": _new_id("call_"),
                "type": "function",
                "function": {"name": _tool_name(call), "arguments": _tool_arguments_json(call)},
            }
        ]
        finish_reason = "tool_calls"
    else:
        message["content"] = behavior.text
        finish_reason = "stop"
    return {
        "id": call.response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": call.response_model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": _chat_usage(behavior),
        "service_tier": "default",
        "system_fingerprint": "fp_fakeupstream",
    }


def _chat_stream(call: _Call) -> list[bytes]:
    behavior = call.behavior
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": call.response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": call.response_model,
            "service_tier": "default",
            "system_fingerprint": "fp_fakeupstream",
            "choices": choices,
        }
        # OpenAI's API reference for include_usage: with it every chunk has a `usage` key, null
        # except in the extra last chunk, and without it no chunk has the key.
        if call.include_usage:
            payload["usage"] = usage
        return _sse(payload, crlf=behavior.crlf)

    def choice(delta: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    if behavior.tool_loop:
        pieces = _split_text(_tool_arguments_json(call), behavior.stream_events)
        opening = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": _new_id("call_"),
                    "type": "function",
                    "function": {"name": _tool_name(call), "arguments": ""},
                }
            ],
        }
        deltas = [
            {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in pieces
        ]
        finish_reason = "tool_calls"
    else:
        pieces = _split_text(behavior.text, behavior.stream_events)
        opening = {"role": "assistant", "content": "", "refusal": None}
        deltas = [{"content": piece} for piece in pieces]
        finish_reason = "stop"

    events = [chunk(choice(opening))]
    events.extend(chunk(choice(delta)) for delta in deltas)
    events.append(chunk(choice({}, finish_reason)))
    if call.include_usage:
        events.append(chunk([], _chat_usage(behavior)))
    events.append(_sse(b"[DONE]", crlf=behavior.crlf))
    return events


# OpenAI Responses -----------------------------------------------------------------------------


def _responses_usage(behavior: Behavior) -> dict[str, Any]:
    return {
        "input_tokens": behavior.input_tokens,
        "input_tokens_details": {"cached_tokens": behavior.cache_read_tokens},
        "output_tokens": behavior.output_tokens,
        "output_tokens_details": {"reasoning_tokens": behavior.reasoning_tokens},
        "total_tokens": behavior.input_tokens + behavior.output_tokens,
    }


def _response_object(
    call: _Call, created_at: int, output: list[dict[str, Any]], *, done: bool
) -> dict[str, Any]:
    return {
        "id": call.response_id,
        "object": "response",
        "created_at": created_at,
        "status": "completed" if done else "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": call.response_model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": _responses_usage(call.behavior) if done else None,
        "user": None,
        "metadata": {},
    }


def _output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _response_message_item(item_id: str, text: str, *, done: bool) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": [_output_text_part(text)] if done else [],
    }


def _response_function_item(
    call: _Call, item_id: str, call_id: str, *, done: bool
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": "completed" if done else "in_progress",
        "call_id": call_id,
        "name": _tool_name(call),
        "arguments": _tool_arguments_json(call) if done else "",
    }


def _responses_final_output(call: _Call, item_id: str, call_id: str) -> list[dict[str, Any]]:
    if call.behavior.tool_loop:
        return [_response_function_item(call, item_id, call_id, done=True)]
    return [_response_message_item(item_id, call.behavior.text, done=True)]


def _responses_response(call: _Call) -> dict[str, Any]:
    item_id = _new_id("fc_" if call.behavior.tool_loop else "msg_")
    output = _responses_final_output(call, item_id, _new_id("call_"))
    return _response_object(call, int(time.time()), output, done=True)


def _responses_stream(call: _Call) -> list[bytes]:
    return [
        _sse(payload, payload["type"], crlf=call.behavior.crlf)
        for payload in _responses_events(call)
    ]


def _responses_events(call: _Call) -> list[dict[str, Any]]:
    """Return the Responses API stream events, numbered, as JSON objects."""
    behavior = call.behavior
    created_at = int(time.time())
    item_id = _new_id("fc_" if behavior.tool_loop else "msg_")
    call_id = _new_id("call_")
    payloads: list[dict[str, Any]] = []

    def add(event_type: str, **payload: Any) -> None:
        payloads.append({"type": event_type, **payload})

    in_progress = _response_object(call, created_at, [], done=False)
    add("response.created", response=in_progress)
    add("response.in_progress", response=in_progress)

    if behavior.tool_loop:
        arguments = _tool_arguments_json(call)
        added_item = _response_function_item(call, item_id, call_id, done=False)
        add("response.output_item.added", output_index=0, item=added_item)
        for piece in _split_text(arguments, behavior.stream_events):
            add(
                "response.function_call_arguments.delta",
                item_id=item_id,
                output_index=0,
                delta=piece,
            )
        add(
            "response.function_call_arguments.done",
            item_id=item_id,
            output_index=0,
            name=_tool_name(call),
            arguments=arguments,
        )
        done_item = _response_function_item(call, item_id, call_id, done=True)
    else:
        location = {"item_id": item_id, "output_index": 0, "content_index": 0}
        added_item = _response_message_item(item_id, "", done=False)
        add("response.output_item.added", output_index=0, item=added_item)
        add("response.content_part.added", **location, part=_output_text_part(""))
        for piece in _split_text(behavior.text, behavior.stream_events):
            add("response.output_text.delta", **location, delta=piece, logprobs=[])
        add("response.output_text.done", **location, text=behavior.text, logprobs=[])
        add("response.content_part.done", **location, part=_output_text_part(behavior.text))
        done_item = _response_message_item(item_id, behavior.text, done=True)

    add("response.output_item.done", output_index=0, item=done_item)
    final = _response_object(call, created_at, [done_item], done=True)
    add("response.completed", response=final)

    return [{**payload, "sequence_number": number} for number, payload in enumerate(payloads)]


# Gemini ---------------------------------------------------------------------------------------


def _gemini_usage(behavior: Behavior, candidates_tokens: int) -> dict[str, Any]:
    return {
        "promptTokenCount": behavior.input_tokens,
        "candidatesTokenCount": candidates_tokens,
        "thoughtsTokenCount": behavior.reasoning_tokens,
        "cachedContentTokenCount": behavior.cache_read_tokens,
        "totalTokenCount": behavior.input_tokens + candidates_tokens + behavior.reasoning_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": behavior.input_tokens}],
    }


def _gemini_chunk(
    call: _Call, parts: list[dict[str, Any]], candidates_tokens: int, *, last: bool
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if last:
        candidate["finishReason"] = "STOP"
    return {
        "candidates": [candidate],
        "usageMetadata": _gemini_usage(call.behavior, candidates_tokens),
        "modelVersion": call.response_model,
        "responseId": call.response_id,
    }


def _gemini_function_part(call: _Call) -> dict[str, Any]:
    return {"functionCall": {"name": _tool_name(call), "args": dict(call.behavior.tool_arguments)}}


def _gemini_response(call: _Call) -> dict[str, Any]:
    behavior = call.behavior
    parts = [_gemini_function_part(call)] if behavior.tool_loop else [{"text": behavior.text}]
    return _gemini_chunk(call, parts, behavior.output_tokens, last=True)


def _gemini_chunks(call: _Call) -> list[dict[str, Any]]:
    behavior = call.behavior
    if behavior.tool_loop:
        # The function call comes whole in one chunk, so `events` does not apply here.
        parts = [_gemini_function_part(call)]
        return [_gemini_chunk(call, parts, behavior.output_tokens, last=True)]

    pieces = _split_text(behavior.text, behavior.stream_events)
    chunks = []
    for position, piece in enumerate(pieces):
        last = position == len(pieces) - 1
        # Earlier chunks carry a running candidate count, so only the last one has the final usage.
        running = behavior.output_tokens * (position + 1) // len(pieces)
        chunks.append(_gemini_chunk(call, [{"text": piece}], running, last=last))
    return chunks


def _gemini_sse_stream(call: _Call) -> list[bytes]:
    return [_sse(chunk, crlf=call.behavior.crlf) for chunk in _gemini_chunks(call)]


def _gemini_array_stream(call: _Call) -> list[bytes]:
    """Return one JSON array in pieces, an element each, as sent without `alt=sse`."""
    elements = [_json_bytes(chunk) for chunk in _gemini_chunks(call)]
    pieces = [b"[" + elements[0]]
    pieces.extend(b",\r\n" + data for data in elements[1:])
    pieces[-1] += b"]"
    return pieces


# Errors and garbled replies -------------------------------------------------------------------

# Per status: Anthropic error type, OpenAI error type, OpenAI error code, Gemini status.
_ERROR_KINDS: dict[int, tuple[str, str, str | None, str]] = {
    400: ("invalid_request_error", "invalid_request_error", None, "INVALID_ARGUMENT"),
    401: ("authentication_error", "invalid_request_error", "invalid_api_key", "UNAUTHENTICATED"),
    403: ("permission_error", "invalid_request_error", None, "PERMISSION_DENIED"),
    404: ("not_found_error", "invalid_request_error", "model_not_found", "NOT_FOUND"),
    413: ("request_too_large", "invalid_request_error", None, "INVALID_ARGUMENT"),
    429: ("rate_limit_error", "requests", "rate_limit_exceeded", "RESOURCE_EXHAUSTED"),
    500: ("api_error", "server_error", None, "INTERNAL"),
    503: ("api_error", "server_error", None, "UNAVAILABLE"),
    504: ("api_error", "server_error", None, "DEADLINE_EXCEEDED"),
    529: ("overloaded_error", "server_error", None, "UNAVAILABLE"),
}
_DEFAULT_ERROR_KIND = ("api_error", "server_error", None, "UNKNOWN")


def _error_body(api: str, status: int, message: str, error_type: str | None = None) -> bytes:
    anthropic_type, openai_type, openai_code, gemini_status = _ERROR_KINDS.get(
        status, _DEFAULT_ERROR_KIND
    )
    if api == API_ANTHROPIC:
        error = {"type": error_type or anthropic_type, "message": message}
        return _json_bytes({"type": "error", "error": error, "request_id": _new_id("req_")})
    if api == API_GEMINI:
        error = {"code": status, "message": message, "status": error_type or gemini_status}
        return _json_bytes({"error": error})
    error = {"message": message, "type": error_type or openai_type, "param": None}
    error["code"] = openai_code
    return _json_bytes({"error": error})


# Not JSON, but starts like a reply, so a parser fails inside the body rather than at byte 0.
_GARBLED_JSON = b'{"id": "garbled", "usage": {"input_tokens": 1'
_GARBLED_SSE_DATA = b'{"type": "message_start", "message": {"usage": <<garbled>>'


def _garbled_stream(call: _Call) -> list[bytes]:
    crlf = call.behavior.crlf
    if call.api == API_ANTHROPIC:
        return [_sse(_GARBLED_SSE_DATA, "message_start", crlf=crlf)]
    if call.api == API_OPENAI_RESPONSES:
        return [_sse(_GARBLED_SSE_DATA, "response.created", crlf=crlf)]
    return [_sse(_GARBLED_SSE_DATA, crlf=crlf)]


# ---------------------------------------------------------------------------------------------
# Wire writing
# ---------------------------------------------------------------------------------------------


def _split_points(data: bytes) -> list[int]:
    """Return offsets that cut an event inside its field name, inside its JSON, inside its first
    multibyte UTF-8 character and between its two final line breaks."""
    cuts = {4, len(data) // 2, len(data) - 1}
    lead = next((index for index, byte in enumerate(data) if byte >= 0xC0), None)
    if lead is not None:
        cuts.add(lead + 1)
    return sorted(cut for cut in cuts if 0 < cut < len(data))


def _split_event(data: bytes) -> list[bytes]:
    bounds = [0, *_split_points(data), len(data)]
    return [data[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]


def _chunk(data: bytes) -> bytes:
    """Frame data as one HTTP/1.1 chunk, or return b"" for no data, since an empty chunk would
    end the body."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def _accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "*"):
            continue
        quality = params.strip().lower().removeprefix("q=")
        try:
            return not quality or float(quality) > 0
        except ValueError:
            return False
    return False


_WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_TEXT = 0x1
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA


def _frame(opcode: int, payload: bytes) -> bytes:
    """Frame one unmasked, unfragmented WebSocket message, as a server sends it."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, length)
    return head + payload


def _text_frame(payload: Any) -> bytes:
    return _frame(_OP_TEXT, _json_bytes(payload))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Stop joins handler threads itself, with a deadline, after closing their sockets.
    block_on_close = False

    def __init__(self, port: int, fake: FakeUpstream, tls: ServerCertificate | None) -> None:
        self.fake = fake
        self.tls_context = tls.server_context() if tls else None
        super().__init__(("127.0.0.1", port), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        if self.tls_context is not None:
            # The handshake runs in the handler's thread, so a slow client blocks nobody else.
            connection = self.tls_context.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        return connection, address

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which may send a DNS query. The
        # address is fixed, so skip that.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "127.0.0.1"
        self.server_port = self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.fake.stopping:
            return
        if isinstance(sys.exc_info()[1], ssl.SSLError):
            # A client that does not trust the test CA ends the handshake; that is its right.
            logger.debug("fake upstream: TLS handshake with %s failed", client_address)
            return
        logger.exception("fake upstream: request handler failed for client %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT
    server: _Server

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(SOCKET_TIMEOUT)
            self.request.do_handshake()
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._register_connection(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._unregister_connection(self.connection)

    def handle(self) -> None:
        # A client that resets an idle keep-alive connection is normal, not a server error.
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as error:
            logger.debug("fake upstream: %s closed the connection: %s", self.client_address, error)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("fake upstream %s: %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    # Request -----------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked_body(self) -> bytes:
        body = bytearray()
        while True:
            size_line = self.rfile.readline()
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Skip trailer fields up to the blank line that ends the message.
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(body)
            body += self.rfile.read(size)
            self.rfile.readline()

    def _serve(self) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        raw_body = self._read_body()
        try:
            body = json.loads(raw_body) if raw_body else None
        except (ValueError, UnicodeDecodeError):
            body = None

        route, api, model = _match_route(self.command, url.path, body)
        record = RequestRecord(
            method=self.command,
            path=url.path,
            query=dict(parse_qsl(url.query, keep_blank_values=True)),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
            raw_body=raw_body,
            route=route,
            api=api,
            model=model,
        )
        fake._add_record(record)
        self._record = record
        self._gzip = False
        self._compressor: Any = None
        try:
            self._respond(record)
        except _ClientGone:
            record.disconnected = not fake.stopping
            self.close_connection = True
        except _Dropped:
            record.dropped = True
            self.close_connection = True
        finally:
            record.ended = time.monotonic()
            record.finished.set()
            if fake.stopping:
                self.close_connection = True

    # Routing -----------------------------------------------------------------------------

    def _respond(self, record: RequestRecord) -> None:
        fake = self.server.fake
        route = record.route
        if route == ROUTE_ROOT:
            self._send_body(200, b"" if record.method == "HEAD" else b"ok\n", "text/plain")
        elif route == ROUTE_MODELS:
            self._send_json(200, _models_list(fake.default))
        elif route == ROUTE_GEMINI_MODELS:
            self._send_json(200, _gemini_models_list(fake.default))
        elif route == ROUTE_ANTHROPIC_COUNT_TOKENS:
            self._send_json(200, {"input_tokens": fake.default.input_tokens})
        elif route == ROUTE_GEMINI_COUNT_TOKENS:
            self._send_json(200, {"totalTokens": fake.default.input_tokens})
        elif route == ROUTE_RESPONSES_WEBSOCKET:
            self._serve_websocket(record)
        elif route == ROUTE_NOT_FOUND:
            message = f"no route for {record.method} {record.path} on the fake upstream"
            self._send_body(404, _error_body(API_OPENAI_CHAT, 404, message), "application/json")
        else:
            self._respond_to_model_call(record)

    def _respond_to_model_call(self, record: RequestRecord) -> None:
        api = record.api
        assert api is not None
        if not isinstance(record.body, dict):
            message = "the request body must be a JSON object"
            self._send_body(400, _error_body(api, 400, message), "application/json")
            return

        schema = _requested_schema(api, record.body)
        schema_behavior = self.server.fake.schema_behavior
        if schema is not None and schema_behavior is not None:
            text = json.dumps(_schema_instance(schema))
            behavior = replace(schema_behavior, text=text, tool_loop=False)
            record.schema_reply = True
        else:
            behavior = self.server.fake._take_behavior(api)
        record.behavior = behavior
        record.stream = _is_stream_request(record)
        self._gzip = behavior.gzip and _accepts_gzip(record.headers.get("accept-encoding", ""))
        call = _Call(
            api=api,
            behavior=behavior,
            body=record.body,
            model=record.model or "unknown-model",
            stream=record.stream,
            response_id=_new_response_id(api),
            include_usage=_include_usage(record.body),
        )
        record.response_id = call.response_id
        headers = dict(behavior.headers)
        if api == API_ANTHROPIC:
            record.request_id = _new_id("req_")
            headers["request-id"] = record.request_id
        elif api in (API_OPENAI_CHAT, API_OPENAI_RESPONSES):
            record.request_id = _new_id("req_", 32)
            headers["x-request-id"] = record.request_id

        if behavior.response_delay:
            self._wait_between_events(behavior.response_delay)
        if behavior.status != 200:
            message = f"fake upstream error {behavior.status} scripted by the test"
            body = _error_body(api, behavior.status, message, behavior.error_type)
            self._send_body(behavior.status, body, "application/json", headers)
        elif not record.stream:
            payload = _GARBLED_JSON if behavior.garbled else _json_bytes(_json_reply(call))
            self._send_body(200, payload, "application/json", headers)
        elif record.route == ROUTE_GEMINI_STREAM and record.query.get("alt") != "sse":
            events = [_GARBLED_JSON] if behavior.garbled else _gemini_array_stream(call)
            self._send_stream(events, "application/json; charset=UTF-8", headers)
        else:
            events = _garbled_stream(call) if behavior.garbled else _stream_events(call)
            self._send_stream(events, "text/event-stream; charset=utf-8", headers)

    # WebSocket -----------------------------------------------------------------------------

    def _serve_websocket(self, record: RequestRecord) -> None:
        key = self.headers.get("Sec-WebSocket-Key")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            message = f"no route for {record.method} {record.path} on the fake upstream"
            self._send_body(404, _error_body(API_OPENAI_CHAT, 404, message), "application/json")
            return
        accept = base64.b64encode(hashlib.sha1((key + _WEBSOCKET_GUID).encode()).digest())
        record.status = 101
        try:
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept.decode())
            self.end_headers()
            self.wfile.flush()
        except OSError as error:
            raise _ClientGone from error
        self.close_connection = True
        while True:
            try:
                opcode, payload = self._read_frame()
            except (OSError, ValueError, struct.error) as error:
                raise _ClientGone from error
            if opcode == _OP_CLOSE:
                self._write(_frame(_OP_CLOSE, payload[:2]))
                record.completed = True
                return
            if opcode == _OP_PING:
                self._write(_frame(_OP_PONG, payload))
            elif opcode == _OP_TEXT:
                self._websocket_turn(record, payload.decode("utf-8", errors="replace"))

    def _read_frame(self) -> tuple[int, bytes]:
        """Read one whole client message (continuation frames joined) and its opcode."""
        opcode = None
        payload = bytearray()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                raise ConnectionError("the client closed the WebSocket connection")
            final, frame_opcode = head[0] & 0x80, head[0] & 0x0F
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = self.rfile.read(length)
            unmasked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(data))
            if frame_opcode >= 0x8:
                return frame_opcode, unmasked  # control frames are never fragmented
            opcode = frame_opcode if opcode is None else opcode
            payload += unmasked
            if final:
                return opcode, bytes(payload)

    def _websocket_turn(self, handshake: RequestRecord, text: str) -> None:
        """Answer one response.create message with the events of a Responses stream."""
        fake = self.server.fake
        try:
            message = json.loads(text)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("type") != "response.create":
            return
        body = {k: v for k, v in message.items() if k != "type"}
        turn = RequestRecord(
            method="WS",
            path=handshake.path,
            query={},
            headers=handshake.headers,
            body=message,
            raw_body=text.encode(),
            route=ROUTE_RESPONSES_WEBSOCKET_TURN,
            api=API_OPENAI_RESPONSES,
            stream=True,
            model=body.get("model") if isinstance(body.get("model"), str) else None,
        )
        fake._add_record(turn)
        behavior = fake._take_behavior(API_OPENAI_RESPONSES)
        turn.behavior = behavior
        call = _Call(
            api=API_OPENAI_RESPONSES,
            behavior=behavior,
            body=body,
            model=turn.model or "unknown-model",
            stream=True,
            response_id=_new_response_id(API_OPENAI_RESPONSES),
        )
        turn.response_id = call.response_id
        try:
            if behavior.response_delay:
                self._wait_between_events(behavior.response_delay)
            turn.status = behavior.status
            if behavior.status != 200:
                text = f"fake upstream error {behavior.status} scripted by the test"
                error = json.loads(
                    _error_body(API_OPENAI_RESPONSES, behavior.status, text, behavior.error_type)
                )["error"]
                event = {"type": "error", "status": behavior.status, "error": error}
                self._write(_text_frame(event))
            else:
                events = _responses_events(call)
                for position, event in enumerate(events):
                    drop_after = behavior.drop_after_events
                    if drop_after is not None and position >= drop_after:
                        self._drop_connection()
                    self._write(_text_frame(event))
                    turn.events_sent += 1
                    if position < len(events) - 1:
                        self._wait_between_events(behavior.event_delay)
            turn.completed = True
        except _ClientGone:
            turn.disconnected = not fake.stopping
            raise
        except _Dropped:
            turn.dropped = True
            raise
        finally:
            turn.ended = time.monotonic()
            turn.finished.set()

    # Response writing --------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as error:
            raise _ClientGone from error
        except OSError as error:
            if self.server.fake.stopping:
                raise _ClientGone from error
            raise

    def _send_json(self, status: int, payload: Any) -> None:
        self._send_body(status, _json_bytes(payload), "application/json")

    def _send_body(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        record = self._record
        behavior = record.behavior
        if self._gzip and body:
            body = gzip.compress(body)
            record.gzipped = True
        record.status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if record.gzipped:
                self.send_header("Content-Encoding", "gzip")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
        except OSError as error:
            raise _ClientGone from error
        if self.command == "HEAD":
            record.completed = True
            return

        if behavior is not None and behavior.drop_after_events is not None:
            # A JSON reply has no events, so a drop cuts it halfway through its body.
            self._write(body[: len(body) // 2])
            self._drop_connection()
        self._write(body)
        record.completed = True

    def _send_stream(
        self, events: list[bytes], content_type: str, headers: Mapping[str, str]
    ) -> None:
        record = self._record
        behavior = record.behavior
        assert behavior is not None
        record.status = 200
        if self._gzip:
            # wbits=31 writes a gzip header and trailer around the deflate stream.
            self._compressor = zlib.compressobj(wbits=31)
            record.gzipped = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
            if record.gzipped:
                self.send_header("Content-Encoding", "gzip")
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
        except OSError as error:
            raise _ClientGone from error

        for position, event in enumerate(events):
            if behavior.drop_after_events is not None and position >= behavior.drop_after_events:
                self._drop_connection()
            is_last = position == len(events) - 1
            self._write_event(event, split=behavior.split_events, last=is_last)
            record.events_sent += 1
            if not is_last:
                self._wait_between_events(behavior.event_delay)
        record.completed = True

    def _write_event(self, event: bytes, *, split: bool, last: bool) -> None:
        pieces = _split_event(event) if split else [event]
        for position, piece in enumerate(pieces):
            if self._compressor is not None:
                # A sync flush per piece lets the client inflate each piece as soon as it lands.
                piece = self._compressor.compress(piece) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
            data = _chunk(piece)
            if position < len(pieces) - 1:
                self._write(data)
                self._wait_between_events(SPLIT_PAUSE)
                continue
            if last:
                # The end of the body goes out in the same write as the last event. The openai
                # 3.60 SDK closes the connection once it has parsed `[DONE]`, and a later write
                # could then fail although the client got every event.
                if self._compressor is not None:
                    data += _chunk(self._compressor.flush(zlib.Z_FINISH))
                data += b"0\r\n\r\n"
            self._write(data)

    def _drop_connection(self) -> None:
        """Close the connection without finishing the body, and raise _Dropped."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        raise _Dropped

    def _wait_between_events(self, seconds: float) -> None:
        """Sleep up to `seconds`, raising _ClientGone as soon as the peer closes the connection.

        With seconds=0 it only checks, so a client that left is noticed even on a fast stream
        rather than at the next write, which the kernel may still accept.
        """
        if isinstance(self.connection, ssl.SSLSocket):
            # A TLS socket cannot peek, so a client that left is noticed at the next write.
            time.sleep(seconds)
            return
        deadline = time.monotonic() + seconds
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                readable, _, _ = select.select([self.connection], [], [], remaining)
                peeked = self.connection.recv(1, socket.MSG_PEEK) if readable else None
            except (OSError, ValueError) as error:
                raise _ClientGone from error
            if peeked == b"":
                raise _ClientGone
            if peeked is not None:
                # The client sent bytes, such as a pipelined request. The socket then stays
                # readable, so select cannot wait any longer and only the timer ends the pause.
                time.sleep(max(0.0, deadline - time.monotonic()))
            return


def _match_route(method: str, path: str, body: Any) -> tuple[str, str | None, str | None]:
    """Return the route name, the API of a model call and the requested model."""
    body_model = body.get("model") if isinstance(body, dict) else None
    if method in ("HEAD", "GET") and path == "/":
        return ROUTE_ROOT, None, None
    if method == "GET" and path in ("/v1/responses", "/responses"):
        return ROUTE_RESPONSES_WEBSOCKET, None, None
    if method == "GET" and path == "/v1/models":
        return ROUTE_MODELS, None, None
    if method == "GET" and _GEMINI_MODELS_LIST.match(path):
        return ROUTE_GEMINI_MODELS, None, None
    if method == "POST":
        if path == "/v1/messages":
            return ROUTE_ANTHROPIC_MESSAGES, API_ANTHROPIC, body_model
        if path == "/v1/messages/count_tokens":
            return ROUTE_ANTHROPIC_COUNT_TOKENS, None, body_model
        if path in ("/v1/chat/completions", "/chat/completions"):
            return ROUTE_OPENAI_CHAT, API_OPENAI_CHAT, body_model
        if path in ("/v1/responses", "/responses"):
            return ROUTE_OPENAI_RESPONSES, API_OPENAI_RESPONSES, body_model
        match = _GEMINI_MODEL_PATH.match(path)
        if match:
            model = unquote(match["model"])
            routes = {
                "generateContent": (ROUTE_GEMINI_GENERATE, API_GEMINI),
                "streamGenerateContent": (ROUTE_GEMINI_STREAM, API_GEMINI),
                "countTokens": (ROUTE_GEMINI_COUNT_TOKENS, None),
            }
            route, api = routes[match["method"]]
            return route, api, model
    return ROUTE_NOT_FOUND, None, None


def _requested_schema(api: str, body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Return the JSON schema a request wants its output to match, or None."""
    if api == API_GEMINI:
        config = body.get("generationConfig") or body.get("generation_config")
        if not isinstance(config, dict):
            return None
        schema = config.get("responseJsonSchema") or config.get("responseSchema")
        return schema if isinstance(schema, dict) else None

    if api == API_OPENAI_CHAT:
        form = body.get("response_format")
        inner = form.get("json_schema") if isinstance(form, dict) else None
        schema = inner.get("schema") if isinstance(inner, dict) else None
        return schema if isinstance(schema, dict) else None

    if api == API_OPENAI_RESPONSES:
        text = body.get("text")
        form = text.get("format") if isinstance(text, dict) else None
    else:
        form = body.get("output_format")
        config = body.get("output_config")
        if form is None and isinstance(config, dict):
            form = config.get("format")
    if not isinstance(form, dict) or form.get("type") != "json_schema":
        return None
    schema = form.get("schema")
    return schema if isinstance(schema, dict) else None


def _schema_instance(schema: Mapping[str, Any], depth: int = 0) -> Any:
    """Return a small value that matches a JSON schema, or a Gemini schema with upper-case
    types: the first enum value or const, every required property, one item per array."""
    if depth > 20:
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and isinstance(options[0], dict):
            return _schema_instance(options[0], depth + 1)

    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if str(k).lower() != "null"), "null")
    kind = str(kind).lower() if kind is not None else None
    if kind is None:
        kind = "object" if "properties" in schema else "string"

    if kind == "object":
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        names = required if isinstance(required, list) else list(properties)
        return {
            name: _schema_instance(properties.get(name) or {}, depth + 1)
            for name in names
            if isinstance(name, str)
        }
    if kind == "array":
        items = schema.get("items")
        count = max(1, int(schema.get("minItems") or 0))
        item = _schema_instance(items, depth + 1) if isinstance(items, dict) else "item"
        return [item] * count
    if kind in ("integer", "number"):
        value = schema.get("minimum", 1)
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return "fake upstream"


def _is_stream_request(record: RequestRecord) -> bool:
    if record.route == ROUTE_GEMINI_STREAM:
        return True
    if record.route == ROUTE_GEMINI_GENERATE:
        return False
    return isinstance(record.body, dict) and record.body.get("stream") is True


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _new_response_id(api: str) -> str:
    prefixes = {
        API_ANTHROPIC: "msg_",
        API_OPENAI_CHAT: "chatcmpl-",
        API_OPENAI_RESPONSES: "resp_",
        API_GEMINI: "",
    }
    return _new_id(prefixes[api])


_JSON_BUILDERS: dict[str, Callable[[_Call], dict[str, Any]]] = {
    API_ANTHROPIC: _anthropic_message,
    API_OPENAI_CHAT: _chat_completion,
    API_OPENAI_RESPONSES: _responses_response,
    API_GEMINI: _gemini_response,
}
_STREAM_BUILDERS: dict[str, Callable[[_Call], list[bytes]]] = {
    API_ANTHROPIC: _anthropic_stream,
    API_OPENAI_CHAT: _chat_stream,
    API_OPENAI_RESPONSES: _responses_stream,
    API_GEMINI: _gemini_sse_stream,
}


def _json_reply(call: _Call) -> dict[str, Any]:
    return _JSON_BUILDERS[call.api](call)


def _stream_events(call: _Call) -> list[bytes]:
    return _STREAM_BUILDERS[call.api](call)


def _models_list(behavior: Behavior) -> dict[str, Any]:
    # Anthropic's page needs data/has_more/first_id/last_id and OpenAI's needs object/data, and
    # both SDKs ignore fields they don't know, so one body serves both.
    model_id = behavior.model or "fake-model"
    entry = {
        "id": model_id,
        "type": "model",
        "object": "model",
        "display_name": model_id,
        "created_at": "2025-01-01T00:00:00Z",
        "created": 1735689600,
        "owned_by": "fakeupstream",
    }
    return {
        "object": "list",
        "data": [entry],
        "has_more": False,
        "first_id": model_id,
        "last_id": model_id,
    }


def _gemini_models_list(behavior: Behavior) -> dict[str, Any]:
    model_id = behavior.model or "fake-model"
    return {
        "models": [
            {
                "name": f"models/{model_id}",
                "displayName": model_id,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
            }
        ]
    }


# ---------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerCertificate:
    """A server certificate and its key, issued by a `TestCA`, in PEM."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def server_context(self) -> ssl.SSLContext:
        """Return a TLS server context that presents this certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as directory:
            cert_file = Path(directory) / "cert.pem"
            key_file = Path(directory) / "key.pem"
            cert_file.write_bytes(self.cert_pem)
            key_file.write_bytes(self.key_pem)
            context.load_cert_chain(cert_file, key_file)
        context.set_alpn_protocols(["http/1.1"])
        return context

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate, as hex, to compare with what a client saw."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        return x509.load_pem_x509_certificate(self.cert_pem).fingerprint(hashes.SHA256()).hex()


class TestCA:
    """A throwaway certificate authority that issues server certificates for tests."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, name: str = "fakeupstream test CA") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate in PEM, for clients to trust."""
        from cryptography.hazmat.primitives import serialization

        return self._cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path | str) -> Path:
        """Write the CA certificate to `path` and return the path."""
        path = Path(path)
        path.write_bytes(self.cert_pem)
        return path

    def issue(self, *names: str) -> ServerCertificate:
        """Issue a server certificate for host names or IP addresses, 127.0.0.1 by default."""
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        names = names or ("127.0.0.1",)
        alternatives: list[x509.GeneralName] = []
        for name in names:
            try:
                alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternatives.append(x509.DNSName(name))
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=10))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return ServerCertificate(
            cert.public_bytes(serialization.Encoding.PEM), key_pem, self.cert_pem
        )


# ---------------------------------------------------------------------------------------------
# Public server
# ---------------------------------------------------------------------------------------------


class FakeUpstream:
    """A fake Anthropic, OpenAI and Gemini server on 127.0.0.1, scripted per model call.

    Pass a `Behavior`, or its fields as keywords, to set the default behaviour. `port=0` picks
    a free port. `schema_behavior` answers calls that ask for schema-shaped JSON (see above).
    """

    def __init__(
        self,
        default: Behavior | None = None,
        *,
        port: int = 0,
        tls: ServerCertificate | None = None,
        schema_behavior: Behavior | None = None,
        **behavior_fields: Any,
    ):
        if default is not None and behavior_fields:
            raise TypeError("pass either a default Behavior or Behavior fields, not both")
        self.default: Behavior = default or Behavior(**behavior_fields)
        # When set, calls that ask for schema-shaped JSON get this behaviour, outside the script.
        self.schema_behavior: Behavior | None = schema_behavior
        self._port = port
        self.tls = tls
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._queue: deque[tuple[str | None, Behavior]] = deque()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind 127.0.0.1 and serve in a background thread. Returns self."""
        if self._server is not None:
            raise RuntimeError("the fake upstream is already running")
        self._stopping.clear()
        self._server = _Server(self._port, self, self.tls)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fakeupstream:{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.debug("fake upstream started on %s", self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close every open connection and wait up to `timeout` s for threads."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            connections = dict(self._connections)
        # Shutting the sockets down wakes handlers blocked in a read, a select or a pause.
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        server.server_close()
        deadline = time.monotonic() + timeout
        thread.join(max(0.0, deadline - time.monotonic()))
        for handler_thread in connections.values():
            handler_thread.join(max(0.0, deadline - time.monotonic()))
        still_running = [t.name for t in connections.values() if t.is_alive()]
        if still_running:
            logger.warning("fake upstream: handler threads still running: %s", still_running)
        self._server = None
        self._thread = None
        logger.debug("fake upstream stopped on port %s", server.server_port)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """TCP port the server listens on, picked when it started."""
        if self._server is None:
            raise RuntimeError("the fake upstream is not running, so it has no port")
        return self._server.server_port

    @property
    def url(self) -> str:
        """Base URL, `http://127.0.0.1:PORT` (`https://` with TLS), with no trailing slash."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def stopping(self) -> bool:
        """True from the start of stop(), so handlers don't count the closing as a disconnect."""
        return self._stopping.is_set()

    # Scripting ---------------------------------------------------------------------------

    def script(self, *behaviors: Behavior, api: str | None = None, **behavior_fields: Any) -> None:
        """Queue behaviours for the next model calls, one per call, in order.

        Keywords make one behaviour from the current default with those fields changed, queued
        after any positional ones. `api` reserves them for calls to that API (one of `APIS`).
        """
        if api is not None and api not in APIS:
            raise ValueError(f"unknown api {api!r}, expected one of {', '.join(APIS)}")
        queued = list(behaviors)
        if behavior_fields:
            queued.append(replace(self.default, **behavior_fields))
        if not queued:
            raise TypeError("script() needs at least one Behavior or Behavior field")
        with self._lock:
            self._queue.extend((api, behavior) for behavior in queued)

    def pending(self, api: str | None = None) -> int:
        """Return how many queued behaviours no call has taken yet, for `api` if given."""
        with self._lock:
            return sum(1 for reserved, _ in self._queue if api is None or reserved in (None, api))

    def _take_behavior(self, api: str) -> Behavior:
        with self._lock:
            for index, (reserved, behavior) in enumerate(self._queue):
                if reserved is None or reserved == api:
                    del self._queue[index]
                    return behavior
        return self.default

    # Records -----------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Snapshot of every request so far, in arrival order."""
        with self._lock:
            return list(self._records)

    def inference_requests(self) -> list[RequestRecord]:
        """Snapshot of the model calls so far, in arrival order."""
        with self._lock:
            return [record for record in self._records if record.inference]

    def wait_for_requests(
        self, count: int, timeout: float = 5.0, *, inference: bool = True
    ) -> list[RequestRecord]:
        """Wait until `count` requests (model calls only, by default) arrived and finished.

        Returns them, or raises TimeoutError naming how many there were.
        """
        deadline = time.monotonic() + timeout
        while True:
            records = self.inference_requests() if inference else self.requests
            if len(records) >= count and all(record.finished.is_set() for record in records):
                return records
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"expected {count} finished requests within {timeout} s, "
                    f"got {len(records)} ({sum(r.finished.is_set() for r in records)} finished)"
                )
            time.sleep(0.01)

    def clear(self) -> None:
        """Forget the records and the queued behaviours. The default stays."""
        with self._lock:
            self._records.clear()
            self._queue.clear()

    def _add_record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def _register_connection(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections[connection] = threading.current_thread()

    def _unregister_connection(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.pop(connection, None)
