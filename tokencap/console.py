"""The one place that decides how tokencap writes to people: rich, on stderr."""

from __future__ import annotations

from functools import cache

from rich.console import Console


@cache
def stderr_console() -> Console:
    """Return the console for messages to the user; it never writes to the agent's stdout."""
    return Console(stderr=True, highlight=False, soft_wrap=True)
