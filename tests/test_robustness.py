"""tokencap under faults: bad upstream replies, stray requests, secrets, kills and shared ledgers.

Every test starts the real `tokencap` executable as a subprocess against the fake upstream.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import psutil
import pytest

from tests.conftest import SDK_AGENT, TOKENCAP, query
from tests.fakeupstream import Behavior

pytestmark = pytest.mark.slow

# Upper bound for an agent to reach a given point. It only keeps a broken test from hanging
# and is not a performance check.
STARTUP_TIMEOUT = 60.0

SONNET = "claude-sonnet-4-5-20250929"

# Lists the models and counts tokens through both SDKs, which are not model calls.
NON_MODEL_AGENT = textwrap.dedent(
    """
    import json, sys
    import anthropic, openai

    claude = anthropic.Anthropic(api_key="test-key-anthropic", max_retries=0)
    count = claude.messages.count_tokens(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hello"}]
    )
    anthropic_models = [model.id for model in claude.models.list().data]
    gpt = openai.OpenAI(api_key="test-key-openai", max_retries=0)
    openai_models = [model.id for model in gpt.models.list().data]
    with open(sys.argv[1], "w") as out:
        json.dump(
            {
                "input_tokens": count.input_tokens,
                "anthropic_models": anthropic_models,
                "openai_models": openai_models,
            },
            out,
        )
    """
)

# Sends requests to the proxy's address with the run's secret left out or altered, and writes
# the HTTP status of each to a JSON file.
NO_SECRET_AGENT = textwrap.dedent(
    """
    import json, os, sys, urllib.error, urllib.request
    from urllib.parse import urlsplit

    base = urlsplit(os.environ["ANTHROPIC_BASE_URL"])
    origin = f"{base.scheme}://{base.netloc}"
    secret = base.path.split("/")[1]
    body = json.dumps(
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "hello"}],
        }
    ).encode()
    headers = {
        "content-type": "application/json",
        "x-api-key": "test-key-anthropic",
        "anthropic-version": "2023-06-01",
    }
    requests = {
        "no-secret": ("POST", "/v1/messages"),
        "no-secret-models": ("GET", "/v1/models"),
        "wrong-secret": ("POST", "/tc-" + "A" * 24 + "/anthropic/v1/messages"),
        "truncated-secret": ("POST", "/" + secret[:-1] + "/anthropic/v1/messages"),
    }
    statuses = {}
    for name, (method, path) in requests.items():
        request = urllib.request.Request(
            origin + path, data=body if method == "POST" else None, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(request) as response:
                statuses[name] = response.status
        except urllib.error.HTTPError as error:
            statuses[name] = error.code
    with open(sys.argv[1], "w") as out:
        json.dump(statuses, out)
    """
)

# Makes two Anthropic calls (JSON and streamed) and one OpenAI chat call. The prompt comes from
# the environment because tokencap records the command line, which is not a leak.
PROMPT_AGENT = textwrap.dedent(
    """
    import os
    import anthropic, openai

    prompt = os.environ["SECRET_PROMPT"]
    messages = [{"role": "user", "content": prompt}]
    claude = anthropic.Anthropic(api_key="test-key-anthropic", max_retries=0)
    claude.messages.create(model="claude-sonnet-4-5", max_tokens=50, messages=messages)
    with claude.messages.stream(
        model="claude-sonnet-4-5", max_tokens=50, messages=messages
    ) as stream:
        stream.get_final_message()
    gpt = openai.OpenAI(api_key="test-key-openai", max_retries=0)
    gpt.chat.completions.create(model="gpt-4o", max_tokens=50, messages=messages)
    """
)

# Writes its pid to argv[1], then replaces itself with the SDK agent and the rest of argv.
PID_WRAPPER = (
    "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)

TOKEN_COLUMNS = (
    "input_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
)


def wait_until(condition, description: str, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{description} did not happen within {timeout} s")
        time.sleep(0.01)


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_sdk_agent(pid_file: Path) -> None:
    """SIGKILL the SDK agent whose pid is in pid_file, if that process still runs it."""
    if not pid_file.exists():
        return
    try:
        process = psutil.Process(int(pid_file.read_text()))
        if str(SDK_AGENT) in process.cmdline():
            process.kill()
            process.wait(timeout=10)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.TimeoutExpired, ValueError):
        pass


def write_script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- Faulty upstream replies ----------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param([], id="json"),
        pytest.param(["--stream"], id="stream"),
    ],
)
def test_garbled_reply_then_next_call_metered(flags, upstream, run_agent):
    upstream.script(Behavior(garbled=True))
    upstream.default = Behavior(input_tokens=25, output_tokens=12)

    run = run_agent(
        [], "--api", "anthropic", "--model", SONNET, "--keep-going", "--calls", "2", *flags
    )

    assert run.exit_code == 0, run.stderr
    first, second = run.outcomes()
    assert first["ok"] is False
    assert second["ok"] is True
    garbled, ok = run.calls()
    assert ok["status"] == "ok"
    assert ok["input_tokens"] == 25
    assert ok["output_tokens"] == 12
    assert ok["usage_estimated"] == 0
    # 25 * 3 + 12 * 15 dollars per million tokens
    assert Decimal(ok["cost_usd"]) == Decimal("0.000255")
    assert garbled["decision"] == "admitted"
    assert garbled["http_status"] == 200
    assert garbled["usage_estimated"] == 1
    assert garbled["status"] == "garbled"


def test_garbled_json_charged_max_tokens(upstream, run_agent):
    upstream.default = Behavior(garbled=True)

    run = run_agent([], "--api", "anthropic", "--model", SONNET, "--max-tokens", "700")

    assert run.exit_code == 1, run.stderr
    (call,) = run.calls()
    # An unreadable JSON reply is charged what admission reserved: all of max_tokens.
    assert call["output_tokens"] == 700
    assert call["usage_estimated"] == 1


@pytest.mark.parametrize(
    ("status", "error_type"), [(429, "RateLimitError"), (529, "OverloadedError")]
)
def test_upstream_error_recorded_free(status, error_type, upstream, run_agent):
    upstream.script(status=status)

    run = run_agent([], "--api", "anthropic", "--model", SONNET)

    assert run.exit_code == 1, run.stderr
    (outcome,) = run.outcomes()
    assert outcome["error_type"] == error_type
    assert f"fake upstream error {status}" in outcome["error"]
    (call,) = run.calls()
    assert call["http_status"] == status
    assert call["status"] == "upstream_error"
    assert call["decision"] == "admitted"
    assert call["cost_usd"] == "0"
    assert call["cost_pico_usd"] == 0
    for column in TOKEN_COLUMNS:
        assert call[column] == 0, column


# Events of an Anthropic stream: message_start, content_block_start, ping, then text deltas.
DROP_POINTS = [
    pytest.param(3, id="before-text"),
    pytest.param(5, id="mid-text"),
]


@pytest.mark.parametrize("drop_after", DROP_POINTS)
def test_dropped_stream_keeps_input_tokens(drop_after, upstream, run_agent):
    upstream.default = Behavior(
        input_tokens=1500, output_tokens=300, events=6, drop_after_events=drop_after
    )

    run = run_agent([], "--api", "anthropic", "--model", SONNET, "--stream")

    (request,) = upstream.inference_requests()
    assert request.wait()
    assert request.dropped
    (outcome,) = run.outcomes()
    assert outcome["ok"] is False
    # The SDK agent exits 1 after a failed call, and tokencap passes that status on.
    assert run.exit_code == 1, run.stderr
    (call,) = run.calls()
    assert call["status"] == "dropped"
    assert call["decision"] == "admitted"
    assert call["input_tokens"] == 1500
    assert call["usage_estimated"] == 1


# --- Requests that are not metered ----------------------------------------------------------


def test_non_model_requests_pass_unmetered(upstream, run_tokencap, tmp_path):
    upstream.default = Behavior(input_tokens=321)
    script = write_script(tmp_path, "non_model_agent.py", NON_MODEL_AGENT)
    out = tmp_path / "non-model.json"

    run = run_tokencap([], [sys.executable, str(script), str(out)])

    assert run.exit_code == 0, run.stderr
    assert json.loads(out.read_text()) == {
        "input_tokens": 321,
        "anthropic_models": ["fake-model"],
        "openai_models": ["fake-model"],
    }
    routes = [record.route for record in upstream.requests]
    assert routes == ["anthropic.count_tokens", "models", "models"]
    assert run.calls() == []


def test_request_without_secret_rejected(upstream, run_tokencap, tmp_path):
    script = write_script(tmp_path, "no_secret_agent.py", NO_SECRET_AGENT)
    out = tmp_path / "statuses.json"

    run = run_tokencap([], [sys.executable, str(script), str(out)])

    assert run.exit_code == 0, run.stderr
    statuses = json.loads(out.read_text())
    for name in ("no-secret", "no-secret-models", "wrong-secret", "truncated-secret"):
        assert statuses[name] == 403, name
    assert upstream.requests == []
    assert run.calls() == []


def test_secrets_never_stored(upstream, run_tokencap, tmp_path):
    prompt = "violet-quartz-walrus-prompt-5521"
    script = write_script(tmp_path, "prompt_agent.py", PROMPT_AGENT)

    run = run_tokencap(["-v"], [sys.executable, str(script)], SECRET_PROMPT=prompt)

    assert run.exit_code == 0, run.stderr
    assert len(run.calls()) == 3
    # The keys passed through tokencap to the upstream, so a leak would show in the scan below.
    sent_headers = " ".join(" ".join(r.headers.values()) for r in upstream.inference_requests())
    assert "test-key-anthropic" in sent_headers
    assert "test-key-openai" in sent_headers
    ledger_files = [Path(f"{run.db}{suffix}") for suffix in ("", "-wal", "-shm")]
    log_files = sorted((tmp_path / "data" / "tokencap" / "logs").iterdir())
    assert log_files != []
    for path in [*ledger_files, *log_files]:
        if not path.exists():
            continue
        content = path.read_bytes()
        for secret in ("test-key-anthropic", "test-key-openai", prompt):
            assert secret.encode() not in content, f"{secret} in {path.name}"
    for secret in ("test-key-anthropic", "test-key-openai", prompt):
        assert secret not in run.stderr, secret


# --- Killed tokencap and shared ledgers -----------------------------------------------------


def test_call_survives_tokencap_sigkill(upstream, tokencap_env, tmp_path):
    # The first call ends quickly. The next ones stream for about 20 s, so the agent is still
    # busy when tokencap dies.
    upstream.script(Behavior(input_tokens=1200, output_tokens=340, events=3))
    upstream.default = Behavior(slow=True)
    pid_file, out = tmp_path / "agent.pid", tmp_path / "outcomes.jsonl"
    agent = [str(SDK_AGENT), "--out", str(out), "--api", "anthropic", "--model", SONNET]
    command = [sys.executable, "-c", PID_WRAPPER, str(pid_file), *agent, "--stream"]
    process = subprocess.Popen(
        [str(TOKENCAP), "run", "--", *command, "--calls", "3"],
        env=tokencap_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: line_count(out) >= 1, "the agent's first call")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        kill_sdk_agent(pid_file)

    db = tmp_path / "ledger.db"
    first = query(db, "SELECT * FROM calls WHERE seq = 1")[0]
    assert first["status"] == "ok"
    assert first["input_tokens"] == 1200
    assert first["output_tokens"] == 340
    assert first["usage_estimated"] == 0
    # 1200 * 3 + 340 * 15 dollars per million tokens
    assert Decimal(first["cost_usd"]) == Decimal("0.0087")
    assert query(db, "PRAGMA integrity_check")[0][0] == "ok"


def test_two_runs_share_one_ledger(upstream, tokencap_env, tmp_path):
    upstream.default = Behavior(input_tokens=25, output_tokens=12, events=4, delay=0.02)
    processes = []
    for task in ("first", "second"):
        out = tmp_path / f"{task}.jsonl"
        agent = [sys.executable, str(SDK_AGENT), "--out", str(out), "--api", "anthropic"]
        agent += ["--model", SONNET, "--stream", "--calls", "8", "--parallel", "4"]
        processes.append(
            subprocess.Popen(
                [str(TOKENCAP), "run", "--task", task, "--", *agent],
                env=tokencap_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=120)
            results.append((process.returncode, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    for returncode, stderr in results:
        assert returncode == 0, stderr
        assert "locked" not in stderr
    db = tmp_path / "ledger.db"
    for task in ("first", "second"):
        rows = query(
            db,
            "SELECT c.status, c.input_tokens, c.output_tokens FROM calls c "
            "JOIN sessions s ON s.id = c.session_id WHERE s.task = ? ORDER BY c.seq",
            (task,),
        )
        assert [tuple(row) for row in rows] == [("ok", 25, 12)] * 8, task
    assert len(upstream.inference_requests()) == 16
