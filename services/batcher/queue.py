"""A model's bounded queue of requests waiting for a worker, and how batches are cut from it.

Pure data structure: no NATS, no clock of its own (callers pass ``now``). A batch closes when it is full
(``max_batch`` rows, or inputs for embeddings) or when its oldest request has waited ``max_wait_ms``;
the scheduler also waits for an idle worker, during which requests keep joining.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from schemas.chat import ChatCompletionRequest
from schemas.control import BatchingOptions, ModelKind
from schemas.embeddings import EmbeddingRequest
from shared.envelope import Envelope
from shared.errors import InvalidRequest, Overloaded

ROW_ROOM = 1024  # bytes a row's envelope and JSON framing add to its request in a batch message (~300 used)


@dataclass
class Row:
    """One request waiting in the batcher."""

    env: Envelope
    request: ChatCompletionRequest | EmbeddingRequest
    size: int  # 1 for chat; the number of inputs for embeddings
    arrived: float  # monotonic seconds
    nbytes: int = ROW_ROOM  # what it adds to a batch message: its request's bytes and its envelope
    pinged: float = field(init=False)  # when its caller was last asked whether it still waits (monotonic)
    unheard_since: float | None = None  # since when nobody listens on its reply subject

    def __post_init__(self) -> None:
        self.pinged = self.arrived

    @property
    def request_id(self) -> str:
        """The caller's request id."""
        return self.env.request_id


class ModelQueue:
    """The waiting requests of one model, oldest first, at most ``max_queue`` of them."""

    def __init__(self, model: str, kind: ModelKind, options: BatchingOptions) -> None:
        self.model = model
        self.kind = kind
        self.options = options
        self._rows: deque[Row] = deque()

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self._rows)

    def push(self, row: Row, retry_after: float) -> None:
        """Queue ``row``; 429 when the queue is full."""
        if len(self._rows) >= self.options.max_queue:
            raise Overloaded(f"the queue of model '{self.model}' is full ({self.options.max_queue} requests "
                             "waiting); try again later", retry_after=retry_after)
        if any(r.request_id == row.request_id for r in self._rows):
            raise InvalidRequest(f"request id {row.request_id} is already waiting")
        self._rows.append(row)

    def full(self) -> bool:
        """True when the waiting requests fill a batch."""
        return sum(r.size for r in self._rows) >= self.options.max_batch

    def wait_left(self, now: float) -> float:
        """Seconds until the oldest request has waited the window (0 or less: the batch may go)."""
        if not self._rows:
            return math.inf
        return self.options.max_wait_ms / 1000 - (now - self._rows[0].arrived)

    def take(self, max_bytes: int | None = None) -> list[Row]:
        """The next batch: oldest first, up to ``max_batch`` and, as one message, ``max_bytes`` (a request
        bigger than either goes alone)."""
        batch: list[Row] = []
        budget, room = self.options.max_batch, math.inf if max_bytes is None else max_bytes
        while self._rows and (not batch or (self._rows[0].size <= budget and self._rows[0].nbytes <= room)):
            row = self._rows.popleft()
            batch.append(row)
            budget -= row.size
            room -= row.nbytes
        return batch

    def put_back(self, rows: list[Row]) -> None:
        """Return a batch no worker took to the head of the queue, in its order."""
        self._rows.extendleft(reversed(rows))

    def remove(self, request_id: str) -> Row | None:
        """Take one request out (it was cancelled)."""
        for row in self._rows:
            if row.request_id == request_id:
                self._rows.remove(row)
                return row
        return None

    def expired(self, wall_now: float) -> list[Row]:
        """Take out every request whose deadline has passed."""
        gone = [r for r in self._rows if r.env.deadline <= wall_now]
        for row in gone:
            self._rows.remove(row)
        return gone

    def drain(self) -> list[Row]:
        """Take out everything."""
        rows = list(self._rows)
        self._rows.clear()
        return rows


def retry_after(waiting: int, max_batch: int, batch_seconds: float, workers: int) -> float:
    """Seconds until a full queue has room again: the batches ahead times how long one takes."""
    batches = math.ceil((waiting + 1) / max(max_batch, 1)) / max(workers, 1)
    return float(min(60, max(1, math.ceil(batches * batch_seconds))))
