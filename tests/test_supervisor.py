"""Tests for tokencap.supervisor against real processes.

Each agent is a small Python script that records the pids it creates in a file, so the
tests can check afterwards that every one of them is gone.
"""

import asyncio
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tokencap.errors import CommandNotFound, ConfigError
from tokencap.supervisor import Child, become_subreaper, is_subreaper

# Upper bound for an agent to write its pid file. It only keeps a broken test from hanging
# and is not a performance check.
STARTUP_TIMEOUT = 30.0

# Roles: "agent" starts "child", which starts "grandchild". The grandchild double-forks a
# "daemon" that calls setsid, so the daemon leaves the agent's session and process group.
TREE_AGENT = textwrap.dedent(
    """
    import os, subprocess, sys, time

    pid_file, role = sys.argv[1], sys.argv[2]

    def record(name, pid):
        with open(pid_file, "a") as f:
            f.write(f"{name} {pid}\\n")

    def start(next_role):
        return subprocess.Popen([sys.executable, __file__, pid_file, next_role])

    if role == "agent":
        start("child")
        record("agent", os.getpid())
    elif role == "child":
        start("grandchild")
        record("child", os.getpid())
    elif role == "grandchild":
        middle = os.fork()
        if middle == 0:
            os.setsid()
            if os.fork() == 0:
                record("daemon", os.getpid())
                time.sleep(600)
            os._exit(0)
        # Record only after the intermediate process is reaped, so a test that finds every
        # line knows the tree has exactly four live processes.
        os.waitpid(middle, 0)
        record("grandchild", os.getpid())
    time.sleep(600)
    """
)

# The agent double-forks short-lived orphans and one long-lived orphan, waits until the
# short-lived ones have exited (they are then zombies of the subreaper), and then either
# exits with status 7 or sleeps until it is signalled.
ORPHAN_AGENT = textwrap.dedent(
    """
    import os, sys, time
    import psutil

    pid_file, mode = sys.argv[1], sys.argv[2]

    def record(name, pid):
        with open(pid_file, "a") as f:
            f.write(f"{name} {pid}\\n")

    def orphan(seconds):
        read_end, write_end = os.pipe()
        middle = os.fork()
        if middle == 0:
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                time.sleep(seconds)
                os._exit(0)
            os.write(write_end, str(grandchild).encode())
            os._exit(0)
        os.waitpid(middle, 0)
        os.close(write_end)
        pid = int(os.read(read_end, 32))
        os.close(read_end)
        return pid

    short_lived = [orphan(0) for _ in range(3)]
    long_lived = orphan(600)

    def exited(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    while not all(exited(pid) for pid in short_lived):
        time.sleep(0.01)

    for pid in short_lived:
        record("short", pid)
    record("long", long_lived)
    record("agent", os.getpid())

    if mode == "exit":
        sys.exit(7)
    time.sleep(600)
    """
)

IGNORES_SIGTERM = textwrap.dedent(
    """
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(sys.argv[1], "a") as f:
        f.write(f"agent {os.getpid()}\\n")
    time.sleep(600)
    """
)

# Exits with a status that the default signal dispositions cannot produce, so the test can
# tell that the handler ran.
HANDLES_SIGNAL = textwrap.dedent(
    """
    import os, signal, sys, time
    signum, status = int(sys.argv[2]), int(sys.argv[3])
    signal.signal(signum, lambda *_: sys.exit(status))
    with open(sys.argv[1], "a") as f:
        f.write(f"agent {os.getpid()}\\n")
    time.sleep(600)
    """
)


@pytest.fixture
def pid_file(tmp_path: Path) -> Path:
    return tmp_path / "pids.txt"


@pytest.fixture
def children():
    """Collect spawned children and stop whatever a failed test left running."""
    started: list[Child] = []
    yield started
    for child in started:
        asyncio.run(child.stop_tree(grace=0.5))


@pytest.fixture
def subreaper() -> None:
    assert become_subreaper()
    assert is_subreaper()


def spawn_script(children: list[Child], tmp_path: Path, source: str, *args: str | Path) -> Child:
    script = tmp_path / "agent.py"
    script.write_text(source)
    child = Child.spawn([sys.executable, str(script), *map(str, args)], env=dict(os.environ))
    children.append(child)
    return child


def read_pids(pid_file: Path, expected_lines: int) -> dict[str, list[int]]:
    """Wait until pid_file has expected_lines lines and return the pids grouped by name."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    lines: list[str] = []
    while time.monotonic() < deadline:
        if pid_file.exists():
            lines = pid_file.read_text().splitlines()
            if len(lines) >= expected_lines:
                break
        time.sleep(0.02)
    assert len(lines) == expected_lines, f"pid file has {lines!r}"

    pids: dict[str, list[int]] = {}
    for line in lines:
        name, pid = line.split()
        pids.setdefault(name, []).append(int(pid))
    return pids


def is_live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def zombie_children() -> list[int]:
    zombies = []
    for proc in psutil.Process().children():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                zombies.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return zombies


def test_stop_tree_kills_detached_descendants(subreaper, children, tmp_path, pid_file):
    child = spawn_script(children, tmp_path, TREE_AGENT, pid_file, "agent")
    pids = read_pids(pid_file, expected_lines=4)
    all_pids = [pid for group in pids.values() for pid in group]

    assert sorted(proc.pid for proc in child.tree()) == sorted(all_pids)
    # The daemon called setsid, so only the subreaper keeps it under this process.
    assert os.getsid(pids["daemon"][0]) != os.getsid(child.pid)

    result = asyncio.run(child.stop_tree(grace=10.0))

    assert result.survivors == []
    assert result.signalled == 4
    assert result.killed == 0
    for name, group in pids.items():
        for pid in group:
            assert not is_live(pid), f"{name} pid {pid} is still alive"
    assert child.returncode == -signal.SIGTERM
    assert zombie_children() == []


def test_stop_tree_kills_process_ignoring_sigterm(children, tmp_path, pid_file):
    child = spawn_script(children, tmp_path, IGNORES_SIGTERM, pid_file)
    read_pids(pid_file, expected_lines=1)

    result = asyncio.run(child.stop_tree(grace=0.3))

    assert result.signalled == 1
    assert result.killed == 1
    assert result.survivors == []
    assert not is_live(child.pid)
    assert child.returncode == -signal.SIGKILL


def test_stop_tree_continues_stopped_process(children, tmp_path, pid_file):
    child = spawn_script(children, tmp_path, HANDLES_SIGNAL, pid_file, int(signal.SIGTERM), 3)
    read_pids(pid_file, expected_lines=1)
    os.kill(child.pid, signal.SIGSTOP)

    result = asyncio.run(child.stop_tree(grace=10.0))

    # Status 3 comes from the SIGTERM handler, which only runs if SIGCONT resumed the process.
    assert child.returncode == 3
    assert result.killed == 0
    assert result.survivors == []


def test_stop_tree_with_nothing_running(children):
    child = Child.spawn([sys.executable, "-c", "pass"], env=dict(os.environ))
    children.append(child)
    assert asyncio.run(child.wait()) == 0

    result = asyncio.run(child.stop_tree(grace=1.0))

    assert result.signalled == 0
    assert result.killed == 0
    assert result.survivors == []


def test_wait_reaps_orphans_returns_status(subreaper, children, tmp_path, pid_file):
    child = spawn_script(children, tmp_path, ORPHAN_AGENT, pid_file, "exit")
    pids = read_pids(pid_file, expected_lines=5)
    short_lived = pids["short"]

    # Nothing has reaped the exited orphans yet, so they are zombies re-parented to us.
    zombies_before = zombie_children()
    for pid in short_lived:
        assert pid in zombies_before

    assert asyncio.run(child.wait()) == 7
    assert child.returncode == 7
    assert zombie_children() == []
    for pid in short_lived:
        assert not psutil.pid_exists(pid)

    long_lived = pids["long"][0]
    assert is_live(long_lived)
    assert [proc.pid for proc in child.tree()] == [long_lived]

    result = asyncio.run(child.stop_tree(grace=10.0))

    assert result.signalled == 1
    assert result.survivors == []
    assert not is_live(long_lived)


def test_wait_reports_terminating_signal(subreaper, children, tmp_path, pid_file):
    child = spawn_script(children, tmp_path, ORPHAN_AGENT, pid_file, "sleep")
    pids = read_pids(pid_file, expected_lines=5)

    os.kill(child.pid, signal.SIGTERM)

    assert asyncio.run(child.wait()) == -signal.SIGTERM
    assert child.returncode == -signal.SIGTERM
    assert zombie_children() == []
    # The long-lived orphan called setsid, so the signal to the agent alone did not reach it.
    assert is_live(pids["long"][0])


def test_wait_does_not_block_event_loop(children):
    child = Child.spawn(
        [sys.executable, "-c", "import time; time.sleep(0.5)"], env=dict(os.environ)
    )
    children.append(child)

    async def count_ticks_while_waiting() -> tuple[int, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        status = await child.wait()
        ticker.cancel()
        return status, ticks

    status, ticks = asyncio.run(count_ticks_while_waiting())

    assert status == 0
    # Any count above 1 shows that other tasks ran while wait() was pending.
    assert ticks > 1


def test_send_signal_reaches_sigint_handler(children, tmp_path, pid_file):
    child = spawn_script(children, tmp_path, HANDLES_SIGNAL, pid_file, int(signal.SIGINT), 42)
    read_pids(pid_file, expected_lines=1)

    child.send_signal(signal.SIGINT)

    assert asyncio.run(child.wait()) == 42


def test_send_signal_after_exit_is_ignored(children):
    child = Child.spawn([sys.executable, "-c", "pass"], env=dict(os.environ))
    children.append(child)
    assert asyncio.run(child.wait()) == 0

    child.send_signal(signal.SIGTERM)

    assert child.returncode == 0


def test_spawn_missing_command_raises(tmp_path):
    env = {"PATH": str(tmp_path)}

    with pytest.raises(CommandNotFound) as excinfo:
        Child.spawn(["tokencap-test-no-such-command"], env=env)

    assert "tokencap-test-no-such-command" in str(excinfo.value)
    assert isinstance(excinfo.value, ConfigError)


def test_spawn_non_executable_file_raises(tmp_path):
    script = tmp_path / "agent-script"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)

    with pytest.raises(CommandNotFound, match="agent-script.*not executable"):
        Child.spawn(["agent-script"], env={"PATH": str(tmp_path)})
    with pytest.raises(CommandNotFound, match="not executable"):
        Child.spawn([str(script)], env={"PATH": os.defpath})


def test_spawn_missing_path_raises(tmp_path):
    missing = tmp_path / "missing-agent"

    with pytest.raises(CommandNotFound, match="missing-agent"):
        Child.spawn([str(missing)], env=dict(os.environ))


def test_spawn_missing_interpreter_raises(tmp_path):
    script = tmp_path / "bad-shebang"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)

    with pytest.raises(CommandNotFound, match="bad-shebang"):
        Child.spawn([str(script)], env=dict(os.environ))


def test_spawn_rejects_bad_working_directory(tmp_path):
    with pytest.raises(ConfigError, match="working directory"):
        Child.spawn([sys.executable, "-c", "pass"], env=dict(os.environ), cwd=str(tmp_path / "x"))


def test_spawn_relative_path_entry_uses_cwd(children, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "agent-tool"
    tool.write_text("#!/bin/sh\nexit 5\n")
    tool.chmod(0o755)

    child = Child.spawn(["agent-tool"], env={"PATH": "bin"}, cwd=str(tmp_path))
    children.append(child)

    assert asyncio.run(child.wait()) == 5
