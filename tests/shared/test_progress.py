"""Progress events on a real nats-server: a worker tells a caller who has heard nothing for a while that its
answer is still coming, and a reader's idle timer starts again (up to the request's deadline) without the
event being handed on as a reply."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import nats
import pytest

from services.local_inference.settings import InferenceSettings
from services.local_inference.worker import Taken, Worker
from shared import envelope as hdr
from shared import replies, subjects
from shared.envelope import Envelope
from shared.errors import Unavailable
from shared.replies import Event, Presence, ReplyPublisher, ReplyReader, ping


async def test_progress_keeps_a_quiet_stream_alive_up_to_its_cap(nc: nats.NATS) -> None:
    reader = ReplyReader(nc, subjects.reply_prefix("test-progress"))
    await reader.start()
    stream = reader.open()
    publisher = ReplyPublisher(nc, stream.subject, Envelope("r1", "t", stream.subject, time.time() + 60),
                               served_by="edge1/w1")

    async def keep_going(times: int) -> None:
        for _ in range(times):
            await asyncio.sleep(0.1)
            await publisher.ping()

    try:
        beats = asyncio.create_task(keep_going(6))
        started = time.monotonic()
        await asyncio.sleep(0)
        later = asyncio.create_task(stream.next(0.3))
        await beats
        await publisher.send(Event.RESULT, b'{"ok": true}')
        reply = await later
        assert time.monotonic() - started > 0.5  # longer than the 0.3 s it would have waited without them
        assert reply.event is Event.RESULT
        assert reply.headers["Lw-Request-Id"] == "r1"  # the first real event still carries the first headers
        assert reply.headers["Lw-Served-By"] == "edge1/w1"

        beats = asyncio.create_task(keep_going(6))
        with pytest.raises(TimeoutError):  # the request's deadline caps how far progress pushes the timer
            await stream.next(0.3, cap_s=0.35)
        await beats
    finally:
        stream.close()
        await reader.stop()


async def test_a_ping_learns_whether_the_caller_still_waits(nc: nats.NATS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A progress event sent as a request: the reader answers for an open stream, says ``gone`` for a closed
    one; nobody listening means gone; a reader too busy to answer counts as there."""
    reader = ReplyReader(nc, subjects.reply_prefix("test-ping"))
    await reader.start()
    mute = await nc.subscribe(f"{subjects.reply_prefix('test-mute')}.*")  # takes messages, never answers
    open_stream, closed_stream = reader.open(), reader.open()
    closed_stream.close()
    monkeypatch.setattr(replies, "PING_TIMEOUT_S", 0.2)
    try:
        assert await ping(nc, open_stream.subject) is Presence.THERE
        assert await ping(nc, closed_stream.subject) is Presence.GONE
        assert await ping(nc, f"{subjects.reply_prefix('test-nobody')}.1") is Presence.UNHEARD
        assert await ping(nc, f"{subjects.reply_prefix('test-mute')}.1") is Presence.THERE
        assert await ping(nc, nc.new_inbox()) is Presence.THERE  # a plain client's inbox is never sent one
    finally:
        open_stream.close()
        await mute.unsubscribe()
        await reader.stop()


async def test_the_worker_stops_answers_nobody_waits_for(nc: nats.NATS, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker pings each caller of a row every keepalive_s. A caller that waits keeps its answer; one
    whose stream was closed loses it at once; one whose subject nobody listens on (its gateway is gone)
    loses it after two keepalives unheard, but a gateway that was only reconnecting (back by the next ping)
    keeps it; a plain client's inbox is never pinged. The rounds' clock is the test's (a loaded machine's
    slow pings must not move a round past the next threshold: CI saw one)."""
    clock = [time.monotonic()]
    monkeypatch.setattr(replies, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    reader = ReplyReader(nc, subjects.reply_prefix("test-worker"))
    await reader.start()
    waiting, closed = reader.open(), reader.open()
    closed.close()
    reconnecting = ReplyReader(nc, subjects.reply_prefix("test-reconnect"))
    await reconnecting.start()
    held = reconnecting.open()
    await reconnecting.stop()  # its NATS connection is down for a moment
    client_inbox = nc.new_inbox()
    client = await nc.subscribe(client_inbox)
    await nc.flush()
    worker = Worker(settings=InferenceSettings(keepalive_s=0.2), engines={})
    stopped: list[str] = []

    def stop(rid: str) -> None:  # as the row's answer ends: it leaves the worker
        stopped.append(rid)
        worker.inflight.pop(rid)

    def taken(rid: str, subject: str) -> Taken:
        publisher = ReplyPublisher(nc, subject, Envelope(rid, "t", subject, time.time() + 60))
        publisher.pinged -= 0.3
        return Taken("tiny", lambda: stop(rid), publisher=publisher)

    worker.inflight = {"waiting": taken("waiting", waiting.subject),
                       "closed": taken("closed", closed.subject),
                       "gateway-gone": taken("gateway-gone", f"{subjects.reply_prefix('test-dead')}.7"),
                       "reconnecting": taken("reconnecting", held.subject),
                       "plain": taken("plain", client_inbox),
                       "embeddings": Taken("minilm", lambda: stopped.append("embeddings"))}
    try:
        later = asyncio.create_task(waiting.next(2.0))
        await worker.keep_callers()
        assert stopped == ["closed"]  # unheard once is not gone yet
        await reconnecting.start()  # back before the next ping
        await worker.keep_callers()  # everyone was just asked: nothing until keepalive_s has passed again
        assert stopped == ["closed"]
        clock[0] += 0.25
        await worker.keep_callers()
        assert stopped == ["closed"]  # unheard for one keepalive: still not
        clock[0] += 0.25
        await worker.keep_callers()
        assert sorted(stopped) == ["closed", "gateway-gone"]  # "reconnecting" answered again: kept
        with pytest.raises(TimeoutError):  # the progress events push the timer back; none is a reply
            await later
        with pytest.raises(nats.errors.TimeoutError):
            await client.next_msg(timeout=0.3)
    finally:
        waiting.close()
        held.close()
        await reader.stop()
        await reconnecting.stop()


async def test_ending_a_reader_ends_every_stream_with_its_error(nc: nats.NATS) -> None:
    """On shutdown the gateway ends its reader: a waiting stream, and any opened later, gets the error at
    once (marked as given up, so the site is told to stop); ``emptied`` says when every stream is closed."""
    reader = ReplyReader(nc, subjects.reply_prefix("test-end"))
    await reader.start()
    stream = reader.open()
    try:
        waiting = asyncio.create_task(stream.next(30))
        await asyncio.sleep(0.05)
        assert await reader.emptied(0.05) is False
        reader.end(Unavailable("going away", retry_after=1, code="shutting_down"))
        reply = await asyncio.wait_for(waiting, 2)
        assert reply.event is Event.ERROR
        assert (reply.headers[hdr.STATUS], reply.headers[hdr.RETRY_AFTER]) == ("503", "1")
        assert b"shutting_down" in reply.data
        assert stream.given_up == "going away"
        later = reader.open()
        assert (await later.next(30)).event is Event.ERROR
        later.close()
        closing = asyncio.create_task(reader.emptied(5))
        await asyncio.sleep(0.05)
        stream.close()
        assert await asyncio.wait_for(closing, 2) is True
    finally:
        await reader.stop()
