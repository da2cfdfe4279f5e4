"""Calling one provider over HTTP: a pooled session, timeouts, retries and the circuit breaker.

One ``aiohttp`` session per provider (connections limited to the provider's ``max_concurrent``,
keep-alive, DNS cache, no proxy from the environment, redirects never followed, private destinations
refused unless the provider is local). Each try has its own connect and first-byte timeout; the whole
call (every try and the streamed answer) must end within the provider's ``total_s`` and the request's
deadline, whichever comes first.

Until the first byte of an answer, a failed try is retried when the failure is retryable (see
``dialect.classify``), the retry policy allows another try, the wait fits in the time left, and the
breaker lets calls through. After the first byte nothing is retried: the failure ends the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import aiohttp

from schemas.chat import ChatCompletionRequest
from schemas.cloud import BreakerState
from schemas.embeddings import EmbeddingRequest
from services.cloud_adapter import embeddings
from services.cloud_adapter.anthropic import Anthropic
from services.cloud_adapter.breaker import Breaker
from services.cloud_adapter.config import ModelSpec, Provider
from services.cloud_adapter.dialect import (
    Choices,
    ChoicesIgnored,
    Completion,
    Delta,
    Dialect,
    Finish,
    Piece,
    StreamParser,
    Tokens,
    bad_response,
    classify,
    provider_fault,
    retryable,
)
from services.cloud_adapter.guard import DestinationRefused, PublicOnlyResolver
from services.cloud_adapter.openai_compat import OpenAICompatible
from services.cloud_adapter.rate import MinuteLimits, Peers
from services.cloud_adapter.retry import RetryPolicy, retry_hint
from services.cloud_adapter.sse import ServerEvent, SSEParser
from shared import metrics
from shared.errors import (
    LeafwireError,
    Overloaded,
    ProviderUnavailable,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from shared.logging import get_logger

log = get_logger("leafwire.cloud_adapter.upstream")
T = TypeVar("T")
R = TypeVar("R", ChatCompletionRequest, EmbeddingRequest)
USER_AGENT = "leafwire-cloud-adapter/0.1"


def proxy_refused(provider: str, status: int) -> UpstreamError:
    """The proxy a provider is called through refused a call: 407 is the adapter's proxy credentials (an
    operator must check them); another status is the proxy failing to reach the provider (5xx: retried)."""
    if status == 407:
        return UpstreamError(f"the proxy of {provider} refused the adapter's proxy credentials (407); an "
                             "operator must check proxy_auth_env / proxy_auth_file", code="upstream_proxy_auth_failed")
    return UpstreamError(f"the proxy of {provider} could not reach it ({status})", code="upstream_proxy_error",
                         retryable=status >= 500)


def dialect_of(provider: Provider) -> Dialect:
    """The dialect object of a provider's kind."""
    spec = provider.spec
    if spec.kind == "anthropic":
        return Anthropic(spec.name, spec.anthropic_version, spec.drop_params)
    return OpenAICompatible(spec.name, spec.drop_params)


@dataclass
class Call(Generic[R]):
    """One request (chat or embeddings) for one model of the provider: where it is sent and what, and when
    it must be over (unix time)."""

    request: R
    model: str
    spec: ModelSpec
    deadline: float
    url: str
    body: bytes
    started: float = field(default_factory=time.time)

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - time.time()


class OpenStream:
    """A streamed answer whose first event has arrived: ``first`` pieces, then ``rest()``."""

    def __init__(self, upstream: Upstream, resp: aiohttp.ClientResponse, sse: SSEParser, parser: StreamParser,
                 first: list[Piece], pending: list[ServerEvent], call: Call[ChatCompletionRequest],
                 probe: bool) -> None:
        self.first = first
        self._pending = pending
        self._upstream = upstream
        self._resp = resp
        self._sse = sse
        self._parser = parser
        self._call = call
        self._probe = probe
        self._n = call.request.n or 1
        self._finished = {p.index for p in first if isinstance(p, Finish)}  # the choices whose end came
        self._recorded = False
        self._eof = False
        self._draining = False
        self._rest: AsyncIterator[Piece] | None = None

    def rest(self) -> AsyncIterator[Piece]:
        """The pieces after ``first``; raises (never retries) when the stream fails or stops early."""
        if self._rest is None:
            self._rest = self._pieces()
        return self._rest

    async def choices_begun(self, n: int) -> set[int]:
        """Read on, into ``first``, until each of ``n`` choices has begun or the stream ended; the indexes of
        the choices that began."""
        begun = {p.index for p in self.first if isinstance(p, Delta | Finish)}
        rest = self.rest()
        while len(begun) < n and (piece := await anext(rest, None)) is not None:
            self.first.append(piece)
            if isinstance(piece, Delta | Finish):
                begun.add(piece.index)
        return begun

    async def _pieces(self) -> AsyncIterator[Piece]:
        for event in self._pending:
            for piece in self._parser.feed(event.event, event.data):
                if isinstance(piece, Finish):
                    self._finished.add(piece.index)
                yield piece
        idle = self._upstream.provider.spec.timeouts.first_byte_s
        while not self._parser.done:
            chunk = await self._read(min(idle, self._call.left()))
            events = self._sse.feed(chunk) if chunk else self._sse.close()
            for event in events:
                for piece in self._parser.feed(event.event, event.data):
                    if isinstance(piece, Finish):
                        self._finished.add(piece.index)
                    yield piece
            if not chunk:
                self._eof = True
                if not (self._parser.done or len(self._finished) >= self._n):
                    raise UpstreamError(f"{self._upstream.name}'s stream ended before the answer did",
                                        code="upstream_bad_response")
                return
        self._end_body()

    def _end_body(self) -> None:
        """After the answer's last event. A body that ended with it goes back to the pool at ``close``; one the
        provider keeps open (its end comes late, or keep-alive comments follow) is read on in the background,
        so the caller's stream ends now, not when the provider's body does."""
        if self._resp.content.at_eof():
            self._eof = True
        else:
            self._draining = True
            self._upstream.drain_later(self._resp)

    async def _read(self, wait: float) -> bytes:
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                return await self._resp.content.readany()
        except TimeoutError as exc:
            raise self._upstream.timed_out(wait, self._upstream.provider.spec.timeouts.first_byte_s, self._call,
                                           f"sent nothing for {wait:.1f} s mid-answer",
                                           retryable=False) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"{self._upstream.name}'s stream was cut: {type(exc).__name__}",
                                code="upstream_bad_response") from exc

    def close(self, ok: bool | None) -> None:
        """Give the connection back (kept alive when the body was read to its end, closed otherwise);
        ``ok`` is the answer's outcome for the breaker (``None``: no verdict)."""
        if self._draining:
            pass  # the drain gives the connection back when the body ends
        elif self._eof:
            self._resp.release()
        else:
            self._resp.close()
        if not self._recorded:
            self._recorded = True
            self._upstream.settle(ok, self._probe)


class Slot:
    """A taken concurrent-call slot, given back on exit (a plain class: a generator-based context manager
    costs several times more, once per request)."""

    __slots__ = ("_upstream",)

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._upstream.release()


STREAM_OPTIONS = "stream_options"


class FoundOut:
    """What calls found a provider lacks (``n`` for a model, ``stream_options``), each taken as so for
    ``recheck_s``; then it is tried again, so a server upgraded since is found out too."""

    def __init__(self, recheck_s: float) -> None:
        self.recheck_s = recheck_s
        self._until: dict[str, float] = {}

    def mark(self, what: str) -> None:
        """A call found the provider lacks ``what``."""
        self._until[what] = time.monotonic() + self.recheck_s

    def holds(self, what: str) -> bool:
        """Whether the provider is taken to lack ``what`` now (forgotten once ``recheck_s`` has passed)."""
        until = self._until.get(what)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._until[what]
        return False


class Upstream:
    """Everything about calling one provider."""

    def __init__(self, provider: Provider, policy: RetryPolicy, breaker: Breaker,
                 max_response_bytes: int = 16 * 1024 * 1024, n_recheck_s: float = 3600.0,
                 peers: Peers | None = None) -> None:
        self.provider = provider
        self.name = provider.spec.name
        self.policy = policy
        self.breaker = breaker
        self.dialect = dialect_of(provider)
        self.max_response_bytes = max_response_bytes
        self.n_recheck_s = n_recheck_s
        self._lacks = FoundOut(n_recheck_s)  # what calls found the provider lacks: n (by model), stream_options
        self.inflight = 0
        self.held = 0  # requests admitted for this provider and not finished (``hold``)
        self.idle = asyncio.Event()  # set while none is
        self.idle.set()
        self._inflight_gauge = metrics.CLOUD_INFLIGHT.labels(self.name)
        self.limits = MinuteLimits(self.name, provider.spec.rpm, provider.spec.tpm, peers)
        # every model's, limited or not: a limit taken out and put back by reloads still has the minute's calls
        self.model_limits = {model: MinuteLimits(self.name, spec.rpm, spec.tpm, peers, model=model)
                             for model, spec in provider.spec.models.items()}
        # checked for every call: kept at hand
        self.limited = self.limits.limited or any(m.limited for m in self.model_limits.values())
        self._session: aiohttp.ClientSession | None = None
        self._drains: set[asyncio.Task[None]] = set()
        base = self._base_headers()
        self._headers = {True: {**base, "Accept": "text/event-stream"}, False: {**base, "Accept": "application/json"}}

    def _base_headers(self) -> dict[str, str]:
        spec = self.provider.spec
        h = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **self.dialect.headers(), **spec.headers}
        if self.provider.key is not None:
            header, prefix = spec.key_header()
            h[header] = prefix + self.provider.key.get_secret_value()
        return h

    async def start(self) -> None:
        """Open the pooled session (inside the running event loop)."""
        spec = self.provider.spec
        # Through a proxy only the proxy's own name is resolved here (the proxy resolves the provider's): the
        # operator's proxy, on the site's network, is no destination to refuse.
        connector = aiohttp.TCPConnector(limit=spec.max_concurrent, ttl_dns_cache=300, keepalive_timeout=30,
                                         resolver=None if spec.local or spec.proxy else PublicOnlyResolver())
        auth = self.provider.proxy_auth
        user, _, password = auth.get_secret_value().partition(":") if auth is not None else ("", "", "")
        self._session = aiohttp.ClientSession(
            # No cookie jar: a provider's cookies must never be replayed across tenants' requests (and a
            # jar costs every request a lookup).
            connector=connector, trust_env=False, raise_for_status=False, cookie_jar=aiohttp.DummyCookieJar(),
            proxy=spec.proxy, proxy_auth=aiohttp.BasicAuth(user, password) if auth is not None else None,
            timeout=aiohttp.ClientTimeout(total=None, connect=spec.timeouts.connect_s,
                                          sock_connect=spec.timeouts.connect_s))

    async def close(self) -> None:
        """Close the session and its connections."""
        for task in self._drains:
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def drain_later(self, resp: aiohttp.ClientResponse) -> None:
        """Read what follows a streamed answer's last event in the background, then give its connection back."""
        task = asyncio.create_task(self._drain(resp))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def drained(self) -> None:
        """Wait for the connections being drained to be given back."""
        if self._drains:
            await asyncio.wait(set(self._drains))

    @staticmethod
    async def _drain(resp: aiohttp.ClientResponse, limit: int = 65536, wait_s: float = 1.0) -> None:
        """Read the body on to its end, so its connection goes back to the pool; one that has not ended within
        ``wait_s`` and ``limit`` bytes is closed."""
        read = 0
        try:
            async with asyncio.timeout(wait_s):
                while read <= limit and (chunk := await resp.content.readany()):
                    read += len(chunk)
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        finally:
            if resp.content.at_eof():
                resp.release()
            else:
                resp.close()

    @property
    def native_n(self) -> bool:
        """Whether one call is asked for several choices: the dialect has ``n``, and the provider's entry does
        not say it has none (``n: false``)."""
        return self.dialect.native_n and self.provider.spec.n

    def has_n(self, model: str, spec: ModelSpec) -> bool:
        """``native_n``, unless a call found out within ``n_recheck_s`` that the server has no ``n`` for this
        model (it answered one choice, or refused ``n``): its choices are then asked a call each at once, not
        after a call wasted again on every request."""
        return self.native_n and not self._lacks.holds(f"n:{spec.upstream_name(model)}")

    def slot(self, model: str | None = None) -> Slot:
        """Take one of the provider's concurrent-call slots for a call of ``model``, or refuse at once (429): at
        ``max_concurrent``, or at the provider's or the model's ``rpm`` or ``tpm`` (``rate.MinuteLimits``; a
        call is counted when it is sent, ``_post``: a request cancelled before fills no minute)."""
        if self.provider.missing_key is not None:  # no Retry-After: trying again soon will not help
            raise ProviderUnavailable(f"provider {self.name} cannot be called: {self.provider.missing_key}",
                                      provider=self.name, code="provider_key_missing")
        if self.inflight >= self.provider.spec.max_concurrent:
            metrics.REJECTED.labels("cloud-adapter", Overloaded.default_code).inc()  # by the code callers get
            raise Overloaded(f"provider {self.name} has {self.inflight} calls in flight, its limit",
                             retry_after=1)
        if self.limited:
            for minute in self.limits_of(model):
                minute.check()
        self.inflight += 1
        self._inflight_gauge.inc()
        return Slot(self)

    def limits_of(self, model: str | None) -> list[MinuteLimits]:
        """The minutes a call of ``model`` counts in: the provider's (with an rpm or tpm) and the model's own."""
        own = self.model_limits.get(model) if model is not None else None
        return [limits for limits in (self.limits, own) if limits is not None and limits.limited]

    def count(self, model: str | None) -> None:
        """Count a call of ``model`` about to be sent (every one: a retry, a stream asked again without
        ``stream_options``, a paused turn gone on with) in each of its minutes, as the provider counts them; or
        refuse it (429 ``provider_rate_limit``, the call not made) where one is full: counted in none then."""
        limits = self.limits_of(model)
        for minute in limits:
            minute.check()
        for minute in limits:
            minute.record()

    def used(self, model: str, tokens: int) -> None:
        """Count the tokens a call of ``model`` used (against the provider's and the model's ``tpm``)."""
        if self.limited:
            for minute in self.limits_of(model):
                minute.used(tokens)

    def keep_minutes(self, old: Upstream) -> None:
        """Count on in ``old``'s minutes (this provider's entry replaced it), against this entry's limits."""
        spec = self.provider.spec
        self.limits = old.limits.limit_to(spec.rpm, spec.tpm)
        for model, minute in old.model_limits.items():
            if model in self.model_limits:
                self.model_limits[model] = minute.limit_to(spec.models[model].rpm, spec.models[model].tpm)
        self.limited = self.limits.limited or any(m.limited for m in self.model_limits.values())

    def minutes(self) -> list[MinuteLimits]:
        """Every minute this provider counts: its own and its models'."""
        return [self.limits, *self.model_limits.values()]

    def release(self) -> None:
        """Give a slot back."""
        self.inflight -= 1
        self._inflight_gauge.dec()

    def hold(self) -> None:
        """A request admitted for this provider: its session stays open for it (a reload replacing the
        provider closes the old session only once ``idle``)."""
        self.held += 1
        self.idle.clear()

    def unhold(self) -> None:
        """That request is finished."""
        self.held -= 1
        if not self.held:
            self.idle.set()

    def call(self, request: ChatCompletionRequest, model: str, spec: ModelSpec,
             deadline: float) -> Call[ChatCompletionRequest]:
        """A chat call of ``model`` ending by the request's deadline or the provider's total timeout."""
        upstream = spec.upstream_name(model)
        return Call(request, model, spec, self._ends(deadline), self.provider.spec.url(upstream),
                    self.dialect.body(request, spec, upstream, request.stream, self.stream_usage()))

    def stream_usage(self) -> bool:
        """Whether a stream asks for a closing usage chunk: unless the provider's entry says
        ``stream_usage: false``, or a call found out within ``n_recheck_s`` that it refuses ``stream_options``."""
        return self.provider.spec.stream_usage and not self._lacks.holds(STREAM_OPTIONS)

    def _refused_stream_usage(self, err: LeafwireError, call: Call[ChatCompletionRequest]) -> bool:
        """A 400 naming ``stream_options`` to a stream that asked for the usage chunk: a server without it.
        Remembered for ``n_recheck_s``; the call is then made again at once without it (usage estimated)."""
        named = "stream_options" in f"{err.param} {err.message}"
        if err.status != 400 or not named or b'"stream_options"' not in call.body:
            return False
        self._lacks.mark(STREAM_OPTIONS)
        log.info("the provider refuses stream_options: streams are asked without a usage chunk (usage is "
                 "estimated) for the next n_recheck_s (stream_usage: false in its entry of the providers file "
                 "saves this call)", provider=self.name, model=call.model, n_recheck_s=self.n_recheck_s)
        upstream = call.spec.upstream_name(call.model)
        call.body = self.dialect.body(call.request, call.spec, upstream, True, usage=False)
        return True

    def embeddings_call(self, request: EmbeddingRequest, model: str, spec: ModelSpec,
                        deadline: float) -> Call[EmbeddingRequest]:
        """An embeddings call of ``model``, ending as a chat call does."""
        upstream = spec.upstream_name(model)
        return Call(request, model, spec, self._ends(deadline), self.provider.spec.url(upstream, "embeddings"),
                    embeddings.body(request, upstream))

    def _ends(self, deadline: float) -> float:
        """When a call must be over: the request's deadline, or the provider's total timeout from now."""
        return min(deadline, time.time() + self.provider.spec.timeouts.total_s)

    def settle(self, ok: bool | None, probe: bool) -> None:
        """Tell the breaker how a call ended (``None``: no verdict, e.g. cancelled or the caller's fault)."""
        if ok is None:
            if probe:
                self.breaker.release_probe()
            return
        self.breaker.record(ok, probe)

    async def complete(self, call: Call[ChatCompletionRequest]) -> Completion:
        """A whole (non-streamed) answer, retried until it arrives or retrying must stop."""
        completion, probe = await self._with_retries(call, self._try_complete)
        self.settle(True, probe)
        return completion

    async def complete_choices(self, call: Call[ChatCompletionRequest], n: int) -> Choices:
        """A whole answer of ``n`` choices asked in one call (the dialect has ``n``), retried as one choice is."""

        async def attempt(call: Call[ChatCompletionRequest], probe: bool) -> Choices:
            with self._n_refused():
                choices = self.dialect.choices(await self._whole(call), n)
            if choices is None:
                raise AssertionError(f"{self.name}'s dialect has no n")  # refused before the call: ChoicesOneByOne
            return choices

        with self._n_ignored(call):
            choices, probe = await self._with_retries(call, attempt)
        self.settle(True, probe)
        return choices

    async def open_choices_stream(self, call: Call[ChatCompletionRequest], n: int) -> OpenStream:
        """A streamed answer of ``n`` choices asked in one call, opened as one choice's is and read on until
        every choice has begun (nothing has gone to the caller yet): a server without ``n`` streams one
        choice, and its choices can then still be asked a call each (``ChoicesIgnored``)."""

        async def attempt(call: Call[ChatCompletionRequest], probe: bool) -> OpenStream:
            with self._n_refused():
                return await self._try_stream(call, probe)

        with self._n_ignored(call):
            opened, _ = await self._with_retries(call, attempt)
            try:
                begun = await opened.choices_begun(n)
            except LeafwireError as err:
                opened.close(False if provider_fault(err) else None)
                raise
            except BaseException:
                opened.close(None)
                raise
            if len(begun) < n:
                opened.close(True)  # it answered, as it does a call
                if begun == {0}:
                    tokens = [p for p in opened.first if isinstance(p, Tokens)]
                    raise ChoicesIgnored(self.name, tokens[-1] if tokens else None)
                raise bad_response(self.name, f"the stream ended with {len(begun)} of its {n} choices begun")
        return opened

    @contextlib.contextmanager
    def _n_refused(self) -> Iterator[None]:
        """A 400 naming ``n`` is a server without n refusing it: ``ChoicesIgnored``."""
        try:
            yield
        except LeafwireError as err:
            if err.status == 400 and err.param == "n":
                raise ChoicesIgnored(self.name) from err
            raise

    @contextlib.contextmanager
    def _n_ignored(self, call: Call[ChatCompletionRequest]) -> Iterator[None]:
        """A server found to have no ``n`` is remembered so, for this model, for ``n_recheck_s``."""
        try:
            yield
        except ChoicesIgnored:
            self._lacks.mark(f"n:{call.spec.upstream_name(call.model)}")
            log.info("the provider has no n: the choices are asked a call each, for this model, for the next "
                     "n_recheck_s (n: false in its entry of the providers file saves this call)",
                     provider=self.name, model=call.model, n_recheck_s=self.n_recheck_s)
            raise

    async def embed(self, call: Call[EmbeddingRequest]) -> embeddings.Vectors:
        """The vectors of an embeddings call, retried as a whole chat answer is."""
        vectors, probe = await self._with_retries(call, self._try_embed)
        self.settle(True, probe)
        return vectors

    async def open_stream(self, call: Call[ChatCompletionRequest]) -> OpenStream:
        """A streamed answer whose first event arrived, retried until then."""
        opened, _ = await self._with_retries(call, self._try_stream)
        return opened

    async def _with_retries(self, call: Call[R],
                            attempt: Callable[[Call[R], bool], Awaitable[T]]) -> tuple[T, bool]:
        last: LeafwireError | None = None
        for tries in range(self.policy.max_attempts):
            probe = self.breaker.acquire()
            if probe is None:
                if last is None:  # no try made: a refusal, as max_concurrent's and rpm/tpm's are
                    metrics.REJECTED.labels("cloud-adapter", ProviderUnavailable.default_code).inc()
                raise last or ProviderUnavailable(
                    f"provider {self.name} is failing; its circuit breaker is open",
                    provider=self.name, retry_after=max(1.0, self.breaker.retry_in()))
            try:
                return await attempt(call, probe), probe
            except Overloaded:  # a call not made (the provider's or the model's rpm): no try, not retried
                self.settle(None, probe)
                raise
            except LeafwireError as err:
                last = err
                metrics.CLOUD_ATTEMPT_FAILURES.labels(self.name, err.code or "error").inc()
                self.settle(False if provider_fault(err) else None, probe)
                delay = self.policy.delay(tries, err.retry_after) if retryable(err) else None
                # a failure that opened the breaker ends the call here: its next try would be refused unmade
                if delay is None or delay >= call.left() or self.breaker.state is BreakerState.OPEN:
                    err.final = isinstance(err, UpstreamError) and not isinstance(err, UpstreamRateLimited)
                    raise
                metrics.CLOUD_RETRIES.labels(self.name, err.code or "error").inc()
                log.info("provider call failed; retrying", provider=self.name, attempt=tries + 1,
                         code=err.code, error=err.message, wait_s=round(delay, 3))
                await asyncio.sleep(delay)
            except BaseException:
                self.settle(None, probe)
                raise
        raise AssertionError("unreachable: the last try raises")  # pragma: no cover

    def timed_out(self, wait: float, silence_s: float | None, call: Call[Any], silent: str, *,
                  retryable: bool) -> UpstreamTimeout:
        """The timeout of a wait of ``wait`` seconds whose longest silence allowed was ``silence_s``: the
        provider was ``silent`` that long (its fault, for the breaker), or the call's whole time ran out first
        (its ``total_s``, or the request's deadline, retries included; the only limit of a whole answer, which
        comes once it is written): a long answer, which says nothing of the provider's health."""
        if silence_s is None or wait < silence_s:
            return UpstreamTimeout(f"{self.name}'s call ran out of time: its total_s "
                                   f"({self.provider.spec.timeouts.total_s:g} s, retries included) or the request's "
                                   "deadline came first", retryable=retryable, provider_fault=False)
        return UpstreamTimeout(f"{self.name} {silent}", retryable=retryable)

    async def _post(self, call: Call[Any], stream: bool) -> aiohttp.ClientResponse:
        """Send one try and wait for the response headers: a stream's within the first-byte timeout; a whole
        answer's within the call's time (most providers send them once the answer is written: a long answer is
        no silence, and a try abandoned at ``first_byte_s`` would be billed and asked again)."""
        assert self._session is not None, "Upstream.start() was not called"
        if self.limited:
            self.count(call.model)
        timeouts = self.provider.spec.timeouts
        silence = timeouts.first_byte_s if stream else None
        wait = min(silence or timeouts.total_s, call.left())
        headers = self._headers[stream]
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                return await self._session.post(call.url, data=call.body, headers=headers, allow_redirects=False)
        except TimeoutError as exc:
            raise self.timed_out(wait, silence, call, f"did not answer within {wait:.1f} s", retryable=True) from exc
        except aiohttp.ClientHttpProxyError as exc:  # the proxy refused the tunnel (CONNECT) to an https provider
            raise proxy_refused(self.name, exc.status) from exc
        except aiohttp.ClientProxyConnectionError as exc:
            raise UpstreamError(f"could not connect to the proxy of {self.name}: {type(exc).__name__}",
                                code="upstream_proxy_error", retryable=True) from exc
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, DestinationRefused):
                raise UpstreamError(f"{self.name}: {exc.os_error}", code="destination_refused") from exc
            raise UpstreamError(f"could not connect to {self.name}: {type(exc).__name__}",
                                retryable=True) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"calling {self.name} failed: {type(exc).__name__}", retryable=True) from exc

    async def _read_body(self, resp: aiohttp.ClientResponse, call: Call[Any]) -> bytes:
        body = bytearray()
        try:
            async with asyncio.timeout(max(call.left(), 0.0)):
                if resp.content_length is not None and resp.content_length <= self.max_response_bytes:
                    return await resp.read()  # a declared length within the limit: one read
                while chunk := await resp.content.read(65536):
                    body += chunk
                    if len(body) > self.max_response_bytes:
                        raise bad_response(self.name, f"the answer is larger than {self.max_response_bytes} bytes")
        except TimeoutError as exc:  # the call's whole time ran out while the body came: a long answer
            raise UpstreamTimeout(f"{self.name}'s answer did not arrive in time", retryable=True,
                                  provider_fault=False) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"{self.name}'s answer was cut: {type(exc).__name__}", retryable=True) from exc
        return bytes(body)

    async def _refuse(self, resp: aiohttp.ClientResponse, call: Call[Any]) -> LeafwireError:
        """The error of a non-2xx answer."""
        try:
            body = await self._read_body(resp, call)
        except LeafwireError:
            body = b""
        if resp.status == 407 and self.provider.spec.proxy:
            return proxy_refused(self.name, resp.status)
        hint = retry_hint(resp.headers, time.time())
        return classify(self.name, call.request.model, resp.status, self.dialect.error_info(body), hint)

    async def _try_complete(self, call: Call[ChatCompletionRequest], probe: bool) -> Completion:
        """One try's answer; a turn the provider paused (Anthropic's ``pause_turn``) is gone on with, each call
        counted as a call, and its parts make the answer."""
        answers = [await self._whole(call)]
        while (body := self.dialect.resume(call.body, answers)) is not None:
            try:
                answers.append(await self._whole(replace(call, body=body)))
            except Overloaded:  # at the provider's rpm (not sent): what was answered and paid for is the answer
                break
        return self.dialect.completion(self.dialect.combined(answers), call.request)

    async def _try_embed(self, call: Call[EmbeddingRequest], probe: bool) -> embeddings.Vectors:
        data = await self._whole(call)  # thousands of vectors take tens of milliseconds to read: not on the loop
        return await asyncio.to_thread(embeddings.read, self.name, data, call.request)

    async def _whole(self, call: Call[Any]) -> bytes:
        """The JSON body of one try's answer, or the error its status or content type amounts to."""
        resp = await self._post(call, stream=False)
        async with resp:
            if not 200 <= resp.status < 300:
                raise await self._refuse(resp, call)
            if not (resp.content_type == "application/json" or resp.content_type.endswith("+json")):
                raise bad_response(self.name, f"content type {resp.content_type!r} instead of JSON")
            return await self._read_body(resp, call)

    async def _try_stream(self, call: Call[ChatCompletionRequest], probe: bool) -> OpenStream:
        resp = await self._post(call, stream=True)
        try:
            if not 200 <= resp.status < 300:
                err = await self._refuse(resp, call)
                if self._refused_stream_usage(err, call):
                    resp.close()
                    return await self._try_stream(call, probe)
                raise err
            if resp.content_type != "text/event-stream":
                raise bad_response(self.name, f"content type {resp.content_type!r} instead of an event stream")
            return await self._first_events(resp, call, probe)
        except BaseException:
            resp.close()
            raise

    async def _first_events(self, resp: aiohttp.ClientResponse, call: Call[ChatCompletionRequest],
                            probe: bool) -> OpenStream:
        """Read until the first event: that is the first byte, after which nothing is retried (events that
        arrived with it are read after admission, like every later one)."""
        sse = SSEParser(max_event_bytes=self.max_response_bytes)
        parser = self.dialect.stream_parser(call.request.n or 1, call.request)
        wait = min(self.provider.spec.timeouts.first_byte_s, call.left())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                while True:
                    chunk = await resp.content.readany()
                    events = sse.feed(chunk) if chunk else sse.close()
                    if events:
                        first = parser.feed(events[0].event, events[0].data)
                        return OpenStream(self, resp, sse, parser, first, events[1:], call, probe)
                    if not chunk:
                        raise bad_response(self.name, "the stream ended before its first event")
        except TimeoutError as exc:
            raise self.timed_out(wait, self.provider.spec.timeouts.first_byte_s, call,
                                 f"sent no answer within {wait:.1f} s", retryable=True) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"{self.name}'s stream was cut before its first event: {type(exc).__name__}",
                                retryable=True) from exc
