"""batcher on NATS: take a site's chat and embeddings work from the router, queue it per model, hand
batches to workers (``scheduler.py``), follow heartbeats and cancels.

Admission answers the router on the message's own reply subject: ``admitted`` once the request is
queued, or an error: 429 when the model's queue is full, 504 when its deadline has passed, or 503
``not_batched`` when it knows no worker of the model (or is stopping), which tells the router to hand
the request to the workers directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage

from schemas.chat import ChatCompletionRequest
from schemas.control import Admitted, Cancel, WorkerHeartbeat
from schemas.embeddings import EmbeddingRequest
from services.batcher.pool import WorkerPool
from services.batcher.scheduler import SERVICE, Batcher
from services.batcher.settings import BatcherSettings
from services.batcher.transport import NatsTransport
from shared import subjects
from shared.envelope import EVENT, Envelope
from shared.handling import ErrorReplies, forwarded_envelope
from shared.logging import get_logger
from shared.nats import broker as make_broker
from shared.ops import Readiness
from shared.replies import Event
from shared.service import attach_broker

log = get_logger("leafwire.batcher")


async def admitted(broker: NatsBroker, batcher: Batcher, msg: NatsMessage, env: Envelope) -> None:
    """Tell the router the request is queued."""
    if msg.reply_to:
        body = Admitted(worker_id=batcher.batcher_id, request_id=env.request_id)
        await broker.connection.publish(msg.reply_to, body.model_dump_json().encode(),
                                        headers={EVENT: Event.ADMITTED.value})


def build_broker(settings: BatcherSettings, batcher: Batcher) -> NatsBroker:
    """The FastStream app of the batcher."""
    broker = make_broker(settings, SERVICE, middlewares=[ErrorReplies.for_service(settings.site, SERVICE)])

    @broker.subscriber(subjects.batch_any(settings.site, "chat"), queue=subjects.BATCHER_QUEUE, no_reply=True,
                       title="batch/chat",
                       description="Chat work for a model (router -> batcher), caller's subject in Lw-Reply. "
                                   "Answers `admitted` once queued, or an error (429 queue full, 504 deadline, "
                                   "503 code not_batched: go to the workers directly).")
    async def on_chat(body: ChatCompletionRequest, msg: NatsMessage) -> None:
        env = forwarded_envelope(msg)
        batcher.admit("chat", body, env, nbytes=len(msg.body))
        await admitted(broker, batcher, msg, env)

    @broker.subscriber(subjects.batch_any(settings.site, "embeddings"), queue=subjects.BATCHER_QUEUE,
                       no_reply=True, title="batch/embeddings",
                       description="Embeddings work for a model (router -> batcher); answered like batch/chat.")
    async def on_embeddings(body: EmbeddingRequest, msg: NatsMessage) -> None:
        env = forwarded_envelope(msg)
        batcher.admit("embeddings", body, env, body.count(), len(msg.body))
        await admitted(broker, batcher, msg, env)

    @broker.subscriber(subjects.cancel(settings.site), no_reply=True, title="batcher/cancel",
                       description="Drop a waiting request (its caller gets a 499 error event).")
    async def on_cancel(body: Cancel) -> None:
        if batcher.cancel(body.request_id, body.target):
            log.info("cancelled", request_id=body.request_id, reason=body.reason)

    for site in sorted({settings.site, subjects.HUB}):
        broker.subscriber(subjects.heartbeat(site), no_reply=True, title=f"batcher/heartbeats/{site}",
                          description="Worker announcements: who serves what, with which batching options, "
                                      "and what is idle.")(on_heartbeat(batcher))
    return broker


def on_heartbeat(batcher: Batcher) -> Callable[[WorkerHeartbeat], Awaitable[None]]:
    """The heartbeat handler (one per subscribed site)."""

    async def handle(body: WorkerHeartbeat) -> None:
        batcher.heartbeat(body)

    return handle


async def main(settings: BatcherSettings, readiness: Readiness, stack: AsyncExitStack) -> None:
    """Follow workers, then start batching."""
    transport = NatsTransport(settings)
    batcher = Batcher(settings, WorkerPool(settings.site), transport)
    broker = build_broker(settings, batcher)
    await attach_broker(broker, settings, SERVICE, readiness, stack)
    nc = transport.connection = broker.connection
    batcher.start()
    stack.push_async_callback(batcher.stop)
    for site in sorted({settings.site, subjects.HUB}):
        await nc.publish(subjects.roll_call(site), b"")
    await nc.flush()
    await asyncio.sleep(settings.roll_call_wait_s)
    log.info("batcher started", batcher_id=batcher.batcher_id,
             workers=[r.worker_id for r, _ in batcher.pool.alive()])
