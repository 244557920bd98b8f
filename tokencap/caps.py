"""The session's caps: admit a call only if its worst case fits, then settle it exactly.

Every method runs on the proxy's event loop thread and none of them awaits, so admitting a
call (check and reserve) is atomic with respect to every other call of the session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a call was not sent upstream."""

    cap: str  # "max_calls" or "max_usd"
    message: str


@dataclass
class Budget:
    """Spend and call counters of one session against its optional caps."""

    max_usd: Decimal | None = None
    max_calls: int | None = None
    spent_usd: Decimal = Decimal(0)
    calls: int = 0
    tripped: Refusal | None = None
    _in_flight: dict[str, Decimal] = field(default_factory=dict)

    @property
    def reserved_usd(self) -> Decimal:
        """Return what the calls in flight may still cost, as reserved or as seen so far."""
        return sum(self._in_flight.values(), Decimal(0))

    def admit(self, key: str, estimate_usd: Decimal) -> Refusal | None:
        """Reserve `estimate_usd` for a new call, or return why it must not be sent."""
        if self.tripped is not None:
            return self.tripped
        if self.max_calls is not None and self.calls + 1 > self.max_calls:
            return self.trip(
                "max_calls", f"call cap reached: {self.calls} of {self.max_calls} calls made"
            )
        if self.max_usd is not None:
            worst_case = self.spent_usd + self.reserved_usd + estimate_usd
            if worst_case > self.max_usd:
                return self.trip(
                    "max_usd",
                    f"dollar cap reached: ${money(self.spent_usd)} spent, "
                    f"${money(self.reserved_usd)} in flight, next call estimated at "
                    f"${money(estimate_usd)}, cap ${money(self.max_usd)}",
                )
        self.calls += 1
        self._in_flight[key] = estimate_usd
        return None

    def update_running(self, key: str, running_usd: Decimal) -> Refusal | None:
        """Raise a streaming call's reservation to its running cost; trip if over the cap.

        The reservation never shrinks while the call runs, so a low early count cannot free
        room for another call.
        """
        if key in self._in_flight and running_usd > self._in_flight[key]:
            self._in_flight[key] = running_usd
        if self.max_usd is not None and self.spent_usd + self.reserved_usd > self.max_usd:
            return self.trip(
                "max_usd",
                f"dollar cap reached mid-stream: ${money(self.spent_usd + self.reserved_usd)}"
                f" of ${money(self.max_usd)}",
            )
        return None

    def settle(self, key: str, cost_usd: Decimal) -> Refusal | None:
        """Replace a call's reservation by its exact cost; trip once spend reaches the cap."""
        self._in_flight.pop(key, None)
        self.spent_usd += cost_usd
        if self.max_usd is not None and self.spent_usd >= self.max_usd:
            return self.trip(
                "max_usd",
                f"dollar cap reached: ${money(self.spent_usd)} of ${money(self.max_usd)} spent",
            )
        return None

    def trip(self, cap: str, message: str) -> Refusal:
        """Mark the session as stopped by a cap; the first reason given is kept."""
        if self.tripped is None:
            self.tripped = Refusal(cap, message)
        return self.tripped


def money(amount: Decimal) -> str:
    """Format dollars with cents, and more digits only where they matter."""
    if amount == amount.quantize(Decimal("0.01")):
        return f"{amount:.2f}"
    return f"{amount.normalize():f}"
