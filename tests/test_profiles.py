"""Agent profiles: recognised by command, each given the environment and refusals it needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TOKENCAP
from tokencap import agents
from tokencap.errors import EXIT_CAPPED

# A stand-in for an agent CLI: it records its environment, then makes model calls through the
# base-URL variable of the API named by FAKE_AGENT_API until one fails.
FAKE_AGENT = """#!{python}
import json, os, signal, sys, urllib.error, urllib.request
signal.signal(signal.SIGTERM, signal.SIG_IGN)
out = os.environ["FAKE_AGENT_OUT"]
json.dump(dict(os.environ), open(out + ".env", "w"))
api = os.environ.get("FAKE_AGENT_API", "none")
if api == "anthropic":
    url = os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages"
    body = {{"model": "claude-sonnet-4-5", "max_tokens": 10,
             "messages": [{{"role": "user", "content": "hi"}}]}}
elif api == "gemini":
    url = os.environ["GOOGLE_GEMINI_BASE_URL"] + "/v1beta/models/gemini-2.5-flash:generateContent"
    body = {{"contents": [{{"parts": [{{"text": "hi"}}]}}]}}
else:
    sys.exit(0)
for _ in range(int(os.environ.get("FAKE_AGENT_CALLS", "1"))):
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={{"content-type": "application/json"}})
    try:
        status, reply = urllib.request.urlopen(request).status, ""
    except urllib.error.HTTPError as error:
        status, reply = error.code, error.read().decode()
        headers = dict(error.headers)
    else:
        headers = {{}}
    with open(out, "a") as file:
        file.write(json.dumps({{"status": status, "body": reply, "headers": headers}}) + "\\n")
    if status != 200:
        break
"""


@pytest.fixture
def fake_agent(tmp_path):
    """Return a function that installs a fake agent CLI under `name` and returns its path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def install(name: str) -> Path:
        path = bin_dir / name
        path.write_text(FAKE_AGENT.format(python=sys.executable))
        path.chmod(0o755)
        return path

    return install


def run_fake(run_tokencap, fake_agent, tmp_path, name, options=(), **env):
    path = fake_agent(name)
    out = tmp_path / f"{name}.jsonl"
    run = run_tokencap(list(options), [str(path)], FAKE_AGENT_OUT=str(out), **env)
    outcomes = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    child_env = json.loads(Path(f"{out}.env").read_text())
    return run, child_env, outcomes


# --- Recognising the agent --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "profile"),
    [
        (["claude", "-p", "fix it"], "claude"),
        (["/usr/local/bin/claude"], "claude"),
        (["npx", "@anthropic-ai/claude-code"], "claude"),
        (["codex", "exec", "hi"], "codex"),
        (["npx", "-y", "@openai/codex@latest", "exec"], "codex"),
        (["node", "/opt/@google/gemini-cli/bundle/gemini.js", "-p", "x"], "gemini"),
        (["gemini"], "gemini"),
        (["python3.12", "-m", "aider", "--message", "x"], "aider"),
        (["aider"], "aider"),
        (["opencode", "run", "x"], "opencode"),
        (["python", "agent.py"], "generic"),
        (["bash", "-c", "claude -p x"], "generic"),
    ],
)
def test_profile_found_by_command(argv, profile):
    assert agents.profile_for(argv).name == profile


def test_profile_by_name_overrides_command():
    assert agents.profile_for(["python", "wrapper.py"], "codex").name == "codex"


def test_unknown_profile_name_raises():
    with pytest.raises(KeyError):
        agents.profile_for(["x"], "cursor")


# --- What each profile gets -------------------------------------------------------------------


def test_claude_keeps_anthropic_base_url_unset(run_tokencap, fake_agent, tmp_path):
    run, child, _ = run_fake(run_tokencap, fake_agent, tmp_path, "claude", ANTHROPIC_BASE_URL="")

    assert run.exit_code == 0, run.stderr
    assert child["ANTHROPIC_BASE_URL"] == ""
    assert "/openai" in child["OPENAI_BASE_URL"]
    assert child["HTTPS_PROXY"].startswith("http://tokencap:")


def test_claude_routed_when_user_set_base_url(upstream, run_tokencap, fake_agent, tmp_path):
    run, child, outcomes = run_fake(
        run_tokencap, fake_agent, tmp_path, "claude", FAKE_AGENT_API="anthropic"
    )

    assert run.exit_code == 0, run.stderr
    assert child["ANTHROPIC_BASE_URL"].endswith("/anthropic")
    assert child["ANTHROPIC_BASE_URL"] != upstream.url
    assert outcomes[0]["status"] == 200
    assert len(run.calls()) == 1


def test_codex_keeps_openai_base_url(run_tokencap, fake_agent, tmp_path):
    run, child, _ = run_fake(run_tokencap, fake_agent, tmp_path, "codex", OPENAI_BASE_URL="")

    assert run.exit_code == 0, run.stderr
    assert child["OPENAI_BASE_URL"] == ""
    assert child["CODEX_CA_CERTIFICATE"] == child["SSL_CERT_FILE"]
    assert "/anthropic" in child["ANTHROPIC_BASE_URL"]


def test_gemini_keeps_gemini_base_url(run_tokencap, fake_agent, tmp_path):
    run, child, _ = run_fake(
        run_tokencap, fake_agent, tmp_path, "gemini", GOOGLE_GEMINI_BASE_URL=""
    )

    assert run.exit_code == 0, run.stderr
    assert child["GOOGLE_GEMINI_BASE_URL"] == ""
    assert child["NODE_EXTRA_CA_CERTS"] == child["SSL_CERT_FILE"]


def test_alias_variable_routed_when_user_set_it(upstream, run_tokencap, fake_agent, tmp_path):
    run, child, _ = run_fake(
        run_tokencap, fake_agent, tmp_path, "aider", OPENAI_API_BASE=upstream.url + "/v1"
    )

    assert run.exit_code == 0, run.stderr
    assert child["OPENAI_API_BASE"] == child["OPENAI_BASE_URL"]
    assert child["OPENAI_API_BASE"].endswith("/openai")


# --- Refusals each agent stops on -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "api", "status", "error_type"),
    [
        ("claude", "anthropic", 429, "rate_limit_error"),
        ("aider", "anthropic", 400, "invalid_request_error"),
        ("opencode", "anthropic", 403, "permission_error"),
        ("some-agent", "anthropic", 429, "rate_limit_error"),
        ("gemini", "gemini", 403, "PERMISSION_DENIED"),
        ("some-agent", "gemini", 403, "PERMISSION_DENIED"),
    ],
)
def test_refusal_status_per_profile(
    name, api, status, error_type, upstream, run_tokencap, fake_agent, tmp_path
):
    run, _, outcomes = run_fake(
        run_tokencap,
        fake_agent,
        tmp_path,
        name,
        options=["--max-calls", "1", "--grace", "1"],
        FAKE_AGENT_API=api,
        FAKE_AGENT_CALLS="3",
    )

    assert run.exit_code == EXIT_CAPPED
    assert [o["status"] for o in outcomes] == [200, status]
    assert error_type in outcomes[1]["body"]
    assert "call cap reached" in outcomes[1]["body"]
    headers = {k.lower(): v for k, v in outcomes[1]["headers"].items()}
    assert headers["x-should-retry"] == "false"
    assert len(upstream.inference_requests()) == 1


# --- tokencap agents --------------------------------------------------------------------------


def test_agents_command_lists_profiles():
    result = subprocess.run(
        [str(TOKENCAP), "agents", "--format", "json"], capture_output=True, text=True, check=True
    )

    profiles = {p["name"]: p for p in json.loads(result.stdout)["profiles"]}
    assert list(profiles) == ["claude", "codex", "gemini", "aider", "opencode", "generic"]
    assert profiles["claude"]["base_url_variables"] == [
        "OPENAI_BASE_URL",
        "GOOGLE_GEMINI_BASE_URL",
    ]
    assert profiles["gemini"]["commands"] == ["gemini"]
    assert profiles["aider"]["refusal"] == "400"
    assert any("ENABLE_TOOL_SEARCH" in note for note in profiles["claude"]["notes"])


def test_agents_command_table():
    result = subprocess.run([str(TOKENCAP), "agents"], capture_output=True, text=True, check=True)

    for name in ("claude", "codex", "gemini", "aider", "opencode", "generic"):
        assert name in result.stdout


def test_agents_command_invalid_format():
    result = subprocess.run(
        [str(TOKENCAP), "agents", "--format", "xml"], capture_output=True, text=True
    )

    assert result.returncode == 2
    assert "invalid --format 'xml'" in result.stderr
