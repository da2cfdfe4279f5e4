"""The catalog of workers a router knows of, built from their heartbeats. No NATS in here."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

from schemas.control import ModelCard, ModelKind, ModelLocation, WorkerHeartbeat
from shared import subjects

MISSED_BEATS = 3  # a worker silent for this many intervals is gone


@dataclass
class Catalog:
    """Workers serving this site: its own, and the hub's (which back up every site)."""

    site: str
    workers: dict[str, WorkerHeartbeat] = field(default_factory=dict)
    served_before: frozenset[str] = frozenset()  # chat models any worker ever announced (a restart is not a 404)

    def seen(self, beat: WorkerHeartbeat) -> None:
        """Record a heartbeat; beats from other edge sites are ignored (their workers do not serve us)."""
        if beat.site in (self.site, subjects.HUB):
            self.workers[beat.worker_id] = beat
            chat = {m.name for m in beat.models if m.kind == "chat"}
            if not chat <= self.served_before:
                self.served_before |= chat

    def alive(self, now: float | None = None) -> list[WorkerHeartbeat]:
        """Workers heard from recently; forgets the others."""
        now = time.time() if now is None else now
        gone = [w for w, b in self.workers.items() if now - b.sent_at > MISSED_BEATS * b.interval_s]
        for worker_id in gone:
            del self.workers[worker_id]
        return list(self.workers.values())

    def kind_of(self, name: str) -> ModelKind | None:
        """What a model some live worker or cloud-adapter has is for (chat or embeddings); ``None`` if none has
        it. Asked only to explain a refusal."""
        for beat in self.alive():
            if name in (beat.cloud_embeddings or ()):
                return "embeddings"
            if name in (beat.cloud_models or ()):
                return "chat"
            kind = next((m.kind for m in beat.models if m.name == name), None)
            if kind is not None:
                return kind
        return None

    def model_cards(self, now: float | None = None) -> list[ModelCard]:
        """What ``GET /v1/models`` lists: each model once, with the sites (or hub) that run it."""
        workers: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        context: dict[str, int | None] = {}
        kinds: dict[str, Literal["chat", "embeddings"]] = {}
        created: dict[str, int] = defaultdict(int)
        for beat in self.alive(now):
            for m in beat.models:
                workers[m.name][beat.site] += 1
                context[m.name] = m.context_length
                kinds[m.name] = m.kind
                created[m.name] = max(created[m.name], m.created)  # the newest build any worker has
        return [
            ModelCard(id=name, context_length=context[name], kind=kinds[name], created=created[name],
                      locations=[ModelLocation(site=s, workers=n) for s, n in sorted(sites.items())])
            for name, sites in sorted(workers.items())
        ]
