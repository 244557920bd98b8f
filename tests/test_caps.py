"""The caps: what reaches upstream, what is recorded, and that the whole tree stops."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal

import psutil

from tests.conftest import TESTS, TOKENCAP
from tests.fakeupstream import Behavior
from tokencap.caps import Budget
from tokencap.errors import EXIT_CAPPED


def spent(run) -> Decimal:
    """Return the session's recorded spend, summed exactly from the ledger's decimal strings."""
    return sum((Decimal(c["cost_usd"] or "0") for c in run.calls()), Decimal(0))


def test_max_calls_stops_before_fourth_call(upstream, run_agent):
    upstream.default = Behavior(input_tokens=100, output_tokens=10)

    run = run_agent(["--max-calls", "3"], "--api", "anthropic", "--calls", "10")

    assert run.exit_code == EXIT_CAPPED
    assert len(upstream.inference_requests()) == 3
    calls = run.calls()
    assert [c["decision"] for c in calls] == ["admitted"] * 3 + ["refused"]
    assert calls[3]["refusal_reason"] == "max_calls"
    session = run.session()
    assert session["end_reason"] == "max_calls"
    assert session["status"] == "capped"
    assert session["exit_status"] == EXIT_CAPPED
    assert "stopped by max_calls" in run.stderr
    assert "3 calls" in run.stderr


def test_refused_call_gets_provider_error(upstream, run_agent):
    # The agent ignores SIGTERM so that it lives through the grace period to report the error.
    run = run_agent(
        ["--max-calls", "1", "--grace", "1"],
        "--api",
        "anthropic",
        "--calls",
        "3",
        "--keep-going",
        "--ignore-sigterm",
    )

    outcomes = run.outcomes()
    assert outcomes[0]["ok"]
    assert outcomes[1]["error_type"] == "RateLimitError"
    assert "call cap reached" in outcomes[1]["error"]
    assert len(upstream.inference_requests()) == 1


def test_report_shows_cap_reason(upstream, run_agent, tokencap_env):
    run_agent(["--max-calls", "2", "--task", "loop"], "--api", "anthropic", "--calls", "5")

    report = subprocess.run(
        [str(TOKENCAP), "report", "--format", "json"],
        env=tokencap_env,
        capture_output=True,
        text=True,
        check=True,
    )

    (session,) = json.loads(report.stdout)["sessions"]
    assert session["end_reason"] == "max_calls"
    assert session["calls"] == 2
    assert session["refused_calls"] == 1
    assert session["exit_status"] == EXIT_CAPPED


def test_max_usd_holds_for_non_streamed_loop(upstream, run_agent):
    # Each call costs 2000 * $3 + 300 * $15 per million = $0.0105. Its worst case (a 4000-byte
    # prompt and max_tokens 400) is checked before it is sent, so spend cannot pass the cap.
    upstream.default = Behavior(input_tokens=2000, output_tokens=300)

    run = run_agent(
        ["--max-usd", "0.05"],
        "--api",
        "anthropic",
        "--model",
        "claude-sonnet-4-5-20250929",
        "--max-tokens",
        "400",
        "--prompt",
        "x" * 4000,
        "--calls",
        "50",
    )

    assert run.exit_code == EXIT_CAPPED
    admitted = [c for c in run.calls() if c["decision"] == "admitted"]
    assert len(admitted) == 4
    assert spent(run) == Decimal("0.042")
    assert spent(run) <= Decimal("0.05")
    assert len(upstream.inference_requests()) == 4
    assert run.session()["end_reason"] == "max_usd"


def test_max_usd_stream_overshoot_bounded(upstream, run_agent):
    # Usage of a chat stream arrives only at its end, so tokencap estimates output from the
    # text received and cuts the stream that crosses the cap.
    text = "abcdefghij" * 100
    upstream.default = Behavior(
        text=text, input_tokens=50, output_tokens=250, events=50, delay=0.01
    )
    cap = Decimal("0.004")

    run = run_agent(
        ["--max-usd", str(cap)],
        "--api",
        "openai-chat",
        "--model",
        "gpt-4o-2024-08-06",
        "--stream",
        "--include-usage",
        "--calls",
        "50",
    )

    assert run.exit_code == EXIT_CAPPED
    # One event carries 20 characters, at most 10 estimated tokens, $0.0001 at $10 per million.
    assert spent(run) <= cap + Decimal("0.0001")
    cut = [c for c in run.calls() if c["status"] == "cut"]
    assert len(cut) == 1
    assert cut[0]["usage_estimated"] == 1
    admitted = [c for c in run.calls() if c["decision"] == "admitted"]
    assert len(upstream.inference_requests()) == len(admitted)


def test_concurrent_calls_at_edge(upstream, run_tokencap, tmp_path):
    # $0.90 is spent first; then four calls whose worst case is about $0.06 each race for the
    # remaining $0.10: exactly one fits.
    upstream.script(Behavior(input_tokens=0, output_tokens=90_000, model="gpt-4o-2024-08-06"))
    upstream.default = Behavior(input_tokens=10, output_tokens=10, response_delay=1.5)
    out = tmp_path / "agent.jsonl"
    common = [sys.executable, str(TESTS / "agents" / "sdk_agent.py"), "--out", str(out)]
    common += ["--api", "openai-chat", "--model", "gpt-4o-2024-08-06", "--keep-going"]
    # The agent outlives SIGTERM for the grace period, so all four calls reach tokencap.
    common += ["--ignore-sigterm"]
    script = (
        f"{_shell(common)} --max-tokens 95000 --calls 1 && "
        f"{_shell(common)} --max-tokens 5900 --calls 4 --parallel 4"
    )

    run = run_tokencap(["--max-usd", "1.00", "--grace", "3"], ["sh", "-c", script])

    assert run.exit_code == EXIT_CAPPED
    calls = run.calls()
    racing = calls[1:]
    assert len(racing) == 4
    assert sum(1 for c in racing if c["decision"] == "admitted") == 1
    assert sum(1 for c in racing if c["decision"] == "refused") == 3
    assert len(upstream.inference_requests()) == 2
    assert spent(run) <= Decimal("1.00")


def test_budget_refuses_after_settle_when_next_does_not_fit():
    budget = Budget(max_usd=Decimal("1.00"))
    budget.spent_usd = Decimal("0.90")

    results = [budget.admit(f"call-{i}", Decimal("0.06")) for i in range(4)]

    assert results[0] is None
    assert all(r is not None and r.cap == "max_usd" for r in results[1:])
    assert budget.settle("call-0", Decimal("0.05")) is None
    assert budget.spent_usd == Decimal("0.95")
    assert budget.admit("call-4", Decimal("0.06")) is not None


def test_cap_stop_kills_whole_tree(upstream, run_tokencap, tmp_path):
    pids_file = tmp_path / "pids"
    agent = [sys.executable, str(TESTS / "agents" / "tree_agent.py"), "--pids", str(pids_file)]

    run = run_tokencap(["--max-calls", "1", "--grace", "1"], agent)

    assert run.exit_code == EXIT_CAPPED
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 3
    survivors = [p for p in pids if _alive(p)]
    assert survivors == []
    assert run.session()["processes_stopped"] == 3
    assert "3 processes stopped" in run.stderr


def test_cut_stream_records_partial_usage(upstream, run_agent):
    # 1000 input tokens cost $0.003 on claude-sonnet-4-5; streamed text adds about $0.000075
    # per event, so the $0.0035 cap is crossed a few events into a 20-second stream.
    upstream.default = Behavior(text="0123456789" * 400, input_tokens=1000, slow=True)

    run = run_agent(
        ["--max-usd", "0.0035", "--grace", "2"],
        "--api",
        "anthropic",
        "--model",
        "claude-sonnet-4-5-20250929",
        "--stream",
        "--calls",
        "2",
        "--keep-going",
        "--ignore-sigterm",
    )

    assert run.exit_code == EXIT_CAPPED
    (first_request,) = upstream.inference_requests()
    assert first_request.wait()
    assert first_request.disconnected
    assert first_request.events_sent < 50
    outcomes = run.outcomes()
    assert not outcomes[0]["ok"]
    assert "the stream was cut" in outcomes[0]["error"]
    calls = run.calls()
    assert calls[0]["status"] == "cut"
    assert calls[0]["input_tokens"] == 1000
    assert calls[0]["usage_estimated"] == 1
    assert calls[0]["output_tokens"] > 0
    # The agent's immediate retry is refused: the session was stopped before the cut.
    assert not outcomes[1]["ok"]
    assert outcomes[1]["error_type"] == "RateLimitError"
    assert calls[1]["decision"] == "refused"


def test_unknown_model_priced_high_and_capped(upstream, run_agent):
    upstream.default = Behavior(input_tokens=20, output_tokens=100, model="acme-coder-7b")

    run = run_agent(
        ["--max-usd", "1"],
        "--api",
        "openai-chat",
        "--model",
        "acme-coder-7b",
        "--max-tokens",
        "200",
        "--calls",
        "100",
    )

    assert run.exit_code == EXIT_CAPPED
    calls = [c for c in run.calls() if c["decision"] == "admitted"]
    assert calls[0]["input_tokens"] == 20
    assert calls[0]["output_tokens"] == 100
    assert Decimal(calls[0]["cost_usd"]) > 0
    assert calls[0]["cost_estimated"] == 1
    assert spent(run) <= Decimal("1")
    assert "acme-coder-7b" in run.stderr


def _shell(argv: list[str]) -> str:
    return " ".join(f"'{a}'" for a in argv)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
