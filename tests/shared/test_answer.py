"""Writing answers in OpenAI's shape: streamed chunks or one result, from text or any message fields."""

from __future__ import annotations

import json
from typing import Any

from schemas.chat import ChatCompletionChunk, StreamEnd, Usage
from shared.answer import Answer, final_message, merge_delta, message_deltas
from shared.replies import Event


class Recorder:
    """Stands in for a ReplyPublisher: keeps what would be published."""

    def __init__(self) -> None:
        self.sent: list[tuple[Event, Any]] = []

    async def send(self, event: Event, body: bytes) -> None:
        self.sent.append((event, json.loads(body)))


def answer(stream: bool, include_usage: bool = False) -> tuple[Answer, Recorder]:
    rec = Recorder()
    return Answer(rec, "r1", "p/m", stream, include_usage), rec  # type: ignore[arg-type]


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}


class TestMerge:
    def test_text_and_tool_call_pieces_merge(self) -> None:
        """Streamed pieces add up to the whole message: text concatenates, tool calls merge by index."""
        message: dict[str, Any] = {}
        for d in [{"content": "Hel"}, {"content": "lo"}, {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                                          "function": {"name": "f", "arguments": ""}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}]:
            merge_delta(message, d)
        assert message == {"content": "Hello", "tool_calls": [CALL]}

    def test_annotations_of_each_piece_add_up(self) -> None:
        """Each delta's annotations (a cited block's, as it ends) join those before: the whole message (a cached
        stream, one made whole) has every citation."""
        first, second = ({"type": "url_citation", "url_citation": {"start_index": i, "end_index": i + 2, "url": u,
                                                                   "title": ""}} for i, u in ((0, "a"), (2, "b")))
        message: dict[str, Any] = {}
        for d in [{"content": "ab"}, {"annotations": [first]}, {"content": "cd"}, {"annotations": [second]}]:
            merge_delta(message, d)
        assert message == {"content": "abcd", "annotations": [first, second]}

    def test_whole_message_to_deltas_and_back(self) -> None:
        """Replaying a whole message as deltas rebuilds the same message."""
        original = {"content": "Hi", "tool_calls": [CALL], "refusal": None}
        rebuilt: dict[str, Any] = {}
        for d in message_deltas(original):
            merge_delta(rebuilt, d)
        assert rebuilt == {"content": "Hi", "tool_calls": [CALL]}

    def test_final_message_shape(self) -> None:
        """A message with only tool calls has content null; an empty answer has content ''."""
        assert final_message({"tool_calls": [CALL]})["content"] is None
        assert final_message({}) == {"role": "assistant", "content": ""}
        assert final_message({"refusal": "I can't help with that."}) == {  # a refusal keeps content null
            "role": "assistant", "content": None, "refusal": "I can't help with that."}


class TestAnswer:
    async def test_streamed(self) -> None:
        """Role chunk, deltas, finish chunk, usage chunk, then done: each a valid OpenAI chunk."""
        a, rec = answer(stream=True, include_usage=True)
        await a.text("Hi")
        await a.delta({"tool_calls": [{"index": 0, **CALL}]})
        await a.finish("tool_calls", Usage.of(3, 2))
        kinds = [e for e, _ in rec.sent]
        assert kinds == [Event.CHUNK] * 5 + [Event.DONE]
        chunks = [ChatCompletionChunk.model_validate(b) for _, b in rec.sent[:5]]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert rec.sent[2][1]["choices"][0]["delta"]["tool_calls"][0]["id"] == "c1"
        assert chunks[3].choices[0].finish_reason == "tool_calls"
        assert chunks[4].usage == Usage.of(3, 2)
        assert {c.id for c in chunks} == {"chatcmpl-r1"}
        assert StreamEnd.model_validate(rec.sent[5][1]).finish_reason == "tool_calls"

    async def test_whole(self) -> None:
        """Without streaming, everything arrives as one chat.completion with the message and usage."""
        a, rec = answer(stream=False)
        await a.whole({"content": "Hi", "tool_calls": [CALL]}, "tool_calls", Usage.of(3, 2))
        ((event, body),) = rec.sent
        assert event is Event.RESULT
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi", "tool_calls": [CALL]}
        assert body["usage"]["total_tokens"] == 5
        assert (body["choices"][0]["logprobs"], body["system_fingerprint"]) == (None, None)

    async def test_logprobs_and_fingerprint_reach_the_caller(self) -> None:
        """A provider's log probabilities go with the chunk (or the whole answer) they came with, and its
        system fingerprint is on every chunk from the one it was learnt on, the usage chunk included."""
        logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]}
        a, rec = answer(stream=True, include_usage=True)
        await a.begin()
        a.fingerprint = "fp_1"
        await a.delta({"content": "Hi"}, logprobs)
        await a.finish("stop", Usage.of(1, 1))
        bodies = [b for e, b in rec.sent if e is Event.CHUNK]
        assert [b["system_fingerprint"] for b in bodies] == [None, "fp_1", "fp_1", "fp_1"]
        assert [b["choices"][0]["logprobs"] if b["choices"] else "-" for b in bodies] == [None, logprobs, None, "-"]
        assert ChatCompletionChunk.model_validate(bodies[1]).choices[0].logprobs == logprobs
        whole, rec = answer(stream=False)
        whole.fingerprint = "fp_2"
        await whole.whole({"content": "Hi"}, "stop", Usage.of(1, 1), logprobs)
        ((_, body),) = rec.sent
        assert (body["choices"][0]["logprobs"], body["system_fingerprint"]) == (logprobs, "fp_2")
