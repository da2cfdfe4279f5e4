"""QA of Anthropic extended thinking and prompt caching, end to end, as a user migrating from LiteLLM meets them.

The stack is test_cloud_fidelity.py's (its fixture, started again for this module): the official openai client
or httpx -> gateway -> router -> cloud-adapter -> fake OpenAI-compatible and Anthropic providers answering what
each test scripts. QA found four bugs, fixed since (a streamed cache hit replayed the answer before its
reasoning; a system message's cache_control was lost with its empty last part; usage did not show the tokens
written to the cache, whole or streamed); the other tests check behaviour that no other test covers.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.e2e import test_cloud_fidelity
from tests.e2e.test_cloud_fidelity import (
    TOOLS,
    USER,
    QAStack,
    anthropic_events,
    anthropic_message,
    assert_cache_priced,
    sse,
    streamed_tool_arguments,
)
from tests.fakes import Fault
from tests.support import NatsServer, tag

pytestmark = pytest.mark.e2e
qa = test_cloud_fidelity.qa  # the same stack as test_cloud_fidelity.py's, for this module
_fresh = test_cloud_fidelity._fresh
THOUGHT = {"type": "thinking", "thinking": "The user greets me; greet back.", "signature": "EqQBCgIYAhIM=="}
REDACTED = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr"}
MARK = {"type": "ephemeral"}



def extra(model: Any) -> dict[str, Any]:
    return dict(model.model_extra or {}) if model is not None else {}


def create(qa: QAStack, **kw: Any) -> Any:
    """The openai client's chat.completions.create (messages as plain dicts, LiteLLM's fields included)."""
    return qa.client().chat.completions.create(**kw)


def create_raw(qa: QAStack, **kw: Any) -> Any:
    return qa.client().chat.completions.with_raw_response.create(**kw)


def stream_chunks(qa: QAStack, **kw: Any) -> list[Any]:
    return list(create(qa, stream=True, **kw))


def deltas(chunks: list[Any], index: int = 0) -> list[dict[str, Any]]:
    """Each chunk's delta of choice ``index`` as a dict (its extras included)."""
    out = []
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.index == index:
                out.append({**extra(choice.delta), "content": choice.delta.content,
                            "tool_calls": choice.delta.tool_calls})
    return out


def renumber(event: str, by: int) -> str:
    """A Messages stream event with its block index moved on by ``by``."""
    head, _, data = event.partition("data: ")
    body = json.loads(data)
    if "index" in body:
        body["index"] += by
    return head + "data: " + json.dumps(body) + "\n\n"


def reasoning(ds: list[dict[str, Any]]) -> str:
    return "".join(d.get("reasoning_content") or "" for d in ds)


def blocks(ds: list[dict[str, Any]]) -> list[Any]:
    return [b for d in ds for b in d.get("thinking_blocks") or []]


def content(ds: list[dict[str, Any]]) -> str:
    return "".join(d.get("content") or "" for d in ds)


# -- streamed thinking, with tool calls and redacted thinking

def test_streamed_thinking_then_tool_calls_keep_their_indexes(qa: QAStack) -> None:
    """Thinking (block 0), text (block 1), two tool_use blocks (2, 3): the tool calls are indexes 0 and 1 with
    their arguments, the thinking comes whole once, and the finish reason is tool_calls."""
    qa.claude.script(Fault.raw(events=anthropic_events([
        THOUGHT, {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"email": "a"}},
        {"type": "tool_use", "id": "toolu_2", "name": "lookup", "input": {"email": "b"}}], "tool_use")))
    chunks = stream_chunks(qa, model="claude/sonnet", messages=USER, tools=TOOLS, reasoning_effort="low")
    ds = deltas(chunks)
    assert reasoning(ds) == THOUGHT["thinking"]
    assert blocks(ds) == [THOUGHT]
    assert content(ds) == "Let me look."
    assert [json.loads(a) for a in streamed_tool_arguments(chunks)] == [{"email": "a"}, {"email": "b"}]
    ids = [c.id for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or [] if c.id]
    assert ids == ["toolu_1", "toolu_2"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_streamed_redacted_thinking_comes_whole_in_order(qa: QAStack) -> None:
    """A redacted_thinking block streams as one content_block_start carrying its data, then its stop: it is a
    thinking_blocks delta of its own, before the thinking block that follows it, and adds no reasoning text."""
    events = anthropic_events([THOUGHT, {"type": "text", "text": "Hello!"}], "end_turn")
    events = [renumber(e, 1) for e in events]  # the thinking and text blocks become 1 and 2
    start = next(i for i, e in enumerate(events) if "content_block_start" in e)
    events[start:start] = [
        sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": REDACTED}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0})]
    qa.claude.script(Fault.raw(events=events))
    ds = deltas(stream_chunks(qa, model="claude/sonnet", messages=USER, reasoning_effort="low"))
    assert blocks(ds) == [REDACTED, THOUGHT]
    assert reasoning(ds) == THOUGHT["thinking"]
    assert content(ds) == "Hello!"


def test_interleaved_thinking_between_tool_calls_whole(qa: QAStack) -> None:
    """Interleaved thinking (thinking, tool_use, thinking, tool_use): both tool calls, both blocks in order."""
    second = {"type": "thinking", "thinking": "Now the other one.", "signature": "sig2"}
    qa.claude.script(Fault.raw(body=anthropic_message([
        THOUGHT, {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"email": "a"}},
        second, {"type": "tool_use", "id": "toolu_2", "name": "lookup", "input": {"email": "b"}}], "tool_use")))
    r = create(qa, model="claude/sonnet", messages=USER, tools=TOOLS, reasoning_effort="low")
    message = r.choices[0].message
    assert [c.id for c in message.tool_calls or []] == ["toolu_1", "toolu_2"]
    assert extra(message)["thinking_blocks"] == [THOUGHT, second]
    assert extra(message)["reasoning_content"] == THOUGHT["thinking"] + second["thinking"]
    assert r.choices[0].finish_reason == "tool_calls"


# -- sending a thinking answer back, as the openai client holds it

def test_the_openai_clients_message_object_sent_back_carries_its_thinking_blocks(qa: QAStack) -> None:
    """`messages.append(response.choices[0].message)`, the openai client's own object: Anthropic gets the
    turn's thinking block (signed) before its tool_use."""
    qa.claude.script(Fault.raw(body=anthropic_message([
        THOUGHT, {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"email": "a"}}], "tool_use")))
    first = create(qa, model="claude/sonnet", messages=USER, tools=TOOLS,
                                                reasoning_effort="low")
    messages: list[Any] = [*USER, first.choices[0].message,
                           {"role": "tool", "tool_call_id": "toolu_1", "content": "nobody"}]
    create(qa, model="claude/sonnet", messages=messages, tools=TOOLS, reasoning_effort="low")
    turn = qa.claude.calls[-1].body["messages"][1]
    assert turn["content"][0] == THOUGHT
    assert turn["content"][1]["type"] == "tool_use"


# -- the exact cache replaying thinking answers

def test_a_cached_thinking_answer_keeps_its_thinking_whole(qa: QAStack) -> None:
    """"cache": true: the second request is answered from the cache with the same reasoning and blocks."""
    messages = [{"role": "user", "content": tag()}]
    qa.claude.script(Fault.raw(body=anthropic_message([THOUGHT, {"type": "text", "text": "Hello!"}], "end_turn")))
    answers = [create_raw(qa, model="claude/sonnet", messages=messages, reasoning_effort="low",
                          extra_body={"cache": True}) for _ in range(2)]
    assert [a.headers["x-leafwire-cache"] for a in answers] == ["miss", "hit"]
    assert len(qa.claude.calls) == 1
    message = answers[1].parse().choices[0].message
    assert message.content == "Hello!"
    assert extra(message)["thinking_blocks"] == [THOUGHT]
    assert extra(message)["reasoning_content"] == THOUGHT["thinking"]


def test_a_cached_streamed_thinking_answer_replays_whole(qa: QAStack) -> None:
    """Stored from a stream, replayed as a stream: the same reasoning, blocks and text."""
    messages = [{"role": "user", "content": tag()}]
    qa.claude.script(Fault.raw(events=anthropic_events([THOUGHT, {"type": "text", "text": "Hello!"}], "end_turn")))
    live, replay = (deltas(stream_chunks(qa, model="claude/sonnet", messages=messages, reasoning_effort="low",
                                         extra_body={"cache": True})) for _ in range(2))
    assert len(qa.claude.calls) == 1
    for ds in (live, replay):
        assert (reasoning(ds), blocks(ds), content(ds)) == (THOUGHT["thinking"], [THOUGHT], "Hello!")


def test_a_cached_streamed_thinking_answer_replays_reasoning_before_the_answer(qa: QAStack) -> None:
    """A UI that shows the reasoning as it streams, then the answer: replayed from the cache, the reasoning must
    still come first, as it did live (Anthropic thinks before it answers)."""
    messages = [{"role": "user", "content": tag()}]
    qa.claude.script(Fault.raw(events=anthropic_events([THOUGHT, {"type": "text", "text": "Hello!"}], "end_turn")))
    for _ in range(2):
        ds = deltas(stream_chunks(qa, model="claude/sonnet", messages=messages, reasoning_effort="low",
                                  extra_body={"cache": True}))
        kinds = [k for d in ds for k in ("reasoning_content", "content") if d.get(k)]
        assert kinds.index("reasoning_content") < kinds.index("content"), kinds


# -- thinking with n > 1 (a call a choice to Claude)

@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_thinking_with_n_gives_every_choice_its_own_thinking(qa: QAStack, stream: bool) -> None:
    second = {"type": "thinking", "thinking": "Another thought.", "signature": "sig-b"}

    def answer(thought: dict[str, Any], text: str) -> Fault:
        blocks_ = [thought, {"type": "text", "text": text}]
        return (Fault.raw(events=anthropic_events(blocks_, "end_turn")) if stream
                else Fault.raw(body=anthropic_message(blocks_, "end_turn")))

    qa.claude.script(answer(THOUGHT, "one"), answer(second, "two"))
    kw: dict[str, Any] = {"model": "claude/sonnet", "messages": USER, "n": 2, "reasoning_effort": "medium"}
    if stream:
        chunks = stream_chunks(qa, **kw)
        got = {(content(deltas(chunks, i)), json.dumps(blocks(deltas(chunks, i)))) for i in (0, 1)}
    else:
        r = create(qa, **kw)
        got = {(c.message.content, json.dumps(extra(c.message)["thinking_blocks"])) for c in r.choices}
    assert got == {("one", json.dumps([THOUGHT])), ("two", json.dumps([second]))}
    assert [c.body["thinking"]["budget_tokens"] for c in qa.claude.calls] == [2048, 2048]


# -- prompt caching marks

def test_cache_control_on_an_assistant_string_and_a_tool_message_of_parts(qa: QAStack) -> None:
    """An assistant's string content marked, and a tool message whose content is a list of parts, marked as a
    message: both marks reach Anthropic on those blocks."""
    create(qa, model="claude/sonnet", tools=TOOLS, messages=[
        *USER, {"role": "assistant", "content": "Looking.", "cache_control": MARK},
        {"role": "user", "content": "go on"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "cache_control": MARK,
         "content": [{"type": "text", "text": "found"}, {"type": "text", "text": "nobody"}]}])
    sent = qa.claude.calls[-1].body["messages"]
    assert sent[1]["content"] == [{"type": "text", "text": "Looking.", "cache_control": MARK}]
    result = sent[-1]["content"][-1]
    assert result["type"] == "tool_result"
    assert result["cache_control"] == MARK
    assert [b["text"] for b in result["content"]] == ["found", "nobody"]


def test_cache_control_with_an_empty_system_text_is_not_sent_empty(qa: QAStack) -> None:
    """An empty system text marked for caching: Anthropic refuses empty text blocks, so none is sent."""
    create(qa, model="claude/sonnet", messages=[
        {"role": "system", "content": "Be brief.", "cache_control": MARK},
        {"role": "system", "content": "", "cache_control": MARK}, *USER])
    system = qa.claude.calls[-1].body["system"]
    assert all(b["text"] for b in system)
    assert system[0]["cache_control"] == MARK


def test_a_system_message_mark_survives_an_empty_last_part(qa: QAStack) -> None:
    """A message-level cache_control marks the message's last block: when the last part is empty (dropped, as
    Anthropic refuses empty text) the mark must go on the last block that is sent, not vanish."""
    create(qa, model="claude/sonnet", messages=[
        {"role": "system", "cache_control": MARK,
         "content": [{"type": "text", "text": "The plant's manual, long."}, {"type": "text", "text": ""}]}, *USER])
    system = qa.claude.calls[-1].body["system"]
    assert any(b.get("cache_control") == MARK for b in system), system


# -- OpenAI-compatible providers get the fields as sent

def test_reasoning_effort_and_thinking_pass_unchanged_to_an_openai_compatible_model(qa: QAStack) -> None:
    create(qa, model="oai/gpt", messages=USER, reasoning_effort="minimal")
    create(qa, model="oai/gpt", messages=[{"role": "user", "content": "hi",
                                                                    "cache_control": MARK}],
                                        extra_body={"thinking": {"type": "enabled", "budget_tokens": 2000}})
    first, second = (c.body for c in qa.oai.calls)
    assert first["reasoning_effort"] == "minimal"
    assert "thinking" not in first
    assert "max_tokens" not in first
    assert second["thinking"] == {"type": "enabled", "budget_tokens": 2000}
    assert second["messages"][0]["cache_control"] == MARK


# -- usage and cost of streamed answers with cache writes

@pytest.mark.parametrize("cumulative", [False, True], ids=["output-only-delta", "cumulative-delta"])
def test_a_streamed_answers_cache_writes_are_priced(qa: QAStack, nats_server: NatsServer, cumulative: bool) -> None:
    """message_start carries the cache writes and reads (message_delta its output tokens, or, as Anthropic's
    API now sends it, every count again): the caller's usage chunk counts the whole prompt, and the usage event
    prices the writes at cache_write_input_per_mtok."""
    events = anthropic_events([{"type": "text", "text": "ok"}], "end_turn")
    events[0] = events[0].replace('"usage": {"input_tokens": 10, "output_tokens": 1}',
                                  '"usage": {"input_tokens": 10, "output_tokens": 1, '
                                  '"cache_creation_input_tokens": 100, "cache_read_input_tokens": 50}')
    assert "cache_creation_input_tokens" in events[0]
    if cumulative:
        events[-2] = events[-2].replace('"usage": {"output_tokens": 5}', '"usage": {"input_tokens": 10, '
                                        '"cache_creation_input_tokens": 100, "cache_read_input_tokens": 50, '
                                        '"output_tokens": 5}')
        assert "cache_read_input_tokens" in events[-2]
    qa.claude.script(Fault.raw(events=events))
    raw = create_raw(qa, model="claude/opus", messages=[{"role": "user", "content": "x", "cache_control": MARK}],
                     stream=True, stream_options={"include_usage": True})
    assert_cache_priced(list(raw.parse())[-1].usage, nats_server, raw.headers["x-request-id"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_usage_reports_the_tokens_written_to_anthropics_cache(qa: QAStack, stream: bool) -> None:
    """The tokens written to the cache (billed at 1.25x) must be readable by the caller: the openai client's
    usage has prompt_tokens_details.cache_write_tokens, and LiteLLM's has cache_creation_input_tokens (its docs
    tell users to check it to verify that caching happened). Either will do."""
    usage = {"cache_creation_input_tokens": 100, "cache_read_input_tokens": 0}
    if stream:
        events = anthropic_events([{"type": "text", "text": "ok"}], "end_turn")
        events[0] = events[0].replace('"output_tokens": 1}', '"output_tokens": 1, "cache_creation_input_tokens": 100, '
                                                             '"cache_read_input_tokens": 0}')
        qa.claude.script(Fault.raw(events=events))
        chunks = stream_chunks(qa, model="claude/opus", messages=[{"role": "user", "content": "x",
                                                                   "cache_control": MARK}],
                               stream_options={"include_usage": True})
        got = chunks[-1].usage
    else:
        qa.claude.script(Fault.raw(body=anthropic_message([{"type": "text", "text": "ok"}], "end_turn", **usage)))
        got = create(qa, model="claude/opus", messages=[
            {"role": "user", "content": "x", "cache_control": MARK}]).usage
    assert got is not None
    assert got.prompt_tokens == 110
    written = got.prompt_tokens_details.cache_write_tokens if got.prompt_tokens_details else None
    assert 100 in (written, extra(got).get("cache_creation_input_tokens")), got


def test_thinking_asked_or_not_are_separate_cache_entries(qa: QAStack) -> None:
    """The exact cache: the same prompt asked with and without reasoning_effort are two answers, not one."""
    messages = [{"role": "user", "content": tag()}]
    qa.claude.script(Fault.raw(body=anthropic_message([{"type": "text", "text": "plain"}], "end_turn")),
                     Fault.raw(body=anthropic_message([THOUGHT, {"type": "text", "text": "thought"}], "end_turn")))
    plain = create(qa, model="claude/sonnet", messages=messages, extra_body={"cache": True})
    thought = create(qa, model="claude/sonnet", messages=messages, reasoning_effort="low",
                                                  extra_body={"cache": True})
    assert (plain.choices[0].message.content, thought.choices[0].message.content) == ("plain", "thought")
    assert extra(thought.choices[0].message)["thinking_blocks"] == [THOUGHT]
    assert len(qa.claude.calls) == 2


def test_a_masked_part_keeps_its_cache_control(qa: QAStack) -> None:
    """Masking rewrites a marked part's text (an e-mail address): its cache_control still reaches Anthropic."""
    create(qa, model="claude/sonnet", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Mail jane.doe@plant.example about it.", "cache_control": MARK},
        {"type": "text", "text": "Now."}]}])
    first = qa.claude.calls[-1].body["messages"][0]["content"][0]
    assert "[EMAIL]" in first["text"]
    assert first["cache_control"] == MARK


# -- a server without n, remembered per model: the text completions endpoint shares it with chat

NO_N = Fault.error(400, {"error": {"message": "n must be 1", "type": "invalid_request_error", "param": "n",
                                   "code": None}})


def test_a_server_without_n_found_out_by_text_completions_is_remembered_for_chat_too(qa: QAStack) -> None:
    """/v1/completions with n finds the server out (one call with n, refused); the model's next requests with
    n, chat or text, whole or streamed, are asked a call a choice at once."""
    qa.oai.script(NO_N)
    headers = {"Authorization": "Bearer key-acme"}
    r = httpx.post(f"{qa.base}/completions", json={"model": "oai/gpt", "prompt": tag(), "n": 2, "max_tokens": 5},
                   headers=headers, timeout=20)
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert [c.body.get("n") for c in qa.oai.calls] == [2, None, None]
    qa.oai.reset()
    r = qa.post({"model": "oai/gpt", "messages": [{"role": "user", "content": tag()}], "n": 2})
    assert r.status_code == 200, r.text
    with httpx.stream("POST", f"{qa.base}/completions", headers=headers, timeout=20,
                      json={"model": "oai/gpt", "prompt": tag(), "n": 2, "max_tokens": 5, "stream": True}) as s:
        s.read()
    assert s.text.rstrip().endswith("data: [DONE]")
    assert [c.body.get("n") for c in qa.oai.calls] == [None] * 4
