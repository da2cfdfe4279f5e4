"""The workers a batcher can hand batches to, from their heartbeats. No NATS in here.

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
    busy: set[str] = field(default_factory=set)  # models handed a batch since the worker last said idle
    last_batch: float = 0.0

    def model(self, name: str, kind: ModelKind) -> ModelInfo | None:
        """The worker's entry for a model of that kind, if it serves it."""
        return next((m for m in self.beat.models if m.name == name and m.kind == kind), None)

    def idle(self, name: str, kind: ModelKind) -> bool:
        """True when the worker said the model is idle and nothing was handed to it since."""
        info = self.model(name, kind)
        return info is not None and info.idle and name not in self.busy


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
        known = Known(beat, now, last_batch=old.last_batch if old else 0.0)
        self.workers[ref] = known
        return any(m.idle and (m.name, m.kind) not in was for m in beat.models)

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

    def handed(self, ref: WorkerRef, model: str, now: float | None = None) -> None:
        """A batch of the model went to the worker: it is busy until it says otherwise."""
        known = self.workers.get(ref)
        if known is not None:
            known.busy.add(model)
            known.last_batch = time.monotonic() if now is None else now

    def forget(self, ref: WorkerRef) -> None:
        """The worker is gone (or shutting down) until it announces itself again."""
        self.workers.pop(ref, None)

    def count(self, model: str, kind: ModelKind) -> int:
        """How many workers a batch of the model may go to."""
        return len(self.candidates(model, kind))
