"""Measure what shared budgets add to each model call: admission and settlement in the ledger.

Run from the repository root, with tokencap installed in the active environment:

    python bench/bench_budgets.py     # writes bench/results/budgets.json and prints a summary

Each measured call goes through what the proxy does around a model call, without the network:
`Budget.admit`, the ledger's call row, `Budget.settle` and the cost written to the row, on an
asyncio loop. The cases: a session with no shared budget, with and without the triggers that
keep the hourly spend totals; a task, a team day and a team month budget on an empty ledger;
the same on a ledger that contains a month of the team's calls; and four processes drawing on
one budget at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from tokencap.budgets import BudgetRule, LedgerBudgets
from tokencap.caps import Budget
from tokencap.ledger import Ledger
from tokencap.prices import to_pico

HERE = Path(__file__).parent
COST = Decimal("0.0105")
RULES = [
    BudgetRule("task", "bench", "total", max_usd=Decimal(10**6)),
    BudgetRule("team", "platform", "day", max_usd=Decimal(10**6)),
    BudgetRule("team", "platform", "month", max_usd=Decimal(10**6)),
]


def seed(ledger: Ledger, calls: int, sessions: int) -> None:
    """Fill the ledger with `calls` settled calls of the team, spread over 30 days."""
    now = datetime.now(UTC)
    per_session = calls // sessions
    with ledger.db.conn:
        for s in range(sessions):
            session_id = f"seed-{s}"
            ledger.db["sessions"].insert({"id": session_id, "team": "platform", "task": "seed"})
            ledger.db["calls"].insert_all(
                {
                    "session_id": session_id,
                    "seq": i + 1,
                    "started_at": (
                        now - timedelta(days=30 * (s * per_session + i) / calls)
                    ).isoformat(timespec="milliseconds"),
                    "decision": "admitted",
                    "status": "ok",
                    "cost_usd": str(COST),
                    "cost_pico_usd": to_pico(COST),
                }
                for i in range(per_session)
            )


def record_sent_call(ledger: Ledger, session_id: str, seq: int) -> int:
    """Record an admitted call in flight, as the proxy does before forwarding it."""
    return ledger.record_call(
        {
            "session_id": session_id,
            "seq": seq,
            "started_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "decision": "admitted",
            "status": "sent",
        }
    )


async def measure(ledger: Ledger, session_id: str, budget: Budget, calls: int) -> list[float]:
    """Return the milliseconds each call spends in admission and settlement."""
    timings = []
    for seq in range(1, calls + 1):
        key = f"{session_id}-{seq}"
        start = time.perf_counter()
        assert budget.admit(key, COST) is None
        row_id = record_sent_call(ledger, session_id, seq)
        admitted = time.perf_counter()
        await asyncio.sleep(0)
        settling = time.perf_counter()
        budget.settle(key, COST)
        ledger.update_call(
            row_id, {"status": "ok", "cost_usd": str(COST), "cost_pico_usd": to_pico(COST)}
        )
        end = time.perf_counter()
        timings.append(((admitted - start) + (end - settling)) * 1000)
        await asyncio.sleep(0)
    return timings


def scenario(db: Path, shared: bool, calls: int, triggers: bool = True) -> list[float]:
    ledger = Ledger(db)
    if not triggers:
        # The cost of the hourly spend totals to runs that have no shared budget.
        for name in ("budget_spend_insert", "budget_spend_update", "budget_spend_delete"):
            ledger.db.execute(f"DROP TRIGGER IF EXISTS {name}")
    session_id = f"bench-{time.monotonic_ns()}"
    ledger.start_session({"id": session_id, "team": "platform", "task": "bench"})
    budgets = LedgerBudgets(db, session_id, RULES) if shared else None
    budget = Budget(max_usd=Decimal(10**6), shared=budgets)
    timings = asyncio.run(measure(ledger, session_id, budget, calls))
    if budgets is not None:
        budgets.close()
    ledger.close()
    return timings


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 3),
        "p95": round(ordered[int(len(ordered) * 0.95) - 1], 3),
        "max": round(ordered[-1], 3),
    }


# Runs in each contending process: draws $0.01 calls from one $5 budget until refused.
CONTENDER = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from bench_budgets import contend
print(json.dumps(contend(Path(sys.argv[1]), sys.argv[2], float(sys.argv[4]))))
"""


def contend(db: Path, session_id: str, start_at: float) -> dict:
    """Draw $0.01 calls from a shared $5.00 budget until refused; return count and seconds."""
    ledger = Ledger(db)
    ledger.start_session({"id": session_id, "team": "race"})
    rules = [BudgetRule("team", "race", "day", max_usd=Decimal(5))]
    budgets = LedgerBudgets(db, session_id, rules)
    budget = Budget(shared=budgets)
    time.sleep(max(0.0, start_at - time.time()))

    async def draw() -> int:
        admitted = 0
        seq = 0
        cost = Decimal("0.01")
        while True:
            key = f"{session_id}-{seq}"
            if budget.admit(key, cost) is not None:
                return admitted
            seq += 1
            row_id = record_sent_call(ledger, session_id, seq)
            await asyncio.sleep(0)
            budget.settle(key, cost)
            ledger.update_call(
                row_id, {"status": "ok", "cost_usd": "0.01", "cost_pico_usd": to_pico(cost)}
            )
            admitted += 1
            await asyncio.sleep(0)

    start = time.perf_counter()
    admitted = asyncio.run(draw())
    seconds = time.perf_counter() - start
    budgets.close()
    ledger.close()
    return {"admitted": admitted, "seconds": round(seconds, 3)}


def race(db: Path, processes: int) -> dict:
    start_at = time.time() + 3
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(db), f"race-{i}", str(HERE), str(start_at)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    results = [json.loads(w.communicate(timeout=300)[0]) for w in workers]
    ledger = Ledger(db)
    total = ledger.db.execute(
        "SELECT COUNT(*), SUM(cost_pico_usd) FROM calls c "
        "JOIN sessions s ON s.id = c.session_id WHERE s.team = 'race'"
    ).fetchone()
    ledger.close()
    slowest = max(r["seconds"] for r in results)
    return {
        "processes": processes,
        "budget_usd": "5",
        "call_usd": "0.01",
        "admitted": sum(r["admitted"] for r in results),
        "admitted_per_process": [r["admitted"] for r in results],
        "ledger_calls": total[0],
        "ledger_spend_usd": str(Decimal(total[1]) / 10**12),
        "seconds": slowest,
        "calls_per_second": round(total[0] / slowest, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="calls measured per scenario")
    parser.add_argument("--history", type=int, default=100_000, help="calls already in the month")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "budgets.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.db"
        full = Path(tmp) / "full.db"
        seeded = Ledger(full)
        seed(seeded, args.history, sessions=max(1, args.history // 100))
        seeded.close()
        result = {
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": __import__("os").cpu_count(),
                "date": datetime.now(UTC).date().isoformat(),
            },
            "calls": args.calls,
            "history_calls": args.history,
            "admit_and_settle_ms": {
                "session_caps_only_no_spend_triggers": summary(
                    scenario(Path(tmp) / "bare.db", False, args.calls, triggers=False)
                ),
                "session_caps_only": summary(scenario(empty, False, args.calls)),
                "shared_budgets_empty_ledger": summary(scenario(empty, True, args.calls)),
                "shared_budgets_month_of_history": summary(scenario(full, True, args.calls)),
            },
            "race": race(Path(tmp) / "race.db", 4),
        }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
