"""`tokencap init`: a commented starter budget file."""

from __future__ import annotations

from pathlib import Path

from tokencap.errors import ConfigError

STARTER = """\
# tokencap budget file: caps, attribution and prices for every `tokencap run` started in this
# directory or below it. Flags and TOKENCAP_* variables override what is set here; run
# `tokencap config` to see the settings a run would use, and where each one came from.
# Check this file with `tokencap budget check`. docs/budgets.md in tokencap's repository
# describes every key.

[run]
# Caps for each run: dollars spent, and model calls sent upstream.
max_usd = 5
max_calls = 200
# Seconds between SIGTERM and SIGKILL when a cap stops the agent.
grace_seconds = 2

[attribution]
# Recorded with every run, and used to find the team and user budgets below.
# team = "platform"
# tags = { repo = "my-service" }

# Settings for one task, used by `tokencap run --task fix-login ...`.
# [tasks.fix-login]
# max_usd = 2              # cap for each run of this task
# max_usd_total = 20       # cap across all runs of this task

# Budgets shared by every run of a team or user on this machine's ledger, over rolling
# windows: per_day is the last 24 hours, per_week 7 days, per_month 30 days.
# [teams.platform]
# max_usd_per_day = 50
# [users."*"]              # every user who has no [users.NAME] table of their own
# max_usd_per_day = 20

[prices]
# A model without a known price is charged at its provider's highest rates ("highest"),
# or its calls are not sent ("refuse").
unknown_model = "highest"

# Prices in dollars per million tokens, for models you run yourself or rates you negotiated.
# [prices.models."llama3.1:8b"]
# input_per_mtok = 0
# output_per_mtok = 0
"""


def write(path: Path, *, force: bool = False) -> Path:
    """Write the starter file to `path` and return it; raise ConfigError if it exists."""
    path = path.absolute()
    if path.is_dir():
        path = path / "tokencap.toml"
    if path.exists() and not force:
        raise ConfigError(
            f"{path} already exists; edit it, or pass --force to replace it with the starter"
        )
    try:
        path.write_text(STARTER, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path
