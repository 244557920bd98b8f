"""Model-API traffic that reached upstream without being metered, reported at the end of a run.

Two kinds are collected while the agent runs. Hosts the HTTPS proxy passed through untouched
whose names look like model APIs (a provider tokencap does not intercept yet, such as Cohere or
Bedrock), and requests to metered providers on billable paths that tokencap does not meter
(embeddings, images, audio, batches). Clients that ignore both base URLs and HTTPS_PROXY
cannot be seen at all.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache

from tokencap import providers

logger = logging.getLogger(__name__)

# Hosts of model APIs that the price table does not list, as name patterns.
_MODEL_HOST_HINTS = (
    "bedrock-runtime*.amazonaws.com",
    "cloudcode-pa.googleapis.com",
    "api.anthropic.*",
    "api.openai.*",
    "*.githubcopilot.com",
    "models.github.ai",
    "models.inference.ai.azure.com",
    "integrate.api.nvidia.com",
    "api.sambanova.ai",
    "api.ai21.com",
    "api.replicate.com",
    "api.deepinfra.com",
    "api.hyperbolic.xyz",
    "api.lambda.ai",
    "api.siliconflow.*",
    "dashscope*.aliyuncs.com",
    "ark.*.volces.com",
    "api.llama.com",
    "api.venice.ai",
    "api.inceptionlabs.ai",
    "api-inference.huggingface.co",
    "router.huggingface.co",
    "opencode.ai",
)

# Billable requests on metered providers' hosts that tokencap forwards without metering.
_BILLABLE_PATHS = re.compile(
    r"(^|/)(embeddings|images/(generations|edits|variations)|audio/(speech|transcriptions|"
    r"translations)|batches|messages/batches|completions)$"
    r"|:(embedContent|batchEmbedContents|predict|batchGenerateContent)$"
)


@dataclass
class Escapes:
    """Counts of unmetered model-API traffic seen during one run."""

    passed_hosts: Counter[str] = field(default_factory=Counter)
    unmetered_paths: Counter[tuple[str, str]] = field(default_factory=Counter)

    def passed_through(self, host: str) -> None:
        """Count a connection the HTTPS proxy passed through without interception."""
        if looks_like_model_api(host):
            self.passed_hosts[host.lower()] += 1

    def forwarded_unmetered(self, host: str, method: str, path: str) -> None:
        """Count a request to a model host that was forwarded without metering."""
        if method == "POST" and _BILLABLE_PATHS.search(path):
            self.unmetered_paths[(host.lower(), path)] += 1

    def lines(self) -> list[str]:
        """Return one line per unmetered host or path, most frequent first."""
        result = []
        for host, count in self.passed_hosts.most_common():
            noun = "connection" if count == 1 else "connections"
            result.append(
                f"{host}: {count} {noun} passed through unmetered; it looks like a model API "
                "that tokencap does not intercept"
            )
        for (host, path), count in self.unmetered_paths.most_common():
            noun = "request" if count == 1 else "requests"
            result.append(f"POST {host}{path}: {count} {noun} forwarded unmetered")
        return result


def looks_like_model_api(host: str) -> bool:
    """Return True when a host name belongs to a known model API or inference service."""
    host = host.lower().rstrip(".")
    if any(providers.host_matches(host, pattern) for pattern in _MODEL_HOST_HINTS):
        return True
    url = f"https://{host}/"
    return any(pattern.match(url) for pattern in _price_table_patterns())


@cache
def _price_table_patterns() -> tuple[re.Pattern[str], ...]:
    # The price table names each provider's API by a URL pattern; a host that matches one
    # serves a priced model API.
    from genai_prices import data_snapshot

    patterns = []
    for provider in data_snapshot.get_snapshot().providers:
        source = getattr(provider, "api_pattern", None)
        if not source:
            continue
        try:
            patterns.append(re.compile(source, re.IGNORECASE))
        except re.error:
            logger.debug("skipping the invalid API pattern of %s: %r", provider.id, source)
    return tuple(patterns)
