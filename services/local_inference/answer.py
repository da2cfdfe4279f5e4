"""Turns a row's decoder events into the OpenAI-shaped reply stream on the caller's subject, and vectors
into OpenAI's embeddings answer."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from schemas.chat import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    FinishReason,
    StreamEnd,
    Usage,
    dump,
)
from schemas.embeddings import Embedding, EmbeddingResponse, EmbeddingUsage
from shared.replies import Event, ReplyPublisher


@dataclass
class Answer:
    """One request's answer being written: streamed chunk by chunk, or collected into one result."""

    publisher: ReplyPublisher
    request_id: str
    model: str
    stream: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    parts: list[str] = field(default_factory=list)
    started: bool = False

    @property
    def completion_id(self) -> str:
        """The OpenAI completion id."""
        return f"chatcmpl-{self.request_id}"

    @classmethod
    def for_request(cls, publisher: ReplyPublisher, request_id: str, model: str,
                    request: ChatCompletionRequest) -> Answer:
        """An answer shaped by what the request asked for (streaming, usage chunk)."""
        return cls(publisher, request_id, model, request.stream, request.include_usage())

    def _chunk(self, delta: Delta, finish: FinishReason | None = None) -> bytes:
        return dump(ChatCompletionChunk(id=self.completion_id, created=self.created, model=self.model,
                                        choices=[ChunkChoice(delta=delta, finish_reason=finish)]))

    async def text(self, text: str) -> None:
        """New text of the answer."""
        if not self.stream:
            self.parts.append(text)
            return
        if not self.started:
            await self.begin()
        await self.publisher.send(Event.CHUNK, self._chunk(Delta(content=text)))

    async def begin(self) -> None:
        """The first chunk (the assistant role), sent as soon as decoding starts."""
        if self.stream and not self.started:
            self.started = True
            await self.publisher.send(Event.CHUNK, self._chunk(Delta(role="assistant", content="")))

    async def finish(self, reason: FinishReason, usage: Usage) -> None:
        """End the answer: last chunk, usage chunk if asked, then ``done``; or the whole result."""
        if not self.stream:
            result = ChatCompletion(id=self.completion_id, created=self.created, model=self.model,
                                    choices=[Choice(message=AssistantMessage(content="".join(self.parts)),
                                                    finish_reason=reason)],
                                    usage=usage)
            await self.publisher.send(Event.RESULT, dump(result))
            return
        await self.begin()
        await self.publisher.send(Event.CHUNK, self._chunk(Delta(), reason))
        if self.include_usage:
            await self.publisher.send(Event.CHUNK, dump(ChatCompletionChunk(
                id=self.completion_id, created=self.created, model=self.model, choices=[], usage=usage)))
        await self.publisher.send(Event.DONE, dump(StreamEnd(request_id=self.request_id,
                                                             finish_reason=reason, usage=usage)))


def encode_vector(vector: npt.NDArray[np.float32], encoding_format: str) -> list[float] | str:
    """One vector as OpenAI sends it: a list of floats, or little-endian float32 bytes in base64."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def embedding_response(model: str, vectors: npt.NDArray[np.float32], tokens: int,
                       encoding_format: str) -> EmbeddingResponse:
    """The answer of one embeddings request, vectors in input order."""
    return EmbeddingResponse(
        data=[Embedding(index=i, embedding=encode_vector(v, encoding_format)) for i, v in enumerate(vectors)],
        model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
