"""Progress events on a real nats-server: a worker tells a caller who has heard nothing for a while that its
answer is still coming, and a reader's idle timer starts again (up to the request's deadline) without the
event being handed on as a reply."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from services.local_inference.settings import InferenceSettings
from services.local_inference.worker import KEEPALIVE_S, Taken, Worker
from shared import subjects
from shared.envelope import Envelope
from shared.replies import Event, ReplyPublisher, ReplyReader


async def test_progress_keeps_a_quiet_stream_alive_up_to_its_cap(nc: nats.NATS) -> None:
    reader = ReplyReader(nc, subjects.reply_prefix("test-progress"))
    await reader.start()
    stream = reader.open()
    publisher = ReplyPublisher(nc, stream.subject, Envelope("r1", "t", stream.subject, time.time() + 60),
                               served_by="edge1/w1")

    async def keep_going(times: int) -> None:
        for _ in range(times):
            await asyncio.sleep(0.1)
            await publisher.progress()

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


async def test_the_worker_tells_quiet_readers_only(nc: nats.NATS) -> None:
    """Only a quiet caller reading through a leafwire reply reader is told: a NATS client's own inbox (a plain
    ``nc.request``, which takes the first reply as the answer) never gets a progress event."""
    inbox = f"{subjects.reply_prefix('test-worker')}.1"
    client_inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    client = await nc.subscribe(client_inbox)
    await nc.flush()
    worker = Worker(settings=InferenceSettings(), engines={})
    quiet = ReplyPublisher(nc, inbox, Envelope("quiet", "t", inbox, time.time() + 60))
    quiet.last_sent -= KEEPALIVE_S + 1
    talking = ReplyPublisher(nc, inbox, Envelope("talking", "t", inbox, time.time() + 60))
    plain = ReplyPublisher(nc, client_inbox, Envelope("plain", "t", client_inbox, time.time() + 60))
    plain.last_sent -= KEEPALIVE_S + 1
    worker.inflight = {"quiet": Taken("tiny", lambda: None, publisher=quiet),
                       "talking": Taken("tiny", lambda: None, publisher=talking),
                       "plain": Taken("tiny", lambda: None, publisher=plain),
                       "embeddings": Taken("minilm", lambda: None)}
    await worker.keep_callers()
    msg = await sub.next_msg(timeout=5)
    assert (msg.headers, msg.data) == ({"Lw-Event": "progress"}, b"")
    with pytest.raises(nats.errors.TimeoutError):  # one event, for the quiet caller only
        await sub.next_msg(timeout=0.3)
    await worker.keep_callers()  # it has just been told: nothing again until it is quiet again
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.3)
    with pytest.raises(nats.errors.TimeoutError):
        await client.next_msg(timeout=0.3)
