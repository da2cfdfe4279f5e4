"""``POST /v1/chat/completions``: one HTTP request becomes one NATS request; the answer streams back.

The gateway publishes the request to the site's router with its own reply subject, then reads the reply
stream: an ``error`` first becomes the HTTP status; a ``result`` becomes the JSON body; ``chunk`` events
become server-sent events ending with ``data: [DONE]``. If the client goes away, or the answer stalls,
the gateway broadcasts a cancel so the worker frees the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from aiohttp import web
from nats.aio.client import Client as NATS

from schemas.chat import ChatCompletionRequest
from schemas.control import Cancel
from services.gateway.errors import error_response, log
from services.gateway.settings import GatewaySettings
from shared import envelope as hdr
from shared import metrics, subjects
from shared.envelope import Envelope, new_request_id
from shared.errors import DeadlineExceeded, LeafwireError
from shared.replies import Event, Reply, ReplyReader, ReplyStream

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive",
               "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
RESIDENCY_HEADER = "x-leafwire-residency"  # "onsite": keep this request on the site


def request_headers(env: Envelope, http: web.Request) -> dict[str, str]:
    """NATS headers of a request entering at the gateway (the reply subject is the message's own)."""
    headers = {k: v for k, v in env.headers().items() if k != hdr.REPLY}
    if http.headers.get(RESIDENCY_HEADER, "").lower() == "onsite":
        headers[hdr.RESIDENCY] = "onsite"
    return headers


@dataclass
class ChatBridge:
    """What the chat handler needs: the NATS client, the reply reader, the settings."""

    nc: NATS
    replies: ReplyReader
    settings: GatewaySettings

    async def complete(self, http: web.Request, request: ChatCompletionRequest, raw: bytes,
                       tenant: str) -> web.StreamResponse:
        """Answer one chat completion request."""
        env = Envelope(request_id=new_request_id(), tenant=tenant, reply="",
                       deadline=time.time() + self.settings.request_timeout_s)
        async with self.replies.stream() as stream:
            stream.unavailable = f"no router is serving site '{self.settings.site}'"
            headers = request_headers(env, http)
            finished = False
            try:
                await self.nc.publish(subjects.chat(self.settings.site), raw, reply=stream.subject,
                                      headers=headers)
                first = await self._next(stream, env)
                finished = first.event in (Event.ERROR, Event.RESULT)
                response_headers = {"x-request-id": env.request_id}
                if route := first.headers.get(hdr.ROUTE):
                    response_headers["x-leafwire-route"] = route
                if served_by := first.headers.get(hdr.SERVED_BY):
                    response_headers["x-leafwire-served-by"] = served_by
                if cached := first.headers.get(hdr.CACHE):
                    response_headers["x-leafwire-cache"] = cached
                first.raise_for_error()
                if first.event is Event.RESULT:
                    return web.Response(body=first.data, content_type="application/json",
                                        headers=response_headers)
                resp, finished = await self._stream(http, stream, env, first, response_headers)
                return resp
            except LeafwireError as err:
                return error_response(err, {"x-request-id": env.request_id})
            except (asyncio.CancelledError, ConnectionResetError):
                metrics.CLIENT_DISCONNECTS.inc()
                raise
            finally:
                if not finished:
                    await self._cancel(env)

    async def _next(self, stream: ReplyStream, env: Envelope) -> Reply:
        wait = min(self.settings.idle_timeout_s, env.remaining())
        if wait <= 0:
            raise DeadlineExceeded("The request took longer than its deadline.")
        try:
            return await stream.next(wait)
        except TimeoutError as exc:
            raise DeadlineExceeded(f"No answer arrived within {wait:.0f} s.") from exc

    async def _stream(self, http: web.Request, stream: ReplyStream, env: Envelope, first: Reply,
                      headers: dict[str, str]) -> tuple[web.StreamResponse, bool]:
        """Relay chunk events as server-sent events until ``done`` or an error."""
        resp = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        await resp.prepare(http)
        reply = first
        while True:
            if reply.event is Event.CHUNK:
                await resp.write(b"data: " + reply.data + b"\n\n")
            elif reply.event is Event.DONE:
                await resp.write(DONE)
                await resp.write_eof()
                return resp, True
            elif reply.event is Event.ERROR:
                # Headers are gone: the error travels as an event, as OpenAI does mid-stream.
                await resp.write(b"data: " + reply.data + b"\n\n")
                await resp.write_eof()
                return resp, True
            try:
                reply = await self._next(stream, env)
            except LeafwireError as err:
                await resp.write(b"data: " + err.to_response().model_dump_json().encode() + b"\n\n")
                await resp.write_eof()
                return resp, False  # the worker may still be generating: let the caller cancel it

    async def _cancel(self, env: Envelope, reason: str = "the caller stopped reading the answer") -> None:
        """Tell every worker of the site to stop this request (best effort)."""
        log.info("cancelling", request_id=env.request_id, reason=reason)
        with contextlib.suppress(Exception):
            await self.nc.publish(subjects.cancel(self.settings.site),
                                  Cancel(request_id=env.request_id, reason=reason).model_dump_json().encode())
