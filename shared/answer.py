"""Writing an answer in OpenAI's shape to the caller's reply subject, streamed or whole.

Whatever produces the answer (a local decoder, a cloud provider's stream, the cache) hands over pieces of
the assistant's message — text, or any delta fields a provider sends (``tool_calls``, ``reasoning_content``,
``refusal``...) — and then the end (finish reason and usage). ``Answer`` turns them into ``chunk`` events
and a closing ``done`` for ``stream: true``, or collects them into one ``result`` (a ``chat.completion``).

Chunks are built from pre-serialised JSON around each delta: this runs once per token on hot paths, and
JSON comes from pydantic-core's ``to_json`` (compact UTF-8, several times faster than ``json.dumps``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import to_json

from schemas.chat import ChatCompletionRequest, FinishReason, StreamEnd, Usage, dump
from shared.replies import Event, ReplyPublisher


def merge_delta(message: dict[str, Any], delta: Mapping[str, Any]) -> None:
    """Add a streamed delta to a whole message: text fields concatenate, tool calls merge by index (a legacy
    ``function_call`` piece by piece)."""
    for key, value in delta.items():
        if value is None or key == "role":
            continue
        if key == "tool_calls":
            _merge_tool_calls(message.setdefault("tool_calls", []), value)
        elif key == "function_call" and isinstance(value, Mapping):  # legacy functions: its pieces, as a tool's
            call = message.setdefault("function_call", {"name": "", "arguments": ""})
            call["name"] += value.get("name") or ""
            call["arguments"] += value.get("arguments") or ""
        elif key in ("thinking_blocks", "annotations"):  # each delta carries whole ones (Anthropic's, at their end)
            message.setdefault(key, []).extend(value)
        elif isinstance(value, str) and isinstance(message.get(key), str):
            message[key] += value
        else:
            message[key] = value


def _merge_tool_calls(calls: list[dict[str, Any]], deltas: list[Mapping[str, Any]]) -> None:
    for d in deltas:
        index = d.get("index", len(calls))
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call = calls[index]
        if d.get("id"):
            call["id"] = d["id"]
        if d.get("type"):
            call["type"] = d["type"]
        fn = d.get("function") or {}
        call["function"]["name"] += fn.get("name") or ""
        call["function"]["arguments"] += fn.get("arguments") or ""


THOUGHT_FIRST = ("reasoning_content", "reasoning", "thinking_blocks")
"""A model's thinking, which its stream carries before the answer's text."""


def message_deltas(message: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """A whole assistant message as the deltas a stream of it would carry (after the role chunk): its thinking
    first, then its text, its other fields and its tool calls."""
    for key in THOUGHT_FIRST:
        if message.get(key) is not None:
            yield {key: message[key]}
    if message.get("content"):
        yield {"content": message["content"]}
    for key, value in message.items():
        if key in ("role", "content", "tool_calls", *THOUGHT_FIRST) or value is None:
            continue
        yield {key: value}
    calls = message.get("tool_calls") or []
    if calls:
        yield {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}


def final_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A collected message in ``chat.completion`` form: role first; ``content`` null only beside tool calls or
    a refusal (as OpenAI has it)."""
    out: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if out["content"] is None and not message.get("tool_calls") and not message.get("refusal"):
        out["content"] = ""
    out.update((k, v) for k, v in message.items() if k not in ("role", "content"))
    return out


@dataclass
class Answer:
    """One request's answer being written: streamed chunk by chunk, or collected into one result."""

    publisher: ReplyPublisher
    request_id: str
    model: str
    stream: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    started: bool = False
    message: dict[str, Any] = field(default_factory=dict)
    logprobs: dict[str, Any] | None = None  # of a whole answer, when its provider gave them
    _head: bytes = b""
    _prefix: bytes = b""
    _suffix: bytes = b'}],"usage":null,"system_fingerprint":null}'
    _fingerprint: str | None = None
    _begun: set[int] = field(default_factory=set)  # choices past 0 whose role chunk went (a stream of several)

    def __post_init__(self) -> None:
        if self.stream:
            self._head = (b'{"id":' + to_json(self.completion_id) + b',"object":"chat.completion.chunk","created":'
                          + str(self.created).encode() + b',"model":' + to_json(self.model) + b',"choices":[{"index":')
            self._prefix = self._head + b'0,"delta":'

    @property
    def completion_id(self) -> str:
        """The OpenAI completion id."""
        return f"chatcmpl-{self.request_id}"

    @classmethod
    def for_request(cls, publisher: ReplyPublisher, request_id: str, model: str,
                    request: ChatCompletionRequest) -> Answer:
        """An answer shaped by what the request asked for (streaming, usage chunk)."""
        return cls(publisher, request_id, model, request.stream, request.include_usage())

    @property
    def fingerprint(self) -> str | None:
        """The ``system_fingerprint`` the answer carries: the provider's, once it gave one."""
        return self._fingerprint

    @fingerprint.setter
    def fingerprint(self, value: str | None) -> None:
        self._fingerprint = value
        self._suffix = b'}],"usage":null,"system_fingerprint":' + to_json(value) + b"}"

    def _chunk(self, delta: Mapping[str, Any], finish: FinishReason | None = None,
               logprobs: Mapping[str, Any] | None = None, index: int = 0) -> bytes:
        prefix = self._head + b'%d,"delta":' % index if index else self._prefix
        return (prefix + to_json(delta) + b',"logprobs":' + (b"null" if logprobs is None else to_json(logprobs))
                + b',"finish_reason":' + to_json(finish) + self._suffix)

    async def begin(self) -> None:
        """The first chunk (the assistant role), sent as soon as the answer starts."""
        if self.stream and not self.started:
            self.started = True
            await self.publisher.send(Event.CHUNK, self._chunk({"role": "assistant", "content": ""}))

    async def text(self, text: str) -> None:
        """New text of the answer."""
        await self.delta({"content": text})

    async def delta(self, fields: Mapping[str, Any], logprobs: Mapping[str, Any] | None = None) -> None:
        """New fields of the assistant message (text, tool call pieces...), as a provider streams them, with
        the log probabilities of their tokens when it gave them."""
        if not self.stream:
            merge_delta(self.message, fields)
            return
        if not self.started:
            await self.begin()
        await self.publisher.send(Event.CHUNK, self._chunk(fields, logprobs=logprobs))

    async def whole(self, message: Mapping[str, Any], reason: FinishReason, usage: Usage,
                    logprobs: dict[str, Any] | None = None) -> None:
        """A complete message at once (a non-streamed provider answer, a cache hit), then the end."""
        if self.stream:
            await self.begin()
            for d in message_deltas(message):
                await self.delta(d)
        else:
            self.message = {k: v for k, v in message.items() if k != "role"}
            self.logprobs = logprobs
        await self.finish(reason, usage)

    def result(self, reason: FinishReason, usage: Usage) -> bytes:
        """The ``chat.completion`` of the collected message."""
        return to_json({
            "id": self.completion_id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": final_message(self.message), "logprobs": self.logprobs,
                         "finish_reason": reason}],
            "usage": usage.model_dump(), "system_fingerprint": self.fingerprint,
        })

    def choices(self, choices: Sequence[tuple[Mapping[str, Any], FinishReason, dict[str, Any] | None]],
                usage: Usage) -> bytes:
        """The ``chat.completion`` of several whole choices (message, finish reason, logprobs), in order."""
        return to_json({
            "id": self.completion_id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": i, "message": final_message({k: v for k, v in m.items() if k != "role"}),
                         "logprobs": logprobs, "finish_reason": reason}
                        for i, (m, reason, logprobs) in enumerate(choices)],
            "usage": usage.model_dump(), "system_fingerprint": self.fingerprint,
        })

    async def finish(self, reason: FinishReason, usage: Usage) -> None:
        """End the answer: last chunk, usage chunk if asked, then ``done``; or the whole result."""
        if not self.stream:
            await self.publisher.send(Event.RESULT, self.result(reason, usage))
            return
        await self.begin()
        await self.publisher.send(Event.CHUNK, self._chunk({}, reason))
        await self.end(reason, usage)

    # A stream of several choices (``n``), one call's: each choice's chunks carry its index, each choice ends
    # with its own finish reason, and the stream with ``end``.

    async def choice_delta(self, index: int, fields: Mapping[str, Any],
                           logprobs: Mapping[str, Any] | None = None) -> None:
        """New fields of choice ``index``'s message (none: the choice has begun)."""
        await self._begin_choice(index)
        if fields or logprobs is not None:
            await self.publisher.send(Event.CHUNK, self._chunk(fields, logprobs=logprobs, index=index))

    async def choice_finish(self, index: int, reason: FinishReason) -> None:
        """The last chunk of choice ``index``."""
        await self._begin_choice(index)
        await self.publisher.send(Event.CHUNK, self._chunk({}, reason, index=index))

    async def _begin_choice(self, index: int) -> None:
        if not index:
            await self.begin()
        elif index not in self._begun:
            self._begun.add(index)
            await self.publisher.send(Event.CHUNK, self._chunk({"role": "assistant", "content": ""}, index=index))

    async def end(self, reason: FinishReason, usage: Usage) -> None:
        """End a stream whose choices have ended: the usage chunk if asked (of them all), then ``done``
        (with ``reason``, choice 0's)."""
        if self.include_usage:
            await self.publisher.send(Event.CHUNK, to_json({
                "id": self.completion_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": usage.model_dump(),
                "system_fingerprint": self.fingerprint,
            }))
        await self.publisher.send(Event.DONE, dump(StreamEnd(request_id=self.request_id, finish_reason=reason,
                                                             usage=usage)))
