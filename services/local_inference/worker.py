"""The worker's state and work: admit requests and batches, run them on the model engines, publish answers.

Work arrives two ways. From the batcher, a whole batch for one worker: taken only while that model is
idle here (a static batch cannot grow once started), refused as busy otherwise, so the batcher offers it
to another worker or waits. From the router directly, one request at a time, when no batcher runs.
Answers go straight to each caller's reply subject. Every request being answered is in ``inflight``
from the moment it is taken, so a batcher asking for this worker's status sees it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from nats.aio.client import Client as NATS

from schemas.batch import BatchAnswer, ChatBatch, EmbeddingsBatch, EmbeddingsRow, WorkerStatus
from schemas.chat import ChatCompletionRequest, Usage
from schemas.cloud import UsageEvent
from schemas.control import ModelInfo, WorkerHeartbeat
from schemas.embeddings import EmbeddingRequest
from services.local_inference.embedder import EmbedEngine, TooLong
from services.local_inference.engine import Engine, RowHandle
from services.local_inference.ipc import Delta, Finished, Reading, Rejected, RowSpec, Started
from services.local_inference.rows import TokenClock, rejection, row_spec, too_long
from services.local_inference.settings import InferenceSettings
from services.local_inference.vectors import embedding_response
from shared import metrics, paths
from shared.answer import Answer
from shared.envelope import Envelope
from shared.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    LeafwireError,
    Overloaded,
    Unavailable,
)
from shared.logging import get_logger
from shared.replies import Event, ReplyPublisher, keep_callers, publish_error
from shared.usage import UsagePublisher
from shared.vectors import oversized

SERVICE = "local-inference"
log = get_logger("leafwire.local_inference")


def new_worker_id(instance: str = "") -> str:
    """``li-<instance>`` when the deployment names the instance, else ``li-<random>``."""
    return f"li-{instance or uuid.uuid4().hex[:8]}"


@dataclass(slots=True)
class Taken:
    """A request this worker answers: its model, how to stop it, and whether its decoder is reading its long
    prompt (and answering other rows meanwhile)."""

    model: str
    stop: Callable[[], None]
    reading: bool = False
    publisher: ReplyPublisher | None = None  # a chat row's, once its answer has begun to be published


@dataclass
class EmbedJob:
    """One embeddings request of a batch, checked and waiting for its vectors."""

    env: Envelope
    request: EmbeddingRequest
    texts: list[str]
    publisher: ReplyPublisher | None = None  # once taken
    dropped: bool = False  # its caller left or cancelled: the batch still runs, its vectors are not sent

    def drop(self) -> None:
        """Send this request's caller nothing more (a batch is not stopped midway)."""
        self.dropped = True


@dataclass
class Worker:
    """The worker's engines (one per model) and the requests it is answering."""

    settings: InferenceSettings
    engines: dict[str, Engine]
    embedders: dict[str, EmbedEngine] = field(default_factory=dict)
    worker_id: str = ""
    inflight: dict[str, Taken] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    nc: NATS | None = None
    usage: UsagePublisher | None = None
    stopping: bool = False
    on_idle: Callable[[], None] | None = None
    batches: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.worker_id = self.worker_id or new_worker_id(self.settings.instance)

    @property
    def served_by(self) -> str:
        """``<site>/<worker id>``, sent to callers with the first event of each answer."""
        return f"{self.settings.site}/{self.worker_id}"

    # -- announcements ----------------------------------------------------------------------------

    def heartbeat(self) -> WorkerHeartbeat:
        """This worker's announcement (``leaving``, nothing idle, once it is shutting down)."""
        models = [*self._chat_models(), *self._embedding_models()]
        if self.stopping:
            models = [m.model_copy(update={"idle": False}) for m in models]
        return WorkerHeartbeat(
            worker_id=self.worker_id, service=SERVICE, site=self.settings.site, models=models,
            inflight=len(self.inflight), capacity=self.settings.max_inflight,
            interval_s=self.settings.heartbeat_s, serves_all_sites=self.settings.serves_all_sites,
            leaving=self.stopping)

    def _chat_models(self) -> list[ModelInfo]:
        return [ModelInfo(name=name, context_length=e.context_length, kind="chat",
                          created=paths.modified_at(*e.spec.required_files()),
                          batching=e.spec.batching_options(self.settings.max_batch), idle=self.idle_model(name),
                          batches=self.batches[name])
                for name, e in self.engines.items() if e.ready]

    def _embedding_models(self) -> list[ModelInfo]:
        return [ModelInfo(name=name, context_length=e.context_length, kind="embeddings",
                          created=paths.modified_at(*e.spec.required_files()),
                          dimensions=e.dimensions, batching=e.spec.batching_options(), idle=self.idle_model(name),
                          batches=self.batches[name])
                for name, e in self.embedders.items() if e.ready]

    def idle_model(self, model: str) -> bool:
        """True when no request of ``model`` is being answered here, or when the decoder is reading one's long
        prompt: it then answers rows that arrive before the next chunk (whatever else waits behind it), so a
        batcher may send them."""
        rows = [t for t in self.inflight.values() if t.model == model]
        return not rows or any(t.reading for t in rows)

    def status(self) -> WorkerStatus:
        """The requests this worker is answering, for a batcher watching its rows."""
        return WorkerStatus(worker_id=self.worker_id, request_ids=list(self.inflight))

    # -- admission --------------------------------------------------------------------------------

    def _open(self) -> None:
        if self.stopping:
            raise Unavailable(f"worker {self.worker_id} is shutting down", code="worker_stopping",
                              retry_after=1)

    def chat_engine(self, model: str) -> Engine:
        """The loaded chat engine of ``model``; Unavailable when this worker cannot take it now."""
        self._open()
        engine = self.engines.get(model)
        if engine is None:
            raise Unavailable(f"this worker does not serve chat model {model}", code="no_worker", retry_after=1)
        if not engine.ready:
            raise Unavailable(f"model {model} is loading", retry_after=2)
        return engine

    def embed_engine(self, model: str) -> EmbedEngine:
        """The loaded embeddings engine of ``model``; Unavailable when this worker cannot take it now."""
        self._open()
        engine = self.embedders.get(model)
        if engine is None:
            raise Unavailable(f"this worker does not serve embeddings model {model}", code="no_worker",
                              retry_after=1)
        if not engine.ready:
            raise Unavailable(f"model {model} is loading", retry_after=2)
        return engine

    def check_room(self) -> None:
        """Raise 429 when this worker already answers its limit of requests (the path without a batcher)."""
        if len(self.inflight) >= self.settings.max_inflight:  # counted by ErrorReplies, as every refusal
            raise Overloaded(f"worker {self.worker_id} is at capacity "
                             f"({self.settings.max_inflight} requests)", retry_after=1)

    def _fresh(self, env: Envelope) -> None:
        if env.expired():
            raise DeadlineExceeded("the request's deadline passed before it reached a worker")
        if env.request_id in self.inflight:
            raise InvalidRequest(f"request id {env.request_id} is already being answered")

    def admit(self, model: str, request: ChatCompletionRequest, env: Envelope) -> None:
        """Take one chat request (no batcher in the path); raise what the router should act on if not."""
        engine = self.chat_engine(model)
        self.check_room()
        self._fresh(env)
        row = row_spec(engine, request, env)
        (handle,) = engine.submit([row])
        self._start_chat(engine, handle, request, env, 0.0)

    def declined(self, model: str, reason: Literal["busy", "stopping"]) -> BatchAnswer:
        """A batch this worker will not take now; the batcher offers it elsewhere or later."""
        return BatchAnswer(worker_id=self.worker_id, site=self.settings.site, taken=False, reason=reason,
                           batches=self.batches[model])

    def accepted(self, model: str, request_ids: list[str]) -> BatchAnswer:
        """A batch this worker took (its count of the model's batches goes up by one)."""
        self.batches[model] += 1
        return BatchAnswer(worker_id=self.worker_id, site=self.settings.site, request_ids=request_ids,
                           batches=self.batches[model])

    def admit_embeddings(self, model: str, request: EmbeddingRequest, env: Envelope) -> None:
        """Take one embeddings request (no batcher in the path); raise what the router should act on if not."""
        self._open()
        self.check_room()
        self.take_embeddings(EmbeddingsBatch(model=model, rows=[EmbeddingsRow(envelope=env.row(), request=request)]),
                             when_idle=False)

    def take_chat_batch(self, batch: ChatBatch) -> BatchAnswer:
        """Take a batcher's chat batch if the model is idle here; its rows are decoded together."""
        if self.stopping:
            return self.declined(batch.model, "stopping")
        engine = self.chat_engine(batch.model)
        if not self.idle_model(batch.model):
            return self.declined(batch.model, "busy")
        taken: list[tuple[RowSpec, ChatCompletionRequest, Envelope, float]] = []
        for item in batch.rows:
            env = Envelope.from_row(item.envelope)
            try:
                self._fresh(env)
                taken.append((row_spec(engine, item.request, env), item.request, env, item.envelope.queued_s))
            except LeafwireError as err:
                self.refuse(env, err)
        handles = engine.submit([row for row, *_ in taken]) if taken else []
        for handle, (_, request, env, queued_s) in zip(handles, taken, strict=True):
            self._start_chat(engine, handle, request, env, queued_s)
        answer = self.accepted(batch.model, [env.request_id for _, _, env, _ in taken])
        if not taken:
            self.idle()  # every row was refused: nothing will finish to say so
        return answer

    def take_embeddings(self, batch: EmbeddingsBatch, *, when_idle: bool) -> BatchAnswer:
        """Take embeddings requests; from a batcher (``when_idle``) only while the model is idle here."""
        if self.stopping:
            return self.declined(batch.model, "stopping")
        engine = self.embed_engine(batch.model)
        if when_idle and not self.idle_model(batch.model):
            return self.declined(batch.model, "busy")
        jobs = []
        for item in batch.rows:
            env = Envelope.from_row(item.envelope)
            try:
                jobs.append(self._embed_job(engine, item, env))
            except LeafwireError as err:
                self.refuse(env, err)
        for job in jobs:  # a batch is not stopped midway; its callers are kept waiting while it runs
            job.publisher = ReplyPublisher(self.nc, job.env.reply, job.env, self.served_by) if self.nc else None
            self.inflight[job.env.request_id] = Taken(batch.model, job.drop, publisher=job.publisher)
        answer = self.accepted(batch.model, [job.env.request_id for job in jobs])
        if jobs:
            self.spawn(self.embed(engine, jobs))
        else:
            self.idle()  # every request was refused: nothing will finish to say so
        return answer

    def _embed_job(self, engine: EmbedEngine, item: EmbeddingsRow, env: Envelope) -> EmbedJob:
        self._fresh(env)
        texts = item.request.texts()
        if texts is None:
            raise InvalidRequest(f"model {engine.spec.name} takes text: send input as a string or an array "
                                 "of strings, not token ids", param="input")
        if item.request.dimensions is not None and item.request.dimensions != engine.dimensions:
            raise InvalidRequest(f"model {engine.spec.name} makes {engine.dimensions}-dimensional vectors; "
                                 f"it cannot make {item.request.dimensions}", param="dimensions")
        return EmbedJob(env, item.request, texts)

    def refuse(self, env: Envelope, err: LeafwireError) -> None:
        """Tell one caller of a batch why its request was not taken (the others go on)."""
        metrics.REJECTED.labels(SERVICE, err.code or type(err).__name__).inc()
        if self.nc is not None:
            self.spawn(publish_error(self.nc, env.reply, env, err))

    # -- answering --------------------------------------------------------------------------------

    def _start_chat(self, engine: Engine, handle: RowHandle, request: ChatCompletionRequest, env: Envelope,
                    queued_s: float) -> None:
        self.inflight[env.request_id] = Taken(engine.spec.name, handle.cancel)
        metrics.ACTIVE_ROWS.labels(engine.spec.name).inc()
        self.spawn(self.answer(engine, handle, request, env, time.monotonic() - queued_s))

    async def answer(self, engine: Engine, handle: RowHandle, request: ChatCompletionRequest, env: Envelope,
                     arrived: float) -> None:
        """Publish one row's answer to its caller as the decoder produces it."""
        assert self.nc is not None
        publisher = ReplyPublisher(self.nc, env.reply, env, self.served_by)
        answer = Answer.for_request(publisher, env.request_id, engine.spec.name, request)
        if (taken := self.inflight.get(env.request_id)) is not None:
            taken.publisher = publisher
        clock = TokenClock(engine.spec.name, arrived)
        try:
            async for event in handle.events():
                if isinstance(event, Started):
                    await answer.begin()
                elif isinstance(event, Reading):
                    self.reading(env.request_id, event.reading)
                elif isinstance(event, Delta):
                    clock.tick()
                    await answer.text(event.text)
                elif isinstance(event, Finished):
                    await self._finish(answer, publisher, engine.spec.name, event)
                    clock.done(event.completion_tokens)
                    await self._record(engine.spec.name, env, event.prompt_tokens, event.completion_tokens,
                                       "cancelled" if event.finish_reason == "cancelled" else "ok",
                                       time.monotonic() - arrived)
                elif isinstance(event, Rejected):
                    await publisher.error(rejection(engine.spec.name, event))
        except LeafwireError as err:
            await publisher.error(err)
        finally:
            self.inflight.pop(env.request_id, None)
            metrics.ACTIVE_ROWS.labels(engine.spec.name).dec()
            if self.idle_model(engine.spec.name):
                self.idle()

    @staticmethod
    async def _finish(answer: Answer, publisher: ReplyPublisher, model: str, event: Finished) -> None:
        metrics.PROMPT_TOKENS.labels(model).inc(event.prompt_tokens)
        metrics.COMPLETION_TOKENS.labels(model).inc(event.completion_tokens)
        metrics.GENERATIONS.labels(model, event.finish_reason).inc()
        if event.finish_reason == "cancelled":
            await publisher.error(Cancelled("the request was cancelled"))
        else:
            await answer.finish(event.finish_reason, Usage.of(event.prompt_tokens, event.completion_tokens))

    async def _record(self, model: str, env: Envelope, prompt_tokens: int, completion_tokens: int,
                      outcome: Literal["ok", "cancelled"], latency_s: float) -> None:
        """One usage event per answer (chat, or a request's vectors), as the cloud-adapter writes for cloud
        ones (the A/B variant too)."""
        if self.usage is None:
            return
        await self.usage.usage(UsageEvent(
            request_id=env.request_id, tenant=env.tenant, site=self.settings.site, target=f"local/{model}",
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, variant=env.variant,
            outcome=outcome, latency_s=latency_s))

    async def embed(self, engine: EmbedEngine, jobs: list[EmbedJob]) -> None:
        """Make the vectors of several requests in one go and answer each caller."""
        assert self.nc is not None
        model = engine.spec.name
        started = time.monotonic()
        try:
            metrics.BATCH_SIZE.labels(model).observe(sum(len(j.texts) for j in jobs))
            results = await engine.embed_many([j.texts for j in jobs])
            for job, result in zip(jobs, results, strict=True):
                if job.dropped:
                    continue
                publisher = job.publisher or ReplyPublisher(self.nc, job.env.reply, job.env, self.served_by)
                if isinstance(result, TooLong):
                    await publisher.error(too_long(model, result))
                    continue
                metrics.EMBEDDING_INPUTS.labels(model).inc(len(job.texts))
                metrics.PROMPT_TOKENS.labels(model).inc(result.tokens)
                body = embedding_response(model, result.vectors, result.tokens, job.request.encoding_format)
                answer = body.model_dump_json().encode()
                if (too_large := oversized(answer, self.nc.max_payload, job.request)) is not None:
                    log.warning("embeddings answer too large for NATS", model=model, request_id=job.env.request_id,
                                bytes=too_large.size, max_payload=too_large.max_payload)
                    await publisher.error(too_large)
                    continue
                await publisher.send(Event.RESULT, answer)
                await self._record(model, job.env, result.tokens, 0, "ok", time.monotonic() - started)
        except Exception as exc:  # the caller must hear of it, whatever broke
            log.exception("embeddings failed", model=model)
            for job in jobs:
                if not job.dropped:
                    await publish_error(self.nc, job.env.reply, job.env,
                                        LeafwireError(f"embeddings failed: {type(exc).__name__}"))
        finally:
            for job in jobs:
                self.inflight.pop(job.env.request_id, None)
            if self.idle_model(model):
                self.idle()

    async def keep_callers(self) -> None:
        """Tell each caller its answer is still coming, every ``keepalive_s`` (a row waiting behind long
        prompts, or whose own long prompt is read, can be quiet for long); stop the answers nobody waits for
        any more (the caller's gateway died, or never heard the cancel)."""
        held = [taken.publisher for taken in self.inflight.values() if taken.publisher is not None]
        await keep_callers(held, self.settings.keepalive_s, ReplyPublisher.ping, self.caller_gone)

    def caller_gone(self, publisher: ReplyPublisher) -> None:
        """The caller of a request no longer waits: stop decoding for it."""
        if self.cancel(publisher.request_id):
            metrics.CALLERS_GONE.labels(SERVICE).inc()
            log.info("caller gone: answer stopped", request_id=publisher.request_id)

    def reading(self, request_id: str, reading: bool) -> None:
        """A row's long prompt began or ended being read: the model is takeable meanwhile (said at once)."""
        taken = self.inflight.get(request_id)
        if taken is not None:
            taken.reading = reading
            if reading:
                self.idle()

    def idle(self) -> None:
        """A model has nothing left to do here: tell batchers at once (not at the next heartbeat)."""
        if self.on_idle is not None and not self.stopping:
            self.on_idle()

    def cancel(self, request_id: str, target: str | None = None) -> bool:
        """Stop a request this worker is answering (its answer by ``target`` when one is named: a router's
        fallback may be here under the same id); False when it is not here."""
        taken = self.inflight.get(request_id)
        if taken is None or target not in (None, taken.model):
            return False
        taken.stop()
        return True

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run an answer in the background, tracked so shutdown can wait for it."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
