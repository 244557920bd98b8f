"""The sandbox the agent CLIs run in: a network namespace with loopback alone, and the scan
that finds processes an agent left behind."""

from __future__ import annotations

import os
import subprocess
import urllib.request

import pytest

from tests.agents_e2e.sandbox import (
    NamespaceUnavailable,
    kill_all_in,
    private_network,
    processes_in,
)
from tests.fakeupstream import FakeUpstream

pytestmark = pytest.mark.agent_clis


def current_namespace() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def ip(*args: str) -> list[str]:
    output = subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout
    return [line for line in output.splitlines() if line.strip()]


def test_namespace_has_loopback_alone(namespace):
    links = [line.split(":")[1].strip() for line in ip("-o", "link", "show")]
    addresses = sorted(line.split()[3] for line in ip("-o", "addr", "show"))

    assert links == ["lo"]
    assert addresses == ["127.0.0.1/8", "::1/128"]
    assert ip("route", "show") == []
    assert ip("-6", "route", "show") == []


def test_loopback_reaches_fake_upstream(namespace):
    with FakeUpstream() as upstream, urllib.request.urlopen(upstream.url + "/", timeout=5) as r:
        assert r.status == 200


def test_thread_returns_to_its_namespace():
    before = current_namespace()
    try:
        with private_network() as (_, inside):
            assert inside != before
            assert current_namespace() == inside
    except NamespaceUnavailable as exc:
        pytest.skip(str(exc))

    assert current_namespace() == before


def test_left_process_found_and_killed(namespace):
    sleeper = subprocess.Popen(["sleep", "60"])

    assert processes_in(namespace) == {sleeper.pid: "sleep 60"}
    kill_all_in(namespace)

    assert processes_in(namespace) == {}
    # kill_all_in reaped it too, so not even a zombie is left.
    assert not os.path.exists(f"/proc/{sleeper.pid}")


def test_process_outside_not_listed():
    outside = subprocess.Popen(["sleep", "60"])
    try:
        with private_network() as inside:
            assert outside.pid not in processes_in(inside)
    except NamespaceUnavailable as exc:
        pytest.skip(str(exc))
    finally:
        outside.kill()
        outside.wait()
