"""Grouped reports and session lists as rich tables, JSON, CSV and markdown.

JSON and CSV carry exact values (cost as decimal strings, every token kind apart); tables and
markdown are for reading, with money rounded for display.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from rich.table import Table
from rich.text import Text

from tokencap.report.queries import TOKEN_FIELDS, GroupedReport, Totals

NO_SESSIONS = "No sessions recorded yet. Run an agent with `tokencap run -- COMMAND`."
NO_MATCH = "No sessions match these filters."
NO_CALLS = "No model calls recorded yet, so there is no model, provider or day to group by."
ESTIMATED_NOTE = "* includes calls to models with no known price, charged at the highest rates"

# Totals columns of grouped reports: header, and the value shown for a Totals.
_TOTAL_COLUMNS = (
    ("sessions", lambda t: t.sessions),
    ("capped", lambda t: t.capped_sessions),
    ("calls", lambda t: t.calls),
    ("refused", lambda t: t.refused_calls),
    ("input", lambda t: t.tokens["input_tokens"]),
    ("cache read", lambda t: t.tokens["cache_read_tokens"]),
    ("cache write", lambda t: _cache_writes(t.tokens)),
    ("output", lambda t: t.tokens["output_tokens"]),
    ("reasoning", lambda t: t.tokens["reasoning_tokens"]),
)
# Columns the terminal table leaves out when they are zero in every row.
_OPTIONAL_COLUMNS = {"refused", "cache read", "cache write", "reasoning"}


# --- Values -------------------------------------------------------------------------------


def money(amount: Decimal | str) -> str:
    """Return dollars for reading: cents when exact, else four decimals, small amounts in full."""
    amount = Decimal(amount)
    if amount == 0:
        return "$0.00"
    if amount >= Decimal("0.01"):
        if amount == amount.quantize(Decimal("0.01")):
            return f"${amount:,.2f}"
        return f"${amount:,.4f}"
    # Below a cent every digit matters: a call can cost $0.0000453.
    exact = amount.normalize()
    if exact.as_tuple().exponent > -4:
        exact = exact.quantize(Decimal("0.0001"))
    return f"${exact:f}"


def number(value: int) -> str:
    return f"{value:,}"


def key_header(key: str) -> str:
    return key.replace(":", " ")


def key_text(value: str | None) -> str:
    return "(none)" if value is None else value


def when(iso: str | None) -> str:
    """Return an ISO time from the ledger as `2026-12-04 20:30:15` (UTC)."""
    return (iso or "")[:19].replace("T", " ")


def duration(start: str | None, end: str | None, now: datetime | None = None) -> str:
    """Return the time from `start` to `end` (or now) as `1h 02m`, `3m 05s` or `12.4s`."""
    if not start:
        return ""
    try:
        begin = datetime.fromisoformat(start)
        finish = datetime.fromisoformat(end) if end else (now or datetime.now(UTC))
    except ValueError:
        return ""
    seconds = max((finish - begin).total_seconds(), 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24:02d}h"


def session_status(session: dict[str, Any]) -> str:
    """Return a session's state for reading: running, stale, completed, capped (max_usd)..."""
    if session["status"] == "running":
        return "stale" if session["stale"] else "running"
    if session["status"] == "capped":
        return f"capped ({session['end_reason']})"
    if session["status"] == "failed" and session["end_reason"] not in (None, "tokencap_error"):
        return f"failed ({session['end_reason']})"
    return session["status"] or ""


STATUS_STYLES = {"running": "green", "stale": "yellow", "failed": "red"}


def status_text(session: dict[str, Any]) -> Text:
    label = session_status(session)
    style = "red" if label.startswith("capped") else STATUS_STYLES.get(label.split(" ")[0], "")
    return Text(label, style=style)


def _cache_writes(tokens: dict[str, int]) -> int:
    return tokens["cache_write_5m_tokens"] + tokens["cache_write_1h_tokens"]


def all_input_tokens(tokens: dict[str, int]) -> int:
    """Return the input tokens of every kind: uncached, cache reads and cache writes."""
    return tokens["input_tokens"] + tokens["cache_read_tokens"] + _cache_writes(tokens)


def _cost_cell(totals: Totals, mark: str = "*") -> str:
    return money(totals.cost_usd) + (mark if totals.cost_estimated else "")


# --- Grouped reports ----------------------------------------------------------------------


def grouped_table(report: GroupedReport) -> Table:
    """Return the grouped report as a rich table with a totals row."""
    table = Table(
        title=f"tokencap spend by {', '.join(report.group_by)}",
        title_justify="left",
        caption=report.filters.describe() or None,
        caption_justify="left",
    )
    for key in report.group_by:
        table.add_column(key_header(key), no_wrap=key == "session")
    shown = [
        (header, value)
        for header, value in _TOTAL_COLUMNS
        if header not in _OPTIONAL_COLUMNS or value(report.totals)
    ]
    for header, _ in shown:
        table.add_column(header, justify="right")
    table.add_column("cost", justify="right", no_wrap=True)

    for group in report.groups:
        keys = [
            Text(key_text(group.key[key]), style="dim" if group.key[key] is None else "")
            for key in report.group_by
        ]
        numbers = [number(value(group.totals)) for _, value in shown]
        table.add_row(*keys, *numbers, _cost_cell(group.totals))

    table.add_section()
    blanks = [""] * (len(report.group_by) - 1)
    numbers = [number(value(report.totals)) for _, value in shown]
    table.add_row("total", *blanks, *numbers, _cost_cell(report.totals), style="bold")
    return table


def grouped_notes(report: GroupedReport) -> list[str]:
    """Return the lines printed under a grouped table: groups left out, estimated prices."""
    notes = []
    hidden = report.group_count - len(report.groups)
    if hidden > 0:
        notes.append(
            f"{len(report.groups)} of {report.group_count} groups shown (--top); "
            "the total covers all"
        )
    if report.totals.cost_estimated:
        notes.append(ESTIMATED_NOTE)
    return notes


def grouped_json(report: GroupedReport) -> str:
    """Return the grouped report as JSON: group_by, filters, groups, totals and sessions."""
    document = {
        "group_by": report.group_by,
        "filters": report.filters.to_json(),
        "groups": [group.key | group.totals.to_json() for group in report.groups],
        "group_count": report.group_count,
        "totals": report.totals.to_json(),
        "sessions": report.sessions,
    }
    return json.dumps(document, indent=2)


_CSV_TOTALS = (
    "sessions",
    "capped_sessions",
    "calls",
    "refused_calls",
    *TOKEN_FIELDS,
    "cost_usd",
    "cost_estimated",
)


def grouped_csv(report: GroupedReport) -> str:
    """Return one CSV row per group, without a totals row, so that columns sum correctly."""
    rows = []
    for group in report.groups:
        values = group.totals.to_json()
        values |= values.pop("tokens")
        rows.append([*(group.key[key] for key in report.group_by), *map(values.get, _CSV_TOTALS)])
    return csv_text([*report.group_by, *_CSV_TOTALS], rows)


def grouped_markdown(report: GroupedReport) -> str:
    """Return the grouped report as a markdown heading, filter line and table with totals."""
    headers = [*map(key_header, report.group_by), *(h for h, _ in _TOTAL_COLUMNS), "cost"]
    rows = [
        [
            *(key_text(group.key[key]) for key in report.group_by),
            *(number(value(group.totals)) for _, value in _TOTAL_COLUMNS),
            _cost_cell(group.totals, "\\*"),
        ]
        for group in report.groups
    ]
    totals = [
        "total",
        *[""] * (len(report.group_by) - 1),
        *(number(value(report.totals)) for _, value in _TOTAL_COLUMNS),
        _cost_cell(report.totals, "\\*"),
    ]
    rows.append([f"**{cell}**" if cell else "" for cell in totals])
    lines = [f"### tokencap spend by {', '.join(report.group_by)}", ""]
    if report.filters.describe():
        lines += [f"Filters: {_markdown_cell(report.filters.describe())}", ""]
    align = "l" * len(report.group_by) + "r" * (len(headers) - len(report.group_by))
    lines.append(markdown_table(headers, rows, align))
    # A line that starts with * would be a list item in markdown.
    notes = [note.replace("* ", "\\* ", 1) for note in grouped_notes(report)]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


# --- Session lists ------------------------------------------------------------------------


def add_session_columns(table: Table) -> None:
    """Add the columns that every table of sessions starts with; see `session_cells`."""
    table.add_column("session", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("task")
    table.add_column("agent")
    table.add_column("user")
    table.add_column("calls", justify="right")
    table.add_column("spend", justify="right", no_wrap=True)


def session_cells(session: dict[str, Any]) -> list[str | Text]:
    """Return a session's id, state, attribution, and calls and spend against its caps."""
    return [
        session["session_id"],
        status_text(session),
        session["task"] or "",
        session["agent"] or "",
        session["user"] or "",
        calls_against_cap(session),
        cost_against_cap(session),
    ]


def sessions_table(sessions: list[dict[str, Any]], title: str) -> Table:
    """Return sessions as a rich table: state, attribution, calls and cost against caps."""
    table = Table(title=title, title_justify="left")
    add_session_columns(table)
    table.add_column("exit", justify="right")
    table.add_column("started (UTC)", no_wrap=True)
    table.add_column("took", justify="right", no_wrap=True)
    for session in sessions:
        table.add_row(
            *session_cells(session),
            "" if session["exit_status"] is None else str(session["exit_status"]),
            when(session["started_at"]),
            "" if session["stale"] else duration(session["started_at"], session["ended_at"]),
        )
    return table


def calls_against_cap(session: dict[str, Any]) -> str:
    text = number(session["calls"])
    if session["max_calls"] is not None:
        text += f" of {number(session['max_calls'])}"
    if session["refused_calls"]:
        text += f" (+{session['refused_calls']} refused)"
    return text


def cost_against_cap(session: dict[str, Any]) -> str:
    text = money(session["cost_usd"]) + ("*" if session["cost_estimated"] else "")
    if session["max_usd"] is not None:
        text += f" of {money(session['max_usd'])}"
    return text


def sessions_json(sessions: list[dict[str, Any]]) -> str:
    return json.dumps({"sessions": sessions}, indent=2)


_SESSION_CSV = (
    "session_id",
    "status",
    "stale",
    "end_reason",
    "exit_status",
    "task",
    "agent",
    "user",
    "team",
    "tags",
    "max_usd",
    "max_calls",
    "calls",
    "refused_calls",
    *TOKEN_FIELDS,
    "cost_usd",
    "cost_estimated",
    "processes_stopped",
    "started_at",
    "ended_at",
    "hostname",
    "pid",
)


def sessions_csv(sessions: list[dict[str, Any]]) -> str:
    """Return one CSV row per session; `tags` is a JSON object in one column."""
    rows = []
    for session in sessions:
        values = session | session["tokens"] | {"tags": json.dumps(session["tags"])}
        rows.append([values[name] for name in _SESSION_CSV])
    return csv_text(_SESSION_CSV, rows)


def sessions_markdown(sessions: list[dict[str, Any]], title: str) -> str:
    headers = ["session", "status", "task", "agent", "user", "calls", "spend", "started (UTC)"]
    align = "lllllrrl"
    rows = [
        [
            f"`{session['session_id']}`",
            session_status(session),
            session["task"] or "",
            session["agent"] or "",
            session["user"] or "",
            calls_against_cap(session),
            cost_against_cap(session),
            when(session["started_at"]),
        ]
        for session in sessions
    ]
    return f"### {title}\n\n{markdown_table(headers, rows, align)}\n"


# --- Shared -------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str) -> str:
    """Return a markdown table; `align` has an l or r per column, such as "llrr"."""
    lines = [
        "| " + " | ".join(_markdown_cell(h) for h in headers) + " |",
        "| " + " | ".join("---:" if side == "r" else "---" for side in align) + " |",
    ]
    lines.extend("| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in rows)
    return "\n".join(lines)


def _markdown_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def csv_text(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Return CSV with a header line; None is an empty cell and booleans are true or false."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow(["" if value is None else _csv_value(value) for value in row])
    return out.getvalue()


def _csv_value(value: Any) -> Any:
    return str(value).lower() if isinstance(value, bool) else value
