"""`tokencap report --session ID`: one real run in detail, with its calls, prompts and chart."""

from __future__ import annotations

import csv
import io
import json
import sys
import textwrap
from decimal import Decimal

import pytest

from tests.fakeupstream import Behavior
from tests.test_cli import run_cli

pytestmark = pytest.mark.slow

# Three calls for prompt-A, two for prompt-B, then one without a prompt id, each with the
# Anthropic SDK. Anthropic's metadata.user_id is the agent's own prompt id in the ledger.
PROMPTS_AGENT = textwrap.dedent(
    """
    import anthropic

    client = anthropic.Anthropic(api_key="test-key-anthropic", max_retries=0)
    for prompt_id, calls in (("prompt-A", 3), ("prompt-B", 2), (None, 1)):
        for _ in range(calls):
            extra = {"metadata": {"user_id": prompt_id}} if prompt_id else {}
            client.messages.create(
                model="claude-sonnet-4-5-20250929",
                max_tokens=50,
                messages=[{"role": "user", "content": "hello"}],
                **extra,
            )
    """
)

# 1000 * $3 + 100 * $15 per million tokens.
CALL_COST = Decimal("0.0045")


def detail(env: dict[str, str], session_id: str, output_format: str = "json") -> str:
    """Return the stdout of `tokencap report --session ID --format FORMAT`."""
    result = run_cli(["report", "--session", session_id, "--format", output_format], env)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def fan_out(upstream, run_tokencap, tmp_path):
    """Run the prompts agent under a $0.03 cap and return the run."""
    upstream.default = Behavior(input_tokens=1000, output_tokens=100)
    script = tmp_path / "prompts_agent.py"
    script.write_text(PROMPTS_AGENT)
    run = run_tokencap(["--task", "fan-out", "--max-usd", "0.03"], [sys.executable, str(script)])
    assert run.exit_code == 0, run.stderr
    return run


def test_session_json_detail(fan_out, tokencap_env):
    data = json.loads(detail(tokencap_env, fan_out.session()["id"]))

    calls = data["calls"]
    assert [call["seq"] for call in calls] == [1, 2, 3, 4, 5, 6]
    assert [call["agent_prompt_id"] for call in calls] == [
        *["prompt-A"] * 3,
        *["prompt-B"] * 2,
        None,
    ]
    assert [Decimal(call["cost_usd"]) for call in calls] == [CALL_COST] * 6
    assert [Decimal(call["cumulative_cost_usd"]) for call in calls] == [
        CALL_COST * n for n in range(1, 7)
    ]
    assert {call["decision"] for call in calls} == {"admitted"}
    assert {call["status"] for call in calls} == {"ok"}
    assert calls[0]["tokens"]["input_tokens"] == 1000
    assert calls[0]["tokens"]["output_tokens"] == 100
    assert calls[0]["model"] == "claude-sonnet-4-5-20250929"
    assert calls[0]["provider"] == "anthropic"
    assert data["prompts"] == [
        {
            "agent_prompt_id": "prompt-A",
            "calls": 3,
            "refused_calls": 0,
            "first_seq": 1,
            "last_seq": 3,
            "tokens": {
                "input_tokens": 3000,
                "cache_read_tokens": 0,
                "cache_write_5m_tokens": 0,
                "cache_write_1h_tokens": 0,
                "output_tokens": 300,
                "reasoning_tokens": 0,
            },
            "cost_usd": "0.0135",
        },
        {
            "agent_prompt_id": "prompt-B",
            "calls": 2,
            "refused_calls": 0,
            "first_seq": 4,
            "last_seq": 5,
            "tokens": {
                "input_tokens": 2000,
                "cache_read_tokens": 0,
                "cache_write_5m_tokens": 0,
                "cache_write_1h_tokens": 0,
                "output_tokens": 200,
                "reasoning_tokens": 0,
            },
            "cost_usd": "0.009",
        },
    ]
    session = data["session"]
    assert session["task"] == "fan-out"
    assert session["status"] == "completed"
    assert session["end_reason"] == "exited"
    assert session["max_usd"] == "0.03"
    assert session["max_calls"] is None
    assert session["calls"] == 6
    assert session["cost_usd"] == "0.027"
    assert session["command"][1].endswith("prompts_agent.py")
    assert session["stale"] is False
    assert session["ci"] == {}


def test_session_table_csv_and_markdown(fan_out, tokencap_env):
    session_id = fan_out.session()["id"]

    text = detail(tokencap_env, session_id, "table")
    rows = list(csv.DictReader(io.StringIO(detail(tokencap_env, session_id, "csv"))))
    markdown = detail(tokencap_env, session_id, "markdown")

    assert session_id in text
    assert "Calls per agent prompt id" in text
    prompt_rows = [line for line in text.splitlines() if "prompt-A" in line or "prompt-B" in line]
    assert len(prompt_rows) == 2
    assert "$0.0135" in prompt_rows[0]
    # The call table starts a new section where the prompt id changes: after calls 3 and 5.
    calls_table = text[text.index("Calls in order") :]
    assert calls_table.count("├") == 2
    (spend,) = [line for line in text.splitlines() if line.startswith("spend ")]
    assert spend.split(None, 1)[1].strip() == "$0.0270 of $0.03 (90.0%)"
    assert "cap $0.03" in text
    assert "6 calls, $0.0270 spent of $0.03 (90.0%)" in text
    assert [row["seq"] for row in rows] == ["1", "2", "3", "4", "5", "6"]
    assert rows[-1]["cumulative_cost_usd"] == "0.027"
    assert rows[0]["agent_prompt_id"] == "prompt-A"
    assert rows[-1]["agent_prompt_id"] == ""
    assert rows[0]["streamed"] == "false"
    assert markdown.startswith(f"### tokencap session `{session_id}`")
    assert "- **task:** fan-out" in markdown
    assert "| P1 | `prompt-A` | 3 | 0 | #1–#3 | $0.0135 |" in markdown
    call_rows = [line for line in markdown.splitlines() if line.startswith("| 6 |")]
    assert len(call_rows) == 1
    assert "$0.0270" in call_rows[0]
    assert "```text" in markdown

    # A session can be named by the unique start or end of its id.
    by_end = json.loads(detail(tokencap_env, session_id[-6:]))
    by_start = json.loads(detail(tokencap_env, session_id[:17]))

    assert by_end["session"]["session_id"] == session_id
    assert by_start["session"]["session_id"] == session_id


def test_session_refused_by_dollar_cap(upstream, run_agent, tokencap_env):
    upstream.default = Behavior(input_tokens=1000, output_tokens=100)

    # After two calls ($0.009) the third call's worst case passes the $0.01 cap.
    run = run_agent(["--max-usd", "0.01"], "--api", "anthropic", "--calls", "5")
    data = json.loads(detail(tokencap_env, run.session()["id"]))
    text = detail(tokencap_env, run.session()["id"], "table")

    assert run.exit_code == 86, run.stderr
    assert data["session"]["status"] == "capped"
    assert data["session"]["end_reason"] == "max_usd"
    assert [call["decision"] for call in data["calls"]] == ["admitted", "admitted", "refused"]
    assert data["calls"][2]["refusal_reason"] == "max_usd"
    assert data["calls"][2]["cost_usd"] == "0"
    assert data["calls"][2]["cumulative_cost_usd"] == "0.009"
    assert "refused (max_usd)" in text
    assert "2 calls, $0.0090 spent of $0.01 (90.0%)" in text
    assert "max_usd, exit status 86" in text


def test_session_unknown_model_marked_estimated(upstream, run_agent, tokencap_env):
    upstream.default = Behavior(input_tokens=1000, output_tokens=100)

    run = run_agent([], "--api", "anthropic", "--model", "claude-no-such-model-test")
    data = json.loads(detail(tokencap_env, run.session()["id"]))
    text = detail(tokencap_env, run.session()["id"], "table")

    assert run.exit_code == 0, run.stderr
    assert data["calls"][0]["cost_estimated"] is True
    assert data["session"]["cost_estimated"] is True
    assert "* includes calls to models with no known price" in text


def test_session_without_calls(run_tokencap, tokencap_env):
    run = run_tokencap(["--task", "quiet"], [sys.executable, "-c", "pass"])

    data = json.loads(detail(tokencap_env, run.session()["id"]))
    text = detail(tokencap_env, run.session()["id"], "table")

    assert data["calls"] == []
    assert data["prompts"] == []
    assert data["session"]["cost_usd"] == "0"
    assert "No model calls were recorded in this session." in text


def test_session_without_ledger(tokencap_env, tmp_path):
    missing = tmp_path / "missing.db"

    result = run_cli(["report", "--session", "20261204", "--db", str(missing)], tokencap_env)

    assert result.returncode == 2
    assert f"there is no ledger at {missing}" in result.stderr
    assert not missing.exists()
