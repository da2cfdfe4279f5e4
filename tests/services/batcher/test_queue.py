"""A model's queue in the batcher: bounded, oldest first, batches cut by size."""

from __future__ import annotations

import pytest

from schemas.chat import ChatCompletionRequest
from schemas.control import BatchingOptions
from services.batcher.queue import ModelQueue, Row, retry_after
from shared.envelope import Envelope
from shared.errors import InvalidRequest, Overloaded


def row(rid: str, size: int = 1, arrived: float = 0.0, deadline: float = 2e9) -> Row:
    env = Envelope(request_id=rid, tenant="t", reply=f"_INBOX.{rid}", deadline=deadline)
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])  # type: ignore[list-item]
    return Row(env, request, size, arrived)


def queue(max_batch: int = 3, max_wait_ms: float = 50, max_queue: int = 5) -> ModelQueue:
    return ModelQueue("m", "chat", BatchingOptions(max_batch=max_batch, max_wait_ms=max_wait_ms,
                                                   max_queue=max_queue))


class TestModelQueue:
    def test_full_queue_refuses_with_retry_after(self) -> None:
        """The request beyond max_queue is a 429 carrying the Retry-After it was given."""
        q = queue(max_queue=2)
        q.push(row("a"), 1)
        q.push(row("b"), 1)
        with pytest.raises(Overloaded) as exc:
            q.push(row("c"), 7)
        assert exc.value.retry_after == 7
        assert len(q) == 2

    def test_same_request_twice_is_refused(self) -> None:
        """A request id already waiting cannot be queued again."""
        q = queue()
        q.push(row("a"), 1)
        with pytest.raises(InvalidRequest):
            q.push(row("a"), 1)

    def test_batches_are_cut_oldest_first_up_to_max_batch(self) -> None:
        """take() returns at most max_batch requests, in arrival order; the rest stay queued."""
        q = queue(max_batch=3)
        for rid in "abcde":
            q.push(row(rid), 1)
        assert [r.request_id for r in q.take()] == ["a", "b", "c"]
        assert [r.request_id for r in q] == ["d", "e"]

    def test_embeddings_batches_count_inputs(self) -> None:
        """For embeddings the budget is inputs: a request too big for the rest waits for the next batch."""
        q = queue(max_batch=10)
        for rid, size in (("a", 4), ("b", 5), ("c", 3)):
            q.push(row(rid, size), 1)
        assert [r.request_id for r in q.take()] == ["a", "b"]
        assert [r.request_id for r in q.take()] == ["c"]

    def test_a_request_bigger_than_a_batch_goes_alone(self) -> None:
        """A request larger than max_batch still goes, by itself."""
        q = queue(max_batch=2)
        q.push(row("big", 9), 1)
        q.push(row("small"), 1)
        assert [r.request_id for r in q.take()] == ["big"]

    def test_window_counts_from_the_oldest_request(self) -> None:
        """The batch may go once the oldest request has waited max_wait_ms, or at once when full."""
        q = queue(max_batch=2, max_wait_ms=50)
        q.push(row("a", arrived=10.0), 1)
        assert q.wait_left(10.02) == pytest.approx(0.03)
        assert not q.full()
        q.push(row("b", arrived=10.01), 1)
        assert q.full()

    def test_put_back_restores_the_order(self) -> None:
        """A batch no worker took goes back to the head of the queue, in order."""
        q = queue(max_batch=2)
        for rid in "abc":
            q.push(row(rid), 1)
        q.put_back(q.take())
        assert [r.request_id for r in q] == ["a", "b", "c"]

    def test_expired_and_removed_requests_leave_the_queue(self) -> None:
        """Requests past their deadline, or cancelled, are taken out; the others stay."""
        q = queue()
        q.push(row("late", deadline=100.0), 1)
        q.push(row("fine", deadline=300.0), 1)
        q.push(row("cancelled"), 1)
        assert [r.request_id for r in q.expired(200.0)] == ["late"]
        assert q.remove("cancelled") is not None
        assert q.remove("nobody") is None
        assert [r.request_id for r in q] == ["fine"]


class TestRetryAfter:
    @pytest.mark.parametrize(("waiting", "max_batch", "seconds", "workers", "expected"), [
        (0, 8, 0.1, 1, 1),      # never below one second
        (16, 8, 2.0, 1, 6),     # three batches ahead of the next request, two seconds each
        (16, 8, 2.0, 2, 3),     # shared by two workers
        (1000, 1, 30.0, 1, 60),  # capped at a minute
    ])
    def test_estimate(self, waiting: int, max_batch: int, seconds: float, workers: int, expected: float) -> None:
        """Retry-After is the batches ahead times how long one takes, between 1 and 60 seconds."""
        assert retry_after(waiting, max_batch, seconds, workers) == expected
