"""What the router knows of the world, kept current from KV watches, heartbeats and an uplink probe.

``LiveState`` is plain data plus small update methods; the NATS side (``watch.py``) feeds it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from schemas.cloud import BreakerState, BudgetStatus, ProviderHealth
from schemas.control import ModelKind, WorkerHeartbeat
from services.router.catalog import Catalog
from services.router.decide import Conditions, provider_of
from services.router.masking import Masker
from services.router.policy import BudgetLevel, Health, Policy
from shared import budgets, subjects
from shared.budgets import Total

MAX_REMEMBERED = 10_000  # tenants whose budget level is kept for the current second
CLOUD_ADAPTER = "cloud-adapter"


def cloud_adapters(workers: list[WorkerHeartbeat]) -> list[WorkerHeartbeat]:
    """The cloud-adapters among live workers."""
    return [b for b in workers if b.service == CLOUD_ADAPTER]


def models_of(adapter: WorkerHeartbeat, kind: ModelKind) -> list[str] | None:
    """The cloud models of ``kind`` a cloud-adapter is configured for (``None``: one too old to say)."""
    return adapter.cloud_models if kind == "chat" else adapter.cloud_embeddings


def offers(adapter: WorkerHeartbeat, model: str, kind: ModelKind) -> bool:
    """Whether a cloud-adapter is configured for ``model`` of ``kind`` (one too old to say: taken as yes)."""
    names = models_of(adapter, kind)
    return names is None or model in names


def configured(adapters: list[WorkerHeartbeat], kind: ModelKind) -> frozenset[str] | None:
    """Every cloud model of ``kind`` the live cloud-adapters are configured for; ``None`` (unknown) when none
    is heard from, or one is too old to say."""
    lists = [models_of(b, kind) for b in adapters]
    if not lists or any(names is None for names in lists):
        return None
    return frozenset(m for names in lists for m in names or ())


@dataclass
class LiveState:
    """The router's current policy and view of targets."""

    catalog: Catalog
    policy: Policy
    masker: Masker
    policy_source: str = "file"
    file_policy: Policy | None = None
    policy_at: int = field(default_factory=lambda: int(time.time()))  # unix time the policy took effect here
    uplink_up: bool = True
    provider_health: dict[str, Health] = field(default_factory=dict)  # the breakers of the site's own adapters
    probe_at: dict[str, float] = field(default_factory=dict)  # open breakers: when each lets a probe through
    hub_health: dict[str, Health] = field(default_factory=dict)  # an edge's: the hub's adapters', mirrored
    hub_probe_at: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, BudgetStatus] = field(default_factory=dict)
    masked: Counter[str] = field(default_factory=Counter)
    # tenant → (second, level, the exhausted budget if any)
    _levels: dict[str, tuple[int, BudgetLevel, Total | None]] = field(default_factory=dict)
    _uplink_lost: asyncio.Future[None] | None = field(default=None, repr=False, compare=False)

    def set_uplink(self, up: bool) -> None:
        """The uplink probe's finding; going down ends every wait on ``uplink_lost``."""
        went_down, self.uplink_up = self.uplink_up and not up, up
        if went_down and self._uplink_lost is not None:
            if not self._uplink_lost.done():
                self._uplink_lost.set_result(None)
            self._uplink_lost = None

    def uplink_lost(self) -> asyncio.Future[None]:
        """Done when the uplink next goes down (one future shared by every wait until then)."""
        if self._uplink_lost is None or self._uplink_lost.done():
            self._uplink_lost = asyncio.get_running_loop().create_future()
        return self._uplink_lost

    def needs_uplink(self, target: str) -> bool:
        """Whether a cloud ``target``'s answer comes across the uplink: none of this site's adapters calls it
        on the site's own network (a ``local: true`` provider)."""
        return target not in self._uplink_free(self.catalog.alive())

    def cloud_site(self, target: str, kind: ModelKind = "chat") -> str:
        """The site token a cloud ``target``'s work is sent on: the router's own, which the site's adapters and
        the hub's (listening on every site) read, NATS giving a queue group's local member the request; or
        ``hub``, which only the hub's adapters read, when no live adapter of the site has ``target`` and a hub
        adapter has it: a site's adapter for its own vLLM only, say, would refuse the hub's models with 404,
        and one that hangs (no heartbeat, its subscription still there) would take them and never answer."""
        site = self.catalog.site
        if site == subjects.HUB:
            return site
        adapters = cloud_adapters(self.catalog.alive())
        if any(b.site == site and offers(b, target, kind) for b in adapters):
            return site
        theirs = any(b.site == subjects.HUB and offers(b, target, kind) for b in adapters)
        return subjects.HUB if theirs else site

    def _uplink_free(self, workers: list[WorkerHeartbeat]) -> frozenset[str]:
        return frozenset(m for b in cloud_adapters(workers) if b.site == self.catalog.site for m in b.uplink_free)

    def use_policy(self, policy: Policy, source: str) -> None:
        """Switch to a validated policy (masking patterns are compiled first, so a bad one fails here)."""
        masker = Masker.from_policy(policy.masking)
        self.policy, self.masker, self.policy_source = policy, masker, source
        self.policy_at = int(time.time())

    def provider_changed(self, health: ProviderHealth, hub: bool = False) -> None:
        """A provider's breaker moved: at the site's own adapters, or (``hub``) at the hub's."""
        states, probes = (self.hub_health, self.hub_probe_at) if hub else (self.provider_health, self.probe_at)
        states[health.provider] = health.state.value
        if health.state is BreakerState.OPEN and health.probe_at is not None:
            probes[health.provider] = health.probe_at
        else:
            probes.pop(health.provider, None)

    def provider_gone(self, provider: str, hub: bool = False) -> None:
        """A provider's health entry was deleted."""
        states, probes = (self.hub_health, self.hub_probe_at) if hub else (self.provider_health, self.probe_at)
        states.pop(provider, None)
        probes.pop(provider, None)

    def _breakers(self, workers: list[WorkerHeartbeat]) -> tuple[dict[str, Health], dict[str, float]]:
        """Each provider's breaker as the adapters that take this site's calls of it have it: the site's own
        where one of them has the provider (NATS gives a queue group's local member the request), else the
        hub's (an edge's mirror of them), else whatever entry there is."""
        if not self.hub_health:  # the hub, a site that has not heard of the hub's, or all closed and never moved
            return dict(self.provider_health), self.probe_at
        own = {provider_of(m) for b in cloud_adapters(workers) if b.site == self.catalog.site
               for m in b.cloud_models or ()}
        health = {**self.provider_health, **{p: h for p, h in self.hub_health.items() if p not in own}}
        probes = {**{p: t for p, t in self.probe_at.items() if p not in self.hub_health or p in own},
                  **{p: t for p, t in self.hub_probe_at.items() if p not in own}}
        return health, probes

    def budget_changed(self, key: str, status: BudgetStatus | None) -> None:
        """A budget ledger entry changed (``None``: deleted)."""
        if status is None:
            self.budgets.pop(key, None)
        else:
            self.budgets[key] = status
        self._levels.clear()

    def budget_level(self, tenant: str, now: float | None = None) -> BudgetLevel:
        """The worst of the global and the tenant's budgets, daily and monthly, in the current windows."""
        return self.budget_state(tenant, now)[0]

    def budget_state(self, tenant: str, now: float | None = None) -> tuple[BudgetLevel, Total | None]:
        """The worst level of the global and the tenant's budgets, daily and monthly, in the current windows,
        and the budget that is exhausted, if one is.

        Each site's entry says the level its writer saw; the sites' spending is also added up here, so a
        budget that two sites spent together is exhausted even when neither knew of the other's last
        spending. An entry of a past day or month no longer limits anything (a new window starts from zero).
        """
        if not self.budgets:
            return "ok", None
        now = time.time() if now is None else now
        second = int(now)  # asked for every request: the answer is kept until the entries change or a second passes
        known = self._levels.get(tenant)
        if known is not None and known[0] == second:
            return known[1], known[2]
        found = budgets.totals(self.budgets.values(), now, {subjects.GLOBAL_SCOPE, subjects.tenant_scope(tenant)})
        level: BudgetLevel = max((t.level for t in found), key=budgets.SEVERITY.__getitem__, default="ok")
        # of those spent, the one that resets last: its Retry-After is when the tenant can be served again
        spent = max((t for t in found if t.level == "exhausted"), key=lambda t: budgets.seconds_left(t.period, now),
                    default=None)
        if len(self._levels) >= MAX_REMEMBERED:
            self._levels.clear()
        self._levels[tenant] = (second, level, spent)
        return level, spent

    def conditions(self, tenant: str, now: float | None = None) -> Conditions:
        """A snapshot for one decision."""
        now = time.time() if now is None else now
        workers = self.catalog.alive(now)
        served = frozenset(m.name for b in workers for m in b.models if m.kind == "chat")
        saturated = frozenset(
            name for name in served
            if all(b.inflight >= b.capacity for b in workers if any(m.name == name for m in b.models)))
        health, probe_at = self._breakers(workers)
        probes_in: dict[str, float] = {}
        for provider, at in probe_at.items():  # an open breaker whose time is up is half open, even unheard
            if health.get(provider) == "open":
                if at <= now:
                    health[provider] = "half_open"
                else:
                    probes_in[provider] = at - now
        level, spent = self.budget_state(tenant, now)
        return Conditions(uplink_up=self.uplink_up, budget=level, spent_budget=spent, provider_health=health,
                          probes_in=probes_in, local_models=served, saturated=saturated, now=now,
                          served_before=self.catalog.served_before,
                          cloud_models=configured(cloud_adapters(workers), "chat"),
                          uplink_free=self._uplink_free(workers))

    def cloud_embeddings(self) -> frozenset[str] | None:
        """Every cloud embeddings model the live cloud-adapters are configured for (``None``: unknown)."""
        return configured(cloud_adapters(self.catalog.alive()), "embeddings")
