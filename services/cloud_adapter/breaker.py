"""A circuit breaker per provider. Pure state machine; time comes from an injectable clock.

    closed ──(N consecutive failures, or error rate ≥ R over the window with ≥ M calls)──► open
    open ──(open_s elapsed)──► half_open: up to ``probes`` calls go through at once
    half_open ──probe succeeds──► closed (counters reset)      half_open ──probe fails──► open

While open (and while half open with every probe slot taken) calls are refused without touching the
provider. Open half-opens when the next call asks or when ``tick()`` is called once ``open_s`` has passed:
the adapter calls it then, so the ``provider-health`` bucket says ``half_open`` and the router, which sends
no calls to an open provider, sends the probe. Failures are what says something about the provider
(timeouts, connection errors, 5xx, 429, malformed answers, refused keys); a request the provider rejects as
invalid is neither a success nor a failure. The window counts calls in one-second buckets, so memory stays
fixed at any request rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from schemas.cloud import BreakerState, ProviderHealth


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens and how it recovers."""

    failures: int = 5
    error_rate: float = 0.5
    min_calls: int = 20
    window_s: int = 60
    open_s: float = 30.0
    probes: int = 1


class Window:
    """Calls and failures over the last ``size`` seconds, in one-second buckets."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._calls = [0] * size
        self._fails = [0] * size
        self._stamp = [-1] * size

    def add(self, now: float, failed: bool) -> None:
        """Count one call at ``now``."""
        second = int(now)
        i = second % self._size
        if self._stamp[i] != second:
            self._stamp[i], self._calls[i], self._fails[i] = second, 0, 0
        self._calls[i] += 1
        self._fails[i] += int(failed)

    def totals(self, now: float) -> tuple[int, int]:
        """(calls, failures) within the window ending at ``now``."""
        oldest = int(now) - self._size + 1
        calls = fails = 0
        for i in range(self._size):
            if self._stamp[i] >= oldest:
                calls += self._calls[i]
                fails += self._fails[i]
        return calls, fails

    def clear(self) -> None:
        """Forget every call."""
        self._stamp = [-1] * self._size


class Breaker:
    """One provider's breaker. ``on_change`` is called after every state change."""

    def __init__(self, provider: str, policy: BreakerPolicy, clock: Callable[[], float] = time.time,
                 on_change: Callable[[Breaker], None] | None = None) -> None:
        self.provider = provider
        self.policy = policy
        self.state = BreakerState.CLOSED
        self._clock = clock
        self.since = clock()
        self.consecutive_failures = 0
        self.probes_in_flight = 0
        self._window = Window(policy.window_s)
        self._on_change = on_change

    def _enter(self, state: BreakerState) -> None:
        self.state = state
        self.since = self._clock()
        if state is not BreakerState.HALF_OPEN:
            self.probes_in_flight = 0
        if self._on_change is not None:
            self._on_change(self)

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.since + self.policy.open_s - self._clock())

    def tick(self) -> None:
        """Half-open an open breaker whose ``open_s`` has passed (nothing otherwise)."""
        if self.state is BreakerState.OPEN and self.retry_in() <= 0:
            self._enter(BreakerState.HALF_OPEN)

    def acquire(self) -> bool | None:
        """Ask to make a call: ``None`` refused; ``True`` allowed as a half-open probe; ``False`` allowed.

        A probe must be ended with ``record(..., probe=True)`` or ``release_probe()``.
        """
        self.tick()
        if self.state is BreakerState.OPEN:
            return None
        if self.state is BreakerState.HALF_OPEN:
            if self.probes_in_flight >= self.policy.probes:
                return None
            self.probes_in_flight += 1
            return True
        return False

    def resume(self, health: ProviderHealth) -> bool:
        """Take up an open state ``health`` says the provider's breaker had (another run of this adapter, or
        another adapter of the site): open until its probe time (at most ``open_s`` from now). Only a breaker
        that has seen no call yet; whether it did."""
        now = self._clock()
        if (self.state is not BreakerState.CLOSED or health.state is not BreakerState.OPEN
                or health.probe_at is None or health.probe_at <= now or self._window.totals(now)[0]):
            return False
        self.state = BreakerState.OPEN
        self.since = min(health.probe_at, now + self.policy.open_s) - self.policy.open_s
        self.consecutive_failures = health.consecutive_failures
        return True

    def release_probe(self) -> None:
        """A probe ended without saying anything about the provider (cancelled, an invalid request)."""
        if self.state is BreakerState.HALF_OPEN and self.probes_in_flight > 0:
            self.probes_in_flight -= 1

    def record(self, ok: bool, probe: bool = False) -> None:
        """The outcome of a call that was allowed."""
        now = self._clock()
        if probe and self.state is BreakerState.HALF_OPEN:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)
            if ok:
                self.consecutive_failures = 0
                self._window.clear()
                self._enter(BreakerState.CLOSED)
            else:
                self.consecutive_failures += 1
                self._enter(BreakerState.OPEN)
            return
        self._window.add(now, not ok)
        self.consecutive_failures = 0 if ok else self.consecutive_failures + 1
        if not ok and self.state is BreakerState.CLOSED and self._should_open(now):
            self._enter(BreakerState.OPEN)

    def _should_open(self, now: float) -> bool:
        if self.consecutive_failures >= self.policy.failures:
            return True
        calls, fails = self._window.totals(now)
        return calls >= self.policy.min_calls and fails / calls >= self.policy.error_rate

    def error_rate(self) -> float:
        """Failures / calls over the window (0 with no calls)."""
        calls, fails = self._window.totals(self._clock())
        return fails / calls if calls else 0.0

    def health(self) -> ProviderHealth:
        """The breaker as the router reads it from the ``provider-health`` KV bucket."""
        return ProviderHealth(provider=self.provider, state=self.state, since=self.since,
                              probe_at=self.since + self.policy.open_s if self.state is BreakerState.OPEN else None,
                              consecutive_failures=self.consecutive_failures, error_rate=self.error_rate(),
                              updated_at=self._clock())
