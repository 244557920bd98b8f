"""Claude Code under tokencap: exact metering, tool loops, caps and cut streams.

Claude Code reads `ANTHROPIC_BASE_URL`, so `tokencap run -- claude ...` needs no setup. It
streams every call to `/v1/messages?beta=true` and puts its session id in the body's
`metadata.user_id`, which tokencap records as the call's agent prompt id.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from tests.agents_e2e.checks import (
    assert_metered_exactly,
    assert_refused_at_first_call_over,
    assert_retry_of_dropped_call_refused,
    assert_stayed_local,
    assert_stopped_cleanly,
    assert_third_call_refused,
    list_price_cost,
    recorded_spend,
    served_calls,
    served_usage,
)
from tests.agents_e2e.sandbox import AgentRun, Sandbox
from tests.conftest import query
from tests.fakeupstream import Behavior

pytestmark = [pytest.mark.agent_clis, pytest.mark.slow]

MODEL = "claude-sonnet-4-5"
# The switches that keep Claude Code from calling anything but the model API.
QUIET = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
}


def claude(sandbox: Sandbox, options: list[str], prompt: str, *flags: str) -> AgentRun:
    """Run `tokencap run OPTIONS -- claude -p PROMPT` with JSON output."""
    command = ["claude", "-p", prompt, "--output-format", "json", "--model", MODEL, *flags]
    return sandbox.run(options, command, env={"ANTHROPIC_API_KEY": "test-key", **QUIET})


def bash_tool(command: str, **usage: int) -> Behavior:
    """Return a reply that calls Claude Code's Bash tool."""
    arguments = {"command": command, "description": "run a step"}
    return Behavior(tool_loop=True, tool_name="Bash", tool_arguments=arguments, **usage)


def test_one_turn_exact(sandbox):
    sandbox.upstream.default = Behavior(
        text="Hi there.",
        input_tokens=100,
        cache_read_tokens=2000,
        cache_write_tokens=500,
        output_tokens=20,
    )

    run = claude(sandbox, [], "say hi")

    assert run.exit_code == 0, run.describe()
    result = json.loads(run.stdout)
    assert result["result"] == "Hi there."
    (served,) = assert_metered_exactly(run, sandbox.upstream)
    assert served.query == {"beta": "true"}
    assert served.stream
    assert served.headers["x-api-key"] == "test-key"
    # Claude Code prices the call itself; its total agrees with the ledger.
    assert Decimal(str(result["total_cost_usd"])) == recorded_spend(run) == Decimal("0.003075")
    assert run.session()["status"] == "completed"
    assert_stayed_local(run)


def test_tool_loop_one_prompt_id(sandbox):
    sandbox.upstream.script(
        bash_tool("echo tokencap > proof.txt", input_tokens=1200, output_tokens=40),
        Behavior(text="Wrote proof.txt.", input_tokens=1300, output_tokens=15),
    )

    run = claude(sandbox, [], "write proof.txt", "--allowedTools", "Bash")

    assert run.exit_code == 0, run.describe()
    assert (sandbox.workdir / "proof.txt").read_text() == "tokencap\n"
    first, second = assert_metered_exactly(run, sandbox.upstream)
    # The second call carries the tool's output back to the model.
    assert "tool_result" in json.dumps(second.body["messages"][-1])
    session_id = json.loads(run.stdout)["session_id"]
    prompt_ids = {row["agent_prompt_id"] for row in run.calls()}
    assert prompt_ids == {first.body["metadata"]["user_id"]}
    assert session_id in prompt_ids.pop()
    assert_stayed_local(run)


def test_two_prompts_two_prompt_ids(sandbox):
    # One tokencap session, two `claude -p` prompts: the first fans out into two calls.
    sandbox.upstream.script(
        bash_tool("echo tokencap > proof.txt", input_tokens=1200, output_tokens=40),
        Behavior(text="Wrote proof.txt.", input_tokens=1300, output_tokens=15),
        Behavior(text="It says tokencap.", input_tokens=1400, output_tokens=10),
    )
    flags = f"--output-format json --model {MODEL} --allowedTools Bash"
    script = f'claude -p "write proof.txt" {flags} && claude -p "read proof.txt" {flags}'

    run = sandbox.run([], ["sh", "-c", script], env={"ANTHROPIC_API_KEY": "test-key", **QUIET})

    assert run.exit_code == 0, run.describe()
    assert_metered_exactly(run, sandbox.upstream)
    sessions = [json.loads(line)["session_id"] for line in run.stdout.splitlines()]
    fan_out = query(
        run.db,
        "SELECT agent_prompt_id, COUNT(*) AS calls FROM calls GROUP BY 1 ORDER BY MIN(seq)",
    )
    assert [row["calls"] for row in fan_out] == [2, 1]
    assert len(sessions) == 2
    assert sessions[0] in fan_out[0]["agent_prompt_id"]
    assert sessions[1] in fan_out[1]["agent_prompt_id"]
    assert_stayed_local(run)


def test_max_calls_stops_third_call(sandbox):
    sandbox.upstream.default = bash_tool("echo step >> steps.txt", input_tokens=900)

    run = claude(sandbox, ["--max-calls", "2"], "loop", "--allowedTools", "Bash")

    assert_third_call_refused(run, sandbox.upstream)
    # Both admitted calls ran their tool, and the third call never went upstream.
    assert (sandbox.workdir / "steps.txt").read_text() == "step\nstep\n"


def test_max_usd_refuses_third_call(sandbox):
    # Each call costs $0.1605 and is admitted against a worst case of about $0.16, so the
    # third call, at $0.321 spent, is the first that could pass $0.40.
    cap = Decimal("0.40")
    sandbox.upstream.default = bash_tool(
        "echo step >> steps.txt", input_tokens=50_000, output_tokens=700
    )

    run = claude(sandbox, ["--max-usd", str(cap)], "loop", "--allowedTools", "Bash")

    assert_stopped_cleanly(run, "max_usd")
    assert_refused_at_first_call_over(run, cap)
    assert len(run.admitted()) == 2
    assert len(served_calls(sandbox.upstream)) == 2
    assert recorded_spend(run) == 2 * list_price_cost(
        MODEL, served_usage(served_calls(sandbox.upstream)[0])
    )
    assert recorded_spend(run) <= cap


def test_dropped_stream_retry_refused(sandbox):
    # The upstream drops the stream after a few events; Claude Code sends the call again at
    # once. That retry would be a second call, so under --max-calls 1 it is refused.
    sandbox.upstream.script(Behavior(text="word " * 40, events=10, drop_after_events=6))

    run = claude(sandbox, ["--max-calls", "1"], "say something long")

    assert_retry_of_dropped_call_refused(run, sandbox.upstream)


def test_dollar_cap_cuts_stream(sandbox):
    # The reply streams for about 20 s. Its input alone costs $0.12, and the text that
    # arrives takes the running cost past $0.20, where tokencap cuts the stream.
    cap = Decimal("0.20")
    sandbox.upstream.default = Behavior(
        text="word " * 4000, input_tokens=40_000, output_tokens=5000, slow=True
    )

    run = claude(sandbox, ["--max-usd", str(cap)], "say something long")

    assert_stopped_cleanly(run, "max_usd")
    (served,) = served_calls(sandbox.upstream)
    assert served.disconnected and not served.completed
    cut, *retries = run.calls()
    assert cut["status"] == "cut"
    # Claude Code may re-send the cut call before it is stopped; if it does, it is refused.
    assert all(row["decision"] == "refused" for row in retries)
    # Spend passes the cap by at most the event that crossed it.
    assert cap < recorded_spend(run) < cap + Decimal("0.01")
