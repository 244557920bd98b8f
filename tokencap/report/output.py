"""Output of the report and sessions commands on stdout, in each format."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from tokencap.errors import ConfigError
from tokencap.ledger import Ledger
from tokencap.report import formats, session_view
from tokencap.report.filters import Filters
from tokencap.report.queries import (
    GroupedReport,
    Totals,
    grouped_report,
    has_sessions,
    list_sessions,
    resolve_session,
    session_detail,
)

SESSIONS_TITLE = "tokencap sessions, newest first"


def stdout_console() -> Console:
    """Return a console on stdout: colour on a terminal, plain text in a pipe or with NO_COLOR."""
    # A pipe has no width; rich would assume 80 columns and shorten every value.
    width = None if sys.stdout.isatty() else 200
    return Console(width=width, highlight=False)


def open_ledger(path: Path) -> Ledger | None:
    """Return the ledger at `path`, or None when no run has created it yet."""
    return Ledger(path, create=False) if path.exists() else None


def print_grouped(
    path: Path,
    group_by: list[str],
    filters: Filters,
    output_format: str,
    *,
    sort: str | None,
    top: int | None,
    limit: int | None,
) -> None:
    """Print spend grouped by `group_by` in `output_format`."""
    ledger = open_ledger(path)
    if ledger is None:
        report = GroupedReport(group_by, filters, [], 0, Totals.zero(), ledger_empty=True)
    else:
        try:
            filters = _resolve_sessions(ledger, filters)
            report = grouped_report(ledger, group_by, filters, sort=sort, top=top)
            if output_format == "json":
                report.sessions = list_sessions(ledger, filters, limit)
        finally:
            ledger.close()

    if output_format == "json":
        _write(formats.grouped_json(report))
    elif output_format == "csv":
        _write(formats.grouped_csv(report))
    elif report.totals.sessions == 0:
        if report.ledger_empty:
            _write(formats.NO_SESSIONS)
        else:
            _write(formats.NO_MATCH if filters.describe() else formats.NO_CALLS)
    elif output_format == "markdown":
        _write(formats.grouped_markdown(report))
    else:
        console = stdout_console()
        console.print(formats.grouped_table(report))
        for note in formats.grouped_notes(report):
            console.print(note)


def print_detail(path: Path, session_text: str, output_format: str) -> None:
    """Print one session with every call, in `output_format`."""
    ledger = open_ledger(path)
    if ledger is None:
        raise ConfigError(
            f"no session {session_text!r}: there is no ledger at {path} yet; "
            "check --db or TOKENCAP_DB"
        )
    try:
        detail = session_detail(ledger, resolve_session(ledger, session_text))
    finally:
        ledger.close()

    if output_format == "json":
        _write(session_view.detail_json(detail))
    elif output_format == "csv":
        _write(session_view.detail_csv(detail))
    elif output_format == "markdown":
        _write(session_view.detail_markdown(detail))
    else:
        console = stdout_console()
        console.print(session_view.detail_renderable(detail, console.width))


def print_sessions(path: Path, filters: Filters, output_format: str, limit: int | None) -> None:
    """Print the newest sessions that match, running and stale ones marked."""
    ledger = open_ledger(path)
    sessions = []
    empty = True
    if ledger is not None:
        try:
            filters = _resolve_sessions(ledger, filters)
            sessions = list_sessions(ledger, filters, limit)
            empty = not has_sessions(ledger)
        finally:
            ledger.close()

    if output_format == "json":
        _write(formats.sessions_json(sessions))
    elif output_format == "csv":
        _write(formats.sessions_csv(sessions))
    elif not sessions:
        _write((formats.NO_SESSIONS if empty else formats.NO_MATCH) + "\n")
    elif output_format == "markdown":
        _write(formats.sessions_markdown(sessions, SESSIONS_TITLE))
    else:
        console = stdout_console()
        console.print(formats.sessions_table(sessions, SESSIONS_TITLE))
        stale = sum(1 for session in sessions if session["stale"])
        if stale:
            console.print(
                f"{stale} stale: recorded as running, but the tokencap process is gone "
                "(killed before it could record the end)"
            )


def _resolve_sessions(ledger: Ledger, filters: Filters) -> Filters:
    """Return `filters` with each --session value replaced by the full id it names."""
    if not filters.sessions:
        return filters
    return replace(filters, sessions=tuple(resolve_session(ledger, s) for s in filters.sessions))


def _write(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
