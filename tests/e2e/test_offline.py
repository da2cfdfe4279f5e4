"""An edge site losing its uplink keeps answering with its own model, and says why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import NatsServer, Service, eventually, running, start_hub_and_edge, write_policy, write_registry

pytestmark = pytest.mark.e2e
CLOUD = "openai/gpt-4o-mini"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[list[NatsServer], NatsServer, Path]]:
    hub, edge = start_hub_and_edge(tmp_path, "mine3")
    try:
        yield hub, edge, tmp_path
    finally:
        for server in [edge, *hub]:
            server.stop()


def skipped(gateway: Service) -> list[str]:
    r = httpx.post(f"{gateway.base}/v1/route/dry-run", timeout=10,
                   json={"model": CLOUD, "messages": [{"role": "user", "content": "hi"}]})
    return [s["reason"] for s in r.json()["skipped"]]


def test_uplink_down_runs_locally(site: tuple[list[NatsServer], NatsServer, Path]) -> None:
    """With the hub reachable a cloud model is tried; once the hub is gone it is skipped for the local one."""
    hub, edge, tmp = site
    env = {"LW_NATS_URL": edge.url, "LW_SITE": "mine3"}
    registry = write_registry(tmp / "models.yaml")
    policy = write_policy(tmp / "policy.yaml", "local_model: tiny\n")
    router = Service("router", {**env, "LW_ROUTER_POLICY_FILE": str(policy), "LW_ROUTER_UPLINK_PROBE_S": "0.3"})
    with running(Service("local_inference", {**env, "LW_MODELS_FILE": str(registry)}), router,
                 Service("gateway", env)) as (_, _, gateway):
        assert skipped(gateway) == []
        hub[0].stop()
        eventually(lambda: skipped(gateway) == ["uplink down"], 20, "the router to notice the uplink is down")
        r = httpx.post(f"{gateway.base}/v1/chat/completions", timeout=30,
                       json={"model": CLOUD, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200
        assert "skipped openai/gpt-4o-mini (uplink down)" in r.headers["x-leafwire-route"]
        assert r.headers["x-leafwire-served-by"].startswith("mine3/")
