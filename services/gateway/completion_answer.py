"""Chat answers as ``POST /v1/completions`` answers: a ``chat.completion`` per choice becomes one
``text_completion`` with every choice's ``text``; ``chat.completion.chunk`` events become ``text_completion``
chunks, each with its choice's index (the role chunk, which has no text, is dropped). ``echo`` puts the prompt
before the text. Usage is the sum over the choices (each prompt counted once per choice, as it was read once
per choice), and a streamed answer asked to include it ends with one chunk holding that sum.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import to_json

from schemas.chat import ChatCompletion, ChatCompletionChunk, FinishReason, StreamEnd, Usage
from shared.errors import UpstreamError

T = TypeVar("T", bound=BaseModel)


def completion_id(request_id: str) -> str:
    """The OpenAI id of a text completion."""
    return f"cmpl-{request_id}"


def _parse(model: type[T], data: bytes) -> T:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise UpstreamError(f"malformed {model.__name__} from the site", code="upstream_bad_response") from exc


@dataclass(frozen=True, slots=True)
class Answered:
    """One choice's answer, as it goes into the text completion."""

    index: int
    text: str
    finish_reason: FinishReason | None
    usage: Usage
    model: str
    system_fingerprint: str | None


def answered(data: bytes, index: int, prefix: str = "") -> Answered:
    """A choice's ``chat.completion`` (its ``result`` event) as that choice; ``prefix`` (the prompt, for
    ``echo``) comes before its text."""
    chat = _parse(ChatCompletion, data)
    if not chat.choices:
        raise UpstreamError("the site answered no choice", code="upstream_bad_response")
    first = chat.choices[0]
    usage = chat.usage or Usage.of(0, 0)
    return Answered(index, prefix + (first.message.content or ""), first.finish_reason, usage, chat.model,
                    chat.system_fingerprint)


def total_usage(usages: Iterable[Usage]) -> Usage:
    """The choices' usage added up, details (cached, reasoning tokens) included where any choice had them."""
    listed = list(usages)
    cached = [u.prompt_tokens_details.get("cached_tokens", 0) for u in listed if u.prompt_tokens_details]
    reasoning = [u.completion_tokens_details.get("reasoning_tokens", 0) for u in listed
                 if u.completion_tokens_details]
    return Usage.of(sum(u.prompt_tokens for u in listed), sum(u.completion_tokens for u in listed),
                    cached=sum(cached) if cached else None, reasoning=sum(reasoning) if reasoning else None)


def whole(request_id: str, created: int, answers: list[Answered]) -> bytes:
    """The ``text_completion`` of every choice, in index order; its model is the first choice's."""
    ordered = sorted(answers, key=lambda a: a.index)
    return to_json({
        "id": completion_id(request_id), "object": "text_completion", "created": created, "model": ordered[0].model,
        "choices": [{"text": a.text, "index": a.index, "logprobs": None, "finish_reason": a.finish_reason}
                    for a in ordered],
        "usage": total_usage(a.usage for a in ordered).model_dump(),
        "system_fingerprint": ordered[0].system_fingerprint,
    })


def stream_end(data: bytes) -> StreamEnd:
    """The ``done`` event that closes one choice's stream (its finish reason and usage)."""
    return _parse(StreamEnd, data)


def event(body: bytes) -> bytes:
    """One server-sent event."""
    return b"data: " + body + b"\n\n"


@dataclass(frozen=True, slots=True)
class TextChunks:
    """The chunks of one streamed text completion."""

    request_id: str
    created: int

    def chunk(self, index: int, text: str, finish: FinishReason | None, model: str,
              fingerprint: str | None = None) -> bytes:
        """One ``text_completion`` chunk of choice ``index``, as a server-sent event."""
        return event(to_json({
            "id": completion_id(self.request_id), "object": "text_completion", "created": self.created,
            "model": model, "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}],
            "usage": None, "system_fingerprint": fingerprint,
        }))

    def relay(self, data: bytes, index: int, prefix: str = "") -> tuple[bytes, str]:
        """A choice's ``chat.completion.chunk`` as its text chunk (``b""`` for one without text nor finish
        reason: the role chunk, a usage chunk), ``prefix`` before its text; and the model that answered."""
        chunk = _parse(ChatCompletionChunk, data)
        if not chunk.choices:
            return b"", chunk.model
        choice = chunk.choices[0]
        text = prefix + (choice.delta.content or "")
        if not text and choice.finish_reason is None:
            return b"", chunk.model
        return self.chunk(index, text, choice.finish_reason, chunk.model, chunk.system_fingerprint), chunk.model

    def usage(self, model: str, usage: Usage) -> bytes:
        """The last chunk of a stream asked to include usage: no choices, the usage of them all."""
        return event(to_json({
            "id": completion_id(self.request_id), "object": "text_completion", "created": self.created,
            "model": model, "choices": [], "usage": usage.model_dump(), "system_fingerprint": None,
        }))
