"""The batcher's scheduling: per-model queues, batches handed to idle workers, rows watched until answered.

One dispatcher task per model loops: wait for a request; wait for an idle worker (the site's first, the
hub's when the site has none); wait out the batching window (unless the batch is already full); offer
the batch. A worker that is busy after all declines, and the batch waits for the next idle one.

Rows handed to a worker are watched: every ``watch_interval_s`` the batcher asks each worker holding rows
which it is still answering. No responders for ``gone_after_s`` (2 s; a killed process loses its NATS
subscriptions at once, one reconnecting to NATS is missing for a moment) means the worker is gone, so its
unfinished rows' callers get an error within seconds instead of waiting out the idle timeout. A worker
that stops answering for ``worker_timeout_s`` counts as gone too.

NATS stays behind ``Transport``, so this module is tested with a fake one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.chat import ChatCompletionRequest
from schemas.control import BatchingOptions, ModelKind, WorkerHeartbeat
from schemas.embeddings import EmbeddingRequest
from services.batcher.pool import WorkerPool, WorkerRef
from services.batcher.queue import ROW_ROOM, ModelQueue, Row, retry_after
from services.batcher.settings import BatcherSettings
from shared import metrics
from shared.envelope import Envelope
from shared.errors import (
    Cancelled,
    DeadlineExceeded,
    LeafwireError,
    NotBatched,
    TooLarge,
    Unavailable,
    UpstreamError,
)
from shared.logging import get_logger
from shared.nats_headers import HEADERS_ROOM
from shared.replies import Presence, keep_callers
from shared.tasks import every, stop_tasks

SERVICE = "batcher"
log = get_logger("leafwire.batcher")
Key = tuple[ModelKind, str]


@dataclass(frozen=True, slots=True)
class Taken:
    """The worker took the batch; these rows are its to answer (it answered the others' errors).
    ``batches`` is the worker's count of the model's batches, this one included."""

    request_ids: frozenset[str]
    batches: int = 0


@dataclass(frozen=True, slots=True)
class Declined:
    """The worker did not take the batch: ``busy`` (try later) or ``gone`` (stopping or not there)."""

    reason: str
    batches: int = 0


@dataclass(frozen=True, slots=True)
class Failed:
    """Handing over failed in a way the callers must hear about."""

    error: LeafwireError


Offer = Taken | Declined | Failed


class Transport(Protocol):
    """What the scheduler needs from NATS."""

    @property
    def max_payload(self) -> int:
        """The most bytes one message (a batch) may carry, headers included."""
        ...

    async def offer(self, worker: WorkerRef, kind: ModelKind, model: str, rows: list[Row]) -> Offer:
        """Hand a batch to one worker."""
        ...

    async def status(self, worker: WorkerRef) -> set[str] | None:
        """The request ids the worker still answers; None when it is gone; TimeoutError when silent."""
        ...

    async def error(self, row: Row, err: LeafwireError) -> None:
        """Send ``err`` to the row's caller."""
        ...

    async def cancel(self, request_id: str) -> None:
        """Ask every worker of the site to stop a request."""
        ...

    async def ping(self, row: Row) -> Presence:
        """Tell the row's caller it still waits here, and learn whether the caller still waits."""
        ...


@dataclass
class Out:
    """A row a worker is answering."""

    row: Row
    model: str
    handed: float


@dataclass
class Batcher:
    """Queues, dispatchers, and the rows out at workers."""

    settings: BatcherSettings
    pool: WorkerPool
    transport: Transport
    batcher_id: str = field(default_factory=lambda: f"bt-{uuid.uuid4().hex[:8]}")
    queues: dict[Key, ModelQueue] = field(default_factory=dict)
    wake: dict[Key, asyncio.Event] = field(default_factory=dict)
    out: dict[WorkerRef, dict[str, Out]] = field(default_factory=dict)
    heard: dict[WorkerRef, float] = field(default_factory=dict)
    missing: dict[WorkerRef, float] = field(default_factory=dict)  # since when nobody listens on its status
    offering: dict[str, Row] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    batch_seconds: dict[str, float] = field(default_factory=dict)
    tasks: dict[Key | str, asyncio.Task[None]] = field(default_factory=dict)
    pending: set[asyncio.Task[None]] = field(default_factory=set)
    stopping: bool = False

    # -- admission, cancellation, heartbeats (called by the NATS handlers) ------------------------

    def admit(self, kind: ModelKind, request: ChatCompletionRequest | EmbeddingRequest, env: Envelope,
              size: int = 1, nbytes: int = 0) -> None:
        """Queue a request (``nbytes``: its body's size); raise what its sender should hear (full queue, no
        worker, deadline passed, too big to hand on)."""
        if nbytes + ROW_ROOM > self.batch_bytes():
            raise TooLarge(nbytes + ROW_ROOM, self.transport.max_payload)
        if env.expired():
            raise DeadlineExceeded("the request's deadline passed before it reached the batcher")
        model = request.model
        if self.stopping:
            raise NotBatched("the batcher is shutting down")
        if not self.pool.serves(model, kind):
            raise NotBatched(f"this batcher knows no worker of {kind} model '{model}'")
        queue = self.queue(kind, model)
        row = Row(env, request, size, time.monotonic(), nbytes + ROW_ROOM)
        queue.push(row, self.retry_after(queue))  # 429s: counted by ErrorReplies
        metrics.QUEUE_DEPTH.labels(model).set(len(queue))
        self.wake[(kind, model)].set()

    def queue(self, kind: ModelKind, model: str) -> ModelQueue:
        """The model's queue (made, with its dispatcher, on first use), with the options workers announce."""
        key = (kind, model)
        options = self.pool.options(model, kind) or self.default_options(kind)
        if key not in self.queues:
            self.queues[key] = ModelQueue(model, kind, options)
            self.wake[key] = asyncio.Event()
            self.tasks[key] = asyncio.create_task(self.dispatch(key), name=f"dispatch-{kind}-{model}")
        self.queues[key].options = options
        metrics.QUEUE_CAPACITY.labels(model).set(options.max_queue)
        return self.queues[key]

    def batch_bytes(self) -> int:
        """The most a batch's rows may add up to: one NATS message, less room for its headers."""
        return self.transport.max_payload - HEADERS_ROOM

    def default_options(self, kind: ModelKind) -> BatchingOptions:
        """Options for a model whose workers announce none."""
        s = self.settings
        if kind == "embeddings":
            return BatchingOptions(max_batch=s.embeddings_max_batch, max_wait_ms=s.embeddings_max_wait_ms,
                                   max_queue=s.max_queue)
        return BatchingOptions(max_batch=s.max_batch, max_wait_ms=s.max_wait_ms, max_queue=s.max_queue)

    def retry_after(self, queue: ModelQueue) -> float:
        """The Retry-After of a 429 for a full queue."""
        return retry_after(len(queue), queue.options.max_batch, self.batch_seconds.get(queue.model, 1.0),
                           self.pool.count(queue.model, queue.kind))

    def cancel(self, request_id: str, target: str | None = None) -> bool:
        """Stop a request (its answer by the model ``target``, when one is named: a router's fallback may be
        queued here under the same id): drop it if still waiting here; False when it is not here."""
        if request_id in self.offering:
            self.cancelled.add(request_id)
            return True
        for queue in self.queues.values():
            if target is not None and queue.model != target:
                continue
            row = queue.remove(request_id)
            if row is not None:
                metrics.QUEUE_DEPTH.labels(queue.model).set(len(queue))
                self.spawn_error(row, Cancelled("the request was cancelled while it waited for a worker"))
                return True
        return False

    def heartbeat(self, beat: WorkerHeartbeat) -> None:
        """A worker announced itself: take up the options it announces and wake the dispatchers of
        models it has idle. A worker leaving with nothing in flight has answered all its rows: stop
        watching them."""
        if beat.leaving and beat.inflight == 0:
            self.out.pop(WorkerRef(beat.worker_id, beat.site), None)
        woke = self.pool.seen(beat)
        for model in beat.models:
            key = (model.kind, model.name)
            if key in self.queues and model.batching is not None and not beat.leaving:
                self.queues[key].options = model.batching
                metrics.QUEUE_CAPACITY.labels(model.name).set(model.batching.max_queue)
            if ((woke and model.idle) or beat.leaving) and (event := self.wake.get(key)) is not None:
                event.set()

    # -- dispatch ---------------------------------------------------------------------------------

    async def dispatch(self, key: Key) -> None:
        """Cut batches from one model's queue and hand them to idle workers, forever."""
        queue, wake = self.queues[key], self.wake[key]
        while True:
            wake.clear()
            worker, wait = self.next_step(queue)
            if worker is not None and wait <= 0:
                rows = queue.take(self.batch_bytes())
                try:
                    await self.hand(queue, worker, rows)
                except Exception as exc:  # this model's dispatching must outlive any one batch
                    log.exception("handing a batch failed", model=queue.model, rows=len(rows))
                    for row in rows:
                        self.spawn_error(row, LeafwireError(f"internal error in the batcher: {type(exc).__name__}"))
            elif wait > 0:
                with contextlib.suppress(TimeoutError):  # not wait_for: 3.11's can swallow a cancel
                    async with asyncio.timeout(None if math.isinf(wait) else wait):
                        await wake.wait()

    def next_step(self, queue: ModelQueue) -> tuple[WorkerRef | None, float]:
        """The worker for the next batch and how long to wait before it may go (0: now, look again)."""
        if not len(queue):
            return None, math.inf
        worker = self.pool.pick(queue.model, queue.kind)
        if worker is None:
            if not self.pool.serves(queue.model, queue.kind):
                self.fail(queue, Unavailable(f"no worker serves model '{queue.model}' any more", retry_after=2))
                return None, 0.0
            return None, self.settings.idle_poll_s
        return worker, 0.0 if queue.full() else max(0.0, queue.wait_left(time.monotonic()))

    async def hand(self, queue: ModelQueue, worker: WorkerRef, rows: list[Row]) -> None:
        """Offer one batch to one worker and act on the answer."""
        for row in rows:
            self.offering[row.request_id] = row
        try:
            offer = await self.transport.offer(worker, queue.kind, queue.model, rows)
        finally:
            for row in rows:
                self.offering.pop(row.request_id, None)
        metrics.DISPATCHES.labels(queue.model, type(offer).__name__.lower()).inc()
        if isinstance(offer, Taken):
            self.taken(queue, worker, rows, offer)
        elif isinstance(offer, Declined):
            self.declined(queue, worker, rows, offer)
        else:
            for row in rows:
                self.spawn_error(row, offer.error)
        metrics.QUEUE_DEPTH.labels(queue.model).set(len(queue))

    def taken(self, queue: ModelQueue, worker: WorkerRef, rows: list[Row], offer: Taken) -> None:
        now = time.monotonic()
        ids = offer.request_ids
        self.pool.handed(worker, queue.model, offer.batches, now)
        mine = self.out.setdefault(worker, {})
        self.heard.setdefault(worker, now)
        for row in rows:
            metrics.QUEUE_WAIT.labels(queue.model).observe(now - row.arrived)
            if row.request_id in ids:
                mine[row.request_id] = Out(row, queue.model, now)
            if row.request_id in self.cancelled:  # cancelled while on its way: the worker may have missed it
                self.cancelled.discard(row.request_id)
                self.spawn(self.transport.cancel(row.request_id))

    def declined(self, queue: ModelQueue, worker: WorkerRef, rows: list[Row], offer: Declined) -> None:
        if offer.reason == "busy":
            self.pool.handed(worker, queue.model, offer.batches)
        else:
            self.pool.forget(worker)
        keep = [r for r in rows if r.request_id not in self.cancelled]
        for row in rows:
            if row.request_id in self.cancelled:
                self.cancelled.discard(row.request_id)
                self.spawn_error(row, Cancelled("the request was cancelled while it waited for a worker"))
        queue.put_back(keep)

    def fail(self, queue: ModelQueue, err: LeafwireError) -> None:
        """Answer every waiting request of a queue with ``err``."""
        for row in queue.drain():
            metrics.REJECTED.labels(SERVICE, err.code or type(err).__name__).inc()
            self.spawn_error(row, err)
        metrics.QUEUE_DEPTH.labels(queue.model).set(0)

    # -- deadlines, callers and watching ----------------------------------------------------------

    async def keep_callers(self) -> None:
        """Tell each waiting caller, every ``keepalive_s``, that its request is still queued (so its gateway
        can tell a long queue from a dead batcher); drop the rows of callers that no longer wait."""
        waiting = [row for queue in self.queues.values() for row in queue]
        await keep_callers(waiting, self.settings.keepalive_s, self.transport.ping, self.caller_gone)

    def caller_gone(self, row: Row) -> None:
        """Nobody waits for this row any more: take it out of its queue, unanswered."""
        for queue in self.queues.values():
            if queue.remove(row.request_id) is not None:
                metrics.QUEUE_DEPTH.labels(queue.model).set(len(queue))
                metrics.CALLERS_GONE.labels(SERVICE).inc()
                log.info("caller gone: request dropped from the queue", request_id=row.request_id)
                return

    async def sweep(self) -> None:
        """Drop waiting requests whose deadline passed; their callers get a timeout error at once."""
        while True:
            now = time.time()
            for queue in self.queues.values():
                for row in queue.expired(now):
                    metrics.REJECTED.labels(SERVICE, "deadline").inc()
                    self.spawn_error(row, DeadlineExceeded(
                        "the request's deadline passed while it waited for a worker; it was not run"))
                metrics.QUEUE_DEPTH.labels(queue.model).set(len(queue))
            await asyncio.sleep(self.settings.sweep_interval_s)

    async def watch(self) -> None:
        """Ask each worker holding rows what it is still answering; answer for the rows of dead ones."""
        while True:
            await asyncio.sleep(self.settings.watch_interval_s)
            workers = [w for w, rows in self.out.items() if rows]
            for w in [w for w, rows in self.out.items() if not rows]:
                self.out.pop(w, None)
                self.heard.pop(w, None)
                self.missing.pop(w, None)
            await asyncio.gather(*(self.check(w) for w in workers))

    async def check(self, worker: WorkerRef) -> None:
        """One status round with one worker."""
        asked = time.monotonic()
        try:
            still = await self.transport.status(worker)
        except TimeoutError:
            if asked - self.heard.get(worker, asked) > self.settings.worker_timeout_s:
                self.lost(worker, f"did not answer for {self.settings.worker_timeout_s:g} s")
            return
        if still is None:
            since = self.missing.setdefault(worker, asked)
            if asked - since >= self.settings.gone_after_s:
                self.lost(worker, "is gone")
            return
        self.missing.pop(worker, None)
        self.heard[worker] = time.monotonic()
        rows = self.out.get(worker, {})
        for request_id in [r for r, o in rows.items() if o.handed < asked and r not in still]:
            done = rows.pop(request_id)
            self.note_batch_time(done.model, asked - done.handed)

    def note_batch_time(self, model: str, seconds: float) -> None:
        """Keep a moving average of how long a request spends at a worker (for Retry-After)."""
        old = self.batch_seconds.get(model)
        self.batch_seconds[model] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def lost(self, worker: WorkerRef, why: str) -> None:
        """The worker died under its rows: each caller gets a 502 now, not a hang."""
        rows = self.out.pop(worker, {})
        self.heard.pop(worker, None)
        self.missing.pop(worker, None)
        self.pool.forget(worker)
        log.error("worker lost", worker_id=worker.worker_id, site=worker.site, why=why, rows=len(rows))
        for out in rows.values():
            metrics.ROWS_LOST.labels(out.model).inc()
            self.spawn_error(out.row, UpstreamError(
                f"the worker answering this request ({worker.site}/{worker.worker_id}) {why}; the answer is "
                "incomplete", retry_after=1))

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the deadline sweeper, the watcher and the callers' keepalive."""
        self.tasks["sweep"] = asyncio.create_task(self.sweep(), name="sweep")
        self.tasks["watch"] = asyncio.create_task(self.watch(), name="watch")
        self.tasks["keep"] = asyncio.create_task(every(self.settings.keepalive_s / 5, self.keep_callers),
                                                 name="keep-callers")

    async def stop(self) -> None:
        """Stop dispatching; waiting requests get a 503 so their callers can retry elsewhere."""
        self.stopping = True
        await stop_tasks(self.tasks.values())
        for queue in self.queues.values():
            self.fail(queue, Unavailable("the batcher is shutting down", retry_after=1))
        await asyncio.gather(*self.pending, return_exceptions=True)

    def spawn_error(self, row: Row, err: LeafwireError) -> None:
        """Send an error to a caller in the background."""
        self.spawn(self.transport.error(row, err))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a send in the background, kept until done."""
        task = asyncio.create_task(coro)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
