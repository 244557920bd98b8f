"""Wrapping changes nothing the upstream receives, apart from transport headers.

The same scripted agent sends the same prompt twice: once straight to the fake upstream, once
under tokencap (through the base-URL route, and through the HTTPS proxy). The requests the
upstream receives must be equal in method, path, query, body and every header except the
transport ones. The one deliberate difference: an OpenAI chat stream that did not ask for usage
gets `stream_options.include_usage`, which tokencap needs to meter it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import SDK_AGENT, TESTS
from tests.fakeupstream import Behavior

# Headers that describe the connection rather than the request, which a proxy may change.
TRANSPORT_HEADERS = {
    "host",
    "connection",
    "keep-alive",
    "content-length",
    "transfer-encoding",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "via",
}
# Headers the SDKs fill in per attempt, which differ between any two runs.
PER_ATTEMPT_HEADERS = {"x-stainless-retry-count", "x-stainless-read-timeout", "idempotency-key"}

CASES = {
    "anthropic-json": ["--api", "anthropic"],
    "anthropic-stream": ["--api", "anthropic", "--stream", "--user-id", "user-1"],
    "openai-chat-json": ["--api", "openai-chat"],
    "openai-chat-stream-usage": ["--api", "openai-chat", "--stream", "--include-usage"],
    "openai-responses-stream": ["--api", "openai-responses", "--stream"],
    "gemini-json": ["--api", "gemini"],
    "gemini-stream": ["--api", "gemini", "--stream"],
}


def received(record) -> dict:
    """Return what the upstream received, without transport headers."""
    headers = {
        name: value
        for name, value in record.headers.items()
        if name not in TRANSPORT_HEADERS and name not in PER_ATTEMPT_HEADERS
    }
    return {
        "method": record.method,
        "path": record.path,
        "query": record.query,
        "headers": headers,
        "body": record.raw_body,
    }


def direct_and_wrapped(upstream, tokencap_env, run_tokencap, tmp_path, command: list[str]):
    """Run the agent without tokencap, then under it; return both upstream records."""
    env = tokencap_env | {"AGENT_OUT": str(tmp_path / "direct.jsonl")}
    subprocess.run(command, env=env, check=True, timeout=60, capture_output=True)
    (direct,) = upstream.inference_requests()
    upstream.clear()

    run = run_tokencap([], command)

    assert run.exit_code == 0, run.stderr
    (wrapped,) = upstream.inference_requests()
    return direct, wrapped


@pytest.mark.parametrize("case", sorted(CASES))
def test_sdk_requests_unchanged(case, upstream, tokencap_env, run_tokencap, tmp_path):
    upstream.default = Behavior(events=3)
    command = [sys.executable, str(SDK_AGENT), "--out", str(tmp_path / "o.jsonl"), *CASES[case]]

    direct, wrapped = direct_and_wrapped(upstream, tokencap_env, run_tokencap, tmp_path, command)

    assert received(wrapped) == received(direct)


def test_chat_stream_without_usage_differs_only_in_stream_options(
    upstream, tokencap_env, run_tokencap, tmp_path
):
    command = [
        sys.executable,
        str(SDK_AGENT),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--api",
        "openai-chat",
        "--stream",
    ]

    direct, wrapped = direct_and_wrapped(upstream, tokencap_env, run_tokencap, tmp_path, command)

    assert wrapped.body == {**direct.body, "stream_options": {"include_usage": True}}
    direct_view, wrapped_view = received(direct), received(wrapped)
    del direct_view["body"], wrapped_view["body"]
    assert wrapped_view == direct_view


def test_proxied_requests_unchanged(upstream, tokencap_env, run_tokencap, tmp_path):
    # A client that names the real host: without tokencap it is pointed at the fake by URL,
    # under tokencap it names api.openai.com and is intercepted.
    body = {"model": "gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    client = TESTS / "agents" / "proxy_client.py"
    spec = {
        "body": body,
        "headers": {"authorization": "Bearer test-key", "x-custom": "kept"},
    }
    direct_spec = {**spec, "url": f"{upstream.url}/v1/chat/completions"}
    plain = tmp_path / "plain.py"
    plain.write_text(
        "import json, sys, urllib.request\n"
        "spec = json.loads(sys.argv[1])\n"
        "request = urllib.request.Request(spec['url'], data=json.dumps(spec['body']).encode(),\n"
        "    headers={'content-type': 'application/json', **spec['headers']})\n"
        "urllib.request.urlopen(request).read()\n"
    )
    env = {k: v for k, v in tokencap_env.items() if k.lower() != "https_proxy"}
    subprocess.run(
        [sys.executable, str(plain), json.dumps(direct_spec)], env=env, check=True, timeout=60
    )
    (direct,) = upstream.inference_requests()
    upstream.clear()
    proxied_spec = {**spec, "url": "https://api.openai.com/v1/chat/completions"}
    out = tmp_path / "proxied.jsonl"

    run = run_tokencap(
        [], [sys.executable, str(client), "--out", str(out), json.dumps(proxied_spec)]
    )

    assert run.exit_code == 0, run.stderr
    assert json.loads(out.read_text())["status"] == 200
    (wrapped,) = upstream.inference_requests()
    direct_view, wrapped_view = received(direct), received(wrapped)
    # The two standard-library clients differ only in their own User-Agent and Accept-Encoding.
    for view in (direct_view, wrapped_view):
        view["headers"].pop("user-agent", None)
        view["headers"].pop("accept-encoding", None)
    assert wrapped_view == direct_view
    assert wrapped.headers["x-custom"] == "kept"
