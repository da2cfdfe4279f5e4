"""The workers a batcher can hand batches to, from their heartbeats. No NATS in here.

A worker's heartbeat may be older than the batch just handed to it (both travel at once). Each model's
entry carries the count of batches the worker has taken; after handing it batch number ``n`` the batcher
trusts an "idle" only from a heartbeat that has counted at least ``n`` batches.

Local first: while the site has a live worker of a model, batches of that model wait for one of the
site's workers; only when the site has none do they go to hub workers (which back up every site).
Among idle workers, the one that got a batch longest ago goes first, so several workers share the load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from schemas.control import BatchingOptions, ModelInfo, ModelKind, WorkerHeartbeat
from shared import subjects

MISSED_BEATS = 3  # a worker silent for this many intervals is gone


@dataclass(frozen=True, slots=True)
class WorkerRef:
    """Where to reach one worker."""

    worker_id: str
    site: str


@dataclass
class Known:
    """What the batcher knows of one worker."""

    beat: WorkerHeartbeat
    heard: float
    busy: dict[str, int] = field(default_factory=dict)  # model -> batch count an "idle" must have reached
    last_batch: float = 0.0

    def model(self, name: str, kind: ModelKind) -> ModelInfo | None:
        """The worker's entry for a model of that kind, if it serves it."""
        return next((m for m in self.beat.models if m.name == name and m.kind == kind), None)

    def idle(self, name: str, kind: ModelKind) -> bool:
        """True when the worker said the model is idle after the last batch handed to it."""
        info = self.model(name, kind)
        return info is not None and info.idle and info.batches >= self.busy.get(name, 0)


class WorkerPool:
    """Workers serving a site: its own, and the hub's."""

    def __init__(self, site: str) -> None:
        self.site = site
        self.workers: dict[WorkerRef, Known] = {}

    def seen(self, beat: WorkerHeartbeat, now: float | None = None) -> bool:
        """Record a heartbeat; True when it makes some model newly available (a wake-up for dispatchers)."""
        if not self._serves_us(beat):
            return False
        now = time.monotonic() if now is None else now
        ref = WorkerRef(beat.worker_id, beat.site)
        if beat.leaving:
            self.forget(ref)
            return False
        old = self.workers.get(ref)
        was = {(m.name, m.kind) for m in old.beat.models if old.idle(m.name, m.kind)} if old else set()
        restarted = old is not None and any(m.batches < self._counted(old, m.name) for m in beat.models)
        busy = dict(old.busy) if old and not restarted else {}  # a restarted worker counts from zero again
        known = Known(beat, now, busy=busy, last_batch=old.last_batch if old else 0.0)
        self.workers[ref] = known
        return any(known.idle(m.name, m.kind) and (m.name, m.kind) not in was for m in beat.models)

    def _serves_us(self, beat: WorkerHeartbeat) -> bool:
        if beat.site == self.site:
            return True
        return beat.site == subjects.HUB and beat.serves_all_sites

    def alive(self, now: float | None = None) -> list[tuple[WorkerRef, Known]]:
        """Workers heard from recently; forgets the others."""
        now = time.monotonic() if now is None else now
        for ref in [r for r, k in self.workers.items() if now - k.heard > MISSED_BEATS * k.beat.interval_s]:
            del self.workers[ref]
        return list(self.workers.items())

    def candidates(self, model: str, kind: ModelKind, now: float | None = None) -> list[tuple[WorkerRef, Known]]:
        """Live workers of the model: the site's own when it has any, else the hub's."""
        serving = [(r, k) for r, k in self.alive(now) if k.model(model, kind) is not None]
        local = [(r, k) for r, k in serving if r.site == self.site]
        return local or serving

    def serves(self, model: str, kind: ModelKind, now: float | None = None) -> bool:
        """True when some live worker serves the model."""
        return bool(self.candidates(model, kind, now))

    def pick(self, model: str, kind: ModelKind, now: float | None = None) -> WorkerRef | None:
        """An idle worker for the next batch of the model (the one idle longest), or None."""
        idle = [(k.last_batch, r) for r, k in self.candidates(model, kind, now) if k.idle(model, kind)]
        return min(idle, key=lambda pair: pair[0])[1] if idle else None

    def options(self, model: str, kind: ModelKind) -> BatchingOptions | None:
        """The batching options workers announce for the model."""
        for _, known in self.candidates(model, kind):
            info = known.model(model, kind)
            if info is not None and info.batching is not None:
                return info.batching
        return None

    def handed(self, ref: WorkerRef, model: str, batches: int, now: float | None = None) -> None:
        """The worker took (or is busy with) its ``batches``-th batch of the model: it is busy until a
        heartbeat that has counted that batch says idle."""
        known = self.workers.get(ref)
        if known is not None:
            needed = batches if batches > 0 else self._counted(known, model) + 1  # 0: a worker that does not count
            known.busy[model] = max(needed, known.busy.get(model, 0))
            known.last_batch = time.monotonic() if now is None else now

    @staticmethod
    def _counted(known: Known, model: str) -> int:
        return max((m.batches for m in known.beat.models if m.name == model), default=0)

    def forget(self, ref: WorkerRef) -> None:
        """The worker is gone (or shutting down) until it announces itself again."""
        self.workers.pop(ref, None)

    def count(self, model: str, kind: ModelKind) -> int:
        """How many workers a batch of the model may go to."""
        return len(self.candidates(model, kind))
