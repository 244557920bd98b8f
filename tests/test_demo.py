"""End-to-end tests of `tokencap demo` and the example agents, run as a user would run them.

Each test runs tokencap as a subprocess with its own ledger (`--db`) and its own
XDG_DATA_HOME. Every provider base URL points at a SimulatedProvider on 127.0.0.1, so no test
needs an API key or reaches the network.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tokencap.demo import DEFAULT_MAX_USD
from tokencap.errors import EXIT_CAPPED
from tokencap.prices import Pricer
from tokencap.simulator import SimulatedProvider
from tokencap.usage import Api, Usage, read_request

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOKENCAP = [sys.executable, "-m", "tokencap"]

# Upper bound for one tokencap run; it only keeps a broken test from hanging.
RUN_TIMEOUT = 120

# Variables that could send a call to a real provider or charge a real key.
PROVIDER_VARIABLES = (
    "ANTHROPIC_BASE_URL",
    "OPENAI_BASE_URL",
    "GOOGLE_GEMINI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "TOKENCAP_DB",
)


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    """Return an environment with no provider URLs or keys and a private data directory."""
    env = {k: v for k, v in os.environ.items() if k not in PROVIDER_VARIABLES}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )


def only_session(db: Path, env: dict[str, str]) -> dict[str, Any]:
    """Return the one session that `tokencap report --format json` lists for `db`."""
    report = run([*TOKENCAP, "report", "--db", str(db), "--format", "json"], env)
    assert report.returncode == 0, report.stderr
    sessions = json.loads(report.stdout)["sessions"]
    assert len(sessions) == 1, sessions
    return sessions[0]


def expected_demo_spend(env: dict[str, str], cap: Decimal) -> tuple[int, Decimal]:
    """Return how many demo calls fit under `cap`, and what they cost, by replaying the demo.

    The demo agent runs uncapped against a simulator, which records every request body. The
    same admission rule as tokencap's then applies to those bodies: a call is sent only if the
    spend so far plus the call's worst case (its input plus max_tokens of output) fits the cap.
    """
    with SimulatedProvider() as simulator:
        agent = run(
            [sys.executable, "-m", "tokencap.demo_agent"],
            env | {"ANTHROPIC_BASE_URL": simulator.url},
        )
        calls = simulator.calls
    assert agent.returncode == 0, agent.stderr

    pricer = Pricer()
    now = datetime.now(UTC)
    spent = Decimal(0)
    for admitted, call in enumerate(calls):
        body = json.loads(call.body)
        request = read_request(Api.ANTHROPIC_MESSAGES, body, "/v1/messages", {})
        estimate = pricer.estimate("anthropic", Api.ANTHROPIC_MESSAGES, request, now)
        if spent + estimate > cap:
            return admitted, spent
        usage = Usage(input_tokens=call.input_tokens, output_tokens=call.output_tokens)
        spent += pricer.cost("anthropic", call.model, usage, now).cost_usd
    return len(calls), spent


@pytest.mark.slow
def test_demo_stopped_by_dollar_cap(tmp_path: Path, user_env: dict[str, str]) -> None:
    db = tmp_path / "ledger.db"

    demo = run([*TOKENCAP, "demo", "--db", str(db)], user_env)

    assert demo.returncode == EXIT_CAPPED, demo.stderr
    assert "turn 1:" in demo.stdout
    assert "stopped by max_usd" in demo.stderr
    assert f" --db {shlex.quote(str(db))}" in demo.stderr
    assert "tokencap report --session " in demo.stderr

    session = only_session(db, user_env)
    assert session["task"] == "demo"
    assert session["agent"] == "demo-agent"
    assert session["end_reason"] == "max_usd"
    assert session["exit_status"] == EXIT_CAPPED
    assert session["calls"] >= 1
    assert session["refused_calls"] == 1
    # Non-streamed calls are admitted only if their worst case fits, so spend never passes the cap.
    assert Decimal(session["cost_usd"]) <= DEFAULT_MAX_USD

    expected_calls, expected_cost = expected_demo_spend(user_env, DEFAULT_MAX_USD)
    assert 5 <= expected_calls <= 10, "the default cap should stop the demo after 5 to 10 turns"
    assert session["calls"] == expected_calls
    assert Decimal(session["cost_usd"]) == expected_cost
    turn_lines = [line for line in demo.stdout.splitlines() if line.startswith("turn ")]
    assert len(turn_lines) == expected_calls


EXAMPLE_RUNS = [
    pytest.param("anthropic_agent.py", [], id="anthropic"),
    pytest.param("anthropic_agent.py", ["--stream"], id="anthropic-stream"),
    pytest.param("openai_agent.py", [], id="openai-chat"),
    pytest.param("openai_agent.py", ["--stream"], id="openai-chat-stream"),
    pytest.param("openai_agent.py", ["--api", "responses"], id="openai-responses"),
    pytest.param("openai_agent.py", ["--api", "responses", "--stream"], id="openai-resp-stream"),
    pytest.param("gemini_agent.py", [], id="gemini"),
    pytest.param("gemini_agent.py", ["--stream"], id="gemini-stream"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("script", "options"), EXAMPLE_RUNS)
def test_example_agent_stopped_by_call_cap(
    tmp_path: Path, user_env: dict[str, str], script: str, options: list[str]
) -> None:
    db = tmp_path / "ledger.db"
    agent = [sys.executable, str(EXAMPLES / script), "--calls", "5", *options]

    with SimulatedProvider() as simulator:
        env = user_env | simulator.environment()
        result = run([*TOKENCAP, "run", "--db", str(db), "--max-calls", "2", "--", *agent], env)
        received = simulator.inference_requests

    assert result.returncode == EXIT_CAPPED, result.stderr
    assert "stopped by max_calls" in result.stderr
    # Each call the SDK parsed ends its line with the usage it reported.
    assert result.stdout.count("output tokens]") == 2, result.stdout

    session = only_session(db, user_env)
    assert session["end_reason"] == "max_calls"
    assert session["calls"] == 2
    assert session["refused_calls"] == 1
    assert session["tokens"]["input_tokens"] > 0
    assert session["tokens"]["output_tokens"] > 0
    assert received == 2
