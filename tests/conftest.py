"""Shared fixtures: a fake provider per test, and a way to run the real `tokencap` command."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakeupstream import FakeUpstream

TESTS = Path(__file__).parent
SDK_AGENT = TESTS / "agents" / "sdk_agent.py"
TOKENCAP = Path(sys.executable).parent / "tokencap"


@dataclass
class Run:
    """The outcome of one `tokencap run`: its process, its ledger and what the agent saw."""

    process: subprocess.CompletedProcess
    db: Path
    agent_out: Path

    @property
    def exit_code(self) -> int:
        return self.process.returncode

    @property
    def stderr(self) -> str:
        return self.process.stderr

    def outcomes(self) -> list[dict]:
        """Return the agent's per-call results, in the order they were written."""
        if not self.agent_out.exists():
            return []
        return [json.loads(line) for line in self.agent_out.read_text().splitlines()]

    def calls(self) -> list[sqlite3.Row]:
        """Return the ledger's call rows, read straight from the SQLite file."""
        return query(self.db, "SELECT * FROM calls ORDER BY seq")

    def session(self) -> sqlite3.Row:
        rows = query(self.db, "SELECT * FROM sessions ORDER BY started_at DESC")
        return rows[0]


def query(db: Path, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    """Run one read-only query against a ledger file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# Variables of tokencap's own and of the providers, which each test sets itself.
PROVIDER_PREFIXES = ("ANTHROPIC_", "OPENAI_", "GOOGLE_", "GEMINI_", "TOKENCAP_")
CI_PREFIXES = ("GITHUB_", "GITLAB_", "CI_")


@pytest.fixture
def upstream():
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def tokencap_env(tmp_path: Path, upstream: FakeUpstream) -> dict[str, str]:
    """Return an environment whose three providers all point at the fake upstream."""
    env = {
        key: value
        for key, value in os.environ.items()
        # CI variables are dropped too: a run under GitHub Actions would otherwise append
        # every test session to the job's real step summary.
        if not key.startswith(PROVIDER_PREFIXES + CI_PREFIXES)
    }
    env.update(
        XDG_DATA_HOME=str(tmp_path / "data"),
        # An empty config directory, so that no user budget file of the machine applies.
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        TOKENCAP_DB=str(tmp_path / "ledger.db"),
        ANTHROPIC_BASE_URL=upstream.url,
        OPENAI_BASE_URL=upstream.url + "/v1",
        GOOGLE_GEMINI_BASE_URL=upstream.url,
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def run_tokencap(tmp_path: Path, tokencap_env: dict[str, str]):
    """Return a function that runs `tokencap run [options] -- COMMAND` and waits for it."""
    counter = iter(range(1_000))

    def run(
        options: list[str],
        command: list[str],
        timeout: float = 60,
        cwd: Path | None = None,
        **env: str,
    ) -> Run:
        agent_out = tmp_path / f"agent-{next(counter)}.jsonl"
        full_env = tokencap_env | {"AGENT_OUT": str(agent_out)} | env
        process = subprocess.run(
            [str(TOKENCAP), "run", *options, "--", *command],
            env=full_env,
            # The test's own directory, so that no tokencap.toml of the checkout applies.
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return Run(process, Path(full_env["TOKENCAP_DB"]), agent_out)

    return run


@pytest.fixture
def run_agent(run_tokencap, tmp_path: Path):
    """Return a function that runs the SDK agent under tokencap with the given agent flags."""

    def run(
        options: list[str],
        *agent_args: str,
        timeout: float = 60,
        cwd: Path | None = None,
        **env: str,
    ) -> Run:
        out = tmp_path / f"sdk-{len(list(tmp_path.glob('sdk-*.jsonl')))}.jsonl"
        result = run_tokencap(
            options,
            [sys.executable, str(SDK_AGENT), "--out", str(out), *agent_args],
            timeout=timeout,
            cwd=cwd,
            **env,
        )
        result.agent_out = out
        return result

    return run
