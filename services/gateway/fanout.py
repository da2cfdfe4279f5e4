"""A request answered with several choices, each its own chat request down the chat path: text completions
(a list of prompts, ``n``) and chat completions with ``n`` > 1.

Each choice (``choices.Choice``) has its own reply stream and id; at most ``LW_GATEWAY_COMPLETIONS_PARALLEL``
are out at once, so a request of many choices neither floods a model's queue at the batcher nor waits for one
answer at a time. The answers become the endpoint's one answer (its ``choices.Merge``): whole once every choice
is in, or streamed as the choices' chunks arrive, interleaved, each with its index.

Errors are chat's: one before anything was sent to the caller is the HTTP status (the first choice to fail
fails the request, and the choices still out are cancelled); one after is an error event ending the stream.
The caller leaving cancels every choice still out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from services.gateway.bridge import Bridge, Exchange
from services.gateway.chat import DONE, SSE_HEADERS, relay_stream
from services.gateway.choices import Choice, Merge, event, stream_end, total_usage
from services.gateway.errors import log
from shared import envelope as hdr
from shared import subjects
from shared.envelope import Envelope
from shared.errors import ChoicesOneByOne, LeafwireError, UpstreamError
from shared.replies import FINAL_EVENTS, Event, Reply, error_of

Got = Reply | LeafwireError  # what one choice's stream yields: a reply, or the gateway's own error about it
Out = asyncio.Queue[tuple[Choice, Got]]


@dataclass(frozen=True, slots=True)
class OneByOne:
    """The site answers this request's choices one a request (``n_unsupported``); ``skip``: the targets that
    refused it on the way (``Lw-Skip``), which its choices pass over; ``spent``: what finding that out cost (a
    provider without ``n`` answered one choice, paid for: ``Lw-Cost``), added to the answer's cost."""

    skip: str = ""
    spent: float = 0.0


class FanOut(Bridge):
    """Several chat requests over NATS answering one HTTP request."""

    async def at_once(self, http: web.Request, body: bytes, env: Envelope,
                      answer: Callable[[Reply, dict[str, str]], web.StreamResponse],
                      error: Callable[[LeafwireError], LeafwireError] = lambda err: err,
                      chunk: Callable[[bytes], bytes] | None = None) -> web.StreamResponse | OneByOne:
        """A request of several choices asked once, with its ``n`` (an OpenAI-compatible cloud model answers
        them in one call): its ``result`` made the caller's answer by ``answer``, or, streamed, its chunks
        relayed (each carries its choice's index), made the endpoint's by ``chunk`` (chat's go as they are);
        ``OneByOne`` when its target answers one choice a request (``n_unsupported``, before anything was done:
        a local model, an Anthropic one), for the caller to ask a request per choice."""
        one_by_one: OneByOne | None = None

        async def respond(exchange: Exchange) -> web.StreamResponse:
            nonlocal one_by_one
            await self.ask(subjects.chat(self.settings.site), body, exchange.stream, env, http)
            reply = await self.next(exchange.stream, env)
            exchange.finished = reply.event in (Event.ERROR, Event.RESULT)
            headers = self.answer_headers(reply, env)
            try:
                reply.raise_for_error()
            except LeafwireError as err:
                if err.code != ChoicesOneByOne.default_code:
                    raise error(err) from None
                one_by_one = OneByOne(reply.headers.get(hdr.SKIP, ""), err.cost_usd)
                return web.Response()
            if reply.event is Event.CHUNK:
                resp, exchange.finished = await relay_stream(self, http, exchange, reply, headers, chunk)
                return resp
            if reply.event is not Event.RESULT:
                raise UpstreamError(f"unexpected {reply.event.value!r} event for a whole answer")
            return answer(reply, headers)

        answered = await self.exchange(env, respond)
        return answered if one_by_one is None else one_by_one

    async def fan_out(self, http: web.Request, env: Envelope, choices: list[Choice], merge: Merge[Any], *,
                      stream: bool, include_usage: bool, before: OneByOne = OneByOne()) -> web.StreamResponse:
        """Ask for every choice (each passing over the targets ``before`` names, the request asked at once
        having found its target answers one choice a request) and answer the caller with ``merge`` of their
        answers."""
        async def respond(_: Exchange) -> web.StreamResponse:  # its stream stays unused: each choice has one
            try:
                if stream:
                    return await self._stream(http, env, choices, merge, include_usage, before.skip)
                return await self._whole(http, env, choices, merge, before)
            except LeafwireError as err:
                raise merge.error(err) from None

        return await self.exchange(env, respond)

    async def _whole(self, http: web.Request, env: Envelope, choices: list[Choice], merge: Merge[Any],
                     before: OneByOne) -> web.StreamResponse:
        """Every choice's whole answer, then one answer of them all."""
        limit = asyncio.Semaphore(self.settings.completions_parallel)
        try:
            async with asyncio.TaskGroup() as asking:
                tasks = [asking.create_task(self._answer(http, c, limit, merge, before.skip)) for c in choices]
        except* LeafwireError as failed:
            raise failed.exceptions[0] from None  # the first choice to fail; the others were cancelled
        replies = [t.result() for t in tasks]
        headers = self.answer_headers(replies[0][0], env)
        self.add_costs(headers, (reply for reply, _ in replies), before.spent)
        cached = [reply.headers.get(hdr.CACHE) == "hit" for reply, _ in replies]
        if any(cached) and not all(cached):
            headers["x-leafwire-cache"] = "partial"  # some choices from the cache, some not: "hit" would mislead
        return web.Response(body=merge.whole([a for _, a in replies]), content_type="application/json",
                            headers=headers)

    async def _answer(self, http: web.Request, choice: Choice, limit: asyncio.Semaphore, merge: Merge[Any],
                      skip: str) -> tuple[Reply, Any]:
        """Ask for one choice and wait for its ``result``; cancel it at the site if it ends unanswered."""
        await limit.acquire()
        stream = self.replies.open()
        answered = False
        why = "another choice of its request failed, or the caller left"
        try:
            await self.ask(subjects.chat(self.settings.site), choice.body, stream, choice.env, http, skip)
            reply = await self.next(stream, choice.env)
            answered = True
            reply.raise_for_error()
            if reply.event is not Event.RESULT:
                raise UpstreamError(f"unexpected {reply.event.value!r} event for a non-streamed choice")
            result = reply, merge.answered(choice, reply.data)
        except LeafwireError as err:
            why = f"the gateway answered the caller: {err.message}"
            raise
        finally:
            await self.settle(stream, choice.env, answered, why)
        limit.release()  # only an answered choice frees its slot: after a failure no other choice is asked
        return result

    async def _relay(self, http: web.Request, choice: Choice, limit: asyncio.Semaphore, out: Out,
                     skip: str) -> None:
        """Ask for one streamed choice and pass its replies on, in order, until its last; an error of the
        gateway's own (a timeout) is passed on as its last. Cancel it at the site if it ends unfinished."""
        await limit.acquire()
        stream = self.replies.open()
        reply: Reply | None = None
        why = "another choice of its request failed, or the caller left"
        try:
            await self.ask(subjects.chat(self.settings.site), choice.body, stream, choice.env, http, skip)
            while reply is None or reply.event not in FINAL_EVENTS:
                reply = await self.next(stream, choice.env)
                await out.put((choice, reply))
        except LeafwireError as err:
            why = f"the gateway answered the caller: {err.message}"
            await out.put((choice, err))
        except Exception:  # the writer waits for this choice's last reply: it must get one
            log.exception("streamed choice failed", request_id=choice.env.request_id)
            await out.put((choice, LeafwireError("The server had an error while processing your request.")))
        finally:
            await self.settle(stream, choice.env, reply is not None and reply.event in FINAL_EVENTS, why)
        if reply is not None and reply.event is Event.DONE:
            limit.release()  # as in _answer: an error ends the request, and no other choice is asked

    async def _stream(self, http: web.Request, env: Envelope, choices: list[Choice], merge: Merge[Any],
                      include_usage: bool, skip: str) -> web.StreamResponse:
        """Relay every choice's chunks as the endpoint's events, as they come. The stream's headers are choice
        0's (its route, its cache hit or miss, as a whole answer's are): they go with its first reply, the
        others' replies before it wait; an error before it is the HTTP status."""
        out: Out = asyncio.Queue(maxsize=64)
        limit = asyncio.Semaphore(self.settings.completions_parallel)
        relays = [asyncio.create_task(self._relay(http, c, limit, out, skip)) for c in choices]
        try:
            early: list[tuple[Choice, Got]] = []
            while True:
                choice, got = await out.get()
                if isinstance(got, LeafwireError):
                    raise got
                got.raise_for_error()
                early.append((choice, got))
                if choice is choices[0]:
                    break
            headers = self.answer_headers(got, env)
            if "x-leafwire-cache" in headers and len(choices) > 1:
                headers["x-leafwire-cache"] = stream_cache_header(len(choices), early)
            resp = web.StreamResponse(headers={**SSE_HEADERS, **headers})
            await resp.prepare(http)
            try:
                await self._write(resp, merge, include_usage, len(choices), early, out)
            except LeafwireError as err:  # headers are gone: the error travels as an event, as OpenAI does
                await resp.write(event(merge.error(err).to_response().model_dump_json().encode()))
            await resp.write_eof()
            return resp
        finally:
            for relay in relays:
                relay.cancel()
            await asyncio.gather(*relays, return_exceptions=True)

    @staticmethod
    async def _write(resp: web.StreamResponse, merge: Merge[Any], include_usage: bool, open_: int,
                     early: list[tuple[Choice, Got]], out: Out) -> None:
        """Write the choices' events, those that came ``early`` first, until every choice's stream is done
        (then the usage chunk when asked, and ``[DONE]``); an error ends it, raised."""
        usages = []
        early.reverse()
        choice, got = early.pop()
        while True:
            if isinstance(got, LeafwireError):
                raise got
            if got.event is Event.ERROR:
                raise error_of(got.headers, got.data)
            if got.event is Event.DONE:
                usages.append(stream_end(got.data).usage)
                open_ -= 1
                if not open_:
                    break
            elif got.event is Event.CHUNK:
                if data := merge.chunk(choice, got.data):
                    await resp.write(data)
            else:
                raise UpstreamError(f"unexpected {got.event.value!r} event in a streamed answer")
            choice, got = early.pop() if early else await out.get()
        if include_usage:
            await resp.write(merge.usage(total_usage(usages)))
        await resp.write(DONE)


def stream_cache_header(count: int, early: list[tuple[Choice, Got]]) -> str:
    """``x-leafwire-cache`` of a stream of ``count`` choices asked one by one, sent before the later choices
    are answered: ``hit`` only when every choice's first reply came from the cache; ``partial`` when some
    did (the others were asked, or are not known yet); ``miss`` when none known did."""
    first: dict[int, str] = {}
    for choice, got in early:
        if not isinstance(got, LeafwireError):
            first.setdefault(choice.index, got.headers.get(hdr.CACHE, "miss"))
    hits = sum(state == "hit" for state in first.values())
    if hits == count:
        return "hit"
    return "partial" if hits else "miss"
