"""``POST /v1/chat/completions``: one HTTP request becomes one NATS request; the answer streams back.

The gateway publishes the request to the site's router with its own reply subject, then reads the reply
stream: an ``error`` first becomes the HTTP status; a ``result`` becomes the JSON body; ``chunk`` events
become server-sent events ending with ``data: [DONE]``. If the client goes away, or the answer stalls,
the gateway broadcasts a cancel so the worker frees the row.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from schemas.chat import ChatCompletionRequest
from services.gateway.bridge import Bridge, Exchange
from shared import subjects
from shared.errors import LeafwireError
from shared.replies import Event, Reply

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive",
               "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


class ChatBridge(Bridge):
    """``POST /v1/chat/completions`` over NATS."""

    async def complete(self, http: web.Request, request: ChatCompletionRequest, raw: bytes,
                       tenant: str) -> web.StreamResponse:
        """Answer one chat completion request."""
        env = self.envelope(tenant)

        async def respond(exchange: Exchange) -> web.StreamResponse:
            await self.ask(subjects.chat(self.settings.site), raw, exchange.stream, env, http)
            first = await self.next(exchange.stream, env)
            exchange.finished = first.event in (Event.ERROR, Event.RESULT)
            response_headers = self.answer_headers(first, env)
            first.raise_for_error()
            if first.event is Event.RESULT:
                return web.Response(body=first.data, content_type="application/json", headers=response_headers)
            resp, exchange.finished = await relay_stream(self, http, exchange, first, response_headers)
            return resp

        return await self.exchange(env, respond)


async def relay_stream(bridge: Bridge, http: web.Request, exchange: Exchange, first: Reply, headers: dict[str, str],
                       event: Callable[[bytes], bytes] | None = None) -> tuple[web.StreamResponse, bool]:
    """Relay chunk events, ``first`` the first, as server-sent events (``event`` makes a chunk the endpoint's:
    ``b""`` for none; without it, chat chunks go as they are) until ``done`` or an error; whether the answer
    ended."""
    resp = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    await resp.prepare(http)
    reply = first
    while True:
        if reply.event is Event.CHUNK:
            try:
                data = event(reply.data) if event is not None else b"data: " + reply.data + b"\n\n"
            except LeafwireError as err:  # a chunk the endpoint cannot read: the answer ends with the error
                await resp.write(b"data: " + err.to_response().model_dump_json().encode() + b"\n\n")
                await resp.write_eof()
                return resp, False
            if data:
                await resp.write(data)
        elif reply.event is Event.DONE:
            await resp.write(DONE)
            await resp.write_eof()
            return resp, True
        elif reply.event is Event.ERROR:
            # Headers are gone: the error travels as an event, as OpenAI does mid-stream. One the gateway
            # made itself (an overflow, a hole) marks the stream given up, and the exchange cancels it.
            await resp.write(b"data: " + reply.data + b"\n\n")
            await resp.write_eof()
            return resp, True
        try:
            reply = await bridge.next(exchange.stream, exchange.env)
        except LeafwireError as err:
            await resp.write(b"data: " + err.to_response().model_dump_json().encode() + b"\n\n")
            await resp.write_eof()
            return resp, False  # the worker may still be generating: let the caller cancel it
