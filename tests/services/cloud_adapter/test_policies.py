"""Retry waits, the circuit breaker, the cache key and the budget ledger: pure policies, no I/O."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest

from schemas.chat import ChatCompletionRequest, Usage
from schemas.cloud import BreakerState, BudgetStatus
from services.cloud_adapter import cache
from services.cloud_adapter.breaker import Breaker, BreakerPolicy
from services.cloud_adapter.budget import Ledger, window
from services.cloud_adapter.config import Budgets
from services.cloud_adapter.retry import RetryPolicy, parse_duration, retry_hint
from shared.budgets import seconds_left
from shared.errors import BudgetExceeded

NOW = datetime(2026, 11, 21, 22, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class TestRetryWaits:
    def test_full_jitter_stays_under_the_exponential_ceiling(self) -> None:
        """Each wait is drawn between 0 and min(cap, base·2^attempt), so retries spread out."""
        policy, rng = RetryPolicy(max_attempts=10, base_s=0.5, cap_s=8), random.Random(1)
        for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
            waits = [policy.backoff(attempt, rng) for _ in range(200)]
            assert min(waits) >= 0
            assert max(waits) <= ceiling
            assert max(waits) > ceiling * 0.8  # the whole range is used, not a fixed value

    def test_no_wait_after_the_last_attempt(self) -> None:
        """The last allowed try is not followed by a wait: the error goes to the caller."""
        assert RetryPolicy(max_attempts=3).delay(2, None) is None
        assert RetryPolicy(max_attempts=1).delay(0, 0.1) is None

    def test_provider_hint_is_honoured_with_a_little_jitter(self) -> None:
        """A provider's hint is waited for (up to 10% more), and a hint over the limit is not waited for."""
        policy = RetryPolicy(max_attempts=3, max_wait_s=20)
        wait = policy.delay(0, 2.0, random.Random(3))
        assert wait is not None
        assert 2.0 <= wait <= 2.2
        assert policy.delay(0, 21.0) is None

    @pytest.mark.parametrize(("text", "seconds"), [("1s", 1), ("6m0s", 360), ("20ms", 0.02), ("1h2m3.5s", 3723.5),
                                                   ("0.5", 0.5), ("soon", None), ("5x", None)])
    def test_reset_durations(self, text: str, seconds: float | None) -> None:
        """OpenAI's reset durations (1s, 6m0s, 20ms...) are read; anything else is ignored."""
        assert parse_duration(text) == seconds

    def test_retry_after_forms(self) -> None:
        """Retry-After in seconds or as an HTTP date, and retry-after-ms, all give a wait in seconds."""
        assert retry_hint({"Retry-After": "7"}, NOW) == 7
        assert retry_hint({"retry-after-ms": "250"}, NOW) == 0.25
        date = format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True)
        assert retry_hint({"Retry-After": date}, NOW) == pytest.approx(30, abs=1)
        assert retry_hint({}, NOW) is None

    def test_exhausted_limit_reset_wins(self) -> None:
        """Without Retry-After, the reset of the limit that is at 0 is the wait (OpenAI and Anthropic)."""
        openai = {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "1s",
                  "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "12s"}
        assert retry_hint(openai, NOW) == 12
        reset = datetime.fromtimestamp(NOW + 9, UTC).isoformat().replace("+00:00", "Z")
        anthropic = {"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": reset}
        assert retry_hint(anthropic, NOW) == pytest.approx(9)

    def test_reset_of_a_limit_with_requests_left_is_no_hint(self) -> None:
        """A 429 with only a long window's reset for a limit not at 0 is retried with backoff (no hint);
        a reset whose remaining count is not sent still counts."""
        assert retry_hint({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "6m0s"}, NOW) is None
        assert retry_hint({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "6s"}, NOW) == 2

    @pytest.mark.parametrize("headers", [{"Retry-After": "inf"}, {"Retry-After": "nan"}, {"Retry-After": "1e400"},
                                         {"retry-after-ms": "inf"}, {"retry-after-ms": "-nan"},
                                         {"x-ratelimit-reset-requests": "infinity"}])
    def test_a_hint_that_is_no_number_is_ignored(self, headers: dict[str, str]) -> None:
        """``inf`` or ``nan`` from a provider is no hint (it made the gateway fail with a 500)."""
        assert retry_hint(headers, NOW) is None

    def test_a_hint_is_at_most_a_day(self) -> None:
        """A Retry-After date in 2099 is relayed as a day, not as 73 years."""
        assert retry_hint({"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"}, NOW) == 86_400
        assert retry_hint({"Retry-After": "-5"}, NOW) == 0


class TestBreaker:
    def make(self, clock: Clock, **kw: Any) -> Breaker:
        return Breaker("p", BreakerPolicy(**{"failures": 3, "min_calls": 10, "window_s": 10, "open_s": 30, **kw}),
                       clock=clock)

    def test_opens_after_consecutive_failures(self) -> None:
        """Three failures in a row open the breaker; calls are then refused."""
        b = self.make(Clock())
        for _ in range(3):
            assert b.acquire() is False
            b.record(False)
        assert b.state is BreakerState.OPEN
        assert b.acquire() is None

    def test_a_success_resets_the_count(self) -> None:
        """Failures separated by successes do not open it by count."""
        b = self.make(Clock())
        for ok in [False, False, True, False, False, True]:
            b.record(ok)
        assert b.state is BreakerState.CLOSED

    def test_opens_on_error_rate_over_the_window(self) -> None:
        """Half the calls in the window failing (with enough calls) opens it even without a streak."""
        clock = Clock()
        b = self.make(clock, failures=100, error_rate=0.5)
        for i in range(10):
            clock.t += 0.5
            b.record(i % 2 == 0)
        assert b.state is BreakerState.OPEN
        assert b.health().error_rate == pytest.approx(0.5)

    def test_old_failures_leave_the_window(self) -> None:
        """Failures older than the window no longer count toward the error rate."""
        clock = Clock()
        b = self.make(clock, failures=100, error_rate=0.5)
        for _ in range(5):
            b.record(False)
            b.record(True)
        clock.t += 11
        assert b.error_rate() == 0

    def test_half_open_probe_closes_on_success(self) -> None:
        """After open_s, one probe is let through; its success closes the breaker."""
        clock = Clock()
        b = self.make(clock)
        for _ in range(3):
            b.record(False)
        clock.t += 29
        assert b.acquire() is None
        assert b.retry_in() == pytest.approx(1)
        clock.t += 1
        assert b.acquire() is True
        assert b.state is BreakerState.HALF_OPEN
        assert b.acquire() is None  # one probe at a time
        b.record(True, probe=True)
        assert b.state is BreakerState.CLOSED
        assert b.acquire() is False

    def test_tick_half_opens_on_time_without_a_call(self) -> None:
        """No call arrives while open (the router sends none to an open provider): ``tick`` half-opens it
        once open_s has passed, and the published health says when that will be."""
        clock = Clock()
        b = self.make(clock)
        for _ in range(3):
            b.record(False)
        assert b.health().probe_at == pytest.approx(NOW + 30)
        clock.t += 29.9
        b.tick()
        assert b.state is BreakerState.OPEN
        clock.t += 0.1
        b.tick()
        assert b.state is BreakerState.HALF_OPEN
        assert b.health().probe_at is None
        assert b.acquire() is True

    def test_a_restarted_breaker_takes_up_an_open_state(self) -> None:
        """A breaker started afresh (an adapter restarted) and told that the provider's breaker was open until
        a probe time 10 s away stays open that long; a probe time past, a closed state, or a breaker that has
        seen calls already, change nothing; a probe time further than open_s is cut to open_s."""
        clock = Clock()
        before = self.make(clock)
        for _ in range(3):
            before.record(False)
        clock.t += 20
        left_open = before.health()
        b = self.make(clock)
        assert b.resume(left_open)
        assert b.state is BreakerState.OPEN
        assert b.retry_in() == pytest.approx(10)
        assert b.acquire() is None
        assert b.health().probe_at == pytest.approx(left_open.probe_at)
        clock.t += 10
        assert b.acquire() is True
        assert not self.make(clock).resume(left_open)  # its probe time is past
        assert not self.make(clock).resume(left_open.model_copy(update={"state": BreakerState.CLOSED,
                                                                          "probe_at": clock.t + 5}))
        called = self.make(clock)
        called.record(True)
        assert not called.resume(left_open.model_copy(update={"probe_at": clock.t + 5}))
        far = self.make(clock)
        assert far.resume(left_open.model_copy(update={"probe_at": clock.t + 3600}))
        assert far.retry_in() == pytest.approx(30)

    def test_half_open_probe_failure_reopens(self) -> None:
        """A failed probe opens the breaker again for another open_s."""
        clock = Clock()
        b = self.make(clock)
        for _ in range(3):
            b.record(False)
        clock.t += 30
        assert b.acquire() is True
        b.record(False, probe=True)
        assert b.state is BreakerState.OPEN
        assert b.retry_in() == pytest.approx(30)

    def test_state_changes_are_reported(self) -> None:
        """Every change is reported (the adapter publishes it to KV and the metric)."""
        clock, seen = Clock(), []
        b = Breaker("p", BreakerPolicy(failures=1, open_s=1), clock=clock, on_change=lambda br: seen.append(br.state))
        b.record(False)
        clock.t += 1
        b.acquire()
        b.record(True, probe=True)
        assert seen == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
        assert b.health().state is BreakerState.CLOSED


def req(**kw: Any) -> ChatCompletionRequest:
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **kw}
    return ChatCompletionRequest.model_validate(body)


class TestCache:
    @pytest.mark.parametrize(("kw", "uses"), [({"temperature": 0}, True), ({}, False), ({"temperature": 0.7}, False),
                                              ({"temperature": 0.7, "cache": True}, True),
                                              ({"temperature": 0, "cache": False}, False)])
    def test_which_requests_use_it(self, kw: dict[str, Any], uses: bool) -> None:
        """Temperature 0 uses the cache unless the request says cache: false; cache: true opts in."""
        assert cache.eligible(req(**kw)) is uses

    def test_requests_asking_for_logprobs_never_use_it(self) -> None:
        """An entry holds no log probabilities, so a request asking for them is neither served nor stored."""
        assert not cache.eligible(req(temperature=0, logprobs=True))
        assert not cache.eligible(req(cache=True, logprobs=True, top_logprobs=2))
        assert cache.eligible(req(temperature=0, logprobs=False))

    def test_tenants_never_share_keys(self) -> None:
        """The same request from two tenants has two keys, each under its tenant's prefix."""
        a, b = cache.key("acme", "p/m", req()), cache.key("globex", "p/m", req())
        assert a != b
        assert a.startswith(cache.tenant_prefix("acme"))
        assert b.startswith(cache.tenant_prefix("globex"))

    @pytest.mark.parametrize("change", [{"temperature": 0.5}, {"max_tokens": 9}, {"stop": ["x"]}, {"seed": 1},
                                        {"messages": [{"role": "user", "content": "hi!"}]},
                                        {"tools": [{"type": "function", "function": {"name": "f"}}]}])
    def test_what_changes_the_answer_changes_the_key(self, change: dict[str, Any]) -> None:
        """Messages and every generation parameter are part of the key."""
        assert cache.key("t", "p/m", req()) != cache.key("t", "p/m", req(**change))

    def test_equivalent_requests_share_a_key(self) -> None:
        """Text parts equal to a string, stop as a string, max_completion_tokens, stream and user do not
        change the key."""
        plain = req(stop="x", max_tokens=5)
        parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
        same = req(messages=[{"role": "user", "content": parts}],
                   stop=["x"], max_completion_tokens=5, stream=True, user="u1", cache=True)
        assert cache.key("t", "p/m", plain) == cache.key("t", "p/m", same)

    def test_each_sample_of_a_request_has_its_own_key(self) -> None:
        """Choice j of a request of n (Lw-Choice) is its own entry; the first sample's is the request's own."""
        keys = {cache.key("t", "p/m", req(), j) for j in range(3)}
        assert len(keys) == 3
        assert cache.key("t", "p/m", req(), 0) == cache.key("t", "p/m", req())
        assert all(k.startswith(cache.tenant_prefix("t")) for k in keys)

    def test_other_model_other_key(self) -> None:
        """The provider/model is part of the key."""
        assert cache.key("t", "p/m", req()) != cache.key("t", "p/other", req())

    def test_entries_round_trip_and_bad_ones_are_ignored(self) -> None:
        """A stored answer reads back as stored; unreadable or unfinished entries read as absent."""
        entry = cache.Entry({"content": "hello"}, "stop", Usage.of(3, 1))
        assert cache.Entry.decode(entry.encode()) == entry
        assert cache.Entry.decode(b"{oops") is None
        assert cache.Entry.decode(cache.Entry({"content": ""}, "error", Usage.of(1, 0)).encode()) is None


class TestLedger:
    def ledger(self, clock: Clock, **kw: Any) -> Ledger:
        return Ledger(Budgets.model_validate({"global": {"daily_usd": 10}, "tenant_default": {"daily_usd": 1},
                                              "tenants": {"acme": {"monthly_usd": 5}}, **kw}), "edge1", clock=clock)

    def test_windows_are_utc_days_and_months(self) -> None:
        """Budgets count per UTC day and per UTC month; Retry-After is the time until the next one."""
        assert window("daily", NOW) == "2026-11-21"
        assert window("monthly", NOW) == "2026-11"
        assert seconds_left("daily", NOW) == 2 * 3600
        assert seconds_left("monthly", NOW) == (9 * 24 + 2) * 3600

    def test_refuses_once_spent(self) -> None:
        """A tenant that spent its daily limit is refused with budget_exceeded until midnight UTC."""
        ledger = self.ledger(Clock())
        ledger.check("bob")
        ledger.charge("bob", 1.0)
        with pytest.raises(BudgetExceeded) as exc:
            ledger.check("bob")
        assert exc.value.code == "budget_exceeded"
        assert exc.value.status == 429
        assert exc.value.scope == "tenant-bob"
        assert exc.value.retry_after == 2 * 3600
        ledger.check("carol")  # another tenant is not affected

    def test_global_budget_covers_everyone(self) -> None:
        """When everyone together spent the global limit, every tenant is refused."""
        ledger = self.ledger(Clock())
        for i in range(10):
            ledger.charge(f"t{i}", 0.99)
        ledger.charge("t10", 0.2)
        with pytest.raises(BudgetExceeded) as exc:
            ledger.check("someone-new")
        assert exc.value.scope == "global"

    def test_named_tenant_has_its_own_limits(self) -> None:
        """A tenant listed in the file gets its own limits instead of the default ones."""
        ledger = self.ledger(Clock())
        ledger.charge("acme", 4.0)
        ledger.check("acme")  # over the default daily 1, under its own monthly 5
        ledger.charge("acme", 1.0)
        with pytest.raises(BudgetExceeded) as exc:
            ledger.check("acme")
        assert exc.value.period == "monthly"

    def test_the_months_are_written_before_the_days(self) -> None:
        """A router reading the entries as a flush writes them never sees a spent day without its spent month
        (its refusal would say Retry-After: tomorrow, when the month is spent too)."""
        ledger = self.ledger(Clock())
        ledger.charge("acme", 0.5)
        assert [a.period for a in ledger.due()] == ["monthly", "monthly", "daily", "daily"]

    def test_a_new_day_starts_from_zero(self) -> None:
        """Yesterday's spending does not count today."""
        clock = Clock()
        ledger = self.ledger(clock)
        ledger.charge("bob", 1.0)
        for acct in ledger.due():
            ledger.written(acct, acct.pending, 0.0, acct.pending, 1)
        clock.t += 3 * 3600
        ledger.check("bob")

    def test_a_limit_changed_is_written_again_with_nothing_spent(self) -> None:
        """The routers read limits and levels from the bucket: a limit changed by a reload, or an entry written
        under another limit (before a restart with a new file), is written again at the next flush, spending or
        not; an entry that already says the configured limit is not."""
        ledger = self.ledger(Clock())
        ledger.seen(BudgetStatus(scope="tenant-bob", period="daily", window="2026-11-21", spent_usd=1.5,
                                 limit_usd=1, state="exhausted", site="edge1"), revision=3)
        ledger.seen(BudgetStatus(scope="tenant-carol", period="daily", window="2026-11-21", spent_usd=0.2,
                                 limit_usd=0.5, state="ok", site="edge1"), revision=4)
        assert [a.scope for a in ledger.due()] == ["tenant-carol"]  # written under a limit no longer configured
        (carol,) = ledger.due()
        ledger.written(carol, 0.0, 0.2, 0.2, 5)
        assert ledger.due() == []
        ledger.configure(Budgets.model_validate({"global": {"daily_usd": 10}, "tenant_default": {"daily_usd": 2}}))
        assert sorted(a.scope for a in ledger.due()) == ["tenant-bob", "tenant-carol"]
        bob = ledger.account("tenant-bob", "daily")
        assert ledger.status(bob, bob.known).state == "ok"  # what the next flush writes: 1.5 of 2
        ledger.check("bob")

    def test_other_adapters_spending_counts(self) -> None:
        """What other adapters of the site wrote to the bucket counts once seen."""
        ledger = self.ledger(Clock())
        ledger.seen(BudgetStatus(scope="tenant-bob", period="daily", window="2026-11-21", spent_usd=1.5,
                                 limit_usd=1, state="exhausted", site="edge1"), revision=7)
        with pytest.raises(BudgetExceeded):
            ledger.check("bob")
        ledger.seen(BudgetStatus(scope="tenant-dave", period="daily", window="2026-11-20", spent_usd=9,
                                 limit_usd=1, state="exhausted", site="edge1"), revision=8)
        ledger.check("dave")  # yesterday's entry

    def test_every_sites_spending_counts(self) -> None:
        """Another site's spending adds to this site's against the same budget: the total refuses, an entry of
        another day does not count, and a site's entry deleted no longer counts."""
        ledger = self.ledger(Clock())

        def elsewhere(site: str, spent: float, window: str = "2026-11-21") -> BudgetStatus:
            return BudgetStatus(scope="tenant-bob", period="daily", window=window, spent_usd=spent, limit_usd=1,
                                state="ok", site=site)

        ledger.seen(elsewhere("hub", 0.6), revision=3)
        ledger.seen(elsewhere("plant2", 5.0, window="2026-11-20"), revision=4)
        ledger.charge("bob", 0.3)
        ledger.check("bob")  # 0.9 of 1
        acct = ledger.account("tenant-bob", "daily")
        written = ledger.status(acct, 0.3)
        assert (written.site, written.spent_usd, written.state) == ("edge1", 0.3, "warning")
        assert written.total_usd == pytest.approx(0.9)
        assert acct.key == "tenant-bob.daily.edge1"
        ledger.charge("bob", 0.1)
        with pytest.raises(BudgetExceeded, match=r"the daily cloud budget of tenant .bob. \(\$1\) is spent"):
            ledger.check("bob")
        ledger.cleared("tenant-bob.daily.hub")
        ledger.check("bob")  # 0.4 of 1
        ledger.cleared("junk")  # no key of a ledger: nothing happens

    def test_a_crossing_counts_the_other_sites(self) -> None:
        """A write that takes the total (not this site's share) across 80% reports the warning."""
        ledger = self.ledger(Clock())
        ledger.seen(BudgetStatus(scope="tenant-bob", period="daily", window="2026-11-21", spent_usd=0.75,
                                 limit_usd=1, state="ok", site="hub"), revision=1)
        acct = ledger.account("tenant-bob", "daily")
        assert ledger.written(acct, 0.1, 0.0, 0.1, 1) == ["warning"]

    def test_an_entry_from_before_sites_still_counts(self) -> None:
        """An entry written before budgets counted sites (key ``<scope>.<period>``, no site) is what was spent
        earlier in the window: it adds to what the site writes now."""
        ledger = self.ledger(Clock())
        ledger.seen(BudgetStatus(scope="tenant-bob", period="daily", window="2026-11-21", spent_usd=0.5,
                                 limit_usd=1, state="ok"), revision=1)
        ledger.seen(BudgetStatus(scope="tenant-bob", period="daily", window="2026-11-21", spent_usd=0.3,
                                 limit_usd=1, state="ok", site="edge1"), revision=2)
        assert ledger.account("tenant-bob", "daily").spent == pytest.approx(0.8)

    def test_crossings_are_reported_once(self) -> None:
        """Writes crossing 80% and then 100% report warning then exhausted; writes within a level none."""
        ledger = self.ledger(Clock())
        acct = ledger.account("tenant-bob", "daily")
        assert ledger.written(acct, 0.5, 0.0, 0.5, 1) == []
        assert ledger.written(acct, 0.3, 0.5, 0.8, 2) == ["warning"]
        assert ledger.written(acct, 0.1, 0.8, 0.9, 3) == []
        assert ledger.written(acct, 0.1, 0.9, 1.0, 4) == ["exhausted"]
        assert ledger.status(acct, 1.0).state == "exhausted"
        other = ledger.account("tenant-carol", "daily")
        assert ledger.written(other, 1.2, 0.0, 1.2, 5) == ["warning", "exhausted"]  # one jump crosses both

    def test_unlimited_scopes_are_still_counted(self) -> None:
        """Spending is recorded even where no limit is set (monthly here), and never refused."""
        ledger = self.ledger(Clock())
        ledger.charge("bob", 0.5)
        monthly = ledger.account("tenant-bob", "monthly")
        assert monthly.spent == 0.5
        assert monthly.limit is None
