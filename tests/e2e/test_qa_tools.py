"""QA of tool use and message translation, end to end, as a user of the official openai client meets them.

The stack is test_cloud_fidelity.py's (its fixture, started again for this module): the openai client ->
gateway -> router (masking on) -> cloud-adapter -> fake OpenAI-compatible and Anthropic providers answering
exactly the events or bodies each test scripts (``Fault.raw``). QA found four bugs, fixed since (masking an
e-mail right after a JSON escape in tool text broke its JSON, and numbers right after one were not masked;
a legacy ``function_call`` answer lost its finish reason and, cached from a stream, its call); the others
check what no other test covers (parallel streamed tool calls accumulated by the client's stream helper, a
round trip of several tool results).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e import test_cloud_fidelity
from tests.e2e.test_cloud_fidelity import (
    TOOLS,
    USER,
    QAStack,
    anthropic_message,
    openai_completion,
    openai_events,
    sse,
)
from tests.fakes import Fault

pytestmark = pytest.mark.e2e
qa = test_cloud_fidelity.qa  # the same stack as test_cloud_fidelity.py's, for this module
_fresh = test_cloud_fidelity._fresh
FUNCTIONS: list[Any] = [{"name": "lookup", "parameters": {"type": "object",
                                                          "properties": {"email": {"type": "string"}}}}]


def event(kind: str, **fields: Any) -> str:
    return sse(kind, {"type": kind, **fields})


def final(qa: QAStack, **kw: Any) -> Any:
    """The openai client's stream helper's final completion (what it accumulated from the deltas)."""
    with qa.client().chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        return stream.get_final_completion()


def calls_of(message: Any) -> list[tuple[str, str, Any]]:
    return [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


# -- streamed tool calls reach the client exactly as the provider sent them

def test_parallel_anthropic_tool_calls_streamed_between_text_blocks(qa: QAStack) -> None:
    """Two tool_use blocks, each between text blocks, their input JSON split at awkward places (inside a key,
    inside a string, an empty piece, an escape): the stream helper's result has both calls whole, in order,
    the text of both blocks, finish tool_calls and the usage."""
    events = [event("message_start", message={"id": "m", "type": "message", "role": "assistant", "model": "x",
                                              "content": [], "stop_reason": None,
                                              "usage": {"input_tokens": 11, "output_tokens": 1}})]

    def text(i: int, words: str) -> None:
        events.extend([event("content_block_start", index=i, content_block={"type": "text", "text": ""}),
                       event("content_block_delta", index=i, delta={"type": "text_delta", "text": words}),
                       event("content_block_stop", index=i)])

    def tool(i: int, call_id: str, pieces: list[str]) -> None:
        events.append(event("content_block_start", index=i, content_block={
            "type": "tool_use", "id": call_id, "name": "lookup", "input": {}}))
        events.extend(event("content_block_delta", index=i, delta={"type": "input_json_delta", "partial_json": p})
                      for p in pieces)
        events.append(event("content_block_stop", index=i))

    text(0, "Let me look.")
    tool(1, "toolu_A", ["", '{"em', 'ail": "a@', 'b.c"', "}"])
    text(2, " And the other.")
    tool(3, "toolu_B", ['{"email"', ': "\\u00c5sa@x.y"}'])
    events += [event("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None},
                     usage={"output_tokens": 42}), event("message_stop")]
    qa.claude.script(Fault.raw(events=events))
    got = final(qa, model="claude/sonnet", messages=USER, tools=TOOLS, stream_options={"include_usage": True})
    choice = got.choices[0]
    assert calls_of(choice.message) == [("toolu_A", "lookup", {"email": "a@b.c"}),
                                        ("toolu_B", "lookup", {"email": "Åsa@x.y"})]
    assert choice.message.content == "Let me look. And the other."
    assert choice.finish_reason == "tool_calls"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (11, 42)


def test_parallel_openai_compatible_tool_calls_streamed_by_index(qa: QAStack) -> None:
    """OpenAI's shape: each call's id and name on its first delta only, the pieces of two calls interleaved by
    index; the client accumulates exactly the provider's calls."""
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_A", "type": "function", "function": {"name": "lookup", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"em'}}]},
        {"tool_calls": [{"index": 1, "id": "call_B", "type": "function",
                         "function": {"name": "lookup", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ail":"a"}'}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}]
    qa.oai.script(Fault.raw(events=openai_events(deltas, "tool_calls")))
    got = final(qa, model="oai/gpt", messages=USER, tools=TOOLS, parallel_tool_calls=True)
    assert calls_of(got.choices[0].message) == [("call_A", "lookup", {"email": "a"}), ("call_B", "lookup", {})]
    assert got.choices[0].finish_reason == "tool_calls"
    assert qa.oai.calls[0].body["parallel_tool_calls"] is True


# -- tool results sent back

def test_several_tool_results_reach_claude_as_one_user_turn_in_order(qa: QAStack) -> None:
    """An assistant message with text and two tool calls, two tool messages (one of parts), a developer
    message between them and the user's next message: Claude gets the text and both tool_use blocks in one
    assistant turn, then one user turn with both tool_result blocks first, in order, ids matched."""
    calls: list[Any] = [
        {"id": "toolu_A", "type": "function", "function": {"name": "lookup", "arguments": '{"email": "x"}'}},
        {"id": "toolu_B", "type": "function", "function": {"name": "lookup", "arguments": ""}}]
    qa.client().chat.completions.create(model="claude/sonnet", tools=TOOLS, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "find both"},
        {"role": "assistant", "content": "Looking.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "toolu_A", "content": "one"},
        {"role": "developer", "content": "Answer in English."},
        {"role": "tool", "tool_call_id": "toolu_B", "content": [{"type": "text", "text": "two"},
                                                                {"type": "text", "text": "three"}]},
        {"role": "user", "content": "thanks"}])
    sent = qa.claude.calls[0].body
    assert sent["system"] == "Be brief.\n\nAnswer in English."
    assert sent["messages"][1:] == [
        {"role": "assistant", "content": [
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "toolu_A", "name": "lookup", "input": {"email": "x"}},
            {"type": "tool_use", "id": "toolu_B", "name": "lookup", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_A", "content": "one"},
            {"type": "tool_result", "tool_use_id": "toolu_B", "content": [{"type": "text", "text": "two"},
                                                                          {"type": "text", "text": "three"}]},
            {"type": "text", "text": "thanks"}]}]


# -- masking of tool call arguments and tool results (JSON text): the escapes JSON writes

NOTE = "Hi,\njane.doe@plant.example asked us to call."  # json.dumps writes the newline as \n


def tool_round_trip(arguments: str, result: str) -> list[Any]:
    return [{"role": "user", "content": "tell ops"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": result}]


@pytest.mark.parametrize("model", ["oai/gpt", "claude/sonnet"])
def test_masked_tool_call_arguments_stay_json(qa: QAStack, model: str) -> None:
    """docs/routing.md: the arguments are "still valid JSON after masking"."""
    arguments = json.dumps({"note": NOTE})
    qa.client().chat.completions.create(model=model, tools=TOOLS, messages=tool_round_trip(arguments, "done"))
    fake = qa.oai if model.startswith("oai/") else qa.claude
    (call,) = fake.calls
    if model.startswith("oai/"):
        sent = json.loads(call.body["messages"][1]["tool_calls"][0]["function"]["arguments"])
    else:
        sent = call.body["messages"][1]["content"][0]["input"]
    assert sent == {"note": "Hi,\n[EMAIL] asked us to call."}


@pytest.mark.parametrize("model", ["oai/gpt", "claude/sonnet"])
def test_phone_numbers_in_json_tool_text_are_masked(qa: QAStack, model: str) -> None:
    """The same numbers are masked in a message's plain text (a real newline before them)."""
    numbers = ["+44 20 7946 0958", "202-555-0143", "AB 12 34 56 C"]  # (QQ, the HMRC example, is no valid prefix)
    arguments = json.dumps({"call": "\n".join(["Numbers:", *numbers])})
    result = json.dumps({"contacts": "\t".join(["found", *numbers])})
    qa.client().chat.completions.create(model=model, tools=TOOLS, messages=tool_round_trip(arguments, result))
    fake = qa.oai if model.startswith("oai/") else qa.claude
    sent = json.dumps(fake.calls[0].body)
    assert [n for n in numbers if n in sent] == []


# -- legacy functions through an OpenAI-compatible provider (its answer "relayed")

@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_answer_keeps_its_finish_reason(qa: QAStack, stream: bool) -> None:
    call = {"name": "lookup", "arguments": '{"email":"q"}'}
    if stream:
        qa.oai.script(Fault.raw(events=openai_events([{"role": "assistant", "content": None,
                                                       "function_call": call}], "function_call")))
        chunks = list(qa.client().chat.completions.create(model="oai/gpt", messages=USER, functions=FUNCTIONS,
                                                          stream=True))
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        qa.oai.script(Fault.raw(body=openai_completion({"role": "assistant", "content": None, "function_call": call},
                                                       "function_call")))
        r = qa.client().chat.completions.create(model="oai/gpt", messages=USER, functions=FUNCTIONS)
        assert r.choices[0].message.function_call is not None
        reasons = [r.choices[0].finish_reason]
    assert reasons == ["function_call"]


def test_a_cached_streamed_function_call_comes_back_whole(qa: QAStack) -> None:
    qa.oai.script(Fault.raw(events=openai_events([
        {"role": "assistant", "content": None, "function_call": {"name": "lookup", "arguments": ""}},
        {"function_call": {"arguments": '{"email"'}}, {"function_call": {"arguments": ':"q"}'}}], "function_call")))
    client = qa.client()
    list(client.chat.completions.create(model="oai/gpt", messages=USER, functions=FUNCTIONS, temperature=0,
                                        stream=True))
    raw = client.chat.completions.with_raw_response.create(model="oai/gpt", messages=USER, functions=FUNCTIONS,
                                                           temperature=0)
    assert raw.headers["x-leafwire-cache"] == "hit"
    call = raw.parse().choices[0].message.function_call
    assert call is not None
    assert (call.name, call.arguments) == ("lookup", '{"email":"q"}')


def test_whole_tool_call_answers_of_claude_keep_content_null(qa: QAStack) -> None:
    """A whole answer of tool calls only has content null, as OpenAI's has. (Streamed, the role chunk comes
    before the answer is known and carries content "", as OpenAI's and vLLM's first chunks of text do: the
    stream helper's final message then has "".)"""
    qa.claude.script(Fault.raw(body=anthropic_message(
        [{"type": "tool_use", "id": "toolu_A", "name": "lookup", "input": {"email": "a"}}], "tool_use")))
    r = qa.client().chat.completions.create(model="claude/sonnet", messages=USER, tools=TOOLS)
    assert r.choices[0].message.content is None
    assert r.choices[0].finish_reason == "tool_calls"
