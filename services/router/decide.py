"""The routing decision: which targets to try, in what order, and why. Pure: no NATS, no clock.

1. Aliases resolve the requested model (an A/B alias picks a sticky variant).
2. The first rule whose conditions hold gives the route.
3. Guards drop targets that must not or cannot be used, whatever the rule says: cloud targets when the
   request must stay on site, when the uplink is down, when the budget is exhausted, or when the
   provider's breaker is open; local models whose workers are all saturated, or that cannot honour what
   the request asks for (tools, JSON mode, images...: ``shared.local_params``).
4. The policy's last resort (the local model, unless turned off) closes every chain.
5. What is left is tried in order until one takes the request.

Embeddings requests for a cloud model (``embeddings_plan``) resolve aliases and pass the same guards, but
no rule and no fallback: another model's vectors are of another space, useless beside this one's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from schemas.chat import ChatCompletionRequest
from schemas.control import RouteDecision
from services.router.policy import LOCAL, REQUESTED, BudgetLevel, Experiment, Health, Policy, Rule, When
from services.router.signals import Signals
from services.router.variants import pick
from shared import budgets
from shared.errors import BudgetExceeded, InvalidRequest, LeafwireError, ModelNotFound, Overloaded, Unavailable
from shared.local_params import local_refusal

AUTO = "auto"
MAX_ALIAS_DEPTH = 4
UNCONFIGURED = "no cloud-adapter is configured for it"  # a skip that waiting does not undo
UPLINK_RETRY_S = 5  # the uplink down: a guess at when to look again


class ResidencyViolation(LeafwireError):
    """The request must stay on the site and nothing on the site can answer it."""

    status = 403
    type = "permission_error"
    default_code = "data_residency"


def is_cloud(model: str) -> bool:
    """Cloud models are named ``<provider>/<model>``."""
    return "/" in model


def provider_of(model: str) -> str:
    """The provider part of a cloud model name."""
    return model.split("/", 1)[0]


@dataclass(frozen=True, slots=True)
class Facts:
    """What the router knows about the request."""

    model: str
    tenant: str
    user: str | None
    onsite: bool
    signals: Signals
    request: ChatCompletionRequest | None = None  # read for what a local model cannot honour (None: nothing)


@dataclass(frozen=True)
class Conditions:
    """What the router knows about the world right now."""

    uplink_up: bool = True
    budget: BudgetLevel = "ok"
    spent_budget: budgets.Total | None = None  # the budget that is exhausted, when one is
    provider_health: Mapping[str, Health] = field(default_factory=dict)
    probes_in: Mapping[str, float] = field(default_factory=dict)  # open breakers: seconds until each half-opens
    local_models: frozenset[str] = frozenset()
    saturated: frozenset[str] = frozenset()
    now: float = field(default_factory=time.time)
    cloud_models: frozenset[str] | None = None  # every cloud model a live cloud-adapter is configured for (None:
    # unknown: no adapter heard from, or one too old to say)
    uplink_free: frozenset[str] = frozenset()  # cloud models of `local: true` providers of the site's adapters
    served_before: frozenset[str] = frozenset()  # local models some worker served since the router started


@dataclass(frozen=True)
class Plan:
    """The targets to try in order, and the story of how they were chosen."""

    requested: str | None
    rule: str
    chain: tuple[str, ...]
    variant: str | None = None
    skipped: tuple[tuple[str, str], ...] = ()

    def decision(self, target: str, failed: list[tuple[str, str]] | None = None) -> RouteDecision:
        """The ``RouteDecision`` for serving with ``target`` (after ``failed`` earlier targets)."""
        reasons = [f"rule {self.rule}"]
        reasons += [f"skipped {t} ({why})" for t, why in self.skipped]
        reasons += [f"fell back from {t} ({why})" for t, why in failed or []]
        kind = "cloud" if is_cloud(target) else "local"
        return RouteDecision(target=f"{kind}/{target}" if kind == "local" else target, rule=self.rule,
                             reason=", ".join(reasons), variant=self.variant)

    def header(self, target: str, failed: list[tuple[str, str]] | None = None) -> str:
        """``decision(target, failed)`` in its header form; the same few plans route most requests, so the
        string is built once per distinct plan and fallback history."""
        return _route_header(self, target, tuple(failed or ()))


@lru_cache(maxsize=4096)
def _route_header(plan: Plan, target: str, failed: tuple[tuple[str, str], ...]) -> str:
    return plan.decision(target, list(failed)).header()


def resolve(policy: Policy, model: str, user: str | None, tenant: str) -> tuple[str | None, str | None]:
    """The model an alias stands for (``None`` for ``auto``), and the A/B variant picked, if any."""
    variant = None
    for _ in range(MAX_ALIAS_DEPTH):
        alias = policy.aliases.get(model)
        if alias is None:
            break
        if isinstance(alias, Experiment):
            chosen = pick(model, alias, user, tenant)
            variant, model = chosen.name, chosen.target
        else:
            model = alias
    return (None if model == AUTO else model), variant


def holds(when: When, facts: Facts, requested: str | None, conditions: Conditions) -> bool:
    """True when every condition the rule gives holds."""
    return ((when.tenant is None or facts.tenant in when.tenant)
            and (when.model is None or facts.model in when.model or (requested or AUTO) in when.model)
            and (when.residency is None or (when.residency == "onsite") == facts.onsite)
            and (when.prompt_tokens is None or when.prompt_tokens.holds(facts.signals.prompt_tokens))
            and (when.complexity is None or when.complexity.holds(facts.signals.complexity))
            and (when.budget is None or conditions.budget in when.budget)
            and (when.uplink is None or (when.uplink == "up") == conditions.uplink_up)
            and (when.provider_health is None or all(conditions.provider_health.get(p, "closed") in states
                                                     for p, states in when.provider_health.items())))


def first_rule(policy: Policy, facts: Facts, requested: str | None, conditions: Conditions) -> Rule:
    """The first rule that matches; a policy without a catch-all falls back to ``[requested]``."""
    for rule in policy.rules:
        if holds(rule.when, facts, requested, conditions):
            return rule
    return Rule(name="implicit-default", route=[REQUESTED])


def expand(route: list[str], requested: str | None, policy: Policy) -> list[str]:
    """Route entries as model names, without duplicates (``requested`` is skipped for ``auto``)."""
    out: list[str] = []
    for entry in route:
        model = requested if entry == REQUESTED else policy.local_model if entry == LOCAL else entry
        if model and model not in out:
            out.append(model)
    return out


def guard(model: str, facts: Facts, conditions: Conditions) -> str | None:
    """Why ``model`` must not be tried now, or ``None``."""
    if is_cloud(model):
        if conditions.cloud_models is not None and model not in conditions.cloud_models:
            return UNCONFIGURED
        return cloud_guard(model, facts, conditions)
    if model in conditions.saturated:
        return "all workers busy"
    return None


def cloud_guard(model: str, facts: Facts, conditions: Conditions) -> str | None:
    """Why the cloud model ``model``, configured at an adapter, must not be asked now, or ``None``."""
    if facts.onsite:
        return "data must stay on site"
    if not conditions.uplink_up and model not in conditions.uplink_free:
        return "uplink down"
    if conditions.budget == "exhausted":
        return "budget exhausted"
    if conditions.provider_health.get(provider_of(model)) == "open":
        return f"{provider_of(model)} circuit open"
    return None


def incapable(model: str, facts: Facts) -> InvalidRequest | None:
    """Why the local model ``model`` would refuse the request (a parameter it cannot honour), or ``None``."""
    return None if facts.request is None or is_cloud(model) else local_refusal(model, facts.request)


def capability(refused: InvalidRequest) -> str:
    """A refusal of ``incapable`` as a skip reason."""
    return "reads text only" if refused.param == "messages" else f"does not support {refused.param}"


def plan(policy: Policy, facts: Facts, conditions: Conditions) -> Plan:
    """Decide the ordered targets for a request; raise when nothing may serve it."""
    requested, variant = resolve(policy, facts.model, facts.user, facts.tenant)
    if requested is not None:
        known = conditions.cloud_models if is_cloud(requested) else conditions.local_models
        if known is not None and requested not in known and not returning(requested, policy, conditions):
            raise ModelNotFound(facts.model)  # a cloud model is taken on trust while none is known
    rule = first_rule(policy, facts, requested, conditions)
    chain, skipped = [], []
    refusals: dict[str, InvalidRequest] = {}
    route = rule.route + ([LOCAL] if policy.last_resort == LOCAL and policy.local_model else [])
    for model in expand(route, requested, policy):
        refused = incapable(model, facts)
        if refused is not None:
            refusals[model] = refused
        why = guard(model, facts, conditions) if refused is None else capability(refused)
        if why is None:
            chain.append(model)
        else:
            skipped.append((model, why))
    if not chain:
        raise refusal(rule, held_back(requested, skipped, facts, conditions, refusals), conditions, facts.tenant,
                      refusals)
    return Plan(requested, rule.name, tuple(chain), variant, tuple(skipped))


EMBEDDINGS = Rule(name="embeddings", route=[REQUESTED])  # the rule every embeddings request is routed by


def embeddings_plan(model: str, variant: str | None, facts: Facts, conditions: Conditions,
                    known: frozenset[str] | None) -> Plan:
    """The plan of an embeddings request for the cloud model ``model`` (aliases resolved): that model alone.
    404 when no live adapter is configured for it as an embeddings model (``known``; ``None``: taken on trust,
    as chat's), else what would keep a chat request from it now: residency, the uplink, a budget, a breaker."""
    if known is not None and model not in known:
        raise ModelNotFound(facts.model)
    why = cloud_guard(model, facts, conditions)
    if why is not None:
        raise refusal(EMBEDDINGS, [(model, why)], conditions, facts.tenant)
    return Plan(model, EMBEDDINGS.name, (model,), variant)


def held_back(requested: str | None, skipped: list[tuple[str, str]], facts: Facts, conditions: Conditions,
              refusals: Mapping[str, InvalidRequest]) -> list[tuple[str, str]]:
    """``skipped``, led by the cloud model asked for when the rule left it out (an ``uplink: down`` rule
    routing to ``local``) and only local models that cannot honour the request were left: what keeps that
    model from the request now (the uplink, a budget, a breaker, residency), if anything, is the caller's
    answer, rather than a 400 saying that cloud models would take the request."""
    if (requested is None or not is_cloud(requested) or not refusals
            or any(t not in refusals for t, _ in skipped)):
        return skipped
    why = guard(requested, facts, conditions)
    return skipped if why is None else [(requested, why), *skipped]


def returning(model: str, policy: Policy, conditions: Conditions) -> bool:
    """A local model no live worker has now, but expected back (its worker restarting): the policy's own, or
    one a worker served before. Asked for, it is a 503 to retry (no worker right now), not a 404."""
    return not is_cloud(model) and (model == policy.local_model or model in conditions.served_before)


def refusal(rule: Rule, skipped: list[tuple[str, str]], conditions: Conditions, tenant: str,
            refusals: Mapping[str, InvalidRequest] | None = None) -> LeafwireError:
    """The error for a request no target may serve, named after the first reason that may pass (a
    breaker, the uplink, a budget); when the others are local models that cannot honour the request (and
    cloud models no adapter is configured for), the first such model's own 400, as if it had been asked."""
    if not skipped:
        return Unavailable(f"rule {rule.name} names no target for this request", code="no_route")
    refusals = refusals or {}
    guarded = [why for t, why in skipped if t not in refusals]
    passing = [why for why in guarded if why != UNCONFIGURED]  # a cloud model no adapter has will not come
    if refusals and not passing:
        return refusals[next(t for t, _ in skipped if t in refusals)]
    why = (passing or guarded)[0]
    detail = "; ".join(f"{t}: {w}" for t, w in skipped)
    if why == "data must stay on site":
        return ResidencyViolation(f"This request must stay on site and no local model can serve it ({detail}).")
    if why == "budget exhausted":
        spent = conditions.spent_budget
        if spent is not None and spent.limit is not None:
            return budgets.exceeded(tenant, spent.scope, spent.period, spent.limit, spent.spent, spent.window,
                                    conditions.now, then=f"no local model can serve this ({detail})")
        return BudgetExceeded(f"The cloud budget is exhausted and no local model can serve this ({detail}).")
    if why == "all workers busy":
        return Overloaded(f"Every worker is busy ({detail}).", retry_after=1)
    # an open breaker: until the first of them half-opens; the uplink: a guess at when to look again
    opens = [conditions.probes_in[provider_of(t)] for t, _ in skipped if provider_of(t) in conditions.probes_in]
    return Unavailable(f"No target can serve this request now ({detail}).",
                       retry_after=max(1, math.ceil(min(opens))) if opens else UPLINK_RETRY_S,
                       code="uplink_down" if why == "uplink down" else "provider_unavailable")
