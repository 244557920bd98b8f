"""An incremental server-sent events parser that keeps each event's raw bytes.

The proxy forwards a stream event by event: it holds back only the bytes of an event that has
not finished arriving, so it can drop or append whole events without breaking the client's own
parser. Splitting happens on bytes, at blank lines, so a multibyte character split across two
network reads is decoded only once the whole event is in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# An event ends at the first blank line, whichever of the three line endings the server uses.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r|\r\n\n|\n\r\n")
_LINE_SPLIT = re.compile(r"\r\n|\r|\n")


@dataclass(slots=True)
class Event:
    """One server-sent event: its name, its data lines joined by newlines, and its raw bytes."""

    name: str
    data: str
    raw: bytes

    @property
    def is_comment(self) -> bool:
        """Return True for an event made only of comment lines (keep-alives such as `: ping`)."""
        return self.data == "" and self.name == "message" and self.raw.lstrip().startswith(b":")


class SSEParser:
    """Splits a byte stream into whole events as the bytes arrive."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[Event]:
        """Add bytes from the network and return every event they complete, in order."""
        self._buffer += chunk
        events = []
        start = 0
        while match := _EVENT_END.search(self._buffer, start):
            raw = bytes(self._buffer[start : match.end()])
            events.append(_parse_event(raw))
            start = match.end()
        del self._buffer[:start]
        return events

    def flush(self) -> tuple[list[Event], bytes]:
        """End the stream: return an unterminated last event, if any, and the leftover bytes."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        if not rest.strip():
            return [], rest
        return [_parse_event(rest)], rest

    @property
    def pending(self) -> int:
        """Return the number of bytes held back because their event has not ended yet."""
        return len(self._buffer)


def _parse_event(raw: bytes) -> Event:
    # A server that sends invalid UTF-8 still gets its bytes forwarded untouched; only the
    # meter's copy replaces the bad sequences.
    text = raw.decode("utf-8", errors="replace")
    name = "message"
    data_lines = []
    for line in _LINE_SPLIT.split(text):
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            name = value
        elif field == "data":
            data_lines.append(value)
    return Event(name=name, data="\n".join(data_lines), raw=raw)
