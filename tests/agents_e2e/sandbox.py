"""A private network per test, and real `tokencap run` invocations of real agent CLIs inside it.

`private_network()` moves the calling thread into a new network namespace that has loopback
alone, the in-process equivalent of `unshare -n` followed by `ip link set lo up`. The fake
upstream's listening socket, `tokencap run`, the agent CLI and everything they start are all
created from that thread, so they all live in the namespace. Whatever a CLI tries to reach
beyond 127.0.0.1 fails with "network unreachable" instead of leaving the machine. Sockets keep
the namespace they were created in, so the thread can return to the old one at the end.

The namespace also names the processes of one test exactly: after `tokencap run` exits, any
process still in it (other than the test runner) is one the agent left behind.

`tokencap run` itself starts in a mount namespace of its own where `/etc/resolv.conf` names a
`LookupRecorder` on 127.0.0.1:53. It records every name the CLI looks up and answers that the
name does not exist, so a test sees any attempt to reach the outside, such as an update check
or telemetry, even though the attempt could not have succeeded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import TOKENCAP, query
from tests.fakeupstream import FakeUpstream

# Enough for the slowest CLI start (aider imports litellm) plus a few model calls.
RUN_TIMEOUT = 180.0


class NamespaceUnavailable(Exception):
    """The test runner may not create a network namespace (it needs root or CAP_SYS_ADMIN)."""


def _ip() -> str:
    for candidate in (shutil.which("ip"), "/usr/sbin/ip", "/sbin/ip"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise NamespaceUnavailable("the `ip` command is missing; install iproute2")


def _namespace_id(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


@contextlib.contextmanager
def private_network() -> Iterator[tuple[int, int]]:
    """Run the block in a new network namespace with loopback alone; yield its id.

    Only the calling thread moves. Threads and processes it starts inside the block inherit
    the namespace, and it returns to its previous namespace when the block ends.
    """
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            os.unshare(os.CLONE_NEWNET)
        except PermissionError as exc:
            raise NamespaceUnavailable(
                "creating a network namespace needs root or CAP_SYS_ADMIN; run the agent CLI "
                "tests as root (CI does), or skip them with -m 'not agent_clis'"
            ) from exc
        try:
            ip = _ip()
            subprocess.run([ip, "link", "set", "lo", "up"], check=True, capture_output=True)
            links = subprocess.run(
                [ip, "-o", "link", "show"], check=True, capture_output=True, text=True
            ).stdout
            names = [line.split(":")[1].strip() for line in links.splitlines() if line.strip()]
            if names != ["lo"]:
                raise NamespaceUnavailable(f"the new namespace has links {names}, not lo alone")
            yield _namespace_id("/proc/thread-self/ns/net")
        finally:
            os.setns(original, os.CLONE_NEWNET)
    finally:
        os.close(original)


def processes_in(namespace: tuple[int, int]) -> dict[int, str]:
    """Return pid and command line of every process in the namespace, except this one."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if _namespace_id(f"/proc/{entry.name}/ns/net") != namespace:
                continue
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def kill_all_in(namespace: tuple[int, int], timeout: float = 10.0) -> None:
    """SIGKILL every process left in the namespace and wait until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        left = processes_in(namespace)
        if not left or time.monotonic() > deadline:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # A killed child of this process stays a zombie until it is reaped. SIGKILL cannot be
        # caught, so the wait is short; other processes raise ChildProcessError at once.
        for pid in left:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        time.sleep(0.05)


class LookupRecorder:
    """A DNS server on 127.0.0.1:53 that records each name looked up and answers NXDOMAIN.

    Create it inside the namespace. It serves UDP only: every resolver tries UDP first, and
    with an NXDOMAIN answer none retries over TCP.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 53))
        self._socket.settimeout(0.1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="lookup-recorder", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                query, client = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            parsed = _parse_query(query)
            if parsed is None:
                continue
            name, question_end = parsed
            self.names.append(name)
            self._socket.sendto(_nxdomain(query, question_end), client)


def _parse_query(query: bytes) -> tuple[str, int] | None:
    """Return the first question's name and where the question ends, or None if malformed."""
    if len(query) < 12:
        return None
    labels = []
    position = 12
    while position < len(query) and query[position] != 0:
        length = query[position]
        labels.append(query[position + 1 : position + 1 + length].decode(errors="replace"))
        position += 1 + length
    # The terminating zero, then QTYPE and QCLASS.
    question_end = position + 5
    if question_end > len(query):
        return None
    return ".".join(labels), question_end


def _nxdomain(query: bytes, question_end: int) -> bytes:
    """Return the answer "no such name" to a query, echoing its id and question."""
    (query_id, flags) = struct.unpack("!HH", query[:4])
    # QR set, opcode and RD kept from the query, RA set, RCODE 3 (NXDOMAIN).
    answer_flags = 0x8000 | (flags & 0x7900) | 0x0080 | 3
    header = struct.pack("!HHHHHH", query_id, answer_flags, 1, 0, 0, 0)
    return header + query[12:question_end]


@dataclass
class AgentRun:
    """One `tokencap run` of an agent CLI: its exit, output, ledger and what it left behind."""

    process: subprocess.CompletedProcess
    db: Path
    # Processes still in the test's namespace right after tokencap exited.
    survivors: dict[int, str]
    # Names looked up by anything the run started, in order.
    lookups: list[str]

    @property
    def exit_code(self) -> int:
        return self.process.returncode

    @property
    def stdout(self) -> str:
        return self.process.stdout

    @property
    def stderr(self) -> str:
        return self.process.stderr

    def calls(self) -> list[sqlite3.Row]:
        """Return every call row of the run, admitted and refused, in order."""
        return query(self.db, "SELECT * FROM calls ORDER BY seq")

    def admitted(self) -> list[sqlite3.Row]:
        return [c for c in self.calls() if c["decision"] == "admitted"]

    def refused(self) -> list[sqlite3.Row]:
        return [c for c in self.calls() if c["decision"] == "refused"]

    def session(self) -> sqlite3.Row:
        (row,) = query(self.db, "SELECT * FROM sessions")
        return row

    def describe(self) -> str:
        """Return the run's exit and output, for assertion messages."""
        return (
            f"exit {self.exit_code}\n--- stdout ---\n{self.stdout[-4000:]}\n"
            f"--- stderr ---\n{self.stderr[-4000:]}"
        )


@dataclass
class Sandbox:
    """One test's namespace, fake upstream, fresh home directory and ledger."""

    root: Path
    upstream: FakeUpstream
    namespace: tuple[int, int]
    lookups: LookupRecorder
    # The CLIs' bin directories, put first on PATH.
    bin_dirs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home = self.root / "home"
        self.workdir = self.home / "project"
        self.tmp = self.root / "tmp"
        self.db = self.root / "ledger.db"
        for directory in (self.home, self.workdir, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)
        self.resolv_conf = self.root / "resolv.conf"
        self.resolv_conf.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return a clean environment: nothing of the test runner's leaks into the agent."""
        path = ":".join([*(str(d) for d in self.bin_dirs), "/usr/local/bin", "/usr/bin", "/bin"])
        env = {
            "HOME": str(self.home),
            "PATH": path,
            "TERM": "dumb",
            "LANG": "C.UTF-8",
            "TMPDIR": str(self.tmp),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "XDG_DATA_HOME": str(self.home / ".local" / "share"),
            "TOKENCAP_DB": str(self.db),
            # tokencap forwards each provider's calls to the URL its variable has here.
            "ANTHROPIC_BASE_URL": self.upstream.url,
            "OPENAI_BASE_URL": self.upstream.url + "/v1",
            "GOOGLE_GEMINI_BASE_URL": self.upstream.url,
        }
        env.update(extra or {})
        return env

    def run(
        self,
        options: list[str],
        command: list[str],
        env: Mapping[str, str] | None = None,
        timeout: float = RUN_TIMEOUT,
    ) -> AgentRun:
        """Run `tokencap run OPTIONS -- COMMAND` in the work directory and wait for it."""
        full_env = self.environment(env)
        full_env["TOKENCAP_E2E_RUN"] = uuid.uuid4().hex
        # A mount namespace of its own lets the run see the recorder as its DNS server.
        use_recorder = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", use_recorder]
        lookups_before = len(self.lookups.names)
        try:
            process = subprocess.run(
                [*wrapper, str(self.resolv_conf), str(TOKENCAP), "run", *options, "--", *command],
                env=full_env,
                cwd=self.workdir,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            left = processes_in(self.namespace)
            kill_all_in(self.namespace)
            raise AssertionError(
                f"tokencap run -- {command[0]} did not end within {timeout:.0f} s; "
                f"processes left: {left}\n--- stdout ---\n{_text(exc.stdout)[-4000:]}\n"
                f"--- stderr ---\n{_text(exc.stderr)[-4000:]}"
            ) from None
        survivors = processes_in(self.namespace)
        return AgentRun(process, self.db, survivors, self.lookups.names[lookups_before:])


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
