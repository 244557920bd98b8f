"""The SQLite ledger: one row per session, one row per model call.

The file is shared by every `tokencap run` on the machine, so it runs in WAL mode and each
write is its own short transaction. A call row is committed before the proxy responds to the
agent, so killing tokencap loses no call whose response was already delivered.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from tokencap.errors import ConfigError, LedgerError

MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


def migration(fn: Callable[[sqlite_utils.Database], None]):
    """Register a schema change; migrations run once each, in the order they are defined."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_sessions_and_calls(db: sqlite_utils.Database) -> None:
    db["sessions"].create(
        {
            "id": str,
            "task": str,
            "agent": str,
            "user": str,
            "team": str,
            "tags": str,  # JSON object
            "ci": str,  # JSON object
            "command": str,  # JSON array
            "cwd": str,
            "hostname": str,
            "pid": int,
            "max_usd": str,
            "max_calls": int,
            "started_at": str,
            "ended_at": str,
            "status": str,
            "end_reason": str,
            "exit_status": int,
            "processes_stopped": int,
            "tokencap_version": str,
        },
        pk="id",
    )
    db["sessions"].create_index(["started_at"])
    db["sessions"].create_index(["task"])

    db["calls"].create(
        {
            "id": int,
            "session_id": str,
            "seq": int,
            "started_at": str,
            "ended_at": str,
            "provider": str,
            "api": str,
            "method": str,
            "path": str,
            "model": str,
            "upstream_request_id": str,
            "agent_prompt_id": str,
            "decision": str,  # admitted | refused
            "refusal_reason": str,
            "http_status": int,
            # sent (in flight) | ok | upstream_error | cut | dropped | garbled | refused
            "status": str,
            "error": str,
            "streamed": int,
            "input_tokens": int,
            "cache_read_tokens": int,
            "cache_write_5m_tokens": int,
            "cache_write_1h_tokens": int,
            "output_tokens": int,
            "reasoning_tokens": int,
            "usage_estimated": int,
            "estimate_usd": str,
            "cost_usd": str,
            "cost_pico_usd": int,
            "cost_estimated": int,
            "price_source": str,
            "latency_ms": float,
            "ttfb_ms": float,
        },
        pk="id",
        foreign_keys=[("session_id", "sessions", "id")],
    )
    db["calls"].create_index(["session_id", "seq"], unique=True)
    db["calls"].create_index(["started_at"])
    db["calls"].create_index(["model"])


# The sums that reports read, per session, UTC hour, provider and model. Summing a million call
# rows takes SQLite seconds; summing this table takes milliseconds.
CALL_TOTALS_KEY = {
    "session_id": "{row}.session_id",
    "hour": "COALESCE(substr({row}.started_at, 1, 13), '')",
    "provider": "COALESCE({row}.provider, '')",
    "model": "COALESCE({row}.model, '')",
}
CALL_TOTALS_SUMS = {
    "call_rows": "1",
    "calls": "{row}.decision IS 'admitted'",
    "refused_calls": "{row}.decision IS 'refused'",
    "input_tokens": "COALESCE({row}.input_tokens, 0)",
    "cache_read_tokens": "COALESCE({row}.cache_read_tokens, 0)",
    "cache_write_5m_tokens": "COALESCE({row}.cache_write_5m_tokens, 0)",
    "cache_write_1h_tokens": "COALESCE({row}.cache_write_1h_tokens, 0)",
    "output_tokens": "COALESCE({row}.output_tokens, 0)",
    "reasoning_tokens": "COALESCE({row}.reasoning_tokens, 0)",
    "cost_pico_usd": "COALESCE({row}.cost_pico_usd, 0)",
    "estimated_calls": "COALESCE({row}.cost_estimated, 0) != 0",
}
TOKEN_COLUMNS = (
    "input_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
)
# Call columns that the totals depend on; updates of other columns skip the trigger.
_CALL_TOTALS_SOURCES = (
    *("session_id", "started_at", "provider", "model", "decision"),
    *TOKEN_COLUMNS,
    *("cost_pico_usd", "cost_estimated"),
)


@migration
def m002_report_totals(db: sqlite_utils.Database) -> None:
    sum_columns = ", ".join(f"{name} INTEGER NOT NULL" for name in CALL_TOTALS_SUMS)
    db.execute(
        f"""
        CREATE TABLE call_totals (
            session_id TEXT NOT NULL,
            hour TEXT NOT NULL,  -- UTC hour of the calls' started_at, such as 2026-12-04T20
            provider TEXT NOT NULL,
            model TEXT NOT NULL,  -- '' when the request named no model
            {sum_columns},
            PRIMARY KEY (session_id, hour, provider, model)
        ) WITHOUT ROWID
        """
    )
    db.execute("CREATE INDEX idx_call_totals_hour ON call_totals (hour)")
    db["sessions"].create_index(["status"])

    # Triggers keep the totals in the same transaction that writes the call, so they always
    # equal the sums over `calls`.
    names = ", ".join([*CALL_TOTALS_KEY, *CALL_TOTALS_SUMS])
    key_names = ", ".join(CALL_TOTALS_KEY)
    new_values = ", ".join(
        expr.format(row="NEW") for expr in [*CALL_TOTALS_KEY.values(), *CALL_TOTALS_SUMS.values()]
    )
    add = ", ".join(f"{name} = {name} + excluded.{name}" for name in CALL_TOTALS_SUMS)
    add_new = (
        f"INSERT INTO call_totals ({names}) VALUES ({new_values}) "
        f"ON CONFLICT ({key_names}) DO UPDATE SET {add};"
    )
    old_key = " AND ".join(
        f"{name} = {expr.format(row='OLD')}" for name, expr in CALL_TOTALS_KEY.items()
    )
    subtract = ", ".join(
        f"{name} = {name} - ({expr.format(row='OLD')})" for name, expr in CALL_TOTALS_SUMS.items()
    )
    remove_old = (
        f"UPDATE call_totals SET {subtract} WHERE {old_key}; "
        f"DELETE FROM call_totals WHERE {old_key} AND call_rows = 0;"
    )
    sources = ", ".join(_CALL_TOTALS_SOURCES)
    db.execute(f"CREATE TRIGGER call_totals_insert AFTER INSERT ON calls BEGIN {add_new} END")
    db.execute(
        f"CREATE TRIGGER call_totals_update AFTER UPDATE OF {sources} ON calls "
        f"BEGIN {remove_old} {add_new} END"
    )
    db.execute(f"CREATE TRIGGER call_totals_delete AFTER DELETE ON calls BEGIN {remove_old} END")

    # Ledgers written before this migration get their totals once, here.
    keys = ", ".join(expr.format(row="calls") for expr in CALL_TOTALS_KEY.values())
    sums = ", ".join(f"SUM({expr.format(row='calls')})" for expr in CALL_TOTALS_SUMS.values())
    db.execute(
        f"INSERT INTO call_totals ({names}) SELECT {keys}, {sums} FROM calls GROUP BY {keys}"
    )


@migration
def m003_budget_reservations(db: sqlite_utils.Database) -> None:
    # What calls in flight have reserved against budgets shared by several runs; a row lives
    # from admission until the call's cost is written to `calls`.
    db["budget_reservations"].create(
        {
            "session_id": str,
            "call_key": str,
            "pid": int,
            "pid_started": float,  # the process's start time, which tells a reused pid apart
            "hostname": str,
            "reserved_pico_usd": int,
            "settled": int,  # 1 once reserved_pico_usd is the call's exact cost
            "created_at": str,
        },
        pk=("session_id", "call_key"),
    )

    # Spend and calls per task, team and user, per hour of `calls.started_at` ("2026-12-04T21"),
    # so that a budget's window adds up hundreds of rows rather than every call. Triggers keep
    # it in step with `calls` inside each write's own transaction; a call counts once it is
    # admitted and no longer in flight.
    db["budget_spend"].create(
        {"scope": str, "name": str, "hour": str, "spent_pico_usd": int, "calls": int},
        pk=("scope", "name", "hour"),
    )
    db.execute(
        "CREATE TRIGGER budget_spend_insert AFTER INSERT ON calls BEGIN "
        + _budget_spend_upsert("NEW", "")
        + " END"
    )
    db.execute(
        # Only updates of the columns it sums touch budget_spend.
        "CREATE TRIGGER budget_spend_update AFTER UPDATE OF "
        "session_id, started_at, decision, status, cost_pico_usd ON calls BEGIN "
        + _budget_spend_upsert("OLD", "-")
        + _budget_spend_upsert("NEW", "")
        + " END"
    )
    db.execute(
        "CREATE TRIGGER budget_spend_delete AFTER DELETE ON calls BEGIN "
        + _budget_spend_upsert("OLD", "-")
        + " END"
    )
    # Calls recorded before this migration.
    db.execute(
        "INSERT INTO budget_spend (scope, name, hour, spent_pico_usd, calls) "
        "SELECT a.scope, a.name, substr(c.started_at, 1, 13), "
        "SUM(COALESCE(c.cost_pico_usd, 0)), COUNT(*) "
        "FROM calls c JOIN ("
        "  SELECT id, 'task' AS scope, task AS name FROM sessions"
        "  UNION ALL SELECT id, 'team', team FROM sessions"
        "  UNION ALL SELECT id, 'user', \"user\" FROM sessions"
        ") a ON a.id = c.session_id "
        "WHERE a.name IS NOT NULL AND c.decision = 'admitted' AND c.status != 'sent' "
        "GROUP BY a.scope, a.name, substr(c.started_at, 1, 13)"
    )


def _budget_spend_upsert(row: str, sign: str) -> str:
    """Return SQL that adds (sign "") or removes (sign "-") one call row in budget_spend."""
    session = f'(SELECT task, team, "user" FROM sessions WHERE id = {row}.session_id)'
    return (
        "INSERT INTO budget_spend (scope, name, hour, spent_pico_usd, calls) "
        f"SELECT scope, name, substr({row}.started_at, 1, 13), "
        f"{sign}COALESCE({row}.cost_pico_usd, 0), {sign}1 FROM ("
        f"  SELECT 'task' AS scope, task AS name FROM {session}"
        f"  UNION ALL SELECT 'team', team FROM {session}"
        f"  UNION ALL SELECT 'user', \"user\" FROM {session}"
        f") WHERE name IS NOT NULL AND {row}.decision = 'admitted' AND {row}.status != 'sent' "
        "ON CONFLICT (scope, name, hour) DO UPDATE SET "
        "spent_pico_usd = spent_pico_usd + excluded.spent_pico_usd, "
        "calls = calls + excluded.calls;"
    )


def migrate(db: sqlite_utils.Database) -> None:
    """Apply every migration not yet recorded in the `_migrations` table."""
    with db.conn:
        db.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT)"
        )
    applied = {row[0] for row in db.execute("SELECT name FROM _migrations").fetchall()}
    for fn in MIGRATIONS:
        if fn.__name__ in applied:
            continue
        # BEGIN IMMEDIATE makes a second process wait instead of applying the same migration.
        with db.conn:
            db.execute("BEGIN IMMEDIATE")
            done = db.execute("SELECT 1 FROM _migrations WHERE name = ?", [fn.__name__])
            if done.fetchone() is None:
                fn(db)
                db["_migrations"].insert({"name": fn.__name__, "applied_at": now_iso()})


def now_iso() -> str:
    """Return the current UTC time as an ISO 8601 string with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def default_path() -> Path:
    """Return the ledger path: $TOKENCAP_DB, else tokencap.db in the XDG data directory."""
    if os.environ.get("TOKENCAP_DB"):
        return Path(os.environ["TOKENCAP_DB"]).expanduser()
    return data_dir() / "tokencap.db"


def data_dir() -> Path:
    """Return tokencap's data directory under $XDG_DATA_HOME (default ~/.local/share)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tokencap"


def _check_path(path: Path) -> None:
    """Raise ConfigError for a ledger path that can never be a database file."""
    hint = "give a file path such as ~/.local/share/tokencap/tokencap.db"
    if str(path) in ("", "."):
        raise ConfigError(f"the ledger path is empty; {hint}")
    if path.is_dir():
        raise ConfigError(f"the ledger path {path} is a directory; {hint}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"the ledger path {path} is inside {parent}, which is a file")
            break


class Ledger:
    """Reads and writes the sessions and calls tables of one SQLite file."""

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        _check_path(self.path)
        if not create and not self.path.exists():
            raise LedgerError(f"no ledger at {self.path}: run `tokencap run` first")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The proxy writes from its event loop thread only; isolation_level=None leaves
            # transactions to the explicit `with conn` blocks below.
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db = sqlite_utils.Database(conn)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            migrate(self.db)
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"cannot open the ledger at {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the database connection."""
        self.db.conn.close()

    # --- Sessions -------------------------------------------------------------------------

    def start_session(self, row: dict[str, Any]) -> None:
        """Insert a new session row; JSON-typed fields may be given as Python objects."""
        row = dict(row)
        for key in ("tags", "ci", "command"):
            if not isinstance(row.get(key), str | None):
                row[key] = json.dumps(row[key])
        row.setdefault("started_at", now_iso())
        row.setdefault("status", "running")
        self._write(lambda: self.db["sessions"].insert(row))

    def end_session(self, session_id: str, **values: Any) -> None:
        """Record how a session ended."""
        values.setdefault("ended_at", now_iso())
        self._write(lambda: self.db["sessions"].update(session_id, values))

    def session(self, session_id: str) -> dict[str, Any] | None:
        """Return one session row, or None."""
        rows = list(self.db["sessions"].rows_where("id = ?", [session_id]))
        return rows[0] if rows else None

    # --- Calls ----------------------------------------------------------------------------

    def record_call(self, row: dict[str, Any]) -> int:
        """Insert one call row and return its id."""
        table = self.db["calls"]
        self._write(lambda: table.insert(row))
        return table.last_pk

    def update_call(self, call_id: int, values: dict[str, Any]) -> None:
        """Update a call row, for example when its response settles."""
        self._write(lambda: self.db["calls"].update(call_id, values))

    def calls(self, session_id: str) -> list[dict[str, Any]]:
        """Return the calls of one session in order."""
        return list(self.db["calls"].rows_where("session_id = ?", [session_id], order_by="seq"))

    def _write(self, action: Callable[[], Any]) -> None:
        try:
            with self.db.conn:
                action()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot write to the ledger at {self.path}: {exc}") from exc
