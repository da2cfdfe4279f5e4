"""router on NATS: take chat requests of a site, pick a worker, hand the request over.

The caller's reply subject is the message's own; the router never answers with tokens. It forwards the
request with the caller's subject in ``Lw-Reply`` and waits only for the worker's admission; a refusal
(or no worker at all) is sent to the caller as an error event.
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
from schemas.control import ModelList, RouteDecision, WorkerHeartbeat
from services.router.catalog import Catalog
from services.router.settings import RouterSettings
from shared import metrics, subjects
from shared.envelope import EVENT, Envelope
from shared.errors import InvalidRequest, ModelNotFound, Unavailable
from shared.handling import ErrorReplies
from shared.logging import bind_request, get_logger
from shared.nats import broker as make_broker
from shared.ops import Readiness
from shared.replies import Event, error_of
from shared.service import attach_broker

SERVICE = "router"
log = get_logger("leafwire.router")


def cloud_model(model: str) -> bool:
    """Cloud models are named ``<provider>/<model>``; local model names never hold a ``/``."""
    return "/" in model


def admission_target(settings: RouterSettings, request: ChatCompletionRequest) -> tuple[str, float]:
    """Subject and admission wait for a request: cloud models go to the cloud-adapters of the site, which
    admit only at the provider's first byte (retries included), so their wait is longer."""
    if cloud_model(request.model):
        return subjects.cloud_chat(settings.site), settings.cloud_admission_timeout_s
    return subjects.infer_chat(settings.site, request.model), settings.admission_timeout_s


def decide(catalog: Catalog, request: ChatCompletionRequest) -> RouteDecision:
    """Where a request runs: a cloud model goes to its provider, anything else to a local worker."""
    if cloud_model(request.model):
        return RouteDecision(target=request.model, rule="default", reason="cloud model")
    where = "site" if any(b.site == catalog.site and any(m.name == request.model for m in b.models)
                          for b in catalog.alive()) else "hub"
    return RouteDecision(target=f"local/{request.model}", rule="default",
                         reason=f"local model on {where}" if catalog.serves(request.model) else "local model")


async def hand_over(nc: NATS, settings: RouterSettings, catalog: Catalog, request: ChatCompletionRequest,
                    env: Envelope, decision: RouteDecision) -> None:
    """Forward to a worker of the model and wait for its admission; raise what the caller should get."""
    subject, wait = admission_target(settings, request)
    timeout = min(wait, max(env.remaining(), 0.001))
    payload = request.model_dump_json(exclude_unset=True).encode()
    try:
        reply = await nc.request(subject, payload, timeout=timeout,
                                 headers=env.with_route(decision.header()).headers())
    except NoRespondersError as exc:
        if cloud_model(request.model):
            raise Unavailable(f"no cloud adapter serves site '{settings.site}'", retry_after=2) from exc
        if catalog.serves(request.model):
            raise Unavailable(f"no worker for model '{request.model}' is running right now",
                              retry_after=2) from exc
        raise ModelNotFound(request.model) from exc
    except (NatsTimeout, TimeoutError) as exc:
        raise Unavailable(f"no worker took the request within {timeout:.1f} s", retry_after=2) from exc
    headers = reply.headers or {}
    if headers.get(EVENT) == Event.ERROR.value:
        raise error_of(headers, reply.data)


def build_broker(settings: RouterSettings, catalog: Catalog) -> NatsBroker:
    """The FastStream app of the router."""
    broker = make_broker(settings, SERVICE, middlewares=[ErrorReplies.for_service(settings.site, SERVICE)])

    @broker.subscriber(subjects.chat(settings.site), queue="router", no_reply=True,
                       max_workers=settings.max_concurrency, title="chat",
                       description="Chat requests of a site, in OpenAI's request shape. The answer "
                                   "(`chunk`... `done`, or one `result`, or an `error`) arrives on the "
                                   "message's reply subject, with the event kind in the Lw-Event header.")
    async def on_chat(body: ChatCompletionRequest, msg: NatsMessage) -> None:
        started = time.perf_counter()
        env = Envelope.from_message(msg.headers, msg.reply_to)
        bind_request(env.request_id, env.tenant, msg.raw_message.subject)
        if not msg.reply_to:
            raise InvalidRequest("a chat request needs a reply subject to answer on")
        decision = decide(catalog, body)
        try:
            await hand_over(broker.connection, settings, catalog, body, env, decision)
        except Exception:
            metrics.ROUTE_DECISIONS.labels(decision.target.split("/", 1)[0], "refused").inc()
            raise
        metrics.ROUTE_DECISIONS.labels(decision.target.split("/", 1)[0], "admitted").inc()
        metrics.ROUTE_DURATION.observe(time.perf_counter() - started)
        log.info("routed", target=decision.target, reason=decision.reason)

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
