"""The router's catalog of workers."""

from __future__ import annotations

from schemas.control import ModelInfo, WorkerHeartbeat
from services.router.catalog import Catalog


def beat(worker: str, site: str, *models: str, sent_at: float = 1000.0) -> WorkerHeartbeat:
    return WorkerHeartbeat(worker_id=worker, service="local-inference", site=site, sent_at=sent_at,
                           interval_s=2.0, models=[ModelInfo(name=m, context_length=2048) for m in models])


class TestCatalog:
    def test_lists_each_model_once_with_its_locations(self) -> None:
        """A model served on the site and on the hub appears once, with both locations."""
        c = Catalog("edge1")
        for b in (beat("a", "edge1", "m1"), beat("b", "edge1", "m1"), beat("c", "hub", "m1", "m2")):
            c.seen(b)
        cards = {card.id: card for card in c.model_cards(now=1001)}
        assert sorted(cards) == ["m1", "m2"]
        assert [(loc.site, loc.workers) for loc in cards["m1"].locations] == [("edge1", 2), ("hub", 1)]

    def test_other_edge_sites_are_ignored(self) -> None:
        """Workers of another edge site do not serve this one."""
        c = Catalog("edge1")
        c.seen(beat("x", "edge2", "m9"))
        assert c.model_cards(now=1001) == []

    def test_silent_workers_are_forgotten(self) -> None:
        """A worker that missed three heartbeats is dropped."""
        c = Catalog("edge1")
        c.seen(beat("a", "edge1", "m1"))
        assert [card.id for card in c.model_cards(now=1005)] == ["m1"]
        assert c.model_cards(now=1007) == []

    def test_a_forgotten_worker_leaves_its_models_known(self) -> None:
        """A silent worker is dropped, but the chat models it served stay known (its restart is not a 404);
        another edge site's models never become known."""
        c = Catalog("edge1")
        c.seen(beat("a", "edge1", "m1"))
        c.seen(beat("x", "edge2", "m9"))
        assert c.model_cards(now=1007) == []
        assert c.served_before == frozenset({"m1"})


class TestKinds:
    def test_what_a_model_is_for(self) -> None:
        """A local model is what its worker says; a cloud model what its adapter is configured for, its key set
        or not; a model nobody has is unknown."""
        c = Catalog("edge1")
        c.seen(WorkerHeartbeat(worker_id="w", service="local-inference", site="edge1",
                               models=[ModelInfo(name="embed", kind="embeddings")]))
        c.seen(WorkerHeartbeat(worker_id="ca", service="cloud-adapter", site="hub", models=[],
                               cloud_models=["openai/gpt-4o"], cloud_embeddings=["openai/small"]))
        assert [c.kind_of(m) for m in ("embed", "openai/gpt-4o", "openai/small", "nope")] == \
               ["embeddings", "chat", "embeddings", None]
