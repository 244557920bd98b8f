"""A small agent on the official anthropic SDK, for trying tokencap.

It sends --calls Messages API requests in one growing conversation and prints one line per
call with the usage the API reported. The SDK reads its endpoint from ANTHROPIC_BASE_URL, which
`tokencap run` sets, so this script never names a URL itself. Try it against the simulated
provider (see examples/README.md):

    tokencap simulate &
    ANTHROPIC_BASE_URL=http://127.0.0.1:7086 tokencap run --max-calls 3 -- \\
        python examples/anthropic_agent.py --calls 5 --stream
"""

from __future__ import annotations

import argparse
import os
import sys

import anthropic

MAX_TOKENS = 300


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10, help="number of model calls to make")
    parser.add_argument("--stream", action="store_true", help="stream each reply")
    parser.add_argument("--model", default="claude-haiku-4-5", help="model name")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # The simulated provider accepts any key; a real key is read from the environment.
    client = anthropic.Anthropic(api_key=os.environ.get("ANTHROPIC_API_KEY", "test"), max_retries=0)
    messages: list[dict] = []
    for call in range(1, args.calls + 1):
        messages.append({"role": "user", "content": f"Step {call}: what do you do next?"})
        print(f"call {call}: ", end="", flush=True)
        try:
            if args.stream:
                with client.messages.stream(
                    model=args.model, max_tokens=MAX_TOKENS, messages=messages
                ) as stream:
                    for text in stream.text_stream:
                        print(text, end="", flush=True)
                    message = stream.get_final_message()
            else:
                message = client.messages.create(
                    model=args.model, max_tokens=MAX_TOKENS, messages=messages
                )
                print(_text(message), end="")
        except anthropic.APIError as exc:
            print(f"\nanthropic_agent: call {call} failed: {exc}", file=sys.stderr)
            return 1
        usage = message.usage
        print(
            f" [{message.model}: {usage.input_tokens} input, {usage.output_tokens} output tokens]"
        )
        messages.append({"role": "assistant", "content": _text(message)})
    return 0


def _text(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


if __name__ == "__main__":
    sys.exit(main())
