"""Run a test scenario inside a private network namespace with its own /etc/hosts.

Tests that need real host names (api.openai.com, pypi.org) to resolve use this: the scenario
runs in a child process with `unshare --net --mount`, which has loopback alone and a hosts file
that maps the names to 127.0.0.1. Nothing in it can reach another machine, and the bind mount
of /etc/hosts is private to the namespace. Needs root (or user namespaces) and util-linux.

    result = run_scenario("tests.test_interception_netns:scenario_real_hosts", {...}, hosts)

The scenario is a function that takes the JSON-able arguments and returns a JSON-able result.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def available() -> bool:
    """Return True when this machine can create the namespaces."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


def run_scenario(target: str, args: dict, hosts: list[str], timeout: float = 120) -> dict:
    """Run `module:function` in a new namespace where each name in `hosts` is 127.0.0.1."""
    command = [
        "unshare",
        "--net",
        "--mount",
        "--",
        sys.executable,
        "-m",
        "tests.netns",
        target,
        json.dumps(args),
        json.dumps(hosts),
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"scenario {target} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def _enter(hosts: list[str]) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    hosts_file = Path(tempfile.mkdtemp()) / "hosts"
    lines = ["127.0.0.1 localhost", "::1 localhost", *(f"127.0.0.1 {name}" for name in hosts)]
    hosts_file.write_text("\n".join(lines) + "\n")
    # unshare(1) makes the new mount namespace private, so this mount stays inside it.
    subprocess.run(["mount", "--bind", str(hosts_file), "/etc/hosts"], check=True)


def main() -> None:
    target, args, hosts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    _enter(hosts)
    module_name, _, function = target.partition(":")
    scenario = getattr(importlib.import_module(module_name), function)
    result = scenario(args)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
