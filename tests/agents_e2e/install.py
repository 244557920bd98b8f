"""Install the agent CLIs of the end-to-end suite, at pinned versions, into a shared cache.

    python -m tests.agents_e2e.install            # install unless the cache has them already
    python -m tests.agents_e2e.install --print-dir

Claude Code, Codex and Gemini CLI come from npm: `package.json` and `package-lock.json` beside
this file pin them and everything they pull in. aider comes from PyPI (`requirements.txt`) and
gets its own virtual environment. Everything lands in one directory outside the repository, named
after a hash of those pins, the install layout and the Node and Python versions, so a repeat
run reuses it and a changed pin installs a fresh copy next to the old one:

    ${TOKENCAP_AGENT_CLIS_CACHE:-${XDG_CACHE_HOME:-~/.cache}/tokencap-agent-clis}/<hash>/

A marker file written last tells a complete install from an interrupted one, which the next
run removes and installs again. A lock file makes a second installer of the same pins wait for
the first and use its result. This is the only step of the suite that uses the network: the
tests themselves run every CLI in a network namespace with loopback alone.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
PIN_FILES = ("package.json", "package-lock.json", "requirements.txt")
# Bump when the layout of the cache directory changes, so old caches are not reused.
LAYOUT = "1"
MARKER = "installed.json"
# aider-chat 0.86 supports Python 3.10 to 3.12.
AIDER_PYTHONS = ((3, 10), (3, 11), (3, 12))


class InstallError(Exception):
    """The CLIs could not be installed. The message names what failed and what to do."""


@dataclass(frozen=True)
class Clis:
    """Paths of the installed CLIs."""

    root: Path

    @property
    def npm_bin(self) -> Path:
        return self.root / "node_modules" / ".bin"

    @property
    def aider_bin(self) -> Path:
        return self.root / "aider" / "bin"

    @property
    def claude(self) -> Path:
        return self.npm_bin / "claude"

    @property
    def codex(self) -> Path:
        return self.npm_bin / "codex"

    @property
    def gemini(self) -> Path:
        return self.npm_bin / "gemini"

    @property
    def aider(self) -> Path:
        return self.aider_bin / "aider"

    def versions(self) -> dict[str, str]:
        """Return the versions recorded when the cache was installed."""
        return json.loads((self.root / MARKER).read_text())["versions"]


def cache_root() -> Path:
    """Return the directory that contains one subdirectory per set of pins."""
    configured = os.environ.get("TOKENCAP_AGENT_CLIS_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokencap-agent-clis"


def node_version() -> str:
    """Return `node --version`, or raise InstallError when Node is missing."""
    node = shutil.which("node")
    if node is None:
        raise InstallError("node is not on PATH; install Node.js 20 or newer with npm")
    return subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout


def cache_key() -> str:
    """Return the hash that names the cache directory for the current pins and toolchains."""
    digest = hashlib.sha256()
    for name in PIN_FILES:
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    # Native modules and the aider environment depend on these.
    digest.update(f"layout {LAYOUT}\0node {node_version().strip()}\0".encode())
    digest.update(f"python {sys.version_info.major}.{sys.version_info.minor}\0".encode())
    return digest.hexdigest()[:16]


def installed() -> Clis | None:
    """Return the CLIs when a complete install for the current pins exists, else None."""
    root = cache_root() / cache_key()
    return Clis(root) if (root / MARKER).is_file() else None


def install(log=print) -> Clis:
    """Install the CLIs unless the cache already has them, and return where they are."""
    found = installed()
    if found is not None:
        log(f"agent CLIs already installed in {found.root}")
        return found
    if sys.version_info[:2] not in AIDER_PYTHONS:
        raise InstallError(
            f"aider-chat needs Python 3.10 to 3.12, but this is {sys.version.split()[0]}; "
            "run the installer with a Python in that range"
        )
    npm = shutil.which("npm")
    if npm is None:
        raise InstallError("npm is not on PATH; install Node.js 20 or newer with npm")

    root = cache_root() / cache_key()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        # A second installer of the same pins waits here, then finds the first one's result.
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = installed()
        if found is not None:
            return found
        # Left by an install that was interrupted: start again from nothing.
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        try:
            timings = _install_into(root, npm, log)
            clis = Clis(root)
            versions = _probe_versions(clis)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        marker = {
            "versions": versions,
            "seconds": timings,
            "node": node_version().strip(),
            "python": sys.version.split()[0],
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # Written last: its presence is what makes the directory count as installed.
        (root / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    log(f"agent CLIs installed in {root}: {json.dumps(versions)}")
    return clis


def _install_into(root: Path, npm: str, log) -> dict[str, float]:
    timings = {}
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(HERE / name, root / name)

    started = time.monotonic()
    log("installing Claude Code, Codex and Gemini CLI with npm ci")
    # Install scripts stay off: Codex and Gemini CLI work without them, and node-pty's would
    # try to compile or download native code.
    _run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=root,
        what="npm ci",
    )
    # Claude Code's own script is the exception: it copies the native binary of this platform
    # over the placeholder that `claude` points to.
    _run(
        [npm, "rebuild", "@anthropic-ai/claude-code", "--no-audit", "--no-fund"],
        cwd=root,
        what="npm rebuild @anthropic-ai/claude-code",
    )
    timings["npm"] = round(time.monotonic() - started, 1)

    started = time.monotonic()
    log("installing aider with pip into its own virtual environment")
    venv = root / "aider"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=root, what="python -m venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run(
        [*pip, "--disable-pip-version-check", "-r", str(HERE / "requirements.txt")],
        cwd=root,
        what="pip install",
    )
    timings["pip"] = round(time.monotonic() - started, 1)
    return timings


def _run(command: list[str], cwd: Path, what: str) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-3000:]
        raise InstallError(f"{what} failed with status {result.returncode}:\n{output}")


def _probe_versions(clis: Clis) -> dict[str, str]:
    """Run each CLI's --version, offline, so a broken install fails here and not in a test."""
    versions = {}
    home = clis.root / ".probe-home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "PATH": f"{clis.npm_bin}:{clis.aider_bin}:/usr/bin:/bin"}
    for name, binary in (
        ("claude", clis.claude),
        ("codex", clis.codex),
        ("gemini", clis.gemini),
        ("aider", clis.aider),
    ):
        result = subprocess.run(
            [str(binary), "--version"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            raise InstallError(
                f"{binary} --version failed with status {result.returncode}: "
                f"{(result.stdout + result.stderr).strip()[-1000:]}"
            )
        versions[name] = lines[-1].strip()
    shutil.rmtree(home, ignore_errors=True)
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.agents_e2e.install",
        description="Install the agent CLIs of the end-to-end suite into the shared cache.",
    )
    parser.add_argument(
        "--print-dir",
        action="store_true",
        help="print the cache directory of the current pins; exit 0 if it is installed, else 1",
    )
    args = parser.parse_args(argv)
    if args.print_dir:
        print(cache_root() / cache_key())
        return 0 if installed() is not None else 1

    started = time.monotonic()
    try:
        clis = install(log=lambda line: print(line, file=sys.stderr))
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = subprocess.run(["du", "-sh", str(clis.root)], capture_output=True, text=True).stdout
    elapsed = time.monotonic() - started
    print(f"agent CLIs ready in {elapsed:.0f} s: {size.split()[0] if size else '?'} in {clis.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
