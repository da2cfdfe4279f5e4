"""How long the gateway waits for a reply, on a real nats-server: silence for the idle timeout is a 504 that
says nothing was heard (the service holding the request died); progress events keep it waiting, but not past
the request's deadline, which is a 504 that says so."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from services.gateway.bridge import Bridge
from services.gateway.settings import GatewaySettings
from shared import subjects
from shared.envelope import Envelope
from shared.errors import DeadlineExceeded
from shared.replies import ReplyPublisher, ReplyReader


async def test_silence_and_deadline_are_told_apart(nc: nats.NATS) -> None:
    reader = ReplyReader(nc, subjects.reply_prefix("test-waiting"))
    await reader.start()
    bridge = Bridge(nc, reader, GatewaySettings(idle_timeout_s=0.3))
    silent, kept = reader.open(), reader.open()

    async def keep(publisher: ReplyPublisher) -> None:
        while True:
            await asyncio.sleep(0.1)
            await publisher.ping()

    try:
        with pytest.raises(DeadlineExceeded) as exc:
            await bridge.next(silent, Envelope("r1", "t", silent.subject, time.time() + 30))
        assert exc.value.code == "no_sign_of_life"
        assert "Nothing was heard of this request for 0.3 s" in exc.value.message

        env = Envelope("r2", "t", kept.subject, time.time() + 0.8)
        keeping = asyncio.create_task(keep(ReplyPublisher(nc, kept.subject, env)))
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as exc:
            await bridge.next(kept, env)
        keeping.cancel()
        assert time.monotonic() - started > 0.6  # kept waiting past the idle timeout...
        assert exc.value.code == "deadline_exceeded"  # ...until the deadline, which is what it says
        assert exc.value.message == "The request took longer than its deadline."
    finally:
        silent.close()
        kept.close()
        await reader.stop()
