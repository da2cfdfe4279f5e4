"""Following a KV bucket on a real nats-server: entries as they come, and the bucket deleted or created anew
underneath (nats-py's own watcher goes quiet then, raising nothing)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js.api import KeyValueConfig
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from shared.kv_follow import follow_bucket
from tests.support import eventually_async, start_single

BUCKET = "follow-test"


class Seen:
    """What a follower delivered: the latest value per key (deletes remove it), and the calls made."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.deletes: list[str] = []
        self.settles = 0
        self.replacements = 0

    async def on_entry(self, key: str, value: bytes | None, _: int) -> None:
        if value is None:
            self.values.pop(key, None)
            self.deletes.append(key)
        else:
            self.values[key] = value

    async def settled(self) -> None:
        self.settles += 1

    async def replaced(self) -> None:
        self.replacements += 1


@pytest.fixture
async def js(nc: nats.NATS) -> AsyncIterator[nats.js.JetStreamContext]:
    js = nc.jetstream()
    with contextlib.suppress(NotFoundError):
        await js.delete_key_value(BUCKET)
    yield js
    with contextlib.suppress(NotFoundError):
        await js.delete_key_value(BUCKET)


def opener(js: nats.js.JetStreamContext) -> object:
    async def open_bucket() -> KeyValue:
        return await js.key_value(BUCKET)
    return open_bucket


async def values(seen: Seen) -> dict[str, bytes]:
    return dict(seen.values)


async def started(seen: Seen) -> bool:
    """The follower has caught up with the bucket (or delivered something)."""
    return bool(seen.settles or seen.values)


async def test_current_then_new_entries(js: nats.js.JetStreamContext) -> None:
    kv = await js.create_key_value(KeyValueConfig(bucket=BUCKET))
    await kv.put("a", b"1")
    seen = Seen()
    task = asyncio.create_task(follow_bucket(opener(js), ">", seen.on_entry, name=BUCKET,  # type: ignore[arg-type]
                                             settled=seen.settled, check_s=0.2, retry_s=0.1))
    try:
        await eventually_async(lambda: values(seen), lambda v: v == {"a": b"1"}, within_s=5, what="the first key")
        await kv.put("b", b"2")
        await kv.delete("a")
        await eventually_async(lambda: values(seen), lambda v: v == {"b": b"2"}, within_s=5, what="the changes")
        assert seen.settles >= 1
        assert seen.replacements == 0
    finally:
        task.cancel()


@pytest.mark.parametrize("gap_s", [0.5, 0.0], ids=["deleted-then-created", "replaced-at-once"])
async def test_a_bucket_created_anew_is_followed(js: nats.js.JetStreamContext, gap_s: float) -> None:
    """Deleted and created again (with time for the follower to see it gone, or at once): the new bucket's
    entries arrive, keys only the old one had are delivered as deletes, and ``replaced`` is called once."""
    kv = await js.create_key_value(KeyValueConfig(bucket=BUCKET))
    await kv.put("old-only", b"x")
    await kv.put("both", b"old")
    seen = Seen()
    task = asyncio.create_task(follow_bucket(opener(js), ">", seen.on_entry, name=BUCKET,  # type: ignore[arg-type]
                                             replaced=seen.replaced, check_s=0.2, retry_s=0.1))
    try:
        await eventually_async(lambda: values(seen), lambda v: len(v) == 2, within_s=5, what="the old keys")
        await js.delete_key_value(BUCKET)
        await asyncio.sleep(gap_s)
        kv = await js.create_key_value(KeyValueConfig(bucket=BUCKET))
        await kv.put("both", b"new")
        await kv.put("new-only", b"y")
        await eventually_async(lambda: values(seen), lambda v: v == {"both": b"new", "new-only": b"y"},
                               within_s=10, what="the new bucket's keys, and the old-only key gone")
        # "both" may also come as a delete (then its new value) when the follower read the new bucket before
        # its first put: at that moment the key was gone. "old-only" goes once, "new-only" never.
        assert seen.deletes.count("old-only") == 1
        assert set(seen.deletes) <= {"old-only", "both"}
        assert seen.replacements == 1
    finally:
        task.cancel()


async def test_cancelled_while_an_update_arrives_it_stops(js: nats.js.JetStreamContext) -> None:
    """A service shutting down while its buckets change: each follower stops when cancelled (asyncio's
    ``wait_for`` in 3.11 could swallow such a cancel and leave the task running for ever)."""
    kv = await js.create_key_value(KeyValueConfig(bucket=BUCKET))
    rng = random.Random(7)
    for n in range(40):
        seen = Seen()
        task = asyncio.create_task(follow_bucket(opener(js), ">", seen.on_entry,  # type: ignore[arg-type]
                                                 name=BUCKET, settled=seen.settled, check_s=5))
        await eventually_async(functools.partial(started, seen), bool, within_s=5, what="the follower to start")
        await kv.put(f"k{n}", b"v")
        for _ in range(rng.randrange(0, 30)):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done, f"round {n}: the follower did not stop when cancelled"


async def test_a_server_restarted_underneath_is_followed_at_once(tmp_path: Path) -> None:
    """nats-server restarted (same store) under a follower: its watch, an ordered consumer the restart lost, is
    opened again once the connection is back, so an update made after the restart arrives within seconds,
    not after nats-py's missed heartbeats (10-15 s); ``check_s`` is long here, so that is not what finds it."""
    server = start_single(tmp_path)
    nc = await nats.connect(server.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
    task: asyncio.Task[None] | None = None
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(KeyValueConfig(bucket=BUCKET))
        await kv.put("a", b"1")
        seen = Seen()
        task = asyncio.create_task(follow_bucket(opener(js), ">", seen.on_entry, name=BUCKET,  # type: ignore[arg-type]
                                                 check_s=30, retry_s=0.1))
        await eventually_async(lambda: values(seen), lambda v: v == {"a": b"1"}, within_s=5, what="the first key")
        await asyncio.to_thread(server.restart)
        await eventually_async(lambda: connected(nc), bool, within_s=10, what="the reconnection")
        await (await js.key_value(BUCKET)).put("a", b"2")
        await eventually_async(lambda: values(seen), lambda v: v == {"a": b"2"}, within_s=5,
                               what="the update made after the restart")
    finally:
        if task is not None:
            task.cancel()
        await nc.close()
        server.stop()


async def connected(nc: nats.NATS) -> bool:
    return bool(nc.is_connected)
