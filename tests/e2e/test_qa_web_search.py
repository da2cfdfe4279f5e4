"""QA: web search on Anthropic models (``web_search_options``), end to end.

The official openai client -> gateway -> router -> cloud-adapter -> a fake Anthropic server scripted with what
Anthropic's web search really answers (``server_tool_use``, ``web_search_tool_result`` with results or a
``web_search_tool_result_error``, text blocks citing ``web_search_result_location``s, ``usage.server_tool_use``;
streamed: ``input_json_delta`` for the search input, ``citations_delta``, ``text_delta``, ``message_delta`` with
the usage), plus a fake OpenAI-compatible server.

Probed:
- annotations of several cited blocks, several citations in one block, one URL cited twice, emoji/accents/CJK
  before a citation: whole and streamed, spans slicing ``content`` to the cited text (Python str indexes), and
  the streamed annotations the same as the whole answer's;
- the search beside a caller's tool call (whole and streamed: the caller's call is index 0), thinking + search;
- JSON ``response_format`` + search (what goes to Anthropic; words answered without the JSON tool, streamed
  vs whole);
- n=2 (one call per choice): the cost header counts both calls' searches; n=2 streamed, each choice's annotations;
- the searched answer (annotations and all, as the openai client returns it) sent back in the next turn;
- the cache: a temperature-0 searched answer served again whole and streamed (annotations kept, cost 0);
- the usage event and the budgets price the searches; ``pause_turn``;
- ``web_search_options`` passed as sent to an OpenAI-compatible provider;
- validation of ``web_search_options`` (``[]``, ``user_location`` without ``approximate``, a type other than
  ``approximate``, null ``user_location``/``search_context_size``, an empty ``search_context_size``).

Findings (each was a strict xfail test; all four are fixed since, and the tests below pass):
1. JSON ``response_format`` + ``web_search_options`` forces the ``json_answer`` tool
   (``tool_choice {"type": "tool", "name": "json_answer"}``): a forced tool call is the answer's first block,
   so Anthropic cannot run the web search the caller asked (and pays for nothing: the answer is unsearched).
   Suspect: ``anthropic._tools`` forcing the answer tool without regard to the search tool appended in
   ``Anthropic.body`` (thinking is already special-cased: offered, not forced).
2. JSON ``response_format`` + search, the model answering in (cited) words without calling ``json_answer``:
   the whole answer carries the ``url_citation`` annotations, the streamed one drops them
   (``AnthropicStream._on_content_block_stop``: ``... and not self.json_answer``). Streamed != whole.
3. ``search_context_size: ""`` (not low/medium/high) is taken as ``medium`` instead of a 400
   (``web_search_tool``: ``options.get("search_context_size") or "medium"``); OpenAI refuses values outside
   its enum, and the docs say anything else is a 400 naming it.
4. An unknown field of ``user_location.approximate`` (``postal_code``) is silently dropped, not a 400 naming
   it as the docs promise for anything else (``web_search_tool`` keeps only ``SEARCH_LOCATION``).

Working: annotation spans (non-ASCII, multiple citations, duplicates, several blocks; error result blocks
ignored), streamed == whole, tool call numbering (whole and streamed), thinking + search, n=2 cost and n=2
streamed annotations, an answer with annotations sent back in the conversation, cache hits whole and
streamed, usage event cost, budget charged with searches, pause_turn (then: the text so far with stop;
since: resumed), OpenAI-compatible pass-through, validation of [] / missing approximate / other type / nulls.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests import support
from tests.e2e.test_cloud_fidelity import anthropic_message, sse
from tests.fakes import FakeProvider, Fault
from tests.support import NatsServer, Service, cloud_router_env, eventually, running

pytestmark = pytest.mark.e2e
SITE = "qaws"
QUESTION = [{"role": "user", "content": "What happened with the recall?"}]
INPUT_PRICE, OUTPUT_PRICE, SEARCH_PRICE = 3.0, 15.0, 10.0
TOKENS_COST = (10 * INPUT_PRICE + 5 * OUTPUT_PRICE) / 1e6  # anthropic_message's usage: 10 in, 5 out
URL_A = "https://example.com/a"
URL_B = "https://example.org/b"


def search_block(i: int = 1, query: str = "recall 2026") -> dict[str, Any]:
    return {"type": "server_tool_use", "id": f"srvtoolu_0{i}", "name": "web_search", "input": {"query": query}}


def results_block(i: int = 1) -> dict[str, Any]:
    return {"type": "web_search_tool_result", "tool_use_id": f"srvtoolu_0{i}", "content": [
        {"type": "web_search_result", "url": URL_A, "title": "A – été", "encrypted_content": "Eq1",
         "page_age": "October 2, 2026"},
        {"type": "web_search_result", "url": URL_B, "title": "B", "encrypted_content": "Eq2", "page_age": None}]}


def error_results_block(i: int = 2) -> dict[str, Any]:
    return {"type": "web_search_tool_result", "tool_use_id": f"srvtoolu_0{i}",
            "content": {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}}


def cite(url: str, title: str, text: str) -> dict[str, Any]:
    return {"type": "web_search_result_location", "url": url, "title": title, "encrypted_index": "Eo8B",
            "cited_text": text}


# Text blocks of a rich answer: (text, citations). Non-ASCII before the citations; a block with two citations;
# URL_A cited by two blocks.
TEXTS: list[tuple[str, list[dict[str, Any]]]] = [
    ("Voilà 🚀 — 東京の結果: ", []),
    ("the recall was on October 2 😀.", [cite(URL_A, "A – été", "Recall October 2")]),
    (" Ça continue… ", []),
    ("Two sources agree (東京, Zürich).", [cite(URL_A, "A – été", "agree"), cite(URL_B, "B", "agree too")]),
    (" Fin.", []),
]
CONTENT = "".join(t for t, _ in TEXTS)


def text_block(text: str, citations: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "text", "text": text, **({"citations": citations} if citations else {})}


def rich_blocks() -> list[dict[str, Any]]:
    """Text, a search, its results, a second search over the limit, then text citing the results."""
    return [text_block(*TEXTS[0]), search_block(1), results_block(1), search_block(2, "more"),
            error_results_block(2), *[text_block(*t) for t in TEXTS[1:]]]


def expected_notes() -> list[tuple[str, str, str]]:
    """(url, title, cited text) of each annotation, in order."""
    return [(c["url"], c["title"], t) for t, cs in TEXTS for c in cs]


def answer(blocks: list[dict[str, Any]], stop: str = "end_turn", searches: int = 1) -> dict[str, Any]:
    return anthropic_message(blocks, stop, server_tool_use={"web_search_requests": searches})  # type: ignore[arg-type]


def events(blocks: list[dict[str, Any]], stop: str = "end_turn", searches: int = 1) -> list[str]:
    """``blocks`` streamed as Anthropic streams them."""
    def ev(i: int, kind: str, **data: Any) -> str:
        return sse(kind, {"type": kind, "index": i, **data})
    out = [sse("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
        "stop_reason": None, "usage": {"input_tokens": 10, "output_tokens": 1,
                                       "server_tool_use": {"web_search_requests": 0}}}}),
        sse("ping", {"type": "ping"})]
    for i, b in enumerate(blocks):
        if b["type"] in ("server_tool_use", "tool_use"):
            out.append(ev(i, "content_block_start", content_block={**b, "input": {}}))
            js = json.dumps(b["input"])
            for piece in (js[:5], js[5:]):
                out.append(ev(i, "content_block_delta", delta={"type": "input_json_delta", "partial_json": piece}))
        elif b["type"] == "text":
            out.append(ev(i, "content_block_start", content_block={"type": "text", "text": ""}))
            for c in b.get("citations", []):
                out.append(ev(i, "content_block_delta", delta={"type": "citations_delta", "citation": c}))
            t = b["text"]
            for piece in (t[:7], t[7:]):
                if piece:
                    out.append(ev(i, "content_block_delta", delta={"type": "text_delta", "text": piece}))
        elif b["type"] == "thinking":
            out.append(ev(i, "content_block_start", content_block={"type": "thinking", "thinking": ""}))
            out.append(ev(i, "content_block_delta", delta={"type": "thinking_delta", "thinking": b["thinking"]}))
            out.append(ev(i, "content_block_delta", delta={"type": "signature_delta", "signature": b["signature"]}))
        else:  # web_search_tool_result: whole at its start
            out.append(ev(i, "content_block_start", content_block=b))
        out.append(ev(i, "content_block_stop"))
    out.append(sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"input_tokens": 10, "output_tokens": 5,
                                               "server_tool_use": {"web_search_requests": searches}}}))
    out.append(sse("message_stop", {"type": "message_stop"}))
    return out


@dataclass
class Stack:
    gateway: Service
    claude: FakeProvider
    oai: FakeProvider
    nats: NatsServer

    def client(self, key: str = "key-acme") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key=key, max_retries=0, timeout=20)


def write_providers(path: Path, claude: FakeProvider, oai: FakeProvider) -> Path:
    timeouts = {"connect_s": 2, "first_byte_s": 2, "total_s": 10}
    path.write_text(json.dumps({"providers": [
        {"name": "claude", "kind": "anthropic", "base_url": claude.url, "local": True, "timeouts": timeouts,
         "models": {"sonnet": {"upstream": "claude-x", "max_tokens": 256, "input_per_mtok": INPUT_PRICE,
                               "output_per_mtok": OUTPUT_PRICE, "web_search_per_1k": SEARCH_PRICE}}},
        {"name": "oai", "kind": "openai-compatible", "base_url": oai.url, "local": True, "timeouts": timeouts,
         "models": {"gpt": {"upstream": "gpt-4o-search-preview"}}}],
        "budgets": {"tenants": {"poor": {"daily_usd": 0.015}}}}))
    return path


@pytest.fixture(scope="module")
def stack(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    claude, oai = FakeProvider("anthropic").start(), FakeProvider("openai").start()
    file = write_providers(tmp_path_factory.mktemp("qaws") / "providers.yaml", claude, oai)
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE}
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(file), "LW_CLOUD_BACKOFF_BASE_S": "0.01",
                                        "LW_CLOUD_BUDGET_FLUSH_S": "0.2"})
    router = Service("router", {**env, **cloud_router_env(file.parent)})
    gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": "key-acme:acme,key-poor:poor"})
    try:
        with running(adapter, router, gateway):
            yield Stack(gateway, claude, oai, nats_server)
    finally:
        claude.stop()
        oai.stop()


@pytest.fixture(autouse=True)
def _fresh(stack: Stack) -> None:
    stack.claude.reset()
    stack.oai.reset()


def spans(content: str, notes: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(n["url_citation"]["url"], n["url_citation"]["title"],
             content[n["url_citation"]["start_index"]:n["url_citation"]["end_index"]]) for n in notes]


def stream_of(stack: Stack, **kw: Any) -> tuple[list[Any], str]:
    raw = stack.client().chat.completions.with_raw_response.create(model="claude/sonnet", messages=QUESTION,
                                                                   stream=True, **kw)
    return list(raw.parse()), raw.headers["x-request-id"]


def streamed_notes(chunks: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    return content, [n for d in deltas for n in (d.model_extra or {}).get("annotations") or []]


def usage_event(stack: Stack, request_id: str) -> Any:
    return eventually(lambda: support.usage_event(stack.nats.url, request_id, SITE), 10, "the usage event")


# -- annotations


def test_whole_annotations_slice_the_cited_text_with_non_ascii_and_several_citations(stack: Stack) -> None:
    stack.claude.script(Fault.raw(body=answer(rich_blocks(), searches=2)))
    raw = stack.client().chat.completions.with_raw_response.create(model="claude/sonnet", messages=QUESTION,
                                                                   web_search_options={})
    message = raw.parse().choices[0].message
    assert message.content == CONTENT
    assert not message.tool_calls
    notes = [n.model_dump() for n in message.annotations or []]
    assert all(n["type"] == "url_citation" for n in notes)
    assert spans(CONTENT, notes) == expected_notes()
    assert float(raw.headers["x-leafwire-cost-usd"]) == pytest.approx(TOKENS_COST + 2 * SEARCH_PRICE / 1000)


def test_streamed_annotations_are_the_whole_answers(stack: Stack) -> None:
    stack.claude.script(Fault.raw(body=answer(rich_blocks(), searches=2)))
    whole = stack.client().chat.completions.create(model="claude/sonnet", messages=QUESTION, web_search_options={})
    stack.claude.script(Fault.raw(events=events(rich_blocks(), searches=2)))
    chunks, _ = stream_of(stack, web_search_options={})
    content, notes = streamed_notes(chunks)
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert content == CONTENT
    assert spans(content, notes) == expected_notes()
    assert notes == [n.model_dump() for n in whole.choices[0].message.annotations or []]


# -- beside the caller's tools, thinking, JSON


TICKET = {"type": "tool_use", "id": "toolu_01", "name": "open_ticket", "input": {"part": "bearing"}}
TOOLS = [{"type": "function", "function": {"name": "open_ticket", "parameters": {"type": "object"}}}]


def test_whole_search_then_caller_tool_call(stack: Stack) -> None:
    blocks = [search_block(), results_block(), text_block(*TEXTS[1]), TICKET]
    stack.claude.script(Fault.raw(body=answer(blocks, "tool_use")))
    choice = stack.client().chat.completions.create(model="claude/sonnet", messages=QUESTION, tools=TOOLS,
                                                    web_search_options={}).choices[0]  # type: ignore[arg-type]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("toolu_01", "open_ticket",
                                                                                  {"part": "bearing"})
    assert choice.message.content == TEXTS[1][0]
    assert spans(TEXTS[1][0], [n.model_dump() for n in choice.message.annotations or []]) == [
        (URL_A, "A – été", TEXTS[1][0])]


def test_streamed_search_then_caller_tool_call_is_index_0(stack: Stack) -> None:
    blocks = [search_block(), results_block(), text_block(*TEXTS[1]), TICKET]
    stack.claude.script(Fault.raw(events=events(blocks, "tool_use")))
    chunks, _ = stream_of(stack, tools=TOOLS, web_search_options={})
    pieces = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert pieces
    assert {p.index for p in pieces} == {0}
    assert [p.function.name for p in pieces if p.function and p.function.name] == ["open_ticket"]
    assert json.loads("".join(p.function.arguments or "" for p in pieces if p.function)) == {"part": "bearing"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    content, notes = streamed_notes(chunks)
    assert spans(content, notes) == [(URL_A, "A – été", TEXTS[1][0])]


def test_thinking_and_search_whole_and_streamed(stack: Stack) -> None:
    thought = {"type": "thinking", "thinking": "Let me search… 🤔", "signature": "sig=="}
    blocks = [thought, search_block(), results_block(), *[text_block(*t) for t in TEXTS]]
    stack.claude.script(Fault.raw(body=answer(blocks)))
    whole = stack.client().chat.completions.create(model="claude/sonnet", messages=QUESTION, web_search_options={},
                                                   reasoning_effort="low").choices[0].message
    assert stack.claude.calls[0].body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert (whole.model_extra or {})["reasoning_content"] == thought["thinking"]
    assert whole.content == CONTENT
    assert spans(CONTENT, [n.model_dump() for n in whole.annotations or []]) == expected_notes()
    stack.claude.script(Fault.raw(events=events(blocks)))
    chunks, _ = stream_of(stack, web_search_options={}, reasoning_effort="low")
    content, notes = streamed_notes(chunks)
    assert content == CONTENT
    assert spans(content, notes) == expected_notes()


def test_json_answer_with_search_does_not_force_the_answer_tool(stack: Stack) -> None:
    stack.claude.script(Fault.raw(body=answer([{"type": "tool_use", "id": "toolu_9", "name": "json_answer",
                                                "input": {"date": "2026-10-02"}}], "tool_use")))
    got = stack.client().chat.completions.create(model="claude/sonnet", messages=QUESTION, web_search_options={},
                                                 response_format={"type": "json_object"})
    assert json.loads(got.choices[0].message.content or "") == {"date": "2026-10-02"}
    body = stack.claude.calls[0].body
    assert any(t.get("type") == "web_search_20250305" for t in body["tools"])
    # a forced call of json_answer is the answer's first block: no search can come before it
    assert body.get("tool_choice", {"type": "auto"}).get("type") in ("auto", "any")


def test_json_format_answered_in_cited_words_streamed_like_whole(stack: Stack) -> None:
    blocks = [search_block(), results_block(), *[text_block(*t) for t in TEXTS]]
    stack.claude.script(Fault.raw(body=answer(blocks)))
    whole = stack.client().chat.completions.create(model="claude/sonnet", messages=QUESTION, web_search_options={},
                                                   response_format={"type": "json_object"}).choices[0].message
    assert whole.content == CONTENT
    assert spans(CONTENT, [n.model_dump() for n in whole.annotations or []]) == expected_notes()
    stack.claude.script(Fault.raw(events=events(blocks)))
    chunks, _ = stream_of(stack, web_search_options={}, response_format={"type": "json_object"})
    content, notes = streamed_notes(chunks)
    assert content == CONTENT
    assert spans(content, notes) == expected_notes()


# -- costs, cache, usage, budgets


def test_n2_cost_counts_both_calls_searches(stack: Stack) -> None:
    blocks = [search_block(), results_block(), text_block(*TEXTS[1])]
    stack.claude.script(Fault.raw(body=answer(blocks, searches=2)), Fault.raw(body=answer(blocks, searches=3)))
    raw = stack.client().chat.completions.with_raw_response.create(model="claude/sonnet", messages=QUESTION, n=2,
                                                                   web_search_options={})
    got = raw.parse()
    assert len(stack.claude.calls) == 2
    assert [c.message.content for c in got.choices] == [TEXTS[1][0]] * 2
    assert all(c.message.annotations for c in got.choices)
    assert float(raw.headers["x-leafwire-cost-usd"]) == pytest.approx(2 * TOKENS_COST + 5 * SEARCH_PRICE / 1000)


def test_cached_searched_answer_whole_and_streamed_keeps_annotations(stack: Stack) -> None:
    question = [{"role": "user", "content": "cache me: recall? ✓"}]
    stack.claude.script(Fault.raw(events=events(rich_blocks(), searches=2)))
    first = stack.client().chat.completions.with_raw_response.create(
        model="claude/sonnet", messages=question, stream=True, temperature=0, web_search_options={})
    assert first.headers["x-leafwire-cache"] == "miss"
    content, notes = streamed_notes(list(first.parse()))
    assert spans(content, notes) == expected_notes()
    assert usage_event(stack, first.headers["x-request-id"])["cost_usd"] == pytest.approx(
        TOKENS_COST + 2 * SEARCH_PRICE / 1000)
    raw = eventually(lambda: (r := stack.client().chat.completions.with_raw_response.create(
        model="claude/sonnet", messages=question, temperature=0, web_search_options={})).headers.get(
        "x-leafwire-cache") == "hit" and r, 10, "the cache hit")
    assert float(raw.headers["x-leafwire-cost-usd"]) == 0
    message = raw.parse().choices[0].message
    assert message.content == CONTENT
    assert spans(CONTENT, [n.model_dump() for n in message.annotations or []]) == expected_notes()
    again = stack.client().chat.completions.with_raw_response.create(
        model="claude/sonnet", messages=question, stream=True, temperature=0, web_search_options={})
    assert again.headers["x-leafwire-cache"] == "hit"
    content, notes = streamed_notes(list(again.parse()))
    assert content == CONTENT
    assert spans(content, notes) == expected_notes()
    assert len(stack.claude.calls) == 1
    event = usage_event(stack, again.headers["x-request-id"])
    assert event["cached"] is True
    assert event["cost_usd"] == 0


def test_budget_is_charged_for_searches(stack: Stack) -> None:
    """Tenant poor has $0.015 a day; one answer of 2 searches costs $0.0201 (the tokens alone $0.0001)."""
    stack.claude.script(Fault.raw(body=answer(rich_blocks(), searches=2)))
    raw = stack.client("key-poor").chat.completions.with_raw_response.create(
        model="claude/sonnet", messages=QUESTION, web_search_options={})
    assert usage_event(stack, raw.headers["x-request-id"])["cost_usd"] == pytest.approx(
        TOKENS_COST + 2 * SEARCH_PRICE / 1000)

    def refused() -> bool:
        try:
            stack.client("key-poor").chat.completions.create(model="claude/sonnet", messages=QUESTION)
        except openai.RateLimitError as exc:
            return exc.code == "budget_exceeded"
        return False

    eventually(refused, 10, "the budget to be spent")


def test_pause_turn_is_gone_on_with_and_the_parts_are_one_answer(stack: Stack) -> None:
    """(Since this round, a paused turn is resumed; before, the caller got the text so far with ``stop``.) The
    second call carries the turn so far as the assistant's; the citations of both parts point into the whole
    content."""
    blocks = [text_block(*TEXTS[0]), search_block(), results_block(), text_block(*TEXTS[1])]
    stack.claude.script(Fault.raw(body=answer(blocks, "pause_turn")),
                        Fault.raw(body=answer([text_block(*TEXTS[2]), text_block(*TEXTS[3])], searches=0)))
    choice = stack.client().chat.completions.create(model="claude/sonnet", messages=QUESTION,
                                                    web_search_options={}).choices[0]
    assert len(stack.claude.calls) == 2
    assert stack.claude.calls[1].body["messages"][-1] == {"role": "assistant", "content": blocks}
    assert choice.finish_reason == "stop"
    assert choice.message.content == "".join(t for t, _ in TEXTS[:4])
    assert spans(choice.message.content, [n.model_dump() for n in choice.message.annotations or []]) == [
        (URL_A, "A – été", TEXTS[1][0]), (URL_A, "A – été", TEXTS[3][0]), (URL_B, "B", TEXTS[3][0])]


# -- OpenAI-compatible, validation


def test_openai_compatible_provider_gets_web_search_options_as_sent(stack: Stack) -> None:
    options = {"search_context_size": "high", "user_location": {"type": "approximate",
                                                                "approximate": {"city": "Zürich", "country": "CH"}}}
    note = {"type": "url_citation", "url_citation": {"url": URL_A, "title": "A", "start_index": 0, "end_index": 2}}
    stack.oai.script(Fault.raw(body={
        "id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-search-preview",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "Hi there", "annotations": [note]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}))
    got = stack.client().chat.completions.create(model="oai/gpt", messages=QUESTION,
                                                 web_search_options=options)  # type: ignore[arg-type]
    assert stack.oai.calls[0].body["web_search_options"] == options
    assert [n.model_dump() for n in got.choices[0].message.annotations or []] == [note]


@pytest.mark.parametrize(("options", "param"), [
    ([], "web_search_options"),
    ({"user_location": {"type": "approximate"}}, "web_search_options.user_location"),
    ({"user_location": {"type": "exact", "approximate": {"city": "Lyon"}}}, "web_search_options.user_location"),
    ({"search_context_size": "LOW"}, "web_search_options.search_context_size"),
])
def test_bad_web_search_options_are_a_400_naming_them(stack: Stack, options: Any, param: str) -> None:
    r = httpx.post(f"{stack.gateway.base}/v1/chat/completions", headers={"authorization": "Bearer key-acme"},
                   json={"model": "claude/sonnet", "messages": QUESTION, "web_search_options": options}, timeout=20)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not stack.claude.calls


def test_null_members_are_as_if_absent(stack: Stack) -> None:
    """OpenAI's user_location is nullable; search_context_size defaults to medium."""
    stack.claude.script(Fault.raw(body=answer(rich_blocks())))
    r = httpx.post(f"{stack.gateway.base}/v1/chat/completions", headers={"authorization": "Bearer key-acme"},
                   json={"model": "claude/sonnet", "messages": QUESTION,
                         "web_search_options": {"search_context_size": None, "user_location": None}}, timeout=20)
    assert r.status_code == 200, r.text
    assert stack.claude.calls[0].body["tools"] == [{"type": "web_search_20250305", "name": "web_search",
                                                    "max_uses": 5}]


def test_empty_search_context_size_is_a_400(stack: Stack) -> None:
    stack.claude.script(Fault.raw(body=answer(rich_blocks())))
    r = httpx.post(f"{stack.gateway.base}/v1/chat/completions", headers={"authorization": "Bearer key-acme"},
                   json={"model": "claude/sonnet", "messages": QUESTION,
                         "web_search_options": {"search_context_size": ""}}, timeout=20)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "web_search_options.search_context_size"
    assert not stack.claude.calls


def test_unknown_location_field_is_a_400(stack: Stack) -> None:
    stack.claude.script(Fault.raw(body=answer(rich_blocks())))
    r = httpx.post(f"{stack.gateway.base}/v1/chat/completions", headers={"authorization": "Bearer key-acme"},
                   json={"model": "claude/sonnet", "messages": QUESTION, "web_search_options": {
                       "user_location": {"type": "approximate",
                                         "approximate": {"city": "Lyon", "postal_code": "69001"}}}}, timeout=20)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "web_search_options.user_location"
    assert not stack.claude.calls


def test_searched_answer_sent_back_in_the_conversation(stack: Stack) -> None:
    """The openai client's message, annotations and all, goes back in the next turn: Anthropic gets its text."""
    stack.claude.script(Fault.raw(body=answer(rich_blocks())))
    first = stack.client().chat.completions.create(model="claude/sonnet", messages=QUESTION, web_search_options={})
    stack.claude.script(Fault.raw(body=answer([text_block("Sure.", [])])))
    history = [*QUESTION, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "user", "content": "And before that?"}]
    got = stack.client().chat.completions.create(model="claude/sonnet", messages=history,  # type: ignore[arg-type]
                                                 web_search_options={})
    assert got.choices[0].message.content == "Sure."
    sent = stack.claude.calls[1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == [{"type": "text", "text": CONTENT}]


def test_n2_streamed_with_search_each_choice_its_annotations(stack: Stack) -> None:
    blocks = [search_block(), results_block(), text_block(*TEXTS[0]), text_block(*TEXTS[1])]
    stack.claude.script(Fault.raw(events=events(blocks)), Fault.raw(events=events(blocks)))
    chunks, _ = stream_of(stack, n=2, web_search_options={})
    for index in (0, 1):
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].index == index]
        content = "".join(d.content or "" for d in deltas)
        notes = [n for d in deltas for n in (d.model_extra or {}).get("annotations") or []]
        assert content == TEXTS[0][0] + TEXTS[1][0]
        assert spans(content, notes) == [(URL_A, "A – été", TEXTS[1][0])]
