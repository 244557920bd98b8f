"""A small agent on the official openai SDK, for trying tokencap.

It sends --calls requests in one growing conversation, to the Chat Completions API or with
--api responses to the Responses API, and prints one line per call with the usage the API
reported. The SDK reads its endpoint from OPENAI_BASE_URL, which `tokencap run` sets, so this
script never names a URL itself. Try it against the simulated provider (see
examples/README.md):

    tokencap simulate &
    OPENAI_BASE_URL=http://127.0.0.1:7086/v1 tokencap run --max-calls 3 -- \\
        python examples/openai_agent.py --calls 5 --stream --api responses
"""

from __future__ import annotations

import argparse
import os
import sys

import openai

MAX_TOKENS = 300


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10, help="number of model calls to make")
    parser.add_argument("--stream", action="store_true", help="stream each reply")
    parser.add_argument("--model", default="gpt-4.1-mini", help="model name")
    parser.add_argument(
        "--api",
        choices=("chat", "responses"),
        default="chat",
        help="chat for Chat Completions (default), responses for the Responses API",
    )
    return parser.parse_args()


def chat_call(
    client: openai.OpenAI, model: str, messages: list[dict], stream: bool
) -> tuple[str, str, int, int]:
    """Make one Chat Completions call; return model, reply text, input and output tokens."""
    if not stream:
        completion = client.chat.completions.create(
            model=model, messages=messages, max_completion_tokens=MAX_TOKENS
        )
        text = completion.choices[0].message.content or ""
        print(text, end="")
        usage = completion.usage
        return completion.model, text, usage.prompt_tokens, usage.completion_tokens

    # Streams report usage only in an extra last chunk, and only when asked to.
    chunks = client.chat.completions.create(
        model=model,
        messages=messages,
        max_completion_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = []
    usage = None
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.delta.content:
                print(choice.delta.content, end="", flush=True)
                pieces.append(choice.delta.content)
        usage = chunk.usage or usage
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return chunk.model, "".join(pieces), usage.prompt_tokens, usage.completion_tokens


def responses_call(
    client: openai.OpenAI, model: str, messages: list[dict], stream: bool
) -> tuple[str, str, int, int]:
    """Make one Responses API call; return model, reply text, input and output tokens."""
    if not stream:
        response = client.responses.create(
            model=model, input=messages, max_output_tokens=MAX_TOKENS
        )
        print(response.output_text, end="")
    else:
        with client.responses.stream(
            model=model, input=messages, max_output_tokens=MAX_TOKENS
        ) as events:
            for event in events:
                if event.type == "response.output_text.delta":
                    print(event.delta, end="", flush=True)
            response = events.get_final_response()
    usage = response.usage
    return response.model, response.output_text, usage.input_tokens, usage.output_tokens


def main() -> int:
    args = parse_args()
    # The simulated provider accepts any key; a real key is read from the environment.
    client = openai.OpenAI(api_key=os.environ.get("OPENAI_API_KEY", "test"), max_retries=0)
    call_api = responses_call if args.api == "responses" else chat_call
    messages: list[dict] = []
    for call in range(1, args.calls + 1):
        messages.append({"role": "user", "content": f"Step {call}: what do you do next?"})
        print(f"call {call}: ", end="", flush=True)
        try:
            model, text, input_tokens, output_tokens = call_api(
                client, args.model, messages, args.stream
            )
        except openai.OpenAIError as exc:
            print(f"\nopenai_agent: call {call} failed: {exc}", file=sys.stderr)
            return 1
        print(f" [{model}: {input_tokens} input, {output_tokens} output tokens]")
        messages.append({"role": "assistant", "content": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
