"""Feeding the router's live state: KV watches (policy, provider health, budgets: ``shared.kv_follow``) and
the uplink probe.

Each runs as a background task for the router's lifetime and survives NATS trouble by retrying. The
policy's own bookkeeping (which key is in force, the hub read while the mirror is silent) is in
``policy_watch.py``.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.client import JetStreamContext
from pydantic import ValidationError

from schemas.cloud import BudgetStatus, ProviderHealth
from services.router.state import LiveState
from shared import budgets, metrics, subjects
from shared.kv_follow import OnEntry, Opener, follow_bucket
from shared.logging import get_logger

log = get_logger("leafwire.router.watch")
__all__ = ["OnEntry", "Opener", "budget_updates", "existing", "follow_bucket", "health_updates", "probe_uplink"]


def existing(js: JetStreamContext, bucket: str) -> Opener:
    """Open a bucket some other service creates."""
    return lambda: js.key_value(bucket)


def health_updates(state: LiveState) -> OnEntry:
    """Track providers' breakers."""

    async def on_entry(key: str, value: bytes | None, _: int) -> None:
        if value is None:
            state.provider_gone(key)
            return
        try:
            state.provider_changed(ProviderHealth.model_validate_json(value))
        except ValidationError as exc:
            log.warning("unreadable provider health", key=key, error=str(exc))

    return on_entry


def budget_updates(state: LiveState, skip_site: str | None = None) -> OnEntry:
    """Track budget ledgers; from the mirror of the hub's (an edge), ``skip_site``'s own entries and those
    without a site are left to the site's own bucket."""

    async def on_entry(key: str, value: bytes | None, _: int) -> None:
        if skip_site is not None and not budgets.elsewhere(key, skip_site):
            return
        try:
            state.budget_changed(key, None if value is None else BudgetStatus.model_validate_json(value))
        except ValidationError as exc:
            log.warning("unreadable budget status", key=key, error=str(exc))

    return on_entry


async def probe_uplink(nc: NATS, state: LiveState, interval_s: float, site: str) -> None:
    """The uplink is up while the hub's JetStream answers across the leaf connection."""
    gauge = metrics.UPLINK_UP.labels(site)  # labelled: a service that does not probe exports no 0
    while True:
        try:
            await nc.request(subjects.HUB_JS_API_INFO, b"", timeout=1.0)
            up = True
        except (NoRespondersError, NatsTimeout, TimeoutError):
            up = False
        except Exception as exc:  # disconnected from our own server: the uplink state is unknown
            log.debug("uplink probe failed", error=repr(exc))
            up = False
        if up != state.uplink_up:
            log.warning("uplink " + ("up" if up else "down"))
        state.set_uplink(up)
        gauge.set(1 if up else 0)
        await asyncio.sleep(interval_s)
