"""`tokencap report` over a ledger of six real runs: every grouping, filter and format.

The ledger is built once for the module by running the SDK agent under the real `tokencap run`
against the fake upstream, with usage numbers chosen so that every total is known exactly.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from tests.conftest import SDK_AGENT, TOKENCAP, query
from tests.fakeupstream import Behavior, FakeUpstream
from tests.test_cli import run_cli
from tokencap.cli import app

pytestmark = pytest.mark.slow

SONNET = "claude-sonnet-4-5-20250929"
GPT_4O = "gpt-4o-2024-08-06"
FLASH = "gemini-2.5-flash"


@dataclass
class Book:
    """The module's ledger: its path, the environment to run tokencap in, and its sessions."""

    db: Path
    env: dict[str, str]
    ids: dict[str, str]  # S1 ... S6, in the order they ran
    between: datetime  # a moment after S3 ended and before S4 started


# Each session: name, tokencap options, agent flags (None: no model call), fake usage.
SESSIONS = [
    (
        "S1",
        ["--task", "fix-login", "--agent", "claude-code", "--user", "ana@example.test"]
        + ["--team", "payments", "--tag", "pr=101"],
        ["--api", "anthropic", "--model", SONNET, "--calls", "2"],
        # 1200 * $3 + 5000 * $0.30 + 340 * $15 per million tokens = $0.0102 per call
        Behavior(input_tokens=1200, output_tokens=340, cache_read_tokens=5000),
    ),
    (
        "S2",
        ["--task", "fix-login", "--agent", "codex", "--user", "ben@example.test"]
        + ["--team", "payments", "--tag", "pr=101"],
        ["--api", "openai-chat", "--model", GPT_4O, "--calls", "3"],
        # (3000 - 1000) * $2.50 + 1000 * $1.25 + 500 * $10 per million = $0.01125 per call
        Behavior(input_tokens=3000, output_tokens=500, cache_read_tokens=1000),
    ),
    (
        "S3",
        ["--task", "refactor-db", "--agent", "gemini", "--user", "ana@example.test"]
        + ["--team", "platform", "--tag", "pr=202"],
        ["--api", "gemini", "--model", FLASH],
        # 10000 * $0.30 + (800 + 200) * $2.50 per million = $0.0055
        Behavior(input_tokens=10_000, output_tokens=800, reasoning_tokens=200),
    ),
    (
        "S4",
        ["--task", "refactor-db", "--agent", "claude-code", "--user", "ben@example.test"]
        + ["--team", "platform", "--tag", "pr=202", "--max-calls", "2"],
        ["--api", "anthropic", "--model", SONNET, "--calls", "5"],
        # 1000 * $3 + 100 * $15 per million = $0.0045 per call; the third call is refused
        Behavior(input_tokens=1000, output_tokens=100),
    ),
    (
        "S5",
        ["--agent", "script", "--user", "cara@example.test"],
        ["--api", "openai-responses", "--model", GPT_4O],
        # 4000 * $2.50 + 250 * $10 per million = $0.0125
        Behavior(input_tokens=4000, output_tokens=250, reasoning_tokens=50),
    ),
    (
        "S6",
        ["--task", "empty", "--agent", "noop", "--user", "cara@example.test"]
        + ["--team", "payments"],
        None,
        None,
    ),
]

TOTAL_TOKENS = {
    "input_tokens": 2400 + 6000 + 10_000 + 2000 + 4000,
    "cache_read_tokens": 10_000 + 3000,
    "cache_write_5m_tokens": 0,
    "cache_write_1h_tokens": 0,
    "output_tokens": 680 + 1500 + 1000 + 200 + 250,
    "reasoning_tokens": 200 + 50,
}
TOTAL_COST = Decimal("0.08115")


def report_environment(tmp: Path, upstream: FakeUpstream) -> dict[str, str]:
    """Return an environment whose providers point at `upstream`, outside any CI job."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ANTHROPIC_", "OPENAI_", "GOOGLE_", "GEMINI_", "TOKENCAP_"))
        and not key.startswith(("GITHUB_", "GITLAB_", "CI_"))
    }
    return env | {
        "XDG_DATA_HOME": str(tmp / "data"),
        "TOKENCAP_DB": str(tmp / "ledger.db"),
        "ANTHROPIC_BASE_URL": upstream.url,
        "OPENAI_BASE_URL": upstream.url + "/v1",
        "GOOGLE_GEMINI_BASE_URL": upstream.url,
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Book:
    tmp = tmp_path_factory.mktemp("report")
    ids: dict[str, str] = {}
    between = None
    with FakeUpstream() as upstream:
        env = report_environment(tmp, upstream)
        for name, options, agent_args, behavior in SESSIONS:
            if name == "S4":
                time.sleep(0.05)
                between = datetime.now(UTC)
                time.sleep(0.05)
            if agent_args is None:
                command = [sys.executable, "-c", "pass"]
            else:
                upstream.default = behavior
                out = tmp / f"{name}.jsonl"
                command = [sys.executable, str(SDK_AGENT), "--out", str(out), *agent_args]
            result = subprocess.run(
                [str(TOKENCAP), "run", *options, "--", *command],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                stdin=subprocess.DEVNULL,
            )
            assert result.returncode == (86 if name == "S4" else 0), result.stderr
            rows = query(tmp / "ledger.db", "SELECT id FROM sessions ORDER BY started_at")
            ids[name] = rows[-1]["id"]
    assert between is not None
    return Book(tmp / "ledger.db", env, ids, between)


def invoke(book: Book, *args: str) -> Result:
    """Run the tokencap command line in this process against the module's ledger.

    The report commands only read the ledger, so running them in-process tests the same code
    as the executable in a fraction of the time; the tests of terminal output start it.
    """
    return CliRunner().invoke(app, list(args), env={"TOKENCAP_DB": str(book.db)})


def tokencap(book: Book, *args: str) -> str:
    """Return the stdout of `tokencap ARGS`, which must succeed."""
    result = invoke(book, *args)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def tokencap_process(book: Book, *args: str, **env: str) -> str:
    """Return the stdout of the tokencap executable, started with its output in a pipe."""
    result = run_cli(list(args), book.env | env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def report_json(book: Book, *args: str) -> dict:
    return json.loads(tokencap(book, "report", "--format", "json", *args))


def summary(entry: dict) -> tuple[int, int, Decimal]:
    """Return (sessions, calls, cost) of a group or of the totals."""
    return entry["sessions"], entry["calls"], Decimal(entry["cost_usd"])


# --- Totals and grouping --------------------------------------------------------------------


def test_report_by_task_default(book):
    data = report_json(book)

    assert data["group_by"] == ["task"]
    assert [group["task"] for group in data["groups"]] == [
        "fix-login",
        "refactor-db",
        None,
        "empty",
    ]
    fix, refactor, untasked, empty = data["groups"]
    assert summary(fix) == (2, 5, Decimal("0.05415"))
    assert summary(refactor) == (2, 3, Decimal("0.0145"))
    assert refactor["capped_sessions"] == 1
    assert refactor["refused_calls"] == 1
    assert summary(untasked) == (1, 1, Decimal("0.0125"))
    assert summary(empty) == (1, 0, Decimal(0))
    assert fix["tokens"] == {
        "input_tokens": 2400 + 6000,
        "cache_read_tokens": 10_000 + 3000,
        "cache_write_5m_tokens": 0,
        "cache_write_1h_tokens": 0,
        "output_tokens": 680 + 1500,
        "reasoning_tokens": 0,
    }
    assert data["group_count"] == 4


def test_report_totals_exact(book):
    totals = report_json(book)["totals"]

    assert summary(totals) == (6, 9, TOTAL_COST)
    assert totals["capped_sessions"] == 1
    assert totals["refused_calls"] == 1
    assert totals["tokens"] == TOTAL_TOKENS
    assert totals["cost_usd"] == "0.08115"
    assert totals["cost_estimated"] is False


def test_report_totals_match_calls_table(book):
    totals = report_json(book)["totals"]
    (ledger,) = query(
        book.db,
        "SELECT COUNT(*) FILTER (WHERE decision = 'admitted') AS calls,"
        " COUNT(*) FILTER (WHERE decision = 'refused') AS refused,"
        " SUM(cost_pico_usd) AS pico, SUM(input_tokens) AS input, SUM(output_tokens) AS output"
        " FROM calls",
    )

    assert totals["calls"] == ledger["calls"]
    assert totals["refused_calls"] == ledger["refused"]
    assert Decimal(totals["cost_usd"]) == Decimal(ledger["pico"]) / 10**12
    assert totals["tokens"]["input_tokens"] == ledger["input"]
    assert totals["tokens"]["output_tokens"] == ledger["output"]


# Grouping key, then each group's key value and (sessions, calls, cost).
GROUPINGS = {
    "agent": {
        "claude-code": (2, 4, "0.0294"),
        "codex": (1, 3, "0.03375"),
        "script": (1, 1, "0.0125"),
        "gemini": (1, 1, "0.0055"),
        "noop": (1, 0, "0"),
    },
    "user": {
        "ben@example.test": (2, 5, "0.04275"),
        "ana@example.test": (2, 3, "0.0259"),
        "cara@example.test": (2, 1, "0.0125"),
    },
    "team": {
        "payments": (3, 5, "0.05415"),
        "platform": (2, 3, "0.0145"),
        None: (1, 1, "0.0125"),
    },
    "model": {
        GPT_4O: (2, 4, "0.04625"),
        SONNET: (2, 4, "0.0294"),
        FLASH: (1, 1, "0.0055"),
    },
    "provider": {
        "openai": (2, 4, "0.04625"),
        "anthropic": (2, 4, "0.0294"),
        "gemini": (1, 1, "0.0055"),
    },
    "tag:pr": {
        "101": (2, 5, "0.05415"),
        "202": (2, 3, "0.0145"),
        None: (2, 1, "0.0125"),
    },
}


@pytest.mark.parametrize("key", sorted(GROUPINGS))
def test_report_by_key(key, book):
    data = report_json(book, "--by", key)

    expected = {
        value: (sessions, calls, Decimal(cost))
        for value, (sessions, calls, cost) in GROUPINGS[key].items()
    }
    assert {group[key]: summary(group) for group in data["groups"]} == expected
    # Groups are ordered by cost, highest first.
    costs = [Decimal(group["cost_usd"]) for group in data["groups"]]
    assert costs == sorted(costs, reverse=True)
    assert Decimal(data["totals"]["cost_usd"]) == TOTAL_COST
    assert data["totals"]["calls"] == 9


def test_report_by_session(book):
    data = report_json(book, "--by", "session")

    by_id = {group["session"]: summary(group) for group in data["groups"]}
    assert by_id == {
        book.ids["S1"]: (1, 2, Decimal("0.0204")),
        book.ids["S2"]: (1, 3, Decimal("0.03375")),
        book.ids["S3"]: (1, 1, Decimal("0.0055")),
        book.ids["S4"]: (1, 2, Decimal("0.009")),
        book.ids["S5"]: (1, 1, Decimal("0.0125")),
        book.ids["S6"]: (1, 0, Decimal(0)),
    }
    capped = [group["session"] for group in data["groups"] if group["capped_sessions"]]
    assert capped == [book.ids["S4"]]


def test_report_by_day(book):
    data = report_json(book, "--by", "day")

    days = {
        row["day"] for row in query(book.db, "SELECT substr(started_at, 1, 10) AS day FROM calls")
    }
    assert {group["day"] for group in data["groups"]} == days
    assert sum(group["calls"] for group in data["groups"]) == 9
    assert sum(Decimal(group["cost_usd"]) for group in data["groups"]) == TOTAL_COST
    # A session without calls has no day.
    assert data["totals"]["sessions"] == 5


def test_report_by_two_keys(book):
    data = report_json(book, "--by", "team,task")

    assert data["group_by"] == ["team", "task"]
    assert {(g["team"], g["task"]): summary(g) for g in data["groups"]} == {
        ("payments", "fix-login"): (2, 5, Decimal("0.05415")),
        ("platform", "refactor-db"): (2, 3, Decimal("0.0145")),
        (None, None): (1, 1, Decimal("0.0125")),
        ("payments", "empty"): (1, 0, Decimal(0)),
    }


def test_report_by_repeated_option(book):
    data = report_json(book, "--by", "team", "--by", "task")

    assert data["group_by"] == ["team", "task"]
    assert len(data["groups"]) == 4


# --- Filters --------------------------------------------------------------------------------

# Filter options, then the totals (sessions, calls, cost) they select.
FILTERS = {
    "task": (["--task", "fix-login"], (2, 5, "0.05415")),
    "task-pattern": (["--task", "fix-*"], (2, 5, "0.05415")),
    "two-tasks": (["--task", "fix-login", "--task", "empty"], (3, 5, "0.05415")),
    "tasks-with-comma": (["--task", "fix-login,empty"], (3, 5, "0.05415")),
    "agent": (["--agent", "claude-code"], (2, 4, "0.0294")),
    "user": (["--user", "ana@example.test"], (2, 3, "0.0259")),
    "team": (["--team", "platform"], (2, 3, "0.0145")),
    "tag": (["--tag", "pr=202"], (2, 3, "0.0145")),
    "tag-no-match": (["--tag", "pr=999"], (0, 0, "0")),
    "status-capped": (["--status", "capped"], (1, 2, "0.009")),
    "status-completed": (["--status", "completed"], (5, 7, "0.07215")),
    "status-two": (["--status", "capped,completed"], (6, 9, "0.08115")),
    "status-running": (["--status", "running"], (0, 0, "0")),
    "model": (["--model", "claude-*"], (2, 4, "0.0294")),
    "provider": (["--provider", "openai"], (2, 4, "0.04625")),
    "team-and-agent": (["--team", "payments", "--agent", "codex"], (1, 3, "0.03375")),
    "whole-days": (["--since", "2000-01-01", "--until", "2999-12-31"], (6, 9, "0.08115")),
    "future": (["--since", "2999-01-01"], (0, 0, "0")),
}


@pytest.mark.parametrize("case", sorted(FILTERS))
def test_report_filter(case, book):
    options, (sessions, calls, cost) = FILTERS[case]

    totals = report_json(book, *options)["totals"]

    assert summary(totals) == (sessions, calls, Decimal(cost))


def test_report_filter_session(book):
    data = report_json(book, "--session", book.ids["S3"], "--by", "model")

    assert [(g["model"], summary(g)) for g in data["groups"]] == [
        (FLASH, (1, 1, Decimal("0.0055")))
    ]
    assert data["filters"] == {"session": [book.ids["S3"]]}


def test_report_since_time(book):
    data = report_json(book, "--since", book.between.isoformat())

    # S4, S5 and S6 ran after the moment; S1 to S3 had ended before it.
    assert summary(data["totals"]) == (3, 3, Decimal("0.0215"))
    assert {s["session_id"] for s in data["sessions"]} == {
        book.ids["S4"],
        book.ids["S5"],
        book.ids["S6"],
    }


def test_report_until_time(book):
    data = report_json(book, "--until", book.between.isoformat())

    assert summary(data["totals"]) == (3, 6, Decimal("0.05965"))


def test_report_since_age(book):
    data = report_json(book, "--since", "2h", "--by", "provider")

    assert summary(data["totals"]) == (5, 9, TOTAL_COST)
    assert data["filters"]["since"].endswith("+00:00")


def test_report_model_filter_with_time(book):
    data = report_json(book, "--since", book.between.isoformat(), "--model", SONNET)

    # Only S4's two admitted calls and its refused one are Sonnet calls after the moment.
    assert summary(data["totals"]) == (1, 2, Decimal("0.009"))
    assert data["totals"]["refused_calls"] == 1


# --- Order and length ------------------------------------------------------------------------


def test_report_sort_by_calls(book):
    data = report_json(book, "--by", "agent", "--sort", "calls")

    assert [group["agent"] for group in data["groups"]] == [
        "claude-code",
        "codex",
        "script",
        "gemini",
        "noop",
    ]


def test_report_sort_by_name(book):
    data = report_json(book, "--by", "user", "--sort", "name")

    assert [group["user"] for group in data["groups"]] == [
        "ana@example.test",
        "ben@example.test",
        "cara@example.test",
    ]


def test_report_top(book):
    data = report_json(book, "--by", "agent", "--top", "2")

    assert [group["agent"] for group in data["groups"]] == ["codex", "claude-code"]
    assert data["group_count"] == 5
    assert Decimal(data["totals"]["cost_usd"]) == TOTAL_COST


# --- Formats --------------------------------------------------------------------------------


def test_report_json_sessions_list(book):
    data = report_json(book, "--limit", "4")

    sessions = data["sessions"]
    assert [s["session_id"] for s in sessions] == [book.ids[n] for n in ("S6", "S5", "S4", "S3")]
    capped = sessions[2]
    assert capped["status"] == "capped"
    assert capped["end_reason"] == "max_calls"
    assert capped["calls"] == 2
    assert capped["refused_calls"] == 1
    assert capped["cost_usd"] == "0.009"
    assert capped["max_calls"] == 2
    assert capped["tags"] == {"pr": "202"}
    assert capped["stale"] is False
    assert capped["exit_status"] == 86


def test_report_csv_parses(book):
    text = tokencap(book, "report", "--format", "csv", "--by", "team,task")

    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(row["team"], row["task"]) for row in rows] == [
        ("payments", "fix-login"),
        ("platform", "refactor-db"),
        ("", ""),
        ("payments", "empty"),
    ]
    first = rows[0]
    assert first["sessions"] == "2"
    assert first["calls"] == "5"
    assert first["input_tokens"] == "8400"
    assert first["cache_read_tokens"] == "13000"
    assert first["output_tokens"] == "2180"
    assert first["cost_usd"] == "0.05415"
    assert first["cost_estimated"] == "false"
    assert sum(Decimal(row["cost_usd"]) for row in rows) == TOTAL_COST
    assert rows[1]["capped_sessions"] == "1"
    assert rows[1]["refused_calls"] == "1"


def markdown_rows(text: str) -> list[list[str]]:
    """Return the cells of each row of the first markdown table in `text`, header first."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_report_markdown_rows(book):
    text = tokencap(book, "report", "--format", "markdown", "--by", "provider")

    header, separator, *rows = markdown_rows(text)
    assert header[0] == "provider"
    assert header[-1] == "cost"
    assert set("".join(separator)) <= set("-: ")
    assert [row[0] for row in rows] == ["openai", "anthropic", "gemini", "**total**"]
    calls = header.index("calls")
    assert [row[calls] for row in rows] == ["4", "4", "1", "**9**"]
    sessions = header.index("sessions")
    assert rows[-1][sessions] == "**5**"
    assert text.startswith("### tokencap spend by provider")


def test_report_markdown_shows_filters(book):
    text = tokencap(book, "report", "--format", "markdown", "--team", "platform")

    assert "Filters: team platform" in text
    _, _, *rows = markdown_rows(text)
    assert [row[0] for row in rows] == ["refactor-db", "**total**"]


def test_report_table_piped_is_plain(book):
    text = tokencap_process(book, "report", "--by", "team,task", NO_COLOR="1", COLUMNS="80")

    assert "\x1b[" not in text
    assert "tokencap spend by team, task" in text
    lines = [line for line in text.splitlines() if "fix-login" in line]
    assert len(lines) == 1
    assert "payments" in lines[0]
    assert "$0.0542" in lines[0]
    assert any(line.strip("│┃ ").startswith("total") for line in text.splitlines())


def test_report_table_shows_filters_and_top(book):
    text = tokencap(book, "report", "--by", "agent", "--top", "1", "--since", "2000-01-01")

    assert "since 2000-01-01 00:00 UTC" in text
    assert "1 of 5 groups shown" in text
    assert "codex" in text
    assert "noop" not in text


# --- Sessions command -----------------------------------------------------------------------


def test_sessions_newest_first(book):
    sessions = json.loads(tokencap(book, "sessions", "--format", "json"))["sessions"]

    assert [s["session_id"] for s in sessions] == [book.ids[f"S{i}"] for i in range(6, 0, -1)]
    assert [s["status"] for s in sessions] == ["completed"] * 2 + ["capped"] + ["completed"] * 3
    assert sum(Decimal(s["cost_usd"]) for s in sessions) == TOTAL_COST


def test_sessions_filters_and_limit(book):
    sessions = json.loads(
        tokencap(book, "sessions", "--format", "json", "--team", "payments", "--limit", "2")
    )["sessions"]

    assert [s["session_id"] for s in sessions] == [book.ids["S6"], book.ids["S2"]]


def test_sessions_model_filter(book):
    sessions = json.loads(tokencap(book, "sessions", "--format", "json", "--model", FLASH))[
        "sessions"
    ]

    assert [s["session_id"] for s in sessions] == [book.ids["S3"]]


def test_sessions_csv_and_markdown(book):
    rows = list(csv.DictReader(io.StringIO(tokencap(book, "sessions", "--format", "csv"))))
    text = tokencap(book, "sessions", "--format", "markdown")

    assert [row["session_id"] for row in rows][-1] == book.ids["S1"]
    assert rows[2]["status"] == "capped"
    assert rows[2]["end_reason"] == "max_calls"
    assert json.loads(rows[2]["tags"]) == {"pr": "202"}
    assert rows[2]["cost_usd"] == "0.009"
    _, _, *md_rows = markdown_rows(text)
    assert [row[0] for row in md_rows] == [f"`{book.ids[f'S{i}']}`" for i in range(6, 0, -1)]
    assert md_rows[2][1] == "capped (max_calls)"


def test_sessions_table(book):
    text = tokencap_process(book, "sessions", COLUMNS="80")

    for name in ("S1", "S4", "S6"):
        assert book.ids[name] in text
    assert "capped (max_calls)" in text
    assert "2 of 2 (+1 refused)" in text


# --- Errors ---------------------------------------------------------------------------------

# Options, then text that stderr must contain.
INVALID = {
    "by": (["--by", "colour"], ["--by 'colour'", "task, session"]),
    "by-empty-tag": (["--by", "tag:"], ["--by 'tag:'", "tag:pr"]),
    "by-twice": (["--by", "task,task"], ["task appears twice"]),
    "since": (["--since", "last tuesday"], ["--since 'last tuesday'", "7d"]),
    "until-date": (["--until", "2026-02-30"], ["--until '2026-02-30'"]),
    "range": (["--since", "2026-12-02", "--until", "2026-12-01"], ["is not before"]),
    "status": (["--status", "done"], ["--status 'done'", "completed, capped"]),
    "tag": (["--tag", "pr"], ["--tag 'pr'", "KEY=VALUE"]),
    "session": (["--session", "no-such-session"], ["no session 'no-such-session'"]),
    "format": (["--format", "xml"], ["'xml'", "--format"]),
    "detail-with-filter": (["--session", "2", "--task", "x"], ["add --by"]),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_report_invalid_option(case, book):
    options, expected = INVALID[case]

    result = invoke(book, "report", *options)

    assert result.exit_code == 2
    assert result.stdout == ""
    for text in expected:
        assert text in result.stderr


def test_report_ambiguous_session(book):
    # Every session id starts with the year, so a year matches all six.
    prefix = book.ids["S1"][:4]

    result = invoke(book, "report", "--session", prefix)

    assert result.exit_code == 2
    assert "matches several sessions" in result.stderr


def test_report_filters_match_nothing(book):
    table = tokencap(book, "report", "--team", "nobody")
    data = report_json(book, "--team", "nobody")

    assert table.strip() == "No sessions match these filters."
    assert data["groups"] == []
    assert data["totals"]["sessions"] == 0
    assert data["totals"]["cost_usd"] == "0"
