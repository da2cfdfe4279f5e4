"""A provider's requests and tokens a minute (``rpm``, ``tpm`` in the providers file), and a model's own, as
LiteLLM's deployments have them: the site's adapters together stay under the provider account's limits
(OpenAI's are per model) instead of meeting its 429s.

Counted over the last 60 s (a sliding log, not fixed minutes): a request is refused at once, with a 429
``provider_rate_limit`` and the Retry-After when the oldest call or tokens leave the window, while the
minute's calls reach ``rpm`` or its tokens (prompt and completion, as reported or estimated) reach ``tpm``.
A router falls back on that 429 to the route's next target.

Each adapter counts its own calls exactly, and adds those of the site's other adapters of the same provider
(``Peers``): every adapter writes its last minute, by second, to the ``provider-rates`` KV bucket about every
``LW_CLOUD_RATE_SYNC_S`` while it changes, and reads the others' from there, as LiteLLM's instances share
their counts through Redis. So what the others began in the last sync period may not be seen yet: the site
can pass a limit by that much. Seconds are wall-clock seconds, compared across the site's machines.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from schemas.cloud import ProviderRate
from shared import metrics
from shared.errors import Overloaded

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Counted:
    """What the other adapters began in the last minute: calls and tokens, and the second of the oldest of
    each (when it leaves the minute, there is room again)."""

    calls: int = 0
    tokens: int = 0
    first_call: int | None = None
    first_tokens: int | None = None


NOTHING = Counted()


def rate_key(rate: ProviderRate) -> str:
    """The ``provider-rates`` key of an entry: ``<provider>.<worker id>``, and for a model's count a hash of its
    name after (a model's name may hold what a key cannot)."""
    base = f"{rate.provider}.{rate.worker_id}"
    return base if rate.model is None else f"{base}.{hashlib.sha256(rate.model.encode()).hexdigest()[:16]}"


def scope_of(provider: str, model: str | None) -> str:
    """What a count is kept for: the provider (``openai``), or one model of it (``openai/gpt-4o``)."""
    return provider if model is None else f"{provider}/{model}"


def _within(seconds: list[tuple[int, int]], edge: float) -> tuple[int, int | None]:
    """The count of the seconds that end after ``edge``, and the oldest of them."""
    total, first = 0, None
    for second, count in seconds:
        if second + 1 > edge and count > 0:
            total += count
            first = second if first is None else min(first, second)
    return total, first


class Peers:
    """The other adapters' minutes, by provider (and by model, for a model's own limits), as read from the
    ``provider-rates`` bucket (this adapter's own entries are skipped: it counts its own calls itself)."""

    def __init__(self, own_worker: str) -> None:
        self.own_worker = own_worker
        self._rates: dict[str, dict[str, ProviderRate]] = {}  # scope -> worker id -> its last entry
        self._memo: dict[str, tuple[int, Counted]] = {}  # scope -> (second summed at, the sum)
        self._keys: dict[str, tuple[str, str]] = {}  # bucket key -> (scope, worker id)

    def seen(self, key: str, rate: ProviderRate) -> None:
        """An adapter's entry under ``key``, written or rewritten."""
        if rate.worker_id == self.own_worker:
            return
        scope = scope_of(rate.provider, rate.model)
        self._keys[key] = scope, rate.worker_id
        self._rates.setdefault(scope, {})[rate.worker_id] = rate
        self._memo.pop(scope, None)

    def gone(self, key: str) -> None:
        """The entry under ``key``, deleted (or its bucket made anew without it)."""
        scope, worker_id = self._keys.pop(key, ("", ""))
        if self._rates.get(scope, {}).pop(worker_id, None) is not None:
            self._memo.pop(scope, None)

    def counted(self, scope: str, now: float) -> Counted:
        """What the other adapters began in the minute before ``now`` (summed at most once a second)."""
        rates = self._rates.get(scope)
        if not rates:
            return NOTHING
        second = int(now)
        if (memo := self._memo.get(scope)) is not None and memo[0] == second:
            return memo[1]
        edge = now - WINDOW_S
        calls, tokens, first_call, first_tokens = 0, 0, None, None
        for worker_id, rate in list(rates.items()):
            n_calls, first = _within(rate.calls, edge)
            calls, first_call = calls + n_calls, _earliest(first_call, first)
            n_tokens, first = _within(rate.tokens, edge)
            tokens, first_tokens = tokens + n_tokens, _earliest(first_tokens, first)
            if not n_calls and not n_tokens and rate.updated_at <= edge:
                del rates[worker_id]  # an adapter gone, or idle for a minute: nothing of it left to count
        counted = Counted(calls, tokens, first_call, first_tokens)
        self._memo[scope] = (second, counted)
        return counted


def _earliest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


class MinuteLimits:
    """The calls and tokens of one provider (or one ``model`` of it) over the last minute, this adapter's and
    (``peers``) the site's other adapters', against its ``rpm`` and ``tpm``."""

    def __init__(self, provider: str, rpm: int | None, tpm: int | None, peers: Peers | None = None,
                 clock: Callable[[], float] = time.time, model: str | None = None) -> None:
        self.provider, self.model = provider, model
        self.scope = scope_of(provider, model)
        self.rpm, self.tpm = rpm, tpm
        self._peers = peers
        self._clock = clock
        self._calls: deque[float] = deque()  # when each call of the window began
        self._tokens: deque[tuple[float, int]] = deque()  # when each call's tokens were counted, and how many
        self._token_sum = 0
        self._call_seconds: dict[int, int] = {}  # the same by second, for the other adapters (``tally``)
        self._token_seconds: dict[int, int] = {}
        self._changed = False  # since the last ``tally``

    @property
    def limited(self) -> bool:
        """Whether there is a limit to keep (without one, nothing is counted)."""
        return self.rpm is not None or self.tpm is not None

    def limit_to(self, rpm: int | None, tpm: int | None) -> MinuteLimits:
        """These counts, against new limits (a provider's entry changed); what was not counted (calls while
        there was no ``rpm``, tokens while there was no ``tpm``) counts from now."""
        self.rpm, self.tpm = rpm, tpm
        self._changed = True
        return self

    def take(self) -> None:
        """Count one call, or refuse it (429 ``provider_rate_limit``) while the minute's limit is reached."""
        self.check()
        self.record()

    def check(self) -> None:
        """Refuse a call (429 ``provider_rate_limit``) while the minute's limit is reached; count nothing."""
        now = self._clock()
        self._expire(now)
        others = self._peers.counted(self.scope, now) if self._peers is not None else NOTHING
        if self.rpm is not None and (calls := len(self._calls) + others.calls) >= self.rpm:
            oldest = _oldest(self._calls[0] if self._calls else None, others.first_call)
            self._refuse(f"{calls} calls in the last minute, its rpm ({self.rpm})", oldest + WINDOW_S - now)
        if self.tpm is not None and (tokens := self._token_sum + others.tokens) >= self.tpm:
            oldest = _oldest(self._tokens[0][0] if self._tokens else None, others.first_tokens)
            self._refuse(f"{tokens} tokens in the last minute, over its tpm ({self.tpm})", oldest + WINDOW_S - now)

    def record(self) -> None:
        """Count one call (``check`` let it through)."""
        if self.rpm is not None:
            now = self._clock()
            self._calls.append(now)
            second = int(now)
            self._call_seconds[second] = self._call_seconds.get(second, 0) + 1
            self._changed = True

    def used(self, tokens: int) -> None:
        """Count the tokens a call used (against ``tpm``)."""
        if self.tpm is None or tokens <= 0:
            return
        now = self._clock()
        self._tokens.append((now, tokens))
        self._token_sum += tokens
        second = int(now)
        self._token_seconds[second] = self._token_seconds.get(second, 0) + tokens
        self._changed = True
        self._expire(now)

    def tally(self, worker_id: str, again: bool = False) -> ProviderRate | None:
        """This adapter's minute by second, for the others; ``None`` when nothing changed since the last tally
        (nor can have: a second leaving the minute changes nothing the others do not drop themselves), unless
        asked ``again`` (the bucket was made anew, without it)."""
        if not self._changed and not again:
            return None
        self._changed = False
        now = self._clock()
        edge = now - WINDOW_S
        for seconds in (self._call_seconds, self._token_seconds):
            for second in [s for s in seconds if s + 1 <= edge]:
                del seconds[second]
        return ProviderRate(provider=self.provider, model=self.model, worker_id=worker_id,
                            calls=sorted(self._call_seconds.items()), tokens=sorted(self._token_seconds.items()),
                            updated_at=now)

    def _expire(self, now: float) -> None:
        edge = now - WINDOW_S
        while self._calls and self._calls[0] <= edge:
            self._calls.popleft()
        while self._tokens and self._tokens[0][0] <= edge:
            self._token_sum -= self._tokens.popleft()[1]

    def _refuse(self, what: str, wait_s: float) -> None:
        metrics.REJECTED.labels("cloud-adapter", "provider_rate_limit").inc()
        whose = f"provider {self.provider}" if self.model is None else f"model {self.model} of provider {self.provider}"
        raise Overloaded(f"{whose} had {what}; try again later or another model",
                         code="provider_rate_limit", retry_after=min(max(1.0, wait_s), WINDOW_S))


def _oldest(own: float | None, others: int | None) -> float:
    """When the oldest call (or tokens) of the minute began: this adapter's exact time, the others' second
    (counted from its end, when all of it has surely left the minute)."""
    if others is None:
        return own if own is not None else 0.0
    return float(others + 1) if own is None else min(own, float(others + 1))
