"""QA of JSON answers from Claude, PDF documents and top_k, end to end, as a user migrating from LiteLLM meets
them with the official openai client (``parse()``, the ``stream()`` helper) or plain HTTP.

Two stacks: test_cloud_fidelity.py's (its fixture, started again for this module: gateway -> router ->
cloud-adapter -> fake OpenAI-compatible and Anthropic providers answering what each test scripts), and a site
with the tiny local model first in a route and Claude second (tests.support.local_and_cloud_site), its fake
Anthropic provider taking bodies as large as the gateway does. QA found one bug, fixed since (a PDF's file name
reached the provider unmasked); the other tests check behaviour that no other test covers.
"""

from __future__ import annotations

import base64
import enum
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pydantic
import pytest
from aiohttp import web

from tests.e2e import test_cloud_fidelity
from tests.e2e.test_cloud_fidelity import (
    EMAIL,
    TOOLS,
    USER,
    QAStack,
    anthropic_events,
    anthropic_message,
    streamed_tool_arguments,
)
from tests.fakes import FakeProvider, Fault
from tests.support import NatsServer, Service, local_and_cloud_site, running, tag

pytestmark = pytest.mark.e2e
qa = test_cloud_fidelity.qa  # the same stack as test_cloud_fidelity.py's, for this module
_fresh = test_cloud_fidelity._fresh
PDF = "JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSPj4Kc3RyZWFtCg=="



class Shift(enum.StrEnum):
    early = "early"
    late = "late"


class Address(pydantic.BaseModel):
    street: str
    city: str | None


class Worker(pydantic.BaseModel):
    """What parse() makes a strict schema of with $defs, $refs, an enum, an optional field and a list."""

    name: str
    shift: Shift
    home: Address
    past: list[Address]


ANSWER = {"name": "Åsa", "shift": "late", "home": {"street": "Storgatan 1", "city": None},
          "past": [{"street": "Kvarngatan 2", "city": "Umeå"}]}
WORKER = Worker.model_validate(ANSWER)
JSON_ANSWER = {"type": "tool_use", "id": "toolu_9", "name": "json_answer", "input": ANSWER}
LOOKUP = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"email": "a@b.example"}}


def pdf_message(filename: str = "line3.pdf", data: str = PDF) -> list[Any]:
    return [{"role": "user", "content": [
        {"type": "file", "file": {"filename": filename, "file_data": f"data:application/pdf;base64,{data}"}},
        {"type": "text", "text": "Why did line 3 stop?"}]}]


# -- JSON answers with the openai client

def test_parse_of_a_nested_model_sends_its_defs_at_the_root_of_the_input_schema(qa: QAStack) -> None:
    """parse(response_format=Worker) (nested models, an enum, an optional field): the json_answer tool's
    input_schema is the strict schema as sent, its $defs at the root where its #/$defs/ refs point (LiteLLM's
    #7696/#7755: $defs moved elsewhere made Anthropic refuse the schema), and the answer parses."""
    qa.claude.script(Fault.raw(body=anthropic_message([JSON_ANSWER], "tool_use")))
    r = qa.client().chat.completions.parse(model="claude/sonnet", messages=USER, response_format=Worker)
    assert r.choices[0].message.parsed == WORKER
    assert r.choices[0].finish_reason == "stop"
    (tool,) = qa.claude.calls[0].body["tools"]
    schema = tool["input_schema"]
    assert schema["type"] == "object"
    assert set(schema["$defs"]) == {"Address", "Shift"}
    assert schema["properties"]["home"] == {"$ref": "#/$defs/Address"}
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["name", "shift", "home", "past"]


def test_the_openai_clients_stream_helper_parses_a_claude_json_answer(qa: QAStack) -> None:
    """client.beta.chat.completions.stream(response_format=Worker): content.delta events as the tool input's
    JSON pieces come, then the final completion parsed, finish "stop", no tool calls."""
    qa.claude.script(Fault.raw(events=anthropic_events([JSON_ANSWER], "tool_use")))
    with qa.client().beta.chat.completions.stream(model="claude/sonnet", messages=USER,
                                                  response_format=Worker) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "content.delta" in kinds
    assert "content.done" in kinds
    assert final.choices[0].message.parsed == WORKER
    assert final.choices[0].finish_reason == "stop"
    assert not final.choices[0].message.tool_calls


@pytest.mark.parametrize("stream", [False, True])
def test_json_answer_and_a_tool_call_in_one_answer(qa: QAStack, stream: bool) -> None:
    """JSON mode with the caller's tools; the model calls json_answer first, then the caller's tool: the
    content is the JSON, the caller's call is tool call 0 (json_answer takes no index), finish tool_calls."""
    answer = [JSON_ANSWER, LOOKUP]
    qa.claude.script(Fault.raw(events=anthropic_events(answer, "tool_use")) if stream
                     else Fault.raw(body=anthropic_message(answer, "tool_use")))
    kw: dict[str, Any] = {"model": "claude/sonnet", "messages": USER, "tools": TOOLS,
                          "response_format": {"type": "json_object"}}
    if stream:
        chunks = list(qa.client().chat.completions.create(stream=True, **kw))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert {tc.index for tc in calls} == {0}
        assert [tc.function.name for tc in calls if tc.id] == ["lookup"]
        assert [json.loads(a) for a in streamed_tool_arguments(chunks)] == [LOOKUP["input"]]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        r = qa.client().chat.completions.create(**kw)
        content = r.choices[0].message.content or ""
        assert [(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls or []
                ] == [("lookup", LOOKUP["input"])]
        finishes = [r.choices[0].finish_reason]
    assert json.loads(content) == ANSWER
    assert finishes == ["tool_calls"]
    assert qa.claude.calls[0].body["tool_choice"] == {"type": "any"}


def test_json_answers_with_n_parse_each_choice_and_sum_cache_writes(qa: QAStack) -> None:
    """parse(n=2) against Claude (no n: a call a choice): both choices parsed, the usage summed over the two
    calls, their cache writes too."""
    body = anthropic_message([JSON_ANSWER], "tool_use", cache_creation_input_tokens=7)
    qa.claude.script(Fault.raw(body=body), Fault.raw(body=body))
    r = qa.client().chat.completions.parse(model="claude/sonnet", messages=USER, response_format=Worker, n=2)
    assert [c.message.parsed for c in r.choices] == [WORKER, WORKER]
    assert [c.finish_reason for c in r.choices] == ["stop", "stop"]
    assert len(qa.claude.calls) == 2
    assert all(call.body["tool_choice"] == {"type": "tool", "name": "json_answer"} for call in qa.claude.calls)
    assert r.usage is not None
    assert r.usage.prompt_tokens == 34
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cache_write_tokens == 14


def test_a_cached_streamed_json_answer_replays_as_json(qa: QAStack) -> None:
    """"cache": true: a streamed JSON answer is stored; the same request again (streamed, then whole) is
    answered from the cache with the same JSON content and finish "stop", with no second call."""
    messages = [{"role": "user", "content": tag()}]
    qa.claude.script(Fault.raw(events=anthropic_events([JSON_ANSWER], "tool_use")))
    kw: dict[str, Any] = {"model": "claude/sonnet", "messages": messages, "response_format": {"type": "json_object"},
                          "extra_body": {"cache": True}}
    for _ in range(2):
        chunks = list(qa.client().chat.completions.create(stream=True, **kw))
        assert json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)) == ANSWER
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    r = qa.client().chat.completions.create(**kw)
    assert json.loads(r.choices[0].message.content or "") == ANSWER
    assert r.choices[0].finish_reason == "stop"
    assert len(qa.claude.calls) == 1


# -- PDFs and top_k

@pytest.mark.parametrize("model", ["claude/sonnet", "oai/gpt"])
def test_a_pdfs_file_name_is_masked_before_leaving_the_site(qa: QAStack, model: str) -> None:
    """Masked is "everything of the request a provider reads as written" (docs/routing.md); a PDF saved from
    an e-mail is often named after its sender, and Claude reads the name as the document's title."""
    qa.client().chat.completions.create(model=model, messages=pdf_message(f"contract from {EMAIL}.pdf"))
    fake = qa.claude if model.startswith("claude/") else qa.oai
    sent = json.dumps(fake.calls[-1].body)
    assert PDF in sent  # the document went
    assert EMAIL not in sent


def test_a_pdf_part_with_cache_control_and_top_k(qa: QAStack) -> None:
    """A PDF part marked for caching, with top_k (through extra_body, as the openai client sends it): Claude
    gets a cached document block and top_k; an OpenAI-compatible model gets the part and top_k as sent."""
    messages = pdf_message()
    messages[0]["content"][0]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    qa.client().chat.completions.create(model="claude/sonnet", messages=messages, extra_body={"top_k": 5})
    sent = qa.claude.calls[-1].body
    assert sent["messages"][0]["content"][0] == {
        "type": "document", "title": "line3.pdf", "cache_control": {"type": "ephemeral", "ttl": "1h"},
        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF}}
    assert sent["top_k"] == 5
    qa.client().chat.completions.create(model="oai/gpt", messages=messages, extra_body={"top_k": 5})
    sent = qa.oai.calls[-1].body
    assert sent["messages"][0]["content"][0] == messages[0]["content"][0]
    assert sent["top_k"] == 5


# -- a route with the local model first and Claude second

POLICY = """
local_model: tiny
aliases:
  localfirst: claude/sonnet
rules:
  - {name: local-first, when: {model: localfirst}, route: [local, claude/sonnet]}
  - {name: default, route: [requested, local]}
"""


class RoomyFake(FakeProvider):
    """A fake Anthropic provider that takes bodies as large as the gateway does (Anthropic takes 32 MB)."""

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()


@dataclass
class Routed:
    gateway: Service
    claude: FakeProvider

    def post(self, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.gateway.base}/v1/chat/completions", json=body, timeout=30)


@pytest.fixture(scope="module")
def routed(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    tmp = tmp_path_factory.mktemp("qa-json-pdf")
    oai, claude = FakeProvider("openai").start(), RoomyFake("anthropic").start()
    providers = test_cloud_fidelity.providers_file(tmp / "providers.yaml", oai, claude)
    worker, adapter, router, gateway = local_and_cloud_site(nats_server.url, "qajp", tmp, providers, POLICY, {})
    try:
        with running(worker, adapter, router, gateway):
            yield Routed(gateway, claude)
    finally:
        oai.stop()
        claude.stop()


@pytest.fixture
def claude(routed: Routed) -> FakeProvider:
    routed.claude.reset()
    return routed.claude


def test_a_route_with_the_local_model_first_sends_json_answers_and_pdfs_to_claude(routed: Routed,
                                                                                  claude: FakeProvider) -> None:
    """Route [local, claude/sonnet]: response_format json_object and a PDF part skip the local model (which
    can do neither) for Claude, the route header saying why; the local model asked directly is a 400."""
    claude.script(Fault.raw(body=anthropic_message([JSON_ANSWER], "tool_use")))
    r = routed.post({"model": "localfirst", "messages": USER, "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["message"]["content"]) == ANSWER
    assert r.headers["x-leafwire-route"].startswith("target=claude/sonnet")
    assert "does not support response_format" in r.headers["x-leafwire-route"]
    r = routed.post({"model": "localfirst", "messages": pdf_message()})
    assert r.status_code == 200, r.text
    assert "reads text only" in r.headers["x-leafwire-route"]
    assert [c.body["messages"][0]["content"][0]["type"] for c in claude.calls] == ["text", "document"]
    r = routed.post({"model": "tiny", "messages": pdf_message()})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages"
    assert len(claude.calls) == 2


def test_a_json_answer_whose_claude_call_fails_is_not_a_400_of_the_local_fallback(routed: Routed,
                                                                                 claude: FakeProvider) -> None:
    """claude/sonnet (route [requested, local]) with response_format, Claude failing: the caller gets Claude's
    failure (502), not the local model's refusal of response_format, nor free text from it."""
    claude.script(*[Fault.error(503)] * 3)
    r = routed.post({"model": "claude/sonnet", "messages": USER, "response_format": {"type": "json_object"}})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_error"


def test_a_large_pdf_reaches_claude_whole(routed: Routed, claude: FakeProvider) -> None:
    """A 5.9 MB PDF (7.9 MB of base64, just under the gateway's 8 MiB body limit) goes through gateway,
    router and adapter (NATS messages of 8 MB) to Claude intact."""
    data = base64.b64encode(os.urandom(int(5.9 * 1024 * 1024))).decode()
    r = routed.post({"model": "claude/sonnet", "messages": pdf_message("manual.pdf", data)})
    assert r.status_code == 200, r.text[:300]
    (call,) = claude.calls
    assert call.body["messages"][0]["content"][0]["source"]["data"] == data
