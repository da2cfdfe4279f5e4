"""Telling a slow answer from a dead one, both ways, on real processes.

Services holding a request (the batcher's queue, a worker's decoder) send its caller a progress event every
``LW_KEEPALIVE_S``: a gateway keeps waiting through a long queue, but answers 504 soon after the holder is
killed. The progress event asks whether the caller still waits: when the gateway is killed, the worker stops
decoding for nobody. A gateway told to stop ends the streams it still has with an error event and cancels
them at the site.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import batcher_service
from tests.support import LinkProxy, NatsServer, Service, eventually, metric, running, write_registry

pytestmark = pytest.mark.e2e
SITE = "alive"
KEEPALIVE = {"LW_KEEPALIVE_S": "0.5"}
LONG = {"model": "tiny", "messages": [{"role": "user", "content": "talk"}], "max_tokens": 15000, "stream": True}


@pytest.fixture(scope="module")
def site(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A router and one worker (instance ``w``) of the site, decoding one row at a time."""
    registry = write_registry(tmp_path_factory.mktemp("alive") / "models.yaml",
                              batching={"max_batch": 1, "max_wait_ms": 0})
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE, **KEEPALIVE}
    worker = Service("local_inference", {**env, "LW_MODELS_FILE": str(registry), "LW_INSTANCE": "w"})
    with running(worker, Service("router", env)):
        yield worker


def gateway(nats_server: NatsServer, **env: str) -> Service:
    return Service("gateway", {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE, **env})


def client_of(gw: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base}/v1", api_key="x", max_retries=0, timeout=60)


def start_long(client: openai.OpenAI) -> Iterator[object]:
    """A long streamed answer, its first chunks read: the worker is busy with it."""
    chunks = iter(client.chat.completions.create(**LONG))  # type: ignore[call-overload]
    for _ in range(3):
        next(chunks)
    return chunks


def decoding(worker: Service) -> float:
    return metric(worker.metrics(), "leafwire_active_rows", model="tiny")


def test_a_queued_request_is_kept_and_a_killed_batcher_is_noticed(nats_server: NatsServer, site: Service) -> None:
    """A request waits in the batcher's queue for twice the gateway's idle timeout and is still waited for;
    the batcher is killed: its caller gets a 504 within seconds, not at the request's deadline."""
    batcher = batcher_service(nats_server.url, SITE, **KEEPALIVE)
    gw = gateway(nats_server, LW_GATEWAY_IDLE_TIMEOUT_S="2")
    with running(batcher, gw), concurrent.futures.ThreadPoolExecutor(1) as pool:
        client = client_of(gw)
        long = start_long(client)
        queued = pool.submit(client.chat.completions.create, model="tiny",
                             messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        eventually(lambda: metric(batcher.metrics(), "leafwire_queue_depth_requests", model="tiny") == 1, 10,
                   "the second request queued behind the long one")
        time.sleep(4)
        assert not queued.done(), "a request waiting in a live batcher's queue must not time out"
        batcher.kill()
        killed = time.monotonic()
        with pytest.raises(openai.APIStatusError) as exc:
            queued.result(timeout=30)
        assert exc.value.status_code == 504
        assert "Nothing was heard of this request for 2 s" in exc.value.message
        assert time.monotonic() - killed < 10  # the gateway's idle timeout, not the 300 s deadline
        for _ in range(20):
            next(long)  # the answer the worker holds goes on: the worker keeps its caller too
        long.close()  # type: ignore[attr-defined]
    eventually(lambda: decoding(site) == 0, 20, "the worker idle again")


def test_a_killed_gateway_stops_the_answers_it_asked_for(nats_server: NatsServer, site: Service) -> None:
    """kill -9 of the gateway under a long answer: the worker learns within seconds that nobody waits for it
    (the progress event finds no listener) and stops decoding, instead of running to max_tokens."""
    gone_before = metric(site.metrics(), "leafwire_callers_gone_total", service="local-inference")
    gw = gateway(nats_server)
    with running(gw):
        start_long(client_of(gw))
        assert decoding(site) == 1
        gw.kill()
        eventually(lambda: decoding(site) == 0, 15, "the orphaned answer stopped")
    assert metric(site.metrics(), "leafwire_callers_gone_total", service="local-inference") == gone_before + 1


def test_a_stopping_gateway_ends_its_streams_with_an_error(nats_server: NatsServer, site: Service) -> None:
    """SIGTERM to a gateway under a long answer: after its grace the stream ends with an error event that
    says why (not a cut connection), the answer is cancelled at the worker, and the gateway exits."""
    gw = gateway(nats_server, LW_GATEWAY_SHUTDOWN_GRACE_S="1")
    with running(gw):
        long = start_long(client_of(gw))
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="The gateway is shutting down; send the request again"):
            for _ in long:
                pass
        assert gw.proc.wait(15) == 0
        eventually(lambda: decoding(site) == 0, 10, "the answer cancelled at the worker")
        assert "the gateway gave up on it: The gateway is shutting down" in gw.log()  # the reason of its cancel


def test_a_gateway_cut_off_for_a_moment_keeps_its_answer_and_sees_the_hole(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """The gateway's NATS connection is cut for 4 s under a streamed answer, while the worker's first
    keepalive (5 s) finds nobody on the caller's subject: the worker must keep the answer, the caller is only
    reconnecting. What the worker published meanwhile is lost (core NATS keeps nothing for an absent
    subscriber): the stream must not go on as if nothing happened and end with [DONE]; it ends with a 502
    answer_incomplete error event."""
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": "hole"}
    registry = write_registry(tmp_path / "models.yaml")
    worker = Service("local_inference", {**env, "LW_MODELS_FILE": str(registry)})
    link = LinkProxy(nats_server.node.client_port)
    gw = Service("gateway", {**env, "LW_NATS_URL": f"nats://127.0.0.1:{link.port}"})
    try:
        with running(worker, Service("router", env), gw):
            long = start_long(client_of(gw))
            reading = time.monotonic()
            while time.monotonic() - reading < 3:
                next(long)
            link.cut()
            time.sleep(4)
            assert decoding(worker) == 1  # still answering: its keepalive found nobody, once, and kept it
            link.restore()
            with pytest.raises(openai.APIError, match="Part of the answer was lost on the way") as exc:
                for _ in long:
                    pass
            assert exc.value.code == "answer_incomplete"
            assert metric(worker.metrics(), "leafwire_callers_gone_total", service="local-inference") == 0
            eventually(lambda: decoding(worker) == 0, 20, "the answer cancelled at the worker")
    finally:
        link.cut()


def test_requests_after_a_stop_are_refused_not_hung(nats_server: NatsServer, site: Service) -> None:
    """While a stopping gateway waits for its last answer, a request on a kept-alive connection is refused
    with a 503 and Retry-After at once."""
    gw = gateway(nats_server, LW_GATEWAY_SHUTDOWN_GRACE_S="3")
    with running(gw):
        client = client_of(gw)
        long = start_long(client)
        client.models.list()  # a second connection, idle and kept alive from now on
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2)
        assert exc.value.status_code == 503
        assert exc.value.response.headers["retry-after"] == "1"
        assert time.monotonic() - started < 2
        with pytest.raises(openai.APIError):
            for _ in long:
                pass
