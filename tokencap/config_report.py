"""`tokencap config` and `tokencap budget status`: settings and budgets, for people or scripts."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tokencap import attribution, budgets
from tokencap.caps import money
from tokencap.config import Flags, RunSettings, Setting, dotted, load_settings

# Defaults that a run computes when no layer sets these settings.
_DEFAULT_DESCRIPTIONS = {
    "agent": "the command's base name",
    "user": "git user.email, else the login name",
}


def describe(settings: RunSettings) -> dict[str, Any]:
    """Return the resolved settings, budgets and prices with their sources, as plain data."""
    return {
        "files": [
            {
                "path": str(f.path),
                "layer": f.layer,
                "found_by": f.found_by,
                "table": dotted(f.table) if f.table else None,
            }
            for f in settings.files
        ],
        "settings": {name: _setting(name, setting) for name, setting in settings.scalars().items()},
        "keys": {
            dotted(path): {"value": _plain(setting.value), "source": str(setting.source)}
            for path, setting in settings.keys.items()
            # Prices have their own list below.
            if path[:2] != ("prices", "models")
        },
        "budgets": [
            {
                "budget": rule.cap,
                "scope": rule.scope,
                "name": rule.name,
                "window": rule.window,
                "max_usd": _plain(rule.max_usd),
                "max_calls": rule.max_calls,
                "source": rule.source,
            }
            for rule in settings.budgets
        ],
        "prices": [
            {
                "model": price.model,
                "provider": price.provider,
                "input_per_mtok": _plain(price.input_per_mtok),
                "output_per_mtok": _plain(price.output_per_mtok),
                "cache_read_per_mtok": _plain(price.cache_read_per_mtok),
                "cache_write_per_mtok": _plain(price.cache_write_per_mtok),
                "cache_write_1h_per_mtok": _plain(price.cache_write_1h_per_mtok),
                "source": price.source,
            }
            for price in settings.prices
        ],
    }


def _setting(name: str, setting: Setting) -> dict[str, Any]:
    return {
        "value": _plain(setting.value),
        "layer": setting.source.kind,
        "source": str(setting.source),
        **({"default": _DEFAULT_DESCRIPTIONS[name]} if name in _DEFAULT_DESCRIPTIONS else {}),
    }


def _plain(value: Any) -> Any:
    # Money and rates stay exact as decimal strings in JSON.
    if isinstance(value, Decimal):
        return str(value)
    return value


def print_settings(console: Console, data: dict[str, Any]) -> None:
    """Print what `describe` returns as tables."""
    if data["files"]:
        console.print("Budget files, highest precedence first:")
        for entry in data["files"]:
            table = f" [{entry['table']}]" if entry["table"] else ""
            console.print(
                f"  {entry['layer']:<8} {escape(entry['path'])}{escape(table)} "
                f"(found by {entry['found_by']})"
            )
    else:
        console.print("No budget file applies here; `tokencap init` writes a starter file.")

    settings = _titled_table("Run settings", "setting", "value", "source")
    for name, entry in data["settings"].items():
        if entry["value"] is None or entry["value"] == []:
            shown = f"({entry['default']})" if "default" in entry else "not set"
        else:
            shown = _shown(entry["value"])
        settings.add_row(name, escape(shown), escape(entry["source"]))
    console.print(settings)

    if data["keys"]:
        keys = _titled_table("Keys of the budget files, merged", "key", "value", "source")
        for key, entry in data["keys"].items():
            keys.add_row(escape(key), escape(_shown(entry["value"])), escape(entry["source"]))
        console.print(keys)

    if data["budgets"]:
        budgets = _titled_table("Cumulative budgets", "budget", "limit", "source")
        for entry in data["budgets"]:
            budgets.add_row(
                escape(f"{entry['scope']} budget {entry['name']}/{entry['window']}"),
                _limits(entry["max_usd"], entry["max_calls"]),
                escape(entry["source"]),
            )
        console.print(budgets)

    if data["prices"]:
        prices = _titled_table(
            "Prices in dollars per million tokens",
            *("model", "provider", "input", "output"),
            *("cache read", "cache write", "cache write 1h", "source"),
        )
        for entry in data["prices"]:
            prices.add_row(
                escape(entry["model"]),
                entry["provider"] or "any",
                entry["input_per_mtok"],
                entry["output_per_mtok"],
                entry["cache_read_per_mtok"],
                entry["cache_write_per_mtok"],
                entry["cache_write_1h_per_mtok"],
                escape(entry["source"]),
            )
        console.print(prices)


def budget_status(
    db_path: Path, cwd: Path, env: Mapping[str, str], flags: Flags | None = None
) -> list[dict[str, Any]]:
    """Return what remains of the shared budgets that apply in `cwd`, as plain data.

    The budget files, variables and `flags` are read as for a run; budgets for every team or
    user ("*") are reported for the run's team and user. The rows are those of
    `tokencap.budgets.remaining`. Raises ConfigError on invalid settings.
    """
    settings = load_settings(cwd, env, flags or Flags())
    return budgets.status(
        db_path,
        settings.budgets,
        team=settings.team.value,
        user=settings.user.value or attribution.default_user(),
    )


def print_budget_status(console: Console, rows: list[dict[str, Any]]) -> None:
    """Print what `tokencap.budgets.status` returns as a table."""
    if not rows:
        console.print(
            "No cumulative budgets are set. Add max_usd_total to a [tasks.NAME] table, or "
            "max_usd_per_day to a [teams.NAME] or [users.NAME] table, in tokencap.toml."
        )
        return
    table = Table(title="Cumulative budgets", title_justify="left")
    table.add_column("budget")
    table.add_column("limit")
    table.add_column("spent", justify="right")
    table.add_column("in flight", justify="right")
    table.add_column("remaining", justify="right")
    for row in rows:
        spent = f"${money(Decimal(row['spent_usd']))}"
        in_flight = f"${money(Decimal(row['in_flight_usd']))}"
        remaining = []
        if row["remaining_usd"] is not None:
            remaining.append(f"${money(Decimal(row['remaining_usd']))}")
        if row["max_calls"] is not None:
            spent += f", {row['calls']} calls"
            in_flight += f", {row['in_flight_calls']} calls"
            remaining.append(f"{row['remaining_calls']} calls")
        table.add_row(
            escape(row["label"]),
            _limits(row["max_usd"], row["max_calls"]),
            spent,
            in_flight,
            ", ".join(remaining),
        )
    console.print(table)


def _titled_table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    return table


def _shown(value: Any) -> str:
    return ", ".join(value) if isinstance(value, list) else str(value)


def _limits(max_usd: str | None, max_calls: int | None) -> str:
    parts = []
    if max_usd is not None:
        parts.append(f"${money(Decimal(max_usd))}")
    if max_calls is not None:
        parts.append(f"{max_calls} calls")
    return ", ".join(parts)
