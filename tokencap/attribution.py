"""Who and what a run is for: session id, task, agent, user, team, tags and CI metadata."""

from __future__ import annotations

import getpass
import os
import secrets
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from tokencap.errors import ConfigError


def new_session_id() -> str:
    """Return a new session id that sorts by start time, such as 20261204-203015-9f2c1a."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def default_agent(argv: list[str]) -> str:
    """Return the wrapped command's base name, the default agent name."""
    return Path(argv[0]).name if argv else "unknown"


def default_user() -> str:
    """Return git's user.email, else the login name."""
    try:
        result = subprocess.run(
            ["git", "config", "--get", "user.email"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def parse_tags(values: list[str], origin: str = "--tag") -> dict[str, str]:
    """Parse KEY=VALUE strings into a dict; raise ConfigError naming `origin` on a bad one."""
    tags: dict[str, str] = {}
    for value in values:
        key, sep, tag_value = value.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid {origin} {value!r}: expected KEY=VALUE, such as pr=1234")
        tags[key.strip()] = tag_value.strip()
    return tags


# CI systems expose run metadata in these variables; absent ones are left out.
_CI_VARIABLES = {
    "github": {
        "repository": "GITHUB_REPOSITORY",
        "workflow": "GITHUB_WORKFLOW",
        "run_id": "GITHUB_RUN_ID",
        "run_attempt": "GITHUB_RUN_ATTEMPT",
        "job": "GITHUB_JOB",
        "commit": "GITHUB_SHA",
        "ref": "GITHUB_REF",
    },
    "gitlab": {
        "project": "CI_PROJECT_PATH",
        "pipeline_id": "CI_PIPELINE_ID",
        "job_id": "CI_JOB_ID",
        "job": "CI_JOB_NAME",
        "commit": "CI_COMMIT_SHA",
        "ref": "CI_COMMIT_REF_NAME",
    },
}


def ci_metadata(env: dict[str, str]) -> dict[str, str]:
    """Return the CI system and its run, job, commit and ref, or {} outside CI."""
    if env.get("GITHUB_ACTIONS") == "true":
        system = "github"
    elif env.get("GITLAB_CI") == "true":
        system = "gitlab"
    else:
        return {}
    metadata = {"system": system}
    for key, variable in _CI_VARIABLES[system].items():
        if env.get(variable):
            metadata[key] = env[variable]
    return metadata


def hostname() -> str:
    """Return this machine's host name."""
    return os.uname().nodename
