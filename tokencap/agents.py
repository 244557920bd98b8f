"""Agent profiles: what each known agent needs from tokencap to be metered without changing it.

A profile decides three things for the agent's environment and its refusals:

- which base-URL variables point at tokencap's base-URL route. An agent whose behaviour changes
  when a base URL is set keeps its own value, and its calls are metered through the HTTPS
  proxy instead;
- which HTTP status a refused call gets, so that the agent stops instead of retrying;
- extra notes for `tokencap agents` and the documentation.

Every profile also gets the HTTPS proxy and the CA variables; see `tokencap.environment`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# Launchers whose first non-option argument names the program they run.
_LAUNCHERS = frozenset({"npx", "bunx", "pnpx", "uvx", "pipx", "node", "bun", "deno", "python"})


@dataclass(frozen=True)
class AgentProfile:
    """The routing and refusal settings tokencap applies to one agent."""

    name: str
    commands: tuple[str, ...]
    summary: str
    # Providers whose base-URL variable is left as the user had it, unless the user had set it.
    keep_base_url: tuple[str, ...] = ()
    # Status of every refused call; None keeps each API's usual one (429, Gemini 403).
    refusal_status: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


GENERIC = AgentProfile(
    "generic",
    (),
    "Any other command: base URLs for Anthropic, OpenAI and Gemini, plus the HTTPS proxy.",
    notes=(
        "Refused calls get 429 with x-should-retry: false (Anthropic and OpenAI formats), "
        "which the official SDKs do not retry, and 403 for Gemini and Vertex.",
    ),
)

PROFILES = (
    AgentProfile(
        "claude",
        ("claude", "claude-code"),
        "Claude Code: metered through the HTTPS proxy; ANTHROPIC_BASE_URL is left unset.",
        keep_base_url=("anthropic",),
        notes=(
            "Setting ANTHROPIC_BASE_URL makes Claude Code treat the API as a third-party "
            "gateway: it turns off deferred MCP tool loading unless ENABLE_TOOL_SEARCH is set, "
            "which adds every tool definition to each request, and it sends other requests "
            "than it sends to api.anthropic.com. tokencap therefore leaves the variable as "
            "it was and meters Claude Code through the HTTPS proxy, which it honours.",
            "When you had set ANTHROPIC_BASE_URL yourself, Claude Code already runs in gateway "
            "mode, so tokencap points it at its base-URL route and forwards to your value.",
            "Refused calls get 429 with x-should-retry: false: Claude Code then makes one call "
            "and exits, where a 403 makes it report an authentication failure.",
        ),
    ),
    AgentProfile(
        "codex",
        ("codex",),
        "Codex CLI: metered through the HTTPS proxy, WebSocket turns included.",
        keep_base_url=("openai",),
        notes=(
            "Codex ignores OPENAI_BASE_URL and talks to api.openai.com (or chatgpt.com with a "
            "ChatGPT plan), first over a Responses WebSocket, then over server-sent events.",
            "It reads its CA from CODEX_CA_CERTIFICATE, then SSL_CERT_FILE; tokencap sets both.",
            "Refused calls get 429 with x-should-retry: false, a WebSocket turn an error event "
            "with status 429; Codex retries a 403 for several seconds.",
        ),
    ),
    AgentProfile(
        "gemini",
        ("gemini",),
        "Gemini CLI: metered through the HTTPS proxy; GOOGLE_GEMINI_BASE_URL is left unset.",
        keep_base_url=("gemini",),
        notes=(
            "Setting GOOGLE_GEMINI_BASE_URL makes Gemini CLI choose its gateway sign-in unless "
            "settings.json selects another, so tokencap leaves the variable as it was.",
            "Gemini CLI reads its CA from NODE_EXTRA_CA_CERTS, not SSL_CERT_FILE.",
            "Refused calls get 403: Gemini CLI keeps retrying a 429, even with "
            "x-should-retry: false, but stops after a 403.",
            "Signed in with a Google account, Gemini CLI calls cloudcode-pa.googleapis.com, "
            "which tokencap does not meter yet; use an API key or Vertex AI.",
        ),
    ),
    AgentProfile(
        "aider",
        ("aider",),
        "Aider: base URLs plus the HTTPS proxy, refused calls answered with 400.",
        refusal_status=400,
        notes=(
            "Aider calls models through litellm, which reads OPENAI_BASE_URL, OPENAI_API_BASE "
            "and ANTHROPIC_BASE_URL; tokencap points the ones it uses at its base-URL route.",
            "Aider retries rate-limit errors for up to a minute but not invalid-request errors "
            "(aider/exceptions.py), so refused calls get 400.",
        ),
    ),
    AgentProfile(
        "opencode",
        ("opencode",),
        "opencode: base URLs plus the HTTPS proxy, refused calls answered with 403.",
        refusal_status=403,
        notes=(
            "opencode retries every 429, and any error whose message mentions a rate limit or "
            "a quota, whatever its retry headers say; it does not retry a 403.",
            "It runs on Bun, whose fetch honours HTTPS_PROXY and trusts SSL_CERT_FILE and "
            "NODE_EXTRA_CA_CERTS.",
        ),
    ),
)

BY_NAME = {profile.name: profile for profile in (*PROFILES, GENERIC)}


def profile_for(argv: list[str], name: str | None = None) -> AgentProfile:
    """Return the profile named `name`, else the one whose command `argv` runs.

    A launcher such as `npx` or `node` is looked through, so `npx @openai/codex` and
    `node .../bin/claude` find their agents. Raises KeyError for an unknown name.
    """
    if name is not None:
        return BY_NAME[name]
    for candidate in _program_names(argv):
        for profile in PROFILES:
            if candidate in profile.commands:
                return profile
    return GENERIC


def _program_names(argv: list[str]) -> list[str]:
    names = []
    for arg in argv:
        # npx @openai/codex@latest names the package "codex", at a version.
        base = os.path.basename(arg).lower().split("@", 1)[0]
        for suffix in (".js", ".mjs", ".cjs", ".exe", "-cli"):
            base = base.removesuffix(suffix)
        names.append(base)
        stripped = base.rstrip("0123456789.")
        if base not in _LAUNCHERS and stripped not in _LAUNCHERS and not arg.startswith("-"):
            break
    return names


def listing() -> list[dict]:
    """Return every profile as plain data, for `tokencap agents`."""
    from tokencap import providers

    result = []
    for profile in (*PROFILES, GENERIC):
        variables = [p.env_var for p in providers.PROVIDERS if p.name not in profile.keep_base_url]
        if profile.refusal_status:
            refusal = str(profile.refusal_status)
        else:
            refusal = "429 + x-should-retry: false; Gemini 403"
        result.append(
            {
                "name": profile.name,
                "commands": list(profile.commands),
                "summary": profile.summary,
                "base_url_variables": variables,
                "https_proxy": True,
                "refusal": refusal,
                "notes": list(profile.notes),
            }
        )
    return result
