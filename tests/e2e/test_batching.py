"""Batching end to end: requests queued at the batcher are decoded together, and each caller still gets
exactly its own answer, with its own limits, cancellation, deadline and queue bound.

To form a batch deterministically, a long streamed request first holds the only worker; the requests
under test then wait in the batcher (its queue-depth metric says when all are there); closing the held
stream cancels it, the worker says it is idle, and the batcher hands it every waiting request at once.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import nats
import openai
import pytest

from tests.conftest import Stack, batcher_service, stack_services
from tests.support import NatsServer, Service, eventually, metric, running, write_registry

pytestmark = pytest.mark.e2e
MAX_QUEUE = 6


@pytest.fixture(scope="module")
def batched(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose model batches up to 8 rows, with room for 6 waiting requests."""
    registry = write_registry(tmp_path_factory.mktemp("batching") / "models.yaml",
                              batching={"max_batch": 8, "max_wait_ms": 20, "max_queue": MAX_QUEUE})
    worker, router, gateway = stack_services(nats_server.url, registry, site="batchsite")
    batcher = batcher_service(nats_server.url, "batchsite")
    with running(worker, batcher, router, gateway):
        yield Stack(nats_server, gateway, router, worker, "batchsite", batcher)


def waiting(stack: Stack) -> float:
    assert stack.batcher is not None
    return metric(stack.batcher.metrics(), "leafwire_queue_depth_requests", model="tiny")


def worker_metric(stack: Stack, name: str, **labels: str) -> float:
    return metric(stack.worker.metrics(), name, model="tiny", **labels)


@contextlib.contextmanager
def held_worker(stack: Stack) -> Iterator[None]:
    """Keep the only worker busy with a long streamed answer until the block ends (then cancel it)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hold"}], "max_tokens": 15000,
            "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection
        first = next(lines)  # the role chunk: decoding has started
        assert r.status_code == 200, first
        assert "assistant" in first, first
        yield


def gather_in_batch(stack: Stack, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` while the worker is held, release it once all wait in the batcher, return results."""
    pool = ThreadPoolExecutor(len(calls))
    try:
        with held_worker(stack):
            futures = [pool.submit(call) for call in calls]
            eventually(lambda: waiting(stack) == len(calls) or any(f.done() for f in futures), 15,
                       f"{len(calls)} requests waiting in the batcher")
            assert waiting(stack) == len(calls), [f.result() for f in futures if f.done()]
            before = (worker_metric(stack, "leafwire_batch_size_rows_count"),
                      worker_metric(stack, "leafwire_batch_size_rows_sum"))
        results = [f.result(timeout=30) for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    after = (worker_metric(stack, "leafwire_batch_size_rows_count"),
             worker_metric(stack, "leafwire_batch_size_rows_sum"))
    assert (after[0] - before[0], after[1] - before[1]) == (1, len(calls)), "not decoded as one batch"
    return results


@dataclass
class Answer:
    text: str
    finish_reason: str | None
    completion_tokens: int


def ask(stack: Stack, case: dict[str, Any]) -> Answer:
    """One request through the official client, streamed or not, as the case says."""
    client = stack.client(timeout=60)
    if case.get("stream"):
        chunks = list(client.chat.completions.create(model="tiny", stream_options={"include_usage": True},
                                                     **case))
        usage = chunks[-1].usage
        assert usage is not None
        return Answer("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                      next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices),
                      usage.completion_tokens)
    r = client.chat.completions.create(model="tiny", **case)
    assert r.usage is not None
    return Answer(r.choices[0].message.content or "", r.choices[0].finish_reason, r.usage.completion_tokens)


CASES: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12},
    {"messages": [{"role": "system", "content": "You answer plant operators, briefly and exactly."},
                  {"role": "user", "content": "Why did line 3 stop on the 3rd? The conveyor motor overheated "
                                              "twice and the hydraulic press lost pressure after lunch."}],
     "max_tokens": 30},
    {"messages": [{"role": "user", "content": "Check the hydraulic pressure"}], "max_tokens": 20, "stream": True},
    {"messages": [{"role": "user", "content": "Edge sites keep working"}], "max_tokens": 25},
    {"messages": [{"role": "user", "content": "Tell me about the pump schedule"}], "max_tokens": 16,
     "temperature": 1.0, "top_p": 0.9, "seed": 11},
]


class TestOneBatch:
    def test_each_caller_gets_exactly_its_answer_alone(self, batched: Stack) -> None:
        """Prompts of different lengths, limits, a stop sequence, streaming and a seeded sampler decoded in
        one batch give every caller the very answer it gets alone."""
        cases = [dict(c) for c in CASES]
        free = ask(batched, cases[3]).text
        cases[3]["stop"] = [free[8:11]]
        alone = [ask(batched, c) for c in cases]
        together = gather_in_batch(batched, [lambda c=c: ask(batched, c) for c in cases])
        assert together == alone
        assert [a.finish_reason for a in together] == ["length", "length", "length", "stop", "length"]
        assert [a.completion_tokens for a in together[:3]] == [12, 30, 20]
        assert together[3].text == free[: free.index(free[8:11])]

    def test_full_queue_is_429_with_retry_after(self, batched: Stack) -> None:
        """With the queue full, the next caller gets 429 and a Retry-After at once; the queued ones finish."""
        case = {"messages": [{"role": "user", "content": "queued"}], "max_tokens": 3}
        pool = ThreadPoolExecutor(MAX_QUEUE)
        try:
            with held_worker(batched):
                queued = [pool.submit(ask, batched, case) for _ in range(MAX_QUEUE)]
                eventually(lambda: waiting(batched) == MAX_QUEUE, 15, "a full queue")
                r = httpx.post(f"{batched.base_url}/chat/completions", timeout=10, json={"model": "tiny", **case})
                assert r.status_code == 429
                assert r.json()["error"]["code"] == "overloaded"
                assert int(r.headers["retry-after"]) >= 1
            assert [f.result(timeout=30).completion_tokens for f in queued] == [3] * MAX_QUEUE
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Reader:
    """A streamed request read on a thread until told to stop (then the connection closes)."""

    stack: Stack
    max_tokens: int
    chunks: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    future: Future[None] | None = None

    def run(self) -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "read me"}], "stream": True,
                "max_tokens": self.max_tokens}
        with httpx.stream("POST", f"{self.stack.base_url}/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    self.chunks.append(line)
                if self.stop.is_set():
                    return


class TestCancellation:
    def test_cancelling_one_row_leaves_its_batch_mates_alone(self, batched: Stack) -> None:
        """A caller leaving mid-batch stops its row only; when every row is gone, the batch stops."""
        short = {"messages": [{"role": "user", "content": "read me"}], "max_tokens": 40}
        alone = ask(batched, short)
        a, b = Reader(batched, 15000), Reader(batched, 15000)
        cancelled = worker_metric(batched, "leafwire_generations_total", finish_reason="cancelled")
        with ThreadPoolExecutor(3) as pool:
            with held_worker(batched):
                a.future, b.future = pool.submit(a.run), pool.submit(b.run)
                c = pool.submit(ask, batched, short)
                eventually(lambda: waiting(batched) == 3, 15, "three requests waiting")
            eventually(lambda: len(a.chunks) > 3 and len(b.chunks) > 3, 15, "both long rows streaming")
            a.stop.set()
            eventually(lambda: worker_metric(batched, "leafwire_generations_total", finish_reason="cancelled")
                       == cancelled + 2, 15, "the held row and row A cancelled")
            seen = len(b.chunks)
            eventually(lambda: len(b.chunks) > seen + 10, 15, "row B going on after A left")
            assert c.result(timeout=30) == alone
            assert worker_metric(batched, "leafwire_active_rows") == 1
            b.stop.set()
            eventually(lambda: worker_metric(batched, "leafwire_active_rows") == 0, 15, "the batch to stop")
        assert worker_metric(batched, "leafwire_generations_total", finish_reason="cancelled") == cancelled + 3
        assert ask(batched, {**short, "max_tokens": 2}).completion_tokens == 2

    def test_a_request_cancelled_while_waiting_is_never_run(self, batched: Stack) -> None:
        """A caller that leaves while its request waits in the batcher frees its place; it is never decoded."""
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "never"}],
                           "max_tokens": 5}).encode()
        host, port = "127.0.0.1", batched.gateway.port
        finished = sum(worker_metric(batched, "leafwire_generations_total", finish_reason=r)
                       for r in ("length", "stop"))
        with held_worker(batched):
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            eventually(lambda: waiting(batched) == 1, 15, "the request waiting")
            sock.close()
            eventually(lambda: waiting(batched) == 0, 15, "the cancelled request to leave the queue")
        assert ask(batched, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).completion_tokens == 2
        assert sum(worker_metric(batched, "leafwire_generations_total", finish_reason=r)
                   for r in ("length", "stop")) == finished + 1


class TestDeadlines:
    async def test_expired_request_is_dropped_before_decoding(self, batched: Stack) -> None:
        """A NATS request whose deadline passes while it waits gets a 504 error event and is not run."""
        nc = await nats.connect(batched.nats.url)
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.flush()
            with held_worker(batched):
                await nc.publish(f"lw.v1.{batched.site}.chat", json.dumps(
                    {"model": "tiny", "messages": [{"role": "user", "content": "late"}], "max_tokens": 3}).encode(),
                    reply=inbox, headers={"Lw-Deadline": f"{time.time() + 0.5:.3f}", "Lw-Request-Id": "late-1"})
                msg = await sub.next_msg(timeout=10)
        finally:
            await nc.drain()
        assert msg.headers is not None
        assert (msg.headers["Lw-Event"], msg.headers["Lw-Status"]) == ("error", "504")
        assert "was not run" in json.loads(msg.data)["error"]["message"]

    def test_request_timeout_through_the_gateway_is_504(self, batched: Stack) -> None:
        """Through HTTP, a request still waiting when the gateway's deadline passes is a 504 timeout."""
        gateway = Service("gateway", {"LW_NATS_URL": batched.nats.url, "LW_SITE": batched.site,
                                      "LW_GATEWAY_REQUEST_TIMEOUT_S": "1"})
        with running(gateway), held_worker(batched):
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as exc:
                openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="x", max_retries=0).chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "late"}], max_tokens=3)
            assert exc.value.status_code == 504
            assert time.monotonic() - started < 5
