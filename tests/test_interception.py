"""The HTTPS proxy: clients that ignore base URLs are metered; every other host passes through.

The agent names real model-API hosts (https://api.openai.com, https://api.anthropic.com) and
reaches them only through HTTPS_PROXY. tokencap's own environment points each provider's
base-URL variable at the fake upstream, so intercepted calls go there and nothing leaves the
machine. Tests that need a real host name to resolve are in test_interception_netns.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import TESTS
from tests.fakeupstream import Behavior, FakeUpstream, TestCA
from tokencap.certs import CA_FILE_VARIABLES

PROXY_CLIENT = TESTS / "agents" / "proxy_client.py"

CHAT_BODY = {
    "model": "gpt-4o-2024-08-06",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "hello"}],
}
MESSAGES_BODY = {
    "model": "claude-sonnet-4-5-20250929",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "hello"}],
}


def client_run(run_tokencap, tmp_path, *requests: dict, options=(), **env):
    """Run the proxy client under tokencap; return the run and the client's outcomes."""
    out = tmp_path / f"client-{len(list(tmp_path.glob('client-*')))}.jsonl"
    specs = [json.dumps(r) for r in requests]
    run = run_tokencap(
        list(options), [sys.executable, str(PROXY_CLIENT), "--out", str(out), *specs], **env
    )
    outcomes = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return run, outcomes


# --- Metering through the proxy ---------------------------------------------------------------


def test_stdlib_client_metered_through_proxy(upstream, run_tokencap, tmp_path):
    upstream.default = Behavior(input_tokens=3000, output_tokens=500, cache_read_tokens=1000)

    run, (outcome,) = client_run(
        run_tokencap,
        tmp_path,
        {"url": "https://api.openai.com/v1/chat/completions", "body": CHAT_BODY},
    )

    assert run.exit_code == 0, run.stderr
    assert outcome["status"] == 200, outcome
    assert "tokencap" in outcome["issuer"]
    (request,) = upstream.inference_requests()
    assert request.path == "/v1/chat/completions"
    assert request.body == CHAT_BODY
    (call,) = run.calls()
    assert call["provider"] == "openai"
    assert call["input_tokens"] == 2000
    assert call["cache_read_tokens"] == 1000
    assert call["output_tokens"] == 500
    # 2000 * $2.50 + 1000 * $1.25 + 500 * $10 per million tokens
    assert Decimal(call["cost_usd"]) == Decimal("0.01125")


def test_httpx_stream_metered_through_proxy(upstream, run_tokencap, tmp_path):
    upstream.default = Behavior(input_tokens=1200, output_tokens=340, events=6)
    script = tmp_path / "httpx_agent.py"
    script.write_text(
        "import json, sys, httpx2\n"
        "body = json.loads(sys.argv[1])\n"
        "with httpx2.Client() as client:\n"
        "    with client.stream('POST', 'https://api.anthropic.com/v1/messages', json=body,\n"
        "                       headers={'x-api-key': 'k', 'anthropic-version': '2023-06-01'})"
        " as r:\n"
        "        text = ''.join(r.iter_text())\n"
        "assert r.status_code == 200, text\n"
        "assert 'message_stop' in text, text\n"
    )
    body = {**MESSAGES_BODY, "stream": True}

    run = run_tokencap([], [sys.executable, str(script), json.dumps(body)])

    assert run.exit_code == 0, run.stderr
    assert len(upstream.inference_requests()) == 1
    (call,) = run.calls()
    assert call["provider"] == "anthropic"
    assert call["streamed"] == 1
    assert call["input_tokens"] == 1200
    assert call["output_tokens"] == 340
    # 1200 * $3 + 340 * $15 per million tokens
    assert Decimal(call["cost_usd"]) == Decimal("0.0087")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_metered_through_proxy(upstream, run_tokencap):
    upstream.default = Behavior(input_tokens=640, output_tokens=64)
    command = [
        "curl",
        "--silent",
        "--show-error",
        "--fail",
        "https://api.anthropic.com/v1/messages",
        "-H",
        "content-type: application/json",
        "-H",
        "x-api-key: k",
        "--data",
        json.dumps(MESSAGES_BODY),
    ]

    run = run_tokencap([], command)

    assert run.exit_code == 0, run.stderr
    assert '"usage"' in run.process.stdout
    (call,) = run.calls()
    assert call["input_tokens"] == 640
    assert call["output_tokens"] == 64
    assert Decimal(call["cost_usd"]) == Decimal("0.00288")


def test_max_calls_caps_intercepted_calls(upstream, run_tokencap, tmp_path):
    request = {"url": "https://api.openai.com/v1/chat/completions", "body": CHAT_BODY}

    run, outcomes = client_run(
        run_tokencap, tmp_path, request, request, request, options=["--max-calls", "2"]
    )

    assert run.exit_code == 86
    assert len(upstream.inference_requests()) == 2
    assert [c["decision"] for c in run.calls()] == ["admitted", "admitted", "refused"]
    if len(outcomes) == 3:  # the client may be stopped before it writes the third outcome
        assert outcomes[2]["status"] == 429
        assert "call cap reached" in outcomes[2]["body"]


def test_non_inference_requests_pass_unmetered(upstream, run_tokencap, tmp_path):
    run, outcomes = client_run(
        run_tokencap,
        tmp_path,
        {"url": "https://api.openai.com/v1/models"},
        {"url": "https://api.anthropic.com/v1/messages/count_tokens", "body": MESSAGES_BODY},
    )

    assert run.exit_code == 0, run.stderr
    assert [o["status"] for o in outcomes] == [200, 200]
    assert [r.route for r in upstream.requests] == ["models", "anthropic.count_tokens"]
    assert run.calls() == []


def test_unmetered_billable_path_reported(upstream, run_tokencap, tmp_path):
    run, (outcome,) = client_run(
        run_tokencap,
        tmp_path,
        {"url": "https://api.openai.com/v1/embeddings", "body": {"model": "m", "input": "x"}},
    )

    assert run.exit_code == 0, run.stderr
    assert outcome["status"] == 404  # the fake has no embeddings route
    assert "POST api.openai.com/v1/embeddings: 1 request forwarded unmetered" in run.stderr


# --- Who may use the proxy --------------------------------------------------------------------


def test_proxy_requires_credentials(upstream, run_tokencap, tmp_path):
    url = "https://api.openai.com/v1/chat/completions"

    run, outcomes = client_run(
        run_tokencap,
        tmp_path,
        {"url": url, "body": CHAT_BODY, "proxy": "no-credentials"},
        {"url": url, "body": CHAT_BODY, "proxy": "wrong-password"},
        {"url": url, "body": CHAT_BODY},
    )

    assert run.exit_code == 0, run.stderr
    assert "407" in outcomes[0]["error"]
    assert "407" in outcomes[1]["error"]
    assert outcomes[2]["status"] == 200
    assert len(upstream.inference_requests()) == 1
    assert len(run.calls()) == 1


def test_plain_http_proxy_request_requires_credentials(upstream, run_tokencap, tmp_path):
    script = tmp_path / "plain_http.py"
    script.write_text(
        "import os, sys, http.client\n"
        "from urllib.parse import urlsplit\n"
        "proxy = urlsplit(os.environ['HTTPS_PROXY'])\n"
        "conn = http.client.HTTPConnection(proxy.hostname, proxy.port)\n"
        "conn.request('GET', sys.argv[1] + '/v1/models')\n"
        "print(conn.getresponse().status)\n"
    )

    run = run_tokencap([], [sys.executable, str(script), upstream.url])

    assert run.exit_code == 0, run.stderr
    assert run.process.stdout.strip() == "407"
    assert upstream.requests == []


# --- Pass-through -----------------------------------------------------------------------------


def test_other_host_passes_through_with_its_certificate(upstream, run_tokencap, tmp_path):
    ca = TestCA()
    certificate = ca.issue("127.0.0.1")
    ca_file = ca.write(tmp_path / "other-ca.pem")
    with FakeUpstream(tls=certificate) as other:
        run, (outcome,) = client_run(
            run_tokencap,
            tmp_path,
            # The client trusts only the other server's CA: an intercepted connection would
            # present tokencap's certificate and fail to verify.
            {"url": f"{other.url}/v1/chat/completions", "body": CHAT_BODY, "cafile": str(ca_file)},
        )
        assert len(other.inference_requests()) == 1

    assert run.exit_code == 0, run.stderr
    assert outcome["status"] == 200, outcome
    assert outcome["fingerprint"] == certificate.fingerprint
    assert run.calls() == []
    assert upstream.requests == []


# --- Upstream TLS -----------------------------------------------------------------------------


def test_upstream_verified_against_user_trust_store(run_tokencap, tmp_path, tokencap_env):
    # The user's SSL_CERT_FILE holds a CA that a TLS-inspecting network would use.
    ca = TestCA("corporate inspection CA")
    trust = tmp_path / "corporate.pem"
    trust.write_bytes(Path(tokencap_env["SSL_CERT_FILE"]).read_bytes() + ca.cert_pem)
    with FakeUpstream(tls=ca.issue("127.0.0.1"), input_tokens=100, output_tokens=10) as tls_up:
        run, (outcome,) = client_run(
            run_tokencap,
            tmp_path,
            {"url": "https://api.openai.com/v1/chat/completions", "body": CHAT_BODY},
            OPENAI_BASE_URL=f"{tls_up.url}/v1",
            SSL_CERT_FILE=str(trust),
        )
        assert len(tls_up.inference_requests()) == 1

    assert run.exit_code == 0, run.stderr
    assert outcome["status"] == 200, outcome
    (call,) = run.calls()
    assert call["input_tokens"] == 100


def test_untrusted_upstream_certificate_fails(run_tokencap, tmp_path):
    ca = TestCA("unknown CA")
    with FakeUpstream(tls=ca.issue("127.0.0.1")) as tls_up:
        run, (outcome,) = client_run(
            run_tokencap,
            tmp_path,
            {"url": "https://api.openai.com/v1/chat/completions", "body": CHAT_BODY},
            OPENAI_BASE_URL=f"{tls_up.url}/v1",
        )
        assert tls_up.requests == []

    assert outcome["status"] == 502
    (call,) = run.calls()
    assert call["status"] in ("dropped", "upstream_error")
    assert Decimal(call["cost_usd"]) == 0


# --- The agent's environment ------------------------------------------------------------------


def dump_environment(run_tokencap, tmp_path, **env) -> tuple[object, dict[str, str]]:
    out = tmp_path / "env.json"
    script = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    run = run_tokencap([], [sys.executable, "-c", script, str(out)], **env)
    return run, json.loads(out.read_text())


def test_child_gets_proxy_and_ca_variables(run_tokencap, tmp_path, tokencap_env):
    run, child = dump_environment(run_tokencap, tmp_path, NODE_EXTRA_CA_CERTS="/dev/null")

    assert run.exit_code == 0, run.stderr
    proxy = child["HTTPS_PROXY"]
    assert proxy == child["https_proxy"]
    assert proxy.startswith("http://tokencap:")
    assert "@127.0.0.1:" in proxy
    bundle = child["SSL_CERT_FILE"]
    for name in CA_FILE_VARIABLES:
        assert child[name] == bundle, name
    assert os.path.isdir(child["SSL_CERT_DIR"])
    content = Path(bundle).read_text()
    ca_cert = tmp_path / "data" / "tokencap" / "ca" / "mitmproxy-ca-cert.pem"
    assert ca_cert.read_text().strip() in content
    # Every certificate the user trusted before is still in the bundle.
    system = Path(tokencap_env["SSL_CERT_FILE"]).read_text()
    first = system[: system.index("-----END CERTIFICATE-----")]
    assert first[first.index("-----BEGIN") :] in content


def test_ca_key_private(run_tokencap, tmp_path):
    run, _ = dump_environment(run_tokencap, tmp_path)

    assert run.exit_code == 0, run.stderr
    ca_dir = tmp_path / "data" / "tokencap" / "ca"
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ca_dir / "mitmproxy-ca.pem").stat().st_mode) == 0o600


def test_ca_key_readable_by_others_rejected(run_tokencap, tmp_path):
    run, _ = dump_environment(run_tokencap, tmp_path)
    key = tmp_path / "data" / "tokencap" / "ca" / "mitmproxy-ca.pem"
    key.chmod(0o644)

    second = run_tokencap([], [sys.executable, "-c", "pass"])

    assert second.exit_code == 2
    assert f"chmod 600 {key}" in second.stderr


def test_ca_reused_across_runs(run_tokencap, tmp_path):
    ca_cert = tmp_path / "data" / "tokencap" / "ca" / "mitmproxy-ca-cert.pem"
    dump_environment(run_tokencap, tmp_path)
    first = ca_cert.read_bytes()

    dump_environment(run_tokencap, tmp_path)

    assert ca_cert.read_bytes() == first


def test_no_proxy_keeps_model_hosts_intercepted(run_tokencap, tmp_path):
    run, child = dump_environment(
        run_tokencap, tmp_path, NO_PROXY=".openai.com,internal.example,*", no_proxy=""
    )

    assert run.exit_code == 0, run.stderr
    assert child["NO_PROXY"] == "internal.example,127.0.0.1,localhost,::1"
    assert child["no_proxy"] == child["NO_PROXY"]


def test_socks_proxy_rejected(run_tokencap):
    run = run_tokencap([], [sys.executable, "-c", "pass"], HTTPS_PROXY="socks5://127.0.0.1:9")

    assert run.exit_code == 2
    assert "HTTPS_PROXY='socks5://127.0.0.1:9'" in run.stderr
    assert run.process.stdout == ""


def test_base_url_route_still_primary(upstream, run_agent):
    run = run_agent([], "--api", "openai-chat", "--model", "gpt-4o-2024-08-06")

    assert run.exit_code == 0, run.stderr
    (request,) = upstream.inference_requests()
    # The SDK reached the fake through the base-URL route: no proxy headers, no CONNECT.
    assert "proxy-authorization" not in request.headers
    assert len(run.calls()) == 1


def test_proxy_credentials_never_logged(upstream, run_tokencap, tmp_path):
    seen = tmp_path / "proxy.txt"
    out = tmp_path / "outcome.jsonl"
    request = {"url": "https://api.openai.com/v1/chat/completions", "body": CHAT_BODY}
    script = (
        f'echo "$HTTPS_PROXY" > {seen} && '
        f"{sys.executable} {PROXY_CLIENT} --out {out} '{json.dumps(request)}'"
    )

    run = run_tokencap(["-v"], ["sh", "-c", script])

    assert run.exit_code == 0, run.stderr
    assert len(run.calls()) == 1
    password = seen.read_text().strip().split(":")[2].split("@")[0]
    assert len(password) > 16
    log = (tmp_path / "data" / "tokencap" / "logs" / "tokencap.log").read_text()
    assert password not in log
    assert password not in run.stderr
    assert password.encode() not in run.db.read_bytes()
