"""The batcher's scheduling, on a fake transport: batches, idle workers, deadlines, cancels, lost workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from schemas.chat import ChatCompletionRequest
from schemas.control import BatchingOptions, ModelInfo, ModelKind, WorkerHeartbeat
from services.batcher.pool import WorkerPool, WorkerRef
from services.batcher.queue import Row
from services.batcher.scheduler import Batcher, Declined, Offer, Taken
from services.batcher.settings import BatcherSettings
from shared import metrics
from shared.envelope import Envelope
from shared.errors import LeafwireError, NotBatched, Overloaded, TooLarge
from shared.replies import Presence

A, B = WorkerRef("a", "edge1"), WorkerRef("b", "edge1")


@dataclass
class FakeTransport:
    """Records what the scheduler sends; workers take batches unless told otherwise."""

    offers: list[tuple[WorkerRef, list[str]]] = field(default_factory=list)
    errors: dict[str, LeafwireError] = field(default_factory=dict)
    decline: dict[WorkerRef, str] = field(default_factory=dict)
    answering: dict[WorkerRef, set[str] | type[TimeoutError] | None] = field(default_factory=dict)
    cancels: list[str] = field(default_factory=list)
    pings: list[str] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)  # callers that no longer wait
    max_payload: int = 1 << 20
    broken: list[Exception] = field(default_factory=list)  # what the next offers raise

    async def offer(self, worker: WorkerRef, kind: ModelKind, model: str, rows: list[Row]) -> Offer:
        ids = [r.request_id for r in rows]
        self.offers.append((worker, ids))
        if self.broken:
            raise self.broken.pop(0)
        if worker in self.decline:
            return Declined(self.decline.pop(worker))
        self.answering.setdefault(worker, set()).update(ids)  # type: ignore[union-attr]
        return Taken(frozenset(ids))

    async def status(self, worker: WorkerRef) -> set[str] | None:
        state = self.answering.get(worker, set())
        if state is TimeoutError:
            raise TimeoutError
        return state  # type: ignore[return-value]

    async def error(self, row: Row, err: LeafwireError) -> None:
        self.errors[row.request_id] = err

    async def cancel(self, request_id: str) -> None:
        self.cancels.append(request_id)

    async def ping(self, row: Row) -> Presence:
        self.pings.append(row.request_id)
        return Presence.GONE if row.request_id in self.gone else Presence.THERE


def beat(worker: str, *, idle: bool = True, leaving: bool = False, inflight: int = 0,
         options: BatchingOptions | None = None) -> WorkerHeartbeat:
    batching = options or BatchingOptions(max_batch=3, max_wait_ms=5000, max_queue=4)
    return WorkerHeartbeat(worker_id=worker, service="local-inference", site="edge1", leaving=leaving,
                           inflight=inflight,
                           models=[ModelInfo(name="m", context_length=64, idle=idle, batching=batching)])


def request(rid: str, deadline_in: float = 60.0) -> tuple[ChatCompletionRequest, Envelope]:
    env = Envelope(request_id=rid, tenant="t", reply=f"_INBOX.{rid}", deadline=time.time() + deadline_in)
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": rid}]), env  # type: ignore[list-item]


async def until(check: Callable[[], object], within_s: float = 5.0) -> None:
    """Poll ``check`` on the event loop until it holds."""
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.fixture
async def batcher() -> AsyncIterator[tuple[Batcher, FakeTransport]]:
    settings = BatcherSettings(watch_interval_s=0.02, sweep_interval_s=0.02, idle_poll_s=0.05,
                               worker_timeout_s=0.3, keepalive_s=0.2, gone_after_s=0.15)
    transport = FakeTransport()
    b = Batcher(settings, WorkerPool("edge1"), transport)
    b.start()
    try:
        yield b, transport
    finally:
        await b.stop()


def admit(b: Batcher, *ids: str, deadline_in: float = 60.0) -> None:
    for rid in ids:
        req, env = request(rid, deadline_in)
        b.admit("chat", req, env)


class TestBatches:
    async def test_a_full_batch_goes_at_once_to_an_idle_worker(self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """max_batch requests form one batch without waiting out the window."""
        b, t = batcher
        b.heartbeat(beat("a"))
        admit(b, "r1", "r2")
        await asyncio.sleep(0.05)  # well inside the 5 s window: nothing may go yet
        assert t.offers == []
        admit(b, "r3")
        await until(lambda: t.offers)
        assert t.offers == [(A, ["r1", "r2", "r3"])]

    async def test_a_partial_batch_goes_when_the_window_ends(self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """A lone request goes once it has waited max_wait_ms."""
        b, t = batcher
        b.heartbeat(beat("a", options=BatchingOptions(max_batch=8, max_wait_ms=30, max_queue=8)))
        admit(b, "r1")
        await until(lambda: t.offers)
        assert t.offers == [(A, ["r1"])]

    async def test_requests_gather_while_the_worker_is_busy(self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """Requests arriving during a running batch go together when the worker says it is idle."""
        b, t = batcher
        b.heartbeat(beat("a", idle=False, options=BatchingOptions(max_batch=8, max_wait_ms=0, max_queue=8)))
        admit(b, "r1", "r2", "r3")
        await asyncio.sleep(0.05)
        assert t.offers == []
        b.heartbeat(beat("a", idle=True, options=BatchingOptions(max_batch=8, max_wait_ms=0, max_queue=8)))
        await until(lambda: t.offers)
        assert t.offers == [(A, ["r1", "r2", "r3"])]

    async def test_a_busy_worker_declines_and_another_takes_the_batch(
            self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """A worker that turns out busy declines; the same batch, in order, goes to the next idle one."""
        b, t = batcher
        b.heartbeat(beat("a"))
        b.heartbeat(beat("b"))
        first = b.pool.pick("m", "chat")
        assert first is not None
        t.decline[first] = "busy"
        admit(b, "r1", "r2", "r3")
        await until(lambda: len(t.offers) == 2)
        other = B if first == A else A
        assert t.offers == [(first, ["r1", "r2", "r3"]), (other, ["r1", "r2", "r3"])]

    async def test_full_queue_is_a_429(self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """With max_queue requests waiting, the next is refused with a Retry-After."""
        b, _ = batcher
        b.heartbeat(beat("a", idle=False))
        admit(b, "r1", "r2", "r3", "r4")
        with pytest.raises(Overloaded) as exc:
            admit(b, "r5")
        assert exc.value.retry_after is not None
        assert exc.value.retry_after >= 1

    async def test_no_worker_sends_the_router_direct(self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """A model no known worker serves is refused with not_batched (the router then goes direct)."""
        b, _ = batcher
        with pytest.raises(NotBatched):
            admit(b, "r1")


class TestSizes:
    async def test_a_batch_is_cut_to_fit_one_nats_message(self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """Three big requests waiting for a batch of three go one by one when two would not fit in one
        message (the server closes a connection that sends more than its max_payload)."""
        b, t = batcher
        t.max_payload = 12_000  # a batch may carry 12,000 - 4,096 bytes; each row here is 3,000 + 1,024
        b.heartbeat(beat("a"))
        for rid in ("r1", "r2", "r3"):  # all queued before the dispatcher runs: a full batch of three
            req, env = request(rid)
            b.admit("chat", req, env, nbytes=3_000)
        await until(lambda: t.offers)
        assert t.offers[0] == (A, ["r1"])
        assert t.errors == {}

    async def test_a_request_no_batch_could_carry_is_413_at_once(self, batcher: tuple[Batcher, FakeTransport]) -> None:
        b, t = batcher
        b.heartbeat(beat("a"))
        req, env = request("big")
        with pytest.raises(TooLarge) as refused:
            b.admit("chat", req, env, nbytes=t.max_payload)
        assert refused.value.status == 413
        assert "max_payload" in refused.value.message

    async def test_dispatching_outlives_a_batch_that_fails_to_go(self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """Whatever breaks while a batch is handed over, its callers get an error and the model's queue goes on
        (it stopped for good, every later request of the model waiting out its deadline)."""
        b, t = batcher
        t.broken.append(RuntimeError("boom"))
        b.heartbeat(beat("a", options=BatchingOptions(max_batch=1, max_wait_ms=0, max_queue=8)))
        admit(b, "r1")
        await until(lambda: "r1" in t.errors)
        assert t.errors["r1"].status == 500
        assert "batcher" in t.errors["r1"].message
        b.heartbeat(beat("b", options=BatchingOptions(max_batch=1, max_wait_ms=0, max_queue=8)))
        admit(b, "r2")
        await until(lambda: any(ids == ["r2"] for _, ids in t.offers))
        assert "r2" not in t.errors


class TestEndings:
    async def test_expired_requests_are_dropped_with_a_timeout(self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """A request whose deadline passes while waiting gets a 504 and is never offered."""
        b, t = batcher
        b.heartbeat(beat("a", idle=False))
        admit(b, "late", deadline_in=0.05)
        await until(lambda: "late" in t.errors)
        assert t.errors["late"].status == 504
        b.heartbeat(beat("a", idle=True))
        admit(b, "r1", "r2", "r3")
        await until(lambda: t.offers)
        assert t.offers == [(A, ["r1", "r2", "r3"])]

    async def test_cancelled_requests_leave_the_queue(self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """A cancel drops a waiting request (its caller hears 499); the others still go."""
        b, t = batcher
        b.heartbeat(beat("a", idle=False))
        admit(b, "r1", "r2")
        assert b.cancel("r1")
        assert not b.cancel("unknown")
        await until(lambda: "r1" in t.errors)
        assert t.errors["r1"].status == 499
        b.heartbeat(beat("a", options=BatchingOptions(max_batch=3, max_wait_ms=0, max_queue=4)))
        await until(lambda: t.offers)
        assert t.offers == [(A, ["r2"])]

    async def test_a_cancel_naming_another_model_leaves_the_request(
            self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """A router that gave up on model ``x`` for this request id (its cancel names ``x``) and fell back to
        ``m`` here, under the same id: the request for ``m`` stays queued; a cancel naming ``m`` drops it."""
        b, t = batcher
        b.heartbeat(beat("a", idle=False))
        admit(b, "r1")
        assert not b.cancel("r1", "x")
        assert b.cancel("r1", "m")
        await until(lambda: "r1" in t.errors)
        assert t.errors["r1"].status == 499

    async def test_waiting_callers_are_kept_and_gone_ones_dropped(
            self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """Every keepalive_s each waiting caller hears its request is still queued; a caller that no longer
        waits (its gateway died) loses its row silently, and the others still go."""
        b, t = batcher
        b.heartbeat(beat("a", idle=False))
        admit(b, "r1", "r2")
        assert metrics.QUEUE_CAPACITY.labels("m")._value.get() == 4  # the bound the worker announced
        await asyncio.sleep(0.1)
        assert t.pings == []  # not before keepalive_s
        await until(lambda: {"r1", "r2"} <= set(t.pings))
        pinged = len(t.pings)
        await until(lambda: len(t.pings) >= pinged + 2)  # and again, for as long as they wait
        t.gone.add("r1")
        await until(lambda: len(b.queues[("chat", "m")]) == 1)
        assert "r1" not in t.errors  # nobody to tell
        b.heartbeat(beat("a", options=BatchingOptions(max_batch=3, max_wait_ms=0, max_queue=4)))
        await until(lambda: t.offers)
        assert t.offers == [(A, ["r2"])]

    async def test_a_dead_worker_costs_only_its_unfinished_rows(
            self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """When a worker vanishes, callers of its unfinished rows get a 502 at once; finished ones nothing."""
        b, t = batcher
        b.heartbeat(beat("a"))
        admit(b, "r1", "r2", "r3")
        await until(lambda: t.offers)
        t.answering[A] = {"r2", "r3"}  # r1 is answered
        await until(lambda: "r1" not in b.out.get(A, {}))
        t.answering[A] = None  # gone: no responders on its status subject
        await until(lambda: len(t.errors) == 2)
        assert sorted(t.errors) == ["r2", "r3"]
        assert {e.status for e in t.errors.values()} == {502}
        assert not b.pool.serves("m", "chat")

    async def test_a_worker_missing_for_a_moment_keeps_its_rows(
            self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """No responders for less than gone_after_s (the worker, or the batcher, reconnecting to NATS) is not
        a dead worker: its callers hear nothing and their answers go on."""
        b, t = batcher
        b.heartbeat(beat("a"))
        admit(b, "r1", "r2", "r3")
        await until(lambda: t.offers)
        t.answering[A] = None
        await asyncio.sleep(0.06)  # three status rounds without a listener
        t.answering[A] = {"r1", "r2", "r3"}
        await asyncio.sleep(0.3)
        assert t.errors == {}
        assert b.pool.serves("m", "chat")

    async def test_a_silent_worker_counts_as_lost(self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """A worker that stops answering status for worker_timeout_s loses its rows the same way."""
        b, t = batcher
        b.heartbeat(beat("a"))
        admit(b, "r1", "r2", "r3")
        await until(lambda: t.offers)
        t.answering[A] = TimeoutError
        await until(lambda: len(t.errors) == 3)
        assert "did not answer" in t.errors["r1"].message

    async def test_a_worker_leaving_after_its_answers_loses_nothing(
            self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """A worker that says it is leaving with nothing in flight answered everything: no errors."""
        b, t = batcher
        b.heartbeat(beat("a"))
        admit(b, "r1", "r2", "r3")
        await until(lambda: t.offers)
        b.heartbeat(beat("a", leaving=True, inflight=0))
        t.answering[A] = None
        await asyncio.sleep(0.1)  # several watch rounds
        assert t.errors == {}

    async def test_queued_requests_fail_when_the_last_worker_goes(
            self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """Requests waiting for a model whose last worker left get a 503 instead of waiting out their deadline."""
        b, t = batcher
        b.heartbeat(beat("a", idle=False))
        admit(b, "r1")
        b.heartbeat(beat("a", leaving=True))
        await until(lambda: "r1" in t.errors)
        assert t.errors["r1"].status == 503

    async def test_stopping_answers_waiting_requests(self, batcher: tuple[Batcher, FakeTransport]) -> None:
        """A batcher shutting down tells every waiting caller to retry (503)."""
        b, t = batcher
        b.heartbeat(beat("a", idle=False))
        admit(b, "r1", "r2")
        await b.stop()
        assert {rid: e.status for rid, e in t.errors.items()} == {"r1": 503, "r2": 503}
        with pytest.raises(NotBatched):
            admit(b, "r3")
