"""Usage events on a real nats-server: gathered briefly, then stored by the site's USAGE stream."""

from __future__ import annotations

import json

import nats

from schemas.cloud import UsageEvent
from shared import metrics
from shared.usage import UsagePublisher
from tests.support import eventually_async

SITE = "usage1"


def event(n: int) -> UsageEvent:
    return UsageEvent(request_id=f"r{n}", tenant="t", site=SITE, target="p/m", prompt_tokens=n,
                      completion_tokens=1, cost_usd=0.0)


async def stored(nc: nats.NATS) -> int:
    info = await nc.jetstream().stream_info("USAGE")
    return info.state.messages


async def test_events_reach_the_stream_without_a_flush(nc: nats.NATS) -> None:
    """Events published one by one are all stored within moments, in order, while the publisher runs on."""
    publisher = UsagePublisher(nc, SITE, interval_s=0.05)
    await publisher.ensure_stream()
    before = await stored(nc)
    for n in range(25):
        await publisher.usage(event(n))
    await eventually_async(lambda: stored(nc), lambda count: count == before + 25, within_s=5, what="25 events")
    js = nc.jetstream()
    last = await js.get_last_msg("USAGE", f"lw.v1.{SITE}.usage.events")
    assert json.loads(last.data)["request_id"] == "r24"


async def test_flush_sends_what_is_gathered(nc: nats.NATS) -> None:
    """At shutdown, events still gathered (their batch not yet due) are published and acknowledged."""
    publisher = UsagePublisher(nc, SITE, interval_s=60)
    await publisher.ensure_stream()
    before = await stored(nc)
    for n in range(3):
        await publisher.usage(event(n))
    assert await stored(nc) == before  # a minute from being due
    await publisher.flush()
    assert await stored(nc) == before + 3


async def test_events_past_the_bound_are_dropped_and_counted(nc: nats.NATS) -> None:
    """More events than ``max_pending`` gathered at once: the rest are dropped and counted, never held."""
    publisher = UsagePublisher(nc, SITE, max_pending=5, interval_s=60)
    await publisher.ensure_stream()
    dropped = metrics.USAGE_EVENTS_DROPPED._value.get()
    before = await stored(nc)
    for n in range(8):
        await publisher.usage(event(n))
    assert metrics.USAGE_EVENTS_DROPPED._value.get() == dropped + 3
    await publisher.flush()
    assert await stored(nc) == before + 5
