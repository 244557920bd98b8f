"""`tokencap watch`, `tokencap sessions` and status filters against sessions still running.

A real `tokencap run` is kept running by an agent that makes one call and then waits for a
release file. A session whose tokencap process is SIGKILLed stays 'running' in the ledger and
must be shown as stale.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import TOKENCAP, query
from tests.fakeupstream import Behavior
from tests.test_cli import run_cli

pytestmark = pytest.mark.slow

# Upper bound for the agent to make its call. It only keeps a broken test from hanging.
READY_TIMEOUT = 60.0

# One Anthropic call, then the agent's pid in the ready file, then a wait for the release file.
WAITING_AGENT = textwrap.dedent(
    """
    import os, sys, time
    import anthropic

    ready, release = sys.argv[1:3]
    client = anthropic.Anthropic(api_key="test-key-anthropic", max_retries=0)
    client.messages.create(
        model="claude-sonnet-4-5-20250929",
        max_tokens=50,
        messages=[{"role": "user", "content": "hello"}],
    )
    with open(ready, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
    """
)


@dataclass
class Running:
    """A `tokencap run` whose agent waits until `release()` is called."""

    process: subprocess.Popen
    session_id: str
    agent_pid: int
    release_file: Path

    def release(self) -> int:
        """Let the agent end, wait for it and for tokencap, and return tokencap's status."""
        self.release_file.write_text("go")
        wait_gone(self.agent_pid)
        return self.process.wait(timeout=60)


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Wait for process `pid` to exit, and SIGKILL it if it has not by then."""
    try:
        process = psutil.Process(pid)
        process.wait(timeout=timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        process.kill()


@pytest.fixture
def running(upstream, tokencap_env, tmp_path):
    upstream.default = Behavior(input_tokens=1000, output_tokens=100)
    script = tmp_path / "waiting_agent.py"
    script.write_text(WAITING_AGENT)
    ready, release = tmp_path / "ready", tmp_path / "release"
    process = subprocess.Popen(
        [str(TOKENCAP), "run", "--task", "watched", "--user", "watcher", "--max-usd", "1"]
        + ["--max-calls", "5"]
        + ["--", sys.executable, str(script), str(ready), str(release)],
        env=tokencap_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    agent_pid = None
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists() or not ready.read_text():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the agent made no call"
            time.sleep(0.05)
        agent_pid = int(ready.read_text())
        (session,) = query(Path(tokencap_env["TOKENCAP_DB"]), "SELECT id FROM sessions")
        yield Running(process, session["id"], agent_pid, release)
    finally:
        release.write_text("go")
        if agent_pid is not None:
            wait_gone(agent_pid)
        if process.poll() is None:
            process.kill()
        process.wait()


def tokencap(env: dict[str, str], *args: str) -> str:
    """Return the stdout of `tokencap ARGS`, which must succeed."""
    result = run_cli(list(args), env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_watch_shows_running_session(running, tokencap_env):
    text = tokencap(tokencap_env, "watch", "--iterations", "2", "--interval", "0.2")

    assert text.count("tokencap watch · 1 running") == 2
    (row,) = [line for line in text.splitlines() if running.session_id in line][-1:]
    assert "running" in row
    assert "watched" in row
    assert "1 of 5" in row
    # 1000 * $3 + 100 * $15 per million tokens
    assert "$0.0045 of $1.00" in row
    assert "claude-sonnet-4-5-20250929" in row


def test_watch_keeps_ended_session_briefly(running, tokencap_env):
    assert running.release() == 0

    recent = tokencap(tokencap_env, "watch", "--iterations", "1")
    later = tokencap(tokencap_env, "watch", "--iterations", "1", "--ended-within", "0")

    assert "tokencap watch · 0 running" in recent
    (row,) = [line for line in recent.splitlines() if running.session_id in line]
    assert "completed" in row
    assert running.session_id not in later
    assert "No sessions running." in later


def test_running_session_filters(running, tokencap_env):
    sessions = json.loads(tokencap(tokencap_env, "sessions", "--status", "running", "-f", "json"))
    report = json.loads(tokencap(tokencap_env, "report", "--status", "running", "-f", "json"))
    stale = json.loads(tokencap(tokencap_env, "report", "--status", "stale", "-f", "json"))

    (session,) = sessions["sessions"]
    assert session["session_id"] == running.session_id
    assert session["status"] == "running"
    assert session["stale"] is False
    assert session["calls"] == 1
    assert session["ended_at"] is None
    assert report["totals"]["sessions"] == 1
    assert report["totals"]["cost_usd"] == "0.0045"
    assert stale["totals"]["sessions"] == 0


def test_killed_run_is_stale(running, tokencap_env):
    os.kill(running.process.pid, signal.SIGKILL)
    assert running.process.wait(timeout=30) == -signal.SIGKILL
    # The agent outlives tokencap; release it so that it ends by itself.
    running.release_file.write_text("go")
    wait_gone(running.agent_pid)

    sessions = json.loads(tokencap(tokencap_env, "sessions", "-f", "json"))["sessions"]
    table = tokencap(tokencap_env, "sessions")
    stale = json.loads(tokencap(tokencap_env, "report", "--status", "stale", "-f", "json"))
    live = json.loads(tokencap(tokencap_env, "report", "--status", "running", "-f", "json"))
    watched = tokencap(tokencap_env, "watch", "--iterations", "1")
    detail = tokencap(tokencap_env, "report", "--session", running.session_id)

    (session,) = sessions
    assert session["status"] == "running"
    assert session["stale"] is True
    (row,) = [line for line in table.splitlines() if running.session_id in line]
    assert "stale" in row
    assert "1 stale: recorded as running, but the tokencap process is gone" in table
    assert stale["totals"]["sessions"] == 1
    assert stale["totals"]["calls"] == 1
    assert stale["totals"]["cost_usd"] == "0.0045"
    assert live["totals"]["sessions"] == 0
    assert "tokencap watch · 0 running" in watched
    (row,) = [line for line in watched.splitlines() if running.session_id in line]
    assert "stale" in row
    assert "the tokencap process is gone (killed)" in detail


def test_watch_redraws_in_a_terminal(running, tokencap_env):
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [str(TOKENCAP), "watch", "--iterations", "3", "--interval", "0.2"],
        env=tokencap_env | {"TERM": "xterm-256color", "COLUMNS": "200", "LINES": "40"},
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=subprocess.PIPE,
    )
    os.close(secondary)
    output = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            readable, _, _ = select.select([primary], [], [], 1.0)
            if not readable:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closes with the last writer
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=30) == 0, process.stderr.read()
    finally:
        os.close(primary)
        if process.poll() is None:
            process.kill()
            process.wait()

    text = output.decode("utf-8", errors="replace")
    assert running.session_id in text
    # Live redraws in place: it moves the cursor up over the previous table.
    assert "\x1b[1A" in text or "\x1b[2K" in text


def test_watch_without_ledger(tokencap_env, tmp_path):
    missing = tmp_path / "missing.db"

    text = tokencap(tokencap_env, "watch", "--iterations", "1", "--db", str(missing))

    assert f"No ledger at {missing} yet" in text
    assert not missing.exists()
