"""Stopping a service's background tasks, for sure.

``task.cancel()`` then ``await task`` can wait for ever on Python 3.11: ``asyncio.wait_for`` drops a cancel
that arrives as the awaited result does (CPython gh-86296; rewritten in 3.12), and nats-py waits that way on
every ``next_msg``, request and KV watch. The task then goes on looping as if never asked. A service's
shutdown, and every test that closes one, would hang there. ``stop_tasks`` asks again until each has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from shared.logging import get_logger

log = get_logger("leafwire.tasks")
ASK_EVERY_S = 1.0
WARN_AFTER_ASKS = 10


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], *, ask_every_s: float = ASK_EVERY_S) -> None:
    """Cancel ``tasks`` and return once every one has ended, asking again every ``ask_every_s`` a task that
    is still running (a cancel it swallowed). What they raised is dropped (``cancel`` marks a failure as seen):
    the caller is stopping them."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    asks = 1
    while pending := [task for task in tasks if not task.done()]:
        await asyncio.wait(pending, timeout=ask_every_s)
        for task in pending:
            if not task.done():
                task.cancel()
        asks += 1
        if asks == WARN_AFTER_ASKS:
            log.warning("tasks still running after repeated cancels",
                        tasks=[task.get_name() for task in pending if not task.done()])


async def every(interval_s: float, job: Callable[[], Awaitable[None]]) -> None:
    """Run ``job`` every ``interval_s`` seconds until cancelled; a round that fails is logged, not fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except Exception:
            log.exception("periodic job failed", job=getattr(job, "__qualname__", repr(job)))
