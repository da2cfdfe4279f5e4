"""Usage events into the site's ``USAGE`` stream: one per answered request, local or cloud.

Publishing never blocks an answer: events are published asynchronously, their acks awaited in the
background, and at most ``max_pending`` may await an ack — past that (JetStream down or slow) events are
dropped and counted (``leafwire_usage_events_dropped_total``) rather than held without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from schemas.cloud import UsageEvent
from shared import metrics, subjects
from shared.logging import get_logger
from shared.streams import ensure_stream

log = get_logger("leafwire.usage")
MONTH_S = 31 * 24 * 3600
ACK_TIMEOUT_S = 10.0


def usage_stream(site: str, replicas: int = 1) -> StreamConfig:
    """The ``USAGE`` stream of a site: three months of usage events and budget alerts, at most 1 GiB."""
    return StreamConfig(name=subjects.USAGE, subjects=[subjects.usage_filter(site)], retention=RetentionPolicy.LIMITS,
                        storage=StorageType.FILE, max_age=3 * MONTH_S, max_bytes=1024**3,
                        discard=DiscardPolicy.OLD, num_replicas=replicas)


class UsagePublisher:
    """Publishes to a site's ``USAGE`` stream without ever waiting on JetStream in the answer path."""

    def __init__(self, nc: NATS, site: str, max_pending: int = 10_000) -> None:
        self._site = site
        self._max_pending = max_pending
        self._js = nc.jetstream(timeout=5, publish_async_max_pending=max_pending)
        self._nc = nc

    async def ensure_stream(self, replicas: int = 1) -> None:
        """Create the stream, or add this site's subjects to it (idempotent)."""
        await ensure_stream(self._nc, usage_stream(self._site, replicas))

    async def usage(self, event: UsageEvent) -> None:
        """Record one answered request."""
        await self.publish(subjects.usage(self._site), event.model_dump_json().encode())

    async def publish(self, subject: str, data: bytes) -> None:
        """Publish to the stream; the ack is awaited in the background."""
        if self._js.publish_async_pending() >= self._max_pending:
            metrics.USAGE_EVENTS_DROPPED.inc()
            log.warning("usage event dropped: too many awaiting their ack")
            return
        try:
            # A free slot was just checked: no stall wait (a timed wait costs a task per event).
            ack = await self._js.publish_async(subject, data)
        except Exception as exc:
            metrics.USAGE_EVENTS_DROPPED.inc()
            log.warning("usage event dropped", error=repr(exc))
            return
        handle = asyncio.get_running_loop().call_later(ACK_TIMEOUT_S, ack.cancel)
        ack.add_done_callback(lambda f: self._acked(f, handle))

    @staticmethod
    def _acked(future: asyncio.Future[Any], handle: asyncio.TimerHandle) -> None:
        handle.cancel()
        if future.cancelled() or future.exception() is not None:
            metrics.USAGE_EVENTS_DROPPED.inc()

    async def flush(self, wait_s: float = 5.0) -> None:
        """Wait (up to ``wait_s``) for the acks still pending, at shutdown."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(wait_s):
                await self._js.publish_async_completed()
