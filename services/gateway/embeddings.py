"""``POST /v1/embeddings``: one HTTP request becomes one NATS request to the site's router; one ``result``
(OpenAI's embeddings list) or one ``error`` comes back. A caller that goes away before the answer gets
its request cancelled (it may still be waiting in the batcher).

A request of more inputs than ``LW_GATEWAY_EMBEDDINGS_SPLIT`` is sent as several NATS requests (parts) of
at most that many, ``LW_GATEWAY_EMBEDDINGS_PARALLEL`` of them out at once, and their answers are merged
into one list in input order. So no single answer outgrows NATS's max_payload (2048 float vectors of 384
dimensions are ~15 MB), and requests arriving meanwhile queue at the batcher between the parts of a big
one instead of behind all of it. Each part has its own request id (``<id>-<n>``) and reply stream; the
first part to fail fails the whole request with its error, and the parts still out are cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from schemas.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from services.gateway.bridge import Bridge, Exchange
from shared import envelope as hdr
from shared import subjects
from shared.envelope import Envelope
from shared.errors import INPUT_AT, LeafwireError, RemoteError, UpstreamError, renumber_inputs
from shared.replies import Event, Reply

VECTORS = TypeAdapter(list[Embedding])


@dataclass(frozen=True, slots=True)
class Part:
    """One slice of a split request: the index of its first input in the whole request, and its body."""

    offset: int
    request: EmbeddingRequest

    @property
    def size(self) -> int:
        """How many inputs (so vectors) this part holds."""
        return len(self.request.input)


def split(request: EmbeddingRequest, size: int) -> list[Part]:
    """A request of several inputs (strings or token arrays) as parts of at most ``size`` inputs, in order;
    every other field (``encoding_format``, ``dimensions``, ``user``, unknown ones) carries over."""
    inputs = request.input
    return [Part(at, request.model_copy(update={"input": inputs[at:at + size]}))
            for at in range(0, len(inputs), size)]


@dataclass(frozen=True, slots=True)
class Piece:
    """One part's answer made ready for the whole request: its vectors, re-indexed, as the items of a JSON
    list; the tokens it read; the model that answered."""

    vectors: bytes
    tokens: int
    model: str


def reindexed(raw: bytes, part: Part) -> Piece:
    """A part's answer with each vector indexed in the whole request. Done as each answer arrives, so the
    merge at the end only joins bytes. An answer without one vector per input of its part is a 502."""
    try:
        answer = EmbeddingResponse.model_validate_json(raw)
    except ValidationError as exc:
        raise UpstreamError("malformed embeddings answer from the site", code="upstream_bad_response") from exc
    data = sorted(answer.data, key=lambda e: e.index)
    if [e.index for e in data] != list(range(part.size)):
        raise UpstreamError(f"the site answered {len(data)} vectors for {part.size} inputs",
                            code="upstream_bad_response")
    for item in data:
        item.index += part.offset
    return Piece(VECTORS.dump_json(data)[1:-1], answer.usage.prompt_tokens, answer.model)


def merge(pieces: Sequence[Piece]) -> bytes:
    """The parts' answers as one OpenAI embeddings list: vectors in input order, usage summed, the model of
    the first part."""
    tokens = sum(p.tokens for p in pieces)
    shell = EmbeddingResponse(data=[], model=pieces[0].model,
                              usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
    head, _, tail = shell.model_dump_json().encode().partition(b'"data":[]')  # the field: model comes after it
    items = [b","] * (2 * len(pieces) - 1)
    items[::2] = [p.vectors for p in pieces]
    return b"".join((head, b'"data":[', *items, b"]", tail))  # one copy of ~15 MB for 2048 float vectors


def in_whole(err: LeafwireError, offset: int) -> LeafwireError:
    """A part's error as the whole request's: an ``input[i]`` it names is counted from the request's first
    input, not the part's."""
    if not offset or err.param != "input" or not INPUT_AT.search(err.message):
        return err
    response = err.to_response()
    response.error.message = renumber_inputs(err.message, lambda i: i + offset)
    return RemoteError(err.status, response, err.retry_after)


def in_cache(parts: Sequence[str | None]) -> str | None:
    """The ``x-leafwire-cache`` of a request answered in parts: ``hit`` when every part was, ``miss`` when none
    found anything, else ``partial``; none when no part used the cache (a local model)."""
    said = set(parts) - {None}
    if not said:
        return None
    return said.pop() if len(said) == 1 and said <= {"hit", "miss"} else "partial"


class EmbeddingsBridge(Bridge):
    """``POST /v1/embeddings`` over NATS."""

    async def create(self, http: web.Request, request: EmbeddingRequest, raw: bytes,
                     tenant: str) -> web.StreamResponse:
        """Answer one embeddings request: as one NATS request, or in parts when it has many inputs."""
        env = self.envelope(tenant)

        async def respond(exchange: Exchange) -> web.StreamResponse:
            await self.ask(subjects.embeddings(self.settings.site), raw, exchange.stream, env, http)
            reply = await self.next(exchange.stream, env)
            exchange.finished = True
            headers = self.answer_headers(reply, env)
            reply.raise_for_error()
            if reply.event is not Event.RESULT:
                raise UpstreamError(f"unexpected {reply.event.value!r} event for an embeddings request")
            return web.Response(body=reply.data, content_type="application/json", headers=headers)

        async def in_parts(_: Exchange) -> web.StreamResponse:
            return await self._in_parts(http, request, env)

        if request.count() > self.part_size(request):
            return await self.exchange(env, in_parts)  # its own stream stays unused: each part has one
        return await self.exchange(env, respond)

    def part_size(self, request: EmbeddingRequest) -> int:
        """How many inputs one part may hold: fewer for float vectors, ~4× the bytes of base64 ones, so that
        a part's answer fits one NATS message whatever the model's dimensions (up to 4096)."""
        if request.encoding_format == "base64":
            return self.settings.embeddings_split
        return min(self.settings.embeddings_split, self.settings.embeddings_split_float)

    async def _in_parts(self, http: web.Request, request: EmbeddingRequest, env: Envelope) -> web.StreamResponse:
        """Send the parts a few at a time, in order; merge their answers once all are in."""
        parts = split(request, self.part_size(request))
        answers: dict[int, tuple[Reply, Piece]] = {}
        waiting = iter(enumerate(parts))

        async def send_next() -> None:
            for n, part in waiting:  # shared: each sender takes the next part not yet sent
                answers[n] = await self._part(http, part, Envelope(
                    f"{env.request_id}-{n}", env.tenant, "", env.deadline))

        try:
            async with asyncio.TaskGroup() as senders:
                for _ in range(min(self.settings.embeddings_parallel, len(parts))):
                    senders.create_task(send_next())
        except* LeafwireError as failed:
            raise failed.exceptions[0] from None  # the first part to fail; the others were cancelled
        body = merge([answers[n][1] for n in range(len(parts))])
        headers = self.answer_headers(answers[0][0], env)
        self.add_costs(headers, (reply for reply, _ in answers.values()))
        if cached := in_cache([reply.headers.get(hdr.CACHE) for reply, _ in answers.values()]):
            headers["x-leafwire-cache"] = cached
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def _part(self, http: web.Request, part: Part, env: Envelope) -> tuple[Reply, Piece]:
        """Ask for one part and wait for its answer; cancel it at the site if it ends unanswered (it failed
        here, another part failed, or the caller left)."""
        stream = self.replies.open()
        answered = False
        why = "another part of its request failed, or the caller left"
        try:
            body = part.request.model_dump_json(exclude_unset=True).encode()
            await self.ask(subjects.embeddings(self.settings.site), body, stream, env, http)
            reply = await self.next(stream, env)
            answered = True
            reply.raise_for_error()
            if reply.event is not Event.RESULT:
                raise UpstreamError(f"unexpected {reply.event.value!r} event for an embeddings request")
            return reply, await asyncio.to_thread(reindexed, reply.data, part)  # ~10 ms per 100 float vectors
        except LeafwireError as err:
            why = f"the gateway answered the caller: {err.message}"
            if (whole := in_whole(err, part.offset)) is err:
                raise
            raise whole from err
        finally:
            await self.settle(stream, env, answered, why)
