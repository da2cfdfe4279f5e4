"""Hand-offs on a real nats-server: a request with no fallback is published once and never waited for; only
NATS's no-responders status comes back, and it becomes the caller's 503."""

from __future__ import annotations

import asyncio
import time

import nats

from services.router.handover import NO_CLOUD_ADAPTER, Handoffs
from shared.envelope import HANDOFF, REPLY, REQUEST_ID, Envelope
from shared.replies import Event
from tests.support import eventually_async


def envelope(reply: str, request_id: str = "r1") -> Envelope:
    return Envelope(request_id=request_id, tenant="t", reply=reply, deadline=time.time() + 30)


async def test_a_taker_gets_the_request_and_the_caller_subject(nc: nats.NATS) -> None:
    """The target receives the request with the hand-off mark and the caller's subject; nothing is sent
    back to the router, and the router does not wait for anything."""
    handoffs = Handoffs(nc, generation_s=0.05)
    await handoffs.start()
    got: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()
    sub = await nc.subscribe("handoff.take", cb=got.put)
    try:
        await handoffs.hand("handoff.take", b"{}", envelope("caller.inbox.1"), "rule")
        msg = await asyncio.wait_for(got.get(), 5)
        assert msg.headers is not None
        assert msg.headers[HANDOFF] == "1"
        assert msg.headers[REPLY] == "caller.inbox.1"
        assert msg.headers[REQUEST_ID] == "r1"
        assert msg.reply  # only for NATS to say nobody listens
    finally:
        await sub.unsubscribe()
        await handoffs.stop()


async def test_nobody_listening_answers_the_caller_with_a_503(nc: nats.NATS) -> None:
    """With no subscriber on the subject, the caller gets an error event: 503, retry after 2 s."""
    handoffs = Handoffs(nc)
    await handoffs.start()
    caller = nc.new_inbox()
    got: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()
    sub = await nc.subscribe(caller, cb=got.put)
    try:
        await handoffs.hand("handoff.nobody", b"{}", envelope(caller, "r2"), "rule")
        msg = await asyncio.wait_for(got.get(), 5)
        assert msg.headers is not None
        assert msg.headers["Lw-Event"] == Event.ERROR.value
        assert msg.headers["Lw-Status"] == "503"
        assert msg.headers["Lw-Retry-After"] == "2"
        assert NO_CLOUD_ADAPTER in msg.data.decode()
        assert len(handoffs) == 0  # answered: forgotten
    finally:
        await sub.unsubscribe()
        await handoffs.stop()


async def test_taken_requests_are_forgotten_within_two_generations(nc: nats.NATS) -> None:
    """A taken request is remembered only while a no-responders status could still come back."""
    handoffs = Handoffs(nc, generation_s=0.05)
    await handoffs.start()
    async def take(_msg: nats.aio.msg.Msg) -> None:
        pass

    sub = await nc.subscribe("handoff.many", cb=take)
    try:
        for i in range(100):
            await handoffs.hand("handoff.many", b"{}", envelope(f"caller.{i}", f"r{i}"), "rule")
        assert len(handoffs) == 100
        async def remembered() -> int:
            return len(handoffs)

        await eventually_async(remembered, lambda n: n == 0, within_s=5, what="hand-offs forgotten")
    finally:
        await sub.unsubscribe()
        await handoffs.stop()
