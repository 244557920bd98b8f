"""Each provider API, streamed and not, through a real SDK: exact tokens and exact cost."""

from __future__ import annotations

import sys
from decimal import Decimal

import pytest

from tests.fakeupstream import Behavior

# The agent flags, the fake's usage, the tokens tokencap must record, and the exact cost.
CASES = {
    "anthropic-json": (
        ["--api", "anthropic", "--model", "claude-sonnet-4-5-20250929"],
        Behavior(input_tokens=1200, output_tokens=340, cache_read_tokens=5000),
        {"input_tokens": 1200, "cache_read_tokens": 5000, "output_tokens": 340},
        # 1200 * 3 + 5000 * 0.30 + 340 * 15, per million tokens
        Decimal("0.0102"),
    ),
    "anthropic-stream": (
        ["--api", "anthropic", "--model", "claude-sonnet-4-5-20250929", "--stream"],
        Behavior(input_tokens=1200, output_tokens=340, cache_write_tokens=800, events=6),
        {"input_tokens": 1200, "cache_write_5m_tokens": 800, "output_tokens": 340},
        # 1200 * 3 + 800 * 3.75 + 340 * 15
        Decimal("0.0117"),
    ),
    "openai-chat-json": (
        ["--api", "openai-chat", "--model", "gpt-4o-2024-08-06"],
        Behavior(input_tokens=3000, output_tokens=500, cache_read_tokens=1000),
        {"input_tokens": 2000, "cache_read_tokens": 1000, "output_tokens": 500},
        # 2000 * 2.50 + 1000 * 1.25 + 500 * 10
        Decimal("0.01125"),
    ),
    "openai-chat-stream": (
        ["--api", "openai-chat", "--model", "gpt-4o-2024-08-06", "--stream", "--include-usage"],
        Behavior(input_tokens=3000, output_tokens=500, events=5),
        {"input_tokens": 3000, "output_tokens": 500},
        Decimal("0.0125"),
    ),
    "openai-responses-json": (
        ["--api", "openai-responses", "--model", "gpt-4o-2024-08-06"],
        Behavior(input_tokens=4000, output_tokens=250, reasoning_tokens=50),
        {"input_tokens": 4000, "output_tokens": 250, "reasoning_tokens": 50},
        Decimal("0.0125"),
    ),
    "openai-responses-stream": (
        ["--api", "openai-responses", "--model", "gpt-4o-2024-08-06", "--stream"],
        Behavior(input_tokens=4000, output_tokens=250, cache_read_tokens=2000, events=5),
        {"input_tokens": 2000, "cache_read_tokens": 2000, "output_tokens": 250},
        # 2000 * 2.50 + 2000 * 1.25 + 250 * 10
        Decimal("0.01"),
    ),
    "gemini-json": (
        ["--api", "gemini", "--model", "gemini-2.5-flash"],
        Behavior(input_tokens=10_000, output_tokens=800, reasoning_tokens=200),
        {"input_tokens": 10_000, "output_tokens": 1000, "reasoning_tokens": 200},
        # 10000 * 0.30 + (800 + 200) * 2.50
        Decimal("0.0055"),
    ),
    "gemini-stream": (
        ["--api", "gemini", "--model", "gemini-2.5-flash", "--stream"],
        Behavior(input_tokens=10_000, output_tokens=800, events=5),
        {"input_tokens": 10_000, "output_tokens": 800},
        Decimal("0.005"),
    ),
}

TOKEN_COLUMNS = (
    "input_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_call_metered_exactly(case, upstream, run_agent):
    agent_args, behavior, tokens, cost = CASES[case]
    upstream.default = behavior

    run = run_agent([], *agent_args)

    assert run.exit_code == 0, run.stderr
    assert run.outcomes()[0]["ok"], run.outcomes()
    assert len(upstream.inference_requests()) == 1
    (call,) = run.calls()
    assert call["decision"] == "admitted"
    assert call["status"] == "ok"
    for column in TOKEN_COLUMNS:
        assert call[column] == tokens.get(column, 0), column
    assert Decimal(call["cost_usd"]) == cost
    assert call["cost_pico_usd"] == int(cost * 10**12)
    assert call["usage_estimated"] == 0
    assert call["cost_estimated"] == 0
    assert call["streamed"] == int("--stream" in agent_args)


def test_agent_sees_upstream_usage_unchanged(upstream, run_agent):
    upstream.default = Behavior(input_tokens=77, output_tokens=33, events=3)

    run = run_agent([], "--api", "anthropic", "--stream", "--calls", "2")

    assert run.exit_code == 0, run.stderr
    for outcome in run.outcomes():
        assert outcome["usage"]["input_tokens"] == 77
        assert outcome["usage"]["output_tokens"] == 33
        assert outcome["text"] == "Hello from the fake upstream."


def test_chat_stream_without_usage_request_is_metered(upstream, run_agent):
    upstream.default = Behavior(input_tokens=900, output_tokens=120, events=4)

    run = run_agent([], "--api", "openai-chat", "--model", "gpt-4o-2024-08-06", "--stream")

    assert run.exit_code == 0, run.stderr
    (request,) = upstream.inference_requests()
    assert request.body["stream_options"] == {"include_usage": True}
    (outcome,) = run.outcomes()
    # The agent did not ask for usage, so it must not receive the usage-only chunk.
    assert outcome["usage"] is None
    assert outcome["empty_choice_chunks"] == 0
    assert outcome["text"] == "Hello from the fake upstream."
    (call,) = run.calls()
    assert call["input_tokens"] == 900
    assert call["output_tokens"] == 120
    assert Decimal(call["cost_usd"]) == Decimal("0.00345")


@pytest.mark.parametrize("api", ["anthropic", "openai-chat", "openai-responses", "gemini"])
def test_split_events_and_multibyte_text(api, upstream, run_agent):
    text = "héllo, 世界 🚀 — naïve café"
    upstream.default = Behavior(
        text=text, input_tokens=500, output_tokens=40, events=6, split_events=True
    )
    flags = ["--include-usage"] if api == "openai-chat" else []

    run = run_agent([], "--api", api, "--stream", *flags)

    assert run.exit_code == 0, run.stderr
    (outcome,) = run.outcomes()
    assert outcome["text"] == text
    (call,) = run.calls()
    assert call["input_tokens"] == 500
    assert call["output_tokens"] == 40
    assert call["usage_estimated"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_gzip_response_is_metered(stream, upstream, run_agent):
    upstream.default = Behavior(input_tokens=640, output_tokens=64, events=5, gzip=True)
    flags = ["--stream"] if stream else []

    run = run_agent([], "--api", "anthropic", "--model", "claude-sonnet-4-5-20250929", *flags)

    assert run.exit_code == 0, run.stderr
    (request,) = upstream.inference_requests()
    assert request.gzipped
    (call,) = run.calls()
    assert call["input_tokens"] == 640
    assert call["output_tokens"] == 64
    # 640 * 3 + 64 * 15 per million tokens
    assert Decimal(call["cost_usd"]) == Decimal("0.00288")


def test_gemini_array_stream_is_metered(upstream, run_tokencap, tmp_path):
    # Without alt=sse Gemini streams one JSON array; the SDKs never ask for it, so use urllib.
    upstream.default = Behavior(input_tokens=2000, output_tokens=300, events=4)
    script = (
        "import os, json, urllib.request\n"
        "base = os.environ['GOOGLE_GEMINI_BASE_URL']\n"
        "url = base + '/v1beta/models/gemini-2.5-flash:streamGenerateContent'\n"
        "req = urllib.request.Request(url,"
        " data=json.dumps({'contents': [{'parts': [{'text': 'hi'}]}]}).encode(),"
        " headers={'content-type': 'application/json', 'x-goog-api-key': 'k'})\n"
        "body = urllib.request.urlopen(req).read()\n"
        "assert isinstance(json.loads(body), list)\n"
    )
    run = run_tokencap([], [sys.executable, "-c", script])

    assert run.exit_code == 0, run.stderr
    (call,) = run.calls()
    assert call["input_tokens"] == 2000
    assert call["output_tokens"] == 300
    assert Decimal(call["cost_usd"]) == Decimal("0.00135")
