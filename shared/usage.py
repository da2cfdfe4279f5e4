"""Usage events into the site's ``USAGE`` stream: one per answered request, local or cloud.

Publishing never blocks an answer: events are gathered for a moment and published together, their acks
awaited in the background, and at most ``max_pending`` may be gathered or await an ack — past that
(JetStream down or slow) events are dropped and counted (``leafwire_usage_events_dropped_total``) rather
than held without bound.

A gathered batch is one JetStream atomic batch (nats-server 2.12+, ``allow_atomic`` on the stream): still
one message per event, but acknowledged once for the batch instead of once per event — one PubAck to parse
instead of fifty at 1,000 requests/s. A batch the server does not commit is published again event by event,
so a refused batch loses nothing the old way would have kept; a stream that does not allow atomic batches
(made elsewhere), or a server that does not know them (before 2.12), gets every event that way.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, PubAck, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NoStreamResponseError

from schemas.cloud import UsageEvent
from shared import metrics, subjects
from shared.logging import get_logger
from shared.streams import ensure_stream

log = get_logger("leafwire.usage")
MONTH_S = 31 * 24 * 3600
ACK_TIMEOUT_S = 10.0
BATCH_INTERVAL_S = 0.05
ATOMIC_MAX = 1000  # nats-server's limit of messages in one atomic batch
RESTORE_S = 5.0  # at most this often a missing stream is created again
ATOMIC_DISABLED = 10174  # JetStream's error code: atomic publish is disabled on this stream


class NotBatching(Exception):
    """The server stored the batch's first message as a plain publish: it does not know atomic batches
    (nats-server before 2.12)."""


class BatchRefused(Exception):
    """The server did not take an atomic batch; ``code`` is JetStream's error code (0 when none was given)."""

    def __init__(self, description: str, code: int = 0) -> None:
        super().__init__(description)
        self.code = code


def _refusal(data: bytes) -> BatchRefused | None:
    """The error in a batch reply (a zero-byte reply or a PubAck without ``error`` is none)."""
    if not data or b'"error"' not in data:
        return None
    error = json.loads(data).get("error") or {}
    return BatchRefused(str(error.get("description", "refused")), int(error.get("err_code", 0)))


def usage_stream(site: str, replicas: int = 1) -> StreamConfig:
    """The ``USAGE`` stream of a site: three months of usage events and budget alerts, at most 1 GiB."""
    return StreamConfig(name=subjects.USAGE, subjects=[subjects.usage_filter(site)], retention=RetentionPolicy.LIMITS,
                        storage=StorageType.FILE, max_age=3 * MONTH_S, max_bytes=1024**3,
                        discard=DiscardPolicy.OLD, num_replicas=replicas, allow_atomic=True)


class UsagePublisher:
    """Publishes to a site's ``USAGE`` stream without ever waiting on JetStream in the answer path.

    Events are gathered for ``interval_s`` and published together: their acks then come back in one burst,
    instead of waking the service once for every answered request (a quarter of a cloud-adapter's CPU at
    hundreds of requests a second). An event reaches the stream at most ``interval_s`` late.
    """

    def __init__(self, nc: NATS, site: str, max_pending: int = 10_000, interval_s: float = BATCH_INTERVAL_S) -> None:
        self._site = site
        self._max_pending = max_pending
        self._interval_s = interval_s
        self._js = nc.jetstream(timeout=5, publish_async_max_pending=max_pending)
        self._nc = nc
        self._batch: list[tuple[str, bytes]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.atomic = True  # until the stream says it does not allow atomic batches
        self._replicas: int | None = None  # set by ensure_stream: only a publisher that made the stream restores it
        self._restored_at = -RESTORE_S
        self._in_batches = 0  # events of atomic batches not yet committed (or handed to publish_async)

    async def ensure_stream(self, replicas: int = 1) -> None:
        """Create the stream, or add this site's subjects to it (idempotent)."""
        self._replicas = replicas
        await ensure_stream(self._nc, usage_stream(self._site, replicas))

    async def _restore_stream(self) -> bool:
        """No stream took the events (deleted underneath, or a server that lost its storage): create it again,
        at most once every ``RESTORE_S``. True when it was created."""
        now = time.monotonic()
        if self._replicas is None or now - self._restored_at < RESTORE_S:
            return False
        self._restored_at = now
        try:
            await self.ensure_stream(self._replicas)
        except Exception as exc:  # JetStream down as well: the next failure tries again
            log.warning("USAGE stream missing and not created again", error=repr(exc))
            return False
        log.warning("USAGE stream was missing; created it again", site=self._site)
        return True

    async def usage(self, event: UsageEvent) -> None:
        """Record one answered request."""
        await self.publish(subjects.usage(self._site), event.model_dump_json().encode())

    async def publish(self, subject: str, data: bytes) -> None:
        """Queue for the stream; published with the others of the batch within ``interval_s``."""
        if len(self._batch) + self._in_batches + self._js.publish_async_pending() >= self._max_pending:
            metrics.USAGE_EVENTS_DROPPED.inc()
            log.warning("usage event dropped: too many awaiting their ack")
            return
        self._batch.append((subject, data))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval_s, self._send_batch)

    def _send_batch(self) -> None:
        self._timer = None
        batch, self._batch = self._batch, []
        if batch:
            task = asyncio.create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[str, bytes]]) -> None:
        if self.atomic and len(batch) > 1:
            self._in_batches += len(batch)  # counted against max_pending until committed or handed on
            try:
                while batch:
                    await self._send_atomic(batch[:ATOMIC_MAX])
                    self._in_batches -= len(batch[:ATOMIC_MAX])
                    batch = batch[ATOMIC_MAX:]
                return
            except NotBatching:
                self.atomic = False
                self._in_batches -= 1
                batch = batch[1:]  # the first is stored; the rest go one by one, now and from now on
                log.warning("the USAGE stream's server does not know atomic batches; events go one by one")
            except BatchRefused as exc:  # the rest of ``batch`` (from the refused part on) goes one by one
                if exc.code == ATOMIC_DISABLED:
                    self.atomic = False
                log.warning("usage batch not committed; publishing its events one by one", error=str(exc),
                            events=len(batch), atomic_disabled=not self.atomic)
            except Exception as exc:  # a timeout, a lost connection: the server abandons the batch whole
                log.warning("usage batch not committed; publishing its events one by one", error=repr(exc),
                            events=len(batch))
            finally:
                self._in_batches -= len(batch)
        await self._send_each(batch)

    async def _send_atomic(self, batch: list[tuple[str, bytes]]) -> None:
        """Publish ``batch`` as one atomic batch; raise unless the server committed all of it."""
        batch_id = os.urandom(12).hex()
        last = len(batch)
        for seq, (subject, data) in enumerate(batch, start=1):
            headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(seq)}
            if seq == last:
                headers["Nats-Batch-Commit"] = "1"
            if seq in (1, last):  # the first is confirmed (or refused) at once; the last carries the PubAck
                reply = await self._nc.request(subject, data, timeout=ACK_TIMEOUT_S, headers=headers)
                if (refused := _refusal(reply.data)) is not None:
                    raise refused
                if seq == 1 and last > 1 and reply.data:  # a PubAck, not the empty reply of a batch start
                    raise NotBatching
            else:
                await self._nc.publish(subject, data, headers=headers)
        count = json.loads(reply.data).get("count")
        if count != last:
            raise BatchRefused(f"the server committed {count} of {last} events")

    async def _send_each(self, batch: list[tuple[str, bytes]], again: bool = True) -> None:
        """Publish each event with its own ack (a batch of one, or one the server did not commit). Events no
        stream took are published once more after the stream is created again (``again``)."""
        acks: list[tuple[asyncio.Future[PubAck], tuple[str, bytes]]] = []
        dropped = 0
        for event in batch:
            try:
                # Free slots were checked when queued: no stall wait (a timed wait costs a task per event).
                acks.append((await self._js.publish_async(*event), event))
            except Exception as exc:
                dropped += 1
                log.warning("usage event dropped", error=repr(exc))
        unstored: list[tuple[str, bytes]] = []
        no_stream = True
        if acks:
            done, late = await asyncio.wait([ack for ack, _ in acks], timeout=ACK_TIMEOUT_S)
            for ack in late:
                ack.cancel()
            dropped += len(late)
            for ack, event in acks:
                if ack in done and (ack.cancelled() or ack.exception() is not None):
                    unstored.append(event)
                    no_stream = no_stream and not ack.cancelled() and isinstance(ack.exception(), NoStreamResponseError)
        if unstored and again and no_stream and await self._restore_stream():
            await self._send_each(unstored, again=False)
        else:
            dropped += len(unstored)
        if dropped:
            metrics.USAGE_EVENTS_DROPPED.inc(dropped)

    async def flush(self, wait_s: float = 5.0) -> None:
        """Publish what is gathered and wait (up to ``wait_s``) for the acks still pending, at shutdown."""
        if self._timer is not None:
            self._timer.cancel()
        self._send_batch()
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=wait_s)
