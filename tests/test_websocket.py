"""The Responses API over a WebSocket: each turn metered and capped like an HTTP call."""

from __future__ import annotations

import json
import sys
from decimal import Decimal

from tests.conftest import TESTS
from tests.fakeupstream import Behavior
from tokencap.errors import EXIT_CAPPED

WS_AGENT = TESTS / "agents" / "ws_agent.py"


def ws_run(run_tokencap, tmp_path, *agent_args: str, options=(), **env):
    out = tmp_path / "turns.jsonl"
    run = run_tokencap(
        list(options), [sys.executable, str(WS_AGENT), "--out", str(out), *agent_args], **env
    )
    turns = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return run, turns


def turn_records(upstream):
    return [r for r in upstream.requests if r.route == "openai.responses_websocket_turn"]


def test_two_turns_metered_exactly(upstream, run_tokencap, tmp_path):
    upstream.script(
        Behavior(input_tokens=4000, output_tokens=250, events=3),
        Behavior(input_tokens=6000, output_tokens=100, cache_read_tokens=4000, events=3),
    )

    run, turns = ws_run(run_tokencap, tmp_path, "--turns", "2")

    assert run.exit_code == 0, run.stderr
    assert [t["usage"]["input_tokens"] for t in turns] == [4000, 6000]
    assert turns[0]["text"] == "Hello from the fake upstream."
    records = turn_records(upstream)
    assert len(records) == 2
    assert records[1].body["previous_response_id"] == records[0].response_id
    first, second = run.calls()
    assert first["api"] == "openai-responses"
    assert first["method"] == "WS"
    assert first["status"] == "ok"
    assert first["input_tokens"] == 4000
    assert first["output_tokens"] == 250
    # 4000 * $2.50 + 250 * $10 per million tokens
    assert Decimal(first["cost_usd"]) == Decimal("0.0125")
    assert second["input_tokens"] == 2000
    assert second["cache_read_tokens"] == 4000
    assert second["output_tokens"] == 100
    # 2000 * $2.50 + 4000 * $1.25 + 100 * $10
    assert Decimal(second["cost_usd"]) == Decimal("0.011")
    assert first["upstream_request_id"] == records[0].response_id


def test_max_calls_refuses_second_turn(upstream, run_tokencap, tmp_path):
    # The agent ignores SIGTERM so that it lives through the grace period to report the error.
    run, turns = ws_run(
        run_tokencap,
        tmp_path,
        "--turns",
        "3",
        "--ignore-sigterm",
        options=["--max-calls", "1", "--grace", "1"],
    )

    assert run.exit_code == EXIT_CAPPED
    assert len(turn_records(upstream)) == 1
    assert [c["decision"] for c in run.calls()] == ["admitted", "refused"]
    assert "usage" in turns[0]
    # The refused turn gets an error event the client reports, and no third turn is sent.
    assert len(turns) == 2
    error = turns[1]["error"]
    assert error["status"] == 429
    assert "call cap reached" in error["error"]["message"]
    assert "stopped by max_calls" in run.stderr


def test_dollar_cap_cuts_running_turn(upstream, run_tokencap, tmp_path):
    # Each streamed word is counted as it arrives; the long second turn passes $0.02.
    upstream.script(
        Behavior(input_tokens=1000, output_tokens=50, events=3),
        Behavior(text="word " * 4000, input_tokens=1000, output_tokens=4000, slow=True),
    )

    run, turns = ws_run(
        run_tokencap,
        tmp_path,
        "--turns",
        "2",
        "--ignore-sigterm",
        options=["--max-usd", "0.02", "--grace", "1"],
    )

    assert run.exit_code == EXIT_CAPPED
    first, second = run.calls()
    assert first["status"] == "ok"
    assert second["status"] == "cut"
    assert second["usage_estimated"] == 1
    (_, cut_turn) = turn_records(upstream)
    assert cut_turn.wait(10)
    assert not cut_turn.completed
    assert cut_turn.events_sent < 400
    spent = sum(Decimal(c["cost_usd"]) for c in run.calls())
    assert spent < Decimal("0.03")
    assert turns[1]["error"]["status"] == 429
    assert "the response was cut" in turns[1]["error"]["error"]["message"]


def test_upstream_error_turn_costs_nothing(upstream, run_tokencap, tmp_path):
    upstream.script(status=429)

    run, turns = ws_run(run_tokencap, tmp_path, "--turns", "1")

    assert run.exit_code == 1
    assert turns[0]["error"]["status"] == 429
    (call,) = run.calls()
    assert call["status"] == "upstream_error"
    assert Decimal(call["cost_usd"]) == 0


def test_websocket_through_https_proxy(upstream, run_tokencap, tmp_path):
    upstream.default = Behavior(input_tokens=500, output_tokens=20, events=2)

    run, turns = ws_run(
        run_tokencap, tmp_path, "--turns", "2", "--url", "https://api.openai.com/v1"
    )

    assert run.exit_code == 0, run.stderr
    assert len(turns) == 2
    assert len(turn_records(upstream)) == 2
    assert [c["input_tokens"] for c in run.calls()] == [500, 500]
    assert all(c["status"] == "ok" for c in run.calls())
