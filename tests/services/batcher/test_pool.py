"""The batcher's view of workers: local first, hub as fallback, idle ones take turns."""

from __future__ import annotations

from schemas.control import BatchingOptions, ModelInfo, WorkerHeartbeat
from services.batcher.pool import WorkerPool, WorkerRef


def beat(worker: str, site: str, *, idle: bool = True, model: str = "m", kind: str = "chat",
         all_sites: bool = False, leaving: bool = False, batching: BatchingOptions | None = None,
         batches: int = 0) -> WorkerHeartbeat:
    return WorkerHeartbeat(worker_id=worker, service="local-inference", site=site, interval_s=2.0,
                           serves_all_sites=all_sites, leaving=leaving,
                           models=[ModelInfo(name=model, context_length=64, kind=kind, idle=idle,  # type: ignore[arg-type]
                                             batching=batching, batches=batches)])


class TestWorkerPool:
    def test_site_workers_first_then_hub(self) -> None:
        """While the site has a worker of the model, batches wait for it; the hub only stands in."""
        pool = WorkerPool("edge1")
        pool.seen(beat("hub-1", "hub", all_sites=True), now=0)
        pool.seen(beat("edge-1", "edge1", idle=False), now=0)
        assert pool.pick("m", "chat", now=1) is None
        pool.forget(WorkerRef("edge-1", "edge1"))
        assert pool.pick("m", "chat", now=1) == WorkerRef("hub-1", "hub")

    def test_other_sites_and_hub_workers_for_the_hub_only_are_ignored(self) -> None:
        """Workers of another edge site, and hub workers that do not back up sites, are not ours."""
        pool = WorkerPool("edge1")
        assert not pool.seen(beat("x", "edge2"), now=0)
        pool.seen(beat("h", "hub", all_sites=False), now=0)
        assert not pool.serves("m", "chat", now=0)

    def test_idle_workers_take_turns(self) -> None:
        """The worker that got a batch longest ago goes first; one handed a batch is busy until it says idle."""
        pool = WorkerPool("edge1")
        a, b = WorkerRef("a", "edge1"), WorkerRef("b", "edge1")
        pool.seen(beat("a", "edge1"), now=0)
        pool.seen(beat("b", "edge1"), now=0)
        pool.handed(a, "m", 1, now=1)
        assert pool.pick("m", "chat", now=1) == b
        pool.handed(b, "m", 1, now=2)
        assert pool.pick("m", "chat", now=2) is None
        assert pool.seen(beat("a", "edge1", batches=1), now=3)  # a says idle: a wake-up for the dispatcher
        assert pool.pick("m", "chat", now=3) == a

    def test_a_heartbeat_older_than_the_batch_does_not_free_the_worker(self) -> None:
        """An "idle" sent before the worker took its latest batch is not believed; one sent after it is."""
        pool = WorkerPool("edge1")
        a = WorkerRef("a", "edge1")
        pool.seen(beat("a", "edge1", batches=4), now=0)
        pool.handed(a, "m", 5, now=1)
        assert not pool.seen(beat("a", "edge1", batches=4), now=1)  # crossed the batch on the way
        assert pool.pick("m", "chat", now=1) is None
        assert pool.seen(beat("a", "edge1", batches=5), now=2)
        assert pool.pick("m", "chat", now=2) == a

    def test_a_restarted_worker_is_believed(self) -> None:
        """A worker whose batch count went back (it restarted under the same id) is idle when it says so."""
        pool = WorkerPool("edge1")
        a = WorkerRef("a", "edge1")
        pool.seen(beat("a", "edge1", batches=9), now=0)
        pool.handed(a, "m", 10, now=1)
        assert pool.seen(beat("a", "edge1", batches=0), now=2)
        assert pool.pick("m", "chat", now=2) == a

    def test_a_worker_busy_without_a_batch_count_waits_for_a_newer_heartbeat(self) -> None:
        """Handing a batch to a worker that does not count batches needs a heartbeat newer than the last."""
        pool = WorkerPool("edge1")
        a = WorkerRef("a", "edge1")
        pool.seen(beat("a", "edge1", batches=2), now=0)
        pool.handed(a, "m", 0, now=1)
        assert pool.pick("m", "chat", now=1) is None

    def test_kinds_are_apart(self) -> None:
        """A chat model is not offered embeddings work of the same name, and the reverse."""
        pool = WorkerPool("edge1")
        pool.seen(beat("e", "edge1", model="emb", kind="embeddings"), now=0)
        assert pool.serves("emb", "embeddings", now=0)
        assert not pool.serves("emb", "chat", now=0)

    def test_silent_and_leaving_workers_are_dropped(self) -> None:
        """A worker silent for three heartbeats, or one that says it is leaving, gets no more batches."""
        pool = WorkerPool("edge1")
        pool.seen(beat("a", "edge1"), now=0)
        assert pool.serves("m", "chat", now=5.9)
        assert not pool.serves("m", "chat", now=6.1)
        pool.seen(beat("b", "edge1"), now=10)
        pool.seen(beat("b", "edge1", leaving=True), now=11)
        assert not pool.serves("m", "chat", now=11)

    def test_batching_options_come_from_the_workers(self) -> None:
        """The options workers announce (from their model registry) are the model's."""
        pool = WorkerPool("edge1")
        options = BatchingOptions(max_batch=4, max_wait_ms=7, max_queue=9)
        pool.seen(beat("a", "edge1", batching=options))
        assert pool.options("m", "chat") == options
        assert pool.options("other", "chat") is None
