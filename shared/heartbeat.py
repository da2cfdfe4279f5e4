"""Announcing a worker (local-inference, cloud-adapter) on its site's heartbeat subject."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from nats.aio.client import Client as NATS

from schemas.control import WorkerHeartbeat
from shared import subjects


async def announce(nc: NATS, site: str, beat: WorkerHeartbeat) -> None:
    """Publish one heartbeat: routers and batchers learn who serves what, and how busy it is."""
    await nc.publish(subjects.heartbeat(site), beat.model_dump_json().encode())


async def announce_every(nc: NATS, site: str, beat: Callable[[], WorkerHeartbeat], interval_s: float) -> None:
    """Announce every ``interval_s`` seconds until cancelled (a failed publish waits for the next beat)."""
    while True:
        with contextlib.suppress(Exception):
            await announce(nc, site, beat())
        await asyncio.sleep(interval_s)
