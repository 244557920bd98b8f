"""Whether a session recorded as running still has its tokencap process.

A `tokencap run` killed with SIGKILL cannot record its end, so its session stays 'running' in
the ledger. Such a session is stale when its process (`sessions.pid` on `sessions.hostname`)
no longer exists on this host.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psutil

from tokencap import attribution

# Seconds of difference allowed between the process start time that the kernel reports and
# the session start that tokencap recorded just after it.
_START_TOLERANCE = 2.0


def is_stale(session: dict[str, Any]) -> bool:
    """Return True when a running session's tokencap process is gone from this host.

    Sessions recorded on another host are never stale here: their processes cannot be seen.
    """
    if session.get("status") != "running" or not session.get("pid"):
        return False
    if session.get("hostname") != attribution.hostname():
        return False
    # NOTE: containers that share a ledger and a host name but not a PID namespace would see
    # each other's running sessions as stale.
    try:
        process = psutil.Process(session["pid"])
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        created = process.create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False
    try:
        started = datetime.fromisoformat(session["started_at"]).timestamp()
    except (TypeError, ValueError):
        return False
    # The pid was reused by a process that started after the session did.
    return created > started + _START_TOLERANCE


def stale_ids(rows: list[dict[str, Any]]) -> set[str]:
    """Return the ids of the stale sessions among `rows`."""
    return {row["id"] for row in rows if is_stale(row)}
