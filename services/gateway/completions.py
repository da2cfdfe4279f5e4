"""``POST /v1/completions``: the legacy text-completions endpoint, answered down the chat path.

Each choice (a prompt, ``n`` times) is one chat request to the site's router, with its own reply stream
(``completion_request.plan``); at most ``LW_GATEWAY_COMPLETIONS_PARALLEL`` are out at once, so a list of
prompts neither floods a model's queue at the batcher nor waits for one answer at a time. The answers become
one ``text_completion`` (``completion_answer``): whole once every choice is in, or streamed as the choices'
chunks arrive, interleaved, each with its index.

Errors are chat's: one before anything was sent to the caller is the HTTP status (the first choice to fail
fails the request, and the choices still out are cancelled); one after is an error event ending the stream.
A ``param`` naming the chat request's messages names the ``prompt`` here.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from services.gateway.bridge import Bridge, Exchange
from services.gateway.chat import DONE, SSE_HEADERS
from services.gateway.completion_answer import Answered, TextChunks, answered, event, stream_end, total_usage, whole
from services.gateway.completion_request import Choice, CompletionRequest, plan
from services.gateway.errors import log
from shared import subjects
from shared.envelope import Envelope
from shared.errors import ContextLengthExceeded, LeafwireError, RemoteError, UpstreamError
from shared.replies import FINAL_EVENTS, Event, Reply, error_of

Got = Reply | LeafwireError  # what one choice's stream yields: a reply, or the gateway's own error about it


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


class CompletionsBridge(Bridge):
    """``POST /v1/completions`` over NATS."""

    async def create(self, http: web.Request, request: CompletionRequest, tenant: str) -> web.StreamResponse:
        """Answer one text completion request (a 400 before anything is sent when it cannot be honoured)."""
        env = self.envelope(tenant)
        choices = plan(request, env)
        created = int(time.time())

        async def respond(_: Exchange) -> web.StreamResponse:  # its stream stays unused: each choice has one
            try:
                if request.stream:
                    return await self._stream(http, request, env, choices, TextChunks(env.request_id, created))
                return await self._whole(http, request, env, choices, created)
            except LeafwireError as err:
                raise for_prompt(err) from None

        return await self.exchange(env, respond)

    async def _whole(self, http: web.Request, request: CompletionRequest, env: Envelope, choices: list[Choice],
                     created: int) -> web.StreamResponse:
        """Every choice's whole answer, then one ``text_completion``."""
        limit = asyncio.Semaphore(self.settings.completions_parallel)
        try:
            async with asyncio.TaskGroup() as asking:
                tasks = [asking.create_task(self._answer(http, c, limit, bool(request.echo))) for c in choices]
        except* LeafwireError as failed:
            raise failed.exceptions[0] from None  # the first choice to fail; the others were cancelled
        replies = [t.result() for t in tasks]
        body = whole(env.request_id, created, [a for _, a in replies])
        return web.Response(body=body, content_type="application/json",
                            headers=self.answer_headers(replies[0][0], env))

    async def _answer(self, http: web.Request, choice: Choice, limit: asyncio.Semaphore,
                      echo: bool) -> tuple[Reply, Answered]:
        """Ask for one choice and wait for its ``result``; cancel it at the site if it ends unanswered."""
        await limit.acquire()
        stream = self.replies.open()
        answered_ = False
        why = "another choice of its request failed, or the caller left"
        try:
            await self.ask(subjects.chat(self.settings.site), choice.body, stream, choice.env, http)
            reply = await self.next(stream, choice.env)
            answered_ = True
            reply.raise_for_error()
            if reply.event is not Event.RESULT:
                raise UpstreamError(f"unexpected {reply.event.value!r} event for a non-streamed completion")
            result = reply, answered(reply.data, choice.index, choice.prompt if echo else "")
        except LeafwireError as err:
            why = f"the gateway answered the caller: {err.message}"
            raise
        finally:
            await self.settle(stream, choice.env, answered_, why)
        limit.release()  # only an answered choice frees its slot: after a failure no other choice is asked
        return result

    async def _relay(self, http: web.Request, choice: Choice, limit: asyncio.Semaphore,
                     out: asyncio.Queue[tuple[Choice, Got]]) -> None:
        """Ask for one streamed choice and pass its replies on, in order, until its last; an error of the
        gateway's own (a timeout) is passed on as its last. Cancel it at the site if it ends unfinished."""
        await limit.acquire()
        stream = self.replies.open()
        reply: Reply | None = None
        why = "another choice of its request failed, or the caller left"
        try:
            await self.ask(subjects.chat(self.settings.site), choice.body, stream, choice.env, http)
            while reply is None or reply.event not in FINAL_EVENTS:
                reply = await self.next(stream, choice.env)
                await out.put((choice, reply))
        except LeafwireError as err:
            why = f"the gateway answered the caller: {err.message}"
            await out.put((choice, err))
        except Exception:  # the writer waits for this choice's last reply: it must get one
            log.exception("streamed completion choice failed", request_id=choice.env.request_id)
            await out.put((choice, LeafwireError("The server had an error while processing your request.")))
        finally:
            await self.settle(stream, choice.env, reply is not None and reply.event in FINAL_EVENTS, why)
        if reply is not None and reply.event is Event.DONE:
            limit.release()  # as in _answer: an error ends the request, and no other choice is asked

    async def _stream(self, http: web.Request, request: CompletionRequest, env: Envelope, choices: list[Choice],
                      chunks: TextChunks) -> web.StreamResponse:
        """Relay every choice's chunks as ``text_completion`` events, as they come; the stream's headers go
        with the first reply to arrive, so an error before it is the HTTP status."""
        out: asyncio.Queue[tuple[Choice, Got]] = asyncio.Queue(maxsize=64)
        limit = asyncio.Semaphore(self.settings.completions_parallel)
        relays = [asyncio.create_task(self._relay(http, c, limit, out)) for c in choices]
        try:
            choice, got = await out.get()
            if isinstance(got, LeafwireError):
                raise got
            got.raise_for_error()
            resp = web.StreamResponse(headers={**SSE_HEADERS, **self.answer_headers(got, env)})
            await resp.prepare(http)
            try:
                await self._write(resp, request, chunks, len(choices), (choice, got), out)
            except LeafwireError as err:  # headers are gone: the error travels as an event, as OpenAI does
                await resp.write(event(for_prompt(err).to_response().model_dump_json().encode()))
            await resp.write_eof()
            return resp
        finally:
            for relay in relays:
                relay.cancel()
            await asyncio.gather(*relays, return_exceptions=True)

    @staticmethod
    async def _write(resp: web.StreamResponse, request: CompletionRequest, chunks: TextChunks, open_: int,
                     first: tuple[Choice, Got], out: asyncio.Queue[tuple[Choice, Got]]) -> None:
        """Write the choices' events until every choice's stream is done (then the usage chunk when asked,
        and ``[DONE]``); an error ends it, raised."""
        started: set[int] = set()
        usages = []
        model = ""
        choice, got = first
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
                echo = choice.prompt if request.echo and choice.index not in started else ""
                started.add(choice.index)
                data, model = chunks.relay(got.data, choice.index, echo)
                if data:
                    await resp.write(data)
            else:
                raise UpstreamError(f"unexpected {got.event.value!r} event in a streamed completion")
            choice, got = await out.get()
        if request.include_usage():
            await resp.write(chunks.usage(model, total_usage(usages)))
        await resp.write(DONE)
