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
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from schemas.cloud import BudgetStatus, ProviderHealth
from services.router import policy as policies
from services.router.layers import Layers, Step, policy_keys, source_of
from services.router.masking import Masker
from services.router.policy import Policy
from services.router.state import LiveState
from shared import config_bucket, metrics, subjects
from shared.logging import get_logger

log = get_logger("leafwire.router.watch")
OnEntry = Callable[[str, bytes | None, int], Awaitable[None]]
"""(key, value or ``None`` for a delete, revision)"""
Settled = Callable[[], Awaitable[None]]
Opener = Callable[[], Awaitable[KeyValue]]
MIRROR_SILENT_S = 3.0  # an attached mirror hears from the hub every second


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


Announce = Callable[[dict[str, object]], Awaitable[None]]


def announcer(nc: NATS, site: str) -> Announce:
    """Count a policy outcome and publish it on ``lw.v1.<site>.router.policy``."""

    async def announce(event: dict[str, object]) -> None:
        metrics.POLICY_RELOADS.labels(str(event["outcome"])).inc()
        await nc.publish(subjects.policy_events(site), json.dumps(event).encode())

    return announce


class PolicyFollower:
    """Apply the site's policy from the config bucket (see ``layers.py``); keep the current one when the
    one that should take over is invalid; announce every outcome."""

    def __init__(self, state: LiveState, site: str, announce: Announce) -> None:
        self.state, self.layers, self.announce = state, Layers(site), announce

    @property
    def keys(self) -> tuple[str, str]:
        """The config keys this site's policy comes from."""
        return policy_keys(self.layers.site)

    async def on_entry(self, key: str, value: bytes | None, revision: int = 0) -> None:
        """Note a change of a key (acted on once the watch has caught up, or at ``settled``)."""
        self.layers.seen(key, value, revision)

    async def settled(self) -> None:
        """Act on the changes seen since the last call."""
        for step in self.layers.settle():
            await self._act(step)

    async def _act(self, step: Step) -> None:
        try:
            policy = self._policy_of(step)
            if step.outcome != "overridden":
                self.state.use_policy(policy, source_of(step.key))
        except (policies.PolicyError, ValueError) as exc:
            message = exc.message if isinstance(exc, policies.PolicyError) else str(exc)
            log.error("policy rejected; keeping the current one", key=step.key, error=message,
                      source=self.state.policy_source)
            await self.announce({"outcome": "rejected", "key": step.key, "error": message,
                                 "source": self.state.policy_source})
            return
        if step.outcome == "overridden":
            log.info("global policy changed; this site keeps its own", source=self.state.policy_source)
            await self.announce({"outcome": "overridden", "key": step.key, "source": self.state.policy_source})
            return
        self.layers.switched(step.key)
        rules = [r.name for r in self.state.policy.rules]
        log.info("policy in force", outcome=step.outcome, source=self.state.policy_source, rules=rules)
        await self.announce({"outcome": step.outcome, "source": self.state.policy_source, "rules": rules})

    def _policy_of(self, step: Step) -> Policy:
        """The policy a step names (validated; masking patterns compiled), or the file's."""
        if step.text is None:  # the policy file, or a deleted key that only needed announcing
            return self.state.file_policy or self.state.policy
        policy = policies.parse(step.text.decode(errors="replace"),
                                f"the policy in KV {subjects.CONFIG_BUCKET}/{step.key}")
        Masker.from_policy(policy.masking)
        return policy


async def catch_up_from_hub(nc: NATS, follower: PolicyFollower, interval_s: float,
                            silent_s: float = MIRROR_SILENT_S) -> None:
    """While this edge's config mirror does not hear from the hub, read the policy keys from the hub.

    The mirror keeps the policy readable offline, but nats-server re-attaches a mirror that lost its hub
    (an outage, a restart, a new stream leader at the hub) only after a stall check and a retry back-off:
    seconds to minutes. Reading the hub meanwhile, when it answers, applies a change at once; the mirror
    delivers the same revisions later, which are ignored.
    """
    js = nc.jetstream(timeout=interval_s)
    while True:
        await asyncio.sleep(interval_s)
        try:
            silence = await config_bucket.mirror_silence_s(js)
            if silence is None or silence < silent_s:
                continue
            for key, revision, value in await config_bucket.read_hub(nc, follower.keys):
                await follower.on_entry(key, value, revision)
            await follower.settled()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # hub unreachable, mirror not created yet, NATS reconnecting: next round
            log.debug("config catch-up skipped", error=repr(exc))


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
