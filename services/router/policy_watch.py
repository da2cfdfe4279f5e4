"""Keeping the router's policy current from the config bucket (see ``layers.py`` for the rules).

The bucket's watch (``watch.follow_bucket``) feeds a ``PolicyFollower``; on an edge, ``catch_up_from_hub``
also feeds it from the hub while the site's mirror is silent. Every outcome is announced on
``lw.v1.<site>.router.policy``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS

from services.router import policy as policies
from services.router.layers import Layers, Step, policy_keys, source_of
from services.router.masking import Masker
from services.router.policy import Policy
from services.router.settings import RouterSettings
from services.router.state import LiveState
from shared import config_bucket, kv_follow, metrics, subjects
from shared.hub_mirror import HubMirror
from shared.logging import get_logger

log = get_logger("leafwire.router.policy")
MIRROR_SILENT_S = 3.0  # an attached mirror hears from the hub every second


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

    async def replaced(self) -> None:
        """The bucket was created anew: its revisions count from 1 again, and what it does not hold is gone."""
        self.layers.replaced()

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


def watch_check_s(settings: RouterSettings) -> float:
    """How long the config bucket's watch waits for an update before it looks the bucket up: on an edge
    ``LW_ROUTER_CONFIG_CHECK_S``, so that it follows a mirror ``catch_up_from_hub`` made anew at once."""
    return kv_follow.CHECK_S if settings.site == subjects.HUB else settings.config_check_s


async def catch_up_from_hub(nc: NATS, follower: PolicyFollower, interval_s: float, hub_check_s: float,
                            silent_s: float = MIRROR_SILENT_S) -> None:
    """Keep this edge's config mirror copying the hub's bucket, and read the policy keys from the hub while
    the mirror does not hear from it; checked every ``interval_s`` (on the edge's own server).

    A mirror that copies a hub stream created anew (the hub's ``config`` deleted and made again) or stays
    stuck is made anew (``shared.hub_mirror``); the bucket's watch then reads it from revision 1. That asks
    the hub about its stream: every ``hub_check_s``, and at once while the mirror is silent, so a site's
    routers do not each ask the hub every second.

    The mirror keeps the policy readable offline, but nats-server re-attaches a mirror that lost its hub
    (an outage, a restart, a new stream leader at the hub) only after a stall check and a retry back-off:
    seconds to minutes. Reading the hub meanwhile, when it answers, applies a change at once; the mirror
    delivers the same revisions later, which are ignored.
    """
    js = nc.jetstream(timeout=interval_s)
    mirror = HubMirror(config_bucket.STREAM, config_bucket.STREAM, config_bucket.ensure_mirror)
    ask_hub_at = 0.0
    while True:
        await asyncio.sleep(interval_s)
        try:
            silence = await config_bucket.mirror_silence_s(js)
            silent = silence is not None and silence >= silent_s
            if silent or time.monotonic() >= ask_hub_at:
                ask_hub_at = time.monotonic() + hub_check_s
                if (why := await mirror.resync(nc, js)) is not None:
                    log.warning("the config mirror was created anew", why=why)
                    continue
            if not silent:
                continue
            for key, revision, value in await config_bucket.read_hub(nc, follower.keys):
                await follower.on_entry(key, value, revision)
            await follower.settled()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # hub unreachable, mirror not created yet, NATS reconnecting: next round
            log.debug("config catch-up skipped", error=repr(exc))
