"""A Responses API WebSocket client for the tests: several turns on one socket.

It opens `<base>/responses` as a WebSocket, where <base> is OPENAI_BASE_URL (the base-URL
route) or --url (such as wss://api.openai.com/v1, reached through HTTPS_PROXY). For each turn
it sends one `response.create` and reads events until the turn ends. Every turn's outcome is
appended to --out as one JSON line; a closed socket ends the run with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

FINAL = {"response.completed", "response.incomplete", "response.failed"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--model", default="gpt-4o-2024-08-06")
    parser.add_argument("--url", default=None, help="base URL; default: OPENAI_BASE_URL")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ignore-sigterm", action="store_true", help="only SIGKILL stops it")
    args = parser.parse_args()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    base = args.url or os.environ["OPENAI_BASE_URL"]
    url = base.replace("https://", "wss://").replace("http://", "ws://") + "/responses"
    options = {}
    if url.startswith("wss://"):
        options["ssl"] = ssl.create_default_context()
        options["proxy"] = True  # HTTPS_PROXY from the environment
    else:
        options["proxy"] = None
    previous = None
    with connect(url, additional_headers={"authorization": "Bearer test"}, **options) as socket:
        for turn in range(args.turns):
            request = {
                "type": "response.create",
                "model": args.model,
                "input": f"turn {turn}",
                "max_output_tokens": 100,
            }
            if previous:
                request["previous_response_id"] = previous
            socket.send(json.dumps(request))
            outcome = {"turn": turn, "events": 0, "text": ""}
            try:
                while True:
                    event = json.loads(socket.recv(timeout=30))
                    outcome["events"] += 1
                    kind = event.get("type")
                    if kind == "response.output_text.delta":
                        outcome["text"] += event["delta"]
                    if kind in FINAL:
                        outcome["usage"] = event["response"]["usage"]
                        previous = event["response"]["id"]
                        break
                    if kind == "error":
                        outcome["error"] = event
                        break
            except ConnectionClosed as exc:
                outcome["closed"] = str(exc)
            _write(args.out, outcome)
            if "error" in outcome or "closed" in outcome:
                return 1
    return 0


def _write(path: str, outcome: dict) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(outcome) + "\n")


if __name__ == "__main__":
    sys.exit(main())
