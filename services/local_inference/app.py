"""local-inference on NATS: take batches from the batcher (or single requests from the router), answer
status and cancels, announce the worker.

Admission answers the sender (a batcher, or the router) on the message's own reply subject: ``admitted``
or an error it can act on (busy: offer the batch elsewhere; no such model: fall back). After admission
each answer goes straight to its caller's subject, never back through the sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage
from nats.aio.client import Client as NATS

from schemas.batch import BatchAnswer, ChatBatch, EmbeddingsBatch, WorkerStatus
from schemas.chat import ChatCompletionRequest
from schemas.control import Admitted
from schemas.embeddings import EmbeddingRequest
from services.local_inference import registry
from services.local_inference.embedder import EmbedEngine
from services.local_inference.engine import Engine
from services.local_inference.settings import InferenceSettings
from services.local_inference.worker import SERVICE, Worker
from shared import hub_usage, metrics, subjects
from shared.envelope import EVENT, Envelope
from shared.errors import BadConfiguration
from shared.handling import ErrorReplies, forwarded_envelope
from shared.heartbeat import announce, announce_every, subscribe_controls
from shared.logging import get_logger
from shared.nats import broker as make_broker
from shared.ops import Readiness
from shared.replies import Event
from shared.service import attach_broker
from shared.tasks import every, stop_tasks
from shared.usage import UsagePublisher

__all__ = ["SERVICE", "Worker", "build_broker", "main"]
log = get_logger("leafwire.local_inference")


async def admitted(nc: NATS, msg: NatsMessage, worker: Worker, env: Envelope) -> None:
    """Tell the router a single request was taken."""
    if msg.reply_to:
        body = Admitted(worker_id=worker.worker_id, request_id=env.request_id)
        await nc.publish(msg.reply_to, body.model_dump_json().encode(), headers={EVENT: Event.ADMITTED.value})


def chat_handler(broker: NatsBroker, worker: Worker, model: str) -> Callable[..., Awaitable[None]]:
    """The handler admitting single chat requests for ``model`` (the path without a batcher)."""

    async def on_chat(body: ChatCompletionRequest, msg: NatsMessage) -> None:
        env = forwarded_envelope(msg)
        worker.admit(model, body, env)
        await admitted(broker.connection, msg, worker, env)

    return on_chat


def embeddings_handler(broker: NatsBroker, worker: Worker, model: str) -> Callable[..., Awaitable[None]]:
    """The handler admitting single embeddings requests for ``model`` (the path without a batcher)."""

    async def on_embeddings(body: EmbeddingRequest, msg: NatsMessage) -> None:
        env = forwarded_envelope(msg)
        worker.admit_embeddings(model, body, env)
        await admitted(broker.connection, msg, worker, env)

    return on_embeddings


def subscribe_models(broker: NatsBroker, worker: Worker, sites: str, chat: list[str], embeddings: list[str]) -> None:
    """Per model, the queue-group subscription the router uses when no batcher runs."""
    for model in chat:
        broker.subscriber(
            subjects.infer_chat(sites, model), queue=subjects.infer_queue(model), no_reply=True,
            title=f"infer/{model}",
            description=f"Single chat requests for local model {model}, from the router when no batcher "
                        "runs. Answers `admitted` (or an error) on the message's reply subject, then streams "
                        "the answer to the caller's subject given in the Lw-Reply header.",
        )(chat_handler(broker, worker, model))
    for model in embeddings:
        broker.subscriber(
            subjects.infer_embeddings(sites, model), queue=subjects.infer_queue(model), no_reply=True,
            title=f"infer/{model}/embeddings",
            description=f"Single embeddings requests for local model {model}, from the router when no "
                        "batcher runs; the `result` goes to the Lw-Reply subject.",
        )(embeddings_handler(broker, worker, model))


def subscribe_batches(broker: NatsBroker, worker: Worker) -> None:
    """This worker's own subjects: batches from batchers and their status questions."""
    site, wid = worker.settings.site, worker.worker_id

    @broker.subscriber(subjects.worker_batch(site, wid, "chat"), title="worker/batch/chat",
                       description="A batcher's chat batch for this worker: `BatchAnswer` (not taken while "
                                   "another batch of the model is decoding, or while shutting down).")
    async def on_chat_batch(body: ChatBatch) -> BatchAnswer:
        return worker.take_chat_batch(body)

    @broker.subscriber(subjects.worker_batch(site, wid, "embeddings"), title="worker/batch/embeddings",
                       description="A batcher's embeddings batch for this worker: `BatchAnswer`.")
    async def on_embeddings_batch(body: EmbeddingsBatch) -> BatchAnswer:
        return worker.take_embeddings(body, when_idle=True)

    @broker.subscriber(subjects.worker_status(site, wid), title="worker/status",
                       description="The requests this worker is still answering (`WorkerStatus`).")
    async def on_status() -> WorkerStatus:
        return worker.status()


def build_broker(settings: InferenceSettings, worker: Worker, chat: list[str] | None = None,
                 embeddings: list[str] | None = None) -> NatsBroker:
    """The FastStream app: batches, single requests per model, cancels, roll calls (the models are the
    worker's unless named, as for the AsyncAPI document)."""
    broker = make_broker(settings, SERVICE, middlewares=[ErrorReplies.for_service(settings.site, SERVICE)])
    sites = subjects.ANY_SITE if settings.serves_all_sites else settings.site
    subscribe_models(broker, worker, sites, list(worker.engines) if chat is None else chat,
                     list(worker.embedders) if embeddings is None else embeddings)
    subscribe_batches(broker, worker)
    subscribe_controls(broker, sites, site=settings.site, beat=worker.heartbeat, title="",
                       cancel=lambda body: worker.cancel(body.request_id, body.target),
                       cancel_doc="Stop generating for a request id (every worker and batcher listens).",
                       roll_call_doc="Announce this worker at once on the heartbeat subject.")
    return broker


async def publish_heartbeat(nc: NATS, worker: Worker) -> None:
    """Tell routers and batchers this worker is here, what it serves and what is idle."""
    await announce(nc, worker.settings.site, worker.heartbeat())


async def start_engines(settings: InferenceSettings, stack: AsyncExitStack) -> Worker:
    """Load every model of the registry: chat models each in a decoder process, embeddings on a thread."""
    engines: dict[str, Engine] = {}
    embedders: dict[str, EmbedEngine] = {}
    try:
        specs = registry.load(settings.models_file).models
    except registry.RegistryError as exc:
        raise BadConfiguration(exc.message) from exc
    for spec in specs:
        if spec.kind == "embeddings":
            embedder = EmbedEngine(spec, settings.intra_op_threads)
            await embedder.start()
            stack.push_async_callback(embedder.stop)
            embedders[spec.name] = embedder
            metrics.MODEL_LOAD.labels(spec.name).set(embedder.load_seconds)
            continue
        max_batch = spec.batching_options(settings.max_batch).max_batch
        engine = Engine(spec, max_batch=max_batch, intra_op_threads=settings.intra_op_threads)
        engine.on_batch = metrics.BATCH_SIZE.labels(spec.name).observe
        await engine.start()
        stack.push_async_callback(engine.stop)
        metrics.MODEL_LOAD.labels(spec.name).set(engine.load_seconds)
        engines[spec.name] = engine
    return Worker(settings, engines, embedders)


async def wait_for_answers(worker: Worker, grace_s: float) -> None:
    """On shutdown: refuse new work, let admitted answers finish (up to ``grace_s``), cancel what is left.

    Runs before the broker drains, so answers can still be published and batchers asking for this
    worker's status still hear that their rows are being answered. The heartbeats before and after say
    ``leaving``: batchers send nothing more, and once nothing is in flight they stop watching.
    """
    worker.stopping = True
    await last_words(worker)
    if worker.tasks:
        _, pending = await asyncio.wait(set(worker.tasks), timeout=grace_s)
        await stop_tasks(pending)
    await last_words(worker)


async def last_words(worker: Worker) -> None:
    """One heartbeat now, flushed (best effort: the connection may already be gone)."""
    if worker.nc is not None:
        with contextlib.suppress(Exception):
            await publish_heartbeat(worker.nc, worker)
            await worker.nc.flush(timeout=1)


async def main(settings: InferenceSettings, readiness: Readiness, stack: AsyncExitStack) -> None:
    """Load models, then take work from NATS (not ready until both are done)."""
    readiness.add("models", lambda: "models are loading")
    worker = await start_engines(settings, stack)
    for engine in worker.engines.values():
        engine.on_crash = functools.partial(spawn_restart, worker, engine)
    broker = build_broker(settings, worker)
    await attach_broker(broker, settings, SERVICE, readiness, stack)
    nc = broker.connection
    worker.nc = nc
    worker.usage = UsagePublisher(nc, settings.site)
    try:
        await worker.usage.ensure_stream()
    except Exception as exc:  # JetStream off or electing: usage events are then dropped and counted
        log.warning("usage stream unavailable", error=repr(exc))
    stack.push_async_callback(worker.usage.flush)  # unwinds after the answers below have finished
    forward = asyncio.create_task(hub_usage.keep_joined(nc, settings.site, settings.usage_hub_check_s))
    stack.push_async_callback(stop_tasks, [forward])
    stack.push_async_callback(wait_for_answers, worker, settings.nats_drain_timeout_s)
    worker.on_idle = lambda: worker.spawn(publish_heartbeat(nc, worker))
    readiness.add("models", lambda: None if all(e.ready for e in worker.engines.values())
                  and all(e.ready for e in worker.embedders.values()) else "model not loaded")
    beat = asyncio.create_task(announce_every(nc, settings.site, worker.heartbeat, settings.heartbeat_s))
    keepalive = asyncio.create_task(every(settings.keepalive_s / 5, worker.keep_callers))
    stack.push_async_callback(stop_tasks, [beat, keepalive])
    log.info("worker started", worker_id=worker.worker_id, chat=list(worker.engines),
             embeddings=list(worker.embedders))


def spawn_restart(worker: Worker, engine: Engine) -> None:
    """Restart a crashed decoder in the background."""
    worker.spawn(restart(engine))


async def restart(engine: Engine) -> None:
    """Bring a crashed decoder back (its rows already got an error)."""
    delay = 1.0
    while not engine.ready:
        await asyncio.sleep(delay)
        try:
            await engine.start()
        except Exception as exc:
            log.error("decoder restart failed", model=engine.spec.name, error=repr(exc))
            delay = min(delay * 2, 30.0)
