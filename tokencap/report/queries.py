"""Reading spend from the ledger: grouped totals, lists of sessions and one session's calls.

Sums come from the `call_totals` table, which triggers keep equal to the sums over `calls`, so
a report over a million calls adds up thousands of rows. Money stays in integer picodollars
until it is shown.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from tokencap.errors import ConfigError
from tokencap.ledger import CALL_TOTALS_KEY, CALL_TOTALS_SUMS, TOKEN_COLUMNS, Ledger
from tokencap.prices import decimal_string, from_pico
from tokencap.report.filters import (
    Filters,
    call_conditions,
    is_call_key,
    key_sql,
    session_conditions,
)
from tokencap.report.liveness import is_stale, stale_ids
from tokencap.report.timespec import to_ledger

# The token counts of the JSON `tokens` object, named as the ledger's columns.
TOKEN_FIELDS = TOKEN_COLUMNS
_SUMS = ("calls", "refused_calls", *TOKEN_FIELDS, "cost_pico_usd", "estimated_calls")
_SUMS_SQL = ", ".join(f"COALESCE(SUM(x.{name}), 0) AS {name}" for name in _SUMS)
_SESSION_COUNTS_SQL = (
    "COUNT(DISTINCT p.id) AS sessions, "
    "COUNT(DISTINCT p.id) FILTER (WHERE p.status = 'capped') AS capped_sessions"
)
_ORDERS = {
    "cost": "cost_pico_usd DESC, calls DESC",
    "calls": "calls DESC, cost_pico_usd DESC",
    "sessions": "sessions DESC, cost_pico_usd DESC",
}


@dataclass(frozen=True, slots=True)
class Totals:
    """Sessions, calls, tokens and cost of one group of a report, or of all of it."""

    sessions: int
    capped_sessions: int
    calls: int
    refused_calls: int
    tokens: dict[str, int]
    cost_pico_usd: int
    estimated_calls: int

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Totals:
        return cls(
            sessions=row["sessions"],
            capped_sessions=row["capped_sessions"],
            calls=row["calls"],
            refused_calls=row["refused_calls"],
            tokens={name: row[name] for name in TOKEN_FIELDS},
            cost_pico_usd=row["cost_pico_usd"],
            estimated_calls=row["estimated_calls"],
        )

    @classmethod
    def zero(cls) -> Totals:
        return cls(0, 0, 0, 0, dict.fromkeys(TOKEN_FIELDS, 0), 0, 0)

    @property
    def cost_usd(self) -> Decimal:
        return from_pico(self.cost_pico_usd)

    @property
    def cost_estimated(self) -> bool:
        """True when a call was charged at the fallback rates for a model with no known price."""
        return self.estimated_calls > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "capped_sessions": self.capped_sessions,
            "calls": self.calls,
            "refused_calls": self.refused_calls,
            "tokens": dict(self.tokens),
            "cost_usd": decimal_string(self.cost_usd),
            "cost_estimated": self.cost_estimated,
        }


@dataclass(frozen=True, slots=True)
class Group:
    """One row of a grouped report: its key values (None when unset) and its totals."""

    key: dict[str, str | None]
    totals: Totals


@dataclass
class GroupedReport:
    """Spend grouped by one or more keys, with totals."""

    group_by: list[str]
    filters: Filters
    groups: list[Group]
    group_count: int  # before --top cut the list
    totals: Totals
    ledger_empty: bool
    # The newest matching sessions, which only the JSON format lists.
    sessions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SessionDetail:
    """One session with every call in order, and its calls per agent prompt id."""

    session: dict[str, Any]
    calls: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[dict[str, Any]] = field(default_factory=list)


# --- Grouped reports ----------------------------------------------------------------------


def grouped_report(
    ledger: Ledger,
    group_by: list[str],
    filters: Filters,
    *,
    sort: str | None = None,
    top: int | None = None,
) -> GroupedReport:
    """Return spend grouped by `group_by`, sorted and cut to `top` groups, with totals.

    A session counts in every group it has calls in. Sessions without calls count with zero
    calls, unless the report groups or filters by something only calls have (model, provider
    or day), which leaves them out.
    """
    stale = _stale_ids(ledger) if _needs_stale(filters) else set()
    spans, spans_params = _spans(filters)
    where, where_params = session_conditions(filters, stale)
    inner = filters.selects_calls or any(is_call_key(key) for key in group_by)
    source = (
        f"FROM sessions p {'JOIN' if inner else 'LEFT JOIN'} spans x ON x.session_id = p.id "
        f"WHERE {where}"
    )

    keys = [key_sql(key) for key in group_by]
    key_columns = ", ".join(f"{expr} AS k{i}" for i, (expr, _) in enumerate(keys))
    key_params = [param for _, params in keys for param in params]
    key_names = [f"k{i}" for i in range(len(keys))]
    by_name = ", ".join(f"{name} IS NULL, {name}" for name in key_names)
    sort = sort or ("name" if "day" in group_by else "cost")
    order = by_name if sort == "name" else f"{_ORDERS[sort]}, {by_name}"

    # The window count is taken before LIMIT, so it counts every group.
    rows = _rows(
        ledger,
        f"WITH spans AS ({spans}) SELECT {key_columns}, {_SESSION_COUNTS_SQL}, {_SUMS_SQL}, "
        f"COUNT(*) OVER () AS group_count {source} GROUP BY {', '.join(key_names)} "
        f"ORDER BY {order} LIMIT ?",
        [*spans_params, *key_params, *where_params, top or -1],
    )
    groups = [
        Group({key: row[f"k{i}"] for i, key in enumerate(group_by)}, Totals.from_row(row))
        for row in rows
    ]

    # Totals over every group, not only the --top ones, counting each session once.
    with_calls = " AND p.id IN (SELECT session_id FROM spans)" if inner else ""
    (total,) = _rows(
        ledger,
        f"""
        WITH spans AS ({spans}), picked AS (SELECT p.id, p.status FROM sessions p WHERE {where})
        SELECT
            (SELECT COUNT(*) FROM picked p WHERE 1 {with_calls}) AS sessions,
            (SELECT COUNT(*) FROM picked p WHERE p.status = 'capped' {with_calls})
                AS capped_sessions,
            {_SUMS_SQL}
        FROM spans x WHERE x.session_id IN (SELECT id FROM picked)
        """,
        [*spans_params, *where_params],
    )

    return GroupedReport(
        group_by=group_by,
        filters=filters,
        groups=groups,
        group_count=rows[0]["group_count"] if rows else 0,
        totals=Totals.from_row(total),
        ledger_empty=not has_sessions(ledger),
    )


def _spans(filters: Filters) -> tuple[str, list[Any]]:
    """Return SQL for the call totals that the filters select, with call_totals' columns.

    Whole UTC hours come from `call_totals`. Calls in the partial hours at the edges of the
    window are summed from `calls`, through its started_at index.
    """
    names = [*CALL_TOTALS_KEY, *CALL_TOTALS_SUMS]
    where, params = call_conditions(filters, "t")
    whole_hours = f"SELECT {', '.join(names)} FROM call_totals t WHERE {where}"
    if not filters.has_time:
        return whole_hours, params

    hours, edges = _split_window(filters.since, filters.until)
    parts: list[str] = []
    all_params: list[Any] = []
    if hours is not None:
        first, end = hours
        part = whole_hours + " AND t.hour != ''"
        all_params.extend(params)
        if first is not None:
            part += " AND t.hour >= ?"
            all_params.append(first)
        if end is not None:
            part += " AND t.hour < ?"
            all_params.append(end)
        parts.append(part)
    if edges:
        call_where, call_params = call_conditions(filters, "c")
        keys = [f"{expr.format(row='c')} AS {name}" for name, expr in CALL_TOTALS_KEY.items()]
        sums = [f"SUM({expr.format(row='c')}) AS {name}" for name, expr in CALL_TOTALS_SUMS.items()]
        windows = " OR ".join("(c.started_at >= ? AND c.started_at < ?)" for _ in edges)
        parts.append(
            f"SELECT {', '.join(keys + sums)} FROM calls c WHERE ({windows}) AND {call_where} "
            f"GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}"
        )
        all_params.extend(to_ledger(moment) for edge in edges for moment in edge)
        all_params.extend(call_params)
    return " UNION ALL ".join(parts), all_params


def _split_window(
    since: datetime | None, until: datetime | None
) -> tuple[tuple[str | None, str | None] | None, list[tuple[datetime, datetime]]]:
    """Split a time window into whole UTC hours (first, end) and partial-hour edges."""
    first = end = None
    edges = []
    if since is not None:
        first = _ceil_hour(since)
        if since < first:
            edges.append((since, first))
    if until is not None:
        end = _floor_hour(until)
        if end < until:
            edges.append((end, until))
    if first is not None and end is not None and first >= end:
        # The window lies within one or two partial hours: sum it all from the calls.
        return None, [(since, until)]
    hours = (
        f"{first:%Y-%m-%dT%H}" if first is not None else None,
        f"{end:%Y-%m-%dT%H}" if end is not None else None,
    )
    return hours, edges


def _floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _ceil_hour(moment: datetime) -> datetime:
    floor = _floor_hour(moment)
    return floor if floor == moment else floor + timedelta(hours=1)


# --- Sessions -----------------------------------------------------------------------------


def has_sessions(ledger: Ledger) -> bool:
    """Return True when the ledger has recorded at least one session."""
    return ledger.db.execute("SELECT EXISTS (SELECT 1 FROM sessions)").fetchone()[0] == 1


def list_sessions(ledger: Ledger, filters: Filters, limit: int | None) -> list[dict[str, Any]]:
    """Return the sessions that match, newest first, each with its whole calls and cost."""
    stale = _stale_ids(ledger) if _needs_stale(filters) else set()
    where, params = session_conditions(filters, stale)
    if filters.selects_calls:
        spans, spans_params = _spans(filters)
        where += f" AND p.id IN (SELECT session_id FROM ({spans}))"
        params.extend(spans_params)
    page = f"SELECT * FROM sessions p WHERE {where} ORDER BY p.started_at DESC, p.id DESC"
    if limit:
        page += " LIMIT ?"
        params.append(limit)
    rows = _rows(
        ledger,
        f"SELECT p.*, {_SUMS_SQL} FROM ({page}) p LEFT JOIN call_totals x "
        "ON x.session_id = p.id GROUP BY p.id ORDER BY p.started_at DESC, p.id DESC",
        params,
    )
    return [session_json(row) for row in rows]


def session_json(row: dict[str, Any]) -> dict[str, Any]:
    """Return a session row with its sums in the documented JSON shape."""
    totals = {name: row[name] for name in _SUMS}
    return {
        "session_id": row["id"],
        "task": row["task"],
        "agent": row["agent"],
        "user": row["user"],
        "team": row["team"],
        "tags": json.loads(row["tags"] or "{}"),
        "status": row["status"],
        "stale": is_stale(row),
        "end_reason": row["end_reason"],
        "exit_status": row["exit_status"],
        "max_usd": row["max_usd"],
        "max_calls": row["max_calls"],
        "calls": totals["calls"],
        "refused_calls": totals["refused_calls"],
        "tokens": {name: totals[name] for name in TOKEN_FIELDS},
        "cost_usd": decimal_string(from_pico(totals["cost_pico_usd"])),
        "cost_estimated": totals["estimated_calls"] > 0,
        "processes_stopped": row["processes_stopped"],
        "started_at": row["started_at"],
        "ended_at": row["ended_at"],
        "hostname": row["hostname"],
        "pid": row["pid"],
    }


def resolve_session(ledger: Ledger, text: str) -> str:
    """Return the id of the one session whose id is `text`, or starts or ends with it."""
    text = text.strip()
    if not text:
        raise ConfigError("invalid --session '': give a session id, such as 20261204-203015-9f2c1a")
    exact = ledger.db.execute("SELECT id FROM sessions WHERE id = ?", [text]).fetchone()
    if exact is not None:
        return exact[0]
    matches = [
        row[0]
        for row in ledger.db.execute(
            "SELECT id FROM sessions WHERE substr(id, 1, ?) = ? OR substr(id, -?) = ? "
            "ORDER BY started_at DESC LIMIT 6",
            [len(text), text, len(text), text],
        )
    ]
    if not matches:
        raise ConfigError(
            f"no session {text!r} in the ledger at {ledger.path}: "
            "`tokencap sessions` lists the recent ones"
        )
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise ConfigError(
            f"--session {text!r} matches several sessions ({shown}): give more of the id"
        )
    return matches[0]


def watched_sessions(
    ledger: Ledger, filters: Filters, ended_within: float, now: datetime
) -> list[dict[str, Any]]:
    """Return running sessions and those that ended in the last `ended_within` seconds.

    Each has its session JSON fields plus `last_model` and `last_call_at` from its newest call.
    """
    where, params = session_conditions(filters, set())
    recent = to_ledger(now - timedelta(seconds=ended_within))
    rows = _rows(
        ledger,
        f"""
        SELECT p.*, {_SUMS_SQL},
            (SELECT c.model FROM calls c WHERE c.session_id = p.id ORDER BY c.seq DESC LIMIT 1)
                AS last_model,
            (SELECT c.started_at FROM calls c WHERE c.session_id = p.id
                ORDER BY c.seq DESC LIMIT 1) AS last_call_at
        FROM sessions p LEFT JOIN call_totals x ON x.session_id = p.id
        WHERE (p.status = 'running' OR p.ended_at >= ?) AND {where}
        GROUP BY p.id
        ORDER BY p.ended_at IS NOT NULL, p.started_at DESC, p.id DESC
        """,
        [recent, *params],
    )
    return [
        session_json(row) | {"last_model": row["last_model"], "last_call_at": row["last_call_at"]}
        for row in rows
    ]


# --- One session --------------------------------------------------------------------------


def session_detail(ledger: Ledger, session_id: str) -> SessionDetail:
    """Return one session with its calls in order, each with the cumulative cost so far."""
    (row,) = _rows(
        ledger,
        f"SELECT p.*, {_SUMS_SQL} FROM sessions p LEFT JOIN call_totals x "
        "ON x.session_id = p.id WHERE p.id = ? GROUP BY p.id",
        [session_id],
    )
    session = session_json(row) | {
        "ci": json.loads(row["ci"] or "{}"),
        "command": json.loads(row["command"] or "[]"),
        "cwd": row["cwd"],
        "tokencap_version": row["tokencap_version"],
    }
    detail = SessionDetail(session)
    prompts: dict[str, dict[str, Any]] = {}
    spent = 0
    for call in _iter_rows(
        ledger, "SELECT * FROM calls WHERE session_id = ? ORDER BY seq", [session_id]
    ):
        pico = call["cost_pico_usd"] or 0
        spent += pico
        tokens = {name: call[name] or 0 for name in TOKEN_FIELDS}
        detail.calls.append(
            {
                "seq": call["seq"],
                "started_at": call["started_at"],
                "ended_at": call["ended_at"],
                "provider": call["provider"],
                "api": call["api"],
                "model": call["model"],
                "agent_prompt_id": call["agent_prompt_id"],
                "decision": call["decision"],
                "refusal_reason": call["refusal_reason"],
                "status": call["status"],
                "http_status": call["http_status"],
                "error": call["error"],
                "streamed": bool(call["streamed"]),
                "tokens": tokens,
                "usage_estimated": bool(call["usage_estimated"]),
                "cost_usd": decimal_string(from_pico(pico)),
                "cumulative_cost_usd": decimal_string(from_pico(spent)),
                "cost_estimated": bool(call["cost_estimated"]),
                "latency_ms": call["latency_ms"],
            }
        )
        if call["agent_prompt_id"] is not None:
            _add_to_prompt(prompts, call, tokens, pico)
    detail.prompts = [
        prompt | {"cost_usd": decimal_string(from_pico(prompt.pop("cost_pico_usd")))}
        for prompt in prompts.values()
    ]
    return detail


def _add_to_prompt(
    prompts: dict[str, dict[str, Any]], call: dict[str, Any], tokens: dict[str, int], pico: int
) -> None:
    prompt = prompts.setdefault(
        call["agent_prompt_id"],
        {
            "agent_prompt_id": call["agent_prompt_id"],
            "calls": 0,
            "refused_calls": 0,
            "first_seq": call["seq"],
            "last_seq": call["seq"],
            "tokens": dict.fromkeys(TOKEN_FIELDS, 0),
            "cost_pico_usd": 0,
        },
    )
    prompt["calls" if call["decision"] == "admitted" else "refused_calls"] += 1
    prompt["last_seq"] = call["seq"]
    for name, value in tokens.items():
        prompt["tokens"][name] += value
    prompt["cost_pico_usd"] += pico


# --- Helpers ------------------------------------------------------------------------------


def _needs_stale(filters: Filters) -> bool:
    return "running" in filters.statuses or "stale" in filters.statuses


def _stale_ids(ledger: Ledger) -> set[str]:
    return stale_ids(
        _rows(
            ledger,
            "SELECT id, status, hostname, pid, started_at FROM sessions WHERE status = 'running'",
            [],
        )
    )


def _rows(ledger: Ledger, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    return list(_iter_rows(ledger, sql, params))


def _iter_rows(ledger: Ledger, sql: str, params: list[Any]) -> Iterator[dict[str, Any]]:
    cursor = ledger.db.execute(sql, params)
    columns = [d[0] for d in cursor.description]
    for values in cursor:
        yield dict(zip(columns, values, strict=True))
