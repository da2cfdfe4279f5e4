"""Handing a request to its targets in order, falling back until one takes it.

A target "takes" a request when it answers ``admitted``: a local worker (or batcher) once it queued the
row, a cloud adapter once the provider's first byte arrived. Until then nothing has reached the client,
so a refusal (busy, unavailable, over budget, context too small...) moves on to the next target. After
admission the answer streams straight to the caller and any later failure ends it with an error event.

A cloud target with nothing after it in the chain is not waited for: with no fallback, its refusal would
only be passed on to the caller, so the request is *handed off* (``Lw-Handoff``) and the adapter answers
the caller for everything, refusals included. That saves the admission message and a waiting task per
request. Only NATS's no-responders status (no adapter runs) still comes back to the router (``Handoffs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter, deque
from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from schemas.chat import ChatCompletionRequest
from schemas.control import Cancel, ModelKind
from services.router.decide import UPLINK_RETRY_S, Plan, is_cloud
from services.router.settings import RouterSettings
from services.router.state import LiveState
from shared import metrics, subjects
from shared.envelope import EVENT, HANDOFF, Envelope
from shared.errors import Cancelled, ChoicesOneByOne, DeadlineExceeded, LeafwireError, NotBatched, Unavailable
from shared.logging import get_logger
from shared.replies import Event, error_of, publish_error

log = get_logger("leafwire.router")

# refusals that say nothing of the next target: its context may be larger, it may exist, its budget may
# allow it, it may honour the parameter (an Anthropic model refuses JSON mode, an OpenAI one takes it)
FALLBACK_CODES = frozenset({"context_length_exceeded", "model_not_found", "budget_exceeded",
                            "unsupported_parameter"})
NO_CLOUD_ADAPTER = "no cloud adapter is running right now"
NO_RESPONDERS = "503"  # the Status header of NATS's no-responders message


def env_site(subject: str) -> str:
    """The site token of a ``lw.v1.<site>....`` subject."""
    return subject.split(".", 3)[2]


def falls_back(err: LeafwireError) -> bool:
    """Whether the next target may succeed where this one failed: not for malformed requests, nor for a
    request cancelled on its way (its caller left, or asked to stop it)."""
    if err.status == Cancelled.status:
        return False
    return err.status >= 429 or err.code in FALLBACK_CODES


async def admit(nc: NATS, subject: str, payload: bytes, env: Envelope, wait_s: float, target: str) -> None:
    """Offer a request for ``target`` on ``subject`` and wait until it is taken; raise the refusal.

    ``NoRespondersError`` (nobody listens) is left to the caller, which knows what that means.
    """
    remaining = env.remaining()
    if remaining <= 0:  # nobody can answer it in time: not a 503 to retry with the same deadline
        raise DeadlineExceeded("The request's deadline (Lw-Deadline) passed before it could be offered to a target.")
    timeout = min(wait_s, remaining)
    try:
        reply = await nc.request(subject, payload, timeout=timeout, headers=env.headers())
    except (NatsTimeout, TimeoutError) as exc:
        # Whoever got it may still take it later and answer the caller beside the next target: stop it.
        # The cancel names the target: the next one may be on the same service, under the same request id.
        cancel = Cancel(request_id=env.request_id, target=target, reason="not taken in time")
        await nc.publish(subjects.cancel(env_site(subject)), cancel.model_dump_json().encode())
        raise Unavailable(f"nobody took the request within {timeout:.1f} s", retry_after=2) from exc
    headers = reply.headers or {}
    if headers.get(EVENT) == Event.ERROR.value:
        raise error_of(headers, reply.data)


async def offer_local(nc: NATS, settings: RouterSettings, model: str, kind: ModelKind, payload: bytes,
                      env: Envelope) -> None:
    """Queue at the site's batcher; with no batcher (or one that cannot batch it), go to a worker directly."""
    try:
        await admit(nc, subjects.batch(settings.site, model, kind), payload, env, settings.admission_timeout_s, model)
        return
    except NoRespondersError:
        pass  # no batcher on this site
    except LeafwireError as err:
        if err.code != NotBatched.default_code:
            raise
    direct = subjects.infer_chat if kind == "chat" else subjects.infer_embeddings
    try:
        await admit(nc, direct(settings.site, model), payload, env, settings.admission_timeout_s, model)
    except NoRespondersError as exc:
        raise Unavailable(f"no worker for model '{model}' is running right now", retry_after=2) from exc


async def offer(nc: NATS, settings: RouterSettings, target: str, payload: bytes, env: Envelope,
                lost: asyncio.Future[None] | None = None, cloud_site: str | None = None) -> None:
    """Ask ``target`` to take a chat request; raise the error it (or its absence) amounts to. A cloud
    target's wait also ends when ``lost`` is done: the uplink its answer comes across went down. A cloud
    target is asked on ``cloud_site``'s subject (``LiveState.cloud_site``; the router's own by default)."""
    if not is_cloud(target):
        await offer_local(nc, settings, target, "chat", payload, env)
        return
    admitting = admit(nc, subjects.cloud_chat(cloud_site or settings.site), payload, env,
                      settings.cloud_admission_timeout_s, target)
    try:
        if lost is None:
            await admitting
        else:
            await unless_lost(nc, admitting, lost, env, target, settings.site)
    except NoRespondersError as exc:
        raise Unavailable(NO_CLOUD_ADAPTER, retry_after=2) from exc


async def unless_lost(nc: NATS, admitting: Coroutine[Any, Any, None], lost: asyncio.Future[None], env: Envelope,
                      target: str, site: str) -> None:
    """Wait for a cloud admission that comes across the uplink, until the uplink goes down (``lost``): then
    the adapter's answer cannot come (nor its keep-alives: the caller's gateway would give up), so it is
    cancelled (for when the link comes back) and the chain goes on to its next target, a local model say."""
    task = asyncio.ensure_future(admitting)
    try:
        await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    cancel = Cancel(request_id=env.request_id, target=target, reason="the uplink went down")
    await nc.publish(subjects.cancel(site), cancel.model_dump_json().encode())
    raise Unavailable(f"the uplink went down while {target} was answering", retry_after=UPLINK_RETRY_S,
                      code="uplink_down")


class Handoffs:
    """Requests handed to a target without waiting for its admission, until NATS could have said nobody
    listens.

    A handed-off message's reply subject is this router's hand-off inbox, used by nothing but NATS's
    no-responders status (the target answers the caller, ``Lw-Handoff``). That status comes back within a
    millisecond or so; a request is remembered for ``generation_s`` to twice that, in generations dropped
    whole (no timer per request). A status for a remembered request answers its caller with a 503.
    """

    def __init__(self, nc: NATS, generation_s: float = 1.0) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._tokens = itertools.count()
        self._generation_s = generation_s
        self._recent: deque[dict[str, tuple[Envelope, str]]] = deque([{}, {}], maxlen=2)
        self._sub: Subscription | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Listen for no-responders statuses; start the generations."""
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_status)
        self._turn()

    async def stop(self) -> None:
        """Forget every hand-off (the service is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def _turn(self) -> None:
        self._recent.append({})
        self._timer = asyncio.get_running_loop().call_later(self._generation_s, self._turn)

    def __len__(self) -> int:
        return sum(len(g) for g in self._recent)

    async def hand(self, subject: str, payload: bytes, env: Envelope, rule: str) -> None:
        """Publish ``payload`` to ``subject`` for its subscribers to answer the caller of ``env``."""
        token = format(next(self._tokens), "x")
        self._recent[-1][token] = (env, rule)
        headers = env.headers()
        headers[HANDOFF] = "1"
        await self._nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=headers)

    async def _on_status(self, msg: Msg) -> None:
        if (msg.headers or {}).get("Status") != NO_RESPONDERS:
            return
        token = msg.subject.rpartition(".")[2]
        for generation in self._recent:
            entry = generation.pop(token, None)
            if entry is not None:
                env, rule = entry
                metrics.ROUTE_DECISIONS.labels("cloud", rule, "no_responders").inc()
                log.warning("handed-off request had no taker", request_id=env.request_id)
                await publish_error(self._nc, env.reply, env, Unavailable(NO_CLOUD_ADAPTER, retry_after=2))
                return


def count_masked(masked: Counter[str]) -> None:
    """Count what masking replaced in a request leaving for a cloud-adapter (taken or not)."""
    for pattern, n in masked.items():
        metrics.MASKED.labels(pattern).inc(n)


async def hand_off(handoffs: Handoffs, subject: str, payload: bytes, env: Envelope, plan: Plan, target: str,
                   masked: Counter[str]) -> None:
    """Hand the request for ``target``, the plan's only one, to the cloud-adapters on ``subject``."""
    await handoffs.hand(subject, payload, env.with_route(plan.header(target)), plan.rule)
    metrics.child(metrics.ROUTE_DECISIONS, "cloud", plan.rule, "handed_off").inc()
    log.info("handed off", target=target, rule=plan.rule, variant=plan.variant, masked=sum(masked.values()))


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
                    request: ChatCompletionRequest, env: Envelope, raw: bytes | None = None,
                    handoffs: Handoffs | None = None, skip: str | None = None) -> str:
    """Offer the request to each target of the plan until one takes it; return the target that did.

    ``raw`` is the request as it arrived, forwarded as is to a target that needs no change of it. With
    ``handoffs``, a lone cloud target is handed off instead of offered (see the module doc). ``skip`` (the
    ``Lw-Skip`` header) names targets that refused this request already: passed over, unless they are all
    the chain has."""
    failed: list[tuple[str, str]] = []
    passed_over: list[tuple[str, str]] = []  # skipped: they refused this request already (route header)
    first: LeafwireError | None = None
    chain = plan.chain
    if skip:
        named = {t.strip() for t in skip.split(",")}
        if rest := [t for t in chain if t not in named]:
            passed_over = [(t, "it refused the request of every choice") for t in chain if t in named]
            chain = tuple(rest)
    for target in chain:
        if (request.n or 1) > 1 and not is_cloud(target):  # routed as one choice would be, then asked one by one
            raise ChoicesOneByOne(request.n or 1, f"local model {target}", tuple(t for t, _ in failed))
        payload, masked = prepare(state, request, target, raw)
        count_masked(masked)
        if handoffs is not None and len(chain) == 1 and is_cloud(target):  # the first target: none failed
            await hand_off(handoffs, subjects.cloud_chat(state.cloud_site(target)), payload, env, plan, target,
                           masked)
            return target
        try:
            lost = (state.uplink_lost() if settings.probes_uplink and is_cloud(target) and state.needs_uplink(target)
                    else None)
            await offer(nc, settings, target, payload, env.with_route(plan.header(target, passed_over + failed)),
                        lost, state.cloud_site(target) if is_cloud(target) else None)
        except LeafwireError as err:
            if err.code == ChoicesOneByOne.default_code:  # a cloud model answering a choice a request (no n)
                raise ChoicesOneByOne(request.n or 1, target, tuple(t for t, _ in failed), err.cost_usd) from None
            kind = "cloud" if is_cloud(target) else "local"
            if not falls_back(err):
                metrics.ROUTE_DECISIONS.labels(kind, plan.rule, "refused").inc()
                raise
            metrics.ROUTE_FALLBACKS.labels(kind, str(err.status)).inc()
            log.info("target refused; falling back", target=target, status=err.status, error=err.message)
            failed.append((target, f"{err.status} {err.code or err.type}"))
            first = first or err
            continue
        metrics.child(metrics.ROUTE_DECISIONS, "cloud" if is_cloud(target) else "local", plan.rule,
                      "admitted").inc()
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
