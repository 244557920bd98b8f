"""The times that `--since` and `--until` accept: dates, UTC times and ages such as 7d."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

from tokencap.errors import ConfigError

_AGE = re.compile(r"(\d+)\s*([smhdw])")
_AGE_UNITS = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}


def parse_time(value: str, option: str, now: datetime, *, end_of_day: bool = False) -> datetime:
    """Return the UTC time that `value` names.

    `value` is an age before `now` (`30m`, `24h`, `7d`, `2w`), `today`, `yesterday`, a date
    (`2026-12-01`, which means its midnight UTC, or with `end_of_day` the midnight after it,
    so that `--until 2026-12-01` includes that day), or a time (`2026-12-01T09:30`, UTC
    unless it carries an offset).
    """
    text = value.strip()
    lower = text.lower()

    age = _AGE.fullmatch(lower)
    if age:
        return now - int(age.group(1)) * _AGE_UNITS[age.group(2)]

    day = None
    if lower in ("today", "yesterday"):
        day = now.astimezone(UTC).date() - timedelta(days=lower == "yesterday")
    elif re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise _invalid(value, option) from None
    if day is not None:
        midnight = datetime.combine(day, time(), tzinfo=UTC)
        return midnight + timedelta(days=1) if end_of_day else midnight

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _invalid(value, option) from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def check_range(since: datetime | None, until: datetime | None) -> None:
    """Raise ConfigError when the window from `since` to `until` is empty."""
    if since is not None and until is not None and since >= until:
        raise ConfigError(
            f"invalid time range: --since {since:%Y-%m-%d %H:%M:%S} UTC is not before "
            f"--until {until:%Y-%m-%d %H:%M:%S} UTC"
        )


def to_ledger(moment: datetime) -> str:
    """Return `moment` in the ledger's text form, which sorts like the times it names."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def _invalid(value: str, option: str) -> ConfigError:
    return ConfigError(
        f"invalid {option} {value!r}: expected a date such as 2026-12-01, a UTC time such as "
        "2026-12-01T09:30, today, yesterday, or an age such as 30m, 24h, 7d or 2w"
    )
