"""The reply stream: how an answer travels from the worker that makes it to the caller that asked.

On the caller's reply subject a worker publishes, with the event kind in the ``Lw-Event`` header:

- ``chunk``  an OpenAI ``chat.completion.chunk`` (streamed requests), any number of times, then
- ``done``   a ``StreamEnd`` (finish reason and usage) that closes the stream; or
- ``result`` one OpenAI ``chat.completion`` (requests with ``stream: false``); or
- ``error``  an OpenAI error object, status in ``Lw-Status``, at any point; it closes the stream.

A request sent with a reply subject to a subject nobody serves gets the server's no-responders status,
which readers turn into ``Unavailable``.

Keeping callers: a service holding a request (queued in the batcher, decoded by a worker, waiting for a cloud
provider) sends its caller a ``progress`` event at least every ``LW_KEEPALIVE_S`` (5 s) while it holds it
(``keep_callers``). That is how a reader tells a slow answer from a dead holder: a gateway answers 504 when
it has heard nothing for its idle timeout (20 s). The progress event is sent as a NATS request, and the
reader answers whether it still waits; an answer of ``gone``, or the server's no-responders status (the
caller's process is gone) for ``2 × LW_KEEPALIVE_S`` (a gateway reconnecting to NATS is briefly not
there), makes the holder drop the request, so no model keeps decoding for nobody.

Each event of an answer after the first carries its number (``Lw-Seq``; the first is 0). Core NATS keeps
nothing for a subscriber whose connection was cut; a reader that finds a number missing ends the answer with
a 502 ``answer_incomplete`` instead of passing on an answer with a hole in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from schemas.errors import ErrorResponse
from shared import envelope as hdr
from shared import subjects
from shared.envelope import Envelope
from shared.errors import ChoicesOneByOne, IncompleteAnswer, LeafwireError, RemoteError, Unavailable, UpstreamError
from shared.numbers import finite


class Event(StrEnum):
    """Kinds of message on a reply subject."""

    CHUNK = "chunk"
    DONE = "done"
    RESULT = "result"
    ERROR = "error"
    ADMITTED = "admitted"  # on an admission reply (worker -> router), never on a caller's subject
    PROGRESS = "progress"  # "still working on it", no body: resets a reader's idle timer; never final


FINAL_EVENTS = frozenset({Event.DONE, Event.RESULT, Event.ERROR})
GONE = b"gone"  # a reader's answer to a progress event about a request it no longer waits for
PING_TIMEOUT_S = 2.0  # a reader that does not answer a progress event in this time is busy, not gone


class Presence(StrEnum):
    """What a progress event learnt of the caller."""

    THERE = "there"  # its reader waits for the answer (or is too busy to say: that counts as there)
    GONE = "gone"  # its reader said it no longer waits
    UNHEARD = "unheard"  # nobody listens on its subject: its process is gone, or reconnecting to NATS


async def ping(nc: NATS, subject: str) -> Presence:
    """Send a ``progress`` event to a leafwire reader's subject as a request, and learn whether the caller
    still waits. Other subjects (a plain ``nc.request``, which would take it for the answer) are not told and
    count as there."""
    if not subject.startswith(subjects.READERS):
        return Presence.THERE
    try:
        answer = await nc.request(subject, b"", timeout=PING_TIMEOUT_S, headers={hdr.EVENT: Event.PROGRESS.value})
    except NoRespondersError:
        return Presence.UNHEARD
    except (NatsTimeout, TimeoutError):
        return Presence.THERE
    return Presence.GONE if answer.data == GONE else Presence.THERE


class ReplyPublisher:
    """Publishes one request's answer to the caller's reply subject."""

    def __init__(self, nc: NATS, subject: str, env: Envelope, served_by: str = "",
                 first_headers: Mapping[str, str] | None = None) -> None:
        self._nc = nc
        self._subject = subject
        self._env = env
        self._served_by = served_by
        self._first = True
        self._seq = 0  # events sent so far: the next one's number
        self._first_headers = first_headers
        self.pinged = time.monotonic()  # when the caller was last asked whether it waits (taking it counts)
        self.unheard_since: float | None = None  # since when nobody listens on its subject

    def _headers(self, event: Event) -> dict[str, str]:
        h = {hdr.EVENT: event.value}
        if self._seq:
            h[hdr.SEQ] = str(self._seq)
        self._seq += 1
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

    def also_first(self, headers: Mapping[str, str]) -> None:
        """Headers the first event carries too, known only now (a whole answer's cost): none once it is sent."""
        if self._first:
            self._first_headers = {**(self._first_headers or {}), **headers}

    async def send(self, event: Event, body: bytes) -> None:
        """Publish one event (no-op when the caller left no reply subject)."""
        if self._subject:
            await self._nc.publish(self._subject, body, headers=self._headers(event))

    @property
    def request_id(self) -> str:
        """The id of the request answered."""
        return self._env.request_id

    async def ping(self) -> Presence:
        """Tell the caller the answer is still coming, and learn whether it still waits (see ``ping``). The
        first event's headers stay for the first real event."""
        return await ping(self._nc, self._subject)

    async def error(self, err: LeafwireError) -> None:
        """Publish an error event; it ends the stream for the caller."""
        if not self._subject:
            return
        h = self._headers(Event.ERROR) | _error_headers(err)
        await self._nc.publish(self._subject, err.to_response().model_dump_json().encode(), headers=h)


async def publish_error(nc: NATS, subject: str, env: Envelope, err: LeafwireError) -> None:
    """Send ``err`` about the request of ``env`` to ``subject``."""
    await ReplyPublisher(nc, subject, env).error(err)


class Held(Protocol):
    """A request a service holds for a caller: when that caller was last pinged, and since when nobody has
    listened on its subject (monotonic seconds)."""

    pinged: float
    unheard_since: float | None


H = TypeVar("H", bound=Held)
UNHEARD_ROUNDS = 2  # keepalives with nobody on the subject before the caller counts as gone


async def keep_callers(held: Iterable[H], every_s: float, ping: Callable[[H], Awaitable[Presence]],
                       gone: Callable[[H], None]) -> int:
    """One round of keeping callers: ``ping`` the caller of each held request not pinged for ``every_s``,
    all at once, and call ``gone`` for each that no longer waits: its reader said so, or nobody has listened
    on its subject for ``UNHEARD_ROUNDS × every_s`` (a caller's gateway reconnecting to NATS misses a ping or
    two and is still there). Returns how many were gone."""
    now = time.monotonic()
    asked = [h for h in held if h.pinged <= now - every_s]
    if not asked:
        return 0
    for h in asked:
        h.pinged = now
    answers = await asyncio.gather(*(ping(h) for h in asked), return_exceptions=True)
    lost = []
    for h, presence in zip(asked, answers, strict=True):
        if presence is Presence.GONE:
            lost.append(h)
        elif presence is Presence.UNHEARD:
            if h.unheard_since is None:
                h.unheard_since = now
            elif now - h.unheard_since >= UNHEARD_ROUNDS * every_s - every_s / 2:
                lost.append(h)
        else:
            h.unheard_since = None
    for h in lost:
        gone(h)
    return len(lost)


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
        err = RemoteError(status, ErrorResponse.model_validate_json(data), float(retry) if retry else None)
        err.final = headers.get(hdr.FINAL) == "1"
        err.cost_usd = finite(headers.get(hdr.COST, "")) or 0.0
        return err
    except ValueError:
        return UpstreamError(f"malformed error event: {data[:200]!r}")


def _error_headers(err: LeafwireError) -> dict[str, str]:
    headers = {hdr.STATUS: str(err.status)}
    if err.retry_after is not None:
        headers[hdr.RETRY_AFTER] = f"{err.retry_after:g}"
    if isinstance(err, ChoicesOneByOne) and err.failed:
        headers[hdr.SKIP] = ",".join(err.failed)
    if err.cost_usd:
        headers[hdr.COST] = hdr.money(err.cost_usd)
    if err.final:
        headers[hdr.FINAL] = "1"
    return headers


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
        self.given_up: str | None = None  # why the reader ended the stream itself (the site must be told)
        self.sent = False  # whether its request went out (its owner says so)
        self._received = 0  # events of the answer received: the number the next numbered one must carry
        self._broken = False  # an event never arrived: the stream ended with an error, the rest is dropped

    def _put(self, msg: Msg) -> None:
        headers = msg.headers
        if headers is not None:
            if headers.get(hdr.EVENT) == Event.PROGRESS:
                if self._timer is not None:
                    wait_s, until = self._extend
                    self._timer.reschedule(min(asyncio.get_running_loop().time() + wait_s, until))
                return
            seq = headers.get(hdr.SEQ)
            if seq is not None and seq != str(self._received):
                self._lost()
        if self._broken:
            return
        self._received += 1
        if len(self._replies) >= self._maxsize:
            self.overflowed = True
            self.given_up = "the reply stream overflowed"
            return
        self._replies.append(_as_reply(msg, self.unavailable))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _lost(self) -> None:
        """An event of the answer never arrived (a NATS connection was cut meanwhile): what came before it
        is passed on, then an error instead of an answer with a hole in it."""
        if self._broken:
            return
        self._broken = True
        err = IncompleteAnswer("Part of the answer was lost on the way (a NATS connection was cut meanwhile): the "
                               "answer is incomplete. Send the request again.", retry_after=1)
        self.given_up = err.message
        self._replies.append(Reply(Event.ERROR, err.to_response().model_dump_json().encode(), _error_headers(err)))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def fail(self, err: LeafwireError) -> None:
        """End the stream with ``err`` as its next reply, ahead of anything waiting (the reader stops)."""
        self.given_up = err.message
        self._replies.appendleft(Reply(Event.ERROR, err.to_response().model_dump_json().encode(),
                                       _error_headers(err)))
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
        self._reader._closed(self._key)


class ReplyReader:
    """One wildcard subscription that demultiplexes the reply streams of many requests."""

    def __init__(self, nc: NATS, prefix: str, stream_maxsize: int = 4096) -> None:
        self._nc = nc
        self._prefix = prefix
        self._maxsize = stream_maxsize
        self._streams: dict[str, ReplyStream] = {}
        self._sub: Subscription | None = None
        self._ids = itertools.count()
        self._ended: LeafwireError | None = None
        self._emptied: asyncio.Future[None] | None = None

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
        if msg.reply:  # a holder's progress event asks whether the request is still waited for
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, b"" if stream is not None else GONE)

    def open(self) -> ReplyStream:
        """A new reply subject and the stream of what arrives on it; ``close()`` it when done. Once the
        reader is ``ended``, a new stream holds that error from the start."""
        key = str(next(self._ids))
        stream = ReplyStream(self, f"{self._prefix}.{key}", key, self._maxsize)
        self._streams[key] = stream
        if self._ended is not None:
            stream.fail(self._ended)
        return stream

    def __len__(self) -> int:
        return len(self._streams)

    def _closed(self, key: str) -> None:
        self._streams.pop(key, None)
        if not self._streams and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)

    async def emptied(self, within_s: float) -> bool:
        """Wait until no stream is open (at most ``within_s``); False when some still are."""
        if self._streams:
            self._emptied = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within_s):
                    await self._emptied
        return not self._streams

    def refuse_new(self, err: LeafwireError) -> None:
        """Streams opened from now on hold ``err`` from the start (shutting down); open ones go on."""
        self._ended = err

    def end(self, err: LeafwireError) -> None:
        """Give every open stream, and any opened from now on, ``err`` as its next reply (shutting down)."""
        self._ended = err
        for stream in list(self._streams.values()):
            stream.fail(err)

