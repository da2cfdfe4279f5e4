"""An embeddings batch on a real nats-server and the tiny BERT fixture: a caller that leaves (or cancels) while
its batch runs gets nothing sent after it; the batch still answers everyone else."""

from __future__ import annotations

import asyncio
import functools
import json
import time

import nats
from nats.aio.msg import Msg

from schemas.batch import EmbeddingsBatch, EmbeddingsRow
from schemas.embeddings import EmbeddingRequest
from services.local_inference.embedder import EmbedEngine
from services.local_inference.registry import ModelSpec
from services.local_inference.settings import InferenceSettings
from services.local_inference.worker import Worker
from shared.envelope import Envelope
from tests.support import FIXTURE_EMBEDDER


async def test_a_caller_that_left_gets_no_vectors_and_the_others_get_theirs(nc: nats.NATS) -> None:
    engine = EmbedEngine(ModelSpec(name="tiny-embed", kind="embeddings", path=FIXTURE_EMBEDDER, context_length=16))
    await engine.start()
    worker = Worker(settings=InferenceSettings(), engines={}, embedders={"tiny-embed": engine}, nc=nc)
    heard: dict[str, list[Msg]] = {"stays": [], "leaves": []}
    for rid, got in heard.items():
        await nc.subscribe(f"test.embed.{rid}", cb=functools.partial(_append, got))
    await nc.flush()
    rows = [EmbeddingsRow(envelope=Envelope(rid, "t", f"test.embed.{rid}", time.time() + 30).row(),
                          request=EmbeddingRequest(model="tiny-embed", input=["pump on line 3"] * 64))
            for rid in heard]
    try:
        answer = worker.take_embeddings(EmbeddingsBatch(model="tiny-embed", rows=rows), when_idle=False)
        assert answer.taken
        assert sorted(answer.request_ids) == ["leaves", "stays"]
        assert worker.cancel("leaves")  # before the batch's vectors exist: it is on the engine's thread
        await asyncio.wait_for(asyncio.gather(*worker.tasks), 30)
        await nc.flush()
        await asyncio.sleep(0.2)
        assert [m.headers.get("Lw-Event") if m.headers else None for m in heard["stays"]] == ["result"]
        assert len(json.loads(heard["stays"][0].data)["data"]) == 64
        assert heard["leaves"] == []
        assert worker.inflight == {}
    finally:
        engine.executor.shutdown(wait=True)


async def _append(got: list[Msg], msg: Msg) -> None:
    got.append(msg)
