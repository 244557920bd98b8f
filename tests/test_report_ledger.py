"""The ledger side of reports: call totals kept by triggers, older ledgers, empty ledgers."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import query
from tests.fakeupstream import Behavior
from tests.test_cli import run_cli
from tokencap.ledger import Ledger

pytestmark = pytest.mark.slow

# The sums per session, hour, provider and model, computed from the call rows themselves.
CALL_SUMS = """
SELECT session_id, substr(started_at, 1, 13) AS hour, provider, COALESCE(model, '') AS model,
       COUNT(*) AS call_rows,
       SUM(decision = 'admitted') AS calls,
       SUM(decision = 'refused') AS refused_calls,
       SUM(input_tokens) AS input_tokens, SUM(cache_read_tokens) AS cache_read_tokens,
       SUM(cache_write_5m_tokens) AS cache_write_5m_tokens,
       SUM(cache_write_1h_tokens) AS cache_write_1h_tokens,
       SUM(output_tokens) AS output_tokens, SUM(reasoning_tokens) AS reasoning_tokens,
       SUM(cost_pico_usd) AS cost_pico_usd, SUM(cost_estimated) AS estimated_calls
FROM calls GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
"""
TOTALS = "SELECT * FROM call_totals ORDER BY 1, 2, 3, 4"


def as_dicts(rows: list[sqlite3.Row]) -> list[dict]:
    return [dict(row) for row in rows]


def test_totals_follow_streams_and_refusals(upstream, run_agent):
    # Streamed calls are written when they start and updated as they settle; the refused
    # call is written once. The totals must equal the sums over the rows either way.
    upstream.default = Behavior(input_tokens=900, output_tokens=120, cache_write_tokens=300)
    run_agent(["--task", "a"], "--api", "anthropic", "--stream", "--calls", "2")
    run_agent(["--task", "b"], "--api", "openai-chat", "--stream", "--include-usage")
    run = run_agent(["--max-calls", "1"], "--api", "gemini", "--calls", "3")

    totals = as_dicts(query(run.db, TOTALS))

    assert run.exit_code == 86, run.stderr
    assert totals == as_dicts(query(run.db, CALL_SUMS))
    assert sum(row["call_rows"] for row in totals) == 5
    assert sum(row["refused_calls"] for row in totals) == 1
    assert sum(row["cache_write_5m_tokens"] for row in totals) == 600


def test_older_ledger_gets_totals(upstream, run_agent, tokencap_env):
    upstream.default = Behavior(input_tokens=1200, output_tokens=340, cache_read_tokens=5000)
    run = run_agent(["--task", "old"], "--api", "anthropic", "--calls", "3")
    assert run.exit_code == 0, run.stderr
    before = json.loads(run_cli(["report", "-f", "json"], tokencap_env).stdout)["totals"]
    # Turn the ledger back into one written before the totals table existed.
    with sqlite3.connect(run.db) as conn:
        for trigger in ("call_totals_insert", "call_totals_update", "call_totals_delete"):
            conn.execute(f"DROP TRIGGER {trigger}")
        conn.execute("DROP TABLE call_totals")
        conn.execute("DROP INDEX idx_sessions_status")
        conn.execute("DELETE FROM _migrations WHERE name = 'm002_report_totals'")
    conn.close()

    result = run_cli(["report", "-f", "json"], tokencap_env)

    assert result.returncode == 0, result.stderr
    after = json.loads(result.stdout)["totals"]
    assert after == before
    assert after["calls"] == 3
    # 3 calls of 1200 * $3 + 5000 * $0.30 + 340 * $15 per million tokens
    assert after["cost_usd"] == "0.0306"
    assert as_dicts(query(run.db, TOTALS)) == as_dicts(query(run.db, CALL_SUMS))


# --- Empty ledgers --------------------------------------------------------------------------


@pytest.fixture(params=["missing", "empty"])
def empty_db(request, tmp_path) -> Path:
    """Return the path of a ledger that does not exist, or exists without sessions."""
    db = tmp_path / f"{request.param}.db"
    if request.param == "empty":
        Ledger(db).close()
    return db


def test_report_empty_ledger_formats(empty_db, tokencap_env):
    env = tokencap_env | {"TOKENCAP_DB": str(empty_db)}

    table = run_cli(["report"], env)
    markdown = run_cli(["report", "--format", "markdown"], env)
    data = run_cli(["report", "--format", "json"], env)
    text = run_cli(["report", "--format", "csv", "--by", "team,task"], env)

    for result in (table, markdown, data, text):
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
    assert (
        table.stdout == "No sessions recorded yet. Run an agent with `tokencap run -- COMMAND`.\n"
    )
    assert markdown.stdout == table.stdout
    document = json.loads(data.stdout)
    assert document["groups"] == []
    assert document["sessions"] == []
    assert document["totals"]["sessions"] == 0
    assert document["totals"]["cost_usd"] == "0"
    rows = list(csv.reader(io.StringIO(text.stdout)))
    assert rows[0][:3] == ["team", "task", "sessions"]
    assert rows[1:] == []
    assert empty_db.exists() == (empty_db.name == "empty.db")


def test_sessions_empty_ledger(empty_db, tokencap_env):
    env = tokencap_env | {"TOKENCAP_DB": str(empty_db)}

    table = run_cli(["sessions"], env)
    data = run_cli(["sessions", "--format", "json"], env)

    assert table.returncode == 0, table.stderr
    assert "No sessions recorded yet" in table.stdout
    assert json.loads(data.stdout) == {"sessions": []}


def test_grouping_by_model_without_calls(run_tokencap, tokencap_env):
    run = run_tokencap([], ["true"])

    result = run_cli(["report", "--by", "model"], tokencap_env)

    assert run.exit_code == 0, run.stderr
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("No model calls recorded yet")
