"""The embedded mitmproxy: routes the agent's calls upstream and meters the model calls.

The addon reads top to bottom as the life of one request: authenticate and route it
(`requestheaders`), admit or refuse it (`request`), follow a stream as it passes
(`responseheaders`), and settle its cost (`response`, or `error` when the exchange broke).
Pricing, the caps and the ledger live in their own modules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from mitmproxy import ctx, http, master, options
from mitmproxy.addons import core, next_layer, proxyauth, proxyserver, tlsconfig, upstream_auth

from tokencap import providers
from tokencap.caps import Budget, Refusal
from tokencap.errors import LedgerError, ProxyStartError, UpstreamProtocolError
from tokencap.ledger import Ledger
from tokencap.prices import Pricer, to_pico
from tokencap.usage import (
    Api,
    RequestInfo,
    StreamMeter,
    Usage,
    is_usage_only_chunk,
    read_request,
    read_response,
)

logger = logging.getLogger(__name__)

# Headers that carry credentials; they are never logged or stored.
SECRET_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key", "cookie")


@dataclass
class Call:
    """The state of one model call, from admission to settlement."""

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
    # Upstream URL -> the last connection error, for upstreams that could not be reached.
    unreachable: dict[str, str] = field(default_factory=dict)


class MeterAddon:
    """mitmproxy addon that admits, forwards, meters and settles the agent's model calls."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._streams: dict[str, tuple[http.HTTPFlow, Call]] = {}

    # --- Routing ----------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Check the run's secret path prefix and point the request at its upstream."""
        prefix = f"/{self.session.secret}/"
        path = flow.request.path
        if not path.startswith(prefix):
            # Without the secret this is not our agent: answer without forwarding anything.
            flow.response = http.Response.make(
                403,
                b"tokencap: this proxy serves one tokencap run; the request lacks its secret\n",
                {"content-type": "text/plain"},
            )
            logger.warning("rejected a request without the run secret: %s", flow.request.method)
            return

        mount, _, rest = path[len(prefix) :].partition("/")
        upstream = self.session.upstreams.get(mount)
        if upstream is None:
            flow.response = http.Response.make(
                404, f"tokencap: unknown provider route {mount!r}\n".encode()
            )
            return
        rest = "/" + rest
        route, _, _ = rest.partition("?")
        flow.request.scheme = upstream.scheme
        flow.request.host = upstream.host
        flow.request.port = upstream.port
        flow.request.path = upstream.path + rest
        default_port = 443 if upstream.scheme == "https" else 80
        flow.request.host_header = (
            upstream.host if upstream.port == default_port else f"{upstream.host}:{upstream.port}"
        )
        flow.metadata["tokencap_route"] = (upstream.provider.name, route)

    # --- Admission --------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        """Admit a model call (reserve its worst case and record it) or refuse it."""
        if flow.response is not None or "tokencap_route" not in flow.metadata:
            return
        provider, route = flow.metadata["tokencap_route"]
        api = providers.model_call_api(provider, flow.request.method, route)
        if api is None:
            return  # model lists, token counting, health checks: forwarded unmetered
        try:
            self._admit(flow, provider, api, route)
        except Exception as exc:
            # Fail closed: a call tokencap cannot meter is not sent.
            logger.exception("refusing a %s call after an internal error", provider)
            self._refuse(flow, provider, f"tokencap could not meter this call: {exc}", status=500)

    def _admit(self, flow: http.HTTPFlow, provider: str, api: Api, route: str) -> None:
        session = self.session
        body = _json_body(flow.request)
        info = read_request(api, body, route, dict(flow.request.query))
        now = datetime.now(UTC)
        estimate = session.pricer.estimate(provider, api, info, now)
        session.seq += 1
        row = {
            "session_id": session.session_id,
            "seq": session.seq,
            "started_at": now.isoformat(timespec="milliseconds"),
            "provider": provider,
            "api": str(api),
            "method": flow.request.method,
            "path": route,
            "model": info.model,
            "agent_prompt_id": info.agent_prompt_id,
            "streamed": int(info.streamed),
            "estimate_usd": str(estimate),
        }

        refusal = session.pricer.refusal(provider, info.model, now)
        if refusal is None:
            refusal = session.budget.admit(flow.id, estimate)
        if refusal is not None:
            session.ledger.record_call(
                row
                | {"decision": "refused", "status": "refused", "refusal_reason": refusal.cap}
                | {"cost_usd": "0", "cost_pico_usd": 0, "ended_at": row["started_at"]}
            )
            self._refuse(flow, provider, f"tokencap: {refusal.message}")
            session.on_trip(refusal)
            return

        try:
            row_id = session.ledger.record_call(row | {"decision": "admitted", "status": "sent"})
        except LedgerError:
            session.budget.settle(flow.id, Decimal(0))
            session.budget.calls -= 1
            raise

        call = Call(row_id, session.seq, provider, api, info, estimate, time.monotonic())
        flow.metadata["tokencap_call"] = call
        if api is Api.OPENAI_CHAT and info.streamed and not info.wants_stream_usage:
            # Ask for the usage chunk, then drop it on the way back: the agent did not ask.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            flow.request.set_content(json.dumps(body).encode())
            call.strip_usage_chunk = True

    def _refuse(self, flow: http.HTTPFlow, provider: str, message: str, status: int = 0) -> None:
        status = status or providers.BY_NAME[provider].refusal_status
        flow.response = http.Response.make(
            status,
            providers.refusal_body(provider, message),
            {"content-type": "application/json", "x-should-retry": "false"},
        )

    # --- Streams ----------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Follow event streams as they pass, without holding back whole responses."""
        call: Call | None = flow.metadata.get("tokencap_call")
        if call is None or flow.response is None:
            return
        call.first_byte = time.monotonic()
        content_type = flow.response.headers.get("content-type", "")
        if "text/event-stream" not in content_type:
            return
        call.meter = StreamMeter(call.api)
        call.decoder = _decoder(flow.response.headers.get("content-encoding", ""))
        self._streams[flow.id] = (flow, call)
        flow.response.stream = lambda chunk: self._tap(flow, call, chunk)

    def _tap(self, flow: http.HTTPFlow, call: Call, chunk: bytes) -> bytes | list[bytes]:
        # Never return b"" mid-stream: to mitmproxy that ends the response cleanly.
        try:
            return self._follow(flow, call, chunk)
        except Exception:
            logger.exception("metering stream of call %s failed; cutting it", call.seq)
            self.session.budget.trip("max_usd", "tokencap could not meter a stream")
            self.session.on_trip(self.session.budget.tripped)
            self._cut(flow, call)
            return chunk or []

    def _follow(self, flow: http.HTTPFlow, call: Call, chunk: bytes) -> bytes | list[bytes]:
        assert call.meter is not None
        if call.cut:
            return []
        if chunk == b"":
            return self._end_of_stream(call)

        # Compressed streams are forwarded as they came; only the meter reads them decoded.
        if call.decoder is not None:
            call.meter.feed(call.decoder.decompress(chunk))
            events_out = [chunk]
        else:
            events = call.meter.feed(chunk)
            events_out = [
                e.raw for e in events if not (call.strip_usage_chunk and is_usage_only_chunk(e))
            ]

        refusal = self._check_running_cost(flow, call)
        if refusal is not None:
            self.session.on_trip(refusal)
            if call.decoder is None:
                # NOTE: a compressed stream is cut without the error event, which cannot be
                # spliced into the compressed bytes.
                message = f"tokencap: {refusal.message}; the stream was cut"
                events_out.append(providers.stream_error_event(call.api, message))
            self._cut(flow, call)
        return events_out or []

    def _check_running_cost(self, flow: http.HTTPFlow, call: Call) -> Refusal | None:
        """Price the stream's usage so far against the dollar caps, when it has changed."""
        assert call.meter is not None
        if not self.session.budget.limits_usd:
            return None
        running, _ = call.meter.running_usage(call.request.input_tokens_estimate)
        if running == call.last_running_usage:
            return None
        call.last_running_usage = running
        model = call.meter.info.model or call.request.model
        cost = self.session.pricer.cost(call.provider, model, running, _now()).cost_usd
        return self.session.budget.update_running(flow.id, cost)

    def _end_of_stream(self, call: Call) -> bytes | list[bytes]:
        assert call.meter is not None
        if call.decoder is not None:
            call.meter.feed(call.decoder.flush())
            return b""
        events, rest = call.meter.flush()
        if not rest:
            return b""
        if call.strip_usage_chunk and events and is_usage_only_chunk(events[0]):
            return b""
        return [rest]

    def _cut(self, flow: http.HTTPFlow, call: Call) -> None:
        """Close the upstream connection of a stream, which makes the provider stop generating."""
        call.cut = True
        handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
        if handler is not None and flow.server_conn is not None:
            asyncio.get_running_loop().call_soon(handler.close_connection, flow.server_conn)

    def cut_all_streams(self) -> None:
        """Cut every stream still running, for example when the session was stopped."""
        for flow, call in list(self._streams.values()):
            if not call.cut and not call.settled:
                self._cut(flow, call)

    # --- Settlement -------------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        """Price a finished call and record it before the agent sees the end of the response."""
        call: Call | None = flow.metadata.get("tokencap_call")
        if call is None or call.settled:
            return
        assert flow.response is not None
        status = flow.response.status_code
        values: dict[str, Any] = {"http_status": status}
        usage: Usage | None = None
        estimated = False

        if call.meter is not None:
            usage, estimated = self._stream_usage(call)
            values["upstream_request_id"] = call.meter.info.response_id
            values["model"] = call.meter.info.model or call.request.model
            values["error"] = call.meter.info.error
            values["status"] = _stream_status(call, status)
        else:
            try:
                info = read_response(call.api, flow.response.get_content(strict=False) or b"")
            except (UpstreamProtocolError, ValueError) as exc:
                info = None
                values["error"] = str(exc)[:500]
            if info is not None and info.usage is not None:
                usage = info.usage
                values["status"] = "ok" if status < 400 else "upstream_error"
            elif status >= 400:
                # Errors the provider does not bill carry no usage and cost nothing.
                values["status"] = "upstream_error"
                usage = Usage()
            else:
                values["status"] = "garbled"
                usage = _fallback_usage(call)
                estimated = True
            if info is not None:
                values["model"] = info.model or call.request.model
                values["upstream_request_id"] = info.response_id
                values["error"] = info.error

        values["upstream_request_id"] = values.get("upstream_request_id") or _request_id_header(
            flow.response.headers
        )
        self._settle(flow, call, usage, estimated, values)

    def error(self, flow: http.HTTPFlow) -> None:
        """Settle a call whose exchange broke: cut by us, dropped upstream, or client gone."""
        call: Call | None = flow.metadata.get("tokencap_call")
        if call is None or call.settled:
            return
        values: dict[str, Any] = {"error": str(flow.error)[:500] if flow.error else None}
        if flow.response is not None:
            values["http_status"] = flow.response.status_code
        if call.meter is not None:
            usage, estimated = self._stream_usage(call)
            values["model"] = call.meter.info.model or call.request.model
            values["upstream_request_id"] = call.meter.info.response_id
        elif flow.response is None and flow.server_conn and not flow.server_conn.timestamp_start:
            # The upstream was never reached, so nothing can have been billed.
            usage, estimated = Usage(), False
            upstream = self.session.upstreams[call.provider].url
            self.session.unreachable[upstream] = values["error"] or "connection failed"
        else:
            usage, estimated = _fallback_usage(call), True
        values["status"] = "cut" if call.cut else "dropped"
        self._settle(flow, call, usage, estimated, values)

    def _stream_usage(self, call: Call) -> tuple[Usage, bool]:
        assert call.meter is not None
        if call.meter.final and call.meter.info.usage is not None:
            return call.meter.info.usage, False
        return call.meter.running_usage(call.request.input_tokens_estimate)

    def _settle(
        self,
        flow: http.HTTPFlow,
        call: Call,
        usage: Usage,
        estimated: bool,
        values: dict[str, Any],
    ) -> None:
        call.settled = True
        self._streams.pop(flow.id, None)
        session = self.session
        model = values.get("model") or call.request.model
        try:
            cost = session.pricer.cost(call.provider, model, usage, _now())
        except Exception:
            logger.exception("pricing call %s failed; charging its estimate", call.seq)
            cost = None
        cost_usd = cost.cost_usd if cost else call.estimate_usd
        refusal = session.budget.settle(flow.id, cost_usd)

        ended = time.monotonic()
        values.update(usage.as_dict())
        values.update(
            ended_at=_now().isoformat(timespec="milliseconds"),
            usage_estimated=int(estimated),
            cost_usd=str(cost_usd.normalize()) if cost_usd else "0",
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


def _stream_status(call: Call, http_status: int) -> str:
    assert call.meter is not None
    if call.cut:
        return "cut"
    if call.meter.garbled:
        return "garbled"
    if call.meter.info.error or http_status >= 400:
        # The provider reported an error inside the stream, such as overloaded_error.
        return "upstream_error"
    return "ok"


def _json_body(request: http.Request) -> Any:
    try:
        content = request.get_content(strict=False)
        return json.loads(content) if content else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def _fallback_usage(call: Call) -> Usage:
    # The response could not be read, so charge what admission reserved for it.
    output = 0 if call.request.streamed else (call.request.max_output_tokens or 0)
    return Usage(input_tokens=call.request.input_tokens_estimate, output_tokens=output)


def _request_id_header(headers: http.Headers) -> str | None:
    for name in ("request-id", "x-request-id", "x-goog-request-id"):
        if headers.get(name):
            return headers[name][:200]
    return None


def _now() -> datetime:
    return datetime.now(UTC)


class _Brotli:
    def __init__(self) -> None:
        import brotli

        self._decoder = brotli.Decompressor()

    def decompress(self, data: bytes) -> bytes:
        return self._decoder.process(data)

    def flush(self) -> bytes:
        return b""


class _Zstd:
    def __init__(self) -> None:
        import zstandard

        self._decoder = zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, data: bytes) -> bytes:
        return self._decoder.decompress(data)

    def flush(self) -> bytes:
        return b""


def _decoder(encoding: str) -> Any:
    """Return an incremental decoder for a Content-Encoding, or None for plain bodies."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    if encoding == "br":
        return _Brotli()
    if encoding == "zstd":
        return _Zstd()
    raise UpstreamProtocolError(f"unsupported content-encoding {encoding!r}")


# --- Starting and stopping ------------------------------------------------------------------


class Proxy:
    """One in-process mitmproxy master with tokencap's addon, listening on 127.0.0.1."""

    def __init__(self, session: Session, confdir: str, log_level: int = logging.INFO) -> None:
        self.session = session
        self.addon = MeterAddon(session)
        self._confdir = confdir
        self._master: master.Master | None = None
        self._runner: asyncio.Task | None = None
        self.port = 0

    async def start(self) -> None:
        """Start listening on a free port; raise ProxyStartError if that fails."""
        opts = options.Options(
            listen_host="127.0.0.1",
            listen_port=0,
            # Requests are redirected per route in the addon; this target is never used.
            mode=["reverse:http://127.0.0.1:9"],
            confdir=self._confdir,
        )
        # Only the addons a proxy needs: mitmproxy runs every hook through every addon, so its
        # default set of about thirty costs several milliseconds per request.
        proxy_master = master.Master(opts, with_termlog=False)
        proxy_master.addons.add(
            core.Core(),
            proxyauth.ProxyAuth(),
            proxyserver.Proxyserver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            upstream_auth.UpstreamAuth(),
            self.addon,
        )
        proxy_master.options.update(
            # Reverse mode rewrites the Host header to the target unless told not to; the addon
            # sets it per upstream instead.
            keep_host_header=True,
            connection_strategy="lazy",
            ssl_insecure=False,
        )
        self._master = proxy_master
        self._runner = asyncio.create_task(proxy_master.run())
        server = proxy_master.addons.get("proxyserver")
        deadline = time.monotonic() + 10
        while not (server.is_running and server.listen_addrs()):
            if self._runner.done():
                exc = self._runner.exception()
                raise ProxyStartError(f"the proxy stopped during start-up: {exc}") from exc
            if time.monotonic() > deadline:
                raise ProxyStartError("the proxy did not start listening within 10 seconds")
            await asyncio.sleep(0.005)
        self.port = server.listen_addrs()[0][1]

    def base_url(self, provider: str) -> str:
        """Return the base URL the agent uses for a provider."""
        return f"http://127.0.0.1:{self.port}/{self.session.secret}/{provider}"

    async def stop(self) -> None:
        """Close the listening socket and stop the master."""
        if self._master is None or self._runner is None:
            return
        server = self._master.addons.get("proxyserver")
        await server.servers.update([])
        self._master.shutdown()
        try:
            await asyncio.wait_for(self._runner, timeout=5)
        except (TimeoutError, asyncio.CancelledError):
            logger.warning("the proxy did not stop within 5 seconds")
        self._master = None
