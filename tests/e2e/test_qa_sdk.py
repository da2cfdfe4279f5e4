"""QA of the official openai SDK's surface against leafwire's cloud models, as a developer who only switched
``base_url`` from api.openai.com to leafwire would use it.

The stack is test_cloud_fidelity.py's (its providers and helpers; its breaker kept shut here): the openai client
-> gateway -> router -> cloud-adapter (3 tries, tiny backoff) -> fake OpenAI-compatible and Anthropic providers
answering what each test scripts. Covered: ``chat.completions.parse`` against an OpenAI-compatible model and
the stream helper's events (``content.delta``/``content.done`` with the parsed object,
``tool_calls.function.arguments.done`` of a ``pydantic_function_tool``) against both kinds; ``with_raw_response``
and ``with_streaming_response`` headers; the SDK's own retries against leafwire's errors (how many provider
calls a 429, a 400 and a 502 make with ``max_retries=2``) and the exception classes with ``code``/``param``/
``body``; ``models.list``/``models.retrieve``; ``AsyncOpenAI`` with 20 concurrent streams, one closed early;
``extra_headers``/``extra_body``; a per-request ``timeout`` (the provider call is abandoned too); ``n``,
``stop``, ``seed``; legacy ``completions.create``; errors mid-stream. One finding (two tests), fixed since: with a
JSON answer asked of Claude, its text blocks were dropped from the whole answer's content but streamed as content
(words before the answer tool's JSON, a refusal's words), so the stream helper failed parsing them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import openai
import pydantic
import pytest
from openai import pydantic_function_tool

from tests.e2e.test_cloud_fidelity import (
    THOUGHT,
    USER,
    QAStack,
    anthropic_events,
    anthropic_message,
    openai_completion,
    openai_events,
    qa_stack,
)
from tests.fakes import Fault
from tests.support import NatsServer, eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def qa(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QAStack]:
    """test_cloud_fidelity.py's stack, its breaker's error rate out of the way too: this module's retry checks
    fail a dozen tries a minute on purpose, which would open it (and turn later answers into 503s)."""
    yield from qa_stack(nats_server, tmp_path_factory, "qa-sdk", LW_CLOUD_BREAKER_MIN_CALLS="1000")


@pytest.fixture(autouse=True)
def _fresh(qa: QAStack) -> None:
    qa.oai.reset()
    qa.claude.reset()


class Shift(pydantic.BaseModel):
    line: int
    foreman: str


class Lookup(pydantic.BaseModel):
    """Find a person by e-mail."""

    email: str


def retrying(qa: QAStack, retries: int = 2) -> openai.OpenAI:
    return openai.OpenAI(base_url=qa.base, api_key="key-acme", max_retries=retries, timeout=20)


def ask(client: openai.OpenAI, model: str, stream: bool, **kw: Any) -> None:
    """A chat request (a stream read to its end)."""
    answer = client.chat.completions.create(model=model, messages=USER, stream=stream, **kw)
    if stream:
        list(answer)  # type: ignore[call-overload]


def parsed(qa: QAStack, stream: bool, **kw: Any) -> Any:
    """parse()'s completion, or the stream helper's final one."""
    if not stream:
        return qa.client().chat.completions.parse(**kw)
    with qa.client().chat.completions.stream(**kw) as helper:
        for _ in helper:
            pass
        return helper.get_final_completion()


# -- structured outputs and the stream helper

def test_parse_against_an_openai_compatible_model(qa: QAStack) -> None:
    qa.oai.script(Fault.raw(body=openai_completion({"role": "assistant", "content": '{"line": 3, "foreman": "Åsa"}'},
                                                   "stop")))
    r = qa.client().chat.completions.parse(model="oai/gpt", messages=USER, response_format=Shift)
    assert r.choices[0].message.parsed == Shift(line=3, foreman="Åsa")
    sent = qa.oai.calls[0].body["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["strict"] is True
    assert sent["json_schema"]["name"] == "Shift"


@pytest.mark.parametrize("model", ["oai/gpt", "claude/sonnet"])
def test_stream_helper_content_events_carry_the_parsed_object(qa: QAStack, model: str) -> None:
    text = '{"line": 3, "foreman": "Åsa"}'
    if model == "oai/gpt":
        qa.oai.script(Fault.raw(events=openai_events([{"role": "assistant", "content": ""},
                                                      {"content": text[:9]}, {"content": text[9:]}], "stop")))
    else:
        qa.claude.script(Fault.raw(events=anthropic_events([{"type": "tool_use", "id": "toolu_9",
                                                             "name": "json_answer",
                                                             "input": json.loads(text)}], "tool_use")))
    deltas, done = [], []
    with qa.client().chat.completions.stream(model=model, messages=USER, response_format=Shift) as stream:
        for ev in stream:
            if ev.type == "content.delta":
                deltas.append(ev.delta)
            elif ev.type == "content.done":
                done.append(ev.parsed)
        final = stream.get_final_completion()
    assert json.loads("".join(deltas)) == {"line": 3, "foreman": "Åsa"}
    assert done == [Shift(line=3, foreman="Åsa")]
    assert final.choices[0].message.parsed == Shift(line=3, foreman="Åsa")
    assert final.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model", ["oai/gpt", "claude/sonnet"])
def test_stream_helper_parses_a_pydantic_function_tool_call(qa: QAStack, model: str) -> None:
    if model == "oai/gpt":
        qa.oai.script(Fault.raw(events=openai_events([
            {"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "Lookup", "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"email": '}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '"a@b.c"}'}}]}], "tool_calls")))
    else:
        qa.claude.script(Fault.raw(events=anthropic_events([{"type": "tool_use", "id": "toolu_1", "name": "Lookup",
                                                             "input": {"email": "a@b.c"}}], "tool_use")))
    done = []
    with qa.client().chat.completions.stream(model=model, messages=USER,
                                             tools=[pydantic_function_tool(Lookup)]) as stream:
        for ev in stream:
            if ev.type == "tool_calls.function.arguments.done":
                done.append((ev.name, ev.parsed_arguments))
        final = stream.get_final_completion()
    assert done == [("Lookup", Lookup(email="a@b.c"))]
    call = (final.choices[0].message.tool_calls or [])[0]
    assert call.function.parsed_arguments == Lookup(email="a@b.c")  # type: ignore[union-attr]
    assert final.choices[0].finish_reason == "tool_calls"


def test_parse_of_a_pydantic_function_tool_call_whole(qa: QAStack) -> None:
    qa.claude.script(Fault.raw(body=anthropic_message(
        [{"type": "tool_use", "id": "toolu_1", "name": "Lookup", "input": {"email": "a@b.c"}}], "tool_use")))
    r = qa.client().chat.completions.parse(model="claude/sonnet", messages=USER,
                                           tools=[pydantic_function_tool(Lookup)])
    call = (r.choices[0].message.tool_calls or [])[0]
    assert call.function.parsed_arguments == Lookup(email="a@b.c")  # type: ignore[union-attr]


CUT = [{"type": "tool_use", "id": "toolu_9", "name": "json_answer", "input": {"line": 3}}]
REFUSED = [{"type": "text", "text": "I can't help with that."}]


@pytest.mark.parametrize(("blocks", "reason", "stream", "error"), [
    (CUT, "max_tokens", False, openai.LengthFinishReasonError),
    (CUT, "max_tokens", True, openai.LengthFinishReasonError),
    (REFUSED, "refusal", False, openai.ContentFilterFinishReasonError),
    (REFUSED, "refusal", True, openai.ContentFilterFinishReasonError),
], ids=["cut", "cut-streamed", "refused", "refused-streamed"])
def test_a_cut_or_refused_claude_structured_answer_raises_the_sdks_finish_errors(
        qa: QAStack, blocks: list[Any], reason: str, stream: bool, error: type[Exception]) -> None:
    """parse() and the stream helper raise LengthFinishReasonError when the answer was cut (max_tokens), and
    ContentFilterFinishReasonError when Claude refused (finish content_filter). A refusal's words are the
    message's ``refusal``, as OpenAI's structured outputs have them, whole or streamed: streamed as content
    deltas (as they were), the helper, parsing content as partial JSON as it comes, failed on them with a
    ValueError first."""
    qa.claude.script(Fault.raw(events=anthropic_events(blocks, reason)) if stream
                     else Fault.raw(body=anthropic_message(blocks, reason)))
    with pytest.raises(error):
        parsed(qa, stream, model="claude/sonnet", messages=USER, response_format=Shift)


async def test_the_async_stream_helper_parses(qa: QAStack) -> None:
    qa.claude.script(Fault.raw(events=anthropic_events([{"type": "tool_use", "id": "toolu_9", "name": "json_answer",
                                                         "input": {"line": 3, "foreman": "Åsa"}}], "tool_use")))
    client = openai.AsyncOpenAI(base_url=qa.base, api_key="key-acme", max_retries=0, timeout=20)
    try:
        async with client.chat.completions.stream(model="claude/sonnet", messages=USER,
                                                  response_format=Shift) as stream:
            done = [ev.parsed async for ev in stream if ev.type == "content.done"]
    finally:
        await client.close()
    assert done == [Shift(line=3, foreman="Åsa")]


# -- raw and streaming responses

def test_raw_response_headers_and_parse(qa: QAStack) -> None:
    raw = qa.client().chat.completions.with_raw_response.create(model="oai/gpt", messages=USER)
    assert raw.status_code == 200
    assert raw.headers["x-request-id"]
    leafwire = {k for k in raw.headers if k.lower().startswith("x-leafwire-")}
    assert leafwire, f"no x-leafwire-* header: {dict(raw.headers)}"
    r = raw.parse()
    assert r.choices[0].message.content == "pong hello there"
    assert raw.headers["x-request-id"] in r.id


def test_streaming_response_headers_and_lines(qa: QAStack) -> None:
    with qa.client().chat.completions.with_streaming_response.create(model="claude/sonnet", messages=USER,
                                                                     stream=True) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"]
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    text = "".join((json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                   for line in lines[:-1])
    assert text == "pong hello there"


# -- the SDK's own retries and exception classes

def test_a_429_is_retried_by_the_sdk_on_top_of_the_adapters_tries(qa: QAStack) -> None:
    """docs/cloud.md: a 429 upstream_rate_limited carries no x-should-retry: false, its Retry-After says when
    a retry is worth it: the adapter's 3 tries, times the SDK's 1 + 2."""
    qa.oai.script(*[Fault.error(429, retry_after_ms="10")] * 9)
    with pytest.raises(openai.RateLimitError) as exc:
        retrying(qa).chat.completions.create(model="oai/gpt", messages=USER)
    assert exc.value.code == "upstream_rate_limited"
    assert exc.value.response.headers.get("retry-after")
    assert exc.value.response.headers.get("x-should-retry") != "false"
    assert len(qa.oai.calls) == 9


def test_a_400_is_not_retried_and_keeps_code_and_param(qa: QAStack) -> None:
    qa.oai.script(*[Fault.raw(400, {"error": {"message": "This model's maximum context length is 8192 tokens.",
                                              "type": "invalid_request_error", "param": "messages",
                                              "code": "context_length_exceeded"}})] * 3)
    with pytest.raises(openai.BadRequestError) as exc:
        retrying(qa).chat.completions.create(model="oai/gpt", messages=USER)
    assert (exc.value.code, exc.value.param, exc.value.type) == ("context_length_exceeded", "messages",
                                                                 "invalid_request_error")
    assert isinstance(exc.value.body, dict)  # the SDK's body is the error object, OpenAI's shape
    assert exc.value.body["message"].endswith("maximum context length is 8192 tokens.")
    assert len(qa.oai.calls) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_502_after_the_adapters_tries_is_not_multiplied_by_the_sdk(qa: QAStack, stream: bool) -> None:
    """docs/cloud.md: a 502 of a provider the adapter gave up on says x-should-retry: false (a stream failing
    before its first byte too): 3 calls, not 9."""
    qa.oai.script(*[Fault.error(500)] * 9)
    with pytest.raises(openai.InternalServerError) as exc:
        ask(retrying(qa), "oai/gpt", stream)
    assert exc.value.status_code == 502
    assert exc.value.code == "upstream_error"
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert len(qa.oai.calls) == 3


def test_a_failed_claude_n_is_not_multiplied_by_the_sdk(qa: QAStack) -> None:
    """Claude's n is a call a choice (the gateway's fan-out): its 502 says x-should-retry: false as well."""
    qa.claude.script(*[Fault.error(500)] * 18)
    with pytest.raises(openai.InternalServerError) as exc:
        retrying(qa).chat.completions.create(model="claude/sonnet", messages=USER, n=2)
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert 3 <= len(qa.claude.calls) <= 6  # one round (a failed choice may end its sibling's), not three


@pytest.mark.parametrize("model", ["oai/gpt", "claude/sonnet"])
def test_an_error_mid_stream_raises_an_api_error(qa: QAStack, model: str) -> None:
    (qa.oai if model == "oai/gpt" else qa.claude).script(Fault.stream_error(5, "boom"))
    got: list[str] = []
    with pytest.raises(openai.APIError) as exc, retrying(qa).chat.completions.stream(
            model=model, messages=[{"role": "user", "content": "a b c d e f g"}]) as stream:
        got.extend(ev.delta for ev in stream if ev.type == "content.delta")
    assert "boom" in exc.value.message
    assert exc.value.code == "upstream_error"
    assert "".join(got).startswith("pong a")


def test_a_wrong_leafwire_key_is_an_authentication_error(qa: QAStack) -> None:
    with pytest.raises(openai.AuthenticationError) as exc:
        qa.client("key-nobody").chat.completions.create(model="oai/gpt", messages=USER)
    assert exc.value.status_code == 401
    assert isinstance(exc.value.body, dict)
    assert exc.value.body.get("message")
    assert qa.oai.calls == []


def test_an_unknown_cloud_model_is_a_not_found_error(qa: QAStack) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        retrying(qa).chat.completions.create(model="oai/nope", messages=USER)
    assert exc.value.code == "model_not_found"
    assert isinstance(exc.value.body, dict)
    assert "oai/nope" in exc.value.body["message"]


def test_an_invalid_request_names_its_param(qa: QAStack) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        qa.client().chat.completions.create(model="claude/sonnet", messages=USER, temperature=1.5)
    assert exc.value.param == "temperature"
    assert qa.claude.calls == []


# -- models

def test_models_list_and_retrieve_cloud_models(qa: QAStack) -> None:
    client = qa.client()
    ids = eventually(lambda: (lambda s: s if {"oai/gpt", "claude/sonnet", "claude/opus"} <= s else None)(
        {m.id for m in client.models.list()}), 10, "the cloud models listed")
    assert {"oai/gpt", "claude/sonnet"} <= ids
    model = client.models.retrieve("claude/sonnet")
    assert (model.id, model.object) == ("claude/sonnet", "model")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("claude/nope")


# -- AsyncOpenAI

async def test_twenty_concurrent_async_streams_one_closed_early(qa: QAStack) -> None:
    client = openai.AsyncOpenAI(base_url=qa.base, api_key="key-acme", max_retries=0, timeout=20)

    async def one(i: int) -> str:
        stream = await client.chat.completions.create(
            model="oai/gpt" if i % 2 else "claude/sonnet", stream=True,
            messages=[{"role": "user", "content": f"number {i} of twenty"}])
        text = ""
        async for chunk in stream:
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            if i == 0 and text:
                await stream.close()
                return "closed"
        return text

    try:
        got = await asyncio.gather(*(one(i) for i in range(20)))
    finally:
        await client.close()
    assert got[0] == "closed"
    assert got[1:] == [f"pong number {i} of twenty" for i in range(1, 20)]


# -- request options

def test_extra_headers_and_a_provider_specific_extra_body_field(qa: QAStack) -> None:
    raw = qa.client().chat.completions.with_raw_response.create(
        model="oai/gpt", messages=USER, extra_headers={"x-request-id": "mine-123"},
        extra_body={"repetition_penalty": 1.1})
    raw.parse()
    assert qa.oai.calls[0].body["repetition_penalty"] == 1.1
    qa.client().chat.completions.create(model="claude/sonnet", messages=USER, extra_body={"top_k": 5})
    assert qa.claude.calls[0].body["top_k"] == 5


def test_stop_and_seed_reach_the_providers(qa: QAStack) -> None:
    qa.client().chat.completions.create(model="oai/gpt", messages=USER, stop=["END"], seed=7)
    assert (qa.oai.calls[0].body["stop"], qa.oai.calls[0].body["seed"]) == (["END"], 7)
    qa.client().chat.completions.create(model="claude/sonnet", messages=USER, stop="END", seed=7)
    assert qa.claude.calls[0].body["stop_sequences"] == ["END"]
    assert "seed" not in qa.claude.calls[0].body


@pytest.mark.parametrize("model", ["oai/gpt", "claude/sonnet"])
def test_n_two_gives_two_choices(qa: QAStack, model: str) -> None:
    fake = qa.oai if model == "oai/gpt" else qa.claude
    fake.script(Fault.ok("first"), Fault.ok("second"))
    r = qa.client().chat.completions.create(model=model, messages=USER, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert sorted(c.message.content or "" for c in r.choices) == ["first", "second"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["oai/gpt", "claude/sonnet"])
def test_a_short_sdk_timeout_abandons_the_provider_call(qa: QAStack, monkeypatch: pytest.MonkeyPatch, model: str,
                                                        stream: bool) -> None:
    fake = qa.oai if model == "oai/gpt" else qa.claude
    cancelled: list[str] = []
    receive = fake._receive

    async def watched(request: Any) -> Any:
        try:
            return await receive(request)
        except asyncio.CancelledError:
            cancelled.append(request.path)
            raise

    monkeypatch.setattr(fake, "_receive", watched)
    fake.script(Fault.slow(1.8))
    with pytest.raises(openai.APITimeoutError):
        ask(qa.client(), model, stream, timeout=0.8)
    eventually(lambda: cancelled or None, 6, "the provider's connection closed")
    assert len(fake.calls) == 1


def test_a_stream_closed_early_ends_the_provider_stream(qa: QAStack) -> None:
    qa.claude.script(Fault.drip(0.2, text="a b c d e f g h i j k l m n o p q r s t"))
    stream = qa.client().chat.completions.create(model="claude/sonnet", messages=USER, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    eventually(lambda: qa.claude.disconnects or None, 6, "the provider's stream closed")


def test_legacy_completions_with_a_cloud_model(qa: QAStack) -> None:
    r = qa.client().completions.create(model="oai/gpt", prompt="hello there", max_tokens=5)
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert r.usage is not None
    assert r.usage.total_tokens > 0
    chunks = list(qa.client().completions.create(model="claude/sonnet", prompt="hello there", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)


# -- findings

def test_streamed_structured_output_of_a_thinking_claude_is_only_the_json(qa: QAStack) -> None:
    """With thinking on, the answer tool is offered, not forced, so Claude may write a few words before calling
    it. The whole answer's content is the tool's input alone ("the JSON asked for, not the words around it"),
    and so is the stream's: the words were relayed as content deltas before the JSON, so the content was not
    JSON and the openai client's stream helper (``chat.completions.stream(response_format=...)``) failed."""
    blocks = [THOUGHT, {"type": "text", "text": "Let me format that."},
              {"type": "tool_use", "id": "toolu_9", "name": "json_answer", "input": {"line": 3, "foreman": "Åsa"}}]
    qa.claude.script(Fault.raw(body=anthropic_message(blocks, "tool_use")),
                     Fault.raw(events=anthropic_events(blocks, "tool_use")))
    whole = qa.client().chat.completions.parse(model="claude/sonnet", messages=USER, response_format=Shift,
                                               reasoning_effort="low")
    assert whole.choices[0].message.parsed == Shift(line=3, foreman="Åsa")  # passes
    with qa.client().chat.completions.stream(model="claude/sonnet", messages=USER, response_format=Shift,
                                             reasoning_effort="low") as stream:
        for _ in stream:  # the helper parses the partial content as JSON as it comes
            pass
        final = stream.get_final_completion()
    assert json.loads(final.choices[0].message.content or "") == json.loads(whole.choices[0].message.content or "")
    assert final.choices[0].message.parsed == Shift(line=3, foreman="Åsa")
