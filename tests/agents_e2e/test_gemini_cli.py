"""Gemini CLI under tokencap: its router calls, tool loops, caps and cut streams.

Gemini CLI reads `GOOGLE_GEMINI_BASE_URL` once `~/.gemini/settings.json` selects API-key
authentication. Without `-m` it first sends a small model a request for JSON that rates how
complex the prompt is. That router call is a model call like any other and is metered. Gemini
CLI sends no session or prompt id, so its calls carry no agent prompt id.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from tests.agents_e2e.checks import (
    assert_metered_exactly,
    assert_refused_at_first_call_over,
    assert_stayed_local,
    assert_stopped_cleanly,
    assert_third_call_refused,
    recorded_spend,
    served_calls,
)
from tests.agents_e2e.sandbox import AgentRun, Sandbox
from tests.fakeupstream import Behavior

pytestmark = [pytest.mark.agent_clis, pytest.mark.slow]

MODEL = "gemini-2.5-flash"
SETTINGS = {
    "security": {"auth": {"selectedType": "gemini-api-key"}},
    "privacy": {"usageStatisticsEnabled": False},
    "general": {"disableAutoUpdate": True, "disableUpdateNag": True},
}
ROUTER_USAGE = Behavior(input_tokens=700, output_tokens=30)


def gemini(sandbox: Sandbox, options: list[str], prompt: str, *flags: str) -> AgentRun:
    """Run `tokencap run OPTIONS -- gemini -p PROMPT` with JSON output."""
    settings = sandbox.home / ".gemini" / "settings.json"
    settings.parent.mkdir(exist_ok=True)
    settings.write_text(json.dumps(SETTINGS))
    # The router and the loop detector ask for JSON matching a schema; they get it.
    sandbox.upstream.schema_behavior = ROUTER_USAGE
    command = ["gemini", "-p", prompt, "--output-format", "json", *flags]
    env = {"GEMINI_API_KEY": "test-key", "GEMINI_CLI_TRUST_WORKSPACE": "true"}
    return sandbox.run(options, command, env=env)


def shell_tool(command: str, **usage: int) -> Behavior:
    """Return a reply that calls Gemini CLI's run_shell_command tool."""
    arguments = {"command": command, "description": "run a step"}
    return Behavior(
        tool_loop=True, tool_name="run_shell_command", tool_arguments=arguments, **usage
    )


def test_one_turn_router_exact(sandbox):
    sandbox.upstream.default = Behavior(
        text="Hi there.", input_tokens=5000, cache_read_tokens=1000, output_tokens=60
    )

    run = gemini(sandbox, [], "say hi")

    assert run.exit_code == 0, run.describe()
    assert json.loads(run.stdout)["response"] == "Hi there."
    router, answer = assert_metered_exactly(run, sandbox.upstream)
    assert router.schema_reply and router.route == "gemini.generate_content"
    assert answer.route == "gemini.stream_generate_content"
    assert answer.headers["x-goog-api-key"] == "test-key"
    # Router: 700 input and 30 output tokens of gemini-3.5-flash-lite. Main call: 4000 uncached,
    # 1000 cached and 60 output tokens of gemini-3.8-flash.
    assert recorded_spend(run) == Decimal("0.000285") + Decimal("0.003300")
    assert {row["agent_prompt_id"] for row in run.calls()} == {None}
    assert_stayed_local(run)


def test_tool_loop_every_call(sandbox):
    sandbox.upstream.script(
        shell_tool("echo tokencap > proof.txt", input_tokens=1200, output_tokens=40),
        Behavior(text="Wrote proof.txt.", input_tokens=1300, output_tokens=15),
    )

    run = gemini(sandbox, [], "write proof.txt", "--approval-mode", "yolo")

    assert run.exit_code == 0, run.describe()
    assert (sandbox.workdir / "proof.txt").read_text() == "tokencap\n"
    served = assert_metered_exactly(run, sandbox.upstream)
    assert [record.schema_reply for record in served] == [True, False, False]
    assert "functionResponse" in json.dumps(served[-1].body["contents"][-1])
    assert_stayed_local(run)


def test_max_calls_stops_third_call(sandbox):
    sandbox.upstream.default = shell_tool("echo step >> steps.txt", input_tokens=900)

    run = gemini(sandbox, ["--max-calls", "2"], "loop", "-m", MODEL, "--approval-mode", "yolo")

    assert_third_call_refused(run, sandbox.upstream)
    assert (sandbox.workdir / "steps.txt").read_text() == "step\nstep\n"


def test_max_usd_refuses_third_call(sandbox):
    # Each call costs $0.0046 and is admitted against a worst case of about $0.005, so the
    # third call, at $0.0092 spent, is the first that could pass $0.0115.
    cap = Decimal("0.0115")
    sandbox.upstream.default = shell_tool(
        "echo step >> steps.txt", input_tokens=12_000, output_tokens=400
    )

    run = gemini(sandbox, ["--max-usd", str(cap)], "loop", "-m", MODEL, "--approval-mode", "yolo")

    assert_stopped_cleanly(run, "max_usd")
    assert_refused_at_first_call_over(run, cap)
    assert len(run.admitted()) == len(served_calls(sandbox.upstream)) == 2
    assert recorded_spend(run) == Decimal("0.0092")


def test_dropped_stream_not_retried(sandbox):
    # Gemini CLI 0.61 does not retry a stream that broke: it reports the error and exits 1,
    # so only the dropped call is recorded, with the output that arrived before the drop.
    sandbox.upstream.script(Behavior(text="word " * 40, events=10, drop_after_events=4))

    run = gemini(sandbox, ["--max-calls", "1"], "say something long", "-m", MODEL)

    assert run.exit_code == 1, run.describe()
    (served,) = served_calls(sandbox.upstream)
    assert served.dropped
    (cut,) = run.calls()
    assert cut["status"] == "dropped"
    assert cut["usage_estimated"]
    assert cut["output_tokens"] > 0
    assert run.session()["end_reason"] == "exited"
    assert_stayed_local(run)
