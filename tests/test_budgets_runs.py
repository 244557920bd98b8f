"""Shared budgets through real runs: the real `tokencap run`, SDK agents and the fake upstream.

Every run here reads its budgets from a tokencap.toml in a project directory and records to
one ledger file, as runs on one machine do.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import SDK_AGENT, TOKENCAP, query
from tests.fakeupstream import Behavior
from tokencap.errors import EXIT_CAPPED
from tokencap.ledger import Ledger
from tokencap.prices import to_pico

pytestmark = pytest.mark.slow

SONNET = "claude-sonnet-4-5-20250929"
# 2000 input and 300 output tokens at $3 and $15 per million tokens: $0.0105 a call.
CALL_COST = Decimal("0.0105")
CALL = Behavior(input_tokens=2000, output_tokens=300)
# A 4000-byte prompt and max_tokens 400: admission's worst case is about $0.0122 a call.
AGENT_ARGS = (
    "--api",
    "anthropic",
    "--model",
    SONNET,
    "--max-tokens",
    "400",
    "--prompt",
    "x" * 4000,
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


def calls_of(db: Path, session_id: str) -> list:
    return query(db, "SELECT * FROM calls WHERE session_id = ? ORDER BY seq", (session_id,))


def spent(db: Path) -> Decimal:
    """Return the ledger's total spend, summed exactly from its decimal strings."""
    rows = query(db, "SELECT cost_usd FROM calls WHERE decision = 'admitted'")
    return sum((Decimal(row[0]) for row in rows), Decimal(0))


def sessions(db: Path) -> list:
    return query(db, "SELECT * FROM sessions ORDER BY started_at")


def test_task_budget_stops_second_session(upstream, run_agent, project):
    # The task may spend $0.05 over all its runs. The first run spends $0.021 on two calls.
    # The second run's calls fit while spend plus the next call's worst case stays within
    # $0.05: at $0.0315 spent, $0.0315 + $0.0122 fits; at $0.042 it does not.
    (project / "tokencap.toml").write_text("[tasks.refactor]\nmax_usd_total = 0.05\n")
    upstream.default = CALL

    first = run_agent(["--task", "refactor"], *AGENT_ARGS, "--calls", "2", cwd=project)
    second = run_agent(["--task", "refactor"], *AGENT_ARGS, "--calls", "10", cwd=project)

    assert first.exit_code == 0, first.stderr
    assert second.exit_code == EXIT_CAPPED, second.stderr
    first_session, second_session = sessions(second.db)
    second_calls = calls_of(second.db, second_session["id"])
    assert len(calls_of(first.db, first_session["id"])) == 2
    assert [c["decision"] for c in second_calls] == ["admitted", "admitted", "refused"]
    assert second_calls[2]["refusal_reason"] == "task_budget:refactor/total"
    assert len(upstream.inference_requests()) == 4
    assert spent(second.db) == 4 * CALL_COST
    assert second_session["end_reason"] == "task_budget:refactor/total"
    assert second_session["status"] == "capped"
    assert "stopped by task budget refactor/total: $0.042 spent in total, " in second.stderr
    assert "; 2 calls sent, " in second.stderr


def test_other_task_not_limited(upstream, run_agent, project):
    (project / "tokencap.toml").write_text("[tasks.refactor]\nmax_usd_total = 0.015\n")
    upstream.default = CALL

    run = run_agent(["--task", "docs"], *AGENT_ARGS, "--calls", "3", cwd=project)

    assert run.exit_code == 0, run.stderr
    assert len(upstream.inference_requests()) == 3


# Writes its ready file, waits for the go file, then runs the rest of its arguments.
WAIT_FOR_GO = 'touch "$1"; while [ ! -e "$2" ]; do sleep 0.02; done; shift 2; exec "$@"'


def _start_run(
    env: dict[str, str], cwd: Path, ready: Path, go: Path, out: Path, *agent_args: str
) -> subprocess.Popen:
    agent = [sys.executable, str(SDK_AGENT), "--out", str(out), *agent_args]
    return subprocess.Popen(
        [str(TOKENCAP), "run", "--team", "platform", "--grace", "3", "--"]
        + ["sh", "-c", WAIT_FOR_GO, "sh", str(ready), str(go), *agent],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def test_concurrent_runs_share_team_day_budget(upstream, tokencap_env, project, tmp_path):
    # Two runs of the platform team, three calls in flight each, draw on one $0.20 daily
    # budget. Each alone would spend up to $0.20; together they must not pass it.
    (project / "tokencap.toml").write_text("[teams.platform]\nmax_usd_per_day = 0.20\n")
    upstream.default = Behavior(input_tokens=2000, output_tokens=300, response_delay=0.4)
    agent = [*AGENT_ARGS, "--calls", "40", "--parallel", "3", "--keep-going"]
    db = Path(tokencap_env["TOKENCAP_DB"])

    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in (1, 2)]

    runs = [
        _start_run(tokencap_env, project, ready[i], go, tmp_path / f"out-{i}.jsonl", *agent)
        for i in (0, 1)
    ]
    # Both agents start calling together, whichever tokencap took longer to start.
    deadline = time.monotonic() + 60
    while not all(path.exists() for path in ready) and time.monotonic() < deadline:
        time.sleep(0.02)
    go.touch()
    outcomes = [run.communicate(timeout=120) for run in runs]

    for run, (_, stderr) in zip(runs, outcomes, strict=True):
        assert run.returncode == EXIT_CAPPED, stderr
        assert "stopped by team budget platform/day" in stderr
    admitted = query(
        db, "SELECT session_id, status, cost_usd FROM calls WHERE decision = 'admitted'"
    )
    assert spent(db) <= Decimal("0.20")
    # Calls answered in full cost exactly their usage; calls cut off when a run was stopped
    # are charged what admission reserved for them, which the budget also covered.
    assert {Decimal(row["cost_usd"]) for row in admitted if row["status"] == "ok"} == {CALL_COST}
    assert len(upstream.inference_requests()) == len(admitted)
    # Both runs got calls through, so they really drew on the budget at the same time.
    assert len({row["session_id"] for row in admitted}) == 2
    # One after another, 18 calls fit; six reservations in flight at the edge hold back at
    # most six more.
    assert len(admitted) >= 12
    assert query(db, "SELECT COUNT(*) FROM budget_reservations")[0][0] == 0


def test_stream_cut_by_team_budget(upstream, run_agent, project):
    # No cap of its own: the team's $0.0035 cuts the stream, as a session cap would. The
    # 1000 input tokens cost $0.003; the streamed text passes the budget a few events in.
    (project / "tokencap.toml").write_text(
        "[attribution]\nteam = 'platform'\n[teams.platform]\nmax_usd_per_day = 0.0035\n"
    )
    upstream.default = Behavior(text="0123456789" * 400, input_tokens=1000, slow=True)

    run = run_agent(
        ["--grace", "2"],
        *("--api", "anthropic", "--model", SONNET, "--stream", "--calls", "1"),
        cwd=project,
    )

    assert run.exit_code == EXIT_CAPPED, run.stderr
    (request,) = upstream.inference_requests()
    assert request.wait()
    assert request.disconnected
    assert request.events_sent < 50
    (call,) = run.calls()
    assert call["status"] == "cut"
    assert Decimal(call["cost_usd"]) <= Decimal("0.0035") + Decimal("0.0001")
    assert "stopped by team budget platform/day" in run.stderr
    assert "spent or in flight in the last 24 hours, reached mid-stream" in run.stderr


def test_used_up_budget_stops_before_agent(upstream, run_tokencap, project, tokencap_env):
    # Every user may spend $1 a day; bob spent it an hour ago.
    (project / "tokencap.toml").write_text('[users."*"]\nmax_usd_per_day = 1\n')
    ledger = Ledger(Path(tokencap_env["TOKENCAP_DB"]))
    ledger.start_session({"id": "earlier", "user": "bob"})
    ledger.record_call(
        {
            "session_id": "earlier",
            "seq": 1,
            "started_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "decision": "admitted",
            "status": "ok",
            "cost_usd": "1",
            "cost_pico_usd": to_pico(Decimal(1)),
        }
    )
    ledger.close()
    marker = project / "agent-ran"

    run = run_tokencap(
        ["--user", "bob"], [sys.executable, "-c", f"open({str(marker)!r}, 'w')"], cwd=project
    )

    assert run.exit_code == EXIT_CAPPED
    assert not marker.exists()
    assert upstream.inference_requests() == []
    assert (
        "stopped by user budget bob/day: $1.00 of $1.00 already spent in the last 24 hours; "
        "0 calls sent, 0 processes stopped"
    ) in run.stderr
    session = run.session()
    assert session["status"] == "capped"
    assert session["end_reason"] == "user_budget:bob/day"


def test_other_user_not_limited(upstream, run_agent, project):
    (project / "tokencap.toml").write_text(
        '[users."*"]\nmax_usd_per_day = 1\n[users.carol]\nmax_usd_per_day = 0.01\n'
    )
    upstream.default = CALL

    bob = run_agent(["--user", "bob"], *AGENT_ARGS, "--calls", "2", cwd=project)
    carol = run_agent(["--user", "carol"], *AGENT_ARGS, "--calls", "2", cwd=project)

    assert bob.exit_code == 0, bob.stderr
    # carol's own $0.01 wins over the "*" budget, and one call's worst case does not fit.
    assert carol.exit_code == EXIT_CAPPED
    assert "stopped by user budget carol/day" in carol.stderr
    assert len(upstream.inference_requests()) == 2


def test_report_shows_remaining_budget(upstream, run_agent, project, tokencap_env):
    (project / "tokencap.toml").write_text("[tasks.refactor]\nmax_usd_total = 0.05\n")
    upstream.default = CALL
    run = run_agent(["--task", "refactor"], *AGENT_ARGS, "--calls", "2", cwd=project)
    assert run.exit_code == 0, run.stderr

    report = subprocess.run(
        [str(TOKENCAP), "report", "--task", "refactor"],
        env=tokencap_env | {"COLUMNS": "200"},
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert report.returncode == 0, report.stderr
    assert "refactor" in report.stdout
    # Two calls of $0.0105 leave $0.029 of the task's $0.05.
    assert "0.029" in report.stdout
