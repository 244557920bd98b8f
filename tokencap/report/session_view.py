"""One session in detail: attribution, caps and outcome, every call in order, and a chart.

Calls are listed in the order tokencap saw them. Consecutive calls that carry the same agent
prompt id form one section, and a second table sums the calls of each prompt id, so the fan-out
of one prompt into many calls is visible.
"""

from __future__ import annotations

import json
import shlex
from decimal import Decimal
from typing import Any

from rich.console import Group as RenderGroup
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from tokencap.prices import to_pico
from tokencap.report.chart import spend_chart
from tokencap.report.formats import (
    ESTIMATED_NOTE,
    all_input_tokens,
    calls_against_cap,
    cost_against_cap,
    csv_text,
    duration,
    markdown_table,
    money,
    number,
    session_status,
    status_text,
    when,
)
from tokencap.report.queries import TOKEN_FIELDS, SessionDetail

USAGE_ESTIMATED_NOTE = (
    "~ output counted from the stream as it passed; the provider sent no final count"
)
_CALL_STYLES = {
    "ok": "",
    "refused": "red",
    "cut": "red",
    "upstream_error": "yellow",
    "dropped": "yellow",
    "garbled": "yellow",
    "sent": "cyan",
}


def prompt_labels(detail: SessionDetail) -> dict[str, str]:
    """Return a short label (P1, P2, ...) for each agent prompt id, in order of first use."""
    return {prompt["agent_prompt_id"]: f"P{i}" for i, prompt in enumerate(detail.prompts, start=1)}


def facts(detail: SessionDetail) -> list[tuple[str, str]]:
    """Return the session's attribution, caps and outcome as (label, value) pairs."""
    session = detail.session
    tokens = session["tokens"]
    pairs = [
        ("session", session["session_id"]),
        ("status", session_status(session)),
        ("task", session["task"] or ""),
        ("agent", session["agent"] or ""),
        ("user", session["user"] or ""),
        ("team", session["team"] or ""),
        ("tags", ", ".join(f"{k}={v}" for k, v in session["tags"].items())),
        ("command", shlex.join(session["command"])),
        ("directory", session["cwd"] or ""),
        ("host", f"{session['hostname'] or '?'} (tokencap pid {session['pid']})"),
        ("ci", ", ".join(f"{k}={v}" for k, v in session["ci"].items())),
        ("started", f"{when(session['started_at'])} UTC"),
    ]
    if session["ended_at"]:
        took = duration(session["started_at"], session["ended_at"])
        pairs.append(("ended", f"{when(session['ended_at'])} UTC, after {took}"))
    pairs += [
        ("calls", calls_against_cap(session)),
        ("spend", _spend_against_cap(session)),
        (
            "tokens",
            f"input {number(tokens['input_tokens'])} · "
            f"cache read {number(tokens['cache_read_tokens'])} · "
            f"cache write {number(tokens['cache_write_5m_tokens'])} (5m), "
            f"{number(tokens['cache_write_1h_tokens'])} (1h) · "
            f"output {number(tokens['output_tokens'])} · "
            f"reasoning {number(tokens['reasoning_tokens'])}",
        ),
        ("end", _outcome(session)),
    ]
    return [(label, value) for label, value in pairs if value]


def _spend_against_cap(session: dict[str, Any]) -> str:
    text = cost_against_cap(session)
    if session["max_usd"] is not None and Decimal(session["max_usd"]) > 0:
        share = Decimal(session["cost_usd"]) / Decimal(session["max_usd"]) * 100
        text += f" ({share:.1f}%)"
    return text


def _outcome(session: dict[str, Any]) -> str:
    if session["status"] == "running":
        if session["stale"]:
            return "none recorded: the tokencap process is gone (killed), so the session is stale"
        return "still running"
    parts = [session["end_reason"] or session["status"]]
    if session["exit_status"] is not None:
        parts.append(f"exit status {session['exit_status']}")
    if session["processes_stopped"]:
        stopped = session["processes_stopped"]
        parts.append(f"{stopped} process{'es' if stopped != 1 else ''} stopped")
    return ", ".join(parts)


def cumulative_chart(detail: SessionDetail, width: int) -> Text:
    """Return the chart of spend after each call sent upstream, against the session's caps."""
    session = detail.session
    cumulative = []
    spent = 0
    for call in detail.calls:
        if call["decision"] == "admitted":
            spent += to_pico(Decimal(call["cost_usd"]))
            cumulative.append(spent)
    cap = to_pico(Decimal(session["max_usd"])) if session["max_usd"] is not None else None
    return spend_chart(cumulative, cap, session["max_calls"], width=max(20, min(width, 72)))


# --- Terminal -----------------------------------------------------------------------------


def detail_renderable(detail: SessionDetail, width: int) -> RenderableType:
    """Return the session's facts, prompt table, call table and chart for a rich console."""
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    for label, value in facts(detail):
        header.add_row(label, status_text(detail.session) if label == "status" else value)

    parts: list[RenderableType] = [header, Text()]
    if detail.prompts:
        parts += [_prompts_table(detail), Text()]
    if detail.calls:
        parts.append(_calls_table(detail))
        notes = _notes(detail)
        parts += [Text(note, style="dim") for note in notes]
        parts += [Text(), Text("Cumulative spend per call", style="bold")]
        parts.append(cumulative_chart(detail, width - 14))
    else:
        parts.append(Text("No model calls were recorded in this session."))
    return RenderGroup(*parts)


def _prompts_table(detail: SessionDetail) -> Table:
    table = Table(title="Calls per agent prompt id", title_justify="left")
    for header in ("prompt", "agent prompt id"):
        table.add_column(header, overflow="fold")
    for header in ("calls", "first", "last", "input", "output", "cost"):
        table.add_column(header, justify="right", no_wrap=True)
    labels = prompt_labels(detail)
    for prompt in detail.prompts:
        tokens = prompt["tokens"]
        calls = number(prompt["calls"])
        if prompt["refused_calls"]:
            calls += f" (+{prompt['refused_calls']} refused)"
        table.add_row(
            labels[prompt["agent_prompt_id"]],
            prompt["agent_prompt_id"],
            calls,
            f"#{prompt['first_seq']}",
            f"#{prompt['last_seq']}",
            number(all_input_tokens(tokens)),
            number(tokens["output_tokens"]),
            money(prompt["cost_usd"]),
        )
    return table


def _calls_table(detail: SessionDetail) -> Table:
    labels = prompt_labels(detail)
    reasoning = any(call["tokens"]["reasoning_tokens"] for call in detail.calls)
    table = Table(title="Calls in order", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("time (UTC)", no_wrap=True)
    if labels:
        table.add_column("prompt")
    table.add_column("model")
    for header in ("input", "cache read", "cache write", "output"):
        table.add_column(header, justify="right")
    if reasoning:
        table.add_column("reasoning", justify="right")
    table.add_column("cost", justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    table.add_column("status")

    previous = None
    for call in detail.calls:
        label = labels.get(call["agent_prompt_id"], "") if call["agent_prompt_id"] else ""
        if previous is not None and label != previous:
            table.add_section()
        previous = label
        tokens = call["tokens"]
        row = [str(call["seq"]), (call["started_at"] or "")[11:23]]
        if labels:
            row.append(label)
        row += [
            call["model"] or "",
            number(tokens["input_tokens"]),
            number(tokens["cache_read_tokens"]),
            number(tokens["cache_write_5m_tokens"] + tokens["cache_write_1h_tokens"]),
            ("~" if call["usage_estimated"] else "") + number(tokens["output_tokens"]),
        ]
        if reasoning:
            row.append(number(tokens["reasoning_tokens"]))
        row += [
            money(call["cost_usd"]) + ("*" if call["cost_estimated"] else ""),
            money(call["cumulative_cost_usd"]),
            Text(call_status(call), style=_CALL_STYLES.get(call["status"], "")),
        ]
        table.add_row(*row)
    return table


def call_status(call: dict[str, Any]) -> str:
    """Return a call's outcome for reading: ok, refused (max_usd), upstream_error 429, ..."""
    if call["decision"] == "refused":
        return f"refused ({call['refusal_reason']})" if call["refusal_reason"] else "refused"
    if call["status"] == "sent":
        return "in flight"
    if call["status"] == "upstream_error" and call["http_status"]:
        return f"upstream_error {call['http_status']}"
    return call["status"] or ""


def _notes(detail: SessionDetail) -> list[str]:
    notes = []
    if any(call["cost_estimated"] for call in detail.calls):
        notes.append(ESTIMATED_NOTE)
    if any(call["usage_estimated"] for call in detail.calls):
        notes.append(USAGE_ESTIMATED_NOTE)
    return notes


# --- Machine formats ----------------------------------------------------------------------


def detail_json(detail: SessionDetail) -> str:
    return json.dumps(
        {"session": detail.session, "calls": detail.calls, "prompts": detail.prompts}, indent=2
    )


_CALL_CSV = (
    "seq",
    "started_at",
    "ended_at",
    "provider",
    "api",
    "model",
    "agent_prompt_id",
    "decision",
    "refusal_reason",
    "status",
    "http_status",
    "streamed",
    *TOKEN_FIELDS,
    "usage_estimated",
    "cost_usd",
    "cumulative_cost_usd",
    "cost_estimated",
    "latency_ms",
)


def detail_csv(detail: SessionDetail) -> str:
    """Return one CSV row per call, in order."""
    rows = [[(call | call["tokens"])[name] for name in _CALL_CSV] for call in detail.calls]
    return csv_text(_CALL_CSV, rows)


def _markdown_text(value: str) -> str:
    # Attribution is free text; backslash-escape the characters markdown would format.
    return "".join("\\" + c if c in "\\`*_[]<>|" else c for c in value)


def detail_markdown(detail: SessionDetail) -> str:
    """Return the session as markdown: facts, calls per prompt id, every call and the chart."""
    sections = [
        f"### tokencap session `{detail.session['session_id']}`",
        facts_markdown(detail),
        prompts_markdown(detail),
        calls_markdown(detail),
        chart_markdown(detail),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def facts_markdown(detail: SessionDetail, leave_out: tuple[str, ...] = ()) -> str:
    """Return the session's facts, but its id and the labels in `leave_out`, as a list."""
    return "\n".join(
        f"- **{label}:** {_markdown_text(value)}"
        for label, value in facts(detail)[1:]
        if label not in leave_out
    )


def prompts_markdown(detail: SessionDetail) -> str:
    """Return the calls per agent prompt id as a markdown table, or '' when none was recorded."""
    if not detail.prompts:
        return ""
    labels = prompt_labels(detail)
    rows = [
        [
            labels[p["agent_prompt_id"]],
            f"`{p['agent_prompt_id']}`",
            number(p["calls"]),
            number(p["refused_calls"]),
            f"#{p['first_seq']}–#{p['last_seq']}",
            money(p["cost_usd"]),
        ]
        for p in detail.prompts
    ]
    headers = ["prompt", "agent prompt id", "calls", "refused", "calls #", "cost"]
    return "#### Calls per agent prompt id\n\n" + markdown_table(headers, rows, "llrrlr")


def calls_markdown(detail: SessionDetail, limit: int | None = None) -> str:
    """Return the calls in order as a markdown table, the first `limit` of them when given."""
    if not detail.calls:
        return "No model calls were recorded in this session."
    listed = detail.calls if limit is None else detail.calls[:limit]
    labels = prompt_labels(detail)
    rows = [
        [
            call["seq"],
            (call["started_at"] or "")[11:23],
            labels.get(call["agent_prompt_id"], ""),
            call["model"] or "",
            number(all_input_tokens(call["tokens"])),
            number(call["tokens"]["output_tokens"]),
            money(call["cost_usd"]) + ("\\*" if call["cost_estimated"] else ""),
            money(call["cumulative_cost_usd"]),
            call_status(call),
        ]
        for call in listed
    ]
    headers = ["#", "time (UTC)", "prompt", "model", "input", "output", "cost", "total", "status"]
    text = "#### Calls\n\n" + markdown_table(headers, rows, "rlllrrrrl")
    if len(listed) < len(detail.calls):
        text += (
            f"\n\n{len(detail.calls) - len(listed)} more calls: "
            f"`tokencap report --session {detail.session['session_id']}` lists them all."
        )
    return text


def chart_markdown(detail: SessionDetail) -> str:
    """Return the cumulative spend chart in a fenced text block, or '' without calls."""
    if not detail.calls:
        return ""
    chart = cumulative_chart(detail, 60).plain
    return f"#### Cumulative spend per call\n\n```text\n{chart}\n```"
