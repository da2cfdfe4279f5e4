"""``MinuteLimits``: a provider's calls and tokens over the last minute against its rpm and tpm, this adapter's
and (``Peers``) the site's other adapters' as they write them to ``provider-rates``."""

from __future__ import annotations

import pytest

from schemas.cloud import ProviderRate
from services.cloud_adapter.rate import MinuteLimits, Peers, rate_key
from shared.errors import Overloaded


def seen(peers: Peers, rate: ProviderRate) -> None:
    """``rate`` read from the bucket, under its key."""
    peers.seen(rate_key(rate), rate)


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


def test_the_other_adapters_calls_count_against_rpm() -> None:
    """rpm 5, another adapter began 3 calls in the minute: this one may begin 2, the third is refused with
    the wait until the other's oldest second has surely left the minute; then there is room again."""
    clock = Clock()
    peers = Peers("me")
    seen(peers, ProviderRate(provider="p", worker_id="other", calls=[(990, 2), (995, 1)]))
    limits = MinuteLimits("p", rpm=5, tpm=None, peers=peers, clock=clock)
    limits.take()
    limits.take()
    with pytest.raises(Overloaded) as exc:
        limits.take()
    assert "5 calls in the last minute" in exc.value.message
    assert exc.value.retry_after == pytest.approx(991 + 60 - 1000)
    clock.t = 1052.0  # the other's two calls of second 990 have left the minute (its 995 and my two have not)
    limits.take()
    limits.take()
    with pytest.raises(Overloaded):
        limits.take()


def test_the_other_adapters_tokens_count_against_tpm() -> None:
    """tpm 100: 70 tokens of another adapter and 30 of this one fill the minute."""
    clock = Clock()
    peers = Peers("me")
    seen(peers, ProviderRate(provider="p", worker_id="other", tokens=[(998, 70)]))
    limits = MinuteLimits("p", rpm=None, tpm=100, peers=peers, clock=clock)
    limits.take()
    limits.used(30)
    with pytest.raises(Overloaded) as exc:
        limits.take()
    assert "100 tokens in the last minute" in exc.value.message
    assert exc.value.retry_after == pytest.approx(999 + 60 - 1000)


def test_only_the_same_providers_other_adapters_count() -> None:
    """Another provider's calls, this adapter's own entry (read back from the bucket), and an entry deleted
    or older than the minute count for nothing."""
    clock = Clock()
    peers = Peers("me")
    seen(peers, ProviderRate(provider="q", worker_id="other", calls=[(999, 50)]))
    seen(peers, ProviderRate(provider="p", worker_id="me", calls=[(999, 50)]))
    seen(peers, ProviderRate(provider="p", worker_id="gone", calls=[(999, 50)]))
    peers.gone(rate_key(ProviderRate(provider="p", worker_id="gone")))
    seen(peers, ProviderRate(provider="p", worker_id="old", calls=[(900, 50)], updated_at=900))
    limits = MinuteLimits("p", rpm=2, tpm=None, peers=peers, clock=clock)
    limits.take()
    limits.take()
    with pytest.raises(Overloaded):
        limits.take()
    assert peers.counted("p", clock.t).calls == 0


def test_a_tally_is_the_minute_by_second_and_only_when_it_changed() -> None:
    """What this adapter writes for the others: its calls and tokens by second, seconds older than the minute
    left out; nothing while nothing changed. Another adapter reading it counts the same."""
    clock = Clock()
    limits = MinuteLimits("p", rpm=100, tpm=1000, clock=clock)
    assert limits.tally("me") is None
    limits.take()
    limits.used(10)
    clock.t = 1030.5
    limits.take()
    limits.take()
    limits.used(20)
    rate = limits.tally("me")
    assert rate is not None
    assert (rate.provider, rate.worker_id) == ("p", "me")
    assert rate.calls == [(1000, 1), (1030, 2)]
    assert rate.tokens == [(1000, 10), (1030, 20)]
    assert limits.tally("me") is None
    clock.t = 1075.0
    limits.take()
    rate = limits.tally("me")
    assert rate is not None
    assert rate.calls == [(1030, 2), (1075, 1)]
    reader = Peers("other")
    seen(reader, ProviderRate.model_validate_json(rate.model_dump_json()))
    assert reader.counted("p", clock.t).calls == 3


def test_a_models_own_minute_is_apart_from_the_providers_and_the_other_models() -> None:
    """A model's rpm counts its calls alone, and the other adapters' calls of that model: another model of
    the provider, and the provider's own count, are other minutes."""
    clock = Clock()
    peers = Peers("me")
    seen(peers, ProviderRate(provider="p", model="big", worker_id="other", calls=[(999, 1)]))
    seen(peers, ProviderRate(provider="p", model="small", worker_id="other", calls=[(999, 9)]))
    seen(peers, ProviderRate(provider="p", worker_id="other", calls=[(999, 9)]))
    big = MinuteLimits("p", rpm=2, tpm=None, peers=peers, clock=clock, model="big")
    big.take()
    with pytest.raises(Overloaded) as exc:
        big.take()
    assert exc.value.message.startswith("model big of provider p had 2 calls in the last minute, its rpm (2)")
    rate = big.tally("me")
    assert rate is not None
    assert (rate.provider, rate.model, rate.calls) == ("p", "big", [(1000, 1)])
    assert rate_key(rate) != rate_key(ProviderRate(provider="p", worker_id="me"))
    assert rate_key(rate).startswith("p.me.")
