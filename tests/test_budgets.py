"""Shared budgets in the ledger: windows, reservations, dead processes and racing processes.

These tests use real SQLite files and real processes (tests/agents/budget_worker.py draws on a
budget the way the proxy does). End-to-end runs are in test_budgets_runs.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlite_utils

from tests.conftest import TESTS, TOKENCAP, query
from tokencap.budgets import BudgetRule, LedgerBudgets, applicable, concrete, remaining
from tokencap.caps import Budget
from tokencap.ledger import Ledger, m001_sessions_and_calls
from tokencap.prices import to_pico

WORKER = TESTS / "agents" / "budget_worker.py"
# Times of seeded calls are relative to this; tests that add up windows pass it as "now".
NOW = datetime.now(UTC)


@pytest.fixture
def ledger(tmp_path: Path):
    book = Ledger(tmp_path / "ledger.db")
    yield book
    book.close()


def add_session(ledger: Ledger, session_id: str, **attribution: str) -> None:
    ledger.start_session({"id": session_id, **attribution})


def add_call(ledger: Ledger, session_id: str, cost: str, ago: timedelta, **row) -> None:
    """Record a settled call that started `ago` before now."""
    seq = len(ledger.calls(session_id)) + 1
    ledger.record_call(
        {
            "session_id": session_id,
            "seq": seq,
            "started_at": (NOW - ago).isoformat(timespec="milliseconds"),
            "decision": "admitted",
            "status": "ok",
            "cost_usd": cost,
            "cost_pico_usd": to_pico(Decimal(cost)),
        }
        | row
    )


def team_rule(window: str, usd: str | None = None, calls: int | None = None) -> BudgetRule:
    return BudgetRule(
        "team", "platform", window, max_usd=Decimal(usd) if usd else None, max_calls=calls
    )


# --- Rules ---------------------------------------------------------------------------------


def test_applicable_matches_attribution():
    rules = [
        BudgetRule("task", "fix-login", "total", max_usd=Decimal(20)),
        BudgetRule("task", "other", "total", max_usd=Decimal(5)),
        BudgetRule("team", "platform", "day", max_usd=Decimal(50)),
        BudgetRule("user", "alice", "day", max_usd=Decimal(30)),
        BudgetRule("user", "*", "day", max_usd=Decimal(10)),
        BudgetRule("user", "*", "week", max_usd=Decimal(40)),
    ]

    for_bob = applicable(rules, task="fix-login", team="platform", user="bob")
    for_alice = applicable(rules, task=None, team="support", user="alice")

    assert [r.cap for r in for_bob] == [
        "task_budget:fix-login/total",
        "team_budget:platform/day",
        "user_budget:bob/day",
        "user_budget:bob/week",
    ]
    assert [r.cap for r in for_alice] == ["user_budget:alice/day"]


def test_concrete_resolves_wildcards():
    rules = [team_rule("day", "5"), BudgetRule("team", "*", "week", max_usd=Decimal(9))]

    result = concrete(rules, team="support", user=None)

    assert [r.cap for r in result] == ["team_budget:platform/day", "team_budget:support/week"]


# --- Windows -------------------------------------------------------------------------------


def test_windows_count_only_their_calls(ledger, tmp_path):
    add_session(ledger, "old", team="platform")
    add_call(ledger, "old", "0.50", timedelta(days=3))
    add_call(ledger, "old", "0.125", timedelta(days=20))
    add_call(ledger, "old", "7", timedelta(days=31))
    add_session(ledger, "new", team="platform")
    add_call(ledger, "new", "0.30", timedelta(hours=1))
    add_call(ledger, "new", "0.02", timedelta(hours=23, minutes=59))
    add_session(ledger, "elsewhere", team="support")
    add_call(ledger, "elsewhere", "4", timedelta(hours=1))
    rules = [
        team_rule("day", "1"),
        team_rule("week", "1"),
        team_rule("month", "10"),
        team_rule("total", "100"),
    ]

    rows = {row["window"]: row for row in remaining(ledger.db.conn, rules, NOW)}

    assert rows["day"]["spent_usd"] == "0.32"
    assert rows["day"]["remaining_usd"] == "0.68"
    assert rows["week"]["spent_usd"] == "0.82"
    assert rows["week"]["remaining_usd"] == "0.18"
    assert rows["month"]["spent_usd"] == "0.945"
    assert rows["total"]["spent_usd"] == "7.945"
    assert rows["total"]["calls"] == 5


def test_window_start_inside_an_hour(ledger):
    # Whole hours come from the hourly totals; the window's first, partial hour from calls.
    add_session(ledger, "s", team="platform")
    add_call(ledger, "s", "1", timedelta(hours=24, seconds=1))
    add_call(ledger, "s", "0.25", timedelta(hours=23, minutes=59, seconds=59))
    add_call(ledger, "s", "0.5", timedelta(hours=23))
    add_call(ledger, "s", "0.125", timedelta(seconds=1))

    (row,) = remaining(ledger.db.conn, [team_rule("day", "10")], NOW)

    assert row["spent_usd"] == "0.875"
    assert row["calls"] == 3


def test_migration_counts_earlier_calls(tmp_path):
    # A ledger written before the hourly totals existed gets them from its calls.
    db = sqlite_utils.Database(sqlite3.connect(tmp_path / "old.db", isolation_level=None))
    db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
    m001_sessions_and_calls(db)
    db["_migrations"].insert({"name": "m001_sessions_and_calls", "applied_at": NOW.isoformat()})
    db["sessions"].insert({"id": "s", "team": "platform", "user": "bob"})
    started = (NOW - timedelta(hours=2)).isoformat(timespec="milliseconds")
    for seq, (status, cost) in enumerate([("ok", 3), ("upstream_error", 0), ("sent", None)], 1):
        db["calls"].insert(
            {
                "session_id": "s",
                "seq": seq,
                "started_at": started,
                "decision": "admitted",
                "status": status,
                "cost_pico_usd": cost,
            }
        )
    db.conn.close()

    book = Ledger(tmp_path / "old.db")
    before = remaining(book.db.conn, [team_rule("day", "1", calls=10)], NOW)
    book.update_call(3, {"status": "ok", "cost_pico_usd": 4})
    after = remaining(book.db.conn, [team_rule("day", "1", calls=10)], NOW)
    book.close()

    assert before[0]["spent_usd"] == "0.000000000003"
    assert before[0]["calls"] == 2
    assert after[0]["spent_usd"] == "0.000000000007"
    assert after[0]["calls"] == 3


def test_refused_and_unsettled_calls_not_spent(ledger):
    add_session(ledger, "s", team="platform")
    add_call(ledger, "s", "0.10", timedelta(minutes=5))
    add_call(
        ledger, "s", "0", timedelta(minutes=4), decision="refused", status="refused", cost_usd="0"
    )
    # A call of a run that died mid-call: no cost, still marked as sent.
    add_call(
        ledger, "s", "0", timedelta(minutes=3), status="sent", cost_usd=None, cost_pico_usd=None
    )

    (row,) = remaining(ledger.db.conn, [team_rule("day", "1", calls=10)], NOW)

    assert row["spent_usd"] == "0.1"
    assert row["calls"] == 1
    assert row["remaining_calls"] == 9


def test_refusal_names_window_that_fails(ledger, tmp_path):
    add_session(ledger, "past", team="platform")
    add_call(ledger, "past", "0.50", timedelta(days=2))
    add_call(ledger, "past", "0.30", timedelta(hours=1))
    add_session(ledger, "now", team="platform")
    shared = LedgerBudgets(ledger.path, "now", [team_rule("day", "1"), team_rule("week", "1")])

    fits_day_only = shared.reserve("c1", Decimal("0.60"))
    fits_both = shared.reserve("c2", Decimal("0.20"))
    shared.close()

    assert fits_day_only is not None
    assert fits_day_only.cap == "team_budget:platform/week"
    assert fits_day_only.label == "team budget platform/week"
    assert fits_day_only.message == (
        "team budget platform/week: $0.80 spent in the last 7 days, $0.00 in flight, "
        "next call estimated at $0.60, budget $1.00"
    )
    assert fits_both is None


# --- Reservations --------------------------------------------------------------------------


def test_reservations_block_until_settled(ledger):
    add_session(ledger, "a", team="platform")
    add_session(ledger, "b", team="platform")
    first = LedgerBudgets(ledger.path, "a", [team_rule("day", "1")])
    second = LedgerBudgets(ledger.path, "b", [team_rule("day", "1")])

    async def settle_then_admit():
        # As in the proxy: settle, write the call's cost in the same callback, then yield.
        first.settle("a1", Decimal("0.50"))
        add_call(ledger, "a", "0.50", timedelta(seconds=1))
        await asyncio.sleep(0)
        return second.reserve("b1", Decimal("0.40"))

    assert first.reserve("a1", Decimal("0.70")) is None
    blocked = second.reserve("b1", Decimal("0.40"))
    # The call cost less than reserved: settling frees the difference.
    admitted = asyncio.run(settle_then_admit())
    held = query(ledger.path, "SELECT session_id, reserved_pico_usd FROM budget_reservations")
    first.close()
    second.close()

    assert blocked is not None
    assert "$0.70 in flight" in blocked.message
    assert admitted is None
    assert [tuple(row) for row in held] == [("b", to_pico(Decimal("0.40")))]


def test_settled_reservation_counts_until_cost_recorded(ledger):
    # Between settling and writing the call's cost, the settled reservation counts instead.
    add_session(ledger, "a", team="platform")
    shared = LedgerBudgets(ledger.path, "a", [team_rule("day", "1")])
    shared.reserve("a1", Decimal("0.60"))

    reached = shared.settle("a1", Decimal("1.00"))
    (row,) = remaining(ledger.db.conn, [team_rule("day", "1")])
    shared.close()

    assert row["spent_usd"] == "1"
    assert row["remaining_usd"] == "0"
    assert reached is not None
    assert reached.message == "team budget platform/day: $1.00 of $1.00 spent in the last 24 hours"


def test_call_budget_counts_calls_in_flight(ledger):
    add_session(ledger, "a", team="platform")
    add_call(ledger, "a", "0.01", timedelta(minutes=1))
    shared = LedgerBudgets(ledger.path, "a", [team_rule("day", calls=3)])

    results = [shared.reserve(f"k{i}", Decimal("0.01")) for i in range(3)]
    shared.close()

    assert results[0] is None
    assert results[1] is None
    assert results[2] is not None
    assert results[2].message == (
        "team budget platform/day: 1 of 3 calls made in the last 24 hours and 2 in flight"
    )


def test_stream_reservation_grows_then_cuts(ledger):
    add_session(ledger, "a", team="platform")
    add_session(ledger, "b", team="platform")
    other = LedgerBudgets(ledger.path, "b", [team_rule("day", "1")])
    other.reserve("b1", Decimal("0.25"))
    shared = LedgerBudgets(ledger.path, "a", [team_rule("day", "1")])
    shared.reserve("a1", Decimal("0.10"))

    below_reservation = shared.update_running("a1", Decimal("0.05"))
    doubled = shared.update_running("a1", Decimal("0.20"))
    held_after_doubling = query(
        ledger.path, "SELECT reserved_pico_usd FROM budget_reservations WHERE call_key = 'a1'"
    )[0][0]
    all_room = shared.update_running("a1", Decimal("0.50"))
    held_with_all_room = query(
        ledger.path, "SELECT reserved_pico_usd FROM budget_reservations WHERE call_key = 'a1'"
    )[0][0]
    over = shared.update_running("a1", Decimal("0.76"))
    shared.close()
    other.close()

    assert below_reservation is None
    assert doubled is None
    assert held_after_doubling == to_pico(Decimal("0.40"))
    assert all_room is None
    assert held_with_all_room == to_pico(Decimal("0.75"))
    assert over is not None
    assert over.cap == "team_budget:platform/day"
    assert over.message == (
        "team budget platform/day: $1.01 of $1.00 spent or in flight in the last 24 hours, "
        "reached mid-stream"
    )


def test_shared_refusal_leaves_session_counters(ledger):
    # A call the shared budget refuses leaves the session's counters as they were.
    add_session(ledger, "a", team="platform")
    shared = LedgerBudgets(ledger.path, "a", [team_rule("day", "0.10")])
    budget = Budget(max_calls=5, shared=shared)

    refusal = budget.admit("k1", Decimal("0.20"))
    shared.close()

    assert refusal is not None
    assert budget.tripped == refusal
    assert budget.calls == 0
    assert budget.reserved_usd == 0


def test_exhausted_before_start(ledger):
    add_session(ledger, "old", task="t1")
    add_call(ledger, "old", "2", timedelta(days=40))
    add_session(ledger, "new", task="t1")
    shared = LedgerBudgets(ledger.path, "new", [BudgetRule("task", "t1", "total", Decimal(2))])

    refusal = shared.exhausted()
    shared.close()

    assert refusal is not None
    assert refusal.message == "task budget t1/total: $2.00 of $2.00 already spent in total"


# --- Processes -----------------------------------------------------------------------------


def worker(db: Path, session: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), "--db", str(db), "--session", session, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_dead_process_reservation_dropped(ledger):
    held = worker(ledger.path, "dead", "--usd-per-day", "1", "--cost", "0.90", "--hold")
    assert held.stdout.readline().strip() == "held"
    add_session(ledger, "live", team="platform")
    shared = LedgerBudgets(ledger.path, "live", [team_rule("day", "1")])

    while_alive = shared.reserve("l1", Decimal("0.50"))
    held.send_signal(signal.SIGKILL)
    held.wait(timeout=10)
    after_death = shared.reserve("l1", Decimal("0.50"))
    owners = query(ledger.path, "SELECT DISTINCT session_id FROM budget_reservations")
    shared.close()

    assert while_alive is not None
    assert "$0.90 in flight" in while_alive.message
    assert after_death is None
    assert [row[0] for row in owners] == ["live"]


def test_reused_pid_reservation_dropped(ledger):
    # A reservation whose pid now belongs to another process (here: this test) is stale.
    add_session(ledger, "gone", team="platform")
    ledger.db.execute(
        "INSERT INTO budget_reservations VALUES ('gone', 'k', ?, 12.5, ?, ?, 0, ?)",
        [os.getpid(), os.uname().nodename, to_pico(Decimal(1)), NOW.isoformat()],
    )
    add_session(ledger, "live", team="platform")
    shared = LedgerBudgets(ledger.path, "live", [team_rule("day", "1")])

    refusal = shared.reserve("l1", Decimal("0.50"))
    shared.close()

    assert refusal is None


def test_racing_processes_share_budget_exactly(ledger):
    # Four processes draw $0.01 calls from one $1.00 daily budget as fast as they can. Exactly
    # 100 calls fit; a lost update would admit more.
    start = str(time.time() + 3)
    processes = [
        worker(
            ledger.path,
            f"w{i}",
            *("--usd-per-day", "1.00", "--cost", "0.01", "--attempts", "200"),
            *("--start-at", start),
        )
        for i in range(4)
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        results.append(json.loads(out))

    costs = query(ledger.path, "SELECT cost_usd FROM calls WHERE decision = 'admitted'")
    total = sum((Decimal(row[0]) for row in costs), Decimal(0))
    assert sum(r["admitted"] for r in results) == 100
    assert len(costs) == 100
    assert total == Decimal("1.00")
    assert all(r["admitted"] > 0 for r in results)
    assert query(ledger.path, "SELECT COUNT(*) FROM budget_reservations")[0][0] == 0


def test_racing_processes_share_call_budget(ledger):
    start = str(time.time() + 3)
    processes = [
        worker(
            ledger.path, f"w{i}", "--calls-per-day", "37", "--attempts", "60", "--start-at", start
        )
        for i in range(3)
    ]
    admitted = 0
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        admitted += json.loads(out)["admitted"]

    assert admitted == 37
    assert query(ledger.path, "SELECT COUNT(*) FROM calls")[0][0] == 37


# --- Command -------------------------------------------------------------------------------


def test_budget_status_json(tmp_path, tokencap_env):
    db = tmp_path / "ledger.db"
    book = Ledger(db)
    add_session(book, "s1", team="platform", user="bob", task="fix-login")
    add_call(book, "s1", "1.25", timedelta(hours=2))
    add_call(book, "s1", "0.5", timedelta(days=3))
    book.close()
    (tmp_path / "tokencap.toml").write_text(
        "[tasks.fix-login]\nmax_usd_total = 10\n"
        "[teams.platform]\nmax_usd_per_day = 2\nmax_calls_per_day = 5\n"
        '[users."*"]\nmax_usd_per_week = 3\n'
    )

    result = subprocess.run(
        [str(TOKENCAP), "budget", "status", "--format", "json", "--user", "bob"],
        env=tokencap_env | {"TOKENCAP_DB": str(db)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    rows = {row["budget"]: row for row in json.loads(result.stdout)["budgets"]}
    assert list(rows) == [
        "task_budget:fix-login/total",
        "team_budget:platform/day",
        "user_budget:bob/week",
    ]
    assert rows["task_budget:fix-login/total"]["spent_usd"] == "1.75"
    assert rows["task_budget:fix-login/total"]["remaining_usd"] == "8.25"
    assert rows["team_budget:platform/day"]["spent_usd"] == "1.25"
    assert rows["team_budget:platform/day"]["remaining_usd"] == "0.75"
    assert rows["team_budget:platform/day"]["remaining_calls"] == 4
    assert rows["user_budget:bob/week"]["remaining_usd"] == "1.25"
    assert rows["user_budget:bob/week"]["source"] == f"{tmp_path / 'tokencap.toml'}:7"
