"""The router's live state, as one decision sees it."""

from __future__ import annotations

import time

import pytest

from schemas.cloud import BreakerState, BudgetStatus, ProviderHealth, budget_window
from schemas.control import ModelInfo, WorkerHeartbeat
from services.router.catalog import Catalog
from services.router.decide import Facts, plan
from services.router.masking import Masker
from services.router.policy import Policy
from services.router.signals import Signals
from services.router.state import LiveState
from services.router.watch import budget_updates
from shared.errors import BudgetExceeded, ModelNotFound, Unavailable


def state_with(*models: tuple[str, str], inflight: int = 0) -> LiveState:
    catalog = Catalog("edge1")
    catalog.seen(WorkerHeartbeat(worker_id="w", service="local-inference", site="edge1", inflight=inflight,
                                 capacity=1, models=[ModelInfo(name=n, kind=k) for n, k in models]))  # type: ignore[arg-type]
    return LiveState(catalog, Policy(), Masker(()))


class TestConditions:
    def test_only_chat_models_are_chat_targets(self) -> None:
        """A chat request naming an embeddings model is a 404, not work for a worker that cannot do it."""
        state = state_with(("small", "chat"), ("minilm", "embeddings"))
        assert state.conditions("t").local_models == {"small"}
        with pytest.raises(ModelNotFound):
            plan(state.policy, Facts("minilm", "t", None, False, Signals(1, 0)), state.conditions("t"))

    def test_the_cloud_models_are_known_once_every_live_adapter_says_them(self) -> None:
        """The cloud models a decision knows are those the live cloud-adapters are configured for, added up;
        unknown (None) while no adapter is heard from or one does not say (an older adapter)."""
        state = state_with(("small", "chat"))
        assert state.conditions("t").cloud_models is None

        def adapter(worker_id: str, cloud: list[str] | None) -> WorkerHeartbeat:
            return WorkerHeartbeat(worker_id=worker_id, service="cloud-adapter", site="edge1", models=[],
                                   cloud_models=cloud)

        state.catalog.seen(adapter("ca-1", ["openai/gpt-4o"]))
        state.catalog.seen(adapter("ca-2", ["anthropic/claude"]))
        assert state.conditions("t").cloud_models == {"openai/gpt-4o", "anthropic/claude"}
        state.catalog.seen(adapter("ca-old", None))
        assert state.conditions("t").cloud_models is None

    def test_only_the_sites_own_adapters_make_a_model_free_of_the_uplink(self) -> None:
        """A `local: true` provider of the site's own adapter is reachable without the uplink; one of a hub
        adapter is not (it is on the hub's network)."""
        state = state_with(("small", "chat"))
        for site, models in (("edge1", ["lan/llama"]), ("hub", ["hublan/big"])):
            state.catalog.seen(WorkerHeartbeat(worker_id=f"ca-{site}", service="cloud-adapter", site=site,
                                               models=[], cloud_models=models, uplink_free=models))
        assert state.conditions("t").uplink_free == {"lan/llama"}
        assert not state.needs_uplink("lan/llama")
        assert state.needs_uplink("hublan/big")
        assert state.needs_uplink("openai/gpt-4o")


    def test_busy_workers_saturate_their_model(self) -> None:
        """A model whose every worker is at capacity is saturated."""
        assert state_with(("small", "chat"), inflight=1).conditions("t").saturated == {"small"}
        assert state_with(("small", "chat")).conditions("t").saturated == frozenset()

    def test_sites_spending_adds_up(self) -> None:
        """Two sites whose entries each say 'ok' but together spent the limit: the budget is exhausted; a
        warning one site saw stays a warning while the total is under the limit."""
        state = state_with(("small", "chat"))
        now = time.time()
        for site, spent, level in (("hub", 0.6, "warning"), ("plant1", 0.3, "ok")):
            state.budget_changed(f"global.daily.{site}", BudgetStatus(
                scope="global", period="daily", window=budget_window("daily", now), spent_usd=spent, limit_usd=1,
                state=level, site=site))
        assert state.budget_level("t", now) == "warning"
        state.budget_changed("global.daily.plant1", BudgetStatus(
            scope="global", period="daily", window=budget_window("daily", now), spent_usd=0.4, limit_usd=1,
            state="ok", site="plant1"))
        assert state.budget_level("t", now) == "exhausted"

    def test_an_open_breaker_is_half_open_once_its_time_is_up(self) -> None:
        """While open, a provider's models are refused with Retry-After = until it half-opens; from then on
        the router sends the probe even before the adapter's ``half_open`` arrives."""
        state = state_with(("small", "chat"))
        now = time.time()
        state.provider_changed(ProviderHealth(provider="fk", state=BreakerState.OPEN, since=now - 20,
                                              probe_at=now + 9.5))
        with pytest.raises(Unavailable) as refused:
            plan(state.policy, Facts("fk/ok", "t", None, False, Signals(1, 0)), state.conditions("t", now))
        assert refused.value.retry_after == 10
        assert "fk circuit open" in refused.value.message
        later = state.conditions("t", now + 10)
        assert later.provider_health["fk"] == "half_open"
        assert plan(state.policy, Facts("fk/ok", "t", None, False, Signals(1, 0)), later).chain == ("fk/ok",)
        state.provider_changed(ProviderHealth(provider="fk", state=BreakerState.CLOSED, since=now + 11))
        assert state.probe_at == {}

    def test_an_edge_reads_the_breaker_of_the_adapters_that_take_its_calls(self) -> None:
        """A provider the site's own cloud-adapter has: its breaker; one only the hub's adapters have (the site
        has none of its own, or one without that provider): the hub's, from the edge's mirror."""
        state = state_with(("small", "chat"))
        now = time.time()
        state.provider_changed(ProviderHealth(provider="fk", state=BreakerState.OPEN, since=now - 20,
                                              probe_at=now + 10), hub=True)
        state.provider_changed(ProviderHealth(provider="other", state=BreakerState.HALF_OPEN, since=now), hub=True)
        seen = state.conditions("t", now)
        assert seen.provider_health == {"fk": "open", "other": "half_open"}  # no adapter of the site's own
        assert seen.probes_in == {"fk": pytest.approx(10)}
        with pytest.raises(Unavailable, match="fk circuit open"):
            plan(state.policy, Facts("fk/ok", "t", None, False, Signals(1, 0)), seen)
        # the site's own adapter, for fk only (its breaker closed, never moved: no entry)
        state.catalog.seen(WorkerHeartbeat(worker_id="a", service="cloud-adapter", site="edge1", inflight=0,
                                           capacity=1, models=[], cloud_models=["fk/ok"]))
        seen = state.conditions("t", now)
        assert seen.provider_health == {"other": "half_open"}
        assert seen.probes_in == {}
        assert plan(state.policy, Facts("fk/ok", "t", None, False, Signals(1, 0)), seen).chain == ("fk/ok",)
        state.provider_changed(ProviderHealth(provider="fk", state=BreakerState.HALF_OPEN, since=now))
        assert state.conditions("t", now).provider_health == {"fk": "half_open", "other": "half_open"}
        # the hub's entry deleted: the site's own is all there is
        state.provider_gone("other", hub=True)
        assert state.conditions("t", now).provider_health == {"fk": "half_open"}

    def test_a_cloud_model_only_the_hubs_adapters_have_is_sent_on_the_hubs_subject(self) -> None:
        """An edge's cloud work goes on its own subject (its adapters and the hub's read it, NATS preferring the
        local one), but a model the site's live adapters lack and a hub adapter has goes on ``hub``'s, which
        only the hub's adapters read: the site's adapter would take it and refuse it with a 404."""
        state = state_with(("small", "chat"))
        assert state.cloud_site("oai/gpt") == "edge1"  # no adapter heard of: the site's subject, as always

        def adapter(worker: str, site: str, chat: list[str] | None, embeddings: list[str] | None = None) -> None:
            state.catalog.seen(WorkerHeartbeat(worker_id=worker, service="cloud-adapter", site=site, inflight=0,
                                               capacity=1, models=[], cloud_models=chat, cloud_embeddings=embeddings))

        adapter("hub-a", "hub", ["oai/gpt", "vllm/llama"], ["oai/embed"])
        # the site has no live adapter: the hub's subject (one of the site's that hangs, its heartbeats gone
        # but its subscription not, would take the request on the site's and never answer)
        assert state.cloud_site("oai/gpt") == "hub"
        adapter("site-a", "edge1", ["vllm/llama"], [])
        assert state.cloud_site("oai/gpt") == "hub"
        assert state.cloud_site("oai/embed", "embeddings") == "hub"
        assert state.cloud_site("vllm/llama") == "edge1"  # the site's own has it: NATS prefers it
        assert state.cloud_site("nobody/x") == "edge1"  # nobody has it: as before (the adapter's 404)
        adapter("site-b", "edge1", None)  # an adapter too old to say what it has: it may have it
        assert state.cloud_site("oai/gpt") == "edge1"
        hub = LiveState(Catalog("hub"), Policy(), Masker(()))
        assert hub.cloud_site("oai/gpt") == "hub"

    def test_a_spent_budget_is_named_in_the_refusal(self) -> None:
        """The router's own refusal names the budget, what was spent and when it resets (Retry-After)."""
        state = state_with(("small", "chat"))
        now = time.time()
        state.budget_changed("tenant-poor.daily.hub", BudgetStatus(
            scope="tenant-poor", period="daily", window=budget_window("daily", now), spent_usd=0.012,
            limit_usd=0.01, state="exhausted", site="hub"))
        with pytest.raises(BudgetExceeded) as refused:
            plan(state.policy, Facts("fk/ok", "poor", None, False, Signals(1, 0)), state.conditions("poor", now))
        assert refused.value.message.startswith("the daily cloud budget of tenant 'poor' ($0.01) is spent: $0.0120")
        assert (refused.value.scope, refused.value.period) == ("tenant-poor", "daily")
        assert refused.value.retry_after is not None
        assert 0 < refused.value.retry_after <= 86_400

    def test_budget_of_a_past_window_does_not_count(self) -> None:
        """An exhausted budget entry of yesterday no longer limits anything; today's does."""
        state = state_with(("small", "chat"))
        now = time.time()
        for window, key in ((budget_window("daily", now - 86_400), "old"), (budget_window("daily", now), "new")):
            state.budget_changed(key, BudgetStatus(scope="global", period="daily", window=window, spent_usd=2,
                                                   limit_usd=1, state="exhausted"))
            expected = "ok" if key == "old" else "exhausted"
            assert state.budget_level("t", now) == expected


async def test_the_uplink_going_down_ends_the_waits_on_it_and_only_then() -> None:
    """Every wait on the uplink (a cloud admission coming across it) ends when it goes down; a probe finding
    it up, or down again, ends none; a wait begun after it went down waits for the next time."""
    state = state_with(("small", "chat"))
    first, second = state.uplink_lost(), state.uplink_lost()
    assert first is second
    state.set_uplink(True)
    assert not first.done()
    state.set_uplink(False)
    assert first.done()
    assert not state.uplink_up
    later = state.uplink_lost()
    state.set_uplink(False)  # still down: no news
    assert not later.done()
    state.set_uplink(True)
    state.set_uplink(False)
    assert later.done()


async def test_the_hub_mirror_feeds_other_sites_only() -> None:
    """At an edge, budget entries from the mirror of the hub's bucket count for the other sites; the site's
    own (fresher in its own bucket) and entries without a site are left out."""
    state = state_with(("small", "chat"))
    on_entry = budget_updates(state, skip_site="edge1")
    window = budget_window("daily", time.time())
    for key, site in (("global.daily.edge1", "edge1"), ("global.daily", None), ("global.daily.hub", "hub")):
        status = BudgetStatus(scope="global", period="daily", window=window, spent_usd=1, limit_usd=1,
                              state="exhausted", site=site)
        await on_entry(key, status.model_dump_json().encode(), 1)
    assert list(state.budgets) == ["global.daily.hub"]
    await on_entry("global.daily.hub", None, 2)
    assert state.budgets == {}
