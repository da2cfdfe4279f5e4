"""What every HTTP endpoint that asks the site over NATS shares: publish with a reply subject, read the
replies with the idle timeout and the deadline, turn the first reply's headers into HTTP headers, and
broadcast a cancel when the caller is gone before the answer ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError

from schemas.control import Cancel
from services.gateway.errors import REQUEST_ID, error_response, log
from services.gateway.settings import GatewaySettings
from shared import envelope as hdr
from shared import metrics, subjects
from shared.envelope import Envelope, new_request_id
from shared.errors import DeadlineExceeded, LeafwireError, Unavailable
from shared.nats_headers import too_large
from shared.replies import Reply, ReplyReader, ReplyStream

RESIDENCY_HEADER = "x-leafwire-residency"  # "onsite": keep this request on the site
COST_HEADER = "x-leafwire-cost-usd"  # what a cloud answer cost (its site's Lw-Cost)
RECONNECT_GRACE_S = 2.0  # how long a request waits for a NATS connection being made again before a 503


def request_headers(env: Envelope, http: web.Request) -> dict[str, str]:
    """NATS headers of a request entering at the gateway (the reply subject is the message's own)."""
    headers = {k: v for k, v in env.headers().items() if k != hdr.REPLY}
    if http.headers.get(RESIDENCY_HEADER, "").lower() == "onsite":
        headers[hdr.RESIDENCY] = "onsite"
    return headers


@dataclass
class Exchange:
    """One request in flight: where its replies arrive, and whether its answer has ended."""

    stream: ReplyStream
    env: Envelope
    finished: bool = False


Respond = Callable[[Exchange], Awaitable[web.StreamResponse]]


@dataclass
class Bridge:
    """The NATS client, the reply reader and the settings."""

    nc: NATS
    replies: ReplyReader
    settings: GatewaySettings

    def envelope(self, tenant: str) -> Envelope:
        """A new request's envelope: a fresh id and the gateway's deadline."""
        return Envelope(request_id=new_request_id(), tenant=tenant, reply="",
                        deadline=time.time() + self.settings.request_timeout_s)

    async def ask(self, subject: str, raw: bytes, stream: ReplyStream, env: Envelope, http: web.Request,
                  skip: str = "") -> None:
        """Publish the request, replies to ``stream`` (not when the stream was refused: shutting down); ``skip``:
        targets of its route that refused it already (``Lw-Skip``)."""
        if stream.given_up:
            return
        if not self.nc.is_connected:
            await self._reconnected(env)
        stream.unavailable = f"no router is serving site '{self.settings.site}'"
        headers = request_headers(env, http)
        if skip:
            headers[hdr.SKIP] = skip
        try:
            await self.nc.publish(subject, raw, reply=stream.subject, headers=headers)
        except MaxPayloadError as exc:
            raise too_large(exc, raw, self.nc.max_payload) from exc
        stream.sent = True

    async def _reconnected(self, env: Envelope) -> None:
        """Wait a moment for the NATS connection to come back (a blip); a 503 if it does not: a request
        published meanwhile would wait in nats-py's buffer for the idle timeout and end as a 504."""
        deadline = time.monotonic() + min(RECONNECT_GRACE_S, max(0.0, env.remaining()))
        while not self.nc.is_connected:
            if time.monotonic() >= deadline:
                raise Unavailable("The gateway is not connected to NATS (it keeps trying to connect again); "
                                  "retry shortly.", retry_after=5)
            await asyncio.sleep(0.05)

    async def next(self, stream: ReplyStream, env: Envelope) -> Reply:
        """The next reply, or 504 when none comes within the idle timeout or the deadline."""
        wait = min(self.settings.idle_timeout_s, env.remaining())
        if wait <= 0:
            raise DeadlineExceeded("The request took longer than its deadline.")
        try:
            return await stream.next(wait, cap_s=env.remaining())
        except TimeoutError as exc:
            if wait < self.settings.idle_timeout_s or env.remaining() < 0.1:  # (progress may push to the deadline)
                raise DeadlineExceeded("The request took longer than its deadline.") from exc
            raise DeadlineExceeded(
                f"Nothing was heard of this request for {wait:g} s: the service answering it stopped or was cut "
                f"off (a service at work on a request says so every few seconds).", code="no_sign_of_life"
            ) from exc

    @staticmethod
    def answer_headers(first: Reply, env: Envelope) -> dict[str, str]:
        """``x-request-id``, and the route and worker the first reply names."""
        headers = {REQUEST_ID: env.request_id}
        if route := first.headers.get(hdr.ROUTE):
            headers["x-leafwire-route"] = route
        if served_by := first.headers.get(hdr.SERVED_BY):
            headers["x-leafwire-served-by"] = served_by
        if cached := first.headers.get(hdr.CACHE):
            headers["x-leafwire-cache"] = cached
        if cost := first.headers.get(hdr.COST):
            headers[COST_HEADER] = cost
        return headers

    @staticmethod
    def add_costs(headers: dict[str, str], replies: Iterable[Reply], spent: float = 0.0) -> None:
        """``x-leafwire-cost-usd`` of an answer made of several (choices, parts): their costs added up, with
        what was ``spent`` before them, or none when one of them has none (a local model's) or an unreadable one."""
        try:
            costs = [float(reply.headers[hdr.COST]) for reply in replies]
        except (KeyError, ValueError):
            headers.pop(COST_HEADER, None)
            return
        headers[COST_HEADER] = hdr.money(sum(costs) + spent)

    async def exchange(self, env: Envelope, respond: Respond) -> web.StreamResponse:
        """Run one request: ``respond`` asks and answers, setting ``finished`` once the answer ended. A
        failure becomes OpenAI's error shape; a caller gone, or an answer left unfinished, cancels the request
        at the site (it may still be waiting in the batcher, or generating)."""
        stream = self.replies.open()  # closed below: a generator-based context manager costs more, per request
        exchange = Exchange(stream, env)
        why = "the answer ended unfinished"
        try:
            return await respond(exchange)
        except LeafwireError as err:
            why = f"the gateway answered the caller: {err.message}"  # a timeout, say: not the caller's doing
            return error_response(err, {REQUEST_ID: env.request_id})
        except (asyncio.CancelledError, ConnectionResetError):
            why = "the caller stopped reading the answer"
            metrics.CLIENT_DISCONNECTS.inc()
            raise
        finally:
            await self.settle(stream, env, exchange.finished, why)

    async def settle(self, stream: ReplyStream, env: Envelope, finished: bool, why: str) -> None:
        """Close a request's reply stream; cancel the request at the site when it went out and its answer
        did not end here (``why``), or the gateway gave up on it."""
        try:
            if stream.sent and (not finished or stream.given_up):
                await self.cancel(env, f"the gateway gave up on it: {stream.given_up}" if stream.given_up
                                  else why)
        finally:
            stream.close()

    async def cancel(self, env: Envelope, reason: str) -> None:
        """Tell every worker and batcher of the site to stop this request (best effort)."""
        log.info("cancelling", request_id=env.request_id, reason=reason)
        with contextlib.suppress(Exception):
            await self.nc.publish(subjects.cancel(self.settings.site),
                                  Cancel(request_id=env.request_id, reason=reason).model_dump_json().encode())
