"""An edge's mirror of a hub bucket made anew when the hub's stream was created anew. Real nats-servers: a
one-node hub and an edge site (the config bucket and its mirror, as the edge's routers keep them)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StreamInfo
from nats.js.client import JetStreamContext
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from shared import config_bucket, subjects
from shared.hub_mirror import HubMirror
from tests.support import connected, eventually_async, start_cuttable_site


async def contents(kv: KeyValue) -> dict[str, bytes | None]:
    """Every key the bucket holds, with its value."""
    try:
        return {key: (await kv.get(key)).value for key in await kv.keys()}
    except NoKeysError:
        return {}


async def mirrored_old_bucket(hub_js: JetStreamContext, edge: nats.NATS) -> None:
    """The hub's config bucket with two keys, and the edge's mirror once it holds them."""
    old = await config_bucket.ensure_bucket(hub_js)
    await old.put("kept", b"old")
    await old.put("only-old", b"old")
    mirror = await config_bucket.open_bucket(edge)
    await eventually_async(lambda: contents(mirror), lambda c: c == {"kept": b"old", "only-old": b"old"})


async def test_a_hub_stream_created_anew_past_the_old_sequence_is_noticed(tmp_path: Path) -> None:
    """A keeper that saw the hub's stream notices it deleted and created anew, also once the new one holds more
    messages than the mirror had copied (the mirror would copy only those past its old sequence, keeping the
    old entries): the mirror made anew holds the new bucket's entries only; one in step is left alone."""
    with start_cuttable_site(tmp_path, "plant5") as site:
        async with connected(site.hub.url) as hub, connected(site.edge.url) as edge:
            hub_js, edge_js = hub.jetstream(), edge.jetstream()
            await mirrored_old_bucket(hub_js, edge)
            keeper = HubMirror(config_bucket.STREAM, config_bucket.STREAM, config_bucket.ensure_mirror)
            assert await keeper.resync(edge, edge_js) is None

            await hub_js.delete_stream(config_bucket.STREAM)
            new = await config_bucket.ensure_bucket(hub_js)
            for value in (b"new1", b"new2", b"new3"):
                await new.put("kept", value)
            why = await keeper.resync(edge, edge_js)

            assert why is not None
            assert why.startswith("the hub's stream was created anew (at ")
            mirror = await edge_js.key_value(subjects.CONFIG_BUCKET)
            await eventually_async(lambda: contents(mirror), lambda c: c == {"kept": b"new3"})
            assert await keeper.resync(edge, edge_js) is None


async def test_a_keeper_started_after_the_reset_notices_it(tmp_path: Path) -> None:
    """A service started after the hub's bucket was reset, whose new stream already holds more messages than the
    mirror copied (so the count does not tell, and it never saw the old creation time): the hub's message at the
    mirror's last sequence is another one, and the mirror is made anew. A fresh keeper of a mirror in step
    leaves it alone."""
    with start_cuttable_site(tmp_path, "plant5") as site:
        async with connected(site.hub.url) as hub, connected(site.edge.url) as edge:
            hub_js, edge_js = hub.jetstream(), edge.jetstream()
            await mirrored_old_bucket(hub_js, edge)

            def fresh() -> HubMirror:  # stuck_s: a mirror detached by the reset is not what is tested here
                return HubMirror(config_bucket.STREAM, config_bucket.STREAM, config_bucket.ensure_mirror, stuck_s=600)

            assert await fresh().resync(edge, edge_js) is None

            await hub_js.delete_stream(config_bucket.STREAM)
            new = await config_bucket.ensure_bucket(hub_js)
            for key in ("kept", "a", "b"):
                await new.put(key, b"new")
            why = await fresh().resync(edge, edge_js)

            assert why == "the hub's stream was created anew (its message 2 is not the one the mirror copied)"
            mirror = await edge_js.key_value(subjects.CONFIG_BUCKET)
            await eventually_async(lambda: contents(mirror), lambda c: c == {"kept": b"new", "a": b"new", "b": b"new"})
            assert await fresh().resync(edge, edge_js) is None


def mirror_info(made_s_ago: float, heard_s_ago: float | None, error: dict[str, Any] | None = None) -> StreamInfo:
    """The stream info of an edge's config mirror made ``made_s_ago`` and last hearing from the hub
    ``heard_s_ago`` (``None``: never since it was made), its last try's ``error`` if any."""
    made = datetime.fromtimestamp(time.time() - made_s_ago, tz=UTC).isoformat()
    active = -1 if heard_s_ago is None else int(heard_s_ago * 1e9)
    return StreamInfo.from_response({
        "config": {"name": config_bucket.STREAM, "mirror": {"name": config_bucket.STREAM}},
        "state": {"messages": 3, "bytes": 0, "first_seq": 1, "last_seq": 3, "consumer_count": 0},
        "created": made, "mirror": {"name": config_bucket.STREAM, "lag": 0, "active": active, "error": error}})


def test_a_mirror_made_before_the_hubs_stream_is_made_anew_once_the_hub_has_it() -> None:
    """A mirror made before the hub's owner made its stream (an edge started with or before the hub's
    services) found no stream to copy, and nats-server tries again only after 30 s or more: once the hub has
    it (``_why`` is asked only after the hub answered with its stream), the mirror is made anew at once.
    Another error (a slow or lost link) is given time as before."""
    keeper = HubMirror(config_bucket.STREAM, config_bucket.STREAM, config_bucket.ensure_mirror)
    missing = {"code": 404, "err_code": 10059, "description": "stream not found"}
    assert keeper._why(mirror_info(0.5, None, missing), 3, "t") == \
        "the hub's stream did not exist when the mirror last tried to copy it"
    assert keeper._why(mirror_info(0.5, None, {"code": 503, "err_code": 10008, "description": "timeout"}), 3,
                       "t") is None
    assert keeper._why(mirror_info(0.5, 0.2, missing), 3, "t") is None  # it hears from the hub now


def test_a_mirror_slow_to_attach_is_given_longer_each_time() -> None:
    """Over a slow link a mirror made anew may take longer than 5 s to hear from the hub: remade at every
    check, it would never get there. Each one made in a row that never heard is given twice as long (up to
    five minutes); one that heard starts again from 5 s."""
    keeper = HubMirror(config_bucket.STREAM, config_bucket.STREAM, config_bucket.ensure_mirror)
    assert keeper._why(mirror_info(6, None), 3, "t") == "it had not heard from the hub since it was made, 6 s ago"
    keeper.unattached = 2  # two made in a row never heard
    assert keeper.attach_wait_s() == 20
    assert keeper._why(mirror_info(12, None), 3, "t") is None
    assert keeper._why(mirror_info(21, None), 3, "t") is not None
    keeper.unattached = 30
    assert keeper.attach_wait_s() == 300
    assert keeper._why(mirror_info(6, 7.0), 3, "t") == "it had not heard from the hub for 7 s"  # heard, then not
