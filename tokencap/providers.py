"""The providers tokencap meters: their hosts, variables, model-call paths and error shapes."""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from tokencap.errors import ConfigError
from tokencap.usage import Api


@dataclass(frozen=True, slots=True)
class Provider:
    """A model provider: where its API lives, which requests are model calls, how to refuse one.

    `name` is what the ledger records and, through the price table's provider ids, what prices
    the call. Providers with an `env_var` can also be reached through that base-URL variable.
    """

    name: str
    label: str
    hosts: tuple[str, ...]
    calls: tuple[tuple[re.Pattern[str], Api], ...]
    env_var: str | None = None
    default_base_url: str | None = None
    # Older or third-party clients read these names for the same base URL (litellm, langchain).
    aliases: tuple[str, ...] = ()


# Paths are matched against what the client sent below its base URL, so a gateway base such as
# https://gateway.example/openai/v1 still matches.
_ANTHROPIC = ((re.compile(r"(^|/)v1/messages$"), Api.ANTHROPIC_MESSAGES),)
_OPENAI = (
    (re.compile(r"(^|/)chat/completions$"), Api.OPENAI_CHAT),
    (re.compile(r"(^|/)responses$"), Api.OPENAI_RESPONSES),
)
_GEMINI = (
    (
        re.compile(r"(^|/)v1[a-z0-9]*/models/[^/]+:(generateContent|streamGenerateContent)$"),
        Api.GEMINI_GENERATE,
    ),
)
_VERTEX = (
    (
        re.compile(r"(^|/)publishers/google/models/[^/]+:(generateContent|streamGenerateContent)$"),
        Api.GEMINI_GENERATE,
    ),
    # Vertex serves Claude with the Messages body; the model is named in the path.
    (
        re.compile(r"(^|/)publishers/anthropic/models/[^/]+:(rawPredict|streamRawPredict)$"),
        Api.ANTHROPIC_MESSAGES,
    ),
    (re.compile(r"(^|/)endpoints/openapi/chat/completions$"), Api.OPENAI_CHAT),
)

PROVIDERS = (
    Provider(
        "anthropic",
        "Anthropic",
        ("api.anthropic.com",),
        _ANTHROPIC,
        env_var="ANTHROPIC_BASE_URL",
        default_base_url="https://api.anthropic.com",
        aliases=("ANTHROPIC_API_BASE",),
    ),
    Provider(
        "openai",
        "OpenAI",
        ("api.openai.com",),
        _OPENAI,
        env_var="OPENAI_BASE_URL",
        default_base_url="https://api.openai.com/v1",
        aliases=("OPENAI_API_BASE",),
    ),
    Provider(
        "gemini",
        "Google Gemini API",
        ("generativelanguage.googleapis.com",),
        _GEMINI,
        env_var="GOOGLE_GEMINI_BASE_URL",
        default_base_url="https://generativelanguage.googleapis.com",
    ),
)
"""The providers whose base-URL variable the agent gets, pointing at tokencap."""

INTERCEPTED = (
    *PROVIDERS,
    Provider(
        "google",
        "Google Vertex AI",
        ("aiplatform.googleapis.com", "*-aiplatform.googleapis.com"),
        _VERTEX,
        env_var="GOOGLE_VERTEX_BASE_URL",
        default_base_url="https://aiplatform.googleapis.com",
    ),
    # Codex signed in with a ChatGPT plan calls the Responses API on chatgpt.com; every other
    # path on that host is the web app and passes unmetered.
    Provider(
        "chatgpt",
        "OpenAI through a ChatGPT plan",
        ("chatgpt.com",),
        ((re.compile(r"^/backend-api/codex/responses$"), Api.OPENAI_RESPONSES),),
    ),
    Provider(
        "azure",
        "Azure OpenAI",
        ("*.openai.azure.com", "*.cognitiveservices.azure.com", "*.services.ai.azure.com"),
        _OPENAI,
    ),
    Provider("openrouter", "OpenRouter", ("openrouter.ai", "api.openrouter.ai"), _OPENAI),
    Provider(
        "mistral",
        "Mistral",
        ("api.mistral.ai",),
        (
            *_OPENAI,
            (re.compile(r"(^|/)fim/completions$"), Api.OPENAI_CHAT),
            (re.compile(r"(^|/)agents/completions$"), Api.OPENAI_CHAT),
        ),
    ),
    Provider("groq", "Groq", ("api.groq.com",), _OPENAI),
    Provider("deepseek", "DeepSeek", ("api.deepseek.com",), (*_OPENAI, *_ANTHROPIC)),
    Provider("x-ai", "xAI", ("api.x.ai",), (*_OPENAI, *_ANTHROPIC)),
    Provider("together", "Together AI", ("api.together.xyz", "api.together.ai"), _OPENAI),
    Provider("fireworks", "Fireworks AI", ("api.fireworks.ai",), (*_OPENAI, *_ANTHROPIC)),
)
"""Every provider whose hosts the HTTPS proxy intercepts by default."""

BY_NAME = {p.name: p for p in INTERCEPTED}

# Prices are looked up under the provider that made the model, where the host resells it.
PRICED_AS = {"chatgpt": "openai"}


def find_host(host: str, extra_hosts: tuple[str, ...] = ()) -> Provider | None:
    """Return the provider whose API lives on `host`, or None for a host to pass through.

    `extra_hosts` are patterns from the configuration; their requests are matched against
    every API tokencap meters.
    """
    host = host.lower().rstrip(".")
    for provider in INTERCEPTED:
        if any(host_matches(host, pattern) for pattern in provider.hosts):
            return provider
    if any(host_matches(host, pattern) for pattern in extra_hosts):
        return GATEWAY
    return None


def host_matches(host: str, pattern: str) -> bool:
    """Match a host name against `name` or a `*.suffix` / `*-suffix` wildcard pattern."""
    return fnmatch.fnmatchcase(host, pattern.lower())


GATEWAY = Provider(
    "gateway",
    "a host from the configuration",
    (),
    (*_ANTHROPIC, *_OPENAI, *_GEMINI, *_VERTEX),
)
"""The provider of hosts added in the configuration; calls are priced by their API."""

_API_FAMILY = {
    Api.ANTHROPIC_MESSAGES: "anthropic",
    Api.OPENAI_CHAT: "openai",
    Api.OPENAI_RESPONSES: "openai",
    Api.GEMINI_GENERATE: "gemini",
}


def pricing_provider(provider: Provider, api: Api) -> str:
    """Return the provider name a call is recorded and priced under."""
    if provider is GATEWAY:
        return _API_FAMILY[api]
    if provider.name == "google" and api is Api.ANTHROPIC_MESSAGES:
        return "anthropic"
    return PRICED_AS.get(provider.name, provider.name)


@dataclass(frozen=True, slots=True)
class Upstream:
    """The upstream base URL that one provider's calls are forwarded to."""

    provider: Provider
    scheme: str
    host: str
    port: int
    path: str  # base path without a trailing slash, "" for none

    @property
    def url(self) -> str:
        """Return the upstream base URL."""
        default_port = 443 if self.scheme == "https" else 80
        netloc = self.host if self.port == default_port else f"{self.host}:{self.port}"
        return f"{self.scheme}://{netloc}{self.path}"


def parse_upstream(provider: Provider, url: str, source: str) -> Upstream:
    """Parse a base URL; `source` names where it came from, for the error message."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{source} is not an http(s) URL: {url!r}; set it to a base URL such as "
            f"{provider.default_base_url}"
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"{source} has an invalid port: {url!r}") from None
    return Upstream(provider, parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def upstreams_from_env(env: dict[str, str]) -> dict[str, Upstream]:
    """Return each base-URL provider's upstream: its variable in `env`, else the official URL."""
    result = {}
    for provider in PROVIDERS:
        assert provider.default_base_url is not None
        override = overrides_from_env(env).get(provider.name)
        result[provider.name] = override or parse_upstream(
            provider, provider.default_base_url, "default URL"
        )
    return result


def overrides_from_env(env: dict[str, str]) -> dict[str, Upstream]:
    """Return the upstreams that `env` sets through base-URL variables, by provider name.

    The provider's own variable wins over its aliases. Intercepted calls to that provider's
    hosts go to the same upstream, so a gateway or a test server receives every call.
    """
    result = {}
    for provider in INTERCEPTED:
        for name in (provider.env_var, *provider.aliases):
            if name and env.get(name):
                result[provider.name] = parse_upstream(provider, env[name], name)
                break
    return result


def model_call_api(provider: str | Provider, method: str, rest: str) -> Api | None:
    """Return the API of a model call, or None for requests that generate nothing."""
    if method != "POST":
        return None
    entry = BY_NAME.get(provider) if isinstance(provider, str) else provider
    if entry is None:
        return None
    for pattern, api in entry.calls:
        if pattern.search(rest):
            return api
    return None


# --- Errors sent to the agent -----------------------------------------------------------------

_ERROR_TYPES = {
    # status: (Anthropic error type, OpenAI error type, Gemini status)
    400: ("invalid_request_error", "invalid_request_error", "INVALID_ARGUMENT"),
    403: ("permission_error", "permission_denied", "PERMISSION_DENIED"),
    429: ("rate_limit_error", "insufficient_quota", "RESOURCE_EXHAUSTED"),
    500: ("api_error", "server_error", "INTERNAL"),
}


def refusal_status(api: Api) -> int:
    """Return the status that makes the API's usual clients stop instead of retrying.

    Anthropic and OpenAI clients built on the official SDKs do not retry a 429 that carries
    `x-should-retry: false`. Gemini clients keep retrying a 429 but stop on a 403.
    """
    return 403 if api is Api.GEMINI_GENERATE else 429


def refusal_body(provider: str, message: str, status: int = 0, api: Api | None = None) -> bytes:
    """Return an error body for a call tokencap will not send, in the shape its API uses.

    `api` picks the shape when a provider serves several APIs (DeepSeek speaks both the OpenAI
    and the Anthropic format); without it the provider's own API decides.
    """
    family = _API_FAMILY[api] if api is not None else provider
    if not status:
        status = 403 if family in ("gemini", "google") else 429
    anthropic_type, openai_type, gemini_status = _ERROR_TYPES.get(status, _ERROR_TYPES[500])
    if family == "anthropic":
        error = {"type": "error", "error": {"type": anthropic_type, "message": message}}
    elif family in ("gemini", "google"):
        error = {"error": {"code": status, "message": message, "status": gemini_status}}
    else:
        error = {
            "error": {
                "message": message,
                "type": openai_type,
                "param": None,
                "code": "tokencap_budget_exhausted",
            }
        }
    return json.dumps(error).encode()


def stream_error_event(api: Api, message: str) -> bytes:
    """Return one server-sent event that makes the API's clients raise `message`."""
    if api is Api.ANTHROPIC_MESSAGES:
        data = {"type": "error", "error": {"type": "rate_limit_error", "message": message}}
        return _event("error", data)
    if api is Api.OPENAI_RESPONSES:
        data = {"type": "error", "code": "tokencap_budget_exhausted", "message": message}
        return _event("error", data)
    if api is Api.GEMINI_GENERATE:
        return _event(None, {"error": {"code": 403, "message": message, "status": "ABORTED"}})
    data = {"error": {"message": message, "type": "insufficient_quota", "code": None}}
    return _event(None, data)


def websocket_error_event(message: str, status: int) -> str:
    """Return the Responses WebSocket error event that ends a turn with `status`.

    Codex (codex-rs/codex-api, responses_websocket.rs) maps an event of this shape to an HTTP
    error with that status and those headers, as if the upgrade itself had failed.
    """
    _, openai_type, _ = _ERROR_TYPES.get(status, _ERROR_TYPES[500])
    event = {
        "type": "error",
        "status": status,
        "error": {"type": openai_type, "code": "tokencap_budget_exhausted", "message": message},
        "headers": {"x-should-retry": "false"},
    }
    return json.dumps(event)


def _event(name: str | None, data: dict) -> bytes:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()
