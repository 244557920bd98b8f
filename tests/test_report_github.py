"""The markdown summary `tokencap run` appends to $GITHUB_STEP_SUMMARY in GitHub Actions."""

from __future__ import annotations

import sys

import pytest

from tests.fakeupstream import Behavior

pytestmark = pytest.mark.slow

SONNET = "claude-sonnet-4-5-20250929"


def test_run_appends_summary(upstream, run_agent, tmp_path):
    upstream.default = Behavior(input_tokens=1200, output_tokens=340, cache_read_tokens=5000)
    summary = tmp_path / "step_summary.md"
    summary.write_text("## Earlier step\n")

    run = run_agent(
        ["--task", "gh-task", "--max-usd", "1", "--tag", "pr=42"],
        *("--api", "anthropic", "--model", SONNET, "--calls", "2"),
        GITHUB_STEP_SUMMARY=str(summary),
    )

    assert run.exit_code == 0, run.stderr
    assert run.stderr == ""
    text = summary.read_text()
    assert text.startswith("## Earlier step\n")
    # Per call: 1200 * $3 + 5000 * $0.30 + 340 * $15 per million tokens = $0.0102.
    assert "### tokencap: gh-task · completed · $0.0204 of $1.00" in text
    assert f"Session `{run.session()['id']}`" in text
    assert "- **tags:** pr=42" in text
    # The command line can carry a prompt or a credential; it stays out of the summary.
    assert "sdk\\_agent.py" not in text
    assert "sdk_agent.py" not in text
    assert "- **command:**" not in text
    model_rows = [line for line in text.splitlines() if line.startswith(f"| {SONNET} |")]
    assert model_rows == [f"| {SONNET} | 2 | 0 | 12,400 | 680 | $0.0204 |"]
    assert "```text" in text
    assert "2 calls, $0.0204 spent of $1.00 (2.0%)" in text
    call_rows = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(call_rows) == 2


def test_summary_of_capped_run(upstream, run_agent, tmp_path):
    upstream.default = Behavior(input_tokens=1000, output_tokens=100)
    summary = tmp_path / "step_summary.md"

    run = run_agent(
        ["--task", "loop", "--max-calls", "2"],
        *("--api", "anthropic", "--calls", "5"),
        GITHUB_STEP_SUMMARY=str(summary),
    )

    assert run.exit_code == 86, run.stderr
    text = summary.read_text()
    assert "### tokencap: loop · capped (max_calls) · $0.0090" in text
    assert "- **calls:** 2 of 2 (+1 refused)" in text
    assert "refused (max_calls)" in text
    assert "- **end:** max\\_calls, exit status 86" in text


def test_summary_appended_per_run(run_tokencap, tmp_path):
    summary = tmp_path / "step_summary.md"

    first = run_tokencap(
        ["--task", "one"], [sys.executable, "-c", "pass"], GITHUB_STEP_SUMMARY=str(summary)
    )
    second = run_tokencap(
        ["--task", "two"], [sys.executable, "-c", "pass"], GITHUB_STEP_SUMMARY=str(summary)
    )

    text = summary.read_text()
    assert first.exit_code == 0, first.stderr
    assert second.exit_code == 0, second.stderr
    assert text.index("### tokencap: one") < text.index("### tokencap: two")
    assert text.count("No model calls were recorded in this session.") == 2


def test_summary_failure_keeps_exit_status(run_tokencap, tmp_path):
    # A directory cannot be appended to, so the summary fails but the run does not.
    summary = tmp_path / "summary-dir"
    summary.mkdir()

    run = run_tokencap(
        [], [sys.executable, "-c", "import sys; sys.exit(3)"], GITHUB_STEP_SUMMARY=str(summary)
    )

    assert run.exit_code == 3
    assert "cannot append the session summary to GITHUB_STEP_SUMMARY" in run.stderr
    assert str(summary) in run.stderr
    assert run.session()["exit_status"] == 3
