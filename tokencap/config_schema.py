"""The keys a budget file may contain, and the check of each value against its key.

`validate` walks a parsed file and returns its settings by key path, each with the file and
line it came from, and one message per problem that names the file, the line and the key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from tokencap.budgets import WINDOWS
from tokencap.prices import UNKNOWN_MODEL_POLICIES, PriceOverride, exact_in_pico, plain
from tokencap.providers import BY_NAME as PROVIDERS
from tokencap.tomlkeys import KeyPath

# A grace period longer than this would leave a stopped agent running for too long to be a cap.
MAX_GRACE_SECONDS = 300

# --- Values and where they came from -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """The origin of a setting's value."""

    kind: str  # "flag", "env", "project", "user" or "default"
    detail: str = ""  # the flag, the variable, or "FILE:LINE"

    def __str__(self) -> str:
        return self.detail or self.kind


DEFAULT = Source("default")


@dataclass(frozen=True, slots=True)
class Setting:
    """One value and its source."""

    value: Any
    source: Source = DEFAULT


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """A budget file that applies, and why."""

    path: Path
    layer: str  # "project" or "user"
    found_by: str  # "--budget", "TOKENCAP_BUDGET", "search" or "XDG_CONFIG_HOME"
    table: KeyPath = ()  # ("tool", "tokencap") in a pyproject.toml


def validate(
    config_file: ConfigFile, data: dict[str, Any], lines: dict[KeyPath, int]
) -> tuple[dict[KeyPath, Setting], list[str]]:
    """Return a file's settings by key path, and its problems as "FILE:LINE: KEY: message".

    `data` is the file's tokencap table as tomllib parsed it, and `lines` the key lines of
    the whole file.
    """
    validator = _Validator(config_file, lines)
    _ROOT(validator, (), data)
    return validator.settings, [message for _, message in sorted(validator.problems)]


# --- Validation ----------------------------------------------------------------------------


class _Invalid(Exception):
    """A value that does not fit its key. The message names the expected type or range."""


class _Validator:
    """Collects a file's settings and problems while the schema walks its contents."""

    def __init__(self, config_file: ConfigFile, lines: dict[KeyPath, int]) -> None:
        self.file = config_file
        self.lines = lines
        self.settings: dict[KeyPath, Setting] = {}
        self.problems: list[tuple[int, str]] = []

    def line(self, path: KeyPath) -> int:
        full = (*self.file.table, *path)
        # A key the scanner did not record takes its table's line.
        while full and full not in self.lines:
            full = full[:-1]
        return self.lines.get(full, 1)

    def source(self, path: KeyPath) -> Source:
        return Source(self.file.layer, f"{self.file.path}:{self.line(path)}")

    def problem(self, path: KeyPath, message: str) -> None:
        line = self.line(path)
        key = dotted((*self.file.table, *path))
        self.problems.append((line, f"{self.file.path}:{line}: {key}: {message}"))

    def set(self, path: KeyPath, value: Any) -> None:
        self.settings[path] = Setting(value, self.source(path))


Check = Callable[[_Validator, KeyPath, Any], None]


def _leaf(convert: Callable[[Any], Any]) -> Check:
    """Return a check that converts one value and records it, or records why it is invalid."""

    def check(validator: _Validator, path: KeyPath, value: Any) -> None:
        try:
            validator.set(path, convert(value))
        except _Invalid as exc:
            validator.problem(path, str(exc))

    return check


def _table(fields: dict[str, Check]) -> Check:
    """Return a check for a table with known keys; any other key is an error."""

    def check(validator: _Validator, path: KeyPath, value: Any) -> None:
        if not isinstance(value, dict):
            validator.problem(path, f"expected a table, got {_describe(value)}")
            return
        for key, item in value.items():
            if key in fields:
                fields[key](validator, (*path, key), item)
            else:
                validator.problem((*path, key), _unknown_key(key, fields))

    return check


def _named_tables(entry: Check, what: str, allow_all: bool) -> Check:
    """Return a check for a table whose keys are names, such as tasks, each checked by `entry`."""

    def check(validator: _Validator, path: KeyPath, value: Any) -> None:
        if not isinstance(value, dict):
            validator.problem(path, f"expected a table of {what}s, got {_describe(value)}")
            return
        for name, item in value.items():
            if not name.strip():
                validator.problem((*path, name), f"the {what} name is empty; name the {what}")
            elif name == "*" and not allow_all:
                validator.problem(
                    (*path, name), f'"*" cannot name a {what}; name each {what} on its own'
                )
            else:
                entry(validator, (*path, name), item)

    return check


def _unknown_key(key: str, fields: Mapping[str, Any]) -> str:
    close = [name for name in fields if name.startswith(key) and len(key) >= 3]
    close = close or difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    if close:
        return f'unknown key "{key}"; did you mean "{close[0]}"?'
    return f'unknown key "{key}"; expected one of: {", ".join(fields)}'


def _describe(value: Any) -> str:
    """Return a value as TOML names its type, such as 'string "5"' or 'integer -1'."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, Decimal):
        return f"float {value}"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {value}"  # dates and times


def _number(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        hint = "; write it without quotes" if isinstance(value, str) else ""
        raise _Invalid(f"expected a number, got {_describe(value)}{hint}")
    amount = Decimal(value)
    if not amount.is_finite():
        raise _Invalid(f"expected a finite number, got {_describe(value)}")
    return amount


def _usd_cap(value: Any) -> Decimal:
    amount = _number(value)
    if amount <= 0:
        raise _Invalid(
            f"a dollar cap must be more than 0, got {amount}; set it such as 5 or 0.50, "
            "or remove the key for no cap"
        )
    if not exact_in_pico(amount):
        raise _Invalid(f"got {amount}, but tokencap counts in picodollars, 12 decimal places")
    return plain(amount)


def _call_cap(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected a whole number of calls, got {_describe(value)}")
    if value < 1:
        raise _Invalid(f"a call cap must be at least 1, got {value}; remove the key for no cap")
    return value


def _seconds(value: Any) -> Decimal:
    seconds = _number(value)
    if not 0 <= seconds <= MAX_GRACE_SECONDS:
        raise _Invalid(f"expected seconds from 0 to {MAX_GRACE_SECONDS}, got {seconds}")
    return seconds


def _price(value: Any) -> Decimal:
    amount = _number(value)
    if amount < 0:
        raise _Invalid(f"a price cannot be negative, got {amount}; use 0 for a free model")
    return amount


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_describe(value)}")
    if not value.strip():
        raise _Invalid("the value is empty; remove the key or give a name")
    return value.strip()


def _unknown_model_policy(value: Any) -> str:
    if value not in UNKNOWN_MODEL_POLICIES:
        choices = " or ".join(f'"{choice}"' for choice in UNKNOWN_MODEL_POLICIES)
        raise _Invalid(f"expected {choices}, got {_describe(value)}")
    return value


# A host name, or a shell-style pattern such as *.example.com; the HTTPS proxy matches the
# host of each connection against it, without scheme or port.
_HOST = re.compile(r"^[A-Za-z0-9*][A-Za-z0-9.*-]*$")


def _check_tags(validator: _Validator, path: KeyPath, value: Any) -> None:
    if not isinstance(value, dict):
        validator.problem(path, f'expected a table of KEY = "VALUE", got {_describe(value)}')
        return
    for key, item in value.items():
        if not key.strip():
            validator.problem((*path, key), "a tag key cannot be empty")
        elif not isinstance(item, str):
            validator.problem(
                (*path, key), f'expected a string, got {_describe(item)}; quote it: {key} = "..."'
            )
        else:
            validator.set((*path, key), item)


def _check_extra_hosts(validator: _Validator, path: KeyPath, value: Any) -> None:
    if not isinstance(value, list):
        validator.problem(
            path,
            f'expected an array of host names, such as ["llm.internal"], got {_describe(value)}',
        )
        return
    hosts = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not _HOST.match(item):
            hint = ""
            if isinstance(item, str) and ("/" in item or ":" in item):
                hint = "; give the host name only, without scheme, path or port"
            validator.problem(
                (*path, index),
                "expected a host name such as llm.internal or a pattern such as "
                f"*.example.com, got {_describe(item)}{hint}",
            )
        else:
            hosts.append(item.lower())
    validator.set(path, hosts)


_PRICE_RATES = {
    "input_per_mtok": _price,
    "output_per_mtok": _price,
    "cache_read_per_mtok": _price,
    "cache_write_per_mtok": _price,
    "cache_write_1h_per_mtok": _price,
}


def _check_price(validator: _Validator, path: KeyPath, value: Any) -> None:
    """Check one model's price table and record it whole: a higher file replaces it whole."""
    model = str(path[-1])
    if not isinstance(value, dict):
        validator.problem(path, f"expected a table of rates, got {_describe(value)}")
        return

    rates: dict[str, Decimal] = {}
    provider = None
    valid = True
    for key, item in value.items():
        try:
            if key == "provider":
                if item not in PROVIDERS:
                    choices = ", ".join(f'"{name}"' for name in PROVIDERS)
                    raise _Invalid(f"expected one of {choices}, got {_describe(item)}")
                provider = item
            elif key in _PRICE_RATES:
                rates[key] = _PRICE_RATES[key](item)
            else:
                raise _Invalid(_unknown_key(key, {**_PRICE_RATES, "provider": None}))
        except _Invalid as exc:
            validator.problem((*path, key), str(exc))
            valid = False

    for required in ("input_per_mtok", "output_per_mtok"):
        if required not in value:
            validator.problem(
                path,
                f"missing {required}: a price needs input_per_mtok and output_per_mtok in "
                "dollars per million tokens, 0 for a free model",
            )
            valid = False
    if not valid:
        return

    input_rate = rates["input_per_mtok"]
    cache_write = rates.get("cache_write_per_mtok", input_rate)
    validator.set(
        path,
        PriceOverride(
            model=model,
            input_per_mtok=input_rate,
            output_per_mtok=rates["output_per_mtok"],
            cache_read_per_mtok=rates.get("cache_read_per_mtok", input_rate),
            cache_write_per_mtok=cache_write,
            cache_write_1h_per_mtok=rates.get("cache_write_1h_per_mtok", cache_write),
            provider=provider,
            source=str(validator.source(path)),
        ),
    )


# Cumulative budget keys: (metric, window) for each, such as max_usd_per_day.
BUDGET_KEYS = {
    f"max_{metric}_{'total' if window == 'total' else 'per_' + window}": (metric, window)
    for metric in ("usd", "calls")
    for window in WINDOWS
}

_RUN_FIELDS: dict[str, Check] = {
    "max_usd": _leaf(_usd_cap),
    "max_calls": _leaf(_call_cap),
    "grace_seconds": _leaf(_seconds),
}
_ATTRIBUTION_FIELDS: dict[str, Check] = {
    "agent": _leaf(_name),
    "user": _leaf(_name),
    "team": _leaf(_name),
    "tags": _check_tags,
}
_BUDGET_FIELDS: dict[str, Check] = {
    key: _leaf(_usd_cap if metric == "usd" else _call_cap)
    for key, (metric, _) in BUDGET_KEYS.items()
}

_ROOT = _table(
    {
        "run": _table(_RUN_FIELDS),
        "attribution": _table(_ATTRIBUTION_FIELDS),
        "tasks": _named_tables(
            _table(_RUN_FIELDS | _ATTRIBUTION_FIELDS | _BUDGET_FIELDS), "task", allow_all=False
        ),
        "teams": _named_tables(_table(_BUDGET_FIELDS), "team", allow_all=True),
        "users": _named_tables(_table(_BUDGET_FIELDS), "user", allow_all=True),
        "prices": _table(
            {
                "unknown_model": _leaf(_unknown_model_policy),
                "models": _named_tables(_check_price, "model", allow_all=True),
            }
        ),
        "proxy": _table({"extra_hosts": _check_extra_hosts}),
    }
)


def dotted(path: KeyPath) -> str:
    """Return a key path as TOML writes it, quoting keys that are not bare."""
    parts = []
    for key in path:
        if isinstance(key, int):
            parts[-1] += f"[{key}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", key):
            parts.append(key)
        else:
            parts.append('"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return ".".join(parts)
