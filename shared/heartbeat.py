"""Announcing a worker (local-inference, cloud-adapter) on its site's heartbeat subject, and the control
subjects every worker answers: cancels and roll calls."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from faststream.nats import NatsBroker
from nats.aio.client import Client as NATS

from schemas.control import Cancel, WorkerHeartbeat
from shared import subjects
from shared.logging import get_logger

log = get_logger("leafwire.heartbeat")


async def announce(nc: NATS, site: str, beat: WorkerHeartbeat) -> None:
    """Publish one heartbeat: routers and batchers learn who serves what, and how busy it is."""
    await nc.publish(subjects.heartbeat(site), beat.model_dump_json().encode())


async def announce_every(nc: NATS, site: str, beat: Callable[[], WorkerHeartbeat], interval_s: float) -> None:
    """Announce every ``interval_s`` seconds until cancelled (a failed publish waits for the next beat)."""
    while True:
        with contextlib.suppress(Exception):
            await announce(nc, site, beat())
        await asyncio.sleep(interval_s)


def subscribe_controls(broker: NatsBroker, sites: str, *, site: str, cancel: Callable[[Cancel], bool],
                       beat: Callable[[], WorkerHeartbeat], title: str, cancel_doc: str, roll_call_doc: str) -> None:
    """Declare a worker's cancel and roll-call handlers on ``broker``: ``cancel(message)`` stops a request
    (true if it was this worker's); a roll call is answered with a heartbeat at once. ``title`` prefixes
    the AsyncAPI titles (``<title>cancel``, ``<title>roll_call``)."""

    @broker.subscriber(subjects.cancel(sites), no_reply=True, title=f"{title}cancel", description=cancel_doc)
    async def on_cancel(body: Cancel) -> None:
        if cancel(body):
            log.info("cancelled", request_id=body.request_id, reason=body.reason)

    @broker.subscriber(subjects.roll_call(sites), no_reply=True, title=f"{title}roll_call",
                       description=roll_call_doc)
    async def on_roll_call() -> None:
        await announce(broker.connection, site, beat())
