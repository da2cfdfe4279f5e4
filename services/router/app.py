"""router on NATS: take chat and embeddings requests of a site, decide where they run, hand them over.

The caller's reply subject is the message's own; the router never answers with tokens. It decides a
chain of targets from the policy and the live state, and offers the request to each in turn with the
caller's subject in ``Lw-Reply``, until one takes it (a lone cloud target is handed off: there is nothing
to wait for, see ``handover``). Local targets are queued at the site's batcher (or, when none runs, handed
to a worker directly). A refusal of every target, or a request no target may serve, is sent to the caller
as an error event. Embeddings go to the local or cloud embeddings model named (aliases resolve), never
another: another model's vectors would be of another space.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack

from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from schemas.chat import ChatCompletionRequest
from schemas.control import DryRun, ModelCard, ModelKind, ModelList, RouteDecision, SkippedTarget, WorkerHeartbeat
from schemas.embeddings import EmbeddingRequest
from services.router import decide, policy_watch, watch
from services.router import policy as policies
from services.router.catalog import Catalog
from services.router.decide import AUTO, Facts, Plan
from services.router.handover import Handoffs, count_masked, hand_off, offer_local, run_chain
from services.router.masking import Masker
from services.router.settings import RouterSettings
from services.router.signals import UNMEASURED, signals
from services.router.state import LiveState
from shared import budgets, config_bucket, metrics, subjects
from shared.envelope import RESIDENCY, SKIP, Envelope
from shared.errors import BadConfiguration, InvalidRequest, ModelNotFound
from shared.handling import ErrorReplies
from shared.intake import Handler, Intake
from shared.logging import get_logger
from shared.nats import broker as make_broker
from shared.ops import Readiness
from shared.service import attach_broker
from shared.tasks import stop_tasks

SERVICE = "router"
log = get_logger("leafwire.router")


def onsite(env: Envelope, headers: Mapping[str, str] | None, state: LiveState) -> bool:
    """Whether the request must stay on the site: its header says so, or its tenant is one that must."""
    return (headers or {}).get(RESIDENCY, "").lower() == "onsite" or \
        env.tenant in state.policy.residency.onsite_tenants


def facts_of(request: ChatCompletionRequest, env: Envelope, headers: Mapping[str, str] | None,
             state: LiveState, measure: bool = True) -> Facts:
    """What the policy may look at: model, tenant, user, residency and (if ``measure``) the prompt's signals."""
    measured = signals("\n".join(m.text() for m in request.messages)) if measure else UNMEASURED
    return Facts(model=request.model, tenant=env.tenant, user=request.user, onsite=onsite(env, headers, state),
                 signals=measured, request=request)


def decide_for(state: LiveState, request: ChatCompletionRequest, env: Envelope,
               headers: Mapping[str, str] | None, *, measure: bool = True) -> tuple[Plan, Facts]:
    """The plan for a request under the current policy and state; ``measure=False`` skips the prompt's
    signals when no rule reads them."""
    facts = facts_of(request, env, headers, state, measure)
    try:
        return decide.plan(state.policy, facts, state.conditions(env.tenant)), facts
    except ModelNotFound as err:
        raise not_found(err, state, "chat") from None


def not_found(err: ModelNotFound, state: LiveState, asked: ModelKind) -> ModelNotFound:
    """``err``, or the 404 that says the model is of the other kind (chat of an embeddings model, vectors of a
    chat model)."""
    kind = state.catalog.kind_of(err.model)
    return err if kind is None or kind == asked else ModelNotFound.other_kind(err.model, kind)


def dry_run(state: LiveState, request: ChatCompletionRequest, env: Envelope,
            headers: Mapping[str, str] | None) -> DryRun:
    """The decision for a request, without running it."""
    plan, facts = decide_for(state, request, env, headers)
    _, masked = state.masker.mask_request(request)
    return DryRun(decision=plan.decision(plan.chain[0]), requested=plan.requested, chain=list(plan.chain),
                  skipped=[SkippedTarget(target=t, reason=r) for t, r in plan.skipped],
                  prompt_tokens=facts.signals.prompt_tokens, complexity=facts.signals.complexity,
                  masked_for_cloud=dict(masked), policy_source=state.policy_source)


CHAT_DOC = ("Chat requests of a site, in OpenAI's request shape. The answer (`chunk`... `done`, or one `result`, "
            "or an `error`) arrives on the message's reply subject, with the event kind in the Lw-Event header. "
            "Header Lw-Residency: onsite keeps the request on the site.")


async def route_embeddings(nc: NATS, settings: RouterSettings, state: LiveState, request: EmbeddingRequest,
                           env: Envelope, headers: Mapping[str, str] | None, handoffs: Handoffs) -> None:
    """Embeddings go to the embeddings model named (aliases resolve): a local one, or a cloud one."""
    model, variant = decide.resolve(state.policy, request.model, request.user, env.tenant)
    if model is not None and decide.is_cloud(model):
        await route_cloud_embeddings(settings, state, request, env, headers, handoffs, model, variant)
        return
    served = {m.name: m.kind for b in state.catalog.alive() for m in b.models}
    if model is None or served.get(model) != "embeddings":
        raise not_found(ModelNotFound(request.model), state, "embeddings")
    route = RouteDecision(target=f"local/{model}", rule="embeddings", reason="local embeddings model")
    payload = request.model_copy(update={"model": model}).model_dump_json(exclude_unset=True).encode()
    await offer_local(nc, settings, model, "embeddings", payload, env.with_route(route.header()))
    metrics.ROUTE_DECISIONS.labels("local", "embeddings", "admitted").inc()


async def route_cloud_embeddings(settings: RouterSettings, state: LiveState, request: EmbeddingRequest,
                                 env: Envelope, headers: Mapping[str, str] | None, handoffs: Handoffs, model: str,
                                 variant: str | None) -> None:
    """Hand an embeddings request to the cloud-adapters of ``model``, its inputs masked, once the guards a chat
    request for it meets let it leave the site; there is no fallback, so nothing waits for the adapter."""
    facts = Facts(model=request.model, tenant=env.tenant, user=request.user, onsite=onsite(env, headers, state),
                  signals=UNMEASURED)
    try:
        plan = decide.embeddings_plan(model, variant, facts, state.conditions(env.tenant), state.cloud_embeddings())
    except ModelNotFound as err:
        raise not_found(err, state, "embeddings") from None
    sent, masked = state.masker.mask_inputs(request)
    count_masked(masked)
    payload = sent.model_copy(update={"model": model}).model_dump_json(exclude_unset=True).encode()
    await hand_off(handoffs, subjects.cloud_embeddings(state.cloud_site(model, "embeddings")), payload, env, plan,
                   model, masked)


def chat_handler(nc: NATS, settings: RouterSettings, state: LiveState,
                 handoffs: Handoffs | None = None) -> Handler[ChatCompletionRequest]:
    """Route one chat request: decide the chain, offer it until a target takes it (or hand it off)."""

    async def on_chat(body: ChatCompletionRequest, msg: Msg, env: Envelope) -> None:
        started = time.perf_counter()
        if not msg.reply:
            raise InvalidRequest("a chat request needs a reply subject to answer on")
        plan, _ = decide_for(state, body, env, msg.headers, measure=state.policy.reads_prompt)
        await run_chain(nc, settings, state, plan, body, env, raw=msg.data, handoffs=handoffs,
                        skip=msg.headers.get(SKIP) if msg.headers else None)
        metrics.ROUTE_DURATION.observe(time.perf_counter() - started)

    return on_chat


def embeddings_handler(nc: NATS, settings: RouterSettings, state: LiveState,
                       handoffs: Handoffs) -> Handler[EmbeddingRequest]:
    """Route one embeddings request to its model's workers (which take it) or cloud-adapters (handed off)."""

    async def on_embeddings(body: EmbeddingRequest, msg: Msg, env: Envelope) -> None:
        if not msg.reply:
            raise InvalidRequest("an embeddings request needs a reply subject to answer on")
        await route_embeddings(nc, settings, state, body, env, msg.headers, handoffs)

    return on_embeddings


EMBEDDINGS_DOC = ("Embeddings requests of a site, in OpenAI's request shape, for a local or a cloud embeddings "
                  "model. The answer (one `result`: an OpenAI embeddings list, or an `error`) arrives on the "
                  "message's reply subject. Header Lw-Residency: onsite keeps the request on the site.")


def build_broker(settings: RouterSettings, state: LiveState, *, document_intakes: bool = False) -> NatsBroker:
    """The FastStream app of the router: dry runs, models, heartbeats. Chat and embeddings requests are read
    by ``Intake``s; ``document_intakes`` declares their subjects for the AsyncAPI document only."""
    broker = make_broker(settings, SERVICE, middlewares=[ErrorReplies.for_service(settings.site, SERVICE)])

    if document_intakes:
        @broker.subscriber(subjects.chat(settings.site), queue="router", no_reply=True, title="chat",
                           description=CHAT_DOC)
        async def on_chat(body: ChatCompletionRequest) -> None:  # pragma: no cover - documentation only
            raise NotImplementedError("documentation only: an Intake serves this subject")

        @broker.subscriber(subjects.embeddings(settings.site), queue="router", no_reply=True, title="embeddings",
                           description=EMBEDDINGS_DOC)
        async def on_embeddings(body: EmbeddingRequest) -> None:  # pragma: no cover - documentation only
            raise NotImplementedError("documentation only: an Intake serves this subject")

    @broker.subscriber(subjects.route_dry_run(settings.site), title="route.dry_run",
                       description="Request/reply: the routing decision for a chat request, not run.")
    async def on_dry_run(body: ChatCompletionRequest, msg: NatsMessage) -> DryRun:
        env = Envelope.from_message(msg.headers, msg.reply_to)
        return dry_run(state, body, env, msg.headers)

    @broker.subscriber(subjects.models(settings.site), title="models",
                       description="Request/reply: the models this site can serve and where they run.")
    async def on_models() -> ModelList:
        return ModelList(data=state.catalog.model_cards() + routed_cards(state.policy, state.policy_at))

    @broker.subscriber(subjects.heartbeat(subjects.ANY_SITE), no_reply=True, title="heartbeats",
                       description="Worker announcements; the router's catalog of who serves what.")
    async def on_heartbeat(body: WorkerHeartbeat) -> None:
        state.catalog.seen(body)

    return broker


def routed_cards(policy: policies.Policy, applied_at: int) -> list[ModelCard]:
    """``auto`` and the policy's aliases, as ``GET /v1/models`` lists them: a UI that offers only listed
    models (Open WebUI) can pick them. Created when the policy took effect at this router."""
    return [ModelCard(id=name, owned_by="leafwire-router", routed=True, created=applied_at)
            for name in [AUTO, *sorted(policy.aliases)]]


def initial_state(settings: RouterSettings) -> LiveState:
    """The state at start: the policy file (refused at start if invalid), an empty catalog."""
    try:
        policy = policies.parse(settings.policy_file.read_text(), f"policy file {settings.policy_file}")
    except policies.PolicyError as exc:
        raise BadConfiguration(exc.message) from exc
    except OSError as exc:  # LW_ROUTER_POLICY_FILE names no readable file
        raise BadConfiguration(f"policy file {settings.policy_file} cannot be read: {exc.strerror or exc}") from exc
    state = LiveState(Catalog(settings.site), policy, Masker.from_policy(policy.masking), file_policy=policy)
    state.uplink_up = settings.uplink != "down"
    return state


async def main(settings: RouterSettings, readiness: Readiness, stack: AsyncExitStack) -> None:
    """Start routing: watch the policy (config bucket: the hub's, mirrored on an edge), provider health,
    budgets and the uplink; fill the catalog at once."""
    state = initial_state(settings)
    broker = build_broker(settings, state)
    await attach_broker(broker, settings, SERVICE, readiness, stack)
    nc = broker.connection
    handoffs = Handoffs(nc)
    await handoffs.start()
    stack.push_async_callback(handoffs.stop)
    for intake in (
        Intake(nc, subject=subjects.chat(settings.site), queue="router", model=ChatCompletionRequest,
               handler=chat_handler(nc, settings, state, handoffs), site=settings.site, service=SERVICE,
               concurrency=settings.max_concurrency, slot_wait_s=settings.slot_wait_s),
        Intake(nc, subject=subjects.embeddings(settings.site), queue="router", model=EmbeddingRequest,
               handler=embeddings_handler(nc, settings, state, handoffs), site=settings.site, service=SERVICE,
               concurrency=settings.max_concurrency, slot_wait_s=settings.slot_wait_s),
    ):
        await intake.start()
        stack.push_async_callback(intake.stop, settings.nats_drain_timeout_s)
    js = nc.jetstream(timeout=5)
    policy = policy_watch.PolicyFollower(state, settings.site, policy_watch.announcer(nc, settings.site))
    tasks = [
        watch.follow_bucket(lambda: config_bucket.open_bucket(nc), subjects.ROUTER_KEYS, policy.on_entry,
                            name=subjects.CONFIG_BUCKET, settled=policy.settled, replaced=policy.replaced,
                            check_s=policy_watch.watch_check_s(settings)),
        watch.follow_bucket(watch.existing(js, subjects.PROVIDER_HEALTH), ">", watch.health_updates(state),
                            name=subjects.PROVIDER_HEALTH),
        watch.follow_bucket(watch.existing(js, subjects.BUDGETS), ">", watch.budget_updates(state),
                            name=subjects.BUDGETS),
    ]
    if settings.site != subjects.HUB:  # other sites' spending: the mirror of the hub's budgets (shared/budgets.py)
        # (each watch looks its mirror up every LW_ROUTER_CONFIG_CHECK_S without updates: one made anew is
        # followed at once)
        tasks.append(watch.follow_bucket(lambda: budgets.open_mirror(js), ">",
                                         watch.budget_updates(state, skip_site=settings.site),
                                         name=subjects.HUB_BUDGETS, check_s=settings.config_check_s))
        # the breakers of the hub's adapters, which take the site's cloud calls where it has no adapter of its own
        tasks.append(watch.follow_bucket(lambda: watch.open_health_mirror(js), ">",
                                         watch.health_updates(state, hub=True), name=subjects.HUB_PROVIDER_HEALTH,
                                         check_s=settings.config_check_s))
        tasks.append(watch.keep_hub_mirrors(nc, settings.config_check_s, settings.config_hub_check_s))
    if settings.probes_uplink:
        tasks.append(watch.probe_uplink(nc, state, settings.uplink_probe_s, settings.site))
    if settings.site != subjects.HUB:
        tasks.append(policy_watch.catch_up_from_hub(nc, policy, settings.config_check_s,
                                                      settings.config_hub_check_s))
    stack.push_async_callback(stop_tasks, [asyncio.create_task(coro) for coro in tasks])
    await nc.publish(subjects.roll_call(settings.site), b"")
    await nc.flush()
    await asyncio.sleep(settings.roll_call_wait_s)
    log.info("router ready", models=[c.id for c in state.catalog.model_cards()], policy=str(settings.policy_file),
             uplink=settings.uplink)
