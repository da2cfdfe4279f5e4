"""Stopping background tasks: a task that swallows a cancel (as Python 3.11's ``asyncio.wait_for`` can) is
asked again, so a service's shutdown ends instead of hanging."""

from __future__ import annotations

import asyncio
import gc

from shared.tasks import stop_tasks


async def loop_swallowing(cancels_to_swallow: int, ticks: list[int]) -> None:
    """A loop whose first cancels are lost, the way a cancel racing a ``wait_for`` result is on 3.11."""
    while True:
        try:
            await asyncio.sleep(0.01)
            ticks.append(1)
        except asyncio.CancelledError:
            if cancels_to_swallow == 0:
                raise
            cancels_to_swallow -= 1


async def test_a_swallowed_cancel_is_asked_again() -> None:
    ticks: list[int] = []
    task = asyncio.create_task(loop_swallowing(2, ticks))
    await asyncio.sleep(0.03)
    await asyncio.wait_for(stop_tasks([task], ask_every_s=0.05), timeout=5)
    assert task.cancelled()
    stopped_at = len(ticks)
    await asyncio.sleep(0.05)
    assert len(ticks) == stopped_at  # the loop really stopped


async def test_plain_finished_and_failed_tasks_all_end_without_noise() -> None:
    async def fail() -> None:
        raise RuntimeError("boom")

    sleeper = asyncio.create_task(asyncio.sleep(60))
    done = asyncio.create_task(asyncio.sleep(0))
    failed = asyncio.create_task(fail())
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    await asyncio.wait_for(stop_tasks([sleeper, done, failed]), timeout=5)
    assert sleeper.cancelled()
    assert done.done()
    assert failed.done()
    del failed
    gc.collect()
    assert reported == []  # the failure was retrieved: no "Task exception was never retrieved"
