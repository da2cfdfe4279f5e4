"""Contracts between the cloud-adapter and the router: provider health, budget state, usage events.

The cloud-adapter writes provider health and budget state to KV buckets of its site's JetStream domain
(readable offline, watched by routers) and publishes one ``UsageEvent`` per answered request to the
``USAGE`` stream.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field


class BreakerState(StrEnum):
    """A provider's circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class ProviderHealth(BaseModel):
    """KV ``provider-health``, key = provider name: the breaker as the adapter sees it."""

    provider: str
    state: BreakerState
    since: float = Field(description="unix time the breaker entered this state")
    probe_at: float | None = Field(default=None, description="while open: unix time it half-opens and lets a probe "
                                   "through (a reader may treat it as half open from then on)")
    consecutive_failures: int = 0
    error_rate: float = Field(default=0.0, description="failures / calls over the breaker's window")
    updated_at: float = Field(default_factory=time.time)


class ProviderRate(BaseModel):
    """KV ``provider-rates``, key = ``<provider>.<worker id>`` (a model's: ``<provider>.<worker id>.<model hash>``):
    one cloud-adapter's calls and tokens of a provider, or of one model of it, over the last minute, by second,
    so that the site's adapters keep its ``rpm`` and ``tpm`` together. Written about every
    ``LW_CLOUD_RATE_SYNC_S`` while they change."""

    provider: str
    model: str | None = Field(default=None, description="the model (as the providers file names it) whose own "
                              "rpm/tpm these count; none: the provider's")
    worker_id: str
    calls: list[tuple[int, int]] = Field(default_factory=list, description="[unix second, calls begun in it], "
                                         "the last minute's (counted while the provider has an rpm)")
    tokens: list[tuple[int, int]] = Field(default_factory=list, description="[unix second, tokens counted in it], "
                                          "the last minute's (counted while the provider has a tpm)")
    updated_at: float = Field(default_factory=time.time)


BudgetLevel = Literal["ok", "warning", "exhausted"]
BudgetPeriod = Literal["daily", "monthly"]


def budget_window(period: BudgetPeriod, now: float) -> str:
    """The window a budget counts at ``now``: ``2026-11-21`` (daily) or ``2026-11`` (monthly), UTC."""
    return _window(period, int(now))


@lru_cache(maxsize=8)
def _window(period: BudgetPeriod, second: int) -> str:
    # Asked for every routed and every charged request: formatting a date costs more than the rest of a
    # budget check, and within a second the answer cannot change.
    day = datetime.fromtimestamp(second, UTC)
    return day.strftime("%Y-%m-%d" if period == "daily" else "%Y-%m")


class BudgetStatus(BaseModel):
    """KV ``budgets``, key = ``<scope>.<period>.<site>`` (scope ``global`` or ``tenant-<tenant>``): what one site
    spent. A budget counts every site's spending; ``state`` is the level of that total as the writer knew it."""

    scope: str
    period: Literal["daily", "monthly"]
    window: str = Field(description="the period it counts, e.g. 2026-11-21 or 2026-11")
    spent_usd: float = Field(description="what the site spent in the window")
    limit_usd: float | None
    state: BudgetLevel = Field(description="the level of every site's spending together, as the writer knew it")
    updated_at: float = Field(default_factory=time.time)
    site: str | None = Field(default=None, description="the site whose spending this is (none: an entry written "
                                                       "before budgets counted across sites)")
    total_usd: float | None = Field(default=None, description="every site's spending in the window, as the "
                                                              "writer knew it")


class UsageEvent(BaseModel):
    """One answered request: what it used and what it cost (stream ``USAGE``)."""

    request_id: str
    tenant: str
    site: str
    target: str = Field(description="where it ran: local/<model> or <provider>/<model>")
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float = 0.0
    cached: bool = False
    variant: str | None = None
    outcome: Literal["ok", "error", "cancelled"] = "ok"
    latency_s: float = 0.0
    at: float = Field(default_factory=time.time)
