"""`tokencap watch`: running sessions from the ledger, refreshed in place, for another terminal.

Each refresh reads the ledger anew, so it shows what every `tokencap run` on the machine has
recorded so far: spend against the dollar cap, calls against the call cap, and the last model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tokencap.ledger import Ledger
from tokencap.report.filters import Filters
from tokencap.report.formats import add_session_columns, duration, session_cells
from tokencap.report.queries import watched_sessions

_BAR_WIDTH = 10


def watch(
    path: Path,
    filters: Filters,
    console: Console,
    *,
    interval: float,
    iterations: int,
    ended_within: float,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Show running sessions every `interval` seconds, `iterations` times (0: until Ctrl-C).

    On a terminal the table is redrawn in place; otherwise each refresh is printed in turn,
    so that a log shows the history.
    """
    frames = _Frames(path, filters, ended_within)
    count = 1
    if console.is_terminal:
        with Live(frames.render(clock()), console=console, auto_refresh=False) as live:
            while not iterations or count < iterations:
                time.sleep(interval)
                live.update(frames.render(clock()), refresh=True)
                count += 1
        return

    console.print(frames.render(clock()))
    while not iterations or count < iterations:
        time.sleep(interval)
        console.print(frames.render(clock()))
        count += 1


class _Frames:
    """Renders the watch table, opening the ledger once it exists."""

    def __init__(self, path: Path, filters: Filters, ended_within: float) -> None:
        self.path = path
        self.filters = filters
        self.ended_within = ended_within
        self.ledger: Ledger | None = None

    def render(self, now: datetime) -> RenderableType:
        if self.ledger is None:
            if not self.path.exists():
                return Text(f"No ledger at {self.path} yet; waiting for a `tokencap run`.")
            self.ledger = Ledger(self.path, create=False)
        sessions = watched_sessions(self.ledger, self.filters, self.ended_within, now)
        return watch_table(sessions, now)


def watch_table(sessions: list[dict[str, Any]], now: datetime) -> Table:
    """Return running sessions, and those that ended a moment ago dimmed, as a table."""
    running = [s for s in sessions if s["status"] == "running" and not s["stale"]]
    table = Table(
        title=f"tokencap watch · {len(running)} running · {now:%H:%M:%S} UTC",
        title_justify="left",
        caption=None
        if sessions
        else "No sessions running. Sessions appear here when `tokencap run` starts them.",
        caption_justify="left",
    )
    add_session_columns(table)
    table.add_column("of cap", no_wrap=True)
    table.add_column("last model")
    table.add_column("last call", justify="right", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)

    for session in sessions:
        active = session["status"] == "running" and not session["stale"]
        table.add_row(
            *session_cells(session),
            spend_bar(session),
            session["last_model"] or "",
            _ago(session["last_call_at"], now),
            duration(session["started_at"], session["ended_at"], now)
            if not session["stale"]
            else "",
            style="" if active else "dim",
        )
    if any(s["stale"] for s in sessions):
        table.caption = (
            "stale: recorded as running, but its tokencap process is gone from this host"
        )
    return table


def spend_bar(session: dict[str, Any]) -> Text:
    """Return a bar of spend against the dollar cap, such as `██████░░░░ 61%`."""
    if session["max_usd"] is None:
        return Text("no dollar cap", style="dim")
    cap = Decimal(session["max_usd"])
    share = Decimal(session["cost_usd"]) / cap if cap > 0 else Decimal(1)
    filled = min(_BAR_WIDTH, int(share * _BAR_WIDTH))
    style = "green"
    if share >= 1:
        style = "red"
    elif share >= Decimal("0.8"):
        style = "yellow"
    bar = Text("█" * filled, style=style)
    bar.append("░" * (_BAR_WIDTH - filled), style="dim")
    bar.append(f" {share * 100:.0f}%")
    return bar


def _ago(iso: str | None, now: datetime) -> str:
    if not iso:
        return ""
    seconds = (now - datetime.fromisoformat(iso)).total_seconds()
    return f"{max(seconds, 0):.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"
