"""Fixtures: real nats-server processes on free ports, and the walking skeleton's real services."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import openai
import pytest

from tests.support import (
    NatsServer,
    Service,
    connected,
    model_name,
    running,
    start_single,
    write_policy,
    write_registry,
)

# pytest-xdist's workers (gw0, gw1...) each pick ports in a slice of their own (deploy.topology.port_range): one
# worker's service starting on a port it picked could otherwise meet another's picked a moment before
if (worker := os.environ.get("PYTEST_XDIST_WORKER", "")).startswith("gw") and worker[2:].isdigit():
    os.environ["LW_PORT_SLICE"] = f"{worker[2:]}/{os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')}"


def serving_nats(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[NatsServer]:
    """A JetStream nats-server in a folder of its own, stopped when the fixture ends."""
    server = start_single(tmp_path_factory.mktemp(name))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One JetStream nats-server for the whole test module."""
    yield from serving_nats(tmp_path_factory, "nats")


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[nats.NATS]:
    """A nats-py client of the module's server, drained after the test."""
    async with connected(nats_server.url) as client:
        yield client


@dataclass
class Stack:
    """gateway + router + batcher + local-inference (tiny fixture models) on one NATS server."""

    nats: NatsServer
    gateway: Service
    router: Service
    worker: Service
    site: str
    batcher: Service | None = None

    @property
    def base_url(self) -> str:
        return f"{self.gateway.base}/v1"

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, **kwargs)  # type: ignore[arg-type]


def stack_services(nats_url: str, registry: Path, site: str = "edge1",
                   gateway_env: dict[str, str] | None = None,
                   router_env: dict[str, str] | None = None) -> tuple[Service, Service, Service]:
    env = {"LW_NATS_URL": nats_url, "LW_SITE": site}
    worker = Service("local_inference", {**env, "LW_MODELS_FILE": str(registry)})
    policy = write_policy(Path(tempfile.mkdtemp(prefix="lw-policy-")) / "policy.yaml",
                          f"local_model: {model_name(registry)}\n")
    router = Service("router", {**env, "LW_ROUTER_POLICY_FILE": str(policy), **(router_env or {})})
    gateway = Service("gateway", {**env, **(gateway_env or {})})
    return worker, router, gateway


def batcher_service(nats_url: str, site: str = "edge1", **env: str) -> Service:
    """A batcher of ``site`` (``env`` adds LW_BATCHER_* settings)."""
    return Service("batcher", {"LW_NATS_URL": nats_url, "LW_SITE": site, **env})


@pytest.fixture(scope="session")
def stack_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """The JetStream nats-server of ``stack`` (its own: a module's ``nats_server`` comes and goes with it)."""
    yield from serving_nats(tmp_path_factory, "stack-nats")


@pytest.fixture(scope="session")
def stack(stack_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole local path running as real processes: the target of the end-to-end tests. Started once and
    shared by every module that uses it (starting it is most of what those modules cost), so its tests stop
    nothing of it and compare metrics before and after rather than with zero."""
    registry = write_registry(tmp_path_factory.mktemp("registry") / "models.yaml", embedder="tiny-embed",
                              embedder_batching={"max_wait_ms": 50})  # wide enough to gather concurrent requests
    worker, router, gateway = stack_services(stack_nats.url, registry)
    batcher = batcher_service(stack_nats.url)
    with running(worker, batcher, router, gateway):
        yield Stack(stack_nats, gateway, router, worker, "edge1", batcher)
