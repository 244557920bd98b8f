"""Checks of the fake upstream server with the official Anthropic, OpenAI and Gemini SDKs.

Each SDK is pointed at the fake on 127.0.0.1 with retries off, so every call is exactly one
request and the counts in `up.inference_requests()` are exact.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from tests.fakeupstream import (
    API_ANTHROPIC,
    API_GEMINI,
    API_OPENAI_CHAT,
    Behavior,
    FakeUpstream,
    _schema_instance,
    _split_event,
)

PROMPT = [{"role": "user", "content": "hi"}]
MULTIBYTE_TEXT = "héllo, 世界 🚀"

# Distinct numbers for every token kind, so a field read from the wrong place fails the test.
USAGE = {
    "input_tokens": 1200,
    "output_tokens": 345,
    "cache_read_tokens": 800,
    "cache_write_tokens": 60,
    "cache_write_1h_tokens": 40,
    "reasoning_tokens": 120,
}

TOOL = {"name": "run_shell", "description": "Run a command.", "input_schema": {"type": "object"}}
OPENAI_CHAT_TOOL = {
    "type": "function",
    "function": {"name": "run_shell", "parameters": {"type": "object", "properties": {}}},
}
OPENAI_RESPONSES_TOOL = {
    "type": "function",
    "name": "run_shell",
    "parameters": {"type": "object", "properties": {}},
}


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[FakeUpstream]:
    # One server and one set of clients per module keeps the suite fast, because building an SDK
    # client creates a TLS context (30-90 ms each, measured on a development machine). Tests
    # that stop a server start their own.
    with FakeUpstream(**USAGE) as server:
        yield server


@pytest.fixture
def up(shared_upstream: FakeUpstream) -> FakeUpstream:
    """Return the shared server with no records, no queued behaviours and the USAGE default."""
    shared_upstream.clear()
    shared_upstream.default = Behavior(**USAGE)
    shared_upstream.schema_behavior = None
    return shared_upstream


def make_anthropic_client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="test", base_url=url, max_retries=0, timeout=10)


def make_openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(api_key="test", base_url=url + "/v1", max_retries=0, timeout=10)


def make_gemini_client(url: str) -> genai.Client:
    # HttpOptions.timeout is in milliseconds. Without retry_options the SDK does not retry.
    return genai.Client(
        api_key="test", http_options=genai_types.HttpOptions(base_url=url, timeout=10_000)
    )


@pytest.fixture(scope="module")
def anthropic_client(shared_upstream: FakeUpstream) -> Iterator[anthropic.Anthropic]:
    client = make_anthropic_client(shared_upstream.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def openai_client(shared_upstream: FakeUpstream) -> Iterator[openai.OpenAI]:
    client = make_openai_client(shared_upstream.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def gemini_client(shared_upstream: FakeUpstream) -> Iterator[genai.Client]:
    client = make_gemini_client(shared_upstream.url)
    yield client
    client.close()


def post_json(url: str, payload: Any, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
    """POST with urllib, which sends no Accept-Encoding, and return the response and its body."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response, response.read()


def sse_data(body: bytes) -> list[str]:
    """Return the data field of every event in an SSE body."""
    return [
        line.removeprefix("data: ")
        for line in body.decode().splitlines()
        if line.startswith("data: ")
    ]


def sse_event_names(body: bytes) -> list[str]:
    return [
        line.removeprefix("event: ")
        for line in body.decode().splitlines()
        if line.startswith("event: ")
    ]


# Calls that each make one model request, by API and mode, for tests that cover every API.


def call_anthropic_json(clients: Clients) -> tuple[str, Any]:
    message = clients.anthropic.messages.create(model="claude-test", max_tokens=50, messages=PROMPT)
    return message.content[0].text, message.usage.output_tokens


def call_anthropic_stream(clients: Clients) -> tuple[str, Any]:
    with clients.anthropic.messages.stream(
        model="claude-test", max_tokens=50, messages=PROMPT
    ) as stream:
        message = stream.get_final_message()
    return message.content[0].text, message.usage.output_tokens


def call_chat_json(clients: Clients) -> tuple[str, Any]:
    completion = clients.openai.chat.completions.create(model="gpt-test", messages=PROMPT)
    return completion.choices[0].message.content, completion.usage.completion_tokens


def call_chat_stream(clients: Clients) -> tuple[str, Any]:
    chunks = list(
        clients.openai.chat.completions.create(
            model="gpt-test",
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    return text, chunks[-1].usage.completion_tokens


def call_responses_json(clients: Clients) -> tuple[str, Any]:
    response = clients.openai.responses.create(model="gpt-test", input="hi")
    return response.output_text, response.usage.output_tokens


def call_responses_stream(clients: Clients) -> tuple[str, Any]:
    with clients.openai.responses.stream(model="gpt-test", input="hi") as stream:
        response = stream.get_final_response()
    return response.output_text, response.usage.output_tokens


def call_gemini_json(clients: Clients) -> tuple[str, Any]:
    response = clients.gemini.models.generate_content(model="gemini-test", contents="hi")
    return response.text, response.usage_metadata.candidates_token_count


def call_gemini_stream(clients: Clients) -> tuple[str, Any]:
    chunks = list(clients.gemini.models.generate_content_stream(model="gemini-test", contents="hi"))
    text = "".join(chunk.text or "" for chunk in chunks)
    return text, chunks[-1].usage_metadata.candidates_token_count


class Clients:
    def __init__(self, anthropic_client: Any, openai_client: Any, gemini_client: Any) -> None:
        self.anthropic = anthropic_client
        self.openai = openai_client
        self.gemini = gemini_client


@pytest.fixture(scope="module")
def clients(
    anthropic_client: anthropic.Anthropic, openai_client: openai.OpenAI, gemini_client: genai.Client
) -> Clients:
    return Clients(anthropic_client, openai_client, gemini_client)


JSON_CALLS = {
    "anthropic": call_anthropic_json,
    "chat": call_chat_json,
    "responses": call_responses_json,
    "gemini": call_gemini_json,
}
STREAM_CALLS = {
    "anthropic": call_anthropic_stream,
    "chat": call_chat_stream,
    "responses": call_responses_stream,
    "gemini": call_gemini_stream,
}
ALL_CALLS: dict[str, Callable[[Clients], tuple[str, Any]]] = {
    **{f"{name}-json": call for name, call in JSON_CALLS.items()},
    **{f"{name}-stream": call for name, call in STREAM_CALLS.items()},
}


# Anthropic ------------------------------------------------------------------------------------


def test_anthropic_json_usage(up: FakeUpstream, anthropic_client: anthropic.Anthropic) -> None:
    raw = anthropic_client.messages.with_raw_response.create(
        model="claude-test", max_tokens=50, messages=PROMPT
    )
    message = raw.parse()

    assert message.usage.input_tokens == 1200
    assert message.usage.output_tokens == 345
    assert message.usage.cache_read_input_tokens == 800
    assert message.usage.cache_creation_input_tokens == 100
    assert message.usage.cache_creation.ephemeral_5m_input_tokens == 60
    assert message.usage.cache_creation.ephemeral_1h_input_tokens == 40
    assert message.id.startswith("msg_")
    assert message.model == "claude-test"
    assert message.stop_reason == "end_turn"
    assert message.content[0].text == up.default.text

    records = up.wait_for_requests(1)
    assert len(records) == 1
    assert records[0].completed
    assert records[0].stream is False
    assert raw.headers["request-id"] == records[0].request_id
    assert records[0].request_id.startswith("req_")
    assert records[0].response_id == message.id
    assert records[0].body["model"] == "claude-test"
    assert "anthropic-version" in records[0].headers


def test_anthropic_stream_event_order(
    up: FakeUpstream, anthropic_client: anthropic.Anthropic
) -> None:
    up.default = Behavior(**USAGE, output_token_steps=(100, 200, 345))

    events = list(
        anthropic_client.messages.create(
            model="claude-test", max_tokens=50, messages=PROMPT, stream=True
        )
    )
    types = [event.type for event in events]

    # The SDK drops `ping`, so it is checked on the raw wire by the next test.
    assert types == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_delta",
        "message_delta",
        "message_stop",
    ]
    start_usage = events[0].message.usage
    assert start_usage.input_tokens == 1200
    assert start_usage.cache_read_input_tokens == 800
    assert start_usage.cache_creation_input_tokens == 100
    assert start_usage.cache_creation.ephemeral_5m_input_tokens == 60
    assert start_usage.cache_creation.ephemeral_1h_input_tokens == 40
    assert start_usage.output_tokens == 1
    deltas = [event for event in events if event.type == "message_delta"]
    assert [event.usage.output_tokens for event in deltas] == [100, 200, 345]
    assert [event.delta.stop_reason for event in deltas] == [None, None, "end_turn"]
    assert len(up.inference_requests()) == 1
    assert up.wait_for_requests(1)[0].events_sent == len(events) + 1


def test_anthropic_stream_raw_wire(up: FakeUpstream) -> None:
    payload = {"model": "claude-test", "max_tokens": 50, "messages": PROMPT, "stream": True}

    response, body = post_json(up.url + "/v1/messages?beta=true", payload)

    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["request-id"].startswith("req_")
    assert sse_event_names(body) == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert body.decode().count("\n\n") == 10
    records = up.inference_requests()
    assert len(records) == 1
    assert records[0].query == {"beta": "true"}
    assert records[0].path == "/v1/messages"


def test_anthropic_stream_accumulated_usage(
    up: FakeUpstream, anthropic_client: anthropic.Anthropic
) -> None:
    up.script(output_token_steps=(5, 345))

    with anthropic_client.messages.stream(
        model="claude-test", max_tokens=50, messages=PROMPT
    ) as stream:
        message = stream.get_final_message()

    assert message.usage.input_tokens == 1200
    assert message.usage.output_tokens == 345
    assert message.usage.cache_read_input_tokens == 800
    assert message.usage.cache_creation_input_tokens == 100
    assert message.content[0].text == up.default.text
    records = up.wait_for_requests(1)
    assert len(records) == 1
    assert records[0].completed


def test_anthropic_beta_query_allowed(
    up: FakeUpstream, anthropic_client: anthropic.Anthropic
) -> None:
    anthropic_client.messages.create(
        model="claude-test", max_tokens=50, messages=PROMPT, extra_query={"beta": "true"}
    )

    records = up.inference_requests()
    assert len(records) == 1
    assert records[0].query == {"beta": "true"}


def test_anthropic_count_tokens_and_models(
    up: FakeUpstream, anthropic_client: anthropic.Anthropic
) -> None:
    count = anthropic_client.messages.count_tokens(model="claude-test", messages=PROMPT)
    models = list(anthropic_client.models.list())

    assert count.input_tokens == 1200
    assert [model.id for model in models] == ["fake-model"]
    assert len(up.requests) == 2
    assert up.inference_requests() == []


# OpenAI Chat Completions ----------------------------------------------------------------------


def test_chat_json_usage(up: FakeUpstream, openai_client: openai.OpenAI) -> None:
    raw = openai_client.chat.completions.with_raw_response.create(model="gpt-test", messages=PROMPT)
    completion = raw.parse()

    usage = completion.usage
    assert usage.prompt_tokens == 1200
    assert usage.completion_tokens == 345
    assert usage.total_tokens == 1545
    assert usage.prompt_tokens_details.cached_tokens == 800
    assert usage.completion_tokens_details.reasoning_tokens == 120
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-test"
    assert completion.choices[0].message.content == up.default.text
    assert completion.choices[0].finish_reason == "stop"
    records = up.inference_requests()
    assert len(records) == 1
    assert raw.headers["x-request-id"] == records[0].request_id
    assert records[0].headers["authorization"] == "Bearer test"


def test_chat_stream_with_include_usage(up: FakeUpstream, openai_client: openai.OpenAI) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            model="gpt-test",
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.prompt_tokens == 1200
    assert usage.completion_tokens == 345
    assert usage.total_tokens == 1545
    assert usage.prompt_tokens_details.cached_tokens == 800
    assert usage.completion_tokens_details.reasoning_tokens == 120
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == up.default.text
    assert len(up.inference_requests()) == 1


def test_chat_stream_raw_include_usage(up: FakeUpstream) -> None:
    payload = {
        "model": "gpt-test",
        "messages": PROMPT,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    _, body = post_json(up.url + "/v1/chat/completions", payload)

    data = sse_data(body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert all("usage" in chunk for chunk in chunks)
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert all(chunk["choices"] for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 1200
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_raw_without_include_usage(up: FakeUpstream) -> None:
    payload = {"model": "gpt-test", "messages": PROMPT, "stream": True}

    _, body = post_json(up.url + "/v1/chat/completions", payload)

    data = sse_data(body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert all("usage" not in chunk for chunk in chunks)
    assert all(chunk["choices"] for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_sdk_without_include_usage(
    up: FakeUpstream, openai_client: openai.OpenAI
) -> None:
    chunks = list(
        openai_client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
    )

    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    assert len(up.inference_requests()) == 1


def test_chat_route_without_v1_prefix(up: FakeUpstream) -> None:
    response, body = post_json(up.url + "/chat/completions", {"model": "gpt-test", "messages": []})

    completion = json.loads(body)
    assert completion["id"].startswith("chatcmpl-")
    assert completion["usage"]["prompt_tokens"] == 1200
    assert response.headers["x-request-id"] == up.inference_requests()[0].request_id
    assert up.inference_requests()[0].path == "/chat/completions"


# OpenAI Responses -----------------------------------------------------------------------------


def test_responses_json_usage(up: FakeUpstream, openai_client: openai.OpenAI) -> None:
    response = openai_client.responses.create(model="gpt-test", input="hi")

    usage = response.usage
    assert usage.input_tokens == 1200
    assert usage.input_tokens_details.cached_tokens == 800
    assert usage.output_tokens == 345
    assert usage.output_tokens_details.reasoning_tokens == 120
    assert usage.total_tokens == 1545
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == "gpt-test"
    assert response.output_text == up.default.text
    assert len(up.inference_requests()) == 1


def test_responses_stream_events(up: FakeUpstream, openai_client: openai.OpenAI) -> None:
    events = list(openai_client.responses.create(model="gpt-test", input="hi", stream=True))

    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.usage is None
    usage = events[-1].response.usage
    assert usage.input_tokens == 1200
    assert usage.input_tokens_details.cached_tokens == 800
    assert usage.output_tokens == 345
    assert usage.output_tokens_details.reasoning_tokens == 120
    assert usage.total_tokens == 1545
    assert len(up.inference_requests()) == 1


def test_responses_stream_helper(up: FakeUpstream, openai_client: openai.OpenAI) -> None:
    up.default = Behavior(**USAGE, text=MULTIBYTE_TEXT)

    with openai_client.responses.stream(model="gpt-test", input="hi") as stream:
        deltas = [event for event in stream if event.type == "response.output_text.delta"]
        snapshots = [event.snapshot for event in deltas]
        response = stream.get_final_response()

    assert snapshots[-1] == MULTIBYTE_TEXT
    assert response.output_text == MULTIBYTE_TEXT
    assert response.usage.input_tokens == 1200
    assert response.usage.output_tokens == 345
    assert response.usage.input_tokens_details.cached_tokens == 800
    assert len(up.inference_requests()) == 1


def test_responses_raw_event_lines(up: FakeUpstream) -> None:
    _, body = post_json(up.url + "/responses", {"model": "gpt-test", "input": "hi", "stream": True})

    names = sse_event_names(body)
    payloads = [json.loads(item) for item in sse_data(body)]
    assert names == [payload["type"] for payload in payloads]
    assert names[-1] == "response.completed"


# Gemini ---------------------------------------------------------------------------------------


def test_gemini_json_usage(up: FakeUpstream, gemini_client: genai.Client) -> None:
    response = gemini_client.models.generate_content(model="gemini-test", contents="hi")

    usage = response.usage_metadata
    assert usage.prompt_token_count == 1200
    assert usage.candidates_token_count == 345
    assert usage.thoughts_token_count == 120
    assert usage.cached_content_token_count == 800
    assert usage.total_token_count == 1665
    assert response.model_version == "gemini-test"
    assert response.response_id == up.inference_requests()[0].response_id
    assert response.text == up.default.text
    records = up.inference_requests()
    assert len(records) == 1
    assert records[0].model == "gemini-test"
    assert records[0].headers["x-goog-api-key"] == "test"


def test_gemini_sse_stream_usage(up: FakeUpstream, gemini_client: genai.Client) -> None:
    chunks = list(gemini_client.models.generate_content_stream(model="gemini-test", contents="hi"))

    assert len(chunks) == 4
    assert all(chunk.usage_metadata is not None for chunk in chunks)
    assert all(chunk.usage_metadata.prompt_token_count == 1200 for chunk in chunks)
    running = [chunk.usage_metadata.candidates_token_count for chunk in chunks]
    assert running == sorted(running)
    assert running[-1] == 345
    final = chunks[-1].usage_metadata
    assert final.thoughts_token_count == 120
    assert final.cached_content_token_count == 800
    assert final.total_token_count == 1665
    assert chunks[-1].candidates[0].finish_reason == genai_types.FinishReason.STOP
    assert all(chunk.candidates[0].finish_reason is None for chunk in chunks[:-1])
    assert "".join(chunk.text for chunk in chunks) == up.default.text
    records = up.inference_requests()
    assert len(records) == 1
    assert records[0].query == {"alt": "sse"}
    assert records[0].stream is True


def test_gemini_array_stream_without_sse(up: FakeUpstream) -> None:
    url = up.url + "/v1beta/models/gemini-test:streamGenerateContent"

    response, body = post_json(url, {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})

    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Transfer-Encoding"] == "chunked"
    chunks = json.loads(body)
    assert len(chunks) == 4
    assert chunks[-1]["usageMetadata"]["candidatesTokenCount"] == 345
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert "".join(chunk["candidates"][0]["content"]["parts"][0]["text"] for chunk in chunks) == (
        up.default.text
    )
    assert up.wait_for_requests(1)[0].events_sent == 4


def test_gemini_count_tokens_not_inference(up: FakeUpstream, gemini_client: genai.Client) -> None:
    count = gemini_client.models.count_tokens(model="gemini-test", contents="hi")

    assert count.total_tokens == 1200
    assert len(up.requests) == 1
    assert up.inference_requests() == []


@pytest.mark.parametrize("version", ["v1", "v1beta", "v1alpha"])
def test_gemini_api_versions(up: FakeUpstream, version: str) -> None:
    url = f"{up.url}/{version}/models/gemini-test:generateContent"

    _, body = post_json(url, {"contents": []})

    assert json.loads(body)["usageMetadata"]["promptTokenCount"] == 1200
    assert up.inference_requests()[0].path == f"/{version}/models/gemini-test:generateContent"


# Behaviour across APIs ------------------------------------------------------------------------


def test_model_override(up: FakeUpstream, clients: Clients) -> None:
    up.default = Behavior(model="answered-model")

    message = clients.anthropic.messages.create(model="asked", max_tokens=5, messages=PROMPT)
    completion = clients.openai.chat.completions.create(model="asked", messages=PROMPT)
    response = clients.openai.responses.create(model="asked", input="hi")
    gemini = clients.gemini.models.generate_content(model="asked", contents="hi")

    assert message.model == "answered-model"
    assert completion.model == "answered-model"
    assert response.model == "answered-model"
    assert gemini.model_version == "answered-model"
    assert [record.model for record in up.inference_requests()] == ["asked"] * 4


@pytest.mark.parametrize("call", STREAM_CALLS.values(), ids=STREAM_CALLS.keys())
def test_split_events_reassembled(up: FakeUpstream, clients: Clients, call: Callable) -> None:
    up.default = Behavior(**USAGE, text=MULTIBYTE_TEXT, split_events=True)

    text, output_tokens = call(clients)

    assert text == MULTIBYTE_TEXT
    assert output_tokens == 345
    records = up.wait_for_requests(1)
    assert len(records) == 1
    assert records[0].completed


def test_split_event_cuts_multibyte_character() -> None:
    event = ("data: " + json.dumps({"text": "a世b"}, ensure_ascii=False) + "\n\n").encode()

    pieces = _split_event(event)

    assert b"".join(pieces) == event
    assert pieces[-1] == b"\n"
    undecodable = []
    for piece in pieces:
        try:
            piece.decode()
        except UnicodeDecodeError:
            undecodable.append(piece)
    assert undecodable


@pytest.mark.parametrize("call", ALL_CALLS.values(), ids=ALL_CALLS.keys())
def test_gzip_parsed_by_sdk(up: FakeUpstream, clients: Clients, call: Callable) -> None:
    up.default = Behavior(**USAGE, text=MULTIBYTE_TEXT, gzip=True)

    text, output_tokens = call(clients)

    assert text == MULTIBYTE_TEXT
    assert output_tokens == 345
    records = up.inference_requests()
    assert len(records) == 1
    assert records[0].gzipped


def test_gzip_skipped_without_accept_encoding(up: FakeUpstream) -> None:
    up.default = Behavior(gzip=True)

    response, body = post_json(up.url + "/v1/messages", {"model": "m", "messages": PROMPT})

    assert response.headers["Content-Encoding"] is None
    assert json.loads(body)["type"] == "message"
    assert not up.inference_requests()[0].gzipped


def test_gzip_stream_arrives_incrementally(up: FakeUpstream, openai_client: openai.OpenAI) -> None:
    # 7 events with 0.15 s between them take about 0.9 s, so a first chunk within 0.5 s shows
    # the compressor flushed it rather than holding the body until the end.
    up.default = Behavior(gzip=True, delay=0.15)
    started = time.monotonic()

    stream = openai_client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
    first_arrival = None
    for _ in stream:
        if first_arrival is None:
            first_arrival = time.monotonic() - started
    total = time.monotonic() - started

    assert first_arrival is not None
    assert first_arrival < 0.5
    assert total > 0.8
    assert up.inference_requests()[0].gzipped


def test_gzip_split_events_together(up: FakeUpstream, gemini_client: genai.Client) -> None:
    up.default = Behavior(**USAGE, text=MULTIBYTE_TEXT, gzip=True, split_events=True, crlf=True)

    chunks = list(gemini_client.models.generate_content_stream(model="gemini-test", contents="hi"))

    assert "".join(chunk.text for chunk in chunks) == MULTIBYTE_TEXT
    assert chunks[-1].usage_metadata.candidates_token_count == 345


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
        (500, anthropic.InternalServerError, "api_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_error_status(
    up: FakeUpstream,
    anthropic_client: anthropic.Anthropic,
    status: int,
    error_class: type[Exception],
    error_type: str,
    stream: bool,
) -> None:
    up.script(status=status)

    with pytest.raises(error_class) as raised:
        anthropic_client.messages.create(
            model="claude-test", max_tokens=50, messages=PROMPT, stream=stream
        )

    assert raised.value.status_code == status
    assert raised.value.body["type"] == "error"
    assert raised.value.body["error"]["type"] == error_type
    assert "usage" not in raised.value.body
    records = up.wait_for_requests(1)
    assert len(records) == 1
    assert records[0].status == status
    assert records[0].completed


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (429, openai.RateLimitError),
        (529, openai.InternalServerError),
        (500, openai.InternalServerError),
    ],
)
def test_openai_error_status(
    up: FakeUpstream, openai_client: openai.OpenAI, status: int, error_class: type[Exception]
) -> None:
    up.script(status=status)
    up.script(status=status)

    with pytest.raises(error_class) as chat_error:
        openai_client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
    with pytest.raises(error_class) as responses_error:
        openai_client.responses.create(model="gpt-test", input="hi")

    assert chat_error.value.status_code == status
    assert responses_error.value.status_code == status
    assert set(chat_error.value.body) == {"message", "type", "param", "code"}
    if status == 429:
        assert chat_error.value.body["code"] == "rate_limit_exceeded"
    assert len(up.inference_requests()) == 2


@pytest.mark.parametrize(
    ("status", "error_class", "error_status"),
    [
        (429, genai_errors.ClientError, "RESOURCE_EXHAUSTED"),
        (500, genai_errors.ServerError, "INTERNAL"),
    ],
)
def test_gemini_error_status(
    up: FakeUpstream,
    gemini_client: genai.Client,
    status: int,
    error_class: type[Exception],
    error_status: str,
) -> None:
    up.script(status=status)

    with pytest.raises(error_class) as raised:
        gemini_client.models.generate_content(model="gemini-test", contents="hi")

    assert raised.value.code == status
    assert raised.value.status == error_status
    assert raised.value.details == {
        "error": {"code": status, "message": raised.value.message, "status": error_status}
    }
    assert len(up.inference_requests()) == 1


def test_error_type_override(up: FakeUpstream) -> None:
    up.script(status=400, error_type="billing_error")

    with pytest.raises(urllib.error.HTTPError) as raised:
        post_json(up.url + "/v1/messages", {"model": "m", "messages": PROMPT})

    body = json.loads(raised.value.read())
    assert raised.value.code == 400
    assert body["error"]["type"] == "billing_error"


@pytest.mark.parametrize(
    ("call", "error_class"),
    [
        (call_anthropic_json, json.JSONDecodeError),
        (call_anthropic_stream, json.JSONDecodeError),
        (call_chat_json, json.JSONDecodeError),
        (call_chat_stream, json.JSONDecodeError),
        (call_responses_json, json.JSONDecodeError),
        (call_responses_stream, json.JSONDecodeError),
        (call_gemini_json, json.JSONDecodeError),
        (call_gemini_stream, genai_errors.UnknownApiResponseError),
    ],
    ids=ALL_CALLS.keys(),
)
def test_garbled_body_raises(
    up: FakeUpstream, clients: Clients, call: Callable, error_class: type[Exception]
) -> None:
    up.script(garbled=True)

    with pytest.raises(error_class):
        call(clients)

    records = up.inference_requests()
    assert len(records) == 1
    assert records[0].status == 200


@pytest.mark.parametrize(
    ("call", "error_class"),
    [
        (call_anthropic_json, anthropic.APIConnectionError),
        (call_anthropic_stream, anthropic.APIConnectionError),
        (call_chat_json, openai.APIConnectionError),
        (call_chat_stream, openai.APIConnectionError),
        (call_responses_json, openai.APIConnectionError),
        (call_responses_stream, openai.APIConnectionError),
        (call_gemini_json, httpx2.RemoteProtocolError),
        (call_gemini_stream, httpx2.RemoteProtocolError),
    ],
    ids=ALL_CALLS.keys(),
)
def test_drop_after_events_raises(
    up: FakeUpstream, clients: Clients, call: Callable, error_class: type[Exception]
) -> None:
    up.script(drop_after_events=2)

    with pytest.raises(error_class):
        call(clients)

    records = up.inference_requests()
    assert len(records) == 1
    assert records[0].wait()
    assert records[0].dropped
    assert not records[0].completed
    assert not records[0].disconnected
    if records[0].stream:
        assert records[0].events_sent == 2


def test_drop_after_zero_events(up: FakeUpstream, anthropic_client: anthropic.Anthropic) -> None:
    up.script(drop_after_events=0)

    with pytest.raises(anthropic.APIConnectionError):
        list(
            anthropic_client.messages.create(
                model="claude-test", max_tokens=50, messages=PROMPT, stream=True
            )
        )

    assert up.wait_for_requests(1)[0].events_sent == 0


def test_tool_loop_anthropic(up: FakeUpstream, anthropic_client: anthropic.Anthropic) -> None:
    up.default = Behavior(tool_loop=True)

    message = anthropic_client.messages.create(
        model="claude-test", max_tokens=50, messages=PROMPT, tools=[TOOL]
    )
    with anthropic_client.messages.stream(
        model="claude-test", max_tokens=50, messages=PROMPT, tools=[TOOL]
    ) as stream:
        streamed = stream.get_final_message()

    for reply in (message, streamed):
        assert reply.stop_reason == "tool_use"
        assert reply.content[0].type == "tool_use"
        assert reply.content[0].name == "run_shell"
        assert reply.content[0].input == {"command": "echo tokencap"}
        assert reply.content[0].id.startswith("toolu_")
    assert len(up.inference_requests()) == 2


def test_tool_loop_chat(up: FakeUpstream, openai_client: openai.OpenAI) -> None:
    up.default = Behavior(tool_loop=True, tool_name="scripted_tool")

    completion = openai_client.chat.completions.create(
        model="gpt-test", messages=PROMPT, tools=[OPENAI_CHAT_TOOL]
    )
    chunks = list(
        openai_client.chat.completions.create(
            model="gpt-test", messages=PROMPT, tools=[OPENAI_CHAT_TOOL], stream=True
        )
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.name == "scripted_tool"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {
        "command": "echo tokencap"
    }
    streamed_arguments = "".join(
        chunk.choices[0].delta.tool_calls[0].function.arguments or ""
        for chunk in chunks
        if chunk.choices[0].delta.tool_calls
    )
    assert json.loads(streamed_arguments) == {"command": "echo tokencap"}
    assert chunks[0].choices[0].delta.tool_calls[0].function.name == "scripted_tool"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len(up.inference_requests()) == 2


def test_tool_loop_responses(up: FakeUpstream, openai_client: openai.OpenAI) -> None:
    up.default = Behavior(**USAGE, tool_loop=True)

    response = openai_client.responses.create(
        model="gpt-test", input="hi", tools=[OPENAI_RESPONSES_TOOL]
    )
    with openai_client.responses.stream(
        model="gpt-test", input="hi", tools=[OPENAI_RESPONSES_TOOL]
    ) as stream:
        streamed = stream.get_final_response()

    for reply in (response, streamed):
        item = reply.output[0]
        assert item.type == "function_call"
        assert item.name == "run_shell"
        assert json.loads(item.arguments) == {"command": "echo tokencap"}
        assert reply.usage.output_tokens == 345
    assert len(up.inference_requests()) == 2


def test_tool_loop_gemini(up: FakeUpstream, gemini_client: genai.Client) -> None:
    up.default = Behavior(tool_loop=True)
    declaration = genai_types.FunctionDeclaration(name="run_shell", description="Run a command.")
    config = genai_types.GenerateContentConfig(
        tools=[genai_types.Tool(function_declarations=[declaration])],
        automatic_function_calling=genai_types.AutomaticFunctionCallingConfig(disable=True),
    )

    response = gemini_client.models.generate_content(
        model="gemini-test", contents="hi", config=config
    )
    chunks = list(
        gemini_client.models.generate_content_stream(
            model="gemini-test", contents="hi", config=config
        )
    )

    for reply in (response, chunks[-1]):
        assert reply.function_calls[0].name == "run_shell"
        assert reply.function_calls[0].args == {"command": "echo tokencap"}
    assert len(up.inference_requests()) == 2


def test_client_disconnect_recorded(
    up: FakeUpstream, anthropic_client: anthropic.Anthropic
) -> None:
    up.script(slow=True)

    with anthropic_client.messages.stream(
        model="claude-test", max_tokens=50, messages=PROMPT
    ) as stream:
        for position, _ in enumerate(stream):
            if position == 4:
                break

    record = up.inference_requests()[0]
    assert record.wait(timeout=2)
    assert record.disconnected
    assert not record.completed
    assert not record.dropped
    assert 5 <= record.events_sent < 20
    assert record.ended - record.started < 2


def test_stop_during_stream_is_prompt() -> None:
    first_chunk = threading.Event()
    failures: list[BaseException] = []

    with FakeUpstream(slow=True) as own:
        client = make_openai_client(own.url)

        def read_stream() -> None:
            try:
                for _ in client.chat.completions.create(model="m", messages=PROMPT, stream=True):
                    first_chunk.set()
            except openai.APIConnectionError as error:
                failures.append(error)

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert first_chunk.wait(5)
        started = time.monotonic()
        own.stop()
        stop_seconds = time.monotonic() - started
        reader.join(5)
        client.close()

    assert stop_seconds < 2
    assert not reader.is_alive()
    assert len(failures) == 1
    record = own.inference_requests()[0]
    assert record.finished.is_set()
    assert not record.completed
    assert not record.disconnected


def test_stop_with_idle_keepalive_connection() -> None:
    with FakeUpstream() as own:
        client = make_anthropic_client(own.url)
        # The client keeps the connection open for reuse, so a handler thread is blocked reading.
        client.messages.create(model="m", max_tokens=5, messages=PROMPT)

        started = time.monotonic()
        own.stop()
        stop_seconds = time.monotonic() - started
        client.close()

    assert stop_seconds < 2
    assert own.requests[0].completed


def test_concurrent_requests(up: FakeUpstream, clients: Clients) -> None:
    up.default = Behavior(**USAGE, delay=0.02)
    calls = list(ALL_CALLS.values()) * 2
    results: list[tuple[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(call: Callable[[Clients], tuple[str, Any]]) -> None:
        try:
            result = call(clients)
        except Exception as error:  # Collected, so the assert shows every failure.
            with lock:
                errors.append(error)
            return
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert errors == []
    assert len(results) == len(calls)
    assert all(output_tokens == 345 for _, output_tokens in results)
    records = up.wait_for_requests(len(calls))
    assert len(records) == len(calls)
    assert [r.route for r in records if not r.completed] == []
    assert len({record.response_id for record in records}) == len(calls)


# Scripting and records ------------------------------------------------------------------------


def test_script_queue_then_default(up: FakeUpstream, anthropic_client: anthropic.Anthropic) -> None:
    up.script(Behavior(output_tokens=1), Behavior(output_tokens=2))
    up.script(output_tokens=3)

    outputs = [
        anthropic_client.messages.create(model="m", max_tokens=5, messages=PROMPT).usage
        for _ in range(4)
    ]

    assert [usage.output_tokens for usage in outputs] == [1, 2, 3, 345]
    # Keyword scripting starts from the default, so the other counts stay as configured.
    assert outputs[2].input_tokens == 1200
    assert outputs[0].input_tokens == 25
    assert up.pending() == 0


def test_script_reserved_for_api(up: FakeUpstream, clients: Clients) -> None:
    up.script(api=API_GEMINI, output_tokens=9)
    up.script(api=API_OPENAI_CHAT, status=429)

    message = clients.anthropic.messages.create(model="m", max_tokens=5, messages=PROMPT)
    gemini = clients.gemini.models.generate_content(model="gemini-test", contents="hi")

    assert message.usage.output_tokens == 345
    assert gemini.usage_metadata.candidates_token_count == 9
    assert up.pending() == 1
    assert up.pending(API_ANTHROPIC) == 0
    assert up.pending(API_OPENAI_CHAT) == 1


def test_script_rejects_unknown_api(up: FakeUpstream) -> None:
    with pytest.raises(ValueError, match="unknown api"):
        up.script(api="cohere", status=500)


def test_non_inference_routes(up: FakeUpstream) -> None:
    head = urllib.request.Request(up.url + "/", method="HEAD")
    with urllib.request.urlopen(head, timeout=5) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as missing:
        post_json(up.url + "/v1/embeddings", {})

    assert missing.value.code == 404
    assert "no route" in json.loads(missing.value.read())["error"]["message"]
    assert [record.route for record in up.requests] == ["root", "not_found"]
    assert up.inference_requests() == []


def test_invalid_json_body_rejected(up: FakeUpstream) -> None:
    request = urllib.request.Request(up.url + "/v1/messages", data=b"not json", method="POST")

    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=5)

    assert raised.value.code == 400
    assert json.loads(raised.value.read())["error"]["type"] == "invalid_request_error"
    assert up.inference_requests()[0].body is None
    assert up.inference_requests()[0].behavior is None


def test_clear_forgets_records_and_queue(up: FakeUpstream) -> None:
    up.script(status=500)
    post_json(up.url + "/v1/messages/count_tokens", {"model": "m", "messages": PROMPT})

    up.clear()

    assert up.requests == []
    assert up.pending() == 0


def test_behavior_validation() -> None:
    with pytest.raises(ValueError, match="output_token_steps"):
        Behavior(output_tokens=10, output_token_steps=(5, 8))
    with pytest.raises(ValueError, match="status"):
        Behavior(status=302)
    with pytest.raises(ValueError, match="events"):
        Behavior(events=0)


def test_slow_raises_events_and_delay() -> None:
    behavior = Behavior(slow=True)

    assert behavior.stream_events >= 400
    assert behavior.event_delay >= 0.05
    assert Behavior(events=3).stream_events == 3


# Schema-shaped JSON ---------------------------------------------------------------------------

SCORE_SCHEMA = {
    "type": "object",
    "properties": {"reason": {"type": "string"}, "score": {"type": "integer", "minimum": 1}},
    "required": ["reason", "score"],
}
SCHEMA_USAGE = Behavior(input_tokens=7, output_tokens=3)


def test_schema_reply_gemini_router(up: FakeUpstream, gemini_client: genai.Client) -> None:
    up.schema_behavior = SCHEMA_USAGE
    up.script(Behavior(text="main answer"))
    # Gemini CLI writes its schema with Gemini's upper-case type names.
    schema = {
        "type": "OBJECT",
        "properties": {"reason": {"type": "STRING"}, "score": {"type": "INTEGER"}},
        "required": ["reason", "score"],
    }
    config = genai_types.GenerateContentConfig(
        response_mime_type="application/json", response_json_schema=schema
    )

    response = gemini_client.models.generate_content(
        model="gemini-test", contents="rate this", config=config
    )

    assert json.loads(response.text) == {"reason": "fake upstream", "score": 1}
    assert response.usage_metadata.prompt_token_count == 7
    assert response.usage_metadata.candidates_token_count == 3
    (record,) = up.inference_requests()
    assert record.schema_reply
    assert up.pending() == 1


def test_schema_reply_leaves_script_for_main_calls(
    up: FakeUpstream, gemini_client: genai.Client
) -> None:
    up.schema_behavior = SCHEMA_USAGE
    up.script(Behavior(text="main answer"))
    config = genai_types.GenerateContentConfig(
        response_mime_type="application/json", response_json_schema=SCORE_SCHEMA
    )

    gemini_client.models.generate_content(model="gemini-test", contents="rate", config=config)
    response = gemini_client.models.generate_content(model="gemini-test", contents="answer")

    assert response.text == "main answer"
    assert [r.schema_reply for r in up.inference_requests()] == [True, False]


def test_schema_reply_openai_chat(up: FakeUpstream, openai_client: openai.OpenAI) -> None:
    up.schema_behavior = SCHEMA_USAGE
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCORE_SCHEMA}}

    completion = openai_client.chat.completions.create(
        model="gpt-test", messages=PROMPT, response_format=response_format
    )

    assert json.loads(completion.choices[0].message.content) == {
        "reason": "fake upstream",
        "score": 1,
    }
    assert completion.usage.prompt_tokens == 7


def test_schema_reply_openai_responses(up: FakeUpstream, openai_client: openai.OpenAI) -> None:
    up.schema_behavior = SCHEMA_USAGE
    text = {"format": {"type": "json_schema", "name": "s", "schema": SCORE_SCHEMA}}

    response = openai_client.responses.create(model="gpt-test", input="rate", text=text)

    assert json.loads(response.output_text) == {"reason": "fake upstream", "score": 1}
    assert response.usage.output_tokens == 3


@pytest.mark.parametrize(
    "field",
    [
        {"output_format": {"type": "json_schema", "schema": SCORE_SCHEMA}},
        {"output_config": {"format": {"type": "json_schema", "schema": SCORE_SCHEMA}}},
    ],
)
def test_schema_reply_anthropic(up: FakeUpstream, field: dict[str, Any]) -> None:
    up.schema_behavior = SCHEMA_USAGE
    payload = {"model": "claude-test", "max_tokens": 50, "messages": PROMPT, **field}

    _, body = post_json(up.url + "/v1/messages", payload)

    message = json.loads(body)
    assert json.loads(message["content"][0]["text"]) == {"reason": "fake upstream", "score": 1}
    assert message["usage"]["input_tokens"] == 7


def test_schema_request_without_schema_behavior(
    up: FakeUpstream, openai_client: openai.OpenAI
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCORE_SCHEMA}}

    completion = openai_client.chat.completions.create(
        model="gpt-test", messages=PROMPT, response_format=response_format
    )

    assert completion.choices[0].message.content == Behavior().text
    assert not up.inference_requests()[0].schema_reply


def test_schema_reply_ignores_tool_loop(up: FakeUpstream, openai_client: openai.OpenAI) -> None:
    up.schema_behavior = replace(SCHEMA_USAGE, tool_loop=True)
    text = {"format": {"type": "json_schema", "name": "s", "schema": SCORE_SCHEMA}}

    response = openai_client.responses.create(model="gpt-test", input="rate", text=text)

    assert json.loads(response.output_text)["score"] == 1


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "STRING", "enum": ["low", "high"]}, "low"),
        ({"const": 3}, 3),
        ({"type": "number", "minimum": 0.5}, 0.5),
        ({"type": ["null", "boolean"]}, False),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, [1, 1]),
        ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, 1),
        (
            {
                "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
                "required": ["b"],
            },
            {"b": 1},
        ),
        (
            {"type": "object", "properties": {"nested": SCORE_SCHEMA}},
            {"nested": {"reason": "fake upstream", "score": 1}},
        ),
    ],
)
def test_schema_instance(schema: dict[str, Any], expected: Any) -> None:
    assert _schema_instance(schema) == expected
