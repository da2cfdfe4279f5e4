"""Feeding the router's live state: KV watches (policy, provider health, budgets: ``shared.kv_follow``), an
edge's mirrors of the hub's provider health and budgets, and the uplink probe.

Each runs as a background task for the router's lifetime and survives NATS trouble by retrying. The
policy's own bookkeeping (which key is in force, the hub read while the mirror is silent) is in
``policy_watch.py``.
"""

from __future__ import annotations

import asyncio
import time

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from schemas.cloud import BudgetStatus, ProviderHealth
from services.router.state import LiveState
from shared import budgets, metrics, subjects
from shared.config_bucket import role_of
from shared.hub_mirror import HubMirror, ensure_kv_mirror, kv_mirror_bucket, silence_s
from shared.kv_follow import OnEntry, Opener, follow_bucket
from shared.logging import get_logger

log = get_logger("leafwire.router.watch")
__all__ = ["OnEntry", "Opener", "budget_updates", "existing", "follow_bucket", "health_updates", "keep_hub_mirrors",
           "open_health_mirror", "probe_uplink"]
HEALTH_STREAM = subjects.kv_stream(subjects.PROVIDER_HEALTH)
HEALTH_MIRRORED = "the breakers of the hub's cloud-adapters, mirrored from the hub"


def existing(js: JetStreamContext, bucket: str) -> Opener:
    """Open a bucket some other service creates."""
    return lambda: js.key_value(bucket)


def health_updates(state: LiveState, hub: bool = False) -> OnEntry:
    """Track providers' breakers: the site's own adapters' (``hub``: the hub's, from the edge's mirror)."""

    async def on_entry(key: str, value: bytes | None, _: int) -> None:
        if value is None:
            state.provider_gone(key, hub)
            return
        try:
            state.provider_changed(ProviderHealth.model_validate_json(value), hub)
        except ValidationError as exc:
            log.warning("unreadable provider health", key=key, error=str(exc))

    return on_entry


async def ensure_health_mirror(js: JetStreamContext) -> None:
    """Create the edge's mirror of the hub's provider-health bucket when absent; needs no uplink."""
    await ensure_kv_mirror(js, subjects.HUB_PROVIDER_HEALTH, HEALTH_STREAM, HEALTH_MIRRORED)


async def open_health_mirror(js: JetStreamContext) -> KeyValue:
    """The edge's mirror of the hub's provider health as a read-only bucket; ``NotFoundError`` until made."""
    await js.stream_info(subjects.HUB_PROVIDER_HEALTH)
    return kv_mirror_bucket(js, subjects.PROVIDER_HEALTH, subjects.HUB_PROVIDER_HEALTH)


async def keep_hub_mirrors(nc: NATS, check_s: float, hub_check_s: float, silent_s: float = 3.0) -> None:
    """At an edge (a JetStream domain other than the hub's; a standalone server has no hub to mirror): keep the
    mirrors of the hub's provider-health and budgets buckets the router reads. Each is made when absent (an
    edge with no cloud-adapter of its own, whose cloud requests the hub's adapters take, has nobody else to
    make them), and made anew when stuck, copying a hub stream that is gone, or made before the hub had its
    stream (``shared.hub_mirror``). Each is looked at every ``check_s`` on the edge's own server; the hub is
    asked about its stream every ``hub_check_s``, and at every check while the mirror has not heard from it
    for ``silent_s`` (an attached mirror hears every second)."""
    js = nc.jetstream(timeout=5)
    mirrors = [HubMirror(subjects.HUB_PROVIDER_HEALTH, HEALTH_STREAM, ensure_health_mirror), budgets.hub_mirror()]
    ask_hub_at = dict.fromkeys((m.name for m in mirrors), 0.0)
    edge: bool | None = None
    while True:
        try:
            if edge is None:
                edge = await role_of(js) == "edge"
            if not edge:
                return
            for mirror in mirrors:
                try:
                    silence = silence_s(await js.stream_info(mirror.name))
                except NotFoundError:
                    await mirror.ensure(js)
                    silence = None
                if silence is None or silence >= silent_s or time.monotonic() >= ask_hub_at[mirror.name]:
                    ask_hub_at[mirror.name] = time.monotonic() + hub_check_s
                    if (why := await mirror.resync(nc, js)) is not None:
                        log.info("a mirror of a hub bucket was created anew", stream=mirror.name, why=why)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # JetStream not answering yet, the hub out of reach: the next round
            log.debug("hub mirrors not kept this round", error=repr(exc))
        await asyncio.sleep(check_s)


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
