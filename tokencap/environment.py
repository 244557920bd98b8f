"""The agent's environment: how its model calls reach tokencap.

Three things change in the environment the agent inherits:

- base-URL variables point at tokencap's base-URL route, except where the agent's profile
  keeps them because setting one changes what the agent does;
- HTTPS_PROXY and https_proxy name tokencap's HTTPS proxy with the run's credentials, and
  NO_PROXY no longer exempts model-API hosts;
- every CA variable common clients read names one bundle: what the user trusted before plus
  tokencap's CA, and SSL_CERT_DIR a hashed directory of the same certificates.
"""

from __future__ import annotations

from collections.abc import Mapping

from tokencap import providers, routing
from tokencap.agents import AgentProfile
from tokencap.certs import Trust

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy")
NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy")


def child_environment(
    env: Mapping[str, str],
    *,
    session_id: str,
    profile: AgentProfile,
    base_urls: Mapping[str, str],
    proxy_url: str,
    trust: Trust,
    extra_hosts: tuple[str, ...] = (),
) -> dict[str, str]:
    """Return the agent's environment; `base_urls` maps provider names to tokencap's route."""
    child = dict(env)
    for provider in providers.PROVIDERS:
        assert provider.env_var is not None
        names = (provider.env_var, *provider.aliases)
        user_set = any(env.get(name) for name in names)
        if provider.name in profile.keep_base_url and not user_set:
            continue
        child[provider.env_var] = base_urls[provider.name]
        # An alias the user set would otherwise still name their own upstream.
        for alias in provider.aliases:
            if env.get(alias):
                child[alias] = base_urls[provider.name]
    child["TOKENCAP_SESSION_ID"] = session_id

    for name in PROXY_VARIABLES:
        child[name] = proxy_url
    hosts = [host for p in providers.INTERCEPTED for host in p.hosts] + list(extra_hosts)
    user_no_proxy = ",".join(env.get(name, "") for name in NO_PROXY_VARIABLES)
    no_proxy = routing.child_no_proxy(user_no_proxy, hosts)
    for name in NO_PROXY_VARIABLES:
        child[name] = no_proxy
    # Node's built-in fetch ignores HTTPS_PROXY unless this is set (Node 20 ignores it too).
    child["NODE_USE_ENV_PROXY"] = "1"

    child.update(trust.child_variables())
    return child
