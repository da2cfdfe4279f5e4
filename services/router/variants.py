"""A/B variants: weighted, and sticky, so one user (or tenant) always lands on the same arm."""

from __future__ import annotations

import hashlib

from services.router.policy import Experiment, Variant


def bucket(alias: str, key: str) -> float:
    """A stable number in [0, 1) for ``key`` under ``alias`` (independent across aliases)."""
    digest = hashlib.blake2b(f"{alias}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick(alias: str, experiment: Experiment, user: str | None, tenant: str) -> Variant:
    """The variant of ``experiment`` for this caller: by user when sticky per user and known, else tenant."""
    key = user if experiment.sticky == "user" and user else f"tenant:{tenant}"
    point = bucket(alias, key) * sum(v.weight for v in experiment.variants)
    for variant in experiment.variants:
        point -= variant.weight
        if point < 0:
            return variant
    return experiment.variants[-1]
