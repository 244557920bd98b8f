"""A Node.js client on its built-in fetch, which ignores HTTPS_PROXY, metered by base URL."""

from __future__ import annotations

import json
import shutil
from decimal import Decimal

import pytest

from tests.conftest import TESTS
from tests.fakeupstream import Behavior

NODE_AGENT = TESTS / "agents" / "node_agent.mjs"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")

CASES = {
    "anthropic": (
        Behavior(input_tokens=1200, output_tokens=340),
        "anthropic",
        {"input_tokens": 1200, "output_tokens": 340},
        # 1200 * $3 + 340 * $15 per million tokens
        Decimal("0.0087"),
    ),
    "openai-stream": (
        Behavior(input_tokens=3000, output_tokens=500, events=5),
        "openai",
        {"input_tokens": 3000, "output_tokens": 500},
        Decimal("0.0125"),
    ),
    "gemini": (
        Behavior(input_tokens=10_000, output_tokens=800, events=4),
        "gemini",
        {"input_tokens": 10_000, "output_tokens": 800},
        Decimal("0.005"),
    ),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_node_fetch_metered_by_base_url(kind, upstream, run_tokencap, tmp_path):
    behavior, provider, tokens, cost = CASES[kind]
    upstream.default = behavior
    out = tmp_path / "node.jsonl"

    run = run_tokencap([], ["node", str(NODE_AGENT), kind, str(out)])

    assert run.exit_code == 0, run.stderr
    (outcome,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert outcome["status"] == 200
    (request,) = upstream.inference_requests()
    assert "proxy-authorization" not in request.headers
    (call,) = run.calls()
    assert call["provider"] == provider
    for column, value in tokens.items():
        assert call[column] == value, column
    assert Decimal(call["cost_usd"]) == cost
