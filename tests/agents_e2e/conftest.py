"""Fixtures of the agent CLI suite: the installed CLIs, and one private sandbox per test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents_e2e import install
from tests.agents_e2e.sandbox import (
    LookupRecorder,
    NamespaceUnavailable,
    Sandbox,
    kill_all_in,
    private_network,
)
from tests.fakeupstream import FakeUpstream


@pytest.fixture(scope="session")
def clis() -> install.Clis:
    """Return the CLIs installed for the current pins, or fail saying how to install them."""
    found = install.installed()
    if found is None:
        pytest.fail(
            "the agent CLIs are not installed for the current pins; run "
            "`.venv/bin/python -m tests.agents_e2e.install` (about 3 minutes and 1.6 GB, once), "
            "or skip these tests with `-m 'not agent_clis'`",
            pytrace=False,
        )
    return found


@pytest.fixture
def namespace() -> Iterator[tuple[int, int]]:
    """Move the test into a new network namespace with loopback alone; yield its id."""
    with contextlib.ExitStack() as stack:
        try:
            namespace = stack.enter_context(private_network())
        except NamespaceUnavailable as exc:
            pytest.skip(str(exc))
        # Runs before the thread leaves the namespace: nothing the test started outlives it.
        stack.callback(kill_all_in, namespace)
        yield namespace


@pytest.fixture
def sandbox(tmp_path: Path, clis: install.Clis, namespace: tuple[int, int]) -> Iterator[Sandbox]:
    """Yield a fake upstream inside the test's namespace, a fresh home and a ledger path."""
    lookups = LookupRecorder()
    try:
        with FakeUpstream() as upstream:
            yield Sandbox(tmp_path, upstream, namespace, lookups, [clis.npm_bin, clis.aider_bin])
    finally:
        lookups.close()
