"""Turning token counts into dollars, exactly, with the price in force when the call was made.

Price data comes from the genai-prices package, unless a budget file overrides or adds a price
for the model. Money is `Decimal` throughout and is stored rounded to whole picodollars, so sums
in SQL stay exact integers.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from functools import cache

import genai_prices
from genai_prices import data_snapshot
from genai_prices.types import ModelPrice, TieredPrices

from tokencap.caps import Refusal
from tokencap.usage import Api, RequestInfo, Usage

logger = logging.getLogger(__name__)

PICO = Decimal("0.000000000001")

# genai-prices names providers by these ids.
PROVIDER_IDS = {"anthropic": "anthropic", "openai": "openai", "gemini": "google"}

# Token prices that a fallback for an unknown model takes the maximum of.
_TOKEN_PRICE_KEYS = (
    "input_mtok",
    "output_mtok",
    "cache_read_mtok",
    "cache_write_mtok",
    "cache_write_1h_mtok",
)

# A non-streamed request with no output limit may still generate this many tokens. Streamed
# output needs no such bound, because the proxy counts it as it arrives.
DEFAULT_OUTPUT_TOKENS_BOUND = 16_384

# Policies for a call to a model that has no known price.
UNKNOWN_MODEL_POLICIES = ("highest", "refuse")


@dataclass(frozen=True, slots=True)
class Cost:
    """The price of one call and how it was found."""

    cost_usd: Decimal
    source: str
    estimated: bool  # True when the model had no known price and a fallback rate was used


def quantize(amount: Decimal) -> Decimal:
    """Round an amount to whole picodollars, the ledger's unit."""
    return amount.quantize(PICO, rounding=ROUND_HALF_UP)


def exact_in_pico(amount: Decimal) -> bool:
    """Return whether `amount` has at most 12 decimal places, so picodollars hold it exactly."""
    return amount.normalize().as_tuple().exponent >= -12


def plain(amount: Decimal) -> Decimal:
    """Return `amount` in plain notation, so that 1E+3 prints as 1000 and 0.50 as 0.5."""
    return Decimal(format(amount.normalize(), "f"))


def to_pico(amount: Decimal) -> int:
    """Convert dollars to integer picodollars."""
    return int(quantize(amount) / PICO)


def decimal_string(amount: Decimal) -> str:
    """Return dollars in plain notation without trailing zeros: 0.000000000003, not 3E-12."""
    return format(amount.normalize(), "f")


def from_pico(pico: int) -> Decimal:
    """Convert integer picodollars back to dollars, without trailing zeros beyond cents."""
    amount = Decimal(pico) * PICO
    return amount.normalize() if amount != amount.to_integral() else amount.quantize(Decimal(1))


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """A price from a budget file, in dollars per million tokens, for one model or a pattern.

    `model` is matched against the model name without regard to case; `*`, `?` and `[...]`
    make it a pattern, as in shell globs. Cache rates left out of the file are billed at the
    input rate.
    """

    model: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cache_read_per_mtok: Decimal
    cache_write_per_mtok: Decimal
    cache_write_1h_per_mtok: Decimal
    provider: str | None = None  # None: the model on any provider
    source: str = "budget file"

    @property
    def is_pattern(self) -> bool:
        """True when `model` contains glob characters."""
        return any(char in self.model for char in "*?[")

    def matches(self, provider: str, model: str) -> bool:
        """Return whether this price applies to `model` of `provider`."""
        if self.provider is not None and self.provider != provider:
            return False
        wanted = self.model.lower()
        model = model.lower()
        return fnmatch.fnmatchcase(model, wanted) if self.is_pattern else model == wanted

    def model_price(self) -> ModelPrice:
        """Return the price in genai-prices' form."""
        return ModelPrice(
            input_mtok=self.input_per_mtok,
            output_mtok=self.output_per_mtok,
            cache_read_mtok=self.cache_read_per_mtok,
            cache_write_mtok=self.cache_write_per_mtok,
            cache_write_1h_mtok=self.cache_write_1h_per_mtok,
        )


class Pricer:
    """Prices calls from overrides, then genai-prices, then the policy for unknown models.

    `unknown_model` is "highest" (charge the provider's highest rates and flag the call as
    estimated) or "refuse" (do not send calls to a model without a price).
    """

    def __init__(
        self, overrides: Sequence[PriceOverride] = (), unknown_model: str = "highest"
    ) -> None:
        if unknown_model not in UNKNOWN_MODEL_POLICIES:
            raise ValueError(f"unknown_model must be one of {UNKNOWN_MODEL_POLICIES}")
        self.unknown_models: set[tuple[str, str]] = set()
        self.unknown_model = unknown_model
        self.source = f"genai-prices {genai_prices.__version__}"
        # Exact names win over patterns, and a longer pattern over a shorter one.
        self._overrides = sorted(overrides, key=lambda o: (o.is_pattern, -len(o.model)))

    def cost(self, provider: str, model: str | None, usage: Usage, at: datetime) -> Cost:
        """Return the exact cost of `usage` on `model` at time `at`."""
        override = self._override(provider, model)
        if override is not None:
            total = override.model_price().calc_price(_to_genai_usage(usage))["total_price"]
            return Cost(quantize(total), f"price override {override.source}", estimated=False)

        model_price = self._known_price(provider, model, at)
        if model_price is not None:
            total = model_price.calc_price(_to_genai_usage(usage))["total_price"]
            return Cost(quantize(total), self.source, estimated=False)

        self.unknown_models.add((provider, model or "(none)"))
        total = highest_price(provider, at).calc_price(_to_genai_usage(usage))["total_price"]
        return Cost(quantize(total), f"highest {provider} rates", estimated=True)

    def estimate(self, provider: str, api: Api, request: RequestInfo, at: datetime) -> Decimal:
        """Return a conservative cost for a request that has not been sent yet.

        The input is priced at the highest rate it could be billed at: a cache write when the
        request asks for one, or when the provider caches on its own (OpenAI). Output is
        bounded by the request's own limit for non-streamed calls. Streamed output is left out
        because the proxy meters it live and cuts the stream when the cap is reached.
        """
        tokens = request.input_tokens_estimate
        usage = Usage(input_tokens=tokens)
        if request.cache_write_ttl == "1h":
            usage = Usage(cache_write_1h_tokens=tokens)
        elif request.cache_write_ttl == "5m" or provider == "openai":
            usage = Usage(cache_write_5m_tokens=tokens)
        if not request.streamed:
            usage.output_tokens = request.max_output_tokens or DEFAULT_OUTPUT_TOKENS_BOUND

        override = self._override(provider, request.model)
        model_price = (
            override.model_price()
            if override is not None
            else self._known_price(provider, request.model, at) or highest_price(provider, at)
        )
        genai_usage = _to_genai_usage(usage)
        total = model_price.calc_price(genai_usage)["total_price"]
        # A model without a cache-write price bills those tokens as plain input.
        plain = model_price.calc_price(
            _to_genai_usage(Usage(input_tokens=tokens, output_tokens=usage.output_tokens))
        )["total_price"]
        return quantize(max(total, plain))

    def refusal(self, provider: str, model: str | None, at: datetime) -> Refusal | None:
        """Return why a call must not be sent when its model has no price and policy refuses it."""
        if self.unknown_model != "refuse" or self.is_priced(provider, model, at):
            return None
        name = model or "(none)"
        return Refusal(
            "unknown_model",
            f'no price is known for {provider} model {name!r} and unknown_model is "refuse"; '
            f'add [prices.models."{name}"] with input_per_mtok and output_per_mtok to the '
            "budget file",
        )

    def is_priced(self, provider: str, model: str | None, at: datetime) -> bool:
        """Return whether `model` has a price of its own, from an override or genai-prices."""
        return (
            self._override(provider, model) is not None
            or self._known_price(provider, model, at) is not None
        )

    def _override(self, provider: str, model: str | None) -> PriceOverride | None:
        if not model or not self._overrides:
            return None
        return next((o for o in self._overrides if o.matches(provider, model)), None)

    def _known_price(self, provider: str, model: str | None, at: datetime) -> ModelPrice | None:
        if not model:
            return None
        return _lookup(PROVIDER_IDS.get(provider, provider), model.lower(), at.date().isoformat())


@cache
def _lookup(provider_id: str, model: str, day: str) -> ModelPrice | None:
    # Prices change at most daily, so one lookup per model and day is enough.
    snapshot = data_snapshot.get_snapshot()
    try:
        _, model_info = snapshot.find_provider_model(model, None, provider_id, None)
    except LookupError:
        return None
    return model_info.get_prices(datetime.fromisoformat(day + "T12:00:00+00:00"))


@cache
def _highest_price(provider_id: str, day: str) -> ModelPrice:
    snapshot = data_snapshot.get_snapshot()
    at = datetime.fromisoformat(day + "T12:00:00+00:00")
    highest: dict[str, Decimal] = {}
    for provider in snapshot.providers:
        if provider.id != provider_id:
            continue
        for model in provider.models:
            prices = model.get_prices(at)
            for key in _TOKEN_PRICE_KEYS:
                value = getattr(prices, key, None)
                if isinstance(value, TieredPrices):
                    value = max([value.base, *(tier.price for tier in value.tiers)])
                if value is not None and value > highest.get(key, Decimal(0)):
                    highest[key] = value
    if "input_mtok" not in highest:
        # A provider genai-prices does not know: use the highest rates of all three majors.
        for major in ("anthropic", "openai", "google"):
            for key, value in _highest_price(major, day).__dict__.items():
                if value is not None and value > highest.get(key, Decimal(0)):
                    highest[key] = value
    highest.setdefault("cache_read_mtok", highest["input_mtok"])
    highest.setdefault("cache_write_mtok", highest["input_mtok"])
    highest.setdefault("cache_write_1h_mtok", highest["cache_write_mtok"])
    return ModelPrice(**highest)


def highest_price(provider: str, at: datetime) -> ModelPrice:
    """Return the highest rate of each kind among all models of a provider, on that day."""
    return _highest_price(PROVIDER_IDS.get(provider, provider), at.date().isoformat())


def _to_genai_usage(usage: Usage) -> genai_prices.Usage:
    # genai-prices counts cache reads and writes inside input_tokens.
    values = {
        "input_tokens": usage.total_input_tokens,
        "output_tokens": usage.output_tokens,
    }
    if usage.cache_read_tokens:
        values["cache_read_tokens"] = usage.cache_read_tokens
    writes = usage.cache_write_5m_tokens + usage.cache_write_1h_tokens
    if writes:
        values["cache_write_tokens"] = writes
    if usage.cache_write_1h_tokens:
        values["cache_write_1h_tokens"] = usage.cache_write_1h_tokens
    return genai_prices.Usage(**values)
