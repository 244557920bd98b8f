"""aider under tokencap: exact metering, edit-and-test loops, caps and cut streams.

aider calls models through litellm, which reads `ANTHROPIC_BASE_URL` and `OPENAI_BASE_URL`
(after `ANTHROPIC_API_BASE`, which must stay unset). aider uses no tool calls: its loop is
edit, run the tests, send the failures back. It sends no session or prompt id.
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
    recorded_spend,
    served_calls,
)
from tests.agents_e2e.sandbox import AgentRun, Sandbox
from tests.fakeupstream import Behavior

pytestmark = [pytest.mark.agent_clis, pytest.mark.slow]

MODEL = "anthropic/claude-sonnet-4-5"
# The switches that keep aider from calling anything but the model API.
QUIET = [
    "--no-check-update",
    "--analytics-disable",
    "--no-show-release-notes",
    "--no-git",
    "--yes-always",
    "--no-pretty",
    "--no-fancy-input",
]
# litellm downloads its model list from GitHub when it is imported, unless told not to.
QUIET_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}
# Model facts that aider would otherwise download from GitHub at start-up.
METADATA = {
    "anthropic/claude-sonnet-4-5": {
        "litellm_provider": "anthropic",
        "mode": "chat",
        "max_input_tokens": 200_000,
        "max_output_tokens": 64_000,
        "input_cost_per_token": 3e-06,
        "output_cost_per_token": 1.5e-05,
    },
    # aider's weak model for gpt-5-mini, looked up at start although this suite never calls it.
    "openai/gpt-5-nano": {
        "litellm_provider": "openai",
        "mode": "chat",
        "max_input_tokens": 400_000,
        "max_output_tokens": 128_000,
        "input_cost_per_token": 5e-08,
        "output_cost_per_token": 4e-07,
    },
    "openai/gpt-5-mini": {
        "litellm_provider": "openai",
        "mode": "chat",
        "max_input_tokens": 400_000,
        "max_output_tokens": 128_000,
        "input_cost_per_token": 2.5e-07,
        "output_cost_per_token": 2e-06,
    },
}
TEST_COMMAND = "grep -q fixed hello.txt"


def aider(
    sandbox: Sandbox, options: list[str], message: str, *flags: str, model: str = MODEL
) -> AgentRun:
    """Run `tokencap run OPTIONS -- aider --message MESSAGE` with the quiet switches."""
    metadata = sandbox.home / ".aider.model.metadata.json"
    metadata.write_text(json.dumps(METADATA))
    command = [
        "aider",
        *QUIET,
        "--model",
        model,
        "--model-metadata-file",
        str(metadata),
        "--message",
        message,
        *flags,
    ]
    env = {"ANTHROPIC_API_KEY": "test-key", "OPENAI_API_KEY": "test-key", **QUIET_ENV}
    return sandbox.run(options, command, env=env)


def whole_file_edit(content: str, **usage: int) -> Behavior:
    """Return a reply in aider's `whole` edit format that rewrites hello.txt."""
    return Behavior(text=f"hello.txt\n```\n{content}\n```\n", **usage)


def edit_and_test(sandbox: Sandbox, options: list[str]) -> AgentRun:
    """Ask aider to fix hello.txt, running the test command after every edit."""
    (sandbox.workdir / "hello.txt").write_text("broken\n")
    flags = ["hello.txt", "--edit-format", "whole", "--auto-test", "--test-cmd", TEST_COMMAND]
    return aider(sandbox, options, "fix hello.txt", *flags)


@pytest.mark.parametrize(
    ("model", "path", "expected"),
    [
        # 2000 input and 50 output tokens of claude-sonnet-4-5.
        ("anthropic/claude-sonnet-4-5", "/v1/messages", Decimal("0.00675")),
        # 2000 input and 50 output tokens of gpt-5-mini.
        ("openai/gpt-5-mini", "/v1/chat/completions", Decimal("0.0006")),
    ],
)
def test_one_turn_exact(sandbox, model, path, expected):
    sandbox.upstream.default = Behavior(text="Hi there.", input_tokens=2000, output_tokens=50)

    run = aider(sandbox, [], "say hi", model=model)

    assert run.exit_code == 0, run.describe()
    assert "Hi there." in run.stdout
    (served,) = assert_metered_exactly(run, sandbox.upstream)
    assert served.path == path
    assert served.stream
    assert recorded_spend(run) == expected
    assert_stayed_local(run)


def test_edit_test_loop_every_call(sandbox):
    sandbox.upstream.script(
        whole_file_edit("still broken", input_tokens=1200, output_tokens=40),
        whole_file_edit("fixed", input_tokens=1500, output_tokens=35),
    )

    run = edit_and_test(sandbox, [])

    assert run.exit_code == 0, run.describe()
    assert (sandbox.workdir / "hello.txt").read_text() == "fixed\n"
    first, second = assert_metered_exactly(run, sandbox.upstream)
    # The second call carries the failed test run back to the model.
    assert TEST_COMMAND in json.dumps(second.body["messages"])
    assert {row["agent_prompt_id"] for row in run.calls()} == {None}
    assert_stayed_local(run)


def test_max_calls_stops_third_call(sandbox):
    # Every edit leaves the test failing, so aider keeps sending the failures back.
    sandbox.upstream.default = whole_file_edit("still broken", input_tokens=900)

    run = edit_and_test(sandbox, ["--max-calls", "2"])

    assert_third_call_refused(run, sandbox.upstream)


def test_max_usd_refuses_third_call(sandbox):
    # Each call costs $0.0045 and is admitted against a worst case of about $0.005, so the
    # third call, at $0.009 spent, is the first that could pass $0.0112.
    cap = Decimal("0.0112")
    sandbox.upstream.default = whole_file_edit("still broken", input_tokens=1000, output_tokens=100)

    run = edit_and_test(sandbox, ["--max-usd", str(cap)])

    assert_stopped_cleanly(run, "max_usd")
    assert_refused_at_first_call_over(run, cap)
    assert len(run.admitted()) == len(served_calls(sandbox.upstream)) == 2
    assert recorded_spend(run) == Decimal("0.009")


def test_dropped_stream_retry_refused(sandbox):
    # litellm reports the broken stream as a connection error and aider retries the call;
    # under --max-calls 1 that retry is refused.
    sandbox.upstream.script(Behavior(text="word " * 40, events=10, drop_after_events=6))

    run = aider(sandbox, ["--max-calls", "1"], "say something long")

    assert_retry_of_dropped_call_refused(run, sandbox.upstream)
