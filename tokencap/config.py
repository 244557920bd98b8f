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

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from tokencap.attribution import parse_tags
from tokencap.budgets import WINDOWS, BudgetRule
from tokencap.config_schema import (
    BUDGET_KEYS,
    MAX_GRACE_SECONDS,
    ConfigFile,
    Setting,
    Source,
    dotted,
    validate,
)
from tokencap.errors import ConfigError, ConfigFileError
from tokencap.prices import UNKNOWN_MODEL_POLICIES, PriceOverride, exact_in_pico, plain
from tokencap.tomlkeys import KeyPath, key_lines

__all__ = [
    "Config",
    "ConfigFile",
    "Flags",
    "RunSettings",
    "Setting",
    "Source",
    "discover",
    "dotted",
    "load",
    "load_settings",
    "parse_usd",
    "read_file",
    "resolve",
]

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
    keys: dict[KeyPath, Setting]  # every key of the merged files, for other tasks too

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
    return validate(config_file, data, key_lines(text))


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
        keys=dict(config.settings),
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
            calls = int(text.strip())
        except ValueError:
            raise ConfigError(
                f"invalid {origin} {text!r}: expected a whole number, such as 50"
            ) from None
        if calls < 1:
            raise ConfigError(f"invalid {origin} {text!r}: it must be at least 1")
        return calls
    if name == "grace_seconds":
        try:
            seconds = Decimal(text.strip())
        except InvalidOperation:
            raise ConfigError(
                f"invalid {origin} {text!r}: expected seconds, such as 2 or 0.5"
            ) from None
        if not seconds.is_finite() or not 0 <= seconds <= MAX_GRACE_SECONDS:
            raise ConfigError(
                f"invalid {origin} {text!r}: expected seconds from 0 to {MAX_GRACE_SECONDS}"
            )
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
    if not amount.is_finite():
        raise ConfigError(f"invalid {origin} {text!r}: expected a finite amount, such as 5")
    if amount <= 0:
        raise ConfigError(f"invalid {origin} {text!r}: the cap must be more than 0")
    if not exact_in_pico(amount):
        raise ConfigError(
            f"invalid {origin} {text!r}: tokencap counts in picodollars, 12 decimal places"
        )
    return plain(amount)
