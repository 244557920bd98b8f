"""What the end-to-end tests compare: the ledger against what the fake upstream served.

Expected costs come from the providers' published list prices below, in dollars per million
tokens, not from tokencap's own pricing code, so a pricing mistake fails the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from decimal import Decimal

from tests.agents_e2e.sandbox import AgentRun
from tests.fakeupstream import API_ANTHROPIC, API_GEMINI, FakeUpstream, RequestRecord
from tokencap.usage import Usage

# The ledger has one column per token kind, named like the fields of tokencap's Usage.
TOKEN_KINDS = tuple(kind.name for kind in fields(Usage))


@dataclass(frozen=True)
class Price:
    """List prices in dollars per million tokens, below any long-context tier."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write_5m: Decimal = Decimal(0)
    cache_write_1h: Decimal = Decimal(0)


PRICES = {
    "claude-sonnet-4-5": Price(
        Decimal("3"), Decimal("15"), Decimal("0.30"), Decimal("3.75"), Decimal("6")
    ),
    "gpt-5-mini": Price(Decimal("0.25"), Decimal("2"), Decimal("0.025")),
    "gemini-2.5-flash": Price(Decimal("0.30"), Decimal("2.50"), Decimal("0.03")),
    # The models Gemini CLI 0.61 picks when no model is given: its router and its main model.
    "gemini-3.5-flash-lite": Price(Decimal("0.30"), Decimal("2.50"), Decimal("0.03")),
    "gemini-3.8-flash": Price(Decimal("0.75"), Decimal("3.75"), Decimal("0.075")),
}


def served_usage(record: RequestRecord) -> dict[str, int]:
    """Return the tokens a served call reported, split the way the ledger stores them."""
    behavior = record.behavior
    assert behavior is not None, f"{record.path} was not answered as a model call"
    if record.api == API_ANTHROPIC:
        # Anthropic reports uncached input apart from cache reads and writes.
        return {
            "input_tokens": behavior.input_tokens,
            "cache_read_tokens": behavior.cache_read_tokens,
            "cache_write_5m_tokens": behavior.cache_write_tokens,
            "cache_write_1h_tokens": behavior.cache_write_1h_tokens,
            "output_tokens": behavior.output_tokens,
            "reasoning_tokens": 0,
        }
    # OpenAI and Gemini count cached tokens inside the prompt; Gemini bills thoughts as output
    # but reports them apart, while OpenAI's output count already includes reasoning.
    thoughts = behavior.reasoning_tokens if record.api == API_GEMINI else 0
    return {
        "input_tokens": behavior.input_tokens - behavior.cache_read_tokens,
        "cache_read_tokens": behavior.cache_read_tokens,
        "cache_write_5m_tokens": 0,
        "cache_write_1h_tokens": 0,
        "output_tokens": behavior.output_tokens + thoughts,
        "reasoning_tokens": behavior.reasoning_tokens,
    }


def list_price_cost(model: str, usage: dict[str, int]) -> Decimal:
    """Return the exact cost of the usage at the model's list prices."""
    assert model in PRICES, f"no list price for {model!r} in tests/agents_e2e/checks.py"
    price = PRICES[model]
    micro_dollars = (
        usage["input_tokens"] * price.input
        + usage["cache_read_tokens"] * price.cache_read
        + usage["cache_write_5m_tokens"] * price.cache_write_5m
        + usage["cache_write_1h_tokens"] * price.cache_write_1h
        + usage["output_tokens"] * price.output
    )
    return micro_dollars / Decimal(1_000_000)


def served_calls(upstream: FakeUpstream) -> list[RequestRecord]:
    """Return the model calls the fake upstream received, once it is done with all of them."""
    records = upstream.inference_requests()
    return upstream.wait_for_requests(len(records)) if records else []


def assert_metered_exactly(run: AgentRun, upstream: FakeUpstream) -> list[RequestRecord]:
    """Check that every call the fake served is one admitted ledger row with its exact usage
    and list-price cost, and that no admitted row lacks a served call. Returns the calls."""
    served = served_calls(upstream)
    admitted = run.admitted()
    assert len(admitted) == len(served), run.describe()

    rows = {row["upstream_request_id"]: row for row in admitted}
    for record in served:
        assert record.completed, f"the fake did not finish {record.path}"
        row = rows.get(record.response_id)
        assert row is not None, f"no ledger row for {record.response_id} ({record.path})"
        usage = served_usage(record)
        assert {kind: row[kind] for kind in TOKEN_KINDS} == usage, record.path
        assert row["status"] == "ok"
        assert row["model"] == record.model
        assert not row["usage_estimated"]
        assert not row["cost_estimated"]
        assert Decimal(row["cost_usd"]) == list_price_cost(record.model, usage), record.path
    return served


def recorded_spend(run: AgentRun) -> Decimal:
    """Return the run's spend, summed exactly from the ledger's decimal strings."""
    return sum((Decimal(row["cost_usd"] or "0") for row in run.calls()), Decimal(0))


def assert_stayed_local(run: AgentRun) -> None:
    """Check that no process outlived the run and nothing it started looked up a host name,
    which is how an update check or telemetry would begin."""
    assert run.survivors == {}, f"processes outlived tokencap: {run.survivors}"
    assert run.lookups == [], f"host names looked up: {sorted(set(run.lookups))}"


def assert_stopped_cleanly(run: AgentRun, cap: str) -> None:
    """Check that a cap stopped the run: exit 86, the session names the cap, nothing survived."""
    assert run.exit_code == 86, run.describe()
    assert_stayed_local(run)
    session = run.session()
    assert session["status"] == "capped"
    assert session["end_reason"] == cap
    assert session["exit_status"] == 86
    assert f"stopped by {cap}" in run.stderr


def assert_refused_at_first_call_over(run: AgentRun, cap: Decimal) -> None:
    """Check that each admitted call's worst case fit under the cap and the refused one's did
    not, from the estimates and costs the ledger recorded."""
    spent = Decimal(0)
    for row in run.calls():
        worst_case = spent + Decimal(row["estimate_usd"])
        if row["decision"] == "refused":
            assert worst_case > cap, dict(row)
            return
        assert worst_case <= cap, dict(row)
        spent += Decimal(row["cost_usd"])
    raise AssertionError("no call was refused")


def assert_third_call_refused(run: AgentRun, upstream: FakeUpstream) -> None:
    """Check that `--max-calls 2` sent two calls upstream and refused the third."""
    assert_stopped_cleanly(run, "max_calls")
    assert len(served_calls(upstream)) == 2
    assert [row["decision"] for row in run.calls()] == ["admitted", "admitted", "refused"]
    assert run.refused()[0]["refusal_reason"] == "max_calls"


def assert_retry_of_dropped_call_refused(run: AgentRun, upstream: FakeUpstream) -> None:
    """Check that under `--max-calls 1` the agent's retry of a dropped stream was refused."""
    assert_stopped_cleanly(run, "max_calls")
    (served,) = served_calls(upstream)
    assert served.dropped
    dropped, retry = run.calls()
    assert dropped["status"] == "dropped"
    assert retry["decision"] == "refused"
    assert retry["path"] == dropped["path"]
    assert retry["agent_prompt_id"] == dropped["agent_prompt_id"]
