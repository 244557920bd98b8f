"""`tokencap report`: sessions from the ledger, as a table for people or JSON for scripts."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table

from tokencap.ledger import Ledger
from tokencap.prices import from_pico

TOKEN_FIELDS = (
    "input_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
)

_SESSIONS_SQL = f"""
SELECT s.id, s.task, s.agent, s.user, s.team, s.tags, s.status, s.end_reason, s.exit_status,
       s.max_usd, s.max_calls, s.started_at, s.ended_at, s.processes_stopped,
       COUNT(c.id) FILTER (WHERE c.decision = 'admitted') AS calls,
       COUNT(c.id) FILTER (WHERE c.decision = 'refused') AS refused_calls,
       {", ".join(f"COALESCE(SUM(c.{f}), 0) AS {f}" for f in TOKEN_FIELDS)},
       COALESCE(SUM(c.cost_pico_usd), 0) AS cost_pico_usd,
       COALESCE(MAX(c.cost_estimated), 0) AS cost_estimated
FROM sessions s LEFT JOIN calls c ON c.session_id = s.id
GROUP BY s.id
ORDER BY s.started_at DESC, s.id DESC
LIMIT ?
"""


def sessions(ledger: Ledger, limit: int = 50) -> list[dict[str, Any]]:
    """Return the newest sessions with their call counts, tokens and cost, newest first."""
    cursor = ledger.db.execute(_SESSIONS_SQL, [limit])
    columns = [d[0] for d in cursor.description]
    result = []
    for values in cursor.fetchall():
        row = dict(zip(columns, values, strict=True))
        result.append(
            {
                "session_id": row["id"],
                "task": row["task"],
                "agent": row["agent"],
                "user": row["user"],
                "team": row["team"],
                "tags": json.loads(row["tags"] or "{}"),
                "status": row["status"],
                "end_reason": row["end_reason"],
                "exit_status": row["exit_status"],
                "max_usd": row["max_usd"],
                "max_calls": row["max_calls"],
                "calls": row["calls"],
                "refused_calls": row["refused_calls"],
                "tokens": {f: row[f] for f in TOKEN_FIELDS},
                "cost_usd": str(from_pico(row["cost_pico_usd"])),
                "cost_estimated": bool(row["cost_estimated"]),
                "processes_stopped": row["processes_stopped"],
                "started_at": row["started_at"],
                "ended_at": row["ended_at"],
            }
        )
    return result


def to_json(rows: list[dict[str, Any]]) -> str:
    """Return the rows as a JSON document with a stable top-level shape."""
    return json.dumps({"sessions": rows}, indent=2)


def to_table(rows: list[dict[str, Any]]) -> Table:
    """Return the rows as a rich table, newest session first."""
    table = Table(title="tokencap sessions, newest first", title_justify="left")
    table.add_column("session", no_wrap=True)
    table.add_column("task")
    table.add_column("agent")
    table.add_column("user")
    table.add_column("calls", justify="right")
    table.add_column("input", justify="right")
    table.add_column("output", justify="right")
    table.add_column("cost", justify="right", no_wrap=True)
    table.add_column("ended")
    table.add_column("exit", justify="right")
    table.add_column("started")
    for row in rows:
        tokens = row["tokens"]
        input_total = (
            tokens["input_tokens"]
            + tokens["cache_read_tokens"]
            + tokens["cache_write_5m_tokens"]
            + tokens["cache_write_1h_tokens"]
        )
        cost = f"${_money(Decimal(row['cost_usd']))}" + ("*" if row["cost_estimated"] else "")
        calls = str(row["calls"]) + (
            f" (+{row['refused_calls']} refused)" if row["refused_calls"] else ""
        )
        table.add_row(
            row["session_id"],
            row["task"] or "",
            row["agent"] or "",
            row["user"] or "",
            calls,
            f"{input_total:,}",
            f"{tokens['output_tokens']:,}",
            cost,
            row["end_reason"] or row["status"] or "",
            "" if row["exit_status"] is None else str(row["exit_status"]),
            (row["started_at"] or "")[:19].replace("T", " "),
        )
    return table


def print_report(console: Console, rows: list[dict[str, Any]]) -> None:
    """Print the table, or a friendly line when the ledger has no sessions yet."""
    if not rows:
        console.print("No sessions recorded yet. Run an agent with `tokencap run -- COMMAND`.")
        return
    console.print(to_table(rows))
    if any(row["cost_estimated"] for row in rows):
        console.print(
            "* includes calls to models with no known price, charged at the highest rates"
        )


def _money(amount: Decimal) -> str:
    if amount >= Decimal("0.01") or amount == 0:
        return f"{amount:,.2f}" if amount == amount.quantize(Decimal("0.01")) else f"{amount:,.4f}"
    return f"{amount.normalize():f}"
