"""Budgets that outlive one run: per task across all its runs, per team or user per window.

Several `tokencap run` processes may draw on one budget at the same moment, so admission
happens in the ledger. In one `BEGIN IMMEDIATE` transaction a process adds up what the
budget's calls have cost in the window and what calls in flight have reserved, and inserts a
reservation for its own call if that fits. SQLite runs one such transaction at a time, so two
runs cannot both take the last of a budget. A reservation stays in `budget_reservations` until
its call's cost is in `calls`, and reservations of processes that died are dropped by the next
admission.

Windows roll: "day" is the last 24 hours, "week" the last 7 days, "month" the last 30 days,
and "total" has no start. A call belongs to the window in which it was admitted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil

from tokencap.caps import Refusal, money
from tokencap.errors import LedgerError
from tokencap.ledger import Ledger
from tokencap.prices import from_pico, to_pico

logger = logging.getLogger(__name__)

SCOPES = ("task", "team", "user")

WINDOWS: dict[str, timedelta | None] = {
    "total": None,
    "day": timedelta(days=1),
    "week": timedelta(days=7),
    "month": timedelta(days=30),
}

_WINDOW_PHRASES = {
    "total": "in total",
    "day": "in the last 24 hours",
    "week": "in the last 7 days",
    "month": "in the last 30 days",
}

# A reservation written under another host name, such as a container sharing the ledger file,
# cannot be checked for a live process, so it is dropped once it is this old.
FOREIGN_RESERVATION_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True, slots=True)
class BudgetRule:
    """A limit on the spend or calls of every run of one task, team or user."""

    scope: str  # "task", "team" or "user"
    name: str  # the task, team or user; "*" stands for every team or user without a rule
    window: str  # a key of WINDOWS
    max_usd: Decimal | None = None
    max_calls: int | None = None
    source: str = ""  # where the rule was set, such as "tokencap.toml:12"

    @property
    def cap(self) -> str:
        """Return the id recorded as the refusal reason, such as "team_budget:platform/day"."""
        return f"{self.scope}_budget:{self.name}/{self.window}"

    @property
    def label(self) -> str:
        """Return the name people read, such as "team budget platform/day"."""
        return f"{self.scope} budget {self.name}/{self.window}"

    def since(self, now: datetime) -> str:
        """Return the window's start as the ledger writes times; "" when it has no start."""
        length = WINDOWS[self.window]
        if length is None:
            return ""
        return (now - length).isoformat(timespec="milliseconds")


def applicable(
    rules: Iterable[BudgetRule], *, task: str | None, team: str | None, user: str | None
) -> list[BudgetRule]:
    """Return the rules that bind a run with this attribution, with "*" replaced by its name.

    A "*" rule applies to a team or user that has no rule of its own for any window.
    """
    rules = list(rules)
    result = []
    for scope, value in (("task", task), ("team", team), ("user", user)):
        if not value:
            continue
        own = [r for r in rules if r.scope == scope and r.name == value]
        if not own:
            own = [replace(r, name=value) for r in rules if r.scope == scope and r.name == "*"]
        result.extend(own)
    return result


def concrete(
    rules: Iterable[BudgetRule], *, team: str | None = None, user: str | None = None
) -> list[BudgetRule]:
    """Return every rule with a name, plus the "*" rules as they apply to `team` and `user`."""
    rules = list(rules)
    result = [r for r in rules if r.name != "*"]
    for rule in applicable(rules, task=None, team=team, user=user):
        if rule not in result:
            result.append(rule)
    return result


# --- Usage in the ledger -------------------------------------------------------------------


@dataclass(slots=True)
class BudgetUsage:
    """Settled spend and calls in one budget's window, and the calls still in flight."""

    spent_pico: int = 0
    calls: int = 0
    in_flight_pico: int = 0
    in_flight_calls: int = 0

    @property
    def committed_pico(self) -> int:
        """Return spend plus reservations: what admission must leave room beside."""
        return self.spent_pico + self.in_flight_pico


_COLUMNS = {"task": "task", "team": "team", "user": '"user"'}


def read_usage(
    conn: sqlite3.Connection, rules: Iterable[BudgetRule], now: datetime
) -> dict[BudgetRule, BudgetUsage]:
    """Return each rule's usage: its window's calls plus the reservations of its scope.

    Whole hours of the window come from `budget_spend`, which triggers keep in step with
    `calls`. The part of the window's first hour that falls inside it comes from `calls`.
    Costs of calls in flight are not in `calls` yet, so their reservations count instead. A
    settled reservation counts as spend until it is deleted right after its cost is written
    to `calls`. For that moment the call may count twice, but never zero times.
    """
    result: dict[BudgetRule, BudgetUsage] = {}
    reservations: dict[tuple[str, str], tuple[int, int, int, int]] = {}
    for rule in rules:
        scope = (rule.scope, rule.name)
        if scope not in reservations:
            reservations[scope] = _reservations(conn, rule)
        spent, calls = _window_spend(conn, rule, now)
        settled_pico, settled_calls, in_flight_pico, in_flight_calls = reservations[scope]
        result[rule] = BudgetUsage(
            spent_pico=spent + settled_pico,
            calls=calls + settled_calls,
            in_flight_pico=in_flight_pico,
            in_flight_calls=in_flight_calls,
        )
    return result


def _window_spend(conn: sqlite3.Connection, rule: BudgetRule, now: datetime) -> tuple[int, int]:
    """Return the settled spend in picodollars and the calls of a rule's window."""
    since = rule.since(now)
    if not since:
        row = conn.execute(
            "SELECT COALESCE(SUM(spent_pico_usd), 0), COALESCE(SUM(calls), 0) "
            "FROM budget_spend WHERE scope = ? AND name = ?",
            [rule.scope, rule.name],
        ).fetchone()
        return row[0], row[1]

    first_hour = datetime.fromisoformat(since).replace(minute=0, second=0, microsecond=0)
    next_hour = (first_hour + timedelta(hours=1)).isoformat(timespec="milliseconds")
    hours = conn.execute(
        "SELECT COALESCE(SUM(spent_pico_usd), 0), COALESCE(SUM(calls), 0) "
        "FROM budget_spend WHERE scope = ? AND name = ? AND hour >= ?",
        [rule.scope, rule.name, next_hour[:13]],
    ).fetchone()
    edge = conn.execute(
        "SELECT COALESCE(SUM(c.cost_pico_usd), 0), COUNT(c.id) FILTER (WHERE c.status != 'sent') "
        "FROM calls c JOIN sessions s ON s.id = c.session_id "
        f"WHERE c.started_at >= ? AND c.started_at < ? AND s.{_COLUMNS[rule.scope]} = ? "
        "AND c.decision = 'admitted'",
        [since, next_hour, rule.name],
    ).fetchone()
    return hours[0] + edge[0], hours[1] + edge[1]


def _reservations(conn: sqlite3.Connection, rule: BudgetRule) -> tuple[int, int, int, int]:
    """Return settled and in-flight reservations of a rule's scope: picodollars and calls."""
    row = conn.execute(
        "SELECT COALESCE(SUM(r.reserved_pico_usd) FILTER (WHERE r.settled = 1), 0), "
        "COUNT(*) FILTER (WHERE r.settled = 1), "
        "COALESCE(SUM(r.reserved_pico_usd) FILTER (WHERE r.settled = 0), 0), "
        "COUNT(*) FILTER (WHERE r.settled = 0) "
        "FROM budget_reservations r JOIN sessions s ON s.id = r.session_id "
        f"WHERE s.{_COLUMNS[rule.scope]} = ?",
        [rule.name],
    ).fetchone()
    return row[0], row[1], row[2], row[3]


def remaining(
    conn: sqlite3.Connection | None, rules: Iterable[BudgetRule], now: datetime | None = None
) -> list[dict[str, Any]]:
    """Return each budget's limits, usage and what remains, as JSON-ready plain data.

    Amounts are decimal strings; a limit that is not set, and what remains of it, are None.
    Pass `conn=None` when there is no ledger yet: nothing has been spent.
    """
    rules = list(rules)
    now = now or datetime.now(UTC)
    usage = read_usage(conn, rules, now) if conn is not None and rules else {}
    result = []
    for rule in rules:
        used = usage.get(rule, BudgetUsage())
        result.append(
            {
                "budget": rule.cap,
                "label": rule.label,
                "scope": rule.scope,
                "name": rule.name,
                "window": rule.window,
                "since": rule.since(now) or None,
                "max_usd": None if rule.max_usd is None else str(rule.max_usd),
                "spent_usd": _decimal_text(used.spent_pico),
                "in_flight_usd": _decimal_text(used.in_flight_pico),
                "remaining_usd": (
                    None
                    if rule.max_usd is None
                    else _decimal_text(max(0, to_pico(rule.max_usd) - used.committed_pico))
                ),
                "max_calls": rule.max_calls,
                "calls": used.calls,
                "in_flight_calls": used.in_flight_calls,
                "remaining_calls": (
                    None
                    if rule.max_calls is None
                    else max(0, rule.max_calls - used.calls - used.in_flight_calls)
                ),
                "source": rule.source,
            }
        )
    return result


def status(
    db_path: Path,
    rules: Iterable[BudgetRule],
    *,
    team: str | None,
    user: str | None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Return what remains of every budget in a ledger file, as `remaining` does.

    Budgets for every team or user ("*") are reported for `team` and `user`. A ledger file
    that does not exist yet has spent nothing.
    """
    rules = concrete(rules, team=team, user=user)
    if not db_path.exists():
        return remaining(None, rules, now)
    ledger = Ledger(db_path)
    try:
        return remaining(ledger.db.conn, rules, now)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read the budgets from the ledger at {db_path}: {exc}") from exc
    finally:
        ledger.close()


# --- Admission -----------------------------------------------------------------------------


class LedgerBudgets:
    """Admits one session's calls against budgets shared with other runs through the ledger.

    It implements `tokencap.caps.SharedBudgets`: the session's `Budget` calls it after its own
    caps pass. Methods run on the proxy's event loop thread, each as a short transaction on a
    connection of its own. A SQLite lock held by another process delays an admission by at
    most the busy timeout of 30 seconds, after which the call is refused.
    """

    def __init__(self, db_path: Path, session_id: str, rules: list[BudgetRule]) -> None:
        self.rules = rules
        self.limits_usd = any(rule.max_usd is not None for rule in rules)
        self.session_id = session_id
        try:
            self._conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
            # As the ledger's own connection: WAL survives a crash of tokencap without a sync
            # at every commit.
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the ledger at {db_path}: {exc}") from exc
        self._owner = _current_process()
        self._held: dict[str, int] = {}  # picodollars each call of ours has reserved now
        self._settled: list[str] = []  # calls whose settled reservations are still to delete

    def exhausted(self, now: datetime | None = None) -> Refusal | None:
        """Return a refusal when a budget is already used up, before the agent starts."""
        now = now or datetime.now(UTC)
        try:
            usage = read_usage(self._conn, self.rules, now)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read the budgets from the ledger: {exc}") from exc
        for rule in self.rules:
            used = usage[rule]
            if rule.max_usd is not None and used.spent_pico >= to_pico(rule.max_usd):
                return _refusal(
                    rule,
                    f"{rule.label}: ${_usd(used.spent_pico)} of ${money(rule.max_usd)} "
                    f"already spent {_WINDOW_PHRASES[rule.window]}",
                )
            if rule.max_calls is not None and used.calls >= rule.max_calls:
                return _refusal(
                    rule,
                    f"{rule.label}: {used.calls} of {rule.max_calls} calls already made "
                    f"{_WINDOW_PHRASES[rule.window]}",
                )
        return None

    def reserve(self, key: str, estimate_usd: Decimal) -> Refusal | None:
        """Reserve `estimate_usd` in the ledger for a call, or return which budget it would pass."""
        estimate = to_pico(estimate_usd)
        with self._immediate():
            self._delete_settled()
            _drop_stale_reservations(self._conn, self._owner)
            usage = read_usage(self._conn, self.rules, datetime.now(UTC))
            for rule in self.rules:
                refusal = _admission_refusal(rule, usage[rule], estimate)
                if refusal is not None:
                    return refusal
            self._conn.execute(
                "INSERT INTO budget_reservations (session_id, call_key, pid, pid_started, "
                "hostname, reserved_pico_usd, settled, created_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                [self.session_id, key, *self._owner, estimate, _now_iso()],
            )
        self._held[key] = estimate
        return None

    def update_running(self, key: str, running_usd: Decimal) -> Refusal | None:
        """Raise a stream's reservation when its running cost passes it; refuse past a budget.

        The reservation grows to twice the running cost, or to all the room left, so that a
        long stream touches the ledger a few times rather than at every event.
        """
        held = self._held.get(key)
        running = to_pico(running_usd)
        if held is None or running <= held:
            return None
        try:
            with self._immediate():
                usage = read_usage(self._conn, self.rules, datetime.now(UTC))
                target = 2 * running
                refusal = None
                for rule in self.rules:
                    if rule.max_usd is None:
                        continue
                    room = to_pico(rule.max_usd) - (usage[rule].committed_pico - held)
                    if room < running:
                        refusal = _refusal(
                            rule,
                            f"{rule.label}: "
                            f"${_usd(usage[rule].committed_pico - held + running)} of "
                            f"${money(rule.max_usd)} spent or in flight "
                            f"{_WINDOW_PHRASES[rule.window]}, reached mid-stream",
                        )
                        target = running
                        break
                    target = min(target, room)
                self._set_reservation(key, target)
        except sqlite3.Error as exc:
            # Fail closed: a stream whose cost cannot be reserved is cut.
            logger.exception("could not extend the budget reservation of call %s", key)
            return Refusal("tokencap_error", f"could not update the budgets in the ledger: {exc}")
        self._held[key] = target
        return refusal

    def settle(self, key: str, cost_usd: Decimal) -> Refusal | None:
        """Replace a call's reservation by its cost; return a refusal if that used a budget up."""
        if self._held.pop(key, None) is None:
            return None
        try:
            self._set_reservation(key, to_pico(cost_usd), settled=True)
            self._settled.append(key)
            self._delete_settled_soon()
            usage = read_usage(self._conn, self.rules, datetime.now(UTC))
        except sqlite3.Error:
            # The call is over. Its reservation keeps counting what it held until the next
            # admission, which fails closed if the ledger is still unusable.
            logger.exception("could not settle the budget reservation of call %s", key)
            return None
        for rule in self.rules:
            spent = usage[rule].spent_pico
            if rule.max_usd is not None and spent >= to_pico(rule.max_usd):
                return _refusal(
                    rule,
                    f"{rule.label}: ${_usd(spent)} of ${money(rule.max_usd)} spent "
                    f"{_WINDOW_PHRASES[rule.window]}",
                )
        return None

    def close(self) -> None:
        """Delete this session's reservations and close the connection."""
        try:
            self._conn.execute(
                "DELETE FROM budget_reservations WHERE session_id = ?", [self.session_id]
            )
        except sqlite3.Error:
            logger.exception("could not delete the budget reservations of %s", self.session_id)
        self._conn.close()

    # --- Helpers ---------------------------------------------------------------------------

    @contextmanager
    def _immediate(self) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the write lock before reading, so no other process can admit
        # a call between this one's read and its insert.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _set_reservation(self, key: str, pico: int, settled: bool = False) -> None:
        self._conn.execute(
            "UPDATE budget_reservations SET reserved_pico_usd = ?, settled = ? "
            "WHERE session_id = ? AND call_key = ?",
            [pico, int(settled), self.session_id, key],
        )

    def _delete_settled_soon(self) -> None:
        # The proxy writes the call's cost to `calls` right after settling, in the same
        # event-loop callback, so a callback scheduled now runs once the cost is on disk.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # outside the proxy: the next admission or close deletes them
        loop.call_soon(self._delete_settled_logged)

    def _delete_settled_logged(self) -> None:
        try:
            self._delete_settled()
        except sqlite3.Error:
            logger.exception("could not delete settled budget reservations; will retry")

    def _delete_settled(self) -> None:
        if not self._settled:
            return
        keys, self._settled = self._settled, []
        try:
            self._conn.executemany(
                "DELETE FROM budget_reservations WHERE session_id = ? AND call_key = ?",
                [(self.session_id, key) for key in keys],
            )
        except sqlite3.Error:
            self._settled.extend(keys)
            raise


def _admission_refusal(rule: BudgetRule, used: BudgetUsage, estimate_pico: int) -> Refusal | None:
    window = _WINDOW_PHRASES[rule.window]
    if rule.max_calls is not None and used.calls + used.in_flight_calls + 1 > rule.max_calls:
        in_flight = f" and {used.in_flight_calls} in flight" if used.in_flight_calls else ""
        return _refusal(
            rule,
            f"{rule.label}: {used.calls} of {rule.max_calls} calls made {window}{in_flight}",
        )
    if rule.max_usd is not None and used.committed_pico + estimate_pico > to_pico(rule.max_usd):
        return _refusal(
            rule,
            f"{rule.label}: ${_usd(used.spent_pico)} spent {window}, "
            f"${_usd(used.in_flight_pico)} in flight, next call estimated at "
            f"${_usd(estimate_pico)}, budget ${money(rule.max_usd)}",
        )
    return None


def _refusal(rule: BudgetRule, message: str) -> Refusal:
    return Refusal(rule.cap, message, label=rule.label)


def _decimal_text(pico: int) -> str:
    # Without "f", Decimal writes amounts below a millionth in exponent form.
    return f"{from_pico(pico):f}"


def _usd(pico: int) -> str:
    return money(from_pico(pico))


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# --- Stale reservations --------------------------------------------------------------------


def _current_process() -> tuple[int, float, str]:
    """Return this process's pid, start time and host name, which identify its reservations."""
    return os.getpid(), psutil.Process().create_time(), os.uname().nodename


def _drop_stale_reservations(conn: sqlite3.Connection, owner: tuple[int, float, str]) -> None:
    """Delete the reservations of processes that no longer run, such as a SIGKILLed tokencap."""
    rows = conn.execute(
        "SELECT pid, pid_started, hostname, MAX(created_at) FROM budget_reservations "
        "GROUP BY pid, pid_started, hostname"
    ).fetchall()
    foreign_cutoff = (datetime.now(UTC) - FOREIGN_RESERVATION_TIMEOUT).isoformat(
        timespec="milliseconds"
    )
    for pid, started, hostname, newest in rows:
        if (pid, started, hostname) == owner:
            continue
        if hostname == owner[2]:
            # NOTE: a process in another PID namespace with the same host name looks dead here.
            stale = not _process_alive(pid, started)
        else:
            stale = newest < foreign_cutoff
        if stale:
            logger.info("dropping budget reservations of pid %d on %s, which ended", pid, hostname)
            conn.execute(
                "DELETE FROM budget_reservations "
                "WHERE pid = ? AND pid_started = ? AND hostname = ?",
                [pid, started, hostname],
            )


def _process_alive(pid: int, started: float) -> bool:
    # The start time tells a reused pid from the process that wrote the reservation.
    try:
        process = psutil.Process(pid)
        return (
            abs(process.create_time() - started) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
