"""The scope of a report: grouping keys, filters, and the SQL conditions for them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tokencap.errors import ConfigError
from tokencap.report.timespec import to_ledger

# Keys of a session row, as SQL on the sessions table aliased `p`.
SESSION_KEYS = {
    "task": "p.task",
    "session": "p.id",
    "agent": "p.agent",
    "user": "p.user",
    "team": "p.team",
}
# Keys of a call, as SQL on a row of call totals aliased `x`. They split a session's calls.
CALL_KEYS = {
    "model": "NULLIF(x.model, '')",
    "provider": "NULLIF(x.provider, '')",
    "day": "NULLIF(substr(x.hour, 1, 10), '')",
}
GROUP_KEYS = (*SESSION_KEYS, *CALL_KEYS)
TAG_KEY_PREFIX = "tag:"

# `running` and `stale` both have status 'running' in the ledger; a stale session's tokencap
# process is gone.
STATUSES = ("completed", "capped", "failed", "running", "stale")


@dataclass(frozen=True)
class Filters:
    """The sessions and calls a report covers. Empty tuples match everything."""

    since: datetime | None = None
    until: datetime | None = None
    tasks: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    teams: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    sessions: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()

    @property
    def selects_calls(self) -> bool:
        """True when the filters pick calls within sessions, not whole sessions."""
        return bool(self.models or self.providers)

    @property
    def has_time(self) -> bool:
        return self.since is not None or self.until is not None

    def to_json(self) -> dict[str, Any]:
        """Return the filters that are set, named as their options, with times in UTC."""
        result: dict[str, Any] = {}
        if self.since is not None:
            result["since"] = to_ledger(self.since)
        if self.until is not None:
            result["until"] = to_ledger(self.until)
        for option, values in self._lists():
            if values:
                result[option] = list(values)
        if self.tags:
            result["tag"] = dict(self.tags)
        return result

    def describe(self) -> str:
        """Return the filters as one line for people, or '' when none is set."""
        parts = []
        if self.since is not None:
            parts.append(f"since {self.since:%Y-%m-%d %H:%M} UTC")
        if self.until is not None:
            parts.append(f"until {self.until:%Y-%m-%d %H:%M} UTC")
        parts.extend(f"{option} {', '.join(values)}" for option, values in self._lists() if values)
        parts.extend(f"tag {key}={value}" for key, value in self.tags)
        return " · ".join(parts)

    def _lists(self) -> list[tuple[str, tuple[str, ...]]]:
        return [
            ("task", self.tasks),
            ("agent", self.agents),
            ("user", self.users),
            ("team", self.teams),
            ("session", self.sessions),
            ("status", self.statuses),
            ("model", self.models),
            ("provider", self.providers),
        ]


def parse_group_by(values: list[str]) -> list[str]:
    """Parse `--by` values, each one key or several separated by commas, into a key list."""
    keys: list[str] = []
    for value in values:
        for part in value.split(","):
            key = part.strip()
            if not key:
                continue
            if key.startswith(TAG_KEY_PREFIX):
                if not key[len(TAG_KEY_PREFIX) :].strip():
                    raise ConfigError(f"invalid --by {value!r}: name the tag, as in tag:pr")
                key = TAG_KEY_PREFIX + key[len(TAG_KEY_PREFIX) :].strip()
            elif key not in GROUP_KEYS:
                raise ConfigError(
                    f"invalid --by {part.strip()!r}: use {', '.join(GROUP_KEYS)} or tag:KEY, "
                    "or several separated by commas, such as --by team,task"
                )
            if key in keys:
                raise ConfigError(f"invalid --by {value!r}: {key} appears twice")
            keys.append(key)
    if not keys:
        raise ConfigError("invalid --by: name at least one key, such as --by task")
    return keys


def parse_statuses(values: list[str]) -> tuple[str, ...]:
    """Parse `--status` values, each one status or several separated by commas."""
    statuses: list[str] = []
    for value in values:
        for part in value.split(","):
            status = part.strip().lower()
            if status not in STATUSES:
                raise ConfigError(f"invalid --status {part.strip()!r}: use {', '.join(STATUSES)}")
            if status not in statuses:
                statuses.append(status)
    return tuple(statuses)


def is_call_key(key: str) -> bool:
    """True for grouping keys that split a session's calls into several groups."""
    return key in CALL_KEYS


def key_sql(key: str) -> tuple[str, list[Any]]:
    """Return the SQL expression of a grouping key, and its parameters."""
    if key.startswith(TAG_KEY_PREFIX):
        return "(SELECT value FROM json_each(p.tags) WHERE key = ?)", [key[len(TAG_KEY_PREFIX) :]]
    if key in SESSION_KEYS:
        return SESSION_KEYS[key], []
    return CALL_KEYS[key], []


def session_conditions(filters: Filters, stale_ids: set[str]) -> tuple[str, list[Any]]:
    """Return an SQL condition on sessions aliased `p` for the session filters, and its params.

    `stale_ids` are the running sessions whose tokencap process is gone; only the `running`
    and `stale` statuses read them.
    """
    conditions: list[str] = []
    params: list[Any] = []

    for column, values in (
        ("p.task", filters.tasks),
        ("p.agent", filters.agents),
        ("p.user", filters.users),
        ("p.team", filters.teams),
    ):
        if values:
            condition, values_params = _match(column, values)
            conditions.append(condition)
            params.extend(values_params)

    for key, value in filters.tags:
        conditions.append("EXISTS (SELECT 1 FROM json_each(p.tags) WHERE key = ? AND value = ?)")
        params.extend([key, value])

    if filters.sessions:
        conditions.append(f"p.id IN ({_marks(filters.sessions)})")
        params.extend(filters.sessions)

    if filters.statuses:
        either: list[str] = []
        ended = [s for s in filters.statuses if s not in ("running", "stale")]
        if ended:
            either.append(f"p.status IN ({_marks(ended)})")
            params.extend(ended)
        if "running" in filters.statuses:
            either.append(f"(p.status = 'running' AND p.id NOT IN ({_marks(stale_ids)}))")
            params.extend(sorted(stale_ids))
        if "stale" in filters.statuses:
            either.append(f"p.id IN ({_marks(stale_ids)})")
            params.extend(sorted(stale_ids))
        conditions.append("(" + " OR ".join(either) + ")")

    # A session counts when it overlaps the window; a running one has no end yet.
    if filters.since is not None:
        conditions.append("(p.ended_at IS NULL OR p.ended_at >= ?)")
        params.append(to_ledger(filters.since))
    if filters.until is not None:
        conditions.append("p.started_at < ?")
        params.append(to_ledger(filters.until))

    return " AND ".join(conditions) or "1", params


def call_conditions(filters: Filters, alias: str) -> tuple[str, list[Any]]:
    """Return an SQL condition on the model and provider of calls or call totals."""
    conditions: list[str] = []
    params: list[Any] = []
    for column, values in (
        (f"{alias}.model", filters.models),
        (f"{alias}.provider", filters.providers),
    ):
        if values:
            condition, values_params = _match(column, values)
            conditions.append(condition)
            params.extend(values_params)
    return " AND ".join(conditions) or "1", params


def _match(column: str, values: tuple[str, ...]) -> tuple[str, list[str]]:
    # A value with a glob character (* ? [) is a pattern, such as --task 'fix-*'.
    exact = [v for v in values if not any(c in v for c in "*?[")]
    patterns = [v for v in values if v not in exact]
    either = []
    if exact:
        either.append(f"{column} IN ({_marks(exact)})")
    either.extend(f"{column} GLOB ?" for _ in patterns)
    return "(" + " OR ".join(either) + ")", [*exact, *patterns]


def _marks(values: Any) -> str:
    # `IN ()` is valid SQLite and matches nothing.
    return ", ".join("?" for _ in values)


def build_filters(
    *,
    since: str | None = None,
    until: str | None = None,
    tasks: list[str] | None = None,
    agents: list[str] | None = None,
    users: list[str] | None = None,
    teams: list[str] | None = None,
    tags: list[str] | None = None,
    sessions: list[str] | None = None,
    statuses: list[str] | None = None,
    models: list[str] | None = None,
    providers: list[str] | None = None,
    now: datetime | None = None,
) -> Filters:
    """Return Filters from command-line values; raise ConfigError naming a bad one."""
    from tokencap.attribution import parse_tags
    from tokencap.report.timespec import check_range, parse_time

    now = now or datetime.now(UTC)
    start = parse_time(since, "--since", now) if since is not None else None
    end = parse_time(until, "--until", now, end_of_day=True) if until is not None else None
    check_range(start, end)
    return Filters(
        since=start,
        until=end,
        tasks=_values(tasks),
        agents=_values(agents),
        users=_values(users),
        teams=_values(teams),
        tags=tuple(parse_tags(tags or []).items()),
        sessions=_values(sessions),
        statuses=parse_statuses(statuses or []),
        models=_values(models),
        providers=_values(providers),
    )


def _values(values: list[str] | None) -> tuple[str, ...]:
    # Repeated options and comma-separated lists both work: --task a --task b, --task a,b.
    result: list[str] = []
    for value in values or []:
        for part in value.split(","):
            if part.strip() and part.strip() not in result:
                result.append(part.strip())
    return tuple(result)
