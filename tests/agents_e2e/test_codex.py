"""Codex under tokencap, through a custom model provider whose base URL is tokencap's.

Codex ignores `OPENAI_BASE_URL`. The configuration in docs/agents.md defines a provider in
`~/.codex/config.toml` that speaks the Responses API over server-sent events, and the command
sets its `base_url` from the `OPENAI_BASE_URL` that tokencap gives the agent. Codex sends its
session id as `prompt_cache_key`, which tokencap records as the agent prompt id.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.agents_e2e.checks import (
    assert_metered_exactly,
    assert_refused_at_first_call_over,
    assert_retry_of_dropped_call_refused,
    assert_stayed_local,
    assert_stopped_cleanly,
    assert_third_call_refused,
    recorded_spend,
    served_calls,
)
from tests.agents_e2e.sandbox import AgentRun, Sandbox
from tests.conftest import query
from tests.fakeupstream import Behavior

pytestmark = [pytest.mark.agent_clis, pytest.mark.slow]

MODEL = "gpt-5-mini"
CONFIG = f"""\
model = "{MODEL}"
model_provider = "tokencap"
sandbox_mode = "workspace-write"
check_for_update_on_startup = false

[model_providers.tokencap]
name = "OpenAI through tokencap"
base_url = "https://api.openai.com/v1"
env_key = "OPENAI_API_KEY"
wire_api = "responses"

[analytics]
enabled = false

[feedback]
enabled = false

[features]
plugins = false
remote_plugin = false
"""
# The command of docs/agents.md: the child's shell expands the URL tokencap set for it.
WRAPPER = 'exec codex -c "model_providers.tokencap.base_url=\\"$OPENAI_BASE_URL\\"" exec "$@"'


def codex(
    sandbox: Sandbox, options: list[str], prompt: str, command: list[str] | None = None
) -> AgentRun:
    """Run `tokencap run OPTIONS -- sh -c WRAPPER codex --skip-git-repo-check PROMPT`, or
    another command, with the provider configured."""
    config = sandbox.home / ".codex" / "config.toml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(CONFIG)
    command = command or ["sh", "-c", WRAPPER, "codex", "--skip-git-repo-check", prompt]
    return sandbox.run(options, command, env={"OPENAI_API_KEY": "test-key"})


def exec_tool(command: str, **usage: int) -> Behavior:
    """Return a reply that calls Codex's exec_command tool."""
    return Behavior(
        tool_loop=True, tool_name="exec_command", tool_arguments={"cmd": command}, **usage
    )


def test_one_turn_exact(sandbox):
    sandbox.upstream.default = Behavior(
        text="Hi there.", input_tokens=3000, cache_read_tokens=2048, output_tokens=40
    )

    run = codex(sandbox, [], "say hi")

    assert run.exit_code == 0, run.describe()
    assert "Hi there." in run.stdout
    (served,) = assert_metered_exactly(run, sandbox.upstream)
    assert served.path == "/v1/responses"
    assert served.stream
    assert served.headers["authorization"] == "Bearer test-key"
    # 952 uncached input tokens, 2048 cached and 40 output tokens at gpt-5-mini's prices.
    assert recorded_spend(run) == Decimal("0.0003692")
    assert_stayed_local(run)


def test_tool_loop_one_prompt_id(sandbox):
    sandbox.upstream.script(
        exec_tool("echo tokencap > proof.txt", input_tokens=1200, output_tokens=40),
        Behavior(text="Wrote proof.txt.", input_tokens=1300, output_tokens=15),
    )

    run = codex(sandbox, [], "write proof.txt")

    assert run.exit_code == 0, run.describe()
    assert (sandbox.workdir / "proof.txt").read_text() == "tokencap\n"
    first, second = assert_metered_exactly(run, sandbox.upstream)
    assert any(item.get("type") == "function_call_output" for item in second.body["input"])
    session_id = first.headers["session-id"]
    assert {row["agent_prompt_id"] for row in run.calls()} == {session_id}
    assert second.headers["session-id"] == session_id
    assert_stayed_local(run)


def test_two_prompts_two_prompt_ids(sandbox):
    # One tokencap session, two Codex sessions: the first fans out into two calls.
    sandbox.upstream.script(
        exec_tool("echo tokencap > proof.txt", input_tokens=1200, output_tokens=40),
        Behavior(text="Wrote proof.txt.", input_tokens=1300, output_tokens=15),
        Behavior(text="It says tokencap.", input_tokens=1400, output_tokens=10),
    )
    codex_exec = WRAPPER.removeprefix("exec ").removesuffix(' "$@"') + " --skip-git-repo-check"
    script = f'{codex_exec} "write proof.txt" && {codex_exec} "read proof.txt"'

    run = codex(sandbox, [], "", command=["sh", "-c", script])

    assert run.exit_code == 0, run.describe()
    served = assert_metered_exactly(run, sandbox.upstream)
    fan_out = query(
        run.db,
        "SELECT agent_prompt_id, COUNT(*) AS calls FROM calls GROUP BY 1 ORDER BY MIN(seq)",
    )
    assert [row["calls"] for row in fan_out] == [2, 1]
    assert [row["agent_prompt_id"] for row in fan_out] == [
        served[0].headers["session-id"],
        served[2].headers["session-id"],
    ]
    assert_stayed_local(run)


def test_max_calls_stops_third_call(sandbox):
    sandbox.upstream.default = exec_tool("echo step >> steps.txt", input_tokens=900)

    run = codex(sandbox, ["--max-calls", "2"], "loop")

    assert_third_call_refused(run, sandbox.upstream)
    assert (sandbox.workdir / "steps.txt").read_text() == "step\nstep\n"


def test_max_usd_refuses_third_call(sandbox):
    # Each call costs $0.0048 and is admitted against a worst case of about $0.005, so the
    # third call, at $0.0096 spent, is the first that could pass $0.012.
    cap = Decimal("0.012")
    sandbox.upstream.default = exec_tool(
        "echo step >> steps.txt", input_tokens=16_000, output_tokens=400
    )

    run = codex(sandbox, ["--max-usd", str(cap)], "loop")

    assert_stopped_cleanly(run, "max_usd")
    assert_refused_at_first_call_over(run, cap)
    assert len(run.admitted()) == len(served_calls(sandbox.upstream)) == 2
    assert recorded_spend(run) == Decimal("0.0096")


def test_dropped_stream_retry_refused(sandbox):
    # Codex retries a stream that broke; under --max-calls 1 that retry is refused.
    sandbox.upstream.script(Behavior(text="word " * 40, events=10, drop_after_events=6))

    run = codex(sandbox, ["--max-calls", "1"], "say something long")

    assert_retry_of_dropped_call_refused(run, sandbox.upstream)
