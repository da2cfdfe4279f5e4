"""Feeding the router's live state: KV watches (policy, provider health, budgets) and the uplink probe.

Each runs as a background task for the router's lifetime and survives NATS trouble by retrying.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE
from pydantic import ValidationError

from schemas.cloud import BudgetStatus, ProviderHealth
from services.router import policy as policies
from services.router.state import LiveState
from shared import metrics, subjects
from shared.logging import get_logger

log = get_logger("leafwire.router.watch")
OnEntry = Callable[[str, bytes | None], Awaitable[None]]


async def follow_bucket(js: JetStreamContext, bucket: str, keys: str, on_entry: OnEntry, *,
                        create: KeyValueConfig | None = None, retry_s: float = 2.0) -> None:
    """Deliver every current and future entry of ``bucket`` matching ``keys`` (``None`` for a delete).

    A bucket that does not exist yet is waited for (or created when ``create`` is given).
    """
    while True:
        try:
            kv = await js.create_key_value(create) if create else await js.key_value(bucket)
            watcher = await kv.watch(keys)
            async for entry in watcher:
                if entry is not None:
                    deleted = entry.operation in (KV_DEL, KV_PURGE)
                    await on_entry(entry.key, None if deleted else entry.value)
        except asyncio.CancelledError:
            raise
        except BucketNotFoundError:
            pass  # the service that owns the bucket has not started yet
        except Exception as exc:
            log.warning("kv watch failed; retrying", bucket=bucket, error=repr(exc))
        await asyncio.sleep(retry_s)


def policy_updates(state: LiveState, nc: NATS, site: str) -> OnEntry:
    """Apply policies written to the config bucket; keep the current one when a new one is invalid."""

    async def announce(outcome: str, **detail: object) -> None:
        metrics.POLICY_RELOADS.labels(outcome).inc()
        await nc.publish(subjects.policy_events(site), json.dumps({"outcome": outcome, **detail}).encode())

    async def on_entry(_: str, value: bytes | None) -> None:
        if value is None:
            if state.file_policy is not None:
                state.use_policy(state.file_policy, "file")
            log.info("policy key deleted: back to the file policy")
            await announce("reverted")
            return
        try:
            policy = policies.parse(value.decode(errors="replace"), "the policy in KV config/router.policy")
            state.use_policy(policy, "kv")
        except (policies.PolicyError, ValueError) as exc:
            message = exc.message if isinstance(exc, policies.PolicyError) else str(exc)
            log.error("policy rejected; keeping the current one", error=message)
            await announce("rejected", error=message)
            return
        log.info("policy applied", rules=[r.name for r in policy.rules])
        await announce("applied", rules=[r.name for r in policy.rules])

    return on_entry


def health_updates(state: LiveState) -> OnEntry:
    """Track providers' breakers."""

    async def on_entry(key: str, value: bytes | None) -> None:
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

    async def on_entry(key: str, value: bytes | None) -> None:
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
