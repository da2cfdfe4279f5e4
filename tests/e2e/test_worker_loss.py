"""Two workers on a site share the load; one killed under load costs only its own requests, whose callers
get a clean error within seconds, never a hang."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil
import pytest

from tests.conftest import batcher_service
from tests.support import NatsServer, Service, eventually, running, write_registry

pytestmark = pytest.mark.e2e
SITE = "twins"
LONG = {"model": "tiny", "messages": [{"role": "user", "content": "talk"}], "max_tokens": 15000, "stream": True}


@dataclass
class Twins:
    workers: dict[str, Service]
    gateway: Service

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def site(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Path]]:
    """A batcher, a router and a gateway of the site, and a registry batching one row at a time."""
    registry = write_registry(tmp_path_factory.mktemp("twins") / "models.yaml",
                              batching={"max_batch": 1, "max_wait_ms": 0})
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE}
    gateway = Service("gateway", env)
    with running(batcher_service(nats_server.url, SITE), Service("router", env), gateway):
        yield gateway, registry


@pytest.fixture
def twins(nats_server: NatsServer, site: tuple[Service, Path]) -> Iterator[Twins]:
    """Two fresh workers, li-w1 and li-w2 (started together)."""
    gateway, registry = site
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE, "LW_MODELS_FILE": str(registry)}
    workers = {name: Service("local_inference", {**env, "LW_INSTANCE": name}) for name in ("w1", "w2")}
    try:
        for w in workers.values():
            w.start()
        for w in workers.values():
            w.wait_ready()
        yield Twins(workers, gateway)
    finally:
        for w in workers.values():
            w.stop()


def start_stream(client: openai.OpenAI) -> tuple[str, openai.Stream[object], Iterator[object]]:
    """A long streamed answer, its worker (from x-leafwire-served-by), its first chunks read."""
    raw = client.chat.completions.with_raw_response.create(**LONG)  # type: ignore[call-overload]
    stream = raw.parse()
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    return raw.headers["x-leafwire-served-by"].rsplit("-", 1)[1], stream, chunks


def test_killed_worker_costs_only_its_own_requests(twins: Twins) -> None:
    """Two long answers go to the two workers; SIGKILL one: its caller gets an error within seconds, the
    other answer goes on, and the next request is served by the survivor."""
    client = twins.client()
    first, _, first_chunks = start_stream(client)
    second, second_stream, second_chunks = start_stream(client)
    assert {first, second} == {"w1", "w2"}  # the load is shared
    killed = time.monotonic()
    twins.workers[first].kill()  # the worker and its decoder process, at once
    with pytest.raises(openai.APIError) as exc:
        for _ in first_chunks:
            pass
    assert time.monotonic() - killed < 5
    assert f"li-{first}" in exc.value.message
    for _ in range(50):
        next(second_chunks)  # the other answer is untouched
    second_stream.close()
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                           max_tokens=3)
    assert raw.headers["x-leafwire-served-by"] == f"{SITE}/li-{second}"
    assert raw.parse().usage.completion_tokens == 3  # type: ignore[union-attr]


def test_killed_decoder_is_an_error_and_comes_back(twins: Twins) -> None:
    """If only the decoder process dies, its caller gets a 502 at once and the worker restarts it."""
    client = twins.client()
    who, _, chunks = start_stream(client)
    worker = psutil.Process(twins.workers[who].proc.pid)  # type: ignore[union-attr]
    (decoder,) = decoders(worker)
    decoder.kill()
    with pytest.raises(openai.APIError, match="decoder"):
        for _ in chunks:
            pass

    def served() -> bool:
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2)
        return reply.usage is not None and reply.usage.completion_tokens == 2

    eventually(served, 30, "answers again")
    eventually(lambda: [p.pid for p in decoders(worker)] not in ([], [decoder.pid]), 30, "a new decoder process")


def decoders(worker: psutil.Process) -> list[psutil.Process]:
    """The worker's live decoder processes (not multiprocessing's resource tracker)."""
    found = []
    for child in worker.children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                found.append(child)
    return found


def test_a_model_whose_workers_are_all_gone_is_503_until_one_is_back(twins: Twins) -> None:
    """Every worker of a model gone (a restart): once the router has forgotten them (/v1/models no longer
    lists it) the model is a 503 with Retry-After, which clients retry, never a 404 saying it does not
    exist; a worker back serves it again."""
    client = twins.client()
    for worker in twins.workers.values():
        worker.kill()
    eventually(lambda: "tiny" not in {m.id for m in client.models.list()}, 30, "the router forgets the workers")
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert exc.value.status_code == 503, exc.value.message
    assert exc.value.response.headers.get("retry-after")
    twins.workers["w1"].start().wait_ready()

    def served() -> bool:
        with contextlib.suppress(openai.APIStatusError):
            return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2).usage is not None
        return False

    eventually(served, 30, "served again")
