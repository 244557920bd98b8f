"""The HTTPS proxy with real host names, inside a private network namespace.

Each scenario runs in its own network namespace whose hosts file maps api.openai.com,
api.anthropic.com, pypi.org and api.cohere.com to 127.0.0.1, where fake servers with
certificates from a test CA listen. tokencap's environment names no base URL, so intercepted
calls go to the host the agent named, and the test CA is in the user's trust store, as a
corporate TLS-inspecting CA would be.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import sqlite3
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from tests import netns
from tests.conftest import TESTS, TOKENCAP
from tests.fakeupstream import Behavior, FakeUpstream, TestCA

HOSTS = ["api.openai.com", "api.anthropic.com", "pypi.org", "api.cohere.com"]

pytestmark = pytest.mark.skipif(
    not netns.available(), reason="needs unshare --net --mount (root or user namespaces)"
)


# --- Scenarios, run inside the namespace ------------------------------------------------------


def scenario_real_hosts(args: dict) -> dict:
    """Run one agent that calls model hosts, a package host and an unlisted model host."""
    work = Path(args["work"])
    ca = TestCA("corporate inspection CA")
    trust = work / "trust.pem"
    trust.write_bytes(
        Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")).read_bytes()
        + ca.cert_pem
    )
    ca_file = ca.write(work / "test-ca.pem")
    model_cert = ca.issue("api.openai.com", "api.anthropic.com")
    pypi_cert = ca.issue("pypi.org")
    cohere_cert = ca.issue("api.cohere.com")
    behavior = Behavior(input_tokens=3000, output_tokens=500)
    corp = _ConnectProxy("corp-user", "corp-pass") if args.get("corporate_proxy") else None

    with (
        FakeUpstream(behavior, tls=model_cert) as model,
        FakeUpstream(tls=pypi_cert) as pypi,
        FakeUpstream(tls=cohere_cert) as cohere,
    ):
        env = _clean_env() | {
            "XDG_DATA_HOME": str(work / "data"),
            "TOKENCAP_DB": str(work / "ledger.db"),
            "SSL_CERT_FILE": str(trust),
        }
        if corp is not None:
            env["HTTPS_PROXY"] = f"http://corp-user:corp-pass@127.0.0.1:{corp.port}"
        out = work / "client.jsonl"
        requests = [
            {
                "url": f"https://api.openai.com:{model.port}/v1/chat/completions",
                "body": {
                    "model": "gpt-4o-2024-08-06",
                    "messages": [{"role": "user", "content": "x"}],
                },
            },
            {"url": f"https://pypi.org:{pypi.port}/", "cafile": str(ca_file)},
            {
                "url": f"https://api.cohere.com:{cohere.port}/v2/chat",
                "body": {"model": "command-r"},
                "cafile": str(ca_file),
            },
        ]
        client = [sys.executable, str(TESTS / "agents" / "proxy_client.py"), "--out", str(out)]
        curl = (
            f"curl --silent --show-error --fail https://api.anthropic.com:{model.port}/v1/messages "
            "-H 'content-type: application/json' -H 'x-api-key: k' --data "
            '\'{"model": "claude-sonnet-4-5-20250929", "max_tokens": 10, '
            '"messages": [{"role": "user", "content": "x"}]}\' > ' + str(work / "curl.json")
        )
        script = " ".join(_quote(a) for a in client + [json.dumps(r) for r in requests])
        done = subprocess.run(
            [str(TOKENCAP), "run", "--", "sh", "-c", f"{script} && {curl}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        result = {
            "exit_code": done.returncode,
            "stderr": done.stderr,
            "outcomes": [json.loads(line) for line in out.read_text().splitlines()]
            if out.exists()
            else [],
            "model_paths": [r.path for r in model.inference_requests()],
            "model_hosts": [r.headers.get("host") for r in model.inference_requests()],
            "pypi_requests": len(pypi.requests),
            "cohere_requests": len(cohere.requests),
            "pypi_fingerprint": pypi_cert.fingerprint,
            "curl_ok": (work / "curl.json").exists()
            and "usage" in (work / "curl.json").read_text(),
            "calls": _calls(work / "ledger.db"),
        }
    if corp is not None:
        result["corporate_connects"] = corp.connects
        corp.close()
    return result


def _calls(db: Path) -> list[dict]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY seq")]
    conn.close()
    return rows


def _clean_env() -> dict[str, str]:
    drop = ("ANTHROPIC_", "OPENAI_", "GOOGLE_", "GEMINI_", "TOKENCAP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        env.pop(name, None)
    return env


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


class _ConnectProxy:
    """A minimal corporate proxy: CONNECT only, Basic credentials required, targets logged."""

    def __init__(self, user: str, password: str) -> None:
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.connects: list[dict] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                client.close()
                return
            head += chunk
        lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        authorized = headers.get("proxy-authorization") == self.expected
        self.connects.append({"method": method, "target": target, "authorized": authorized})
        if method != "CONNECT" or not authorized:
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            client.close()
            return
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        sockets = [client, upstream]
        while True:
            readable, _, _ = select.select(sockets, [], [], 30)
            if not readable:
                break
            for source in readable:
                data = source.recv(65536)
                if not data:
                    client.close()
                    upstream.close()
                    return
                (upstream if source is client else client).sendall(data)


# --- Tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_hosts(tmp_path_factory):
    work = tmp_path_factory.mktemp("netns")
    return netns.run_scenario(
        f"{__name__}:scenario_real_hosts", {"work": str(work)}, HOSTS, timeout=150
    )


def test_model_host_metered_by_name(real_hosts):
    assert real_hosts["exit_code"] == 0, real_hosts["stderr"]
    chat = real_hosts["outcomes"][0]
    assert chat["status"] == 200, chat
    assert "tokencap" in chat["issuer"]
    assert real_hosts["model_paths"] == ["/v1/chat/completions", "/v1/messages"]
    assert real_hosts["model_hosts"][0].startswith("api.openai.com")
    openai_call, anthropic_call = real_hosts["calls"]
    assert openai_call["provider"] == "openai"
    assert openai_call["input_tokens"] == 3000
    assert openai_call["output_tokens"] == 500
    # 3000 * $2.50 + 500 * $10 per million tokens
    assert Decimal(openai_call["cost_usd"]) == Decimal("0.0125")
    assert anthropic_call["provider"] == "anthropic"


def test_curl_metered_by_name(real_hosts):
    assert real_hosts["curl_ok"], real_hosts["stderr"]
    assert real_hosts["calls"][1]["input_tokens"] == 3000


def test_package_host_passes_through(real_hosts):
    pypi = real_hosts["outcomes"][1]
    assert pypi["status"] == 200
    assert pypi["fingerprint"] == real_hosts["pypi_fingerprint"]
    assert real_hosts["pypi_requests"] == 1


def test_unlisted_model_host_reported(real_hosts):
    assert real_hosts["cohere_requests"] == 1
    assert "api.cohere.com: 1 connection passed through unmetered" in real_hosts["stderr"]
    assert "pypi.org" not in real_hosts["stderr"]


def test_corporate_proxy_chained(tmp_path):
    result = netns.run_scenario(
        f"{__name__}:scenario_real_hosts",
        {"work": str(tmp_path), "corporate_proxy": True},
        HOSTS,
        timeout=150,
    )

    assert result["exit_code"] == 0, result["stderr"]
    # The unlisted model host has no such route on its fake: 404, passed through.
    assert [o["status"] for o in result["outcomes"]] == [200, 200, 404]
    targets = [c["target"].split(":")[0] for c in result["corporate_connects"]]
    # Intercepted and passed-through hosts alike go through the user's proxy, with its
    # credentials.
    assert "api.openai.com" in targets
    assert "pypi.org" in targets
    assert all(c["authorized"] for c in result["corporate_connects"])
    assert len(result["calls"]) == 2
