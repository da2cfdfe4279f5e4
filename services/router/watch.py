"""Feeding the router's live state: KV watches (policy, provider health, budgets) and the uplink probe.

Each runs as a background task for the router's lifetime and survives NATS trouble by retrying. The
policy's own bookkeeping (which key is in force, the hub read while the mirror is silent) is in
``policy_watch.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from schemas.cloud import BudgetStatus, ProviderHealth
from services.router.state import LiveState
from shared import metrics, subjects
from shared.logging import get_logger

log = get_logger("leafwire.router.watch")
OnEntry = Callable[[str, bytes | None, int], Awaitable[None]]
"""(key, value or ``None`` for a delete, revision)"""
Settled = Callable[[], Awaitable[None]]
Opener = Callable[[], Awaitable[KeyValue]]


async def follow_bucket(open_bucket: Opener, keys: str, on_entry: OnEntry, *, name: str,
                        settled: Settled | None = None, retry_s: float = 2.0) -> None:
    """Deliver every current and future entry of the bucket ``open_bucket`` opens that matches ``keys``
    (``None`` for a delete), then ``settled()`` each time the watch has caught up.

    A bucket that does not exist yet is waited for; any failure reopens the bucket after ``retry_s``.
    """
    while True:
        try:
            kv = await open_bucket()
            watcher = await kv.watch(keys)
            async for entry in watcher:
                if entry is not None:
                    deleted = entry.operation in (KV_DEL, KV_PURGE)
                    await on_entry(entry.key, None if deleted else entry.value, entry.revision or 0)
                if settled is not None and (entry is None or not entry.delta):
                    await settled()
        except asyncio.CancelledError:
            raise
        except BucketNotFoundError:
            pass  # the service that owns the bucket has not started yet
        except Exception as exc:
            log.warning("kv watch failed; retrying", bucket=name, error=repr(exc))
        await asyncio.sleep(retry_s)


def existing(js: JetStreamContext, bucket: str) -> Opener:
    """Open a bucket some other service creates."""
    return lambda: js.key_value(bucket)


def health_updates(state: LiveState) -> OnEntry:
    """Track providers' breakers."""

    async def on_entry(key: str, value: bytes | None, _: int) -> None:
        if value is None:
            state.provider_health.pop(key, None)
            return
        try:
            state.provider_changed(ProviderHealth.model_validate_json(value))
        except ValidationError as exc:
            log.warning("unreadable provider health", key=key, error=str(exc))

    return on_entry


def budget_updates(state: LiveState) -> OnEntry:
    """Track budget ledgers."""

    async def on_entry(key: str, value: bytes | None, _: int) -> None:
        try:
            state.budget_changed(key, None if value is None else BudgetStatus.model_validate_json(value))
        except ValidationError as exc:
            log.warning("unreadable budget status", key=key, error=str(exc))

    return on_entry


async def probe_uplink(nc: NATS, state: LiveState, interval_s: float) -> None:
    """The uplink is up while the hub's JetStream answers across the leaf connection."""
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
        state.uplink_up = up
        metrics.UPLINK_UP.set(1 if up else 0)
        await asyncio.sleep(interval_s)
