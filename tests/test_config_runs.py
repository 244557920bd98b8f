"""Budget files in real runs: caps, attribution and prices from tokencap.toml, flags on top.

Each test writes a tokencap.toml into a project directory and runs the real `tokencap run`
there, with an SDK agent against the fake upstream.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import TESTS, query
from tests.fakeupstream import Behavior, FakeUpstream, TestCA
from tokencap.errors import EXIT_CAPPED, EXIT_USAGE

pytestmark = pytest.mark.slow

SONNET = "claude-sonnet-4-5-20250929"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


def only_call(run):
    assert run.exit_code == 0, run.stderr
    (call,) = run.calls()
    return call


# --- Caps and attribution ------------------------------------------------------------------


def test_file_call_cap_stops_run(upstream, run_agent, project):
    (project / "tokencap.toml").write_text("[run]\nmax_calls = 2\n")

    run = run_agent([], "--api", "anthropic", "--calls", "5", cwd=project)

    assert run.exit_code == EXIT_CAPPED
    assert len(upstream.inference_requests()) == 2
    assert run.session()["max_calls"] == 2
    assert "stopped by max_calls" in run.stderr


def test_flag_beats_file_cap(upstream, run_agent, project):
    (project / "tokencap.toml").write_text("[run]\nmax_calls = 2\n")

    run = run_agent(["--max-calls", "3"], "--api", "anthropic", "--calls", "5", cwd=project)

    assert run.exit_code == EXIT_CAPPED
    assert len(upstream.inference_requests()) == 3
    assert run.session()["max_calls"] == 3


def test_environment_beats_file_cap(upstream, run_agent, project):
    (project / "tokencap.toml").write_text("[run]\nmax_calls = 2\n")

    run = run_agent([], "--api", "anthropic", "--calls", "5", cwd=project, TOKENCAP_MAX_CALLS="4")

    assert run.exit_code == EXIT_CAPPED
    assert len(upstream.inference_requests()) == 4


def test_task_table_sets_caps_and_attribution(upstream, run_agent, project):
    (project / "tokencap.toml").write_text(
        """
[run]
max_calls = 10

[attribution]
team = "platform"
tags = { repo = "web", stage = "dev" }

[tasks.fix-login]
max_calls = 1
agent = "claude-code"
tags = { stage = "review" }
"""
    )

    run = run_agent(
        ["--task", "fix-login", "--tag", "pr=7"], "--api", "anthropic", "--calls", "3", cwd=project
    )

    assert run.exit_code == EXIT_CAPPED
    assert len(upstream.inference_requests()) == 1
    session = run.session()
    assert session["task"] == "fix-login"
    assert session["team"] == "platform"
    assert session["agent"] == "claude-code"
    assert json.loads(session["tags"]) == {"repo": "web", "stage": "review", "pr": "7"}


def test_pyproject_table_applies(upstream, run_agent, project):
    (project / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.tokencap.attribution]\nteam = "infra"\n'
    )

    run = run_agent([], "--api", "anthropic", cwd=project)

    assert run.exit_code == 0, run.stderr
    assert run.session()["team"] == "infra"


def test_invalid_file_stops_before_run(upstream, run_tokencap, project):
    path = project / "tokencap.toml"
    path.write_text("[run]\nmax_usd = 5\n\n[tasks.t]\nmax_usd = -2\n")
    marker = project / "agent-ran"

    run = run_tokencap([], [sys.executable, "-c", f"open({str(marker)!r}, 'w')"], cwd=project)

    assert run.exit_code == EXIT_USAGE
    assert f"{path}:5: tasks.t.max_usd: a dollar cap must be more than 0, got -2" in run.stderr
    assert not marker.exists()
    assert not run.db.exists()


def test_budget_flag_file_used(upstream, run_agent, project, tmp_path):
    (project / "tokencap.toml").write_text("[run]\nmax_calls = 5\n")
    other = tmp_path / "ci.toml"
    other.write_text("[run]\nmax_calls = 1\n")

    run = run_agent(["--budget", str(other)], "--api", "anthropic", "--calls", "3", cwd=project)

    assert run.exit_code == EXIT_CAPPED
    assert len(upstream.inference_requests()) == 1


# --- Prices --------------------------------------------------------------------------------

# 1000 uncached input, 2000 cache-read, 400 cache-write and 500 output tokens.
CACHED_CALL = Behavior(
    input_tokens=1000, cache_read_tokens=2000, cache_write_tokens=400, output_tokens=500
)


def test_published_price_without_override(upstream, run_agent, project):
    # $3, $0.30, $3.75 and $15 per million: 0.003 + 0.0006 + 0.0015 + 0.0075.
    upstream.default = CACHED_CALL

    call = only_call(run_agent([], "--api", "anthropic", "--model", SONNET, cwd=project))

    assert Decimal(call["cost_usd"]) == Decimal("0.0126")
    assert call["price_source"].startswith("genai-prices")


def test_price_override_changes_cost(upstream, run_agent, project):
    # $1, $0.10, $1.25 and $2 per million: 0.001 + 0.0002 + 0.0005 + 0.001.
    path = project / "tokencap.toml"
    path.write_text(
        f"""
[prices.models."{SONNET}"]
input_per_mtok = 1
cache_read_per_mtok = 0.10
cache_write_per_mtok = 1.25
output_per_mtok = 2
"""
    )
    upstream.default = CACHED_CALL

    call = only_call(run_agent([], "--api", "anthropic", "--model", SONNET, cwd=project))

    assert call["input_tokens"] == 1000
    assert call["cache_read_tokens"] == 2000
    assert call["cache_write_5m_tokens"] == 400
    assert call["output_tokens"] == 500
    assert Decimal(call["cost_usd"]) == Decimal("0.0027")
    assert call["cost_estimated"] == 0
    assert call["price_source"] == f"price override {path}:2"


def test_override_cache_rates_default_to_input(upstream, run_agent, project):
    # Without cache rates, every input token is billed at $1 per million: 3400 tokens.
    (project / "tokencap.toml").write_text(
        f'[prices.models."{SONNET.upper()}"]\ninput_per_mtok = 1\noutput_per_mtok = 2\n'
    )
    upstream.default = CACHED_CALL

    call = only_call(run_agent([], "--api", "anthropic", "--model", SONNET, cwd=project))

    assert Decimal(call["cost_usd"]) == Decimal("0.0044")


def test_local_model_free(upstream, run_agent, project):
    (project / "tokencap.toml").write_text(
        '[prices.models."llama3.1:8b"]\ninput_per_mtok = 0\noutput_per_mtok = 0\n'
    )
    upstream.default = Behavior(input_tokens=5000, output_tokens=800)

    run = run_agent([], "--api", "openai-chat", "--model", "llama3.1:8b", cwd=project)

    call = only_call(run)
    assert call["input_tokens"] == 5000
    assert call["output_tokens"] == 800
    assert Decimal(call["cost_usd"]) == 0
    assert call["cost_estimated"] == 0
    assert "no price is known" not in run.stderr


def test_pattern_price_limited_to_provider(upstream, run_agent, project):
    # 1000 input and 1000 output tokens at $0.50 and $1.50 per million.
    (project / "tokencap.toml").write_text(
        '[prices.models."acme-*"]\nprovider = "openai"\ninput_per_mtok = 0.5\n'
        "output_per_mtok = 1.5\n"
    )
    upstream.default = Behavior(input_tokens=1000, output_tokens=1000)

    openai_run = run_agent([], "--api", "openai-chat", "--model", "acme-coder-7b", cwd=project)
    gemini_run = run_agent([], "--api", "gemini", "--model", "acme-coder-7b", cwd=project)

    openai_call, gemini_call = query(openai_run.db, "SELECT * FROM calls ORDER BY id")
    assert Decimal(openai_call["cost_usd"]) == Decimal("0.002")
    assert openai_call["cost_estimated"] == 0
    assert gemini_call["cost_estimated"] == 1
    assert "no price is known for gemini model 'acme-coder-7b'" in gemini_run.stderr
    assert '[prices.models."acme-coder-7b"]' in gemini_run.stderr


def test_unknown_model_refused_by_policy(upstream, run_agent, project):
    (project / "tokencap.toml").write_text('[prices]\nunknown_model = "refuse"\n')

    run = run_agent(
        [], "--api", "openai-chat", "--model", "mystery-7b", "--calls", "3", cwd=project
    )

    assert run.exit_code == EXIT_CAPPED
    assert upstream.inference_requests() == []
    (call,) = run.calls()
    assert call["decision"] == "refused"
    assert call["refusal_reason"] == "unknown_model"
    assert run.session()["end_reason"] == "unknown_model"
    assert "stopped by unknown_model" in run.stderr
    assert "no price is known for openai model 'mystery-7b'" in run.stderr
    assert '[prices.models."mystery-7b"]' in run.stderr


def test_refuse_policy_sends_priced_models(upstream, run_agent, project):
    (project / "tokencap.toml").write_text(
        '[prices.models."house-model"]\ninput_per_mtok = 1\noutput_per_mtok = 1\n'
    )

    known = run_agent(
        [], "--api", "anthropic", "--model", SONNET, cwd=project, TOKENCAP_UNKNOWN_MODEL="refuse"
    )
    added = run_agent(
        [],
        "--api",
        "openai-chat",
        "--model",
        "house-model",
        cwd=project,
        TOKENCAP_UNKNOWN_MODEL="refuse",
    )

    assert known.exit_code == 0, known.stderr
    assert added.exit_code == 0, added.stderr
    assert len(upstream.inference_requests()) == 2


# --- Proxy ---------------------------------------------------------------------------------


def test_extra_host_intercepted_and_metered(run_tokencap, project, tmp_path):
    # A client that ignores base URLs calls a TLS server on 127.0.0.1 through HTTPS_PROXY. Only
    # because the budget file names that host does tokencap intercept and meter the call,
    # instead of passing the connection through.
    ca = TestCA("gateway CA")
    trust = ca.write(tmp_path / "gateway-ca.pem")
    (project / "tokencap.toml").write_text('[proxy]\nextra_hosts = ["127.0.0.1"]\n')
    body = {"model": "gpt-4o-2024-08-06", "max_tokens": 50, "messages": [{"role": "user"}]}
    out = tmp_path / "client.jsonl"
    gateway_behavior = Behavior(input_tokens=1000, output_tokens=100)
    with FakeUpstream(gateway_behavior, tls=ca.issue("127.0.0.1")) as gateway:
        request = json.dumps({"url": f"{gateway.url}/v1/chat/completions", "body": body})
        run = run_tokencap(
            [],
            [sys.executable, str(TESTS / "agents" / "proxy_client.py"), "--out", str(out), request],
            cwd=project,
            SSL_CERT_FILE=str(trust),
        )
        assert len(gateway.inference_requests()) == 1

    assert run.exit_code == 0, run.stderr
    (outcome,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert outcome["status"] == 200, outcome
    assert "tokencap" in outcome["issuer"]
    (call,) = run.calls()
    assert call["input_tokens"] == 1000
    assert call["output_tokens"] == 100
    # 1000 * $2.50 + 100 * $10 per million tokens
    assert Decimal(call["cost_usd"]) == Decimal("0.0035")
