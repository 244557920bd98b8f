"""The Responses API over a WebSocket: one model call per `response.create` turn.

The client sends `{"type": "response.create", ...}` with the same fields as the body of
`POST /responses`, and the server answers with the same events as the server-sent-event
stream, one text message each, ending with `response.completed`, `response.incomplete`,
`response.failed` or an `error` event. One socket carries many such turns, one after another.
Each turn is admitted before its `response.create` is forwarded and settled at its last event.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tokencap import meter, providers
from tokencap.caps import Refusal
from tokencap.meter import Call, Session
from tokencap.sse import Event
from tokencap.usage import Api, StreamMeter, Usage, read_request

logger = logging.getLogger(__name__)

FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


@dataclass
class Socket:
    """One Responses WebSocket: its provider and the turns not settled yet, oldest first."""

    flow_id: str
    provider: str
    path: str
    turns: deque[Call] = field(default_factory=deque)
    count: int = 0
    closed: bool = False


def is_responses_upgrade(method: str, path: str, headers: Any) -> bool:
    """Return True for the WebSocket handshake of the Responses API."""
    return (
        method == "GET"
        and headers.get("upgrade", "").lower() == "websocket"
        and path.rstrip("/").endswith("/responses")
    )


def client_message(session: Session, socket: Socket, text: str) -> Call | Refusal | None:
    """Admit the turn a client message starts; None for messages that start no turn."""
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("type") != "response.create":
        return None

    # The message carries the request body's fields, with or without a "response" wrapper.
    body = message.get("response") if isinstance(message.get("response"), dict) else message
    body = {k: v for k, v in body.items() if k != "type"}
    info = read_request(Api.OPENAI_RESPONSES, body, socket.path, {})
    info.streamed = True  # every turn arrives as a stream of events
    socket.count += 1
    key = f"{socket.flow_id}:{socket.count}"
    api = Api.OPENAI_RESPONSES
    outcome = meter.admit(session, key, socket.provider, api, info, "WS", socket.path)
    if isinstance(outcome, Call):
        outcome.meter = StreamMeter(Api.OPENAI_RESPONSES)
        socket.turns.append(outcome)
    return outcome


def server_message(session: Session, socket: Socket, text: str) -> Refusal | None:
    """Meter one server event of the oldest open turn; settle the turn at its last event.

    Returns a refusal when the turn's running cost passed the dollar cap.
    """
    if not socket.turns:
        return None
    call = socket.turns[0]
    assert call.meter is not None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    kind = data.get("type") if isinstance(data, dict) else None
    if call.first_byte is None:
        call.first_byte = time.monotonic()
    call.meter.observe(Event(name=str(kind or "message"), data=text, raw=b""))

    if kind in FINAL_EVENTS or kind == "error":
        socket.turns.popleft()
        status = _final_status(call, kind, data)
        # An error the provider sends instead of a response carries no usage and costs nothing.
        free = kind == "error" and call.meter.info.usage is None
        _settle(session, call, status, usage=Usage() if free else None)
        return None
    return meter.running(session, call)


def close(session: Session, socket: Socket, reason: str) -> None:
    """Settle the turns still open when the socket closes or is cut."""
    socket.closed = True
    while socket.turns:
        call = socket.turns.popleft()
        _settle(session, call, status="cut" if call.cut else "dropped", error=reason)


def refusal_message(session: Session, socket: Socket, refusal: Refusal, cut: bool) -> str:
    """Return the error event that ends a refused or cut turn."""
    status = session.refusal_status(Api.OPENAI_RESPONSES)
    suffix = "; the response was cut" if cut else ""
    return providers.websocket_error_event(f"tokencap: {refusal.message}{suffix}", status)


def _final_status(call: Call, kind: str | None, data: Any) -> str:
    assert call.meter is not None
    if call.cut:
        return "cut"
    if call.meter.garbled:
        return "garbled"
    if kind == "error" or kind == "response.failed" or call.meter.info.error:
        if isinstance(data, dict) and data.get("type") == "error":
            call.meter.info.error = _error_text(data)
        return "upstream_error"
    return "ok"


def _error_text(data: dict) -> str:
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or error)[:500]
    return str(data.get("message") or data.get("code") or "error event")[:500]


def _settle(
    session: Session,
    call: Call,
    status: str,
    error: str | None = None,
    usage: Usage | None = None,
) -> None:
    assert call.meter is not None
    estimated = False
    if usage is None:
        usage, estimated = meter.stream_usage(call)
    values = {
        "status": status,
        "model": call.meter.info.model or call.request.model,
        "upstream_request_id": call.meter.info.response_id,
        "error": call.meter.info.error or error,
        "http_status": 101,
    }
    meter.settle(session, call, usage, estimated, values)
