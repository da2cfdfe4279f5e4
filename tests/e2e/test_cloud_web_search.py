"""Web search on an Anthropic model, asked the way OpenAI's clients ask it (``web_search_options``), as LiteLLM
translates it: the official openai client -> gateway -> router -> cloud-adapter -> a fake Anthropic server
answering what a test scripts (``Fault.raw``), as Anthropic's web search answers: the search it ran and its
results (its own blocks, which are not the caller's tool calls), then text blocks citing the results.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.test_cloud_fidelity import anthropic_message, sse
from tests.fakes import FakeProvider, Fault
from tests.support import NatsServer, Service, cloud_router_env, running

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "When did line 3's motor maker last recall a part?"}]
URL = "https://example.com/recalls/2026-10"
SEARCH = {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search",
          "input": {"query": "motor maker recall 2026"}}
RESULTS = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01", "content": [
    {"type": "web_search_result", "url": URL, "title": "Recalls, October 2026", "encrypted_content": "EqgfCioIARgB",
     "page_age": "October 2, 2026"}]}
INTRO = "Going by the maker's notices, "
CITED = "the last recall was on October 2, 2026, for a bearing."
CITATION = {"type": "web_search_result_location", "url": URL, "title": "Recalls, October 2026",
            "encrypted_index": "Eo8BCioIAhgB", "cited_text": "Recall notice: bearing 6204, October 2, 2026"}
INPUT_PRICE, OUTPUT_PRICE, SEARCH_PRICE = 3.0, 15.0, 10.0  # per million tokens; per 1,000 searches


@dataclass
class Stack:
    gateway: Service
    claude: FakeProvider

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key="key-acme", max_retries=0, timeout=20)


def write_providers(path: Path, claude: FakeProvider) -> Path:
    path.write_text(json.dumps({"providers": [{
        "name": "claude", "kind": "anthropic", "base_url": claude.url, "local": True,
        "timeouts": {"connect_s": 2, "first_byte_s": 2, "total_s": 10},
        "models": {"sonnet": {"upstream": "claude-x", "max_tokens": 256, "input_per_mtok": INPUT_PRICE,
                              "output_per_mtok": OUTPUT_PRICE, "web_search_per_1k": SEARCH_PRICE}}}]}))
    return path


@pytest.fixture(scope="module")
def stack(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    claude = FakeProvider("anthropic").start()
    file = write_providers(tmp_path_factory.mktemp("search") / "providers.yaml", claude)
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": "search"}
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(file), "LW_CLOUD_BACKOFF_BASE_S": "0.01"})
    router = Service("router", {**env, **cloud_router_env(file.parent)})
    gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": "key-acme:acme"})
    try:
        with running(adapter, router, gateway):
            yield Stack(gateway, claude)
    finally:
        claude.stop()


@pytest.fixture(autouse=True)
def _fresh(stack: Stack) -> None:
    stack.claude.reset()


def searched_answer(searches: int = 1) -> dict[str, Any]:
    return anthropic_message([SEARCH, RESULTS, {"type": "text", "text": INTRO},
                              {"type": "text", "text": CITED, "citations": [CITATION]}], "end_turn",
                             server_tool_use={"web_search_requests": searches})  # type: ignore[arg-type]


def searched_events() -> list[str]:
    """The same answer streamed as Anthropic streams it: the search's input in JSON pieces, its results whole,
    the cited text's citation as a ``citations_delta`` before its text."""
    def block(i: int, kind: str, **data: Any) -> str:
        return sse(kind, {"type": kind, "index": i, **data})
    return [
        sse("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
            "stop_reason": None, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        block(0, "content_block_start", content_block={**SEARCH, "input": {}}),
        block(0, "content_block_delta", delta={"type": "input_json_delta", "partial_json": '{"query": "motor '}),
        block(0, "content_block_delta", delta={"type": "input_json_delta", "partial_json": 'maker recall 2026"}'}),
        block(0, "content_block_stop"),
        block(1, "content_block_start", content_block=RESULTS),
        block(1, "content_block_stop"),
        block(2, "content_block_start", content_block={"type": "text", "text": ""}),
        block(2, "content_block_delta", delta={"type": "text_delta", "text": INTRO}),
        block(2, "content_block_stop"),
        block(3, "content_block_start", content_block={"type": "text", "text": "", "citations": []}),
        block(3, "content_block_delta", delta={"type": "citations_delta", "citation": CITATION}),
        block(3, "content_block_delta", delta={"type": "text_delta", "text": CITED[:20]}),
        block(3, "content_block_delta", delta={"type": "text_delta", "text": CITED[20:]}),
        block(3, "content_block_stop"),
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                              "usage": {"output_tokens": 5, "server_tool_use": {"web_search_requests": 1}}}),
        sse("message_stop", {"type": "message_stop"}),
    ]


def test_web_search_options_ask_anthropic_to_search(stack: Stack) -> None:
    """The search context size is how many searches the model may run (low 1, medium 5, high 10, as LiteLLM
    maps it); an approximate user location is Anthropic's own; the caller's own tools stay beside it."""
    stack.claude.script(Fault.raw(body=searched_answer()))
    tool = {"type": "function", "function": {"name": "open_ticket", "parameters": {"type": "object"}}}
    stack.client().chat.completions.create(
        model="claude/sonnet", messages=QUESTION, tools=[tool],  # type: ignore[list-item]
        web_search_options={"search_context_size": "low", "user_location": {
            "type": "approximate", "approximate": {"city": "Lyon", "country": "FR"}}})
    tools = stack.claude.calls[0].body["tools"]
    assert [t["name"] for t in tools] == ["open_ticket", "web_search"]
    assert tools[1] == {"type": "web_search_20250305", "name": "web_search", "max_uses": 1,
                        "user_location": {"type": "approximate", "city": "Lyon", "country": "FR"}}
    stack.claude.script(Fault.raw(body=searched_answer()))
    stack.client().chat.completions.create(model="claude/sonnet", messages=QUESTION, web_search_options={})
    assert stack.claude.calls[1].body["tools"] == [{"type": "web_search_20250305", "name": "web_search",
                                                    "max_uses": 5}]


def test_a_searched_answer_is_its_text_with_url_citations_and_the_searches_are_paid(stack: Stack) -> None:
    """The answer is the text blocks (the search and its results are Anthropic's own, not the caller's tool
    calls); each cited block is a ``url_citation`` annotation of its span of the content, as OpenAI's search
    models give them; the cost counts the searches at ``web_search_per_1k`` beside the tokens."""
    stack.claude.script(Fault.raw(body=searched_answer(searches=2)))
    raw = stack.client().chat.completions.with_raw_response.create(model="claude/sonnet", messages=QUESTION,
                                                                   web_search_options={})
    message = raw.parse().choices[0].message
    assert message.content == INTRO + CITED
    assert not message.tool_calls
    assert raw.parse().choices[0].finish_reason == "stop"
    (note,) = message.annotations or []
    assert note.type == "url_citation"
    assert (note.url_citation.url, note.url_citation.title) == (URL, "Recalls, October 2026")
    assert message.content[note.url_citation.start_index:note.url_citation.end_index] == CITED
    tokens = (10 * INPUT_PRICE + 5 * OUTPUT_PRICE) / 1e6
    assert float(raw.headers["x-leafwire-cost-usd"]) == pytest.approx(tokens + 2 * SEARCH_PRICE / 1000)


def test_a_searched_answer_streamed(stack: Stack) -> None:
    """Streamed: no tool call pieces for the search, the text as it comes, and the citation as an
    ``annotations`` delta once its text is whole, pointing at that text in the streamed content."""
    stack.claude.script(Fault.raw(events=searched_events()))
    chunks = list(stack.client().chat.completions.create(model="claude/sonnet", messages=QUESTION, stream=True,
                                                         web_search_options={},
                                                         stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.tool_calls for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert content == INTRO + CITED
    notes = [n for d in deltas for n in (d.model_extra or {}).get("annotations") or []]
    assert len(notes) == 1
    cited = notes[0]["url_citation"]
    assert cited["url"] == URL
    assert content[cited["start_index"]:cited["end_index"]] == CITED
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


@pytest.mark.parametrize(("options", "param"), [
    ({"search_context_size": "huge"}, "web_search_options.search_context_size"),
    ({"user_location": {"type": "approximate", "approximate": {"city": 69}}}, "web_search_options.user_location"),
    ({"user_location": "Lyon"}, "web_search_options.user_location"),
    ({"domains": ["example.com"]}, "web_search_options"),
])
def test_web_search_options_anthropic_cannot_take_are_a_400_before_any_call(stack: Stack, options: dict[str, Any],
                                                                            param: str) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        stack.client().chat.completions.create(model="claude/sonnet", messages=QUESTION,
                                               web_search_options=options)  # type: ignore[arg-type]
    assert exc.value.param == param  # type: ignore[attr-defined]
    assert not stack.claude.calls


def paused_answer() -> dict[str, Any]:
    """The first part of a turn Anthropic paused (its search ran long): the search, its results, no text yet."""
    return anthropic_message([SEARCH, RESULTS], "pause_turn",
                             server_tool_use={"web_search_requests": 1})  # type: ignore[arg-type]


def test_a_paused_turn_is_gone_on_with_and_its_parts_are_one_answer(stack: Stack) -> None:
    """``pause_turn``: the adapter sends the turn so far back as the assistant's, as Anthropic asks, and the
    caller gets one answer: the text of every part, its citations where they are in it, every part's usage
    and searches paid."""
    stack.claude.script(Fault.raw(body=paused_answer()), Fault.raw(body=searched_answer()))
    raw = stack.client().chat.completions.with_raw_response.create(model="claude/sonnet", messages=QUESTION,
                                                                   web_search_options={})
    first, second = stack.claude.calls
    assert second.body["messages"][:-1] == first.body["messages"]
    assert second.body["messages"][-1] == {"role": "assistant", "content": [SEARCH, RESULTS]}
    answer = raw.parse()
    message = answer.choices[0].message
    assert message.content == INTRO + CITED
    assert answer.choices[0].finish_reason == "stop"
    (note,) = message.annotations or []
    assert message.content[note.url_citation.start_index:note.url_citation.end_index] == CITED
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (20, 10)
    tokens = (20 * INPUT_PRICE + 10 * OUTPUT_PRICE) / 1e6
    assert float(raw.headers["x-leafwire-cost-usd"]) == pytest.approx(tokens + 2 * SEARCH_PRICE / 1000)


def test_a_turn_paused_again_and_again_is_answered_with_what_came(stack: Stack) -> None:
    """Gone on with at most four times: a fifth pause is the answer (what the parts said), not a loop."""
    stack.claude.script(*[Fault.raw(body=anthropic_message([{"type": "text", "text": f"part {i}. "}], "pause_turn"))
                          for i in range(6)])
    answer = stack.client().chat.completions.create(model="claude/sonnet", messages=QUESTION,
                                                    web_search_options={})
    assert len(stack.claude.calls) == 5
    assert answer.choices[0].message.content == "part 0. part 1. part 2. part 3. part 4. "
    assert answer.choices[0].finish_reason == "stop"
