"""An agent that starts a process tree, some of it escaping its process group, then calls a model.

It starts a sleeping child, and a grandchild that double-forks and calls setsid so that it
leaves both the process group and the parent chain. Every pid goes to --pids, one per line,
before the first model call, so a test can check afterwards that none of them is alive.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import anthropic

# The grandchild forks once more and calls setsid, the usual way a daemon detaches.
_DAEMON = """
import os, sys, time
if os.fork() > 0:
    os._exit(0)
os.setsid()
if os.fork() > 0:
    os._exit(0)
with open(sys.argv[1], "a") as out:
    out.write(f"{os.getpid()}\\n")
time.sleep(600)
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pids", required=True)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()

    with open(args.pids, "a") as out:
        out.write(f"{os.getpid()}\n")
    child = subprocess.Popen(["sleep", "600"])
    with open(args.pids, "a") as out:
        out.write(f"{child.pid}\n")
    subprocess.run([sys.executable, "-c", _DAEMON, args.pids], check=True)

    # Wait until the daemon has written its pid: the parent and child exit before it does.
    deadline = time.monotonic() + 10
    while len(Path(args.pids).read_text().split()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)

    client = anthropic.Anthropic(api_key="test-key-anthropic", max_retries=0)
    try:
        for _ in range(args.calls):
            client.messages.create(
                model="claude-sonnet-4-5",
                max_tokens=100,
                messages=[{"role": "user", "content": "hello"}],
            )
    except anthropic.APIError:
        pass
    # Stay alive with the whole tree, so that only tokencap's stop can end it.
    time.sleep(600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
