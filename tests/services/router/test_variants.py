"""A/B variants: weighted split, sticky per user or tenant."""

from __future__ import annotations

from collections import Counter

from services.router.decide import Conditions, Facts, plan
from services.router.policy import parse
from services.router.signals import Signals

POLICY = parse("""
local_model: small
aliases:
  assistant:
    sticky: user
    variants:
      - {name: a, target: small, weight: 70}
      - {name: b, target: openai/gpt-4o-mini, weight: 20}
      - {name: c, target: tiny, weight: 10}
  per-tenant:
    sticky: tenant
    variants:
      - {name: x, target: small, weight: 1}
      - {name: y, target: tiny, weight: 1}
""")
UP = Conditions(local_models=frozenset({"small", "tiny"}))


def variant(alias: str, user: str | None, tenant: str = "acme") -> str | None:
    return plan(POLICY, Facts(alias, tenant, user, False, Signals(5, 0.0)), UP).variant


class TestVariants:
    def test_split_follows_weights(self) -> None:
        """Over 2,000 users the arms get 70/20/10 within two percentage points."""
        counts = Counter(variant("assistant", f"user-{i}") for i in range(2000))
        assert abs(counts["a"] / 2000 - 0.70) < 0.02
        assert abs(counts["b"] / 2000 - 0.20) < 0.02
        assert abs(counts["c"] / 2000 - 0.10) < 0.02

    def test_sticky_per_user(self) -> None:
        """A user gets the same variant every time, whatever the tenant."""
        for i in range(50):
            assert len({variant("assistant", f"user-{i}", tenant=t) for t in ("t1", "t2", "t3")}) == 1

    def test_sticky_per_tenant(self) -> None:
        """With tenant stickiness, users of one tenant share one variant, and tenants spread over arms."""
        assert len({variant("per-tenant", f"u{i}", tenant="acme") for i in range(50)}) == 1
        assert {variant("per-tenant", None, tenant=f"t{i}") for i in range(50)} == {"x", "y"}

    def test_anonymous_users_fall_back_to_the_tenant(self) -> None:
        """Requests without a user field stick to their tenant."""
        assert len({variant("assistant", None, tenant="acme") for _ in range(20)}) == 1

    def test_variant_picks_the_target(self) -> None:
        """The chosen variant's target is what gets requested."""
        p = plan(POLICY, Facts("assistant", "acme", "user-1", False, Signals(5, 0.0)), UP)
        expected = {"a": "small", "b": "openai/gpt-4o-mini", "c": "tiny"}[p.variant or ""]
        assert p.requested == expected
