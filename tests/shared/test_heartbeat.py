"""A worker's control subjects on a real nats-server: a roll call is answered with a heartbeat at once, a
cancel reaches the worker's own cancel (and only names a request id)."""

from __future__ import annotations

import asyncio

import nats
from faststream.nats import NatsBroker

from schemas.control import Cancel, ModelInfo, WorkerHeartbeat
from shared import subjects
from shared.heartbeat import subscribe_controls
from tests.support import NatsServer, eventually_async

SITE = "beat1"


async def test_roll_call_and_cancel(nats_server: NatsServer, nc: nats.NATS) -> None:
    cancelled: list[str] = []
    beat = WorkerHeartbeat(worker_id="w1", service="test", site=SITE, models=[ModelInfo(name="m")])
    broker = NatsBroker(nats_server.url)
    subscribe_controls(broker, SITE, site=SITE, cancel=lambda body: cancelled.append(body.request_id) or True,
                       beat=lambda: beat, title="", cancel_doc="cancel", roll_call_doc="roll call")
    beats: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()
    sub = await nc.subscribe(subjects.heartbeat(SITE), cb=beats.put)
    await broker.start()
    try:
        await broker.connection.flush()

        async def roll_call() -> bool:  # core NATS, at most once: asked again until answered (seen lost once)
            await nc.publish(subjects.roll_call(SITE), b"")
            await asyncio.sleep(0.1)
            return not beats.empty()

        await eventually_async(roll_call, bool, within_s=10, what="a heartbeat answering the roll call")
        got = WorkerHeartbeat.model_validate_json(beats.get_nowait().data)
        assert (got.worker_id, got.site, [m.name for m in got.models]) == ("w1", SITE, ["m"])

        await nc.publish(subjects.cancel(SITE), Cancel(request_id="r9", reason="test").model_dump_json().encode())
        async def seen() -> list[str]:
            return cancelled

        assert await eventually_async(seen, bool, within_s=5, what="the cancel") == ["r9"]
    finally:
        await sub.unsubscribe()
        await broker.stop()
