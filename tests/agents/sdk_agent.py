"""A scriptable agent for the tests: makes model calls with a real official SDK.

It never names a base URL: each SDK reads it from the environment that tokencap sets. Every
call's outcome is appended to --out as one JSON line, so a test can compare what the agent saw
with what tokencap recorded.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--api",
        required=True,
        choices=["anthropic", "openai-chat", "openai-responses", "gemini"],
    )
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--include-usage", action="store_true", help="OpenAI chat streams only")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--prompt", default="hello")
    parser.add_argument("--user-id", default=None, help="Anthropic metadata.user_id")
    parser.add_argument("--keep-going", action="store_true", help="continue after an error")
    parser.add_argument("--ignore-sigterm", action="store_true", help="only SIGKILL stops it")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    lock = threading.Lock()
    # Parallel calls start together, so that they are all in flight at the same moment.
    barrier = threading.Barrier(args.parallel)

    def call(index: int) -> bool:
        if args.parallel > 1 and index < args.parallel:
            barrier.wait(timeout=30)
        try:
            result = _call(args)
            result["ok"] = True
        except Exception as exc:  # every SDK error is an outcome the test inspects
            result = {"ok": False, "error_type": type(exc).__name__, "error": str(exc)[:2000]}
        result["index"] = index
        with lock, open(args.out, "a", encoding="utf-8") as out:
            out.write(json.dumps(result) + "\n")
        return result["ok"]

    if args.parallel > 1:
        with ThreadPoolExecutor(args.parallel) as pool:
            outcomes = list(pool.map(call, range(args.calls)))
        return 0 if all(outcomes) else 1

    for index in range(args.calls):
        if not call(index) and not args.keep_going:
            return 1
    return 0


def _call(args: argparse.Namespace) -> dict:
    messages = [{"role": "user", "content": args.prompt}]
    if args.api == "anthropic":
        import anthropic

        client = anthropic.Anthropic(api_key="test-key-anthropic", max_retries=0)
        extra = {"metadata": {"user_id": args.user_id}} if args.user_id else {}
        model = args.model or "claude-sonnet-4-5"
        if args.stream:
            with client.messages.stream(
                model=model, max_tokens=args.max_tokens, messages=messages, **extra
            ) as stream:
                text = "".join(stream.text_stream)
                message = stream.get_final_message()
        else:
            message = client.messages.create(
                model=model, max_tokens=args.max_tokens, messages=messages, **extra
            )
            text = "".join(block.text for block in message.content if block.type == "text")
        return {"text": text, "model": message.model, "usage": message.usage.model_dump()}

    if args.api == "openai-chat":
        import openai

        client = openai.OpenAI(api_key="test-key-openai", max_retries=0)
        model = args.model or "gpt-4o"
        if args.stream:
            options = {"stream_options": {"include_usage": True}} if args.include_usage else {}
            chunks = list(
                client.chat.completions.create(
                    model=model,
                    max_tokens=args.max_tokens,
                    messages=messages,
                    stream=True,
                    **options,
                )
            )
            text = "".join(
                c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].delta
            )
            usages = [c.usage.model_dump() for c in chunks if c.usage is not None]
            return {
                "text": text,
                "chunks": len(chunks),
                "empty_choice_chunks": sum(1 for c in chunks if not c.choices),
                "usage": usages[-1] if usages else None,
            }
        completion = client.chat.completions.create(
            model=model, max_tokens=args.max_tokens, messages=messages
        )
        return {
            "text": completion.choices[0].message.content,
            "model": completion.model,
            "usage": completion.usage.model_dump(),
        }

    if args.api == "openai-responses":
        import openai

        client = openai.OpenAI(api_key="test-key-openai", max_retries=0)
        model = args.model or "gpt-4o"
        if args.stream:
            final = None
            text = ""
            for event in client.responses.create(
                model=model, input=args.prompt, max_output_tokens=args.max_tokens, stream=True
            ):
                if event.type == "response.output_text.delta":
                    text += event.delta
                elif event.type == "response.completed":
                    final = event.response
                elif event.type == "error":
                    raise RuntimeError(f"stream error event: {event.message}")
            if final is None:
                raise RuntimeError("stream ended without response.completed")
            return {"text": text, "model": final.model, "usage": final.usage.model_dump()}
        response = client.responses.create(
            model=model, input=args.prompt, max_output_tokens=args.max_tokens
        )
        return {
            "text": response.output_text,
            "model": response.model,
            "usage": response.usage.model_dump(),
        }

    from google import genai
    from google.genai import types

    client = genai.Client(api_key="test-key-gemini")
    model = args.model or "gemini-2.5-flash"
    config = types.GenerateContentConfig(max_output_tokens=args.max_tokens)
    if args.stream:
        text = ""
        usage = None
        for chunk in client.models.generate_content_stream(
            model=model, contents=args.prompt, config=config
        ):
            text += chunk.text or ""
            if chunk.usage_metadata is not None:
                usage = chunk.usage_metadata.model_dump(exclude_none=True)
        return {"text": text, "usage": usage}
    response = client.models.generate_content(model=model, contents=args.prompt, config=config)
    return {"text": response.text, "usage": response.usage_metadata.model_dump(exclude_none=True)}


if __name__ == "__main__":
    sys.exit(main())
