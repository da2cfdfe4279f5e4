"""Following a KV bucket for a service's lifetime: every current and future entry, across NATS trouble, and
across the bucket being deleted or created anew underneath.

nats-py's watcher goes quiet, raising nothing, when its bucket's stream is deleted: a bucket deleted to reset
it (``nats kv rm budgets``) or a server that lost its storage would leave a service reading a bucket that no
longer exists. So whenever no update came for ``check_s``, the bucket's stream is looked up; gone, or created
since the watch began, the watch is opened again. Keys the old bucket had and the new one has not are then
delivered as deletes, once the new watch has caught up, and ``replaced`` is called first (a reader that
ignores revisions it has seen must forget them: a new bucket counts from 1 again).

A watch is an ordered consumer on the server: a server restarted (or a reconnection to another one) loses it,
and nats-py notices only after missed heartbeats, 10-15 s in which no update arrives. So a watch whose
connection reconnected since it was opened is opened again at once (checked every ``RECONNECT_CHECK_S``): it
reads the current entries again, and the updates made meanwhile arrive within a second or so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from shared.logging import get_logger

log = get_logger("leafwire.kv")
OnEntry = Callable[[str, bytes | None, int], Awaitable[None]]
"""(key, value or ``None`` for a delete, revision)"""
Settled = Callable[[], Awaitable[None]]
Opener = Callable[[], Awaitable[KeyValue]]
CHECK_S = 10.0
RECONNECT_CHECK_S = 1.0


class Replaced(Exception):
    """The bucket's stream is gone, or is not the one the watch was opened on."""


async def follow_bucket(open_bucket: Opener, keys: str, on_entry: OnEntry, *, name: str,
                        settled: Settled | None = None, replaced: Settled | None = None, retry_s: float = 2.0,
                        check_s: float = CHECK_S) -> None:
    """Deliver every current and future entry of the bucket ``open_bucket`` opens that matches ``keys``
    (``None`` for a delete), then ``settled()`` each time the watch has caught up.

    A bucket that does not exist yet is waited for; any failure reopens the bucket after ``retry_s``.
    """
    known: set[str] = set()  # keys delivered with a value and not deleted since
    born = None  # when the stream last watched was created
    while True:
        watcher: KeyValue.KeyWatcher | None = None
        try:
            kv = await open_bucket()
            created = (await kv.status()).stream_info.created
            if born is not None and created != born:
                log.warning("kv bucket was created anew; reading it from the start", bucket=name)
                if replaced is not None:
                    await replaced()
            born = created
            watcher = await kv.watch(keys)
            await _follow(kv, watcher, name, known, on_entry, settled, born, check_s)
        except asyncio.CancelledError:
            raise
        except (BucketNotFoundError, NotFoundError):
            pass  # not created yet (or deleted): its owner creates it
        except Replaced:
            continue
        except Exception as exc:
            log.warning("kv watch failed; retrying", bucket=name, error=repr(exc))
        finally:
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]
        await asyncio.sleep(retry_s)


def _reconnects(kv: KeyValue) -> int:
    """How many times the bucket's connection reconnected (nats-py keeps the count in its stats)."""
    return int(kv._js._nc.stats.get("reconnects", 0))


async def _follow(kv: KeyValue, watcher: KeyValue.KeyWatcher, name: str, known: set[str], on_entry: OnEntry,
                  settled: Settled | None, born: object, check_s: float) -> None:
    """One watch, until it fails or its bucket is replaced (``Replaced``)."""
    fresh: set[str] | None = set()  # keys of this watch's catch-up (``None`` once caught up)
    reconnects = _reconnects(kv)
    quiet_s = 0.0
    while True:
        wait_s = min(check_s, RECONNECT_CHECK_S)
        try:
            async with asyncio.timeout(wait_s):  # not watcher.updates(): 3.11's wait_for can swallow a cancel
                entry = await anext(watcher)
            quiet_s = 0.0
        except StopAsyncIteration:
            return
        except TimeoutError:
            if _reconnects(kv) != reconnects:
                log.info("kv watch reopened after a reconnection", bucket=name)
                raise Replaced from None
            quiet_s += wait_s
            if quiet_s < check_s:
                continue
            quiet_s = 0.0
            try:
                created = (await kv.status()).stream_info.created
            except NotFoundError:
                log.warning("kv bucket deleted; waiting for it to be created again", bucket=name)
                raise Replaced from None
            if created != born:
                raise Replaced from None
            continue
        if entry is not None:
            deleted = entry.operation in (KV_DEL, KV_PURGE)
            await on_entry(entry.key, None if deleted else entry.value, entry.revision or 0)
            (known.discard if deleted else known.add)(entry.key)
            if fresh is not None:
                fresh.add(entry.key)
        if entry is None or not entry.delta:  # caught up
            if fresh is not None:
                for key in sorted(known - fresh):  # held by the bucket this one replaced
                    await on_entry(key, None, 0)
                    known.discard(key)
                fresh = None
            if settled is not None:
                await settled()
