"""Usage events on a real nats-server: gathered briefly, then stored by the site's USAGE stream."""

from __future__ import annotations

import json

import nats
import pytest
from nats.aio.msg import Msg

from schemas.cloud import UsageEvent
from shared import metrics, usage
from shared.usage import UsagePublisher, usage_stream
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


async def test_a_batch_is_stored_as_one_atomic_batch_of_one_message_per_event(nc: nats.NATS) -> None:
    """Events gathered together land as one atomic batch: each its own message, in order, intact."""
    publisher = UsagePublisher(nc, SITE, interval_s=60)
    await publisher.ensure_stream()
    js = nc.jetstream()
    first = (await js.stream_info("USAGE")).state.last_seq + 1
    for n in range(40):
        await publisher.usage(event(n))
    await publisher.flush()
    stored_msgs = [await js.get_msg("USAGE", seq) for seq in range(first, first + 40)]
    assert [json.loads(m.data)["request_id"] for m in stored_msgs] == [f"r{n}" for n in range(40)]
    assert {(m.headers or {}).get("Nats-Batch-Id") for m in stored_msgs} != {None}
    assert len({(m.headers or {})["Nats-Batch-Id"] for m in stored_msgs}) == 1
    assert publisher.atomic


async def test_a_stream_without_atomic_batches_still_gets_every_event(nc: nats.NATS) -> None:
    """A USAGE stream made without atomic batches (elsewhere, or by an older leafwire) refuses the batch;
    its events are then published one by one and none is lost; the publisher stops trying batches."""
    site = "usage2"
    js = nc.jetstream()
    config = usage_stream(site)
    config.name, config.allow_atomic = "USAGE_PLAIN", False
    await js.add_stream(config)
    publisher = UsagePublisher(nc, site, interval_s=60)
    dropped = metrics.USAGE_EVENTS_DROPPED._value.get()
    for n in range(10):
        await publisher.usage(event(n))
    await publisher.flush()
    assert (await js.stream_info("USAGE_PLAIN")).state.messages == 10
    assert not publisher.atomic
    assert metrics.USAGE_EVENTS_DROPPED._value.get() == dropped
    await js.delete_stream("USAGE_PLAIN")


async def test_an_existing_stream_is_given_atomic_batches(nc: nats.NATS) -> None:
    """A site's USAGE stream created before atomic batches is updated in place, its events kept."""
    site = "usage3"
    js = nc.jetstream()
    await js.delete_stream("USAGE")
    old = usage_stream(site)
    old.allow_atomic = False
    await js.add_stream(old)
    await js.publish(f"lw.v1.{site}.usage.events", b'{"old": true}')
    await UsagePublisher(nc, site).ensure_stream()
    info = await js.stream_info("USAGE")
    assert info.config.allow_atomic
    assert info.state.messages == 1


async def test_events_in_an_uncommitted_batch_count_against_the_bound(nc: nats.NATS,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """While a batch waits on a server that does not answer, its events count against ``max_pending``: later
    events past the bound are dropped and counted, never held."""
    monkeypatch.setattr(usage, "ACK_TIMEOUT_S", 1.0)
    site = "usage4"
    stalled = await nc.subscribe(f"lw.v1.{site}.usage.>")  # takes the batch's first message, answers nothing
    publisher = UsagePublisher(nc, site, max_pending=8, interval_s=0.02)
    dropped = metrics.USAGE_EVENTS_DROPPED._value.get()
    for n in range(5):
        await publisher.usage(event(n))
    await stalled.next_msg(timeout=5)  # the batch of five is out, waiting for its first answer
    for n in range(5, 10):
        await publisher.usage(event(n))
    assert metrics.USAGE_EVENTS_DROPPED._value.get() == dropped + 2  # 5 in the batch + 3 gathered = 8
    await stalled.unsubscribe()
    await publisher.flush(wait_s=5)


async def test_a_server_without_atomic_batches_stores_each_event_once(nc: nats.NATS) -> None:
    """A server that does not know atomic batches (before 2.12) stores the batch's first message as a plain
    publish: the rest are then published one by one, each event stored once, and batches are not tried again."""
    site = "usage5"
    seen: list[bytes] = []

    async def old_server(msg: Msg) -> None:  # stores everything, answers each publish with a PubAck
        seen.append(msg.data)
        if msg.reply:
            await msg.respond(json.dumps({"stream": "USAGE", "seq": len(seen)}).encode())

    await nc.subscribe(f"lw.v1.{site}.usage.>", cb=old_server)
    publisher = UsagePublisher(nc, site, interval_s=60)
    dropped = metrics.USAGE_EVENTS_DROPPED._value.get()
    for n in range(6):
        await publisher.usage(event(n))
    await publisher.flush()
    assert sorted(json.loads(d)["request_id"] for d in seen) == [f"r{n}" for n in range(6)]
    assert not publisher.atomic
    assert metrics.USAGE_EVENTS_DROPPED._value.get() == dropped


async def test_a_stream_deleted_underneath_is_created_again(nc: nats.NATS) -> None:
    """The USAGE stream deleted while the service runs (or a server that lost its storage): the next batch
    finds no stream, creates it again and is stored there; nothing is dropped."""
    publisher = UsagePublisher(nc, SITE, interval_s=0.01)
    await publisher.ensure_stream()
    await nc.jetstream().delete_stream("USAGE")
    dropped = metrics.USAGE_EVENTS_DROPPED._value.get()
    for n in range(3):
        await publisher.usage(event(n))
    await publisher.flush()
    assert await stored(nc) == 3
    assert metrics.USAGE_EVENTS_DROPPED._value.get() == dropped
    js = nc.jetstream()
    last = await js.get_last_msg("USAGE", f"lw.v1.{SITE}.usage.events")
    assert json.loads(last.data)["request_id"] == "r2"
