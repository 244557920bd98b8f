"""Published prices, each checked through a real run: provider usage in, exact dollars out."""

from __future__ import annotations

from decimal import Decimal

from tests.fakeupstream import Behavior


def only_call(run):
    assert run.exit_code == 0, run.stderr
    (call,) = run.calls()
    return call


def test_opus_one_hour_cache_write(upstream, run_agent):
    # A 1-hour cache write costs twice the input rate, not the 5-minute 1.25 times.
    upstream.default = Behavior(input_tokens=10, cache_write_1h_tokens=3904, output_tokens=100)

    call = only_call(run_agent([], "--api", "anthropic", "--model", "claude-opus-4-6"))

    assert call["input_tokens"] == 10
    assert call["cache_write_1h_tokens"] == 3904
    assert call["cache_write_5m_tokens"] == 0
    assert call["output_tokens"] == 100
    assert Decimal(call["cost_usd"]) == Decimal("0.04159")


def test_gpt4o_cached_prompt_tokens(upstream, run_agent):
    # Cached tokens are part of prompt_tokens and billed at the cached rate, not added on top.
    upstream.default = Behavior(input_tokens=2006, cache_read_tokens=1920, output_tokens=300)

    call = only_call(run_agent([], "--api", "openai-chat", "--model", "gpt-4o-2024-08-06"))

    assert call["input_tokens"] == 86
    assert call["cache_read_tokens"] == 1920
    assert call["output_tokens"] == 300
    assert Decimal(call["cost_usd"]) == Decimal("0.005615")


def test_sonnet_stream_cumulative_output(upstream, run_agent):
    # message_delta counts are cumulative: the last one is the total, never their sum.
    upstream.default = Behavior(
        input_tokens=25, output_tokens=15, output_token_steps=(4, 9, 15), events=5
    )

    call = only_call(
        run_agent([], "--api", "anthropic", "--model", "claude-sonnet-4-5-20250929", "--stream")
    )

    assert call["input_tokens"] == 25
    assert call["output_tokens"] == 15
    assert call["usage_estimated"] == 0
    assert Decimal(call["cost_usd"]) == Decimal("0.0003")


def test_gemini_pro_long_context_tier(upstream, run_agent):
    # Over 200k prompt tokens the whole request is billed at the long-context rate.
    upstream.default = Behavior(input_tokens=250_000, output_tokens=1000)

    call = only_call(run_agent([], "--api", "gemini", "--model", "gemini-2.5-pro"))

    assert call["input_tokens"] == 250_000
    assert call["output_tokens"] == 1000
    assert Decimal(call["cost_usd"]) == Decimal("0.64")


def test_gemini_thinking_billed_as_output(upstream, run_agent):
    upstream.default = Behavior(input_tokens=7477, output_tokens=2060, reasoning_tokens=1939)

    call = only_call(
        run_agent([], "--api", "gemini", "--model", "gemini-2.5-pro-preview-03-25", "--stream")
    )

    assert call["input_tokens"] == 7477
    assert call["output_tokens"] == 2060 + 1939
    assert call["reasoning_tokens"] == 1939
    assert Decimal(call["cost_usd"]) == Decimal("0.04933625")


def test_unknown_model_never_free(upstream, run_agent):
    upstream.default = Behavior(input_tokens=1000, output_tokens=200, model="local-llama-3")

    run = run_agent([], "--api", "openai-chat", "--model", "local-llama-3")

    call = only_call(run)
    assert call["input_tokens"] == 1000
    assert call["output_tokens"] == 200
    assert call["cost_estimated"] == 1
    assert call["price_source"] == "highest openai rates"
    assert Decimal(call["cost_usd"]) > 0
    assert "local-llama-3" in run.stderr
