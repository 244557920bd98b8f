"""Measure what `tokencap run` costs: start-up, added latency per call, and time to stop a tree.

Run from the repository root, with tokencap installed in the active environment:

    python bench/bench_run.py            # writes bench/results/latest.json and prints a summary

Everything talks to a simulated provider that this script starts on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from tokencap.simulator import SimulatedProvider

HERE = Path(__file__).parent
TOKENCAP = str(Path(sys.executable).parent / "tokencap")

# A client that makes sequential non-streamed calls on one keep-alive connection and prints
# each call's duration in milliseconds, so the same loop runs with and without tokencap.
CLIENT = r"""
import http.client, json, os, sys, time
from urllib.parse import urlsplit
base = urlsplit(os.environ["ANTHROPIC_BASE_URL"])
conn = http.client.HTTPConnection(base.hostname, base.port)
body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 50,
                   "messages": [{"role": "user", "content": "hello"}]})
times = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    conn.request("POST", base.path.rstrip("/") + "/v1/messages", body,
                 {"content-type": "application/json", "x-api-key": "bench"})
    response = conn.getresponse()
    response.read()
    times.append((time.perf_counter() - start) * 1000)
    assert response.status == 200, response.status
print(json.dumps(times))
"""

# An agent that starts a tree (children, and a daemon that escaped with setsid), writes every
# pid to a file, then calls the model until it is refused.
TREE_AGENT = r"""
import json, os, subprocess, sys, time, urllib.request
pids = [os.getpid()]
for _ in range(int(sys.argv[2])):
    pids.append(subprocess.Popen(["sleep", "600"]).pid)
daemon = subprocess.Popen([sys.executable, "-c",
    "import os, sys, time\nif os.fork(): os._exit(0)\nos.setsid()\n"
    "print(os.getpid(), flush=True)\ntime.sleep(600)"], stdout=subprocess.PIPE, text=True)
pids.append(int(daemon.stdout.readline()))
open(sys.argv[1], "w").write(" ".join(map(str, pids)))
url = os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages"
body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 50,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
while True:
    try:
        urllib.request.urlopen(urllib.request.Request(url, body, {"x-api-key": "b"})).read()
    except Exception:
        time.sleep(600)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="repetitions of start-up and stop")
    parser.add_argument("--calls", type=int, default=300, help="calls in the latency loop")
    parser.add_argument("--tree", type=int, default=10, help="sleeping children in the tree")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, SimulatedProvider(event_delay=0) as simulator:
        env = dict(os.environ)
        env.update(
            XDG_DATA_HOME=tmp,
            TOKENCAP_DB=str(Path(tmp) / "bench.db"),
            ANTHROPIC_BASE_URL=simulator.url,
        )
        results = {
            "machine": _machine(),
            "startup": startup(env, args.runs),
            "latency": latency(env, args.calls),
            "stop": stop_tree(env, args.runs, args.tree, Path(tmp)),
        }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


def startup(env: dict[str, str], runs: int) -> dict:
    """Wall time of `tokencap run -- true` against `true` alone, in milliseconds."""
    wrapped = [_wall([TOKENCAP, "run", "--", "true"], env) for _ in range(runs)]
    bare = [_wall(["true"], env) for _ in range(runs)]
    return {
        "runs": runs,
        "tokencap_run_true_ms": _summary(wrapped),
        "true_ms": _summary(bare),
    }


def latency(env: dict[str, str], calls: int) -> dict:
    """Per-call time of non-streamed calls, direct and through tokencap, in milliseconds."""
    direct = _client_times([sys.executable, "-c", CLIENT, str(calls)], env)
    wrapped = _client_times([TOKENCAP, "run", "--", sys.executable, "-c", CLIENT, str(calls)], env)
    return {
        "calls": calls,
        "direct_ms": _summary(direct),
        "through_tokencap_ms": _summary(wrapped),
        "added_median_ms": round(statistics.median(wrapped) - statistics.median(direct), 3),
    }


def stop_tree(env: dict[str, str], runs: int, children: int, tmp: Path) -> dict:
    """Time from the refused call to the last process of the tree gone, in milliseconds."""
    durations = []
    for index in range(runs):
        pid_file = tmp / f"pids-{index}"
        db = tmp / f"stop-{index}.db"
        process = subprocess.Popen(
            [
                TOKENCAP,
                "run",
                "--max-calls",
                "1",
                "--grace",
                "2",
                "--db",
                str(db),
                "--",
                sys.executable,
                "-c",
                TREE_AGENT,
                str(pid_file),
                str(children),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while not pid_file.exists() or not pid_file.read_text().strip():
            time.sleep(0.001)
        pids = [int(p) for p in pid_file.read_text().split()]
        while any(_alive(p) for p in pids):
            time.sleep(0.0005)
        gone = time.time()
        process.wait(timeout=30)
        refused_at = _refused_at(db)
        durations.append((gone - refused_at) * 1000)
    return {"runs": runs, "processes": children + 2, "breach_to_last_gone_ms": _summary(durations)}


def _refused_at(db: Path) -> float:
    conn = sqlite3.connect(db)
    (started,) = conn.execute("SELECT started_at FROM calls WHERE decision = 'refused'").fetchone()
    conn.close()
    return datetime.fromisoformat(started).timestamp()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - start) * 1000


def _client_times(argv: list[str], env: dict[str, str]) -> list[float]:
    output = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    times = json.loads(output.strip().splitlines()[-1])
    # The first call opens the connection and warms caches; it is reported apart.
    return times[1:]


def _summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 3),
        "p95": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 3),
        "min": round(ordered[0], 3),
        "max": round(ordered[-1], 3),
    }


def _machine() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "date": datetime.now().date().isoformat(),
    }


if __name__ == "__main__":
    sys.exit(main())
