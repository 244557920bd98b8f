"""Start the wrapped agent, forward signals to it, and stop its whole process tree.

The agent runs in its own session and process group so that one ``killpg`` reaches the
processes it starts. A descendant that calls ``setsid`` leaves that group, and one that
double-forks is no longer a descendant of the agent. Both are still found because tokencap
makes itself a child subreaper, so on Linux orphans re-parent to tokencap instead of to init.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil

from tokencap.errors import CommandNotFound, ConfigError

logger = logging.getLogger(__name__)

# Values from <linux/prctl.h>.
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37

# Child.wait() runs for the whole session, so it polls less often than stop_tree().
WAIT_POLL_SECONDS = 0.05
STOP_POLL_SECONDS = 0.02

# A SIGKILLed process may need a moment to release its memory before it turns into a zombie.
KILL_WAIT_SECONDS = 1.0
# Each round re-scans and kills what is left, which catches processes forked while the
# previous round was being signalled.
MAX_KILL_ROUNDS = 5


def _prctl(option: int, arg2: ctypes.c_ulong | ctypes.c_void_p) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)
    if libc.prctl(ctypes.c_int(option), arg2, zero, zero, zero) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of to init.

    Call it before spawning the agent. The setting is process-wide and lasts until the process
    exits. Returns False, and logs why, on platforms other than Linux or when prctl fails.
    """
    if not sys.platform.startswith("linux"):
        logger.warning(
            "cannot become a child subreaper on %s: processes that leave the agent's "
            "process group will not be found when stopping it",
            sys.platform,
        )
        return False

    try:
        _prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1))
    except (OSError, AttributeError) as exc:
        logger.warning(
            "prctl(PR_SET_CHILD_SUBREAPER) failed: %s. Processes that leave the agent's "
            "process group will not be found when stopping it",
            exc,
        )
        return False

    logger.debug("pid %d is now a child subreaper", os.getpid())
    return True


def is_subreaper() -> bool:
    """Return True if this process is a child subreaper. Always False outside Linux."""
    if not sys.platform.startswith("linux"):
        return False

    flag = ctypes.c_int(0)
    try:
        _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.c_void_p(ctypes.addressof(flag)))
    except (OSError, AttributeError):
        return False
    return flag.value != 0


@dataclass
class StopResult:
    """Outcome of Child.stop_tree()."""

    # Distinct processes that were alive when stopping began or appeared while it ran.
    signalled: int = 0
    # Processes that were still alive after the grace period and got SIGKILL.
    killed: int = 0
    # PIDs still alive after the last kill round. Empty unless a process could not be killed,
    # for example one stuck in uninterruptible sleep or owned by another user.
    survivors: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _search_path(env: dict[str, str], cwd: str | None) -> str:
    path = env.get("PATH", os.defpath)
    if cwd is None:
        return path

    # The child runs in cwd, so relative PATH entries (including the empty entry, which means
    # the current directory) must be resolved against cwd rather than against our own cwd.
    entries = [os.path.join(cwd, entry) for entry in path.split(os.pathsep)]
    return os.pathsep.join(entries)


def resolve_executable(command: str, env: dict[str, str], cwd: str | None) -> str:
    """Return the path that exec will run for command, or raise CommandNotFound."""
    if os.sep in command:
        candidate = command if os.path.isabs(command) else os.path.join(cwd or os.getcwd(), command)
        if os.path.isdir(candidate):
            raise CommandNotFound(f"cannot run {command!r}: it is a directory, not a command")
        if not os.path.exists(candidate):
            raise CommandNotFound(f"command not found: {command!r} does not exist")
        if not os.access(candidate, os.X_OK):
            raise CommandNotFound(
                f"cannot run {command!r}: the file is not executable. "
                f"Make it executable (chmod +x) or run it through its interpreter."
            )
        return candidate

    search_path = _search_path(env, cwd)
    resolved = shutil.which(command, path=search_path)
    if resolved is not None:
        return resolved

    # shutil.which() returns None both for a missing command and for a file without the
    # execute bit, and the two need different fixes.
    for directory in search_path.split(os.pathsep):
        candidate = os.path.join(directory, command)
        if os.path.isfile(candidate):
            raise CommandNotFound(
                f"cannot run {command!r}: {candidate} is not executable. "
                f"Make it executable (chmod +x) or pass the full path of another copy."
            )
    raise CommandNotFound(
        f"command not found: {command!r} is not in PATH. "
        f"Install it, fix PATH, or pass the command's full path."
    )


def _is_zombie_or_gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _is_alive(proc: psutil.Process) -> bool:
    # is_running() compares the start time too, so a reused pid does not count as alive.
    return proc.is_running() and not _is_zombie_or_gone(proc)


def _any_alive(procs: list[psutil.Process]) -> bool:
    return any(_is_alive(proc) for proc in procs)


def _send(procs: list[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
        except psutil.AccessDenied:
            logger.warning("cannot send %s to pid %d: permission denied", sig.name, proc.pid)


class Child:
    """The wrapped agent process and, through it, every process it started."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: list[str]) -> None:
        self._popen = popen
        self.argv = argv
        self.pid = popen.pid

    @classmethod
    def spawn(cls, argv: list[str], env: dict[str, str], cwd: str | None = None) -> Child:
        """Start argv in a new session and process group, sharing tokencap's stdio.

        The agent owns the terminal, so stdin, stdout and stderr are inherited unchanged.
        NOTE: the new session has no controlling terminal, so the agent can still use the
        inherited terminal fds (raw mode works) but opening /dev/tty fails with ENXIO, and
        terminal-generated signals such as SIGINT and SIGTSTP reach only tokencap.
        Raises CommandNotFound when argv[0] is missing or not executable, and ConfigError
        when argv is empty or cwd is not a directory.
        """
        if not argv:
            raise ConfigError("no command to run. Pass the agent command after `--`.")
        if cwd is not None and not os.path.isdir(cwd):
            raise ConfigError(f"working directory {cwd!r} does not exist or is not a directory")

        executable = resolve_executable(argv[0], env, cwd)
        if not is_subreaper():
            logger.warning(
                "tokencap is not a child subreaper, so processes that the agent detaches "
                "with setsid or a double fork may outlive it"
            )

        try:
            popen = subprocess.Popen(
                argv, executable=executable, env=env, cwd=cwd, start_new_session=True
            )
        except (FileNotFoundError, PermissionError) as exc:
            # The file was checked above, so this usually means a missing script interpreter
            # (the #! line names a program that does not exist) or a noexec mount.
            raise CommandNotFound(f"cannot run {argv[0]!r} ({executable}): {exc}") from exc
        except OSError as exc:
            if exc.errno != errno.ENOEXEC:
                raise
            raise CommandNotFound(
                f"cannot run {argv[0]!r} ({executable}): not a binary for this system "
                f"and has no #! line"
            ) from exc

        logger.info("started %s as pid %d", executable, popen.pid)
        return cls(popen, argv)

    @property
    def returncode(self) -> int | None:
        """Exit status of the main child: None while it runs, -N when signal N killed it."""
        return self._popen.returncode

    async def wait(self) -> int:
        """Wait for the main child to exit and return its exit status.

        Zombie orphans that re-parented to tokencap are reaped while waiting, so they do not
        pile up in the process table during a long session.
        """
        while True:
            self.reap_zombies()
            if self._popen.poll() is not None:
                break
            await asyncio.sleep(WAIT_POLL_SECONDS)

        # Orphans that exited just before the main child would otherwise stay zombies until
        # the next stop_tree().
        self.reap_zombies()
        logger.info("agent pid %d exited with status %d", self.pid, self._popen.returncode)
        return self._popen.returncode

    def reap_zombies(self) -> int:
        """Collect the exit status of every child of this process that has exited.

        The main child is reaped through Popen so that Popen keeps its exit status. Returns
        how many other processes were reaped.
        """
        reaped = 0
        while True:
            try:
                # WNOWAIT leaves the status in place, so this call only finds which child exited,
                # and the waitpid() below collects that specific pid.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return reaped
            if info is None:
                return reaped

            if info.si_pid == self.pid:
                if self._popen.poll() is None:
                    # Another thread holds Popen's waitpid lock and is reaping it.
                    return reaped
                continue

            # NOTE: this also reaps children that tokencap starts for other purposes. That is
            # safe only as long as tokencap has no children besides the agent's tree.
            try:
                os.waitpid(info.si_pid, os.WNOHANG)
            except ChildProcessError:
                continue
            reaped += 1
            logger.debug("reaped orphan pid %d", info.si_pid)

    def send_signal(self, sig: int) -> None:
        """Send sig to the agent's process group, or do nothing if the main child has exited."""
        if self._popen.poll() is not None:
            return

        # The main child is not reaped yet, so its pid, which is also the process group id,
        # cannot have been reused.
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            logger.warning(
                "cannot send signal %d to process group %d: permission denied", sig, self.pid
            )

    def kill_tree(self) -> None:
        """Send SIGKILL to the agent's group and every process of the tree, without waiting.

        A stop_tree() in progress notices and finishes its sweep; this only cuts the grace
        period short.
        """
        self._signal_group(signal.SIGKILL)
        _send(self.tree(), signal.SIGKILL)

    def tree(self) -> list[psutil.Process]:
        """Return every live process under tokencap, which is the agent's whole tree.

        With the subreaper set this includes orphans of the agent. Zombies are left out
        because they have already exited.
        """
        me = os.getpid()
        try:
            descendants = psutil.Process(me).children(recursive=True)
        except psutil.Error as exc:
            logger.warning("cannot list child processes: %s", exc)
            return []
        # children() has just checked each start time, so only the state is read here.
        return [proc for proc in descendants if proc.pid != me and not _is_zombie_or_gone(proc)]

    def _signal_group(self, sig: signal.Signals) -> None:
        # Once Popen has reaped the main child its pid may be reused by an unrelated process
        # group, so the group is only signalled before that. With the subreaper set, group
        # members left after that are still in tree() and are signalled one by one.
        if self._popen.returncode is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            logger.warning(
                "cannot send %s to process group %d: permission denied", sig.name, self.pid
            )

    async def _scan(self, seen: set[psutil.Process]) -> list[psutil.Process]:
        # Reaping stays on the event loop thread, like wait() and send_signal(), so the main
        # child cannot be reaped between _signal_group()'s check and its killpg(). Listing the
        # tree reads several /proc files per process, so it runs in a worker thread instead.
        self.reap_zombies()
        alive = await asyncio.to_thread(self.tree)
        seen.update(alive)
        return alive

    async def _wait_gone(self, procs: list[psutil.Process], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.reap_zombies()
            if not await asyncio.to_thread(_any_alive, procs):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(STOP_POLL_SECONDS, remaining))

    async def stop_tree(self, grace: float) -> StopResult:
        """Stop the agent and all its descendants: SIGTERM, then SIGKILL after grace seconds.

        Processes forked during the grace period get no SIGTERM, so that cleanup helpers the
        agent starts on SIGTERM can run, but they are killed with the rest if still alive when
        the grace period ends. Zombie children of tokencap are reaped before returning.
        """
        started = time.monotonic()
        seen: set[psutil.Process] = set()
        killed: set[psutil.Process] = set()

        # SIGCONT lets stopped processes run their SIGTERM handler instead of waiting for
        # SIGKILL.
        alive = await self._scan(seen)
        logger.info("stopping agent pid %d: %s in its tree", self.pid, _processes(len(alive)))
        for sig in (signal.SIGTERM, signal.SIGCONT):
            self._signal_group(sig)
            await asyncio.to_thread(_send, alive, sig)

        # psutil.wait_procs() is not used here because it would waitpid() the main child and
        # take its exit status away from Popen, which would then report 0.
        deadline = started + grace
        while alive:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(STOP_POLL_SECONDS, remaining))
            alive = await self._scan(seen)

        for _ in range(MAX_KILL_ROUNDS):
            alive = await self._scan(seen)
            if not alive:
                break
            self._signal_group(signal.SIGKILL)
            await asyncio.to_thread(_send, alive, signal.SIGKILL)
            killed.update(alive)
            await self._wait_gone(alive, KILL_WAIT_SECONDS)

        self.reap_zombies()
        survivors = sorted(proc.pid for proc in await asyncio.to_thread(self.tree))
        result = StopResult(
            signalled=len(seen),
            killed=len(killed),
            survivors=survivors,
            seconds=time.monotonic() - started,
        )
        if survivors:
            logger.error(
                "processes survived SIGKILL after %d rounds: %s",
                MAX_KILL_ROUNDS,
                ", ".join(map(str, survivors)),
            )
        logger.info(
            "stopped agent pid %d in %.3f s: %s, %d needed SIGKILL",
            self.pid,
            result.seconds,
            _processes(result.signalled),
            result.killed,
        )
        return result


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"
