"""The reply stream: how an answer travels from the worker that makes it to the caller that asked.

On the caller's reply subject a worker publishes, with the event kind in the ``Lw-Event`` header:

- ``chunk``  an OpenAI ``chat.completion.chunk`` (streamed requests), any number of times, then
- ``done``   a ``StreamEnd`` (finish reason and usage) that closes the stream; or
- ``result`` one OpenAI ``chat.completion`` (requests with ``stream: false``); or
- ``error``  an OpenAI error object, status in ``Lw-Status``, at any point; it closes the stream.

A request sent with a reply subject to a subject nobody serves gets the server's no-responders status,
which readers turn into ``Unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.errors import ErrorResponse
from shared import envelope as hdr
from shared import subjects
from shared.envelope import Envelope
from shared.errors import LeafwireError, RemoteError, Unavailable, UpstreamError


class Event(StrEnum):
    """Kinds of message on a reply subject."""

    CHUNK = "chunk"
    DONE = "done"
    RESULT = "result"
    ERROR = "error"
    ADMITTED = "admitted"  # on an admission reply (worker -> router), never on a caller's subject
    PROGRESS = "progress"  # "still working on it", no body: resets a reader's idle timer; never final


FINAL_EVENTS = frozenset({Event.DONE, Event.RESULT, Event.ERROR})


class ReplyPublisher:
    """Publishes one request's answer to the caller's reply subject."""

    def __init__(self, nc: NATS, subject: str, env: Envelope, served_by: str = "",
                 first_headers: Mapping[str, str] | None = None) -> None:
        self._nc = nc
        self._subject = subject
        self._env = env
        self._served_by = served_by
        self._first = True
        self._first_headers = first_headers
        self.last_sent = time.monotonic()  # when the caller last heard of this request (taking it counts)

    def _headers(self, event: Event) -> dict[str, str]:
        h = {hdr.EVENT: event.value}
        if self._first:
            h[hdr.REQUEST_ID] = self._env.request_id
            if self._env.route:
                h[hdr.ROUTE] = self._env.route
            if self._served_by:
                h[hdr.SERVED_BY] = self._served_by
            if self._first_headers:
                h.update(self._first_headers)
            self._first = False
        return h

    async def send(self, event: Event, body: bytes) -> None:
        """Publish one event (no-op when the caller left no reply subject)."""
        if self._subject:
            self.last_sent = time.monotonic()
            await self._nc.publish(self._subject, body, headers=self._headers(event))

    async def progress(self) -> None:
        """Tell the caller the answer is still coming (a ``progress`` event, which keeps the first event's
        headers for the first real one). Only a leafwire reply reader is told: a plain ``nc.request`` takes the
        first reply as the answer."""
        if self._subject.startswith(subjects.READERS):
            self.last_sent = time.monotonic()
            await self._nc.publish(self._subject, b"", headers={hdr.EVENT: Event.PROGRESS.value})

    async def error(self, err: LeafwireError) -> None:
        """Publish an error event; it ends the stream for the caller."""
        if not self._subject:
            return
        h = self._headers(Event.ERROR)
        h[hdr.STATUS] = str(err.status)
        if err.retry_after is not None:
            h[hdr.RETRY_AFTER] = f"{err.retry_after:g}"
        await self._nc.publish(self._subject, err.to_response().model_dump_json().encode(), headers=h)


async def publish_error(nc: NATS, subject: str, env: Envelope, err: LeafwireError) -> None:
    """Send ``err`` about the request of ``env`` to ``subject``."""
    await ReplyPublisher(nc, subject, env).error(err)


@dataclass(frozen=True, slots=True)
class Reply:
    """One event received on a reply subject."""

    event: Event
    data: bytes
    headers: Mapping[str, str]

    def raise_for_error(self) -> None:
        """Raise the error this reply carries, if it is an error event."""
        if self.event is Event.ERROR:
            raise error_of(self.headers, self.data)


def error_of(headers: Mapping[str, str], data: bytes) -> LeafwireError:
    """Rebuild the error carried by an ``error`` event."""
    try:
        status = int(headers.get(hdr.STATUS, "500"))
        retry = headers.get(hdr.RETRY_AFTER)
        return RemoteError(status, ErrorResponse.model_validate_json(data),
                           float(retry) if retry else None)
    except ValueError:
        return UpstreamError(f"malformed error event: {data[:200]!r}")


def _as_reply(msg: Msg, unavailable: str) -> Reply:
    headers = msg.headers or {}
    err: LeafwireError
    if headers.get("Status") == "503" and not msg.data:
        err = Unavailable(unavailable, retry_after=1)
        return Reply(Event.ERROR, err.to_response().model_dump_json().encode(),
                     {hdr.STATUS: "503", hdr.RETRY_AFTER: "1"})
    try:
        event = Event(headers.get(hdr.EVENT, ""))
    except ValueError:
        err = UpstreamError(f"unexpected message on reply subject: event {headers.get(hdr.EVENT)!r}")
        return Reply(Event.ERROR, err.to_response().model_dump_json().encode(), {hdr.STATUS: "502"})
    return Reply(event, msg.data, headers)


class ReplyStream:
    """The replies to one request, read in order; ends after a final event."""

    def __init__(self, reader: ReplyReader, subject: str, key: str, maxsize: int) -> None:
        self.subject = subject
        self._reader = reader
        self._key = key
        self._maxsize = maxsize
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None  # the reader, while it waits for a reply
        self._timer: asyncio.Timeout | None = None  # its timer, which a progress event pushes back
        self._extend: tuple[float, float] = (0.0, 0.0)  # (wait_s, latest loop time it may be pushed to)
        self.unavailable = "no service is listening for this request"
        self.overflowed = False

    def _put(self, msg: Msg) -> None:
        if msg.headers is not None and msg.headers.get(hdr.EVENT) == Event.PROGRESS:
            if self._timer is not None:
                wait_s, until = self._extend
                self._timer.reschedule(min(asyncio.get_running_loop().time() + wait_s, until))
            return
        if len(self._replies) >= self._maxsize:
            self.overflowed = True
            return
        self._replies.append(_as_reply(msg, self.unavailable))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, wait_s: float, cap_s: float | None = None) -> Reply:
        """The next reply; ``TimeoutError`` when none comes within ``wait_s`` seconds. A ``progress`` event
        (not returned) starts the ``wait_s`` again, up to ``cap_s`` from now (a deadline) when given."""
        if self.overflowed:
            err = UpstreamError("reply stream overflowed: the reader fell too far behind")
            return Reply(Event.ERROR, err.to_response().model_dump_json().encode(), {hdr.STATUS: "502"})
        if not self._replies:  # (one already here needs no timer)
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            self._extend = (wait_s, loop.time() + (cap_s if cap_s is not None else float("inf")))
            try:
                async with asyncio.timeout(wait_s) as self._timer:
                    await self._waiter
            finally:
                self._waiter = self._timer = None
        return self._replies.popleft()

    def close(self) -> None:
        """Stop receiving; later messages for this request are dropped."""
        self._reader._streams.pop(self._key, None)


class ReplyReader:
    """One wildcard subscription that demultiplexes the reply streams of many requests."""

    def __init__(self, nc: NATS, prefix: str, stream_maxsize: int = 4096) -> None:
        self._nc = nc
        self._prefix = prefix
        self._maxsize = stream_maxsize
        self._streams: dict[str, ReplyStream] = {}
        self._sub: Subscription | None = None
        self._ids = itertools.count()

    async def start(self) -> None:
        """Subscribe (and flush, so replies sent right after are not missed)."""
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._dispatch,
                                             pending_msgs_limit=1_000_000,
                                             pending_bytes_limit=512 * 1024 * 1024)
        await self._nc.flush()

    async def stop(self) -> None:
        """Unsubscribe; open streams get nothing more."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _dispatch(self, msg: Msg) -> None:
        stream = self._streams.get(msg.subject[len(self._prefix) + 1:])
        if stream is not None:
            stream._put(msg)

    def open(self) -> ReplyStream:
        """A new reply subject and the stream of what arrives on it; ``close()`` it when done."""
        key = str(next(self._ids))
        stream = ReplyStream(self, f"{self._prefix}.{key}", key, self._maxsize)
        self._streams[key] = stream
        return stream

