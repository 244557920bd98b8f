"""The providers tokencap routes: their variables, endpoints, model-call paths and error shapes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from tokencap.errors import ConfigError
from tokencap.usage import Api


@dataclass(frozen=True, slots=True)
class Provider:
    """A model provider reached through a base-URL environment variable."""

    name: str
    env_var: str
    default_base_url: str
    refusal_status: int


PROVIDERS = (
    Provider("anthropic", "ANTHROPIC_BASE_URL", "https://api.anthropic.com", 429),
    Provider("openai", "OPENAI_BASE_URL", "https://api.openai.com/v1", 429),
    # Gemini clients keep retrying a 429 but stop on a 403.
    Provider("gemini", "GOOGLE_GEMINI_BASE_URL", "https://generativelanguage.googleapis.com", 403),
)
BY_NAME = {p.name: p for p in PROVIDERS}

# Paths are matched against what the client sent below its base URL, so a gateway base such as
# https://gateway.example/openai/v1 still matches.
_MODEL_CALLS = {
    "anthropic": [(re.compile(r"(^|/)v1/messages$"), Api.ANTHROPIC_MESSAGES)],
    "openai": [
        (re.compile(r"(^|/)chat/completions$"), Api.OPENAI_CHAT),
        (re.compile(r"(^|/)responses$"), Api.OPENAI_RESPONSES),
    ],
    "gemini": [
        (
            re.compile(r"(^|/)v1[a-z0-9]*/models/[^/]+:(generateContent|streamGenerateContent)$"),
            Api.GEMINI_GENERATE,
        )
    ],
}


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where one provider's calls are forwarded."""

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
    """Return each provider's upstream: its variable in `env` when set, else the official URL."""
    result = {}
    for provider in PROVIDERS:
        value = env.get(provider.env_var)
        if value:
            result[provider.name] = parse_upstream(provider, value, provider.env_var)
        else:
            result[provider.name] = parse_upstream(
                provider, provider.default_base_url, "default URL"
            )
    return result


def model_call_api(provider: str, method: str, rest: str) -> Api | None:
    """Return the API of a model call, or None for requests that generate nothing."""
    if method != "POST":
        return None
    for pattern, api in _MODEL_CALLS.get(provider, []):
        if pattern.search(rest):
            return api
    return None


# --- Errors sent to the agent -----------------------------------------------------------------


def refusal_body(provider: str, message: str) -> bytes:
    """Return a provider-shaped error body for a call tokencap will not send."""
    if provider == "anthropic":
        error = {"type": "error", "error": {"type": "rate_limit_error", "message": message}}
    elif provider == "gemini":
        error = {"error": {"code": 403, "message": message, "status": "PERMISSION_DENIED"}}
    else:
        error = {
            "error": {
                "message": message,
                "type": "insufficient_quota",
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


def _event(name: str | None, data: dict) -> bytes:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()
