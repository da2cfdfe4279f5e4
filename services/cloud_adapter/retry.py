"""When to try a provider call again, and how long to wait first. Pure functions, no I/O.

Waits grow exponentially with full jitter (a uniform draw between 0 and ``min(cap, base * 2**attempt)``)
so that many adapters retrying at once spread out. When the provider says how long to wait —
``retry-after-ms``, ``Retry-After`` (seconds or an HTTP date), or the reset time of an exhausted
``x-ratelimit-*`` / ``anthropic-ratelimit-*`` limit — that wait is honoured (plus up to 10% jitter);
a wait longer than ``max_wait_s`` is not taken: the call fails at once with the hint, so the router can
send the request elsewhere. The reset of a limit with requests left says nothing about this 429 and is
ignored (a reset without its ``remaining`` header counts, the shortest such). A hint is a finite number of
seconds, at most ``MAX_HINT_S``: ``inf``, ``nan`` or a date in 2099 from a provider never reach a caller.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime

from shared.numbers import finite

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_EPOCH_THRESHOLD = 1_000_000_000  # a bare number larger than this is a unix time, not a duration
MAX_HINT_S = 86_400.0


@dataclass(frozen=True)
class RetryPolicy:
    """How many tries a call gets and how long to wait between them."""

    max_attempts: int = 3
    base_s: float = 0.5
    cap_s: float = 8.0
    max_wait_s: float = 20.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full-jitter exponential backoff after failed try number ``attempt`` (0-based)."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(attempt, 30)))
        return (rng or random).uniform(0.0, ceiling)

    def delay(self, attempt: int, hint: float | None, rng: random.Random | None = None) -> float | None:
        """Seconds to wait before trying again after failed try ``attempt``; ``None``: do not retry."""
        if attempt + 1 >= self.max_attempts:
            return None
        if hint is None:
            return self.backoff(attempt, rng)
        if hint > self.max_wait_s:
            return None
        return max(0.0, hint) * (1.0 + (rng or random).uniform(0.0, 0.1))


def parse_duration(text: str) -> float | None:
    """``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s`` (OpenAI's reset headers), or a bare number of seconds."""
    text = text.strip()
    seconds = finite(text)
    if seconds is not None:
        return seconds
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _until(text: str, now: float) -> float | None:
    """Seconds until the time in ``text``: a duration, a unix time, an RFC 3339 or an HTTP date."""
    duration = parse_duration(text)
    if duration is not None:
        return duration - now if duration > _EPOCH_THRESHOLD else duration
    for parse in (lambda t: datetime.fromisoformat(t.replace("Z", "+00:00")), parsedate_to_datetime):
        try:
            when = parse(text)
        except (ValueError, TypeError, IndexError):
            continue
        if when.tzinfo is None:
            continue
        return when.timestamp() - now
    return None


def _reset_hint(headers: Mapping[str, str], now: float) -> float | None:
    exhausted: list[float] = []
    unknown: list[float] = []  # resets whose remaining count was not sent
    for name, value in headers.items():
        lower = name.lower()
        if lower.startswith("x-ratelimit-reset"):
            remaining = lower.replace("reset", "remaining", 1)
        elif lower.startswith("anthropic-ratelimit-") and lower.endswith("-reset"):
            remaining = lower[: -len("-reset")] + "-remaining"
        else:
            continue
        seconds = _until(value, now)
        if seconds is None:
            continue
        left = next((v for k, v in headers.items() if k.lower() == remaining), None)
        if left is None:
            unknown.append(max(0.0, seconds))
        elif left.strip() == "0":
            exhausted.append(max(0.0, seconds))
    if exhausted:
        return max(exhausted)
    return min(unknown) if unknown else None


def retry_hint(headers: Mapping[str, str], now: float) -> float | None:
    """How long the provider asks to wait before the next call, from its response headers (or ``None``):
    between 0 and ``MAX_HINT_S``."""
    hint = _asked(headers, now)
    return None if hint is None else min(max(0.0, hint), MAX_HINT_S)


def _asked(headers: Mapping[str, str], now: float) -> float | None:
    lower = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in lower:
        millis = finite(lower["retry-after-ms"])
        if millis is not None:
            return millis / 1000
    if "retry-after" in lower:
        seconds = _until(lower["retry-after"], now)
        if seconds is not None:
            return seconds
    return _reset_hint(headers, now)
