"""A provider's requests and tokens a minute (``rpm``, ``tpm`` in the providers file), as LiteLLM's deployments
have them: the adapter stays under the provider account's limits instead of meeting its 429s.

Counted by each adapter over the last 60 s (a sliding log, not fixed minutes): a request is refused at once,
with a 429 ``provider_rate_limit`` and the Retry-After when the oldest call or tokens leave the window, while
the minute's calls reach ``rpm`` or its tokens (prompt and completion, as reported or estimated) reach ``tpm``.
A router falls back on that 429 to the route's next target. Each adapter counts its own calls: several
adapters sharing one provider account each get the limit (give each its share).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from shared import metrics
from shared.errors import Overloaded

WINDOW_S = 60.0


class MinuteLimits:
    """The calls and tokens of one provider over the last minute, against its ``rpm`` and ``tpm``."""

    def __init__(self, provider: str, rpm: int | None, tpm: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.provider = provider
        self.rpm, self.tpm = rpm, tpm
        self._clock = clock
        self._calls: deque[float] = deque()  # when each call of the window began
        self._tokens: deque[tuple[float, int]] = deque()  # when each call's tokens were counted, and how many
        self._token_sum = 0

    @property
    def limited(self) -> bool:
        """Whether there is a limit to keep (without one, nothing is counted)."""
        return self.rpm is not None or self.tpm is not None

    def take(self) -> None:
        """Count one call, or refuse it (429 ``provider_rate_limit``) while the minute's limit is reached."""
        now = self._clock()
        self._expire(now)
        if self.rpm is not None and len(self._calls) >= self.rpm:
            self._refuse(f"{self.rpm} calls in the last minute, its rpm", self._calls[0] + WINDOW_S - now)
        if self.tpm is not None and self._token_sum >= self.tpm:
            self._refuse(f"{self._token_sum} tokens in the last minute, over its tpm ({self.tpm})",
                         self._tokens[0][0] + WINDOW_S - now)
        if self.rpm is not None:
            self._calls.append(now)

    def used(self, tokens: int) -> None:
        """Count the tokens a call used (against ``tpm``)."""
        if self.tpm is None or tokens <= 0:
            return
        now = self._clock()
        self._tokens.append((now, tokens))
        self._token_sum += tokens
        self._expire(now)

    def _expire(self, now: float) -> None:
        edge = now - WINDOW_S
        while self._calls and self._calls[0] <= edge:
            self._calls.popleft()
        while self._tokens and self._tokens[0][0] <= edge:
            self._token_sum -= self._tokens.popleft()[1]

    def _refuse(self, what: str, wait_s: float) -> None:
        metrics.REJECTED.labels("cloud-adapter", "provider_rate_limit").inc()
        raise Overloaded(f"provider {self.provider} had {what}; try again later or another model",
                         code="provider_rate_limit", retry_after=max(1.0, wait_s))
