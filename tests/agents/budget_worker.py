"""One process drawing on shared budgets the way `tokencap run`'s proxy does, for the tests.

For each call it admits through `Budget.admit` (session caps, then the shared budgets in the
ledger), records the call row, settles it and writes its cost, all on an asyncio event loop as
the proxy does. It stops after `--attempts` calls or `--stop-after-refusals` refusals in a row,
and prints how many calls were admitted and refused as JSON. `--start-at` makes several
workers begin at the same moment.

    python tests/agents/budget_worker.py --db L --session S --team T --usd-per-day 1.00 \\
        --cost 0.01 --attempts 200

With `--hold`, it reserves one call, prints "held" and sleeps without settling, so that a test
can kill it with SIGKILL and leave its reservation behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from tokencap.budgets import BudgetRule, LedgerBudgets
from tokencap.caps import Budget
from tokencap.ledger import Ledger
from tokencap.prices import to_pico


async def draw(args: argparse.Namespace) -> dict:
    ledger = Ledger(args.db)
    if ledger.session(args.session) is None:
        ledger.start_session({"id": args.session, "team": args.team, "task": args.task})
    rules = []
    if args.usd_per_day is not None:
        rules.append(BudgetRule("team", args.team, "day", max_usd=Decimal(args.usd_per_day)))
    if args.calls_per_day is not None:
        rules.append(BudgetRule("team", args.team, "day", max_calls=args.calls_per_day))
    shared = LedgerBudgets(Path(args.db), args.session, rules)
    budget = Budget(shared=shared)
    cost = Decimal(args.cost)
    admitted = refused = in_a_row = 0
    seq = ledger.db.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM calls WHERE session_id = ?", [args.session]
    ).fetchone()[0]

    for attempt in range(args.attempts):
        key = f"{args.session}-{attempt}"
        refusal = budget.admit(key, cost)
        if refusal is not None:
            # The worker is not stopped by a refusal: it keeps trying, as a new run would.
            budget.tripped = None
            refused += 1
            in_a_row += 1
            if in_a_row >= args.stop_after_refusals:
                break
            await asyncio.sleep(0.01)
            continue
        in_a_row = 0
        seq += 1
        row_id = ledger.record_call(
            {
                "session_id": args.session,
                "seq": seq,
                "started_at": _now(),
                "decision": "admitted",
                "status": "sent",
            }
        )
        if args.hold:
            print("held", flush=True)
            time.sleep(600)
        # Yield as the proxy does while the call is upstream, so other callbacks interleave.
        await asyncio.sleep(0)
        budget.settle(key, cost)
        ledger.update_call(
            row_id,
            {"status": "ok", "cost_usd": str(cost), "cost_pico_usd": to_pico(cost)},
        )
        admitted += 1
        await asyncio.sleep(0)

    shared.close()
    ledger.close()
    return {"admitted": admitted, "refused": refused}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--session", required=True)
    parser.add_argument("--team", default="platform")
    parser.add_argument("--task", default=None)
    parser.add_argument("--usd-per-day", default=None)
    parser.add_argument("--calls-per-day", type=int, default=None)
    parser.add_argument("--cost", default="0.01")
    parser.add_argument("--attempts", type=int, default=1)
    parser.add_argument("--stop-after-refusals", type=int, default=3)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--start-at", type=float, default=0, help="time.time() to start at")
    args = parser.parse_args()
    # Workers started one after another begin drawing together, so that they really race.
    time.sleep(max(0.0, args.start_at - time.time()))
    print(json.dumps(asyncio.run(draw(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
