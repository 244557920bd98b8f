"""Admitting and settling model calls, whatever transport carried them.

An HTTP request, a server-sent-event stream and one turn of a WebSocket all go through the same
three steps: `admit` reserves the call's worst case against the caps and records it, `running`
prices a stream's output so far, and `settle` replaces the reservation by the exact cost.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from tokencap import providers
from tokencap.agents import GENERIC, AgentProfile
from tokencap.caps import Budget, Refusal
from tokencap.errors import LedgerError
from tokencap.ledger import Ledger
from tokencap.prices import Pricer, decimal_string, to_pico
from tokencap.usage import Api, RequestInfo, StreamMeter, Usage

logger = logging.getLogger(__name__)


@dataclass
class Call:
    """The state of one model call, from admission to settlement."""

    key: str
    row_id: int
    seq: int
    provider: str
    api: Api
    request: RequestInfo
    estimate_usd: Decimal
    started: float
    strip_usage_chunk: bool = False
    meter: StreamMeter | None = None
    decoder: Any = None
    cut: bool = False
    settled: bool = False
    first_byte: float | None = None
    last_running_usage: Usage | None = None


@dataclass
class Session:
    """Everything the addon needs to know about the run it meters."""

    session_id: str
    ledger: Ledger
    budget: Budget
    pricer: Pricer
    upstreams: dict[str, providers.Upstream]
    on_trip: Callable[[Refusal], None]
    secret: str = field(default_factory=lambda: "tc-" + secrets.token_urlsafe(18))
    seq: int = 0
    profile: AgentProfile = GENERIC
    # Upstreams that tokencap's own environment set, which intercepted calls go to as well.
    overrides: dict[str, providers.Upstream] = field(default_factory=dict)
    # Host patterns intercepted in addition to the providers' own, from the configuration.
    extra_hosts: tuple[str, ...] = ()
    proxy_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    # Upstream URL -> the last connection error, for upstreams that could not be reached.
    unreachable: dict[str, str] = field(default_factory=dict)

    def refusal_status(self, api: Api) -> int:
        """Return the status a refused call gets: the profile's, else the API's usual one."""
        return self.profile.refusal_status or providers.refusal_status(api)


def admit(
    session: Session,
    key: str,
    provider: str,
    api: Api,
    info: RequestInfo,
    method: str,
    path: str,
) -> Call | Refusal:
    """Reserve a call's worst case and record it, or record and return why it is refused."""
    now = datetime.now(UTC)
    estimate = session.pricer.estimate(provider, api, info, now)
    session.seq += 1
    row = {
        "session_id": session.session_id,
        "seq": session.seq,
        "started_at": now.isoformat(timespec="milliseconds"),
        "provider": provider,
        "api": str(api),
        "method": method,
        "path": path,
        "model": info.model,
        "agent_prompt_id": info.agent_prompt_id,
        "streamed": int(info.streamed),
        "estimate_usd": str(estimate),
    }

    refusal = session.pricer.refusal(provider, info.model, now)
    if refusal is None:
        refusal = session.budget.admit(key, estimate)
    if refusal is not None:
        session.ledger.record_call(
            row
            | {"decision": "refused", "status": "refused", "refusal_reason": refusal.cap}
            | {"cost_usd": "0", "cost_pico_usd": 0, "ended_at": row["started_at"]}
        )
        return refusal

    try:
        row_id = session.ledger.record_call(row | {"decision": "admitted", "status": "sent"})
    except LedgerError:
        session.budget.settle(key, Decimal(0))
        session.budget.calls -= 1
        raise
    return Call(key, row_id, session.seq, provider, api, info, estimate, time.monotonic())


def running(session: Session, call: Call) -> Refusal | None:
    """Price a stream's usage so far against the dollar caps, when it has changed."""
    assert call.meter is not None
    if not session.budget.limits_usd:
        return None
    usage, _ = call.meter.running_usage(call.request.input_tokens_estimate)
    if usage == call.last_running_usage:
        return None
    call.last_running_usage = usage
    model = call.meter.info.model or call.request.model
    cost = session.pricer.cost(call.provider, model, usage, now()).cost_usd
    return session.budget.update_running(call.key, cost)


def stream_usage(call: Call) -> tuple[Usage, bool]:
    """Return a stream's final usage, or its running estimate when it did not finish."""
    assert call.meter is not None
    if call.meter.final and call.meter.info.usage is not None:
        return call.meter.info.usage, False
    return call.meter.running_usage(call.request.input_tokens_estimate)


def fallback_usage(call: Call) -> Usage:
    """Return what admission reserved, to charge a call whose response could not be read."""
    output = 0 if call.request.streamed else (call.request.max_output_tokens or 0)
    return Usage(input_tokens=call.request.input_tokens_estimate, output_tokens=output)


def settle(
    session: Session, call: Call, usage: Usage, estimated: bool, values: dict[str, Any]
) -> None:
    """Price a finished call, record it, and stop the session when spend reached the cap."""
    call.settled = True
    model = values.get("model") or call.request.model
    try:
        cost = session.pricer.cost(call.provider, model, usage, now())
    except Exception:
        logger.exception("pricing call %s failed; charging its estimate", call.seq)
        cost = None
    cost_usd = cost.cost_usd if cost else call.estimate_usd
    refusal = session.budget.settle(call.key, cost_usd)

    ended = time.monotonic()
    values.update(usage.as_dict())
    values.update(
        ended_at=now().isoformat(timespec="milliseconds"),
        usage_estimated=int(estimated),
        cost_usd=decimal_string(cost_usd),
        cost_pico_usd=to_pico(cost_usd),
        cost_estimated=int(cost.estimated if cost else True),
        price_source=cost.source if cost else "admission estimate",
        latency_ms=round((ended - call.started) * 1000, 2),
        ttfb_ms=round((call.first_byte - call.started) * 1000, 2) if call.first_byte else None,
    )
    logger.info(
        "call %d %s %s: %s, %d input and %d output tokens, $%s",
        call.seq,
        call.provider,
        model,
        values.get("status"),
        usage.total_input_tokens,
        usage.output_tokens,
        values["cost_usd"],
    )
    try:
        session.ledger.update_call(call.row_id, values)
    except LedgerError:
        logger.exception("could not record call %s", call.seq)
    if refusal is not None:
        session.on_trip(refusal)


def now() -> datetime:
    """Return the current time in UTC, the time calls are priced at."""
    return datetime.now(UTC)
