"""The `tokencap` command as a user runs it: options, exit statuses, attribution, report, signals.

Every test starts the real `tokencap` executable as a subprocess against the fake upstream.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import psutil
import pytest

from tests.conftest import SDK_AGENT, TOKENCAP, query
from tests.fakeupstream import Behavior
from tokencap.errors import EXIT_CAPPED
from tokencap.ledger import Ledger

pytestmark = pytest.mark.slow

# Upper bound for an agent to write its ready file. It only keeps a broken test from hanging
# and is not a performance check.
STARTUP_TIMEOUT = 60.0

# Prefixes of the variables that describe a CI job. Tests set them explicitly or remove them.
CI_PREFIXES = ("GITHUB_", "GITLAB_", "CI_")

# The agent writes its pid and then a ready file, and on SIGTERM or SIGINT writes the signal's
# name to a marker file and exits with status 5.
TRAPPING_AGENT = textwrap.dedent(
    """
    import os, signal, sys, time

    pid_file, ready_file, marker_file = sys.argv[1:4]

    def on_signal(number, frame):
        with open(marker_file, "w") as marker:
            marker.write(signal.Signals(number).name)
        sys.exit(5)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    with open(ready_file, "w") as f:
        f.write("ready")
    time.sleep(120)
    sys.exit(0)
    """
)

# One Anthropic call through the SDK, then a fixed text on stdout.
PRINTING_AGENT = textwrap.dedent(
    """
    import sys
    import anthropic

    client = anthropic.Anthropic(api_key="test-key-anthropic", max_retries=0)
    client.messages.create(
        model="claude-sonnet-4-5-20250929",
        max_tokens=50,
        messages=[{"role": "user", "content": "hello"}],
    )
    sys.stdout.write(sys.argv[1])
    """
)

AGENT_STDOUT = "first line\nsecond line: naïve café 世界 🚀\n\n  indented, no final newline"


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run the tokencap executable with `args` and wait for it to exit."""
    return subprocess.run(
        [str(TOKENCAP), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def report_sessions(env: dict[str, str], *options: str) -> list[dict]:
    """Return the sessions that `tokencap report --format json` prints."""
    result = run_cli(["report", "--format", "json", *options], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["sessions"]


def without_ci(env: dict[str, str]) -> dict[str, str]:
    """Return env without the variables that describe a CI job."""
    return {k: v for k, v in env.items() if not k.startswith(CI_PREFIXES)}


def wait_for_lines(path: Path, count: int, timeout: float = STARTUP_TIMEOUT) -> None:
    """Wait until the file has at least `count` lines."""
    deadline = time.monotonic() + timeout
    while not path.exists() or len(path.read_text().splitlines()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not reach {count} lines within {timeout} s")
        time.sleep(0.05)


def wait_for_file(path: Path, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not written within {timeout} s")
        time.sleep(0.02)


def kill_agent(pid_file: Path, script: Path) -> None:
    """SIGKILL the process whose pid is in pid_file, if it still runs `script`."""
    if not pid_file.exists():
        return
    try:
        process = psutil.Process(int(pid_file.read_text()))
        if str(script) in process.cmdline():
            process.kill()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError):
        pass


def assert_nothing_run(db: Path) -> None:
    """Assert that the ledger, if it exists, has no call and no session other than failed ones."""
    if not db.exists():
        return
    sessions = query(db, "SELECT id, status, exit_status FROM sessions WHERE status != 'failed'")
    assert [dict(row) for row in sessions] == []
    assert query(db, "SELECT id FROM calls") == []


# --- Usage errors ---------------------------------------------------------------------------

# Options, then the strings stderr must contain: the option and the bad value.
USAGE_ERRORS = {
    "max-usd-not-a-number": (["--max-usd", "abc"], ["--max-usd", "'abc'"]),
    "max-usd-zero": (["--max-usd", "0"], ["--max-usd", "'0'"]),
    "max-usd-negative": (["--max-usd", "-1"], ["--max-usd", "'-1'"]),
    "max-calls-zero": (["--max-calls", "0"], ["--max-calls", "0"]),
    "grace-negative": (["--grace", "-1"], ["--grace", "-1"]),
    "tag-without-value": (["--tag", "novalue"], ["--tag", "'novalue'"]),
    "max-usd-infinite": (["--max-usd", "inf"], ["--max-usd", "'inf'", "finite"]),
    "max-usd-too-precise": (["--max-usd", "1e-400"], ["--max-usd", "picodollars"]),
    "max-calls-not-a-number": (["--max-calls", "abc"], ["--max-calls", "'abc'"]),
    "grace-nan": (["--grace", "nan"], ["--grace", "'nan'"]),
    "grace-infinite": (["--grace", "inf"], ["--grace", "'inf'"]),
    "grace-too-long": (["--grace", "1e308"], ["--grace", "'1e308'"]),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_invalid_option_exits_2(case, run_tokencap, tmp_path):
    options, expected = USAGE_ERRORS[case]
    marker = tmp_path / "agent-ran"

    run = run_tokencap(options, [sys.executable, "-c", f"open({str(marker)!r}, 'w')"])

    assert run.exit_code == 2
    for text in expected:
        assert text in run.stderr
    assert run.stderr.startswith("tokencap: invalid ")
    assert not marker.exists()
    assert_nothing_run(run.db)


@pytest.mark.parametrize("args", [["run"], ["run", "--"]], ids=["no-separator", "separator"])
def test_missing_command_exits_2(args, tokencap_env):
    result = run_cli(args, tokencap_env)

    assert result.returncode == 2
    assert "Missing argument" in result.stderr
    assert_nothing_run(Path(tokencap_env["TOKENCAP_DB"]))


def test_unknown_option_named(run_tokencap, tmp_path):
    marker = tmp_path / "agent-ran"

    run = run_tokencap(["--max-usb", "5"], [sys.executable, "-c", f"open({str(marker)!r}, 'w')"])

    assert run.exit_code == 2
    assert "No such option" in run.stderr
    assert "--max-usb" in run.stderr
    assert not marker.exists()


def test_max_usd_stored_plain(run_tokencap):
    run = run_tokencap(["--max-usd", "1e3"], ["true"])

    assert run.exit_code == 0, run.stderr
    assert run.session()["max_usd"] == "1000"


def test_db_directory_rejected(run_tokencap, tmp_path):
    run = run_tokencap(["--db", str(tmp_path)], ["true"])

    assert run.exit_code == 2
    assert f"the ledger path {tmp_path} is a directory" in run.stderr


def test_unwritable_data_dir_named(run_tokencap, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data directory should be")

    run = run_tokencap([], ["true"], XDG_DATA_HOME=str(blocker))

    assert run.exit_code == 2
    assert "cannot write the log file" in run.stderr
    assert f"cannot create the CA directory {blocker}/tokencap/ca" in run.stderr
    assert "XDG_DATA_HOME" in run.stderr


def test_unreachable_upstream_named(run_agent):
    # A socket that is bound but not listening refuses connections and keeps the port from
    # being taken by another process while the run lasts.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        closed_port = holder.getsockname()[1]
        run = run_agent(
            [], "--api", "anthropic", ANTHROPIC_BASE_URL=f"http://127.0.0.1:{closed_port}"
        )

    assert run.exit_code == 1
    assert f"calls could not reach http://127.0.0.1:{closed_port}" in run.stderr
    (call,) = run.calls()
    assert call["status"] == "dropped"
    assert call["cost_usd"] == "0"


def test_unknown_command_exits_2(run_tokencap):
    run = run_tokencap([], ["tokencap-test-no-such-command"])

    assert run.exit_code == 2
    assert "command not found" in run.stderr
    assert "'tokencap-test-no-such-command'" in run.stderr
    assert_nothing_run(run.db)


# --- Exit status ----------------------------------------------------------------------------


def test_child_exit_status_passes_through(run_tokencap):
    run = run_tokencap([], [sys.executable, "-c", "import sys; sys.exit(7)"])

    assert run.exit_code == 7, run.stderr
    session = run.session()
    assert session["exit_status"] == 7
    assert session["status"] == "completed"
    assert session["end_reason"] == "exited"


def test_child_killed_by_signal_exits_137(run_tokencap):
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"

    run = run_tokencap([], [sys.executable, "-c", script])

    assert run.exit_code == 128 + signal.SIGKILL, run.stderr
    assert run.session()["exit_status"] == 137


# --- Session id and attribution -------------------------------------------------------------


def test_session_id_exported_to_child(run_tokencap, tokencap_env, tmp_path):
    seen = tmp_path / "session-id"
    script = f"import os; open({str(seen)!r}, 'w').write(os.environ['TOKENCAP_SESSION_ID'])"

    run = run_tokencap([], [sys.executable, "-c", script])

    assert run.exit_code == 0, run.stderr
    session_id = seen.read_text()
    assert session_id == run.session()["id"]
    (reported,) = report_sessions(tokencap_env)
    assert reported["session_id"] == session_id


def test_attribution_options_recorded(run_tokencap):
    options = [
        *("--task", "fix-login", "--agent", "claude-code", "--user", "dev@example.test"),
        *("--team", "payments", "--tag", "pr=1234", "--tag", "env = staging"),
    ]

    run = run_tokencap(options, [sys.executable, "-c", "pass"])

    assert run.exit_code == 0, run.stderr
    session = run.session()
    assert session["task"] == "fix-login"
    assert session["agent"] == "claude-code"
    assert session["user"] == "dev@example.test"
    assert session["team"] == "payments"
    assert json.loads(session["tags"]) == {"pr": "1234", "env": "staging"}


@pytest.fixture
def plain_agent(tmp_path: Path) -> Path:
    """Return an executable script named `review-bot` that exits 0."""
    path = tmp_path / "bin" / "review-bot"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_attribution_defaults(plain_agent, tokencap_env, tmp_path):
    git_config = tmp_path / "gitconfig"
    git_config.write_text("[user]\n\temail = default-user@example.test\n")
    env = without_ci(tokencap_env) | {
        "GIT_CONFIG_GLOBAL": str(git_config),
        "GIT_CONFIG_NOSYSTEM": "1",
    }

    # The working directory is outside any git repository, so only the global config applies.
    result = run_cli(["run", "--", str(plain_agent)], env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    (session,) = query(tmp_path / "ledger.db", "SELECT * FROM sessions")
    assert session["agent"] == "review-bot"
    assert session["user"] == "default-user@example.test"
    assert session["task"] is None
    assert session["team"] is None
    assert json.loads(session["tags"]) == {}
    assert json.loads(session["ci"]) == {}
    assert json.loads(session["command"]) == [str(plain_agent)]


def test_user_defaults_to_login_without_git_email(plain_agent, tokencap_env, tmp_path):
    git_config = tmp_path / "gitconfig"
    git_config.write_text("")
    # With no git email tokencap falls back to getpass.getuser(), which reads LOGNAME first.
    env = tokencap_env | {
        "GIT_CONFIG_GLOBAL": str(git_config),
        "GIT_CONFIG_NOSYSTEM": "1",
        "LOGNAME": "tokencap-login",
    }

    result = run_cli(["run", "--", str(plain_agent)], env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    (session,) = query(tmp_path / "ledger.db", "SELECT * FROM sessions")
    assert session["user"] == "tokencap-login"


def test_github_actions_metadata_recorded(run_tokencap, tokencap_env):
    ci = {
        "GITHUB_ACTIONS": "true",
        "GITHUB_RUN_ID": "9876543210",
        "GITHUB_JOB": "agent-review",
        "GITHUB_SHA": "0123456789abcdef0123456789abcdef01234567",
        "GITHUB_REF": "refs/pull/42/merge",
    }
    # run_tokencap adds keyword variables on top of tokencap_env, so unset inherited ones.
    for name in tokencap_env:
        if name.startswith(CI_PREFIXES) and name not in ci:
            ci[name] = ""

    run = run_tokencap([], [sys.executable, "-c", "pass"], **ci)

    assert run.exit_code == 0, run.stderr
    assert json.loads(run.session()["ci"]) == {
        "system": "github",
        "run_id": "9876543210",
        "job": "agent-review",
        "commit": "0123456789abcdef0123456789abcdef01234567",
        "ref": "refs/pull/42/merge",
    }


def test_anthropic_user_id_recorded(run_agent):
    run = run_agent([], "--api", "anthropic", "--user-id", "user_4f2a_session_77")

    assert run.exit_code == 0, run.stderr
    (call,) = run.calls()
    assert call["agent_prompt_id"] == "user_4f2a_session_77"


# --- Report ---------------------------------------------------------------------------------


def test_report_json_after_two_calls(upstream, run_agent, tokencap_env):
    upstream.default = Behavior(
        input_tokens=1200, output_tokens=340, cache_read_tokens=5000, cache_write_tokens=800
    )
    options = [
        *("--task", "report-task", "--agent", "report-agent"),
        *("--user", "report@example.test", "--team", "report-team"),
    ]

    run = run_agent(
        options, "--api", "anthropic", "--model", "claude-sonnet-4-5-20250929", "--calls", "2"
    )

    assert run.exit_code == 0, run.stderr
    (reported,) = report_sessions(tokencap_env)
    session = run.session()
    calls = run.calls()
    assert reported["session_id"] == session["id"]
    assert reported["task"] == "report-task"
    assert reported["agent"] == "report-agent"
    assert reported["user"] == "report@example.test"
    assert reported["team"] == "report-team"
    assert reported["calls"] == 2
    assert reported["refused_calls"] == 0
    assert reported["tokens"] == {
        "input_tokens": 2400,
        "cache_read_tokens": 10_000,
        "cache_write_5m_tokens": 1600,
        "cache_write_1h_tokens": 0,
        "output_tokens": 680,
        "reasoning_tokens": 0,
    }
    assert isinstance(reported["cost_usd"], str)
    assert Decimal(reported["cost_usd"]) == sum(Decimal(call["cost_usd"]) for call in calls)
    # Per call: 1200 * 3 + 5000 * 0.30 + 800 * 3.75 + 340 * 15 dollars per million tokens.
    assert Decimal(reported["cost_usd"]) == Decimal("0.0264")
    assert reported["end_reason"] == "exited"
    assert reported["exit_status"] == 0
    assert reported["started_at"] == session["started_at"]
    assert reported["ended_at"] == session["ended_at"]


def test_sessions_table_wide_shows_session_id(run_tokencap, tokencap_env):
    run = run_tokencap(["--user", "u", "--agent", "a"], [sys.executable, "-c", "pass"])
    assert run.exit_code == 0, run.stderr

    result = run_cli(["sessions"], tokencap_env | {"COLUMNS": "200"})

    assert result.returncode == 0, result.stderr
    assert run.session()["id"] in result.stdout


def test_sessions_table_80_columns_shows_session_id(run_tokencap, tokencap_env):
    run = run_tokencap(["--user", "u", "--agent", "a"], [sys.executable, "-c", "pass"])
    assert run.exit_code == 0, run.stderr

    # With COLUMNS=80, rich would shorten every column of a table written to a pipe.
    result = run_cli(["sessions"], tokencap_env | {"COLUMNS": "80"})

    assert result.returncode == 0, result.stderr
    assert run.session()["id"] in result.stdout


@pytest.mark.parametrize("output_format", ["table", "json"])
def test_report_without_ledger(output_format, tokencap_env, tmp_path):
    db = tmp_path / "missing.db"

    result = run_cli(["report", "--format", output_format, "--db", str(db)], tokencap_env)

    assert result.returncode == 0, result.stderr
    if output_format == "json":
        assert json.loads(result.stdout)["sessions"] == []
    else:
        assert "No sessions recorded yet" in result.stdout
    assert not db.exists()


def test_report_empty_ledger(tokencap_env, tmp_path):
    db = tmp_path / "empty.db"
    Ledger(db).close()

    table = run_cli(["report", "--db", str(db)], tokencap_env)
    data = run_cli(["report", "--format", "json", "--db", str(db)], tokencap_env)

    assert table.returncode == 0, table.stderr
    assert "No sessions recorded yet" in table.stdout
    assert data.returncode == 0, data.stderr
    assert json.loads(data.stdout)["sessions"] == []


# --- Signals, output and ledger selection ---------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_reaches_child(sig, tokencap_env, tmp_path):
    script = tmp_path / "trapping_agent.py"
    script.write_text(TRAPPING_AGENT)
    pid_file, ready, marker = tmp_path / "agent.pid", tmp_path / "ready", tmp_path / "marker"
    command = [sys.executable, str(script), str(pid_file), str(ready), str(marker)]
    process = subprocess.Popen(
        [str(TOKENCAP), "run", "--", *command],
        env=tokencap_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_file(ready)
        os.kill(process.pid, sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        kill_agent(pid_file, script)

    assert process.returncode == 5, stderr
    assert marker.read_text() == sig.name
    (session,) = query(tmp_path / "ledger.db", "SELECT * FROM sessions")
    assert session["exit_status"] == 5


def test_second_signal_skips_grace(upstream, tokencap_env, tmp_path):
    out = tmp_path / "agent.jsonl"
    agent = [sys.executable, str(SDK_AGENT), "--out", str(out), "--api", "anthropic"]
    agent += ["--calls", "2", "--keep-going", "--ignore-sigterm"]
    process = subprocess.Popen(
        [str(TOKENCAP), "run", "--max-calls", "1", "--grace", "250", "--", *agent],
        env=tokencap_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The second call is refused, which starts the stop; the agent ignores SIGTERM.
        wait_for_lines(out, 2)
        os.kill(process.pid, signal.SIGTERM)
        # Without the second signal, the stop would wait the whole 250 s grace period.
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == EXIT_CAPPED, stderr
    (session,) = query(tmp_path / "ledger.db", "SELECT * FROM sessions")
    assert session["end_reason"] == "max_calls"


def test_successful_run_is_quiet(upstream, run_tokencap, tmp_path):
    script = tmp_path / "printing_agent.py"
    script.write_text(PRINTING_AGENT)

    run = run_tokencap([], [sys.executable, str(script), AGENT_STDOUT])

    assert run.exit_code == 0, run.stderr
    assert run.stderr == ""
    assert run.process.stdout == AGENT_STDOUT
    assert len(upstream.inference_requests()) == 1
    assert len(run.calls()) == 1


def test_db_option_selects_ledger(tokencap_env, tmp_path):
    option_db = tmp_path / "option.db"
    env_db = tmp_path / "env.db"
    env = tokencap_env | {"TOKENCAP_DB": str(env_db)}

    result = run_cli(["run", "--db", str(option_db), "--", sys.executable, "-c", "pass"], env)

    assert result.returncode == 0, result.stderr
    assert len(query(option_db, "SELECT id FROM sessions")) == 1
    assert not env_db.exists()
    assert len(report_sessions(env, "--db", str(option_db))) == 1


def test_db_variable_selects_ledger(tokencap_env, tmp_path):
    env_db = tmp_path / "env.db"
    env = tokencap_env | {"TOKENCAP_DB": str(env_db)}

    result = run_cli(["run", "--", sys.executable, "-c", "pass"], env)

    assert result.returncode == 0, result.stderr
    assert len(query(env_db, "SELECT id FROM sessions")) == 1
    assert not (tmp_path / "ledger.db").exists()
    assert not (tmp_path / "data" / "tokencap" / "tokencap.db").exists()
    assert len(report_sessions(env)) == 1
