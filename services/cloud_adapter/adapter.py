"""One cloud request from admission to its last event: resolve, budget, cache, call, relay, account.

Chat requests stream or answer whole, and may be cached; embeddings requests are one call answered by one
``result`` (no cache), accounted the same way: usage event, budgets, metrics.

Admission answers the forwarding router on the message's own reply subject, and only once the answer is
certain: at a cache hit, or at the provider's first byte (retries happen before that). So the router can
still try another target when a provider fails, before anything reached the caller. After admission the
answer goes straight to the caller's subject (``Lw-Reply``); a failure then ends it with an ``error`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from nats.aio.client import Client as NATS

from schemas.chat import ChatCompletionRequest, FinishReason, Usage, choice_seed
from schemas.cloud import BreakerState, BudgetStatus, ProviderHealth, ProviderRate, UsageEvent
from schemas.control import Admitted, Cancel, ModelInfo, ModelKind, WorkerHeartbeat
from schemas.embeddings import EmbeddingRequest
from services.cloud_adapter import cache, vector_cache
from services.cloud_adapter.breaker import Breaker
from services.cloud_adapter.budget import PERIODS, Ledger, Period
from services.cloud_adapter.config import ModelSpec, Provider, ProvidersFile
from services.cloud_adapter.dialect import (
    CHARS_PER_TOKEN,
    Choices,
    ChoicesIgnored,
    Completion,
    Delta,
    Fingerprint,
    Finish,
    Piece,
    Tokens,
    provider_fault,
)
from services.cloud_adapter.rate import Peers
from services.cloud_adapter.settings import CloudSettings
from services.cloud_adapter.state import CloudState
from services.cloud_adapter.upstream import Call, OpenStream, Upstream
from shared import metrics, paths, subjects
from shared.answer import Answer, merge_delta, message_deltas
from shared.envelope import CACHE, COST, EVENT, Envelope, money
from shared.errors import (
    Cancelled,
    ChoicesOneByOne,
    DeadlineExceeded,
    InvalidRequest,
    LeafwireError,
    ModelNotFound,
    Unavailable,
    renumber_inputs,
)
from shared.logging import get_logger
from shared.replies import Event, ReplyPublisher, keep_callers, publish_error
from shared.vectors import oversized

SERVICE = "cloud-adapter"
log = get_logger("leafwire.cloud_adapter")
BREAKER_CODES = {"closed": 0, "half_open": 1, "open": 2}
CACHE_HITS = metrics.CACHE_LOOKUPS.labels("hit")
CACHE_MISSES = metrics.CACHE_LOOKUPS.labels("miss")
SHUTDOWN = "the cloud adapter is shutting down"  # the message of a request's cancellation by the shutdown
REPLACED = "a router fell back to another target"  # ... by a fallback under the same id: its caller waits on


class EarlyCancels:
    """Cancels of requests this adapter does not hold: one that arrives after its cancel (held up at a busy
    router, or in a queue before the intake) is refused, not called and billed for nobody. Kept ``keep_s``
    to twice that, in two generations of at most ``limit`` each (no timer: turned when used); a cancel refuses
    one request (a NATS client asking again under the same id is answered)."""

    def __init__(self, keep_s: float = 30.0, limit: int = 10_000) -> None:
        self._keep_s, self._limit = keep_s, limit
        self._generations: tuple[set[tuple[str, str | None]], ...] = (set(), set())
        self._turn_at = time.monotonic() + keep_s

    def add(self, request_id: str, target: str | None) -> None:
        """Remember a cancel of ``request_id``'s answer by ``target`` (``None``: by any)."""
        self._turn()
        if len(self._generations[0]) < self._limit:
            self._generations[0].add((request_id, target))

    def take(self, request_id: str, target: str) -> bool:
        """Whether ``request_id``'s answer by ``target`` was cancelled (that cancel is used up)."""
        if not (self._generations[0] or self._generations[1]):
            return False
        self._turn()
        for generation in self._generations:
            for cancel in ((request_id, None), (request_id, target)):
                if cancel in generation:
                    generation.discard(cancel)
                    return True
        return False

    def _turn(self) -> None:
        if (now := time.monotonic()) >= self._turn_at:
            self._generations = (set(), self._generations[0])
            self._turn_at = now + self._keep_s


class Target:
    """A configured model of a configured provider, with its metric series bound once (not per request)."""

    def __init__(self, upstream: Upstream, model: str, spec: ModelSpec) -> None:
        self.upstream = upstream
        self.model = model
        self.spec = spec
        self.name = f"{upstream.name}/{model}"
        # What its cached answers depend on besides the request: the name asked, and where the calls go (the
        # upstream model, the provider's URL): a reload pointing the name elsewhere gets entries of its own.
        upstream_model = spec.upstream_name(model)
        self.cache_id = f"{self.name} {upstream_model} {upstream.provider.spec.url(upstream_model, spec.kind)}"
        labels = (upstream.name, model)
        self.first_byte = metrics.CLOUD_FIRST_BYTE.labels(*labels)
        self.duration = metrics.CLOUD_DURATION.labels(*labels)
        self.prompt_tokens = metrics.CLOUD_TOKENS.labels(*labels, "prompt")
        self.completion_tokens = metrics.CLOUD_TOKENS.labels(*labels, "completion")
        self.cost = metrics.CLOUD_COST.labels(*labels)
        self.requests = {o: metrics.CLOUD_REQUESTS.labels(*labels, o)
                         for o in ("ok", "cache_hit", "error", "cancelled", "refused")}


@dataclass
class Tally:
    """What an answer has produced so far: for usage, cost and the cache."""

    keep_message: bool
    message: dict[str, Any] = field(default_factory=dict)
    finish: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    written_tokens: int | None = None  # of the prompt, written to the provider's prompt cache
    written_1h_tokens: int | None = None  # of those, written for an hour
    searches: int | None = None  # web searches the provider ran
    chars: int = 0

    def add(self, piece: Piece) -> None:
        """Count one piece of a streamed answer."""
        if isinstance(piece, Delta):
            self.chars += written_chars(piece.fields)
            if self.keep_message:
                merge_delta(self.message, piece.fields)
        elif isinstance(piece, Finish):
            self.finish = piece.reason
        elif isinstance(piece, Tokens):
            self.prompt_tokens = piece.prompt if piece.prompt is not None else self.prompt_tokens
            self.completion_tokens = piece.completion if piece.completion is not None else self.completion_tokens
            self.cached_tokens = piece.cached if piece.cached is not None else self.cached_tokens
            self.reasoning_tokens = piece.reasoning if piece.reasoning is not None else self.reasoning_tokens
            self.written_tokens = piece.written if piece.written is not None else self.written_tokens
            self.written_1h_tokens = piece.written_1h if piece.written_1h is not None else self.written_1h_tokens
            self.searches = piece.searches if piece.searches is not None else self.searches

    def usage(self, request: ChatCompletionRequest) -> Usage:
        """Token usage as reported, or estimated (4 characters a token) where the provider gave none."""
        prompt = self.prompt_tokens
        if prompt is None:
            prompt = sum(len(m.text()) for m in request.messages) // CHARS_PER_TOKEN + 1
        completion = self.completion_tokens
        if completion is None:
            completion = -(-self.chars // CHARS_PER_TOKEN)
        return Usage.of(prompt, completion, cached=self.cached_tokens, reasoning=self.reasoning_tokens,
                        written=self.written_tokens)


def priced(target: Target, request: ChatCompletionRequest, tally: Tally) -> tuple[Usage, float]:
    """A call's usage (``Tally.usage``) and what it cost at the model's prices."""
    usage = tally.usage(request)
    return usage, target.spec.cost(usage.prompt_tokens, usage.completion_tokens, tally.cached_tokens or 0,
                                   tally.written_tokens or 0, tally.written_1h_tokens or 0, tally.searches or 0)


def choices_usage(request: ChatCompletionRequest, choices: Choices) -> Usage:
    """What a call of ``n`` choices counted, as reported, or estimated (4 characters a token) where the provider
    gave none: the prompt once, the completions of every choice."""
    prompt = choices.prompt_tokens
    if prompt is None:
        prompt = sum(len(m.text()) for m in request.messages) // CHARS_PER_TOKEN + 1
    completion = choices.completion_tokens
    if completion is None:
        completion = sum(-(-content_chars(c) // CHARS_PER_TOKEN) for c in choices.completions)
    return Usage.of(prompt, completion, cached=choices.cached_tokens, reasoning=choices.reasoning_tokens,
                    written=choices.written_tokens)


def written_chars(fields: Mapping[str, Any]) -> int:
    """Characters a model wrote in a message (or a delta of one): its text, its reasoning and its tool calls'
    names and arguments; what a provider that reports no usage is charged for (4 characters a token)."""
    count = sum(len(v) for key in ("content", "reasoning_content") if isinstance(v := fields.get(key), str))
    for call in fields.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            count += sum(len(v) for key in ("name", "arguments") if isinstance(v := function.get(key), str))
    return count


def content_chars(completion: Completion) -> int:
    """``written_chars`` of a whole answer's message."""
    return written_chars(completion.message)


def completion_shares(tokens: int, completions: list[Completion]) -> list[int]:
    """A call's completion tokens shared among its choices by the length of their text, adding up to it (what
    each choice's cache entry says it used)."""
    return cache.share_out(tokens, [max(content_chars(c), 1) for c in completions])


def asked_for(request: ChatCompletionRequest, missing: list[int]) -> ChatCompletionRequest:
    """The request of one call for the ``missing`` choices: all of them, or, when some were stored, as many,
    sampled from the first missing choice's seed (``seed + j``, as that choice asked alone would be) so the
    provider's first sample is not the stored choice 0 again."""
    if len(missing) == (request.n or 1):
        return request
    seed = {} if request.seed is None else {"seed": choice_seed(request.seed, missing[0])}
    return request.model_copy(update={"n": len(missing), **seed})


@dataclass
class Admission:
    """The one answer the router waits for: ``admitted``, or an error it can act on."""

    nc: NATS
    subject: str | None
    env: Envelope
    worker_id: str
    done: bool = False

    async def admit(self) -> None:
        """Tell the router the answer is certain and on its way."""
        if self.done:
            return
        self.done = True
        if self.subject:
            body = Admitted(worker_id=self.worker_id, request_id=self.env.request_id).model_dump_json().encode()
            await self.nc.publish(self.subject, body, headers={EVENT: Event.ADMITTED.value})

    async def refuse(self, err: LeafwireError, publisher: ReplyPublisher) -> None:
        """Tell the router (or, without one, the caller) why the request cannot be answered."""
        self.done = True
        if self.subject:
            await publish_error(self.nc, self.subject, self.env, err)
        else:
            await publisher.error(err)


async def answer_leaves() -> None:
    """Let the answer leave before the bookkeeping that follows it: a publish only queues the message for
    the connection's flusher, which runs once this task yields."""
    await asyncio.sleep(0)


class CloudAdapter:
    """The adapter's providers, ledger, state and the requests it is answering."""

    def __init__(self, settings: CloudSettings, config: ProvidersFile, providers: list[Provider]) -> None:
        self.settings = settings
        self.worker_id = f"ca-{uuid.uuid4().hex[:8]}"
        self.configured_at = paths.modified_at(settings.providers_file)  # its models' created, in /v1/models
        self.ledger = Ledger(config.budgets, settings.site)
        self.health_changed = asyncio.Event()
        self.peers = Peers(self.worker_id)  # the site's other adapters' minutes (rpm, tpm)
        self.upstreams = {p.spec.name: self._upstream(p) for p in providers}
        self.targets = self._targets()
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.answering: dict[str, str] = {}  # the target (provider/model) of each request in flight
        self.callers: dict[str, ReplyPublisher] = {}  # of the requests in flight: kept alive while they wait
        self.early_cancels = EarlyCancels()
        self._budget_series: tuple[set[tuple[str, Period]], set[tuple[str, Period]]] = (set(), set())  # spent, ratio
        self._background: set[asyncio.Task[None]] = set()
        self.nc: NATS | None = None
        self.state: CloudState | None = None

    def _upstream(self, provider: Provider) -> Upstream:
        return Upstream(provider, self.settings.retry_policy(), self._breaker(provider),
                        self.settings.max_response_bytes, self.settings.n_recheck_s, self.peers)

    def _targets(self) -> dict[str, Target]:
        return {f"{name}/{model}": Target(u, model, spec) for name, u in self.upstreams.items()
                for model, spec in u.provider.spec.models.items()}

    async def reconfigure(self, config: ProvidersFile, providers: list[Provider]) -> list[Upstream]:
        """Take a providers file read again: a provider whose entry and key are unchanged keeps its session,
        breaker and calls in flight; a new or changed one gets its own, opened here (a changed one keeps its
        minute's count of calls and tokens, against its new ``rpm`` and ``tpm``). Budgets take their new
        limits, spending kept. Returns the upstreams replaced or removed, still serving the calls they have
        in flight, for the caller to close once those have ended."""
        upstreams: dict[str, Upstream] = {}
        for provider in providers:
            old = self.upstreams.get(provider.spec.name)
            if old is not None and old.provider == provider:
                upstreams[provider.spec.name] = old
                continue
            upstreams[provider.spec.name] = new = self._upstream(provider)
            if old is not None:  # the same account (a key rotated, a limit changed): the minute's calls still count
                new.keep_minutes(old)
        fresh = [u for name, u in upstreams.items() if self.upstreams.get(name) is not u]
        for upstream in fresh:
            await upstream.start()
        retired = [u for name, u in self.upstreams.items() if upstreams.get(name) is not u]
        for name in self.upstreams.keys() - upstreams.keys():  # taken out: its breaker is no more (nor its alert)
            with contextlib.suppress(KeyError):
                metrics.BREAKER_STATE.remove(name)
        self.upstreams = upstreams
        self.targets = self._targets()
        self.ledger.configure(config.budgets)
        self.configured_at = paths.modified_at(self.settings.providers_file)
        self.health_changed.set()
        return retired

    def _breaker(self, provider: Provider) -> Breaker:
        metrics.BREAKER_STATE.labels(provider.spec.name).set(0)
        policy = replace(self.settings.breaker_policy(), **provider.spec.breaker.given())
        return Breaker(provider.spec.name, policy, on_change=self._breaker_changed)

    def resume_breaker(self, health: ProviderHealth) -> None:
        """At start: a provider whose breaker the ``provider-health`` bucket says is open (left by this
        adapter before a restart, or by another of the site) stays open until its probe time, instead of
        being called again at once."""
        upstream = self.upstreams.get(health.provider)
        if upstream is not None and upstream.breaker.resume(health):
            metrics.BREAKER_STATE.labels(health.provider).set(BREAKER_CODES[health.state.value])
            log.warning("provider breaker left open: kept open", provider=health.provider,
                        probe_in_s=round(upstream.breaker.retry_in(), 1))

    def _breaker_changed(self, breaker: Breaker) -> None:
        if (current := self.upstreams.get(breaker.provider)) is not None and current.breaker is not breaker:
            return  # a provider's breaker replaced by a reload, its last calls ending: not the provider's state
        metrics.BREAKER_STATE.labels(breaker.provider).set(BREAKER_CODES[breaker.state.value])
        metrics.BREAKER_TRANSITIONS.labels(breaker.provider, breaker.state.value).inc()
        log.warning("provider breaker changed", provider=breaker.provider, state=breaker.state.value,
                    consecutive_failures=breaker.consecutive_failures)
        self.health_changed.set()
        if breaker.state is BreakerState.OPEN:  # half-open on time: the router sends nothing to an open provider
            with contextlib.suppress(RuntimeError):  # no running loop (a breaker driven outside the service)
                asyncio.get_running_loop().call_later(breaker.retry_in() + 0.001, breaker.tick)

    def rate_tallies(self, again: bool = False) -> list[ProviderRate]:
        """This adapter's last minute of each provider with an rpm or tpm, where it changed since the last
        time, or (``again``) every one (for ``provider-rates``)."""
        return [rate for u in self.upstreams.values() for minute in u.minutes() if minute.limited
                and (rate := minute.tally(self.worker_id, again)) is not None]

    def healths(self) -> list[ProviderHealth]:
        """Every provider's breaker, as published to the ``provider-health`` bucket."""
        return [u.breaker.health() for u in self.upstreams.values()]

    # -- admission (in the NATS handler: errors go back to the router at once)

    def resolve(self, model: str, kind: ModelKind = "chat") -> Target:
        """The configured target of ``<provider>/<model>`` of that kind; 404 for anything else (no URL is ever
        taken from a request), saying so for a model of the other kind."""
        target = self.targets.get(model)
        if target is None:
            raise ModelNotFound(model)
        if target.spec.kind != kind:
            raise ModelNotFound.other_kind(model, target.spec.kind)
        return target

    def admit(self, request: ChatCompletionRequest | EmbeddingRequest, env: Envelope,
              kind: ModelKind = "chat") -> Target:
        """Check what can be checked without I/O; raise what the router should get."""
        target = self.resolve(request.model, kind)
        if (isinstance(request, ChatCompletionRequest) and (n := request.n or 1) > 1
                and not target.upstream.has_n(target.model, target.spec)):
            raise ChoicesOneByOne(n, target.name)
        if env.expired():
            raise DeadlineExceeded("the request's deadline passed before it reached the cloud adapter")
        if self.early_cancels.take(env.request_id, target.name):
            raise Cancelled("the request was cancelled before it reached the cloud adapter")
        if (held := self.answering.get(env.request_id)) == target.name:
            raise InvalidRequest(f"request id {env.request_id} is already being answered")
        if held is not None:  # a router fell back from it to this target: it gave that answer up (and said so)
            self.cancel(env.request_id, REPLACED)
        try:
            self.ledger.check(env.tenant)
        except LeafwireError:
            target.requests["refused"].inc()  # leafwire_rejected_requests_total: by the handler it reaches
            raise
        return target

    def start(self, answering: Coroutine[Any, Any, None], env: Envelope, target: Target) -> None:
        """Answer in the background (``serve`` or ``serve_embeddings``); the handler returns at once. The
        target's provider is held until the answer ends: a reload replacing it closes its session only then."""
        upstream = target.upstream
        upstream.hold()
        task = asyncio.create_task(answering)
        self.inflight[env.request_id] = task
        self.answering[env.request_id] = target.name

        def done(_: asyncio.Task[None]) -> None:
            if self.inflight.get(env.request_id) is task:  # not the answer of a fallback under the same id
                del self.inflight[env.request_id]
                del self.answering[env.request_id]
            upstream.unhold()

        task.add_done_callback(done)

    def cancel(self, request_id: str, why: str | None = None) -> bool:
        """Stop a request this adapter is answering (closing its provider connection)."""
        task = self.inflight.get(request_id)
        if task is None:
            return False
        task.cancel(why)
        return True

    def cancel_message(self, body: Cancel) -> bool:
        """A cancel from the site: stop the request's answer (by ``body.target``, when it names one); one this
        adapter does not hold (yet) is remembered, so that the request is refused if it comes."""
        held = self.answering.get(body.request_id)
        if held is not None and body.target in (None, held):
            return self.cancel(body.request_id)
        self.early_cancels.add(body.request_id, body.target)
        return False

    def _forget_caller(self, request_id: str, publisher: ReplyPublisher) -> None:
        if self.callers.get(request_id) is publisher:  # not the caller of a fallback under the same id
            del self.callers[request_id]

    async def keep_callers(self) -> None:
        """Tell each caller, every ``keepalive_s``, that its answer is still coming (a provider's first byte,
        a retry's backoff or a slow stream can be quiet for long); stop the calls nobody waits for."""
        await keep_callers(list(self.callers.values()), self.settings.keepalive_s, ReplyPublisher.ping,
                           self.caller_gone)

    def caller_gone(self, publisher: ReplyPublisher) -> None:
        """The caller no longer waits: stop its call (and close the provider connection)."""
        if self.cancel(publisher.request_id):
            metrics.CALLERS_GONE.labels(SERVICE).inc()
            log.info("caller gone: call stopped", request_id=publisher.request_id)

    # -- answering

    async def serve(self, target: Target, request: ChatCompletionRequest, env: Envelope,
                    admit_to: str | None) -> None:
        """The whole life of one request after admission checks."""
        assert self.nc is not None
        assert self.state is not None
        started = time.monotonic()
        key = cache.key(env.tenant, target.cache_id, request, env.choice) if cache.eligible(request) else None
        hit = await self._lookup(key)
        publisher = ReplyPublisher(self.nc, env.reply, env, f"{self.settings.site}/{self.worker_id}",
                                   first_headers={CACHE: "hit" if hit else "miss"} if key else None)
        admission = Admission(self.nc, admit_to, env, self.worker_id)
        answer = Answer.for_request(publisher, env.request_id, request.model, request)
        tally = Tally(keep_message=key is not None and request.stream)
        outcome = "error"
        self.callers[env.request_id] = publisher
        try:
            if hit is not None:  # the caller's answer first: the router only waits to know it was taken
                answer.fingerprint = hit.fingerprint
                if not request.stream:  # a whole answer's cost goes with it (a stream's is not known up front)
                    publisher.also_first({COST: "0"})
                await answer.whole(hit.message, hit.finish_reason, hit.usage)
                await admission.admit()
                outcome = "cache_hit"
                await answer_leaves()
                return
            await self._call(target, request, env, admission, answer, tally, started)
            outcome = "ok"
            await answer_leaves()
            if key and tally.finish in cache.STORED_REASONS:
                message = tally.message if request.stream else answer.message
                self.state.cache_put(key, cache.Entry(message, tally.finish or "stop", tally.usage(request),
                                                      answer.fingerprint))
        except BaseException as exc:
            outcome = await self._failed(exc, admission, publisher, target)
        finally:
            self._forget_caller(env.request_id, publisher)
            event = self._account(target, request, env, tally, outcome, time.monotonic() - started, hit)
            await self.state.publish_usage(event)

    async def serve_choices(self, target: Target, request: ChatCompletionRequest, env: Envelope,
                            admit_to: str | None) -> None:
        """A whole answer of ``n`` > 1 choices in one provider call (the prompt is paid once). With the cache,
        each choice is the entry a request of its own for it would have (``cache.choice_keys``): the choices
        stored are taken from there, and the call asks only for the others (none: no call)."""
        assert self.state is not None
        started, n = time.monotonic(), request.n or 1
        keys, held, missing, publisher, admission, answer = await self._choices_asked(target, request, env, admit_to)
        usage, paid, outcome, cost, asked = None, Usage.of(0, 0), "error", 0.0, False
        self.callers[env.request_id] = publisher
        try:
            whole: list[tuple[dict[str, Any], FinishReason, dict[str, Any] | None, int]] = [
                (e.message, e.finish_reason, None, e.usage.completion_tokens) if e else ({}, "stop", None, 0)
                for e in held]
            prompt = max((e.usage.prompt_tokens for e in held if e), default=0)
            details: dict[str, int | None] = {}
            if missing:
                asked = True
                try:
                    choices = await self._call_choices(target, request, env, missing)
                except ChoicesIgnored as exc:  # a provider without n: what it billed is paid, the choices asked apart
                    if exc.tokens is not None and exc.tokens.prompt is not None:
                        paid = Usage.of(exc.tokens.prompt, exc.tokens.completion or 0)
                        cost = target.spec.cost(paid.prompt_tokens, paid.completion_tokens)
                        self._charge(target, env.tenant, paid, cost)
                    raise ChoicesOneByOne(n, target.name, cost_usd=cost) from exc
                target.first_byte.observe(time.monotonic() - started)
                paid = choices_usage(request, choices)
                cost = target.spec.cost(paid.prompt_tokens, paid.completion_tokens, choices.cached_tokens or 0,
                                        choices.written_tokens or 0)
                self._charge(target, env.tenant, paid, cost)
                details = {"cached": choices.cached_tokens, "reasoning": choices.reasoning_tokens,
                           "written": choices.written_tokens}
                answer.fingerprint = choices.fingerprint
                shares = completion_shares(paid.completion_tokens, choices.completions)
                for j, choice, tokens in zip(missing, choices.completions, shares, strict=True):
                    whole[j] = (choice.message, choice.finish, choice.logprobs, tokens)
                prompt = paid.prompt_tokens
            usage = Usage.of(prompt, sum(tokens for *_, tokens in whole), **details)  # the prompt once: one call
            await admission.admit()
            publisher.also_first({COST: money(cost)})
            await publisher.send(Event.RESULT, answer.choices([(m, f, lp) for m, f, lp, _ in whole], usage))
            outcome = "ok" if missing else "cache_hit"
            await answer_leaves()
            for j, key in [(j, keys[j]) for j in missing] if keys else []:
                message, finish, _, tokens = whole[j]
                if finish in cache.STORED_REASONS:
                    self.state.cache_put(key, cache.Entry(message, finish, Usage.of(prompt, tokens),
                                                          answer.fingerprint))
        except BaseException as exc:
            outcome = await self._failed(exc, admission, publisher, target)
        finally:
            self._forget_caller(env.request_id, publisher)
            if outcome == "cancelled" and asked and not paid.prompt_tokens:  # the provider read the prompt: as serve
                paid = Tally(keep_message=False).usage(request)
                cost = target.spec.cost(paid.prompt_tokens, paid.completion_tokens)
                self._charge(target, env.tenant, paid, cost)
            counted = usage if outcome == "cache_hit" and usage else paid  # a hit: what it would have used, free
            event = self._usage_event(target, env, outcome, time.monotonic() - started, counted, cost,
                                      cached=outcome == "cache_hit")
            await self.state.publish_usage(event)

    async def serve_choices_stream(self, target: Target, request: ChatCompletionRequest, env: Envelope,
                                   admit_to: str | None) -> None:
        """A streamed answer of ``n`` > 1 choices in one provider call (the prompt is paid once), their chunks
        relayed as they come, each with its index. With the cache each choice is its own entry, as in
        ``serve_choices``: the stored ones are replayed, and one call streams the others (none stored: all of
        them; all stored: no call), each stored once it is complete."""
        assert self.state is not None
        started = time.monotonic()
        keys, held, missing, publisher, admission, answer = await self._choices_asked(target, request, env, admit_to)
        stored = [(j, entry) for j, entry in enumerate(held) if entry is not None]
        total = Tally(keep_message=False)  # the call's: its tokens, and its choices' text for an estimate
        fresh = [Tally(keep_message=keys is not None) for _ in missing]  # the choices the call streams
        outcome = "error"
        self.callers[env.request_id] = publisher
        try:
            if missing:
                await self._call_choices_stream(target, request, env, missing, admission, answer, total, fresh,
                                                stored, started)
            else:
                await self._replay_choices(stored, answer)
                await admission.admit()
            first = held[0].finish_reason if held[0] is not None else fresh[0].finish or "stop"  # choice 0's
            paid = total.usage(request) if missing else Usage.of(0, 0)
            prompt = paid.prompt_tokens if missing else max(e.usage.prompt_tokens for _, e in stored)
            await answer.end(first, Usage.of(prompt, paid.completion_tokens + sum(
                e.usage.completion_tokens for _, e in stored), cached=total.cached_tokens,
                reasoning=total.reasoning_tokens))
            outcome = "ok" if missing else "cache_hit"
            await answer_leaves()
            if keys and missing:
                self._store_choices([keys[j] for j in missing], fresh, paid, answer.fingerprint)
        except BaseException as exc:
            outcome = await self._failed(exc, admission, publisher, target)
        finally:
            self._forget_caller(env.request_id, publisher)
            elapsed = time.monotonic() - started
            if outcome == "cache_hit":
                usage = Usage.of(max(e.usage.prompt_tokens for _, e in stored),
                                 sum(e.usage.completion_tokens for _, e in stored))
                event = self._usage_event(target, env, outcome, elapsed, usage, 0.0, cached=True)
            else:
                event = self._account(target, request, env, total, outcome, elapsed, None)
            await self.state.publish_usage(event)

    async def _choices_asked(self, target: Target, request: ChatCompletionRequest, env: Envelope,
                             admit_to: str | None) -> tuple[list[str] | None, list[cache.Entry | None], list[int],
                                                            ReplyPublisher, Admission, Answer]:
        """What a request of ``n`` choices starts from: the cache key of each choice (``None``: the request
        does not use the cache), the entry stored for each, the indexes of the choices missing, and its
        publisher (saying ``hit``, ``miss`` or ``partial``), admission and answer."""
        assert self.nc is not None
        n = request.n or 1
        keys = cache.choice_keys(env.tenant, target.cache_id, request) if cache.eligible(request) else None
        held: list[cache.Entry | None] = (list(await asyncio.gather(*(self._lookup(key) for key in keys))) if keys
                                          else [None] * n)
        missing = [j for j, entry in enumerate(held) if entry is None]
        found = "miss" if len(missing) == n else "hit" if not missing else "partial"
        publisher = ReplyPublisher(self.nc, env.reply, env, f"{self.settings.site}/{self.worker_id}",
                                   first_headers={CACHE: found} if keys else None)
        admission = Admission(self.nc, admit_to, env, self.worker_id)
        answer = Answer.for_request(publisher, env.request_id, request.model, request)
        answer.fingerprint = next((e.fingerprint for e in held if e is not None and e.fingerprint), None)
        return keys, held, missing, publisher, admission, answer

    @staticmethod
    async def _replay_choices(stored: list[tuple[int, cache.Entry]], answer: Answer) -> None:
        """Stream stored choices, one after the other, each at its index."""
        for j, entry in stored:
            await answer.choice_delta(j, {})
            for fields in message_deltas(entry.message):
                await answer.choice_delta(j, fields)
            await answer.choice_finish(j, entry.finish_reason)

    async def _call_choices_stream(self, target: Target, request: ChatCompletionRequest, env: Envelope,
                                   missing: list[int], admission: Admission, answer: Answer, total: Tally,
                                   fresh: list[Tally], stored: list[tuple[int, cache.Entry]], started: float) -> None:
        """One streamed call for the ``missing`` choices (``asked_for``), admitted once
        every one has begun; then the ``stored`` choices are replayed and the call's relayed, each of its
        choices at its index in the answer (a choice the provider ended without a finish reason: ``stop``)."""
        with target.upstream.slot(target.model):
            call = target.upstream.call(asked_for(request, missing), target.model, target.spec, env.deadline)
            try:
                opened = await target.upstream.open_choices_stream(call, len(missing))
            except ChoicesIgnored as exc:  # a provider without n: what it billed is paid, the choices asked apart
                if exc.tokens is not None:
                    total.add(exc.tokens)
                raise ChoicesOneByOne(request.n or 1, target.name) from exc
            target.first_byte.observe(time.monotonic() - started)

            async def admit() -> None:
                await admission.admit()
                await self._replay_choices(stored, answer)

            await self._relay_opened(opened, admit, lambda piece: self._apply_choice(piece, answer, total, fresh,
                                                                                      missing))
        for j, choice in zip(missing, fresh, strict=True):
            if choice.finish is None:
                await answer.choice_finish(j, "stop")

    @staticmethod
    async def _apply_choice(piece: Piece, answer: Answer, total: Tally, fresh: list[Tally],
                            missing: list[int]) -> None:
        """One piece of the call: choice ``k`` of the call is choice ``missing[k]`` of the answer."""
        total.add(piece)
        if isinstance(piece, Delta):
            fresh[piece.index].add(piece)
            await answer.choice_delta(missing[piece.index], piece.fields, piece.logprobs)
        elif isinstance(piece, Finish):
            fresh[piece.index].add(piece)
            await answer.choice_finish(missing[piece.index], piece.reason)
        elif isinstance(piece, Fingerprint):
            answer.fingerprint = piece.value

    def _store_choices(self, keys: list[str], choices: list[Tally], usage: Usage, fingerprint: str | None) -> None:
        """Each finished choice of a streamed call as the cache entry of its own request (its share of the
        call's completion tokens by the length of its text)."""
        assert self.state is not None
        shares = cache.share_out(usage.completion_tokens, [max(c.chars, 1) for c in choices])
        for key, choice, tokens in zip(keys, choices, shares, strict=True):
            if choice.finish in cache.STORED_REASONS:
                self.state.cache_put(key, cache.Entry(choice.message, choice.finish or "stop",
                                                      Usage.of(usage.prompt_tokens, tokens), fingerprint))

    @staticmethod
    async def _call_choices(target: Target, request: ChatCompletionRequest, env: Envelope,
                            missing: list[int]) -> Choices:
        """One call for the ``missing`` choices (``asked_for``)."""
        with target.upstream.slot(target.model):
            call = target.upstream.call(asked_for(request, missing), target.model, target.spec, env.deadline)
            return await target.upstream.complete_choices(call, len(missing))

    async def serve_embeddings(self, target: Target, request: EmbeddingRequest, env: Envelope,
                               admit_to: str | None) -> None:
        """The whole life of one embeddings request after admission checks: the vectors stored for its inputs
        (``vector_cache``), one call for the others, one ``result``."""
        assert self.nc is not None
        assert self.state is not None
        started = time.monotonic()
        keys = vector_cache.keys(env.tenant, target.cache_id, request) if vector_cache.eligible(request) else None
        stored: list[vector_cache.Vector | None] = (await self._stored_vectors(keys) if keys
                                                    else [None] * request.count())
        missing = [i for i, vector in enumerate(stored) if vector is None]
        found = "miss" if len(missing) == len(stored) else "hit" if not missing else "partial"
        publisher = ReplyPublisher(self.nc, env.reply, env, f"{self.settings.site}/{self.worker_id}",
                                   first_headers={CACHE: found} if keys else None)
        admission = Admission(self.nc, admit_to, env, self.worker_id)
        tokens: int | None = None
        outcome = "error"
        self.callers[env.request_id] = publisher
        try:
            if missing:
                answer, tokens = await self._embed(target, request, env, keys, stored, missing, started)
            else:
                answer = vector_cache.answer(stored, request.model)
            if (too_large := oversized(answer, self.nc.max_payload, request)) is not None:
                raise too_large
            await admission.admit()
            publisher.also_first({COST: money(target.spec.cost(tokens or 0, 0) if missing else 0.0)})
            await publisher.send(Event.RESULT, answer)
            outcome = "ok" if missing else "cache_hit"
            await answer_leaves()
        except BaseException as exc:
            outcome = await self._failed(exc, admission, publisher, target)
        finally:
            self._forget_caller(env.request_id, publisher)
            event = self._account_embeddings(target, env, tokens, outcome, time.monotonic() - started, stored)
            await self.state.publish_usage(event)

    async def _embed(self, target: Target, request: EmbeddingRequest, env: Envelope, keys: list[str] | None,
                     stored: list[vector_cache.Vector | None], missing: list[int],
                     started: float) -> tuple[bytes, int]:
        """Call the provider for the ``missing`` inputs; the whole answer, with the stored vectors in their
        places, and the tokens the provider counted (paid for, whether or not the answer can be sent)."""
        assert self.state is not None
        items = vector_cache.inputs(request)
        first = {keys[i]: i for i in reversed(missing)} if keys else {}  # an input given twice is asked once
        sent = sorted(first.values()) if keys else missing
        asked = request if len(sent) == len(items) else request.model_copy(update={"input": [items[i] for i in sent]})
        with target.upstream.slot(target.model):
            call = target.upstream.embeddings_call(asked, target.model, target.spec, env.deadline)
            try:
                vectors = await target.upstream.embed(call)
            except LeafwireError as err:  # an input the provider names, numbered among those it was sent
                if len(sent) < len(items):
                    err.message = renumber_inputs(err.message, lambda i: sent[i] if i < len(sent) else i)
                raise
        target.first_byte.observe(time.monotonic() - started)
        if keys is None:
            return vectors.answer, vectors.prompt_tokens
        new = {keys[i]: vector_cache.Vector(embedding, tokens) for i, embedding, tokens in
               zip(sent, vectors.embeddings, vector_cache.shares(vectors.prompt_tokens, [items[i] for i in sent]),
                   strict=True)}
        self.state.vectors_put(list(new.items()))
        if len(sent) == len(items):
            return vectors.answer, vectors.prompt_tokens
        whole = list(stored)
        for i in missing:
            whole[i] = new[keys[i]]
        return vector_cache.answer(whole, request.model), vectors.prompt_tokens

    async def _stored_vectors(self, keys: list[str]) -> list[vector_cache.Vector | None]:
        """The stored vector of each input, counted as cache lookups one by one."""
        assert self.state is not None
        stored = await self.state.vectors_get(keys)
        hits = sum(v is not None for v in stored)
        CACHE_HITS.inc(hits)
        CACHE_MISSES.inc(len(stored) - hits)
        return stored

    async def _lookup(self, key: str | None) -> cache.Entry | None:
        """The cached answer of a request that may use the cache."""
        if key is None:
            return None
        assert self.state is not None
        hit = await self.state.cache_get(key)
        (CACHE_HITS if hit else CACHE_MISSES).inc()
        return hit

    async def _call(self, target: Target, request: ChatCompletionRequest, env: Envelope, admission: Admission,
                    answer: Answer, tally: Tally, started: float) -> None:
        """Call the provider in one of its concurrent-call slots and relay the answer."""
        with target.upstream.slot(target.model):
            call = target.upstream.call(request, target.model, target.spec, env.deadline)
            if request.stream:
                await self._relay_stream(target, call, admission, answer, tally, started)
            else:
                await self._relay_whole(target, call, admission, answer, tally, started)

    async def _relay_stream(self, target: Target, call: Call[ChatCompletionRequest], admission: Admission,
                            answer: Answer, tally: Tally, started: float) -> None:
        opened = await target.upstream.open_stream(call)
        target.first_byte.observe(time.monotonic() - started)
        await self._relay_opened(opened, admission.admit, lambda piece: self._apply(piece, answer, tally))
        await answer.finish(tally.finish or "stop", tally.usage(call.request))

    @staticmethod
    async def _relay_opened(opened: OpenStream, admit: Callable[[], Awaitable[None]],
                            apply: Callable[[Piece], Awaitable[None]]) -> None:
        """Admit the request, then ``apply`` every piece of an opened stream; give its connection back with the
        breaker's verdict: a success, the provider's fault, or none (the caller left, say)."""
        verdict: bool | None = None
        try:
            await admit()
            for piece in opened.first:
                await apply(piece)
            async for piece in opened.rest():
                await apply(piece)
            verdict = True
        except LeafwireError as err:
            verdict = False if provider_fault(err) else None
            raise
        finally:
            opened.close(verdict)

    @staticmethod
    async def _apply(piece: Piece, answer: Answer, tally: Tally) -> None:
        tally.add(piece)
        if isinstance(piece, Delta):
            await answer.delta(piece.fields, piece.logprobs)
        elif isinstance(piece, Fingerprint):
            answer.fingerprint = piece.value

    async def _relay_whole(self, target: Target, call: Call[ChatCompletionRequest], admission: Admission,
                           answer: Answer, tally: Tally, started: float) -> None:
        completion = await target.upstream.complete(call)
        target.first_byte.observe(time.monotonic() - started)
        tally.finish = completion.finish
        tally.prompt_tokens, tally.completion_tokens = completion.prompt_tokens, completion.completion_tokens
        tally.cached_tokens, tally.reasoning_tokens = completion.cached_tokens, completion.reasoning_tokens
        tally.written_tokens, tally.written_1h_tokens = completion.written_tokens, completion.written_1h_tokens
        tally.searches = completion.searches
        tally.chars = content_chars(completion)
        await admission.admit()
        answer.fingerprint = completion.fingerprint
        usage, cost = priced(target, call.request, tally)
        answer.publisher.also_first({COST: money(cost)})
        await answer.whole(completion.message, completion.finish, usage, completion.logprobs)

    async def _failed(self, exc: BaseException, admission: Admission, publisher: ReplyPublisher,
                      target: Target) -> str:
        """Tell whoever waits why a request ended without its whole answer; the request's outcome."""
        if isinstance(exc, asyncio.CancelledError):
            if exc.args == (SHUTDOWN,):  # not the caller's doing: told so, whole answer or stream, to ask again
                await self._fail(Unavailable(f"{SHUTDOWN}; send the request again", retry_after=1,
                                             code="shutting_down"), admission, publisher, target)
            elif exc.args != (REPLACED,):  # (the fallback answers the caller) a stream begun ends with a 499 event
                await self._fail(Cancelled("the request was cancelled"), admission, publisher, target)
            return "cancelled"
        if not isinstance(exc, Exception):
            raise exc
        if not isinstance(exc, LeafwireError):
            log.error("cloud request crashed", provider=target.upstream.name, model=target.model, exc_info=exc)
            exc = LeafwireError(f"internal error in the cloud adapter: {type(exc).__name__}")
        await self._fail(exc, admission, publisher, target)
        return "error"

    async def _fail(self, err: LeafwireError, admission: Admission, publisher: ReplyPublisher,
                    target: Target) -> None:
        log.info("cloud request failed", provider=target.upstream.name, model=target.model, status=err.status,
                 code=err.code, error=err.message, after_first_byte=admission.done)
        if admission.done:
            await publisher.error(err)
        else:
            await admission.refuse(err, publisher)

    def _account(self, target: Target, request: ChatCompletionRequest, env: Envelope, tally: Tally,
                 outcome: str, elapsed: float, hit: cache.Entry | None) -> UsageEvent:
        """Metrics and the ledger of a finished chat request; its usage event."""
        if hit is not None:
            usage, cost = hit.usage, 0.0
        elif outcome == "error" and tally.prompt_tokens is None and tally.chars == 0:
            usage, cost = Usage.of(0, 0), 0.0  # nothing reached us: nothing to bill
        else:
            usage, cost = priced(target, request, tally)
            self._charge(target, env.tenant, usage, cost)
        return self._usage_event(target, env, outcome, elapsed, usage, cost, cached=hit is not None)

    def _account_embeddings(self, target: Target, env: Envelope, tokens: int | None, outcome: str,
                            elapsed: float, stored: list[vector_cache.Vector | None]) -> UsageEvent:
        """Metrics and the ledger of a finished embeddings request (``tokens``: what the provider read, if
        it answered); its usage event. Embeddings have no output tokens. Answered from the cache alone, the
        event has the tokens its inputs counted for and costs nothing, as a cached chat answer's."""
        if outcome == "cache_hit":
            usage = Usage.of(sum(v.tokens for v in stored if v is not None), 0)
            return self._usage_event(target, env, outcome, elapsed, usage, 0.0, cached=True)
        usage = Usage.of(tokens or 0, 0)
        cost = target.spec.cost(usage.prompt_tokens, 0)
        if tokens is not None:
            self._charge(target, env.tenant, usage, cost)
        return self._usage_event(target, env, outcome, elapsed, usage, cost, cached=False)

    def _charge(self, target: Target, tenant: str, usage: Usage, cost: float) -> None:
        """Count what a call used and cost, and charge it to the tenant's and the global budgets."""
        target.prompt_tokens.inc(usage.prompt_tokens)
        target.completion_tokens.inc(usage.completion_tokens)
        target.cost.inc(cost)
        self.ledger.charge(tenant, cost)
        target.upstream.used(target.model, usage.prompt_tokens + usage.completion_tokens)

    def _usage_event(self, target: Target, env: Envelope, outcome: str, elapsed: float, usage: Usage, cost: float,
                     cached: bool) -> UsageEvent:
        """Count a finished request by its outcome and latency; its usage event."""
        target.requests[outcome].inc()
        target.duration.observe(elapsed)
        log.debug("cloud request done", target=target.name, outcome=outcome, prompt_tokens=usage.prompt_tokens,
                  completion_tokens=usage.completion_tokens, cost_usd=cost, latency_s=round(elapsed, 4))
        return UsageEvent(request_id=env.request_id, tenant=env.tenant, site=self.settings.site,
                          target=target.name, prompt_tokens=usage.prompt_tokens,
                          completion_tokens=usage.completion_tokens, cost_usd=cost, cached=cached,
                          outcome="ok" if outcome in ("ok", "cache_hit") else outcome,
                          latency_s=elapsed, variant=env.variant)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- budgets, heartbeats, life cycle

    def budget_alert(self, status: BudgetStatus) -> None:
        """A budget crossed its warning level or was spent: metric, log, event on the ``USAGE`` stream."""
        kind = "global" if status.scope == subjects.GLOBAL_SCOPE else "tenant"
        metrics.BUDGET_WARNINGS.labels(kind, status.period, status.state).inc()
        log.warning("budget level crossed", scope=status.scope, period=status.period, state=status.state,
                    spent_usd=round(status.spent_usd, 6), limit_usd=status.limit_usd)
        if self.state is not None:
            self._spawn(self.state.publish_budget_alert(status))

    def budget_metrics(self) -> None:
        """Gauges of the global budget and of tenants named in the providers file (bounded labels), in the
        current windows (a new day shows its own spending at once). A scope no longer named, or a limit taken
        out by a reload, loses its series: an alert on the ratio stops."""
        named = {subjects.GLOBAL_SCOPE} | {subjects.tenant_scope(t) for t in self.ledger.budgets.tenants}
        spent, used = {(scope, period) for scope in named for period in PERIODS}, set()
        for scope, period in spent:
            acct = self.ledger.account(scope, period)
            metrics.BUDGET_SPENT.labels(scope, period).set(acct.spent)
            if acct.limit:
                metrics.BUDGET_USED.labels(scope, period).set(acct.spent / acct.limit)
                used.add((scope, period))
        for gauge, before, now in ((metrics.BUDGET_SPENT, self._budget_series[0], spent),
                                   (metrics.BUDGET_USED, self._budget_series[1], used)):
            for labels in before - now:
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        self._budget_series = (spent, used)

    def heartbeat(self) -> WorkerHeartbeat:
        """The cloud models this adapter can call (providers with their key), for routers' catalogs."""
        models = [ModelInfo(name=f"{name}/{model}", context_length=spec.context_length, kind=spec.kind,
                            created=self.configured_at)
                  for name, u in self.upstreams.items() if u.provider.missing_key is None
                  for model, spec in u.provider.spec.models.items()]
        return WorkerHeartbeat(worker_id=self.worker_id, service=SERVICE, site=self.settings.site, models=models,
                               cloud_models=self._configured("chat"), cloud_embeddings=self._configured("embeddings"),
                               inflight=len(self.inflight),
                               uplink_free=sorted(n for n, t in self.targets.items() if t.upstream.provider.spec.local),
                               capacity=sum(u.provider.spec.max_concurrent for u in self.upstreams.values()) or 1,
                               interval_s=self.settings.heartbeat_s)

    def _configured(self, kind: ModelKind) -> list[str]:
        """Every ``<provider>/<model>`` of that kind, its provider's key set or not."""
        return sorted(name for name, target in self.targets.items() if target.spec.kind == kind)

    def retire(self, upstream: Upstream) -> None:
        """Close a provider's session replaced by a reload once the requests admitted for it have ended (or
        could not go on: its total timeout)."""
        async def close_when_idle() -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(upstream.provider.spec.timeouts.total_s + 5):
                    await upstream.idle.wait()
            await upstream.close()

        self._spawn(close_when_idle())

    async def open_upstreams(self) -> None:
        """Open every provider's session."""
        for upstream in self.upstreams.values():
            await upstream.start()

    async def close_upstreams(self) -> None:
        """Close every provider's session."""
        for upstream in self.upstreams.values():
            await upstream.close()

    async def wait_for_answers(self, grace_s: float) -> None:
        """On shutdown: let answers in flight finish (up to ``grace_s``), then end what is left, each caller
        told (a 503 ``shutting_down``, or an error event ending its stream) so that it asks again."""
        if self.inflight:
            _, pending = await asyncio.wait(set(self.inflight.values()), timeout=grace_s)
            for task in pending:
                task.cancel(SHUTDOWN)
            if pending:
                await asyncio.wait(pending, timeout=2)
        if self._background:
            await asyncio.wait(set(self._background), timeout=2)
