"""router on NATS: take chat and embeddings requests of a site, decide where they run, hand them over.

The caller's reply subject is the message's own; the router never answers with tokens. It forwards the
request with the caller's subject in ``Lw-Reply`` to the site's batcher (or, when none runs, straight to
a worker) and waits only for admission; a refusal (or no worker at all) is sent to the caller as an
error event.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from schemas.chat import ChatCompletionRequest
from schemas.control import ModelKind, ModelList, RouteDecision, WorkerHeartbeat
from schemas.embeddings import EmbeddingRequest
from services.router.catalog import Catalog
from services.router.settings import RouterSettings
from shared import metrics, subjects
from shared.envelope import EVENT, Envelope
from shared.errors import InvalidRequest, LeafwireError, ModelNotFound, NotBatched, Unavailable
from shared.handling import ErrorReplies
from shared.logging import bind_request, get_logger
from shared.nats import broker as make_broker
from shared.ops import Readiness
from shared.replies import Event, error_of
from shared.service import attach_broker

SERVICE = "router"
log = get_logger("leafwire.router")


def decide(catalog: Catalog, request: ChatCompletionRequest | EmbeddingRequest) -> RouteDecision:
    """Where a request runs. This slice knows one kind of target: a local worker of the named model."""
    where = "site" if any(b.site == catalog.site and any(m.name == request.model for m in b.models)
                          for b in catalog.alive()) else "hub"
    return RouteDecision(target=f"local/{request.model}", rule="default",
                         reason=f"local model on {where}" if catalog.serves(request.model) else "local model")


async def admission(nc: NATS, subject: str, payload: bytes, headers: dict[str, str], wait_s: float) -> None:
    """Forward a request and wait for it to be taken; raise the refusal (NoRespondersError: nobody there)."""
    try:
        reply = await nc.request(subject, payload, timeout=wait_s, headers=headers)
    except (NatsTimeout, TimeoutError) as exc:
        raise Unavailable(f"nobody took the request within {wait_s:.1f} s", retry_after=2) from exc
    if (reply.headers or {}).get(EVENT) == Event.ERROR.value:
        raise error_of(reply.headers or {}, reply.data)


async def hand_over(nc: NATS, settings: RouterSettings, catalog: Catalog, model: str, kind: ModelKind,
                    payload: bytes, env: Envelope, decision: RouteDecision) -> None:
    """Queue the request at the site's batcher; with no batcher (or one that knows no worker of the
    model), hand it to a worker of the model directly. Raise what the caller should get."""
    headers = env.with_route(decision.header()).headers()
    timeout = min(settings.admission_timeout_s, max(env.remaining(), 0.001))
    try:
        await admission(nc, subjects.batch(settings.site, model, kind), payload, headers, timeout)
        return
    except NoRespondersError:
        pass  # no batcher on this site
    except LeafwireError as err:
        if err.code != NotBatched.default_code:
            raise
    direct = subjects.infer_chat if kind == "chat" else subjects.infer_embeddings
    try:
        await admission(nc, direct(settings.site, model), payload, headers, timeout)
    except NoRespondersError as exc:
        if catalog.serves(model):
            raise Unavailable(f"no worker for model '{model}' is running right now", retry_after=2) from exc
        raise ModelNotFound(model) from exc


async def route(nc: NATS, settings: RouterSettings, catalog: Catalog, kind: ModelKind,
                body: ChatCompletionRequest | EmbeddingRequest, msg: NatsMessage) -> None:
    """Decide where a request runs and hand it over; the caller's reply subject is the message's own."""
    started = time.perf_counter()
    env = Envelope.from_message(msg.headers, msg.reply_to)
    bind_request(env.request_id, env.tenant, msg.raw_message.subject)
    if not msg.reply_to:
        raise InvalidRequest(f"a {kind} request needs a reply subject to answer on")
    decision = decide(catalog, body)
    payload = body.model_dump_json(exclude_unset=True).encode()
    try:
        await hand_over(nc, settings, catalog, body.model, kind, payload, env, decision)
    except Exception:
        metrics.ROUTE_DECISIONS.labels(decision.target.split("/", 1)[0], "refused").inc()
        raise
    metrics.ROUTE_DECISIONS.labels(decision.target.split("/", 1)[0], "admitted").inc()
    metrics.ROUTE_DURATION.observe(time.perf_counter() - started)
    log.info("routed", target=decision.target, reason=decision.reason)


def build_broker(settings: RouterSettings, catalog: Catalog) -> NatsBroker:
    """The FastStream app of the router."""
    broker = make_broker(settings, SERVICE, middlewares=[ErrorReplies.for_service(settings.site, SERVICE)])

    @broker.subscriber(subjects.chat(settings.site), queue="router", no_reply=True,
                       max_workers=settings.max_concurrency, title="chat",
                       description="Chat requests of a site, in OpenAI's request shape. The answer "
                                   "(`chunk`... `done`, or one `result`, or an `error`) arrives on the "
                                   "message's reply subject, with the event kind in the Lw-Event header.")
    async def on_chat(body: ChatCompletionRequest, msg: NatsMessage) -> None:
        await route(broker.connection, settings, catalog, "chat", body, msg)

    @broker.subscriber(subjects.embeddings(settings.site), queue="router", no_reply=True,
                       max_workers=settings.max_concurrency, title="embeddings",
                       description="Embeddings requests of a site, in OpenAI's request shape. The answer (one "
                                   "`result`: an OpenAI embeddings list, or an `error`) arrives on the "
                                   "message's reply subject.")
    async def on_embeddings(body: EmbeddingRequest, msg: NatsMessage) -> None:
        await route(broker.connection, settings, catalog, "embeddings", body, msg)

    @broker.subscriber(subjects.models(settings.site), title="models",
                       description="Request/reply: the models this site can serve and where they run.")
    async def on_models() -> ModelList:
        return ModelList(data=catalog.model_cards())

    @broker.subscriber(subjects.heartbeat(subjects.ANY_SITE), no_reply=True, title="heartbeats",
                       description="Worker announcements; the router's catalog of who serves what.")
    async def on_heartbeat(body: WorkerHeartbeat) -> None:
        catalog.seen(body)

    return broker


async def main(settings: RouterSettings, readiness: Readiness, stack: AsyncExitStack) -> None:
    """Start routing; ask workers to announce themselves so the catalog fills at once."""
    catalog = Catalog(settings.site)
    broker = build_broker(settings, catalog)
    await attach_broker(broker, settings, SERVICE, readiness, stack)
    nc = broker.connection
    for site in {settings.site, subjects.HUB}:
        await nc.publish(subjects.roll_call(site), b"")
    await nc.flush()
    await asyncio.sleep(settings.roll_call_wait_s)
    log.info("catalog", models=[c.id for c in catalog.model_cards()])
