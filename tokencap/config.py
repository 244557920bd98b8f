"""Budget files: where they are found, what they may contain, and how they combine with flags.

A run's settings come from four layers, highest precedence first: command-line flags,
`TOKENCAP_*` environment variables, the project file, and the user file. The project file is
`--budget FILE`, else `$TOKENCAP_BUDGET`, else the nearest `tokencap.toml` from the working
directory upward, else the `[tool.tokencap]` table of the nearest `pyproject.toml` that has
one. The user file is `$XDG_CONFIG_HOME/tokencap/config.toml` (default `~/.config`).

The two files are merged key by key, and the project file wins. Then the `[tasks.NAME]` table
of the run's task overrides the defaults, and environment variables and flags override the
result. Every value keeps its source (file and line, variable or flag), which
`tokencap config` prints. docs/budgets.md describes every key.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from tokencap.attribution import parse_tags
from tokencap.budgets import WINDOWS, BudgetRule
from tokencap.errors import ConfigError, ConfigFileError
from tokencap.prices import UNKNOWN_MODEL_POLICIES, PriceOverride
from tokencap.providers import BY_NAME as PROVIDERS
from tokencap.tomlkeys import KeyPath, key_lines

PROJECT_FILE = "tokencap.toml"
PYPROJECT_TABLE = ("tool", "tokencap")

# Run settings that a flag or an environment variable can set, with their flag and variable.
FLAGS = {
    "task": "--task",
    "agent": "--agent",
    "user": "--user",
    "team": "--team",
    "tags": "--tag",
    "max_usd": "--max-usd",
    "max_calls": "--max-calls",
    "grace_seconds": "--grace",
}
ENV_VARS = {
    "task": "TOKENCAP_TASK",
    "agent": "TOKENCAP_AGENT",
    "user": "TOKENCAP_USER",
    "team": "TOKENCAP_TEAM",
    "tags": "TOKENCAP_TAGS",
    "max_usd": "TOKENCAP_MAX_USD",
    "max_calls": "TOKENCAP_MAX_CALLS",
    "grace_seconds": "TOKENCAP_GRACE_SECONDS",
    "unknown_model": "TOKENCAP_UNKNOWN_MODEL",
}

DEFAULT_GRACE_SECONDS = Decimal(2)


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


@dataclass
class Config:
    """The merged contents of the budget files, by key path, each with its source."""

    files: list[ConfigFile]  # highest precedence first
    settings: dict[KeyPath, Setting] = field(default_factory=dict)


@dataclass
class Flags:
    """The run settings given on the command line; None where a flag was not given."""

    task: str | None = None
    agent: str | None = None
    user: str | None = None
    team: str | None = None
    tags: list[str] = field(default_factory=list)
    max_usd: str | None = None
    max_calls: int | None = None
    grace_seconds: float | None = None
    budget_file: Path | None = None


@dataclass
class RunSettings:
    """Everything a run takes from flags, environment and budget files, with sources."""

    files: list[ConfigFile]
    task: Setting
    agent: Setting
    user: Setting
    team: Setting
    tags: dict[str, Setting]
    max_usd: Setting
    max_calls: Setting
    grace_seconds: Setting
    unknown_model: Setting
    extra_hosts: Setting
    budgets: list[BudgetRule]  # every cumulative budget defined, not only the run's own
    prices: list[PriceOverride]

    def scalars(self) -> dict[str, Setting]:
        """Return the single-valued settings by name, in display order."""
        return {
            "task": self.task,
            "agent": self.agent,
            "user": self.user,
            "team": self.team,
            **{f"tags.{key}": value for key, value in sorted(self.tags.items())},
            "max_usd": self.max_usd,
            "max_calls": self.max_calls,
            "grace_seconds": self.grace_seconds,
            "unknown_model": self.unknown_model,
            "extra_hosts": self.extra_hosts,
        }


# --- Discovery -----------------------------------------------------------------------------


def discover(
    cwd: Path, env: Mapping[str, str], budget_file: Path | None = None
) -> list[ConfigFile]:
    """Return the budget files that apply, highest precedence first: project, then user."""
    files = []
    project = _project_file(cwd, env, budget_file)
    if project is not None:
        files.append(project)
    user = user_config_path(env)
    if user is not None and user.is_file():
        files.append(ConfigFile(user, "user", "XDG_CONFIG_HOME"))
    return files


def user_config_path(env: Mapping[str, str]) -> Path | None:
    """Return $XDG_CONFIG_HOME/tokencap/config.toml, with ~/.config as the default base."""
    base = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says to ignore a relative path here.
    if not base or not Path(base).is_absolute():
        home = env.get("HOME") or str(Path.home())
        base = str(Path(home) / ".config")
    return Path(base) / "tokencap" / "config.toml"


def _project_file(cwd: Path, env: Mapping[str, str], budget_file: Path | None) -> ConfigFile | None:
    if budget_file is not None:
        return _named_file(cwd / budget_file.expanduser(), "--budget")
    if env.get("TOKENCAP_BUDGET"):
        return _named_file(cwd / Path(env["TOKENCAP_BUDGET"]).expanduser(), "TOKENCAP_BUDGET")

    directories = [cwd, *cwd.parents]
    for directory in directories:
        candidate = directory / PROJECT_FILE
        if candidate.is_file():
            return ConfigFile(candidate, "project", "search")
    for directory in directories:
        candidate = directory / "pyproject.toml"
        if candidate.is_file() and _has_tool_table(candidate):
            return ConfigFile(candidate, "project", "search", PYPROJECT_TABLE)
    return None


def _named_file(path: Path, named_by: str) -> ConfigFile:
    if not path.is_file():
        raise ConfigError(
            f"budget file not found: {path} (named by {named_by}); check the path, or write a "
            "starter file with `tokencap init`"
        )
    if path.name != "pyproject.toml":
        return ConfigFile(path, "project", named_by)
    if not _has_tool_table(path):
        raise ConfigError(
            f"{path} has no [tool.tokencap] table (named by {named_by}); add one, or name a "
            "tokencap.toml instead"
        )
    return ConfigFile(path, "project", named_by, PYPROJECT_TABLE)


def _has_tool_table(path: Path) -> bool:
    text = _read_text(path)
    # Most pyproject.toml files never mention tokencap; a broken one of those is not ours.
    if "tokencap" not in text:
        return False
    data = _parse(path, text)
    tool = data.get("tool")
    return isinstance(tool, dict) and isinstance(tool.get("tokencap"), dict)


# --- Loading -------------------------------------------------------------------------------


def load(files: list[ConfigFile]) -> Config:
    """Parse and validate the files and merge them; raise ConfigFileError listing every problem."""
    config = Config(files)
    problems: list[str] = []
    # Lowest precedence first, so that each file's values replace those below it.
    for config_file in reversed(files):
        settings, file_problems = read_file(config_file)
        config.settings.update(settings)
        problems.extend(file_problems)
    if problems:
        raise ConfigFileError(problems)
    return config


def read_file(config_file: ConfigFile) -> tuple[dict[KeyPath, Setting], list[str]]:
    """Return a file's settings by key path, and its problems as "FILE:LINE: KEY: message"."""
    text = _read_text(config_file.path)
    data = _parse(config_file.path, text)
    for key in config_file.table:
        data = data[key]
    validator = _Validator(config_file, key_lines(text))
    _ROOT(validator, (), data)
    return validator.settings, [message for _, message in sorted(validator.problems)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(
            [f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8"]
        ) from None
    except OSError as exc:
        raise ConfigFileError([f"{path}: cannot read the file: {exc.strerror or exc}"]) from exc


_POSITION = re.compile(r"^(?P<message>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$")
_TUPLE_KEY = re.compile(r"\(((?:'[^']*',?\s*)+)\)")


def _parse(path: Path, text: str) -> dict[str, Any]:
    # Floats are read as Decimal from the text itself, so 0.1 stays exactly 0.1.
    try:
        return tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError([_syntax_problem(path, text, str(exc))]) from None


def _syntax_problem(path: Path, text: str, error: str) -> str:
    # tomllib names keys as Python tuples, such as ('run', 'max_usd'); show them dotted.
    error = _TUPLE_KEY.sub(lambda m: ".".join(re.findall(r"'([^']*)'", m.group(1))), error)
    match = _POSITION.match(error)
    if match:
        return (
            f"{path}:{match['line']}:{match['column']}: invalid TOML: {match['message']}; "
            "fix the syntax at that position"
        )
    last_line = text.count("\n") + (0 if text.endswith("\n") else 1)
    message = error.removesuffix(" (at end of document)")
    return f"{path}:{max(last_line, 1)}: invalid TOML: {message} at the end of the file"


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
    return amount


def _call_cap(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected a whole number of calls, got {_describe(value)}")
    if value < 1:
        raise _Invalid(f"a call cap must be at least 1, got {value}; remove the key for no cap")
    return value


def _seconds(value: Any) -> Decimal:
    seconds = _number(value)
    if seconds < 0:
        raise _Invalid(f"expected 0 seconds or more, got {seconds}")
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


# A host name or IP address, optionally "*." before it and a port after it.
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*(:\d{1,5})?$")


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
            hint = "; give the host name only" if isinstance(item, str) and "/" in item else ""
            validator.problem(
                (*path, index),
                f"expected a host name such as llm.internal or *.example.com with an optional "
                f":PORT, got {_describe(item)}{hint}",
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


# --- Resolution ----------------------------------------------------------------------------


def load_settings(cwd: Path, env: Mapping[str, str], flags: Flags) -> RunSettings:
    """Find, read and validate the budget files, and resolve a run's settings from all layers."""
    config = load(discover(cwd, env, flags.budget_file))
    return resolve(config, flags, env)


def resolve(config: Config, flags: Flags, env: Mapping[str, str]) -> RunSettings:
    """Apply the task's table, the environment and the flags to the merged files."""
    from_env = _environment(env)
    from_flags = _flags(flags)

    def pick(name: str, *paths: KeyPath, default: Any = None) -> Setting:
        if name in from_flags:
            return from_flags[name]
        if name in from_env:
            return from_env[name]
        for path in paths:
            if path in config.settings:
                return config.settings[path]
        return Setting(default)

    task = pick("task")
    task_tables: list[KeyPath] = [("tasks", task.value)] if task.value else []

    def run_value(name: str, table: str, default: Any = None) -> Setting:
        paths = [(*task_table, name) for task_table in task_tables]
        return pick(name, *paths, (table, name), default=default)

    # Tags merge key by key: the task's replace the defaults, then variables, then flags.
    tags: dict[str, Setting] = {}
    for prefix in [("attribution", "tags"), *((*t, "tags") for t in task_tables)]:
        for path, setting in config.settings.items():
            if path[:-1] == prefix:
                tags[str(path[-1])] = setting
    for layer in (from_env, from_flags):
        if "tags" in layer:
            source = layer["tags"].source
            tags.update({key: Setting(value, source) for key, value in layer["tags"].value.items()})

    return RunSettings(
        files=config.files,
        task=task,
        agent=run_value("agent", "attribution"),
        user=run_value("user", "attribution"),
        team=run_value("team", "attribution"),
        tags=tags,
        max_usd=run_value("max_usd", "run"),
        max_calls=run_value("max_calls", "run"),
        grace_seconds=run_value("grace_seconds", "run", DEFAULT_GRACE_SECONDS),
        unknown_model=pick("unknown_model", ("prices", "unknown_model"), default="highest"),
        extra_hosts=pick("extra_hosts", ("proxy", "extra_hosts"), default=[]),
        budgets=budget_rules(config),
        prices=[
            setting.value
            for path, setting in config.settings.items()
            if path[:2] == ("prices", "models")
        ],
    )


def budget_rules(config: Config) -> list[BudgetRule]:
    """Return the cumulative budgets of the merged files, one rule per scope, name and window."""
    limits: dict[tuple[str, str, str], dict[str, Any]] = {}
    sources: dict[tuple[str, str, str], list[str]] = {}
    for path, setting in config.settings.items():
        if len(path) != 3 or path[0] not in ("tasks", "teams", "users"):
            continue
        if path[2] not in BUDGET_KEYS:
            continue
        metric, window = BUDGET_KEYS[str(path[2])]
        # "tasks" -> scope "task"
        key = (str(path[0]).removesuffix("s"), str(path[1]), window)
        limits.setdefault(key, {})[f"max_{metric}"] = setting.value
        sources.setdefault(key, []).append(str(setting.source))

    rules = []
    for key in sorted(limits, key=_rule_order):
        scope, name, window = key
        rules.append(BudgetRule(scope, name, window, source=", ".join(sources[key]), **limits[key]))
    return rules


def _rule_order(key: tuple[str, str, str]) -> tuple[int, str, int]:
    scope, name, window = key
    return ("task", "team", "user").index(scope), name, list(WINDOWS).index(window)


def _environment(env: Mapping[str, str]) -> dict[str, Setting]:
    """Return the settings that TOKENCAP_* variables set; raise ConfigError on invalid ones."""
    result: dict[str, Setting] = {}
    problems = []
    for name, variable in ENV_VARS.items():
        text = env.get(variable, "")
        if not text.strip():
            continue
        try:
            result[name] = Setting(_parse_text(name, text, variable), Source("env", variable))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return result


def _flags(flags: Flags) -> dict[str, Setting]:
    """Return the settings that flags set; raise ConfigError on invalid ones."""
    result: dict[str, Setting] = {}
    for name, flag in FLAGS.items():
        value = getattr(flags, name)
        if value is None or value == []:
            continue
        if name == "tags":
            parsed: Any = parse_tags(value, flag)
        else:
            parsed = _parse_text(name, str(value), flag)
        result[name] = Setting(parsed, Source("flag", flag))
    return result


def _parse_text(name: str, text: str, origin: str) -> Any:
    """Parse a setting given as text by a flag or variable named `origin`."""
    if name == "max_usd":
        return parse_usd(text, origin)
    if name == "max_calls":
        try:
            calls = int(text)
        except ValueError:
            raise ConfigError(
                f"invalid {origin} {text!r}: expected a whole number of calls"
            ) from None
        if calls < 1:
            raise ConfigError(f"invalid {origin} {calls}: it must be at least 1")
        return calls
    if name == "grace_seconds":
        try:
            seconds = Decimal(text)
        except InvalidOperation:
            raise ConfigError(f"invalid {origin} {text!r}: expected seconds, such as 2") from None
        if not seconds.is_finite() or seconds < 0:
            raise ConfigError(f"invalid {origin} {text}: it must be 0 or more")
        return seconds
    if name == "tags":
        return parse_tags([part for part in text.split(",") if part.strip()], origin)
    if name == "unknown_model":
        if text not in UNKNOWN_MODEL_POLICIES:
            raise ConfigError(f'invalid {origin} {text!r}: expected "highest" or "refuse"')
        return text
    return _text_name(text, origin)


def _text_name(text: str, origin: str) -> str:
    if not text.strip():
        raise ConfigError(f"invalid {origin} {text!r}: the name is empty")
    return text.strip()


def parse_usd(text: str, origin: str = "--max-usd") -> Decimal:
    """Parse a dollar cap such as "5", "0.50" or "$5"; raise ConfigError naming `origin`."""
    try:
        amount = Decimal(text.strip().lstrip("$"))
    except InvalidOperation:
        raise ConfigError(
            f"invalid {origin} {text!r}: expected dollars, such as 5 or 0.50"
        ) from None
    if not amount.is_finite() or amount <= 0:
        raise ConfigError(f"invalid {origin} {text!r}: the cap must be more than 0")
    return amount


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
