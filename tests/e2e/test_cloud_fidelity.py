"""What a provider's answer carries reaches the caller, and what the caller sent is masked before it leaves:
the official openai client -> gateway -> router -> cloud-adapter -> fake providers (an OpenAI-compatible one
and an Anthropic one) answering exactly what a test scripts (``Fault.raw``: a JSON body, or server-sent
events as written), so tool calls, stop reasons, log probabilities and error shapes can be driven.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest

from tests import support
from tests.fakes import FakeProvider, Fault
from tests.support import NatsServer, Service, cloud_router_env, eventually, running

pytestmark = pytest.mark.e2e
SITE = "qa"
API_KEYS = "key-acme:acme,key-globex:globex"
USER: list[Any] = [{"role": "user", "content": "hello there"}]


def sse(name: str | None, data: Any) -> str:
    """One server-sent event (``event:`` line when named)."""
    text = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {name}\n" if name else "") + f"data: {text}\n\n"


def anthropic_message(content: list[dict[str, Any]], stop_reason: str, **usage: int) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": content,
            "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5, **usage}}


def anthropic_events(blocks: list[dict[str, Any]], stop_reason: str) -> list[str]:
    """A Messages stream of ``blocks`` (text blocks in two pieces, tool_use input in two JSON pieces)."""
    out = [sse("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
        "stop_reason": None, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        sse("ping", {"type": "ping"})]
    for i, block in enumerate(blocks):
        if block["type"] == "thinking":  # its text in two pieces, then its signature
            out.append(sse("content_block_start", {"type": "content_block_start", "index": i,
                                                   "content_block": {"type": "thinking", "thinking": ""}}))
            text = block["thinking"]
            for piece in (text[: len(text) // 2], text[len(text) // 2:]):
                out.append(sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                       "delta": {"type": "thinking_delta", "thinking": piece}}))
            out.append(sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                   "delta": {"type": "signature_delta",
                                                             "signature": block["signature"]}}))
        elif block["type"] == "text":
            out.append(sse("content_block_start", {"type": "content_block_start", "index": i,
                                                   "content_block": {"type": "text", "text": ""}}))
            text = block["text"]
            for piece in (text[: len(text) // 2], text[len(text) // 2:]):
                out.append(sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                       "delta": {"type": "text_delta", "text": piece}}))
        else:
            out.append(sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}}))
            args = json.dumps(block["input"])
            for piece in (args[: len(args) // 2], args[len(args) // 2:]):
                out.append(sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                       "delta": {"type": "input_json_delta", "partial_json": piece}}))
        out.append(sse("content_block_stop", {"type": "content_block_stop", "index": i}))
    out += [sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason,
                                                                    "stop_sequence": None},
                                  "usage": {"output_tokens": 5}}),
            sse("message_stop", {"type": "message_stop"})]
    return out


def openai_completion(message: dict[str, Any], finish: str, **choice: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "gpt-x",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None, **choice}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def openai_chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None,
                 **choice: Any) -> str:
    data: dict[str, Any] = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
                            "choices": [] if delta is None else [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish, **choice}]}
    if usage is not None:
        data["usage"] = usage
    return sse(None, data)


def openai_events(deltas: list[dict[str, Any]], finish: str) -> list[str]:
    return [*(openai_chunk(d) for d in deltas), openai_chunk({}, finish),
            openai_chunk(None, usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}),
            "data: [DONE]\n\n"]


def providers_file(path: Path, oai: FakeProvider, claude: FakeProvider) -> Path:
    def entry(name: str, fake: FakeProvider, models: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "kind": "openai-compatible" if fake.kind == "openai" else "anthropic",
                "base_url": fake.url, "local": True, "models": models,
                "timeouts": {"connect_s": 2, "first_byte_s": 2, "total_s": 10}}
    path.write_text(json.dumps({"providers": [
        entry("oai", oai, {"gpt": {"upstream": "gpt-x", "input_per_mtok": 1, "output_per_mtok": 1}}),
        entry("claude", claude, {"sonnet": {"upstream": "claude-x", "max_tokens": 256},
                                 "opus": {"upstream": "claude-y", "max_tokens": 256, "input_per_mtok": 3,
                                          "output_per_mtok": 15, "cached_input_per_mtok": 0.3,
                                          "cache_write_input_per_mtok": 3.75, "cache_write_1h_input_per_mtok": 6}}),
    ]}))
    return path


@dataclass
class QAStack:
    gateway: Service
    oai: FakeProvider
    claude: FakeProvider

    @property
    def base(self) -> str:
        return f"{self.gateway.base}/v1"

    def client(self, key: str = "key-acme", **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base, api_key=key, max_retries=0, timeout=20, **kw)

    def post(self, body: dict[str, Any], key: str = "key-acme") -> httpx.Response:
        return httpx.post(f"{self.base}/chat/completions", json=body, timeout=20,
                          headers={"Authorization": f"Bearer {key}"})


def qa_stack(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory, name: str = "qa",
             **adapter_env: str) -> Iterator[QAStack]:
    """This module's stack (``adapter_env``: more settings of the adapter), for a module fixture."""
    oai, claude = FakeProvider("openai").start(), FakeProvider("anthropic").start()
    file = providers_file(tmp_path_factory.mktemp(name) / "providers.yaml", oai, claude)
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE}
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(file), "LW_CLOUD_BACKOFF_BASE_S": "0.01",
                                        "LW_CLOUD_BACKOFF_CAP_S": "0.05", "LW_CLOUD_BREAKER_FAILURES": "1000",
                                        **adapter_env})
    router = Service("router", {**env, **cloud_router_env(file.parent)})
    gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": API_KEYS})
    try:
        with running(adapter, router, gateway):
            yield QAStack(gateway, oai, claude)
    finally:
        oai.stop()
        claude.stop()


@pytest.fixture(scope="module")
def qa(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QAStack]:
    yield from qa_stack(nats_server, tmp_path_factory)


@pytest.fixture(autouse=True)
def _fresh(qa: QAStack) -> None:
    qa.oai.reset()
    qa.claude.reset()


EMAIL, PHONE = "jane.doe@plant.example", "+44 20 7946 0958"
TOOLS: list[Any] = [{"type": "function", "function": {"name": "lookup", "description": "find a person",
                                           "parameters": {"type": "object",
                                                          "properties": {"email": {"type": "string"}}}}}]
LOGPROBS = {"content": [{"token": "ok", "logprob": -0.25, "bytes": [111, 107], "top_logprobs": []}], "refusal": None}


def streamed_tool_arguments(chunks: list[Any]) -> list[str]:
    """The arguments of each tool call of a stream, assembled by index as OpenAI clients do."""
    args: dict[int, str] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            args[call.index] = args.get(call.index, "") + (call.function.arguments or "")
    return [args[i] for i in sorted(args)]


# -- masking: "Prompts sent to a cloud target are masked first (the original never leaves the site)"

@pytest.mark.parametrize("model", ["oai/gpt", "claude/sonnet"])
def test_tool_call_arguments_are_masked_before_leaving_the_site(qa: QAStack, model: str) -> None:
    """A tool round trip whose earlier tool call carried an e-mail address and a phone number: the
    provider must not see them, as it does not see them in the messages' text."""
    messages: list[Any] = [{"role": "user", "content": "find the customer I mailed"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "lookup", "arguments": json.dumps({"email": EMAIL, "phone": PHONE})}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "found one customer"}]
    qa.client().chat.completions.create(model=model, messages=messages, tools=TOOLS)
    fake = qa.oai if model.startswith("oai/") else qa.claude
    sent = json.dumps(fake.calls[-1].body)
    assert EMAIL not in sent
    assert PHONE not in sent


def test_user_and_name_fields_are_masked_before_leaving_the_site(qa: QAStack) -> None:
    """`user` is commonly the end user's e-mail address (OpenAI's own examples hash it for that reason); the
    text of the same address in a message is masked, the field is sent as is (Anthropic: metadata.user_id)."""
    messages: list[Any] = [{"role": "user", "content": f"I am {EMAIL}", "name": EMAIL}]
    for model, fake in (("oai/gpt", qa.oai), ("claude/sonnet", qa.claude)):
        qa.client().chat.completions.create(model=model, messages=messages, user=EMAIL)
        sent = json.dumps(fake.calls[-1].body)
        assert "[EMAIL]" in sent  # the message text was masked...
        assert EMAIL not in sent  # ...and nothing else carries it


# -- OpenAI-compatible providers: what the provider answered must reach the caller

def test_logprobs_of_an_openai_compatible_provider_reach_the_caller(qa: QAStack) -> None:
    qa.oai.script(Fault.raw(body=openai_completion({"role": "assistant", "content": "ok"}, "stop", logprobs=LOGPROBS)))
    r = qa.client().chat.completions.create(model="oai/gpt", messages=USER, logprobs=True,
                                            top_logprobs=1)
    assert qa.oai.calls[-1].body["logprobs"] is True  # asked of the provider
    assert r.choices[0].logprobs is not None
    assert r.choices[0].logprobs.content is not None
    assert r.choices[0].logprobs.content[0].logprob == -0.25


def test_streamed_logprobs_of_an_openai_compatible_provider_reach_the_caller(qa: QAStack) -> None:
    qa.oai.script(Fault.raw(events=[openai_chunk({"role": "assistant", "content": ""}),
                                openai_chunk({"content": "ok"}, logprobs=LOGPROBS), openai_chunk({}, "stop"),
                                openai_chunk(None, usage={"prompt_tokens": 1, "completion_tokens": 1,
                                                          "total_tokens": 2}), "data: [DONE]\n\n"]))
    chunks = list(qa.client().chat.completions.create(model="oai/gpt", messages=USER,
                                                      logprobs=True, stream=True))
    logprobs = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs is not None]
    assert logprobs, "no chunk carried the provider's logprobs"
    assert logprobs[0].content is not None
    assert logprobs[0].content[0].token == "ok"


def test_system_fingerprint_of_an_openai_compatible_provider_reaches_the_caller(qa: QAStack) -> None:
    qa.oai.script(Fault.raw(body={**openai_completion({"role": "assistant", "content": "ok"}, "stop"),
                              "system_fingerprint": "fp_44709d6fcb"}))
    r = qa.client().chat.completions.create(model="oai/gpt", messages=USER, seed=7)
    assert r.system_fingerprint == "fp_44709d6fcb"


def test_a_refusal_keeps_content_null(qa: QAStack) -> None:
    qa.oai.script(Fault.raw(body=openai_completion({"role": "assistant", "content": None,
                                                "refusal": "I can't help with that."}, "stop")))
    r = qa.client().chat.completions.create(model="oai/gpt", messages=USER)
    assert r.choices[0].message.refusal == "I can't help with that."
    assert r.choices[0].message.content is None


# -- Anthropic translated to OpenAI's shapes

def test_streamed_anthropic_tool_call_without_arguments_is_json(qa: QAStack) -> None:
    """Anthropic streams a tool_use with empty input as one input_json_delta of "" (its documented shape)."""
    events = anthropic_events([{"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}], "tool_use")
    events = [e for e in events if "input_json_delta" not in e]
    events.insert(-3, sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "input_json_delta", "partial_json": ""}}))
    qa.claude.script(Fault.raw(events=events))
    chunks = list(qa.client().chat.completions.create(model="claude/sonnet", messages=USER,
                                                      tools=TOOLS, stream=True))
    (arguments,) = streamed_tool_arguments(chunks)
    assert json.loads(arguments) == {}


def test_anthropic_context_window_stop_is_length(qa: QAStack) -> None:
    """The answer was cut because the context window filled: a caller checking finish_reason == "length"
    must see it, as for max_tokens."""
    qa.claude.script(Fault.raw(body=anthropic_message([{"type": "text", "text": "cut sh"}],
                                                  "model_context_window_exceeded")))
    r = qa.client().chat.completions.create(model="claude/sonnet", messages=USER)
    assert r.choices[0].finish_reason == "length"


def test_anthropic_system_text_parts_stay_apart(qa: QAStack) -> None:
    """A user message's parts stay separate blocks; a system message's are concatenated with nothing between
    them, so words of adjacent parts run together."""
    qa.client().chat.completions.create(model="claude/sonnet", messages=[
        {"role": "system", "content": [{"type": "text", "text": "Be helpful."}, {"type": "text", "text": "Be brief."}]},
        *USER])
    system = qa.claude.calls[-1].body["system"]
    texts = [system] if isinstance(system, str) else [b["text"] for b in system]
    assert not any("Be helpful.Be brief." in t for t in texts)


# -- Anthropic's extended thinking and prompt caching, as LiteLLM users send and read them

THOUGHT = {"type": "thinking", "thinking": "The user greets me; greet back.", "signature": "EqQBCgIYAhIM=="}


def test_anthropic_thinking_reaches_the_caller_whole_and_streamed(qa: QAStack) -> None:
    """reasoning_effort asks Anthropic to think (a 1,024-token budget for "low", on top of the model's
    max_tokens); its thinking comes back as reasoning_content, and each block whole, signature included, as
    thinking_blocks, so the next turn can send it back."""
    qa.claude.script(Fault.raw(body=anthropic_message([THOUGHT, {"type": "text", "text": "Hello!"}], "end_turn")),
                     Fault.raw(events=anthropic_events([THOUGHT, {"type": "text", "text": "Hello!"}], "end_turn")))
    r = qa.client().chat.completions.create(model="claude/sonnet", messages=USER, reasoning_effort="low")
    message = r.choices[0].message
    assert message.content == "Hello!"
    assert (message.model_extra or {})["reasoning_content"] == THOUGHT["thinking"]
    assert (message.model_extra or {})["thinking_blocks"] == [THOUGHT]
    sent = qa.claude.calls[0].body
    assert (sent["thinking"], sent["max_tokens"]) == ({"type": "enabled", "budget_tokens": 1024}, 256 + 1024)

    chunks = list(qa.client().chat.completions.create(model="claude/sonnet", messages=USER, stream=True,
                                                      extra_body={"thinking": {"type": "enabled",
                                                                               "budget_tokens": 2000}}))
    deltas = [c.choices[0].delta.model_extra or {} for c in chunks if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == THOUGHT["thinking"]
    assert [b for d in deltas for b in d.get("thinking_blocks") or []] == [THOUGHT]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello!"
    assert qa.claude.calls[1].body["thinking"] == {"type": "enabled", "budget_tokens": 2000}


def test_thinking_blocks_sent_back_reach_anthropic_first_in_their_turn(qa: QAStack) -> None:
    """Continuing a tool call with thinking on: Anthropic wants the assistant turn's thinking blocks, as it
    signed them, before its tool_use; the caller sends back the message it got."""
    assistant = {"role": "assistant", "content": None, "reasoning_content": THOUGHT["thinking"],
                 "thinking_blocks": [THOUGHT], "tool_calls": [
                     {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}
    qa.client().chat.completions.create(model="claude/sonnet", tools=TOOLS, reasoning_effort="low", messages=[
        *USER, assistant, {"role": "tool", "tool_call_id": "toolu_1", "content": "nobody"}])
    turn = qa.claude.calls[-1].body["messages"][1]
    assert turn["role"] == "assistant"
    assert turn["content"] == [THOUGHT, {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}]


def test_a_token_limit_under_the_thinking_budget_is_a_400_before_any_call(qa: QAStack) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        qa.client().chat.completions.create(model="claude/sonnet", messages=USER, reasoning_effort="high",
                                            max_completion_tokens=1000)
    assert exc.value.body["param"] == "max_completion_tokens"  # type: ignore[index]
    assert "thinking budget (4096 tokens)" in exc.value.message
    assert qa.claude.calls == []


def test_anthropic_prompt_caching_marks_reach_it_and_cache_writes_are_priced(qa: QAStack,
                                                                            nats_server: NatsServer) -> None:
    """cache_control on a message, a part and a tool reaches Anthropic on those blocks; the caller's usage
    counts the whole prompt with what was read from the cache, and the usage event prices the tokens written
    to it (cache_write_input_per_mtok), read from it (cached_input_per_mtok) and the rest apart."""
    mark = {"type": "ephemeral"}
    qa.claude.script(Fault.raw(body=anthropic_message([{"type": "text", "text": "ok"}], "end_turn",
                                                      cache_creation_input_tokens=100, cache_read_input_tokens=50)))
    raw = qa.client().chat.completions.with_raw_response.create(model="claude/opus", tools=[{**TOOLS[0],
                                                                                         "cache_control": mark}],
                                                                messages=[
        {"role": "system", "content": "The plant's manual, long.", "cache_control": mark},
        {"role": "user", "content": [{"type": "text", "text": "Line 3 stopped.", "cache_control": mark},
                                     {"type": "text", "text": "Why?"}]}])
    sent = qa.claude.calls[0].body
    assert sent["system"] == [{"type": "text", "text": "The plant's manual, long.", "cache_control": mark}]
    assert sent["messages"][0]["content"][0]["cache_control"] == mark
    assert "cache_control" not in sent["messages"][0]["content"][1]
    assert sent["tools"][0]["cache_control"] == mark
    assert_cache_priced(raw.parse().usage, nats_server, raw.headers["x-request-id"])


def test_an_hours_cache_writes_are_priced_at_their_own_price(qa: QAStack, nats_server: NatsServer) -> None:
    """A 1-hour mark (twice the input price at Anthropic, five-minute writes 1.25x): Anthropic says which writes
    were for an hour, and the usage event prices them at cache_write_1h_input_per_mtok."""
    qa.claude.script(Fault.raw(body=anthropic_message(
        [{"type": "text", "text": "ok"}], "end_turn", cache_creation_input_tokens=100,
        cache_creation={"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 70})))  # type: ignore[arg-type]
    raw = qa.client().chat.completions.with_raw_response.create(model="claude/opus", messages=[
        {"role": "user", "content": [{"type": "text", "text": "The manual.",
                                      "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}])
    assert qa.claude.calls[0].body["messages"][0]["content"][0]["cache_control"]["ttl"] == "1h"
    event = usage_event(nats_server, raw.headers["x-request-id"])
    assert event["cost_usd"] == pytest.approx((10 * 3 + 30 * 3.75 + 70 * 6 + 5 * 15) / 1e6)


def assert_cache_priced(usage: Any, nats_server: NatsServer, request_id: str) -> None:
    """``claude/opus``'s usage of 10 input tokens, 100 written to the cache and 50 read from it, and 5 output
    tokens: the caller sees them all, and the usage event prices each at its own price."""
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (160, 5)
    assert usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens_details.cache_write_tokens) == (50, 100)
    event = usage_event(nats_server, request_id)
    assert event["cost_usd"] == pytest.approx((10 * 3 + 50 * 0.3 + 100 * 3.75 + 5 * 15) / 1e6)


def test_a_pdf_reaches_a_claude_model_as_a_document(qa: QAStack) -> None:
    """A plant manual sent as the openai client's file part (a PDF inline) reaches Claude as a document
    block; a file uploaded to OpenAI (file_id) is a 400 naming the messages, before any call."""
    pdf = "data:application/pdf;base64,JVBERi0xLjQK"
    qa.client().chat.completions.create(model="claude/sonnet", messages=[{"role": "user", "content": [
        {"type": "file", "file": {"filename": "line3.pdf", "file_data": pdf}},
        {"type": "text", "text": "Why did line 3 stop?"}]}])
    (call,) = qa.claude.calls
    assert call.body["messages"][0]["content"][0] == {
        "type": "document", "title": "line3.pdf",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}}
    with pytest.raises(openai.BadRequestError) as exc:
        qa.client().chat.completions.create(model="claude/sonnet", messages=[{"role": "user", "content": [
            {"type": "file", "file": {"file_id": "file-abc123"}}]}])
    assert exc.value.body["param"] == "messages"  # type: ignore[index]
    assert len(qa.claude.calls) == 1


class Person(pydantic.BaseModel):
    name: str
    shift: int


def test_structured_output_from_a_claude_model_parses_whole_and_streamed(qa: QAStack) -> None:
    """The openai client's parse() (a strict json_schema from a pydantic model) against a Claude model: the
    model is made to call a tool with that schema, and its input comes back as the content, finish "stop".
    Streamed, the input's JSON pieces are the content's deltas."""
    answer = {"type": "tool_use", "id": "toolu_9", "name": "json_answer", "input": {"name": "Åsa", "shift": 3}}
    qa.claude.script(Fault.raw(body=anthropic_message([answer], "tool_use")),
                     Fault.raw(events=anthropic_events([answer], "tool_use")))
    r = qa.client().chat.completions.parse(model="claude/sonnet", messages=USER, response_format=Person)
    assert r.choices[0].message.parsed == Person(name="Åsa", shift=3)
    assert r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls
    sent = qa.claude.calls[0].body
    assert sent["tool_choice"] == {"type": "tool", "name": "json_answer"}
    assert sent["tools"][0]["input_schema"]["required"] == ["name", "shift"]

    chunks = list(qa.client().chat.completions.create(model="claude/sonnet", messages=USER, stream=True,
                                                      response_format={"type": "json_object"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == {"name": "Åsa", "shift": 3}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def usage_event(nats_server: NatsServer, request_id: str) -> Any:
    """The usage event of a request, from the site's USAGE stream."""
    return eventually(lambda: support.usage_event(nats_server.url, request_id, SITE), 10, "the usage event")


# -- errors as the openai client meets them

def test_a_refused_provider_key_is_not_retried_by_the_openai_client(qa: QAStack) -> None:
    """Only an operator can mend a refused provider key; the openai client retries any 5xx unless the answer
    says `x-should-retry: false`, so each of its tries reaches the provider (and its breaker) again."""
    qa.oai.script(*[Fault.raw(401, {"error": {"message": "Incorrect API key", "type": "invalid_request_error",
                                          "code": "invalid_api_key"}})] * 3)
    client = openai.OpenAI(base_url=qa.base, api_key="key-acme", max_retries=2, timeout=20)
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="oai/gpt", messages=USER)
    assert exc.value.code == "upstream_auth_failed"
    assert len(qa.oai.calls) == 1
