"""A small agent on the official google-genai SDK, for trying tokencap.

It sends --calls generateContent requests in one growing conversation and prints one line per
call with the usage the API reported. The SDK reads its endpoint from GOOGLE_GEMINI_BASE_URL,
which `tokencap run` sets, so this script never names a URL itself. Try it against the
simulated provider (see examples/README.md):

    tokencap simulate &
    GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:7086 tokencap run --max-calls 3 -- \\
        python examples/gemini_agent.py --calls 5 --stream
"""

from __future__ import annotations

import argparse
import os
import sys

from google import genai
from google.genai import errors, types

MAX_TOKENS = 300


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10, help="number of model calls to make")
    parser.add_argument("--stream", action="store_true", help="stream each reply")
    parser.add_argument("--model", default="gemini-2.5-flash", help="model name")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # The simulated provider accepts any key; a real key is read from the environment.
    api_key = os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY") or "test"
    # attempts=1 turns retries off, so a call tokencap refuses fails at once.
    client = genai.Client(
        api_key=api_key,
        http_options=types.HttpOptions(retry_options=types.HttpRetryOptions(attempts=1)),
    )
    config = types.GenerateContentConfig(max_output_tokens=MAX_TOKENS)
    contents: list[types.Content] = []
    for call in range(1, args.calls + 1):
        question = f"Step {call}: what do you do next?"
        contents.append(types.Content(role="user", parts=[types.Part(text=question)]))
        print(f"call {call}: ", end="", flush=True)
        try:
            if args.stream:
                pieces = []
                usage, model = None, args.model
                for chunk in client.models.generate_content_stream(
                    model=args.model, contents=contents, config=config
                ):
                    print(chunk.text or "", end="", flush=True)
                    pieces.append(chunk.text or "")
                    # The last chunk that reports usage carries the totals of the whole reply.
                    usage = chunk.usage_metadata or usage
                    model = chunk.model_version or model
                text = "".join(pieces)
            else:
                response = client.models.generate_content(
                    model=args.model, contents=contents, config=config
                )
                text = response.text or ""
                print(text, end="")
                usage, model = response.usage_metadata, response.model_version
        except errors.APIError as exc:
            print(f"\ngemini_agent: call {call} failed: {exc}", file=sys.stderr)
            return 1
        if usage is None:
            print(f"\ngemini_agent: call {call} returned no usage", file=sys.stderr)
            return 1
        print(
            f" [{model}: {usage.prompt_token_count} input, "
            f"{usage.candidates_token_count} output tokens]"
        )
        contents.append(types.Content(role="model", parts=[types.Part(text=text)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
