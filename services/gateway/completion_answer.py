"""Chat answers as ``POST /v1/completions`` answers: a ``chat.completion`` per choice becomes one
``text_completion`` with every choice's ``text``; ``chat.completion.chunk`` events become ``text_completion``
chunks, each with its choice's index (the role chunk, which has no text, is dropped). ``echo`` puts the prompt
before the text. Usage is the sum over the choices (each prompt counted once per choice, as it was read once
per choice), and a streamed answer asked to include it ends with one chunk holding that sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from pydantic_core import to_json

from schemas.chat import ChatCompletion, ChatCompletionChunk, FinishReason, Usage
from services.gateway.choices import Choice, event, parse, total_usage
from shared.errors import ContextLengthExceeded, LeafwireError, RemoteError, UpstreamError
from shared.replies import Reply


def completion_id(request_id: str) -> str:
    """The OpenAI id of a text completion."""
    return f"cmpl-{request_id}"


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
    chat = parse(ChatCompletion, data)
    if not chat.choices:
        raise UpstreamError("the site answered no choice", code="upstream_bad_response")
    first = chat.choices[0]
    usage = chat.usage or Usage.of(0, 0)
    return Answered(index, prefix + (first.message.content or ""), first.finish_reason, usage, chat.model,
                    chat.system_fingerprint)


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


def for_prompt(err: LeafwireError) -> LeafwireError:
    """``err`` as the caller of a text completion reads it: a ``param`` of the chat request's messages
    (``messages``, ``messages.0.content``) is its ``prompt``."""
    if not (err.param or "").startswith("messages"):
        return err
    response = err.to_response()
    response.error.param = "prompt"
    if err.code == ContextLengthExceeded.default_code:
        response.error.message = err.message.replace("the messages", "the prompt")
    return RemoteError(err.status, response, err.retry_after)


@dataclass
class TextAnswers:
    """One text completion made of its choices' chat answers (its ``choices.Merge``)."""

    request_id: str
    created: int
    prompts: list[str]
    n: int = 1  # choices per prompt: choice i * n + j is prompt i's
    echo: bool = False
    model: str = ""  # of the last chunk: the usage chunk's
    started: set[int] = field(default_factory=set)  # choices whose first chunk went (echo goes on it)

    def prefix(self, index: int) -> str:
        """What goes before choice ``index``'s text: its prompt, with ``echo``."""
        return self.prompts[index // self.n] if self.echo else ""

    def answered(self, choice: Choice, data: bytes) -> Answered:
        """A choice's ``chat.completion`` as that choice of the text completion."""
        return answered(data, choice.index, self.prefix(choice.index))

    def whole(self, answers: list[Answered]) -> bytes:
        """The ``text_completion`` of every choice."""
        return whole(self.request_id, self.created, answers)

    def all_at_once(self, reply: Reply, headers: dict[str, str]) -> web.StreamResponse:
        """The text completion of a lone prompt's ``n`` choices answered in one ``chat.completion`` (its usage
        the call's: the prompt once), or a 502 when it holds another number of choices."""
        chat = parse(ChatCompletion, reply.data)
        if len(chat.choices) != self.n:
            raise UpstreamError(f"the site answered {len(chat.choices)} choices for n = {self.n}",
                                code="upstream_bad_response")
        usage = chat.usage or Usage.of(0, 0)
        answers = [Answered(j, self.prefix(j) + (c.message.content or ""), c.finish_reason,
                            usage if j == 0 else Usage.of(0, 0), chat.model, chat.system_fingerprint)
                   for j, c in enumerate(sorted(chat.choices, key=lambda c: c.index))]
        return web.Response(body=self.whole(answers), content_type="application/json", headers=headers)

    def native_chunk(self, data: bytes) -> bytes:
        """A chunk of a lone prompt's ``n`` choices streamed in one call (each chunk's choice has its index) as
        a text chunk, echo on each choice's first; its usage chunk (the prompt once) as this endpoint's."""
        chunk = parse(ChatCompletionChunk, data)
        if not chunk.choices:
            self.model = chunk.model
            return self.usage(chunk.usage) if chunk.usage is not None else b""
        index = chunk.choices[0].index
        if not 0 <= index < self.n:
            raise UpstreamError(f"the site streamed a choice {index} for n = {self.n}", code="upstream_bad_response")
        first = index not in self.started
        self.started.add(index)
        out, self.model = self.relay(data, index, self.prefix(index) if first else "")
        return out

    def chunk(self, choice: Choice, data: bytes) -> bytes:
        """A choice's ``chat.completion.chunk`` as its text chunk; echo goes on its first."""
        first = choice.index not in self.started
        self.started.add(choice.index)
        out, self.model = self.relay(data, choice.index, self.prefix(choice.index) if first else "")
        return out

    def text_chunk(self, index: int, text: str, finish: FinishReason | None, model: str,
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
        chunk = parse(ChatCompletionChunk, data)
        if not chunk.choices:
            return b"", chunk.model
        choice = chunk.choices[0]
        text = prefix + (choice.delta.content or "")
        if not text and choice.finish_reason is None:
            return b"", chunk.model
        return (self.text_chunk(index, text, choice.finish_reason, chunk.model, chunk.system_fingerprint),
                chunk.model)

    def usage(self, usage: Usage) -> bytes:
        """The last chunk of a stream asked to include usage: no choices, the usage of them all."""
        return event(to_json({
            "id": completion_id(self.request_id), "object": "text_completion", "created": self.created,
            "model": self.model, "choices": [], "usage": usage.model_dump(), "system_fingerprint": None,
        }))

    @staticmethod
    def error(err: LeafwireError) -> LeafwireError:
        """A chat error as the text completion's caller reads it (``for_prompt``)."""
        return for_prompt(err)
