"""local-inference on NATS: admit chat work for local models, stream answers, answer cancels and roll calls.

Admission answers the forwarding service (the router) on the message's own reply subject: ``admitted``
or an error it can act on (a fallback, say). After admission the answer goes straight to the caller's
subject (``Lw-Reply``), never back through the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage
from nats.aio.client import Client as NATS

from schemas.chat import ChatCompletionRequest, ChatMessage, Usage
from schemas.control import Admitted, Cancel, ModelInfo, WorkerHeartbeat
from services.local_inference import registry
from services.local_inference.engine import Engine
from services.local_inference.ipc import Delta, Finished, Rejected, RowSpec, Started
from services.local_inference.settings import InferenceSettings
from shared import metrics, subjects
from shared.answer import Answer
from shared.envelope import EVENT, Envelope
from shared.errors import (
    ContextLengthExceeded,
    DeadlineExceeded,
    InvalidRequest,
    LeafwireError,
    Overloaded,
    Unavailable,
)
from shared.handling import ErrorReplies
from shared.logging import bind_request, get_logger
from shared.nats import broker as make_broker
from shared.ops import Readiness
from shared.replies import Event, ReplyPublisher
from shared.service import attach_broker

SERVICE = "local-inference"
log = get_logger("leafwire.local_inference")


@dataclass
class Worker:
    """The worker's state: its engines (one per model) and the requests in flight."""

    settings: InferenceSettings
    engines: dict[str, Engine]
    worker_id: str = field(default_factory=lambda: f"li-{uuid.uuid4().hex[:8]}")
    inflight: dict[str, tuple[Engine, int]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    nc: NATS | None = None

    def heartbeat(self) -> WorkerHeartbeat:
        """This worker's announcement."""
        return WorkerHeartbeat(
            worker_id=self.worker_id, service=SERVICE, site=self.settings.site,
            models=[ModelInfo(name=name, context_length=e.context_length)
                    for name, e in self.engines.items() if e.ready],
            inflight=len(self.inflight), capacity=self.settings.max_inflight,
            interval_s=self.settings.heartbeat_s)

    def admit(self, model: str, request: ChatCompletionRequest, env: Envelope) -> tuple[Engine, RowSpec]:
        """Check the request can be taken now; raise the error the router should act on if not."""
        engine = self.engines.get(model)
        if engine is None:
            raise Unavailable(f"this worker does not serve {model}", retry_after=1)
        if not engine.ready:
            raise Unavailable(f"model {model} is loading", retry_after=2)
        if len(self.inflight) >= self.settings.max_inflight:
            metrics.REJECTED.labels(SERVICE, "queue_full").inc()
            raise Overloaded(f"worker {self.worker_id} is at capacity "
                             f"({self.settings.max_inflight} requests)", retry_after=1)
        if env.expired():
            raise DeadlineExceeded("the request's deadline passed before it reached a worker")
        if env.request_id in self.inflight:
            raise InvalidRequest(f"request id {env.request_id} is already being answered")
        return engine, row_spec(engine, request, env)

    async def answer(self, engine: Engine, row: RowSpec, request: ChatCompletionRequest,
                     env: Envelope) -> None:
        """Decode one admitted row and publish its answer to the caller."""
        assert self.nc is not None
        publisher = ReplyPublisher(self.nc, env.reply, env, f"{self.settings.site}/{self.worker_id}")
        answer = Answer.for_request(publisher, env.request_id, engine.spec.name, request)
        model = engine.spec.name
        self.inflight[env.request_id] = (engine, row.key)
        metrics.ACTIVE_ROWS.labels(model).inc()
        arrived = time.monotonic()
        last = 0.0
        try:
            (handle,) = engine.submit([row])
            async for event in handle.events():
                if isinstance(event, Started):
                    await answer.begin()
                elif isinstance(event, Delta):
                    now = time.monotonic()
                    if last:
                        metrics.INTER_TOKEN.labels(model).observe(now - last)
                    else:
                        metrics.TTFT.labels(model).observe(now - arrived)
                    last = now
                    await answer.text(event.text)
                elif isinstance(event, Finished):
                    usage = Usage.of(event.prompt_tokens, event.completion_tokens)
                    metrics.PROMPT_TOKENS.labels(model).inc(event.prompt_tokens)
                    metrics.COMPLETION_TOKENS.labels(model).inc(event.completion_tokens)
                    metrics.GENERATIONS.labels(model, event.finish_reason).inc()
                    if event.finish_reason != "cancelled":
                        await answer.finish(event.finish_reason, usage)
                elif isinstance(event, Rejected):
                    await publisher.error(rejection(model, event))
        except LeafwireError as err:
            await publisher.error(err)
        finally:
            self.inflight.pop(env.request_id, None)
            metrics.ACTIVE_ROWS.labels(model).dec()

    def spawn_restart(self, engine: Engine) -> None:
        """Restart a crashed decoder in the background."""
        self.spawn(restart(engine))

    def cancel(self, request_id: str) -> bool:
        """Stop a request this worker is answering; False when it is not here."""
        found = self.inflight.get(request_id)
        if found is None:
            return False
        engine, key = found
        engine.cancel(key)
        return True

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run an answer in the background, tracked so shutdown can wait for it."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def row_spec(engine: Engine, request: ChatCompletionRequest, env: Envelope) -> RowSpec:
    """The decoder's view of a request, with the model's defaults filled in."""
    defaults = engine.spec.defaults
    for m in request.messages:
        refuse_unsupported(engine.spec.name, m)
    if request.model_extra and request.model_extra.get("tools"):
        raise InvalidRequest(f"model {engine.spec.name} does not support tools", param="tools")
    return RowSpec(
        key=engine.new_key(),
        messages=[{"role": m.role, "content": m.text()} for m in request.messages],
        max_tokens=request.token_limit(),
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=request.stop_sequences(),
        deadline=env.deadline,
    )


def refuse_unsupported(model: str, message: ChatMessage) -> None:
    """Local models read text only."""
    if message.has_non_text():
        raise InvalidRequest(f"model {model} reads text only; the message has non-text content",
                             param="messages")


def rejection(model: str, event: Rejected) -> LeafwireError:
    """The caller-facing error for a row the decoder refused."""
    if event.reason == "context_length":
        d = event.detail
        return ContextLengthExceeded(model=model, context_length=d["context_length"],
                                     prompt_tokens=d["prompt_tokens"], max_tokens=d["max_tokens"])
    if event.reason == "deadline":
        return DeadlineExceeded("the request's deadline passed before decoding started")
    return InvalidRequest(event.message)


def chat_handler(broker: NatsBroker, worker: Worker, model: str) -> Callable[..., Awaitable[None]]:
    """The handler admitting chat work for ``model``."""

    async def on_chat(body: ChatCompletionRequest, msg: NatsMessage) -> None:
        env = Envelope.from_message(msg.headers, None)
        bind_request(env.request_id, env.tenant, msg.raw_message.subject)
        if not env.reply:
            raise InvalidRequest("no Lw-Reply header: nowhere to send the answer")
        engine, row = worker.admit(model, body, env)
        worker.spawn(worker.answer(engine, row, body, env))
        if msg.reply_to:
            admitted = Admitted(worker_id=worker.worker_id, request_id=env.request_id)
            await broker.connection.publish(msg.reply_to, admitted.model_dump_json().encode(),
                                            headers={EVENT: Event.ADMITTED.value})

    return on_chat


def build_broker(settings: InferenceSettings, worker: Worker, models: list[str]) -> NatsBroker:
    """The FastStream app: one chat subscriber per model, cancel and roll call listeners."""
    broker = make_broker(settings, SERVICE,
                         middlewares=[ErrorReplies.for_service(settings.site, SERVICE)])
    sites = subjects.ANY_SITE if settings.serves_all_sites else settings.site

    for model in models:
        broker.subscriber(
            subjects.infer_chat(sites, model), queue=subjects.infer_queue(model), no_reply=True,
            title=f"infer/{model}",
            description=f"Chat work for local model {model}. Answers `admitted` (or an error) on the "
                        "message's reply subject, then streams the answer to the caller's subject "
                        "given in the Lw-Reply header.",
        )(chat_handler(broker, worker, model))

    @broker.subscriber(subjects.cancel(sites), no_reply=True, title="cancel",
                       description="Stop generating for a request id (every worker listens).")
    async def on_cancel(body: Cancel) -> None:
        if worker.cancel(body.request_id):
            log.info("cancelled", request_id=body.request_id, reason=body.reason)

    @broker.subscriber(subjects.roll_call(sites), no_reply=True, title="roll_call",
                       description="Announce this worker at once on the heartbeat subject.")
    async def on_roll_call(msg: NatsMessage) -> None:
        await publish_heartbeat(broker.connection, worker)

    return broker


async def publish_heartbeat(nc: NATS, worker: Worker) -> None:
    """Tell routers this worker is here, what it serves and how busy it is."""
    await nc.publish(subjects.heartbeat(worker.settings.site), worker.heartbeat().model_dump_json().encode())


async def heartbeats(nc: NATS, worker: Worker) -> None:
    """Announce the worker every ``heartbeat_s`` seconds until cancelled."""
    while True:
        with contextlib.suppress(Exception):
            await publish_heartbeat(nc, worker)
        await asyncio.sleep(worker.settings.heartbeat_s)


async def start_engines(settings: InferenceSettings, stack: AsyncExitStack) -> dict[str, Engine]:
    """Load every model of the registry, each in its own decoder process."""
    engines: dict[str, Engine] = {}
    for spec in registry.load(settings.models_file).models:
        engine = Engine(spec, max_batch=settings.max_batch, intra_op_threads=settings.intra_op_threads)
        await engine.start()
        stack.push_async_callback(engine.stop)
        metrics.MODEL_LOAD.labels(spec.name).set(engine.load_seconds)
        engines[spec.name] = engine
    return engines


async def wait_for_answers(worker: Worker, grace_s: float) -> None:
    """On shutdown: let admitted answers finish (up to ``grace_s``), then cancel what is left."""
    if worker.tasks:
        _, pending = await asyncio.wait(set(worker.tasks), timeout=grace_s)
        for task in pending:
            task.cancel()


async def main(settings: InferenceSettings, readiness: Readiness, stack: AsyncExitStack) -> None:
    """Load models, then take work from NATS."""
    engines = await start_engines(settings, stack)
    worker = Worker(settings, engines)
    for engine in engines.values():
        engine.on_crash = functools.partial(worker.spawn_restart, engine)
    broker = build_broker(settings, worker, list(engines))
    stack.push_async_callback(wait_for_answers, worker, settings.nats_drain_timeout_s)
    await attach_broker(broker, settings, SERVICE, readiness, stack)
    worker.nc = broker.connection
    readiness.add("models", lambda: None if all(e.ready for e in engines.values()) else "model not loaded")
    beat = asyncio.create_task(heartbeats(broker.connection, worker))
    stack.callback(beat.cancel)


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
