"""The example agent that `tokencap demo` runs; it needs only the standard library.

It works like a small coding agent. Each turn it sends the whole conversation to the Anthropic
Messages API at $ANTHROPIC_BASE_URL/v1/messages and prints the first words of the reply. It then
adds the reply and a simulated tool result to the conversation, so every request is larger than
the one before. It stops after `MAX_TURNS` turns. On an HTTP error it prints the error message from
the response body on stderr and exits with status 1.

Run it under tokencap against the simulated provider, never against a real one::

    tokencap simulate                                    # in one terminal
    ANTHROPIC_BASE_URL=http://127.0.0.1:7086 tokencap run --max-usd 0.05 \\
        -- python -m tokencap.demo_agent                 # in another
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

MODEL = "claude-sonnet-4-5"
MAX_TOKENS = 400
MAX_TURNS = 30
API_KEY = "demo"
PREVIEW_WORDS = 8
REQUEST_TIMEOUT = 60.0

SYSTEM_PROMPT = (
    "You are a careful coding agent working in a Python repository. Read the failing test, "
    "find the cause, propose the smallest fix, and check it by running the tests again. "
    "Explain each step in two or three sentences before you act."
)
TASK = "The test tests/test_pagination.py::test_last_page fails. Find the cause and fix it."


class RequestFailed(Exception):
    """A model request failed; the message is ready to show to the user."""


def tool_result(turn: int) -> str:
    """Return the simulated output of the test run that follows turn `turn`, about 2 KB."""
    lines = [f"Output of the test run after step {turn}:"]
    for case in range(1, 25):
        outcome = "FAILED" if case == 24 and turn < 5 else "PASSED"
        lines.append(f"tests/test_pagination.py::test_page_{turn:02d}_{case:02d} {outcome}")
    lines.append(f"{23 if turn < 5 else 24} passed in 0.{turn:02d}s. What is your next step?")
    return "\n".join(lines)


def request_body(messages: list[dict[str, Any]]) -> bytes:
    """Return the Messages API request body for the conversation so far."""
    body = {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "system": SYSTEM_PROMPT,
        "messages": messages,
    }
    return json.dumps(body).encode()


def send(base_url: str, messages: list[dict[str, Any]]) -> str:
    """Send one Messages API request and return the reply text; raise RequestFailed."""
    url = base_url.rstrip("/") + "/v1/messages"
    request = urllib.request.Request(
        url,
        data=request_body(messages),
        method="POST",
        headers={
            "content-type": "application/json",
            "x-api-key": API_KEY,
            "anthropic-version": "2023-06-01",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            reply = json.load(response)
    except urllib.error.HTTPError as exc:
        raise RequestFailed(f"HTTP {exc.code}: {_error_message(exc.read())}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RequestFailed(f"cannot reach {url}: {reason}") from None
    return "".join(
        block.get("text", "") for block in reply.get("content", []) if block.get("type") == "text"
    )


def _error_message(body: bytes) -> str:
    # Anthropic errors look like {"type": "error", "error": {"type": ..., "message": ...}}.
    try:
        error = json.loads(body).get("error", {})
        return str(error["message"])
    except (ValueError, AttributeError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:300] or "no response body"


def main() -> int:
    """Run the agent loop and return the process exit status."""
    base_url = os.environ.get("ANTHROPIC_BASE_URL")
    if not base_url:
        print(
            "demo agent: ANTHROPIC_BASE_URL is not set. Run `tokencap demo`, or start "
            "`tokencap simulate` and set ANTHROPIC_BASE_URL to the URL it prints.",
            file=sys.stderr,
        )
        return 2

    messages: list[dict[str, Any]] = [{"role": "user", "content": TASK}]
    for turn in range(1, MAX_TURNS + 1):
        try:
            reply = send(base_url, messages)
        except RequestFailed as exc:
            print(f"demo agent: turn {turn} failed: {exc}", file=sys.stderr, flush=True)
            return 1
        words = reply.split()
        preview = " ".join(words[:PREVIEW_WORDS]) + (" ..." if len(words) > PREVIEW_WORDS else "")
        print(f"turn {turn}: {preview}", flush=True)
        messages.append({"role": "assistant", "content": reply})
        messages.append({"role": "user", "content": tool_result(turn)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
