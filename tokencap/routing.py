"""Request routing: the provider, the upstream, and the user's own proxy on the way there.

tokencap receives an agent's calls on two listeners. The base-URL route is a reverse proxy
whose paths begin with the run's secret and a provider name. The HTTPS proxy is a regular
proxy that the agent reaches through HTTPS_PROXY; it intercepts the hosts of model APIs and
passes every other host through. Both forward upstream through the user's own HTTPS proxy,
when they had one, except for hosts their NO_PROXY names.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from mitmproxy import http

from tokencap import providers
from tokencap.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Route:
    """A request on its way to a model provider: which one, and by which route it came."""

    provider: providers.Provider
    path: str  # the path below the base URL, without the query, as model-call paths match it
    intercepted: bool
    host: str  # the host the agent asked for, for reports


def rewrite(request: http.Request, upstream: providers.Upstream, rest: str) -> None:
    """Point a request at `upstream`, with `rest` (path and query) below its base path."""
    request.scheme = upstream.scheme
    request.host = upstream.host
    request.port = upstream.port
    request.path = upstream.path + rest
    default_port = 443 if upstream.scheme == "https" else 80
    request.host_header = (
        upstream.host if upstream.port == default_port else f"{upstream.host}:{upstream.port}"
    )


def redirect_intercepted(request: http.Request, override: providers.Upstream) -> None:
    """Send an intercepted request to the upstream that a base-URL variable set.

    The provider's default base path (such as /v1 for OpenAI) is replaced by the override's,
    so https://api.openai.com/v1/responses goes to <override>/responses.
    """
    default = urlsplit(override.provider.default_base_url or "")
    base = default.path.rstrip("/")
    path = request.path
    if base and (path == base or path.startswith(base + "/") or path.startswith(base + "?")):
        path = path[len(base) :]
    rewrite(request, override, path)


# --- The user's own proxy ---------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """The user's HTTPS proxy, which tokencap forwards through, and their NO_PROXY list."""

    scheme: str
    address: tuple[str, int]
    authorization: str | None
    no_proxy: tuple[str, ...]
    url: str  # without credentials, for messages

    @property
    def spec(self) -> tuple[str, tuple[str, int]]:
        """Return the proxy as mitmproxy's `via` server spec."""
        return (self.scheme, self.address)

    def via(self, host: str, port: int) -> tuple[str, tuple[str, int]] | None:
        """Return the proxy to reach host:port through, or None to connect directly."""
        if is_loopback(host) or no_proxy_matches(self.no_proxy, host, port):
            return None
        return self.spec


def chain_from_env(env: Mapping[str, str]) -> Chain | None:
    """Return the user's HTTPS proxy from `env`, or None when they have none.

    The lower-case variables win, as curl and Python's urllib read them. Raises ConfigError
    for a proxy tokencap cannot forward through.
    """
    name = next((n for n in ("https_proxy", "HTTPS_PROXY") if env.get(n)), None)
    if name is None:
        return None
    value = env[name].strip()
    parts = urlsplit(value if "://" in value else "http://" + value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{name}={_without_credentials(value)!r} is not an http:// or https:// proxy URL; "
            "tokencap forwards only through HTTP proxies, so unset it or point it at one"
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"{name} has an invalid port: {_without_credentials(value)!r}") from None
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    no_proxy = tuple(
        entry.strip().lower()
        for entry in (env.get("no_proxy") or env.get("NO_PROXY") or "").split(",")
        if entry.strip()
    )
    url = f"{parts.scheme}://{parts.hostname}:{port}"
    return Chain(parts.scheme, (parts.hostname, port), authorization, no_proxy, url)


def no_proxy_matches(entries: tuple[str, ...], host: str, port: int) -> bool:
    """Return True when a NO_PROXY list exempts host:port, as curl reads such lists.

    An entry is `*`, a host name that also matches its subdomains (with or without a leading
    dot), an IP address or a CIDR block, optionally with a `:port`.
    """
    host = host.lower().strip("[]").rstrip(".")
    for entry in entries:
        if entry == "*":
            return True
        name, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if _ip_entry_matches(name, host):
            return True
        name = name.lstrip("*").lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def is_loopback(host: str) -> bool:
    """Return True for localhost and loopback addresses, which never go through a proxy."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        name, _, rest = entry[1:].partition("]")
        return name, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        if port.isdigit():
            return name, int(port)
    return entry, None


def _ip_entry_matches(entry: str, host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    try:
        return address in ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False


def _without_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{host}" if at else url


def child_no_proxy(value: str, intercepted: list[str]) -> str:
    """Return a NO_PROXY list for the agent: the user's, less what would skip interception.

    An entry that covers a model-API host (`*`, `.openai.com`, `api.anthropic.com`) would send
    those calls around tokencap, so it is removed; tokencap itself still honours it when it
    forwards upstream. Loopback entries are added, so the base-URL route is reached directly.
    """
    entries = [e.strip() for e in value.split(",") if e.strip()]
    kept = []
    for entry in entries:
        covers_model_host = any(
            no_proxy_matches((entry.lower(),), host.lstrip("*.-"), 443) for host in intercepted
        )
        if not covers_model_host:
            kept.append(entry)
    for local in ("127.0.0.1", "localhost", "::1"):
        if local not in kept:
            kept.append(local)
    return ",".join(kept)
