"""Hub and edge: work entering at the edge runs on the edge; with no edge worker, the hub takes it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support import (
    NatsServer,
    Service,
    eventually,
    metric,
    running,
    start_hub_and_edge,
    usage_events,
    write_registry,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[NatsServer], NatsServer, Path]]:
    tmp = tmp_path_factory.mktemp("topology")
    hub, edge = start_hub_and_edge(tmp, "plant7", hub_nodes=3)
    try:
        yield hub, edge, write_registry(tmp / "models.yaml")
    finally:
        for server in [edge, *hub]:
            server.stop()


def served_by(gateway: Service, answered: dict[str, str] | None = None) -> str:
    """The site that answered one request (noted in ``answered`` under its request id)."""
    client = openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert raw.parse().usage.completion_tokens == 3  # type: ignore[union-attr]
    site = raw.headers["x-leafwire-served-by"].split("/")[0]
    if answered is not None:
        answered[raw.headers["x-request-id"]] = site
    return site


def usage_at_hub(hub: NatsServer) -> dict[str, tuple[str, str]]:
    """Request id → (subject, site) of every usage event in the hub's USAGE stream."""
    return {event["request_id"]: (subject, event["site"]) for subject, event in asyncio.run(usage_events(hub.url))}


def test_edge_first_then_hub(topology: tuple[list[NatsServer], NatsServer, Path]) -> None:
    """The edge worker answers edge requests; once it stops, a hub worker answers across the leaf. The hub's
    USAGE stream ends up with every answer's event: its own, and the edge's copied from the edge's stream."""
    hub, edge, registry = topology
    edge_env = {"LW_NATS_URL": edge.url, "LW_SITE": "plant7"}
    edge_worker = Service("local_inference", {**edge_env, "LW_MODELS_FILE": str(registry)})
    hub_worker = Service("local_inference", {"LW_NATS_URL": hub[1].url, "LW_SITE": "hub",
                                             "LW_MODELS_FILE": str(registry)})
    with running(hub_worker, edge_worker, Service("router", edge_env)), \
            running(Service("gateway", edge_env)) as (gateway,):
        answered: dict[str, str] = {}
        assert [served_by(gateway, answered) for _ in range(5)] == ["plant7"] * 5
        models = openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="x").models.list()
        locations = models.data[0].model_extra["locations"]  # type: ignore[index]
        assert {loc["site"] for loc in locations} == {"plant7", "hub"}
        edge_worker.stop()
        assert [served_by(gateway, answered) for _ in range(5)] == ["hub"] * 5
        at_hub = eventually(lambda: found if answered.keys() <= (found := usage_at_hub(hub[0])).keys() else None,
                            20, "every answer's usage event at the hub")
        assert {rid: at_hub[rid] for rid in answered} == {
            rid: (f"lw.v1.{site}.usage.events", site) for rid, site in answered.items()}


def test_edge_first_then_hub_through_the_batcher(topology: tuple[list[NatsServer], NatsServer, Path]) -> None:
    """With the edge's batcher in the path the edge worker still answers first; once it is gone the
    batcher hands the work to a hub worker across the leaf connection."""
    hub, edge, registry = topology
    edge_env = {"LW_NATS_URL": edge.url, "LW_SITE": "plant7"}
    edge_worker = Service("local_inference", {**edge_env, "LW_MODELS_FILE": str(registry)})
    hub_worker = Service("local_inference", {"LW_NATS_URL": hub[0].url, "LW_SITE": "hub",
                                             "LW_MODELS_FILE": str(registry)})
    batcher = Service("batcher", edge_env)
    with running(hub_worker, edge_worker, batcher, Service("router", edge_env)), \
            running(Service("gateway", edge_env)) as (gateway,):
        assert [served_by(gateway) for _ in range(3)] == ["plant7"] * 3
        edge_worker.kill()
        assert [served_by(gateway) for _ in range(3)] == ["hub"] * 3
        eventually(lambda: metric(batcher.metrics(), "leafwire_batch_dispatches_total", model="tiny",
                                  outcome="taken") == 6, 10, "six batches taken by workers")
