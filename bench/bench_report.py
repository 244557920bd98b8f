"""Measure `tokencap report` over a ledger of one million calls.

Run from the repository root, with tokencap installed in the active environment:

    python bench/bench_report.py                  # writes bench/results/report.json
    python bench/bench_report.py --calls 100000   # a smaller ledger, for a quick look

The first run generates the ledger, about 20,000 sessions over 90 days, which takes a few
minutes. It is kept in the temporary directory for later runs. `--db PATH` puts it elsewhere,
and `--regenerate` builds it anew. This is the only place where call rows are inserted
directly: the tests build their ledgers through real `tokencap run` sessions.

Each report runs several times as a user runs it, in a new `tokencap` process with `--format
json`, and then in this process. The script prints the median wall and CPU times, and checks
the report's totals against sums over the calls table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from typer.testing import CliRunner

from tokencap.cli import app
from tokencap.ledger import TOKEN_COLUMNS, Ledger
from tokencap.prices import from_pico

HERE = Path(__file__).parent
TOKENCAP = str(Path(sys.executable).parent / "tokencap")
SEED = 20261204
DAYS = 90

# provider, model, and dollars per million input, cache-read and output tokens. These are
# generator inputs that give realistic magnitudes; the benchmark never prices anything.
MODELS = [
    ("anthropic", "claude-sonnet-4-5", 3, Decimal("0.3"), 15),
    ("anthropic", "claude-opus-4-1", 15, Decimal("1.5"), 75),
    ("anthropic", "claude-haiku-4-5", 1, Decimal("0.1"), 5),
    ("openai", "gpt-5", Decimal("1.25"), Decimal("0.125"), 10),
    ("openai", "gpt-5-mini", Decimal("0.25"), Decimal("0.025"), 2),
    ("openai", "gpt-4o", Decimal("2.5"), Decimal("1.25"), 10),
    ("gemini", "gemini-2.5-pro", Decimal("1.25"), Decimal("0.31"), 10),
    ("gemini", "gemini-2.5-flash", Decimal("0.3"), Decimal("0.075"), Decimal("2.5")),
]
AGENTS = ["claude-code", "codex", "gemini-cli", "aider"]
APIS = {"anthropic": "anthropic_messages", "openai": "openai_responses", "gemini": "gemini"}

SESSION_COLUMNS = (
    "id, task, agent, user, team, tags, ci, command, cwd, hostname, pid, max_usd, max_calls, "
    "started_at, ended_at, status, end_reason, exit_status, processes_stopped, tokencap_version"
)
CALL_COLUMNS = (
    "session_id, seq, started_at, ended_at, provider, api, method, path, model, "
    "agent_prompt_id, decision, refusal_reason, http_status, status, streamed, input_tokens, "
    "cache_read_tokens, cache_write_5m_tokens, cache_write_1h_tokens, output_tokens, "
    "reasoning_tokens, usage_estimated, cost_usd, cost_pico_usd, cost_estimated, latency_ms"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000, help="call rows in the ledger")
    parser.add_argument("--db", type=Path, help="ledger file to generate or reuse")
    parser.add_argument("--regenerate", action="store_true", help="build the ledger anew")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each report")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "report.json")
    args = parser.parse_args()

    db = args.db or Path(tempfile.gettempdir()) / f"tokencap-bench-report-{args.calls}.db"
    generation = None
    if args.regenerate or _call_count(db) != args.calls:
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            path.unlink(missing_ok=True)
        print(f"generating {args.calls:,} calls in {db} ...", file=sys.stderr)
        generation = generate(db, args.calls, datetime.now(UTC))

    env = {k: v for k, v in os.environ.items() if k != "TOKENCAP_DB"} | {"TOKENCAP_DB": str(db)}
    biggest = _biggest_session(db)
    commands = {
        "startup (tokencap --version)": ["--version"],
        "report (by task)": ["report", "--format", "json"],
        "report --by team,task": ["report", "--by", "team,task", "--format", "json"],
        "report --by model": ["report", "--by", "model", "--format", "json"],
        "report --by day --since 30d": ["report", "--by", "day", "--since", "30d", "-f", "json"],
        "report --by user --since 36h": ["report", "--by", "user", "--since", "36h", "-f", "json"],
        "report --by session --top 20": ["report", "--by", "session", "--top", "20", "-f", "json"],
        "report --tag pr=42 --by model": [
            "report",
            "--tag",
            "pr=42",
            "--by",
            "model",
            "-f",
            "json",
        ],
        "report --model claude-* --by provider,day": [
            *("report", "--model", "claude-*", "--by", "provider,day", "-f", "json"),
        ],
        "report --by task --format csv": ["report", "--format", "csv"],
        "sessions": ["sessions", "--format", "json"],
        f"report --session (its {biggest[1]:,} calls)": [
            *("report", "--session", biggest[0], "--format", "json"),
        ],
    }
    timings = {name: _time_command(argv, env, args.repeat) for name, argv in commands.items()}

    results = {
        "machine": _machine(),
        "ledger": {
            "calls": _call_count(db),
            "sessions": _scalar(db, "SELECT COUNT(*) FROM sessions"),
            "call_totals_rows": _scalar(db, "SELECT COUNT(*) FROM call_totals"),
            "file_mb": round(db.stat().st_size / 2**20, 1),
            "generation_s": generation,
        },
        "repeat": args.repeat,
        "seconds": timings,
        "totals_check": check_totals(db, env),
        "sum_over_calls_s": _time_sum_over_calls(db),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    _print_summary(results)
    return 0


# --- Generating the ledger ------------------------------------------------------------------


def generate(db: Path, calls: int, now: datetime) -> float:
    """Write a ledger of `calls` call rows, spread over sessions of the last 90 days.

    Most sessions make a few dozen calls and a few make hundreds. One in ten ends on a cap with
    its last call refused, and a few failed. Returns the seconds taken.
    """
    started = time.perf_counter()
    Ledger(db).close()  # the schema, migrations and triggers that tokencap itself creates
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    rng = random.Random(SEED)
    first_day = now - timedelta(days=DAYS)
    written = 0
    number = 0
    conn.execute("BEGIN")
    while written < calls:
        number += 1
        size = min(calls - written, max(1, int(rng.expovariate(1 / 50))))
        session, rows = _session(rng, number, size, first_day + timedelta(days=rng.random() * DAYS))
        conn.execute(
            f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES ({_marks(SESSION_COLUMNS)})", session
        )
        conn.executemany(
            f"INSERT INTO calls ({CALL_COLUMNS}) VALUES ({_marks(CALL_COLUMNS)})", rows
        )
        written += size
        if number % 2000 == 0:
            conn.execute("COMMIT")
            conn.execute("BEGIN")
            print(f"  {written:,} calls", file=sys.stderr)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    return round(time.perf_counter() - started, 1)


def _session(
    rng: random.Random, number: int, size: int, start: datetime
) -> tuple[tuple, list[tuple]]:
    provider, model, input_rate, cached_rate, output_rate = rng.choice(MODELS)
    status = rng.choices(["completed", "capped", "failed"], [86, 10, 4])[0]
    end_reason = {"completed": "exited", "capped": rng.choice(["max_usd", "max_calls"])}.get(
        status, "tokencap_error"
    )
    session_id = f"{start:%Y%m%d-%H%M%S}-{number:06x}"
    prompt = f"prompt-{number:x}"
    rows = []
    moment = start
    for seq in range(1, size + 1):
        refused = status == "capped" and seq == size
        input_tokens = rng.randrange(200, 20_000)
        cached = rng.randrange(0, 60_000)
        output = rng.randrange(20, 2_000)
        pico = (
            0
            if refused
            else int(
                (input_tokens * input_rate + cached * cached_rate + output * output_rate) * 10**6
            )
        )
        latency = rng.uniform(400, 9_000)
        ended = moment + timedelta(milliseconds=latency)
        rows.append(
            (
                session_id,
                seq,
                moment.isoformat(timespec="milliseconds"),
                ended.isoformat(timespec="milliseconds"),
                provider,
                APIS[provider],
                "POST",
                "/v1/messages",
                model,
                f"{prompt}-{(seq - 1) // 12}",  # the agent starts a new prompt every 12 calls
                "refused" if refused else "admitted",
                end_reason if refused else None,
                None if refused else 200,
                "refused" if refused else "ok",
                1,
                0 if refused else input_tokens,
                0 if refused else cached,
                0,
                0,
                0 if refused else output,
                0,
                0,
                str(from_pico(pico)),
                pico,
                0,
                None if refused else round(latency, 1),
            )
        )
        moment = ended + timedelta(seconds=rng.uniform(0.5, 20))
    session = (
        session_id,
        f"task-{rng.randrange(300)}",
        rng.choice(AGENTS),
        f"user{rng.randrange(40)}@example.test",
        f"team-{rng.randrange(6)}",
        json.dumps({"pr": str(rng.randrange(500))}),
        "{}",
        json.dumps(["agent"]),
        "/work",
        "bench-host",  # not this host, so no generated session is checked for liveness
        1,
        "5",
        None,
        start.isoformat(timespec="milliseconds"),
        moment.isoformat(timespec="milliseconds"),
        status,
        end_reason,
        86 if status == "capped" else 0,
        0,
        "bench",
    )
    return session, rows


# --- Measuring ------------------------------------------------------------------------------


def _time_command(argv: list[str], env: dict[str, str], repeat: int) -> dict:
    """Return the median wall and CPU seconds of `tokencap ARGV`, run `repeat` times.

    Wall time is what a user waits for, and grows when other work shares the CPUs; CPU time
    (user plus system, of the tokencap process) does not. `in_process` runs the same command
    line in this process, without the interpreter's start-up and imports.
    """
    walls, cpus, in_process = [], [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run([TOKENCAP, *argv], env=env, capture_output=True, text=True)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if result.returncode != 0:
            raise SystemExit(f"tokencap {' '.join(argv)} failed: {result.stderr}")

        started = time.perf_counter()
        invoked = CliRunner().invoke(app, argv, env={"TOKENCAP_DB": env["TOKENCAP_DB"]})
        in_process.append(time.perf_counter() - started)
        if invoked.exit_code != 0:
            raise SystemExit(f"tokencap {' '.join(argv)} failed in process: {invoked.output}")
    return {
        "wall_median": round(statistics.median(walls), 3),
        "wall_min": round(min(walls), 3),
        "cpu_median": round(statistics.median(cpus), 3),
        "in_process_median": round(statistics.median(in_process), 3),
    }


def check_totals(db: Path, env: dict[str, str]) -> dict:
    """Compare the report's totals with sums computed over every call row; raise if they differ."""
    report = subprocess.run(
        [TOKENCAP, "report", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    totals = json.loads(report.stdout)["totals"]
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    calls, pico, output = conn.execute(
        "SELECT COUNT(*) FILTER (WHERE decision = 'admitted'), SUM(cost_pico_usd), "
        "SUM(output_tokens) FROM calls"
    ).fetchone()
    conn.close()
    expected = {"calls": calls, "cost_usd": str(from_pico(pico)), "output_tokens": output}
    reported = {
        "calls": totals["calls"],
        "cost_usd": totals["cost_usd"],
        "output_tokens": totals["tokens"]["output_tokens"],
    }
    if reported != expected:
        raise SystemExit(f"report totals {reported} differ from the calls table {expected}")
    return reported


def _time_sum_over_calls(db: Path) -> float:
    """Seconds SQLite takes for the default report's query over the call rows themselves.

    This is the work that the `call_totals` table saves every report.
    """
    sums = ", ".join(f"SUM(c.{column})" for column in (*TOKEN_COLUMNS, "cost_pico_usd"))
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    started = time.perf_counter()
    conn.execute(
        f"SELECT s.task, COUNT(DISTINCT s.id), COUNT(*) FILTER (WHERE c.decision = 'admitted'), "
        f"{sums} FROM calls c JOIN sessions s ON s.id = c.session_id GROUP BY s.task"
    ).fetchall()
    elapsed = time.perf_counter() - started
    conn.close()
    return round(elapsed, 3)


def _print_summary(results: dict) -> None:
    ledger = results["ledger"]
    print(
        f"ledger: {ledger['calls']:,} calls in {ledger['sessions']:,} sessions, "
        f"{ledger['call_totals_rows']:,} call_totals rows, {ledger['file_mb']} MB"
    )
    print("  wall s   cpu s   in-process s")
    for name, timing in results["seconds"].items():
        print(
            f"  {timing['wall_median']:6.3f}  {timing['cpu_median']:6.3f}  "
            f"{timing['in_process_median']:6.3f}        {name}"
        )
    print(f"  totals match the calls table: {results['totals_check']}")
    seconds = results["sum_over_calls_s"]
    print(f"  the default report's query over the calls table instead: {seconds} s")


def _call_count(db: Path) -> int | None:
    if not db.exists():
        return None
    try:
        return _scalar(db, "SELECT COUNT(*) FROM calls")
    except sqlite3.Error:
        return None


def _biggest_session(db: Path) -> tuple[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    row = conn.execute(
        "SELECT session_id, SUM(call_rows) FROM call_totals GROUP BY session_id "
        "ORDER BY 2 DESC LIMIT 1"
    ).fetchone()
    conn.close()
    return row[0], row[1]


def _scalar(db: Path, sql: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def _marks(columns: str) -> str:
    return ", ".join("?" for _ in columns.split(","))


def _machine() -> dict:
    return {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date": datetime.now(UTC).date().isoformat(),
    }


if __name__ == "__main__":
    sys.exit(main())
