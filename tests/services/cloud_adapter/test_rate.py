"""``MinuteLimits``: a provider's calls and tokens over the last minute against its rpm and tpm."""

from __future__ import annotations

import pytest

from services.cloud_adapter.rate import MinuteLimits
from shared.errors import Overloaded


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rpm_counts_calls_over_a_sliding_minute() -> None:
    """3 a minute: the 4th call within the minute is refused with the wait until the oldest leaves it; a
    minute after the first, one more is allowed."""
    clock = Clock()
    limits = MinuteLimits("p", rpm=3, tpm=None, clock=clock)
    for _ in range(3):
        limits.take()
        clock.t += 10
    with pytest.raises(Overloaded) as exc:
        limits.take()
    assert exc.value.code == "provider_rate_limit"
    assert exc.value.retry_after == pytest.approx(30)
    clock.t += 30
    limits.take()
    with pytest.raises(Overloaded):
        limits.take()


def test_tpm_counts_the_tokens_used() -> None:
    """tpm 100: calls go on until the minute's tokens reach 100, then wait for the oldest tokens to leave."""
    clock = Clock()
    limits = MinuteLimits("p", rpm=None, tpm=100, clock=clock)
    limits.take()
    limits.used(60)
    clock.t += 5
    limits.take()
    limits.used(40)
    with pytest.raises(Overloaded) as exc:
        limits.take()
    assert "tpm" in exc.value.message
    assert exc.value.retry_after == pytest.approx(55)
    clock.t += 55
    limits.take()  # the first 60 tokens left the minute


def test_without_limits_nothing_is_counted() -> None:
    limits = MinuteLimits("p", rpm=None, tpm=None)
    assert not limits.limited
    limits.used(10**9)
    limits.take()
