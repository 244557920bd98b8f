"""The embedded mitmproxy: routes the agent's calls upstream and meters the model calls.

It listens twice on 127.0.0.1. The base-URL route is a reverse proxy that the agent's
ANTHROPIC_BASE_URL, OPENAI_BASE_URL and GOOGLE_GEMINI_BASE_URL point at, under the run's
secret path. The HTTPS proxy is what the agent's HTTPS_PROXY names, with the run's
credentials; it intercepts the TLS of model-API hosts and passes every other host through.

The addon reads top to bottom as the life of one request: let the client in (`http_connect`,
`tls_clienthello`) and route it (`requestheaders`), admit or refuse it (`request`), follow a
stream as it passes (`responseheaders`), and settle its cost (`response`, or `error` when the
exchange broke). WebSocket turns are admitted and settled in the `websocket_*` hooks. Pricing,
the caps and the ledger live in their own modules.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import secrets
import time
import weakref
import zlib
from typing import Any

from mitmproxy import connection, ctx, http, master, options, tls
from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig
from mitmproxy.proxy import mode_specs

from tokencap import meter, providers, routing, wsmeter
from tokencap.caps import Refusal
from tokencap.errors import ProxyStartError, UpstreamProtocolError
from tokencap.escapes import Escapes
from tokencap.meter import Call, Session
from tokencap.routing import Chain, Route
from tokencap.usage import (
    Api,
    StreamMeter,
    Usage,
    is_usage_only_chunk,
    read_request,
    read_response,
)

__all__ = ["MeterAddon", "Proxy", "Session"]

logger = logging.getLogger(__name__)

# Headers that carry credentials; they are never logged or stored.
SECRET_HEADERS = (
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "api-key",
    "cookie",
    "proxy-authorization",
)

PROXY_USER = "tokencap"

_MODEL_IN_PATH = re.compile(r"/models/([^/:]+)")


class MeterAddon:
    """mitmproxy addon that admits, forwards, meters and settles the agent's model calls."""

    def __init__(self, session: Session, chain: Chain | None = None) -> None:
        self.session = session
        self.chain = chain
        self.escapes = Escapes()
        self._streams: dict[str, tuple[http.HTTPFlow, Call]] = {}
        self._sockets: dict[str, tuple[http.HTTPFlow, wsmeter.Socket]] = {}
        # Client connections that sent the run's credentials with their CONNECT.
        self._authenticated: weakref.WeakSet[connection.Client] = weakref.WeakSet()
        credentials = f"{PROXY_USER}:{session.proxy_password}".encode()
        self._credentials = credentials

    # --- Who may use the HTTPS proxy ---------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Let a CONNECT through only with the run's proxy credentials."""
        if self._authorize(flow):
            self._authenticated.add(flow.client_conn)

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        """Add the user's proxy credentials to a CONNECT that tokencap sends through it."""
        chain = self.chain
        if chain and chain.authorization and flow.server_conn.address == chain.address:
            flow.request.headers["Proxy-Authorization"] = chain.authorization

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Intercept the TLS of model-API hosts; pass every other host through untouched."""
        if not _is_http_proxy(data.context.client.proxy_mode):
            return
        names = [data.client_hello.sni or ""]
        if data.context.server.address:
            names.append(data.context.server.address[0])
        if any(self._provider_for(name) for name in names if name):
            return
        data.ignore_connection = True
        host = next(name for name in names if name) if any(names) else "?"
        self.escapes.passed_through(host)
        logger.debug("passing %s through without interception", host)

    def _authorize(self, flow: http.HTTPFlow) -> bool:
        """Check the Proxy-Authorization header and respond 407 when it is missing or wrong."""
        value = flow.request.headers.get("proxy-authorization", "")
        scheme, _, encoded = value.partition(" ")
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            given = b""
        if scheme.lower() == "basic" and secrets.compare_digest(given, self._credentials):
            del flow.request.headers["proxy-authorization"]
            return True
        flow.response = http.Response.make(
            407,
            b"tokencap: this proxy serves one tokencap run; use the credentials in its "
            b"HTTPS_PROXY\n",
            {"Proxy-Authenticate": 'Basic realm="tokencap"', "content-type": "text/plain"},
        )
        logger.warning("rejected a proxy client without the run's credentials")
        return False

    def _provider_for(self, host: str) -> providers.Provider | None:
        return providers.find_host(host, self.session.extra_hosts)

    # --- Routing ----------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Route a request: to its provider's upstream, or through untouched."""
        if _is_http_proxy(flow.client_conn.proxy_mode):
            self._route_proxied(flow)
        else:
            self._route_base_url(flow)
        if flow.response is None:
            self._choose_proxy(flow)

    def _route_base_url(self, flow: http.HTTPFlow) -> None:
        """Check the run's secret path prefix and point the request at its upstream."""
        prefix = f"/{self.session.secret}/"
        path = flow.request.path
        if not path.startswith(prefix):
            # Without the secret this is not our agent, so respond without forwarding anything.
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
        routing.rewrite(flow.request, upstream, rest)
        route_path = rest.partition("?")[0]
        flow.metadata["tokencap_route"] = Route(upstream.provider, route_path, False, mount)

    def _route_proxied(self, flow: http.HTTPFlow) -> None:
        """Route a request that came through HTTPS_PROXY: meter model hosts, pass the rest."""
        if flow.client_conn not in self._authenticated:
            if not self._authorize(flow):
                return
            self._authenticated.add(flow.client_conn)
        flow.request.headers.pop("proxy-authorization", None)

        host = flow.request.pretty_host
        provider = self._provider_for(host) or self._provider_for(flow.request.host)
        if provider is None:
            if flow.request.scheme == "http":
                self.escapes.passed_through(host)
                self._add_chain_credentials(flow)
            return

        route_path = flow.request.path.partition("?")[0]
        flow.metadata["tokencap_route"] = Route(provider, route_path, True, host)
        override = self.session.overrides.get(provider.name)
        if override is not None:
            routing.redirect_intercepted(flow.request, override)

    def _add_chain_credentials(self, flow: http.HTTPFlow) -> None:
        # A plain-HTTP request forwarded to the user's proxy carries their credentials.
        chain = self.chain
        if chain and chain.authorization and chain.via(flow.request.host, flow.request.port):
            flow.request.headers["Proxy-Authorization"] = chain.authorization

    def _choose_proxy(self, flow: http.HTTPFlow) -> None:
        """Send the request through the user's proxy, or directly for hosts that NO_PROXY lists."""
        if self.chain is None or "tokencap_route" not in flow.metadata:
            return
        via = self.chain.via(flow.request.host, flow.request.port)
        current = flow.server_conn
        if current.address == (flow.request.host, flow.request.port) and current.via == via:
            return
        # A new server spec makes mitmproxy open a new connection instead of reusing the one
        # the client's CONNECT (or the reverse proxy's placeholder target) set up.
        flow.server_conn = connection.Server(
            address=(flow.request.host, flow.request.port), via=via
        )

    # --- Admission --------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        """Admit a model call (reserve its worst case and record it) or refuse it."""
        route: Route | None = flow.metadata.get("tokencap_route")
        if flow.response is not None or route is None:
            return
        request = flow.request
        if wsmeter.is_responses_upgrade(request.method, route.path, request.headers):
            self._open_socket(flow, route)
            return
        api = providers.model_call_api(route.provider, request.method, route.path)
        if api is None:
            # Model lists, token counting, health checks: forwarded unmetered.
            self.escapes.forwarded_unmetered(route.host, request.method, route.path)
            return
        provider = providers.pricing_provider(route.provider, api)
        try:
            self._admit(flow, route, provider, api)
        except Exception as exc:
            # Fail closed: a call tokencap cannot meter is not sent.
            logger.exception("refusing a %s call after an internal error", provider)
            self._refuse(flow, route, api, f"tokencap could not meter this call: {exc}", 500)

    def _admit(self, flow: http.HTTPFlow, route: Route, provider: str, api: Api) -> None:
        body = _json_body(flow.request)
        info = read_request(api, body, route.path, dict(flow.request.query))
        if info.model is None and (match := _MODEL_IN_PATH.search(route.path)):
            # Vertex names the model in the path, not the body.
            info.model = match.group(1)
        outcome = meter.admit(
            self.session, flow.id, provider, api, info, flow.request.method, route.path
        )
        if isinstance(outcome, Refusal):
            self._refuse(flow, route, api, f"tokencap: {outcome.message}")
            self.session.on_trip(outcome)
            return

        flow.metadata["tokencap_call"] = outcome
        if api is Api.OPENAI_CHAT and info.streamed and not info.wants_stream_usage:
            # Ask for the usage chunk, then drop it on the way back: the agent did not ask.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            flow.request.set_content(json.dumps(body).encode())
            outcome.strip_usage_chunk = True

    def _refuse(self, flow: http.HTTPFlow, route: Route, api: Api, message: str, status=0) -> None:
        status = status or self.session.refusal_status(api)
        flow.response = http.Response.make(
            status,
            providers.refusal_body(route.provider.name, message, status, api),
            {"content-type": "application/json", "x-should-retry": "false"},
        )

    # --- WebSocket turns --------------------------------------------------------------------

    def _open_socket(self, flow: http.HTTPFlow, route: Route) -> None:
        """Prepare to meter a Responses WebSocket; refuse the handshake once the run stopped."""
        tripped = self.session.budget.tripped
        if tripped is not None:
            self._refuse(flow, route, Api.OPENAI_RESPONSES, f"tokencap: {tripped.message}")
            return
        provider = providers.pricing_provider(route.provider, Api.OPENAI_RESPONSES)
        flow.metadata["tokencap_socket"] = wsmeter.Socket(flow.id, provider, route.path)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        """Start following a Responses WebSocket whose handshake succeeded."""
        socket: wsmeter.Socket | None = flow.metadata.get("tokencap_socket")
        if socket is not None:
            self._sockets[flow.id] = (flow, socket)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """Admit a turn before its response.create is forwarded; meter the events it returns."""
        socket: wsmeter.Socket | None = flow.metadata.get("tokencap_socket")
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        if socket is None or socket.closed or message.injected or not message.is_text:
            return
        try:
            if message.from_client:
                outcome = wsmeter.client_message(self.session, socket, message.text)
                if isinstance(outcome, Refusal):
                    message.drop()
                    self._end_socket(flow, socket, outcome, cut=False)
                    self.session.on_trip(outcome)
            else:
                refusal = wsmeter.server_message(self.session, socket, message.text)
                if refusal is not None:
                    self.session.on_trip(refusal)
                    self._end_socket(flow, socket, refusal, cut=True)
        except Exception:
            # Fail closed: a turn tokencap cannot meter ends the socket.
            logger.exception("metering a WebSocket message failed; closing the socket")
            if message.from_client:
                message.drop()
            refusal = Refusal("max_usd", "tokencap could not meter a WebSocket turn")
            self.session.budget.trip(refusal.cap, refusal.message)
            self.session.on_trip(self.session.budget.tripped or refusal)
            self._end_socket(flow, socket, refusal, cut=True)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        """Settle the turns a closed socket left open."""
        entry = self._sockets.pop(flow.id, None)
        if entry is not None:
            reason = f"WebSocket closed with code {flow.websocket.close_code}"
            wsmeter.close(self.session, entry[1], reason)

    def _end_socket(
        self, flow: http.HTTPFlow, socket: wsmeter.Socket, refusal: Refusal, cut: bool
    ) -> None:
        """Send the client an error event for the turn, then close both sides of the socket."""
        for call in socket.turns:
            call.cut = cut
        event = wsmeter.refusal_message(self.session, socket, refusal, cut)
        ctx.master.commands.call("inject.websocket", flow, True, event.encode(), True)
        wsmeter.close(self.session, socket, refusal.message)
        self._sockets.pop(flow.id, None)
        # The injected event is delivered by a task of its own; closing waits a moment so
        # that the client reads the event before the close.
        loop = asyncio.get_running_loop()
        loop.call_later(SOCKET_CLOSE_DELAY, self._close_connections, flow)

    def _close_connections(self, flow: http.HTTPFlow) -> None:
        server = ctx.master.addons.get("proxyserver")
        handler = server.connections.get(flow.client_conn.id)
        if handler is None:
            return
        for conn in (flow.server_conn, flow.client_conn):
            if conn is not None and conn.connected:
                handler.close_connection(conn)

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

        refusal = meter.running(self.session, call)
        if refusal is not None:
            self.session.on_trip(refusal)
            if call.decoder is None:
                # NOTE: a compressed stream is cut without the error event, which cannot be
                # spliced into the compressed bytes.
                message = f"tokencap: {refusal.message}; the stream was cut"
                events_out.append(providers.stream_error_event(call.api, message))
            self._cut(flow, call)
        return events_out or []

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
        """Cut every stream and WebSocket turn still running, when the session was stopped."""
        for flow, call in list(self._streams.values()):
            if not call.cut and not call.settled:
                self._cut(flow, call)
        tripped = self.session.budget.tripped
        for flow, socket in list(self._sockets.values()):
            if socket.turns and tripped is not None:
                self._end_socket(flow, socket, tripped, cut=True)

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
            usage, estimated = meter.stream_usage(call)
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
                usage = meter.fallback_usage(call)
                estimated = True
            if info is not None:
                values["model"] = info.model or call.request.model
                values["upstream_request_id"] = info.response_id
                values["error"] = info.error

        values["upstream_request_id"] = values.get("upstream_request_id") or _request_id_header(
            flow.response.headers
        )
        self._streams.pop(flow.id, None)
        meter.settle(self.session, call, usage, estimated, values)

    def error(self, flow: http.HTTPFlow) -> None:
        """Settle a call whose exchange broke: cut by us, dropped upstream, or client gone."""
        call: Call | None = flow.metadata.get("tokencap_call")
        if call is None or call.settled:
            return
        values: dict[str, Any] = {"error": str(flow.error)[:500] if flow.error else None}
        if flow.response is not None:
            values["http_status"] = flow.response.status_code
        if call.meter is not None:
            usage, estimated = meter.stream_usage(call)
            values["model"] = call.meter.info.model or call.request.model
            values["upstream_request_id"] = call.meter.info.response_id
        elif flow.response is None and flow.server_conn and not flow.server_conn.timestamp_start:
            # The upstream was never reached, so nothing can have been billed.
            usage, estimated = Usage(), False
            upstream = f"{flow.request.scheme}://{flow.request.host}:{flow.request.port}"
            self.session.unreachable[upstream] = values["error"] or "connection failed"
        else:
            usage, estimated = meter.fallback_usage(call), True
        values["status"] = "cut" if call.cut else "dropped"
        self._streams.pop(flow.id, None)
        meter.settle(self.session, call, usage, estimated, values)


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


def _request_id_header(headers: http.Headers) -> str | None:
    for name in ("request-id", "x-request-id", "x-goog-request-id"):
        if headers.get(name):
            return headers[name][:200]
    return None


def _is_http_proxy(mode: mode_specs.ProxyMode) -> bool:
    """Return True for the HTTPS-proxy listener, False for the base-URL route."""
    return isinstance(mode, mode_specs.RegularMode | mode_specs.UpstreamMode)


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

# Seconds between injecting a WebSocket error event and closing the socket.
# NOTE: chosen by hand; on a loaded machine the close could still overtake the event.
SOCKET_CLOSE_DELAY = 0.1


class Proxy:
    """One in-process mitmproxy master with tokencap's addon and its two listeners."""

    def __init__(
        self,
        session: Session,
        confdir: str,
        upstream_trust: str | None = None,
        chain: Chain | None = None,
    ) -> None:
        self.session = session
        self.chain = chain
        self.addon = MeterAddon(session, chain)
        self._confdir = confdir
        self._upstream_trust = upstream_trust
        self._master: master.Master | None = None
        self._runner: asyncio.Task | None = None
        self.port = 0  # the base-URL route
        self.proxy_port = 0  # the HTTPS proxy

    async def start(self) -> None:
        """Start listening on two free ports; raise ProxyStartError if that fails."""
        # Reverse-proxy requests are redirected per route in the addon; its target is unused.
        modes = ["reverse:http://127.0.0.1:9"]
        modes.append(f"upstream:{self.chain.url}" if self.chain else "regular")
        opts = options.Options(
            listen_host="127.0.0.1", listen_port=0, mode=modes, confdir=self._confdir
        )
        # Only the addons a proxy needs: mitmproxy runs every hook through every addon, so its
        # default set of about thirty costs several milliseconds per request.
        proxy_master = master.Master(opts, with_termlog=False)
        proxy_master.addons.add(
            core.Core(),
            proxyserver.Proxyserver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            self.addon,
        )
        proxy_master.options.update(
            # Reverse mode rewrites the Host header to its target unless keep_host_header is
            # set. The addon sets the header per upstream instead.
            keep_host_header=True,
            connection_strategy="lazy",
            ssl_insecure=False,
            ssl_verify_upstream_trusted_ca=self._upstream_trust,
        )
        self._master = proxy_master
        self._runner = asyncio.create_task(proxy_master.run())
        server = proxy_master.addons.get("proxyserver")
        deadline = time.monotonic() + 10
        while not (server.is_running and len(server.listen_addrs()) >= len(modes)):
            if self._runner.done():
                exc = self._runner.exception()
                raise ProxyStartError(f"the proxy stopped during start-up: {exc}") from exc
            if time.monotonic() > deadline:
                raise ProxyStartError("the proxy did not start listening within 10 seconds")
            await asyncio.sleep(0.005)
        for instance in server.servers:
            port = instance.listen_addrs[0][1]
            if isinstance(instance.mode, mode_specs.ReverseMode):
                self.port = port
            else:
                self.proxy_port = port

    def base_url(self, provider: str) -> str:
        """Return the base URL the agent uses for a provider."""
        return f"http://127.0.0.1:{self.port}/{self.session.secret}/{provider}"

    @property
    def proxy_url(self) -> str:
        """Return the HTTPS_PROXY value for the agent, with the run's credentials."""
        password = self.session.proxy_password
        return f"http://{PROXY_USER}:{password}@127.0.0.1:{self.proxy_port}"

    async def stop(self) -> None:
        """Close the listening sockets and stop the master."""
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
