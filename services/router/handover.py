"""Handing a request to its targets in order, falling back until one takes it.

A target "takes" a request when it answers ``admitted``: a local worker (or batcher) once it queued the
row, a cloud adapter once the provider's first byte arrived. Until then nothing has reached the client,
so a refusal (busy, unavailable, over budget, context too small...) moves on to the next target. After
admission the answer streams straight to the caller and any later failure ends it with an error event.
"""

from __future__ import annotations

from collections import Counter

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from schemas.chat import ChatCompletionRequest
from schemas.control import Cancel, ModelKind
from services.router.decide import Plan, is_cloud
from services.router.settings import RouterSettings
from services.router.state import LiveState
from shared import metrics, subjects
from shared.envelope import EVENT, Envelope
from shared.errors import LeafwireError, NotBatched, Unavailable
from shared.logging import get_logger
from shared.replies import Event, error_of

log = get_logger("leafwire.router")

FALLBACK_CODES = frozenset({"context_length_exceeded", "model_not_found", "budget_exceeded"})


def env_site(subject: str) -> str:
    """The site token of a ``lw.v1.<site>....`` subject."""
    return subject.split(".", 3)[2]


def falls_back(err: LeafwireError) -> bool:
    """Whether the next target may succeed where this one failed (not for malformed requests)."""
    return err.status >= 429 or err.code in FALLBACK_CODES


async def admit(nc: NATS, subject: str, payload: bytes, env: Envelope, wait_s: float) -> None:
    """Offer a request on ``subject`` and wait until it is taken; raise the refusal.

    ``NoRespondersError`` (nobody listens) is left to the caller, which knows what that means.
    """
    timeout = max(min(wait_s, env.remaining()), 0.001)
    try:
        reply = await nc.request(subject, payload, timeout=timeout, headers=env.headers())
    except (NatsTimeout, TimeoutError) as exc:
        # Whoever got it may still take it later and answer the caller beside the next target: stop it.
        await nc.publish(subjects.cancel(env_site(subject)),
                         Cancel(request_id=env.request_id, reason="not taken in time").model_dump_json().encode())
        raise Unavailable(f"nobody took the request within {timeout:.1f} s", retry_after=2) from exc
    headers = reply.headers or {}
    if headers.get(EVENT) == Event.ERROR.value:
        raise error_of(headers, reply.data)


async def offer_local(nc: NATS, settings: RouterSettings, model: str, kind: ModelKind, payload: bytes,
                      env: Envelope) -> None:
    """Queue at the site's batcher; with no batcher (or one that cannot batch it), go to a worker directly."""
    try:
        await admit(nc, subjects.batch(settings.site, model, kind), payload, env, settings.admission_timeout_s)
        return
    except NoRespondersError:
        pass  # no batcher on this site
    except LeafwireError as err:
        if err.code != NotBatched.default_code:
            raise
    direct = subjects.infer_chat if kind == "chat" else subjects.infer_embeddings
    try:
        await admit(nc, direct(settings.site, model), payload, env, settings.admission_timeout_s)
    except NoRespondersError as exc:
        raise Unavailable(f"no worker for model '{model}' is running right now", retry_after=2) from exc


async def offer(nc: NATS, settings: RouterSettings, target: str, payload: bytes, env: Envelope) -> None:
    """Ask ``target`` to take a chat request; raise the error it (or its absence) amounts to."""
    if not is_cloud(target):
        await offer_local(nc, settings, target, "chat", payload, env)
        return
    try:
        await admit(nc, subjects.cloud_chat(settings.site), payload, env, settings.cloud_admission_timeout_s)
    except NoRespondersError as exc:
        raise Unavailable("no cloud adapter is running right now", retry_after=2) from exc


def prepare(state: LiveState, request: ChatCompletionRequest, target: str,
            raw: bytes | None = None) -> tuple[bytes, Counter[str]]:
    """The payload for ``target``: the model set to it, personal data masked if it leaves the site.

    A request that needs neither change travels on as ``raw``, the bytes it came in (the next hop parses
    them with the same schema), instead of being serialised again.
    """
    counts: Counter[str] = Counter()
    sent = request
    if is_cloud(target):
        sent, counts = state.masker.mask_request(request)
    if raw is not None and sent is request and request.model == target:
        return raw, counts
    return sent.model_copy(update={"model": target}).model_dump_json(exclude_unset=True).encode(), counts


async def run_chain(nc: NATS, settings: RouterSettings, state: LiveState, plan: Plan,
                    request: ChatCompletionRequest, env: Envelope, raw: bytes | None = None) -> str:
    """Offer the request to each target of the plan until one takes it; return the target that did.

    ``raw`` is the request as it arrived, forwarded as is to a target that needs no change of it."""
    failed: list[tuple[str, str]] = []
    first: LeafwireError | None = None
    for target in plan.chain:
        payload, masked = prepare(state, request, target, raw)
        for pattern, n in masked.items():  # counted as it leaves for the cloud-adapter, taken or not
            metrics.MASKED.labels(pattern).inc(n)
        try:
            await offer(nc, settings, target, payload, env.with_route(plan.header(target, failed)))
        except LeafwireError as err:
            kind = "cloud" if is_cloud(target) else "local"
            if not falls_back(err):
                metrics.ROUTE_DECISIONS.labels(kind, plan.rule, "refused").inc()
                raise
            metrics.ROUTE_FALLBACKS.labels(kind, str(err.status)).inc()
            log.info("target refused; falling back", target=target, status=err.status, error=err.message)
            failed.append((target, f"{err.status} {err.code or err.type}"))
            first = first or err
            continue
        metrics.ROUTE_DECISIONS.labels("cloud" if is_cloud(target) else "local", plan.rule, "admitted").inc()
        log.info("routed", target=target, rule=plan.rule, variant=plan.variant, fallbacks=len(failed),
                 masked=sum(masked.values()))
        return target
    assert first is not None
    metrics.ROUTE_DECISIONS.labels("none", plan.rule, "exhausted").inc()
    raise with_fallbacks(first, failed[1:])


def with_fallbacks(err: LeafwireError, others: list[tuple[str, str]]) -> LeafwireError:
    """The first target's refusal, which names the fallbacks that refused too (the caller asked for it)."""
    if others:
        err.message = f"{err.message} (fallbacks refused too: {', '.join(f'{t} {w}' for t, w in others)})"
        err.args = (err.message,)
    return err
