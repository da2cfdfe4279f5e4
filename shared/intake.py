"""Hot-path NATS subscriptions without FastStream's per-message cost, with FastStream's contract.

FastStream resolves a handler's ``NatsMessage`` parameter in a worker thread for every message, which
costs more than the rest of a router's or cloud-adapter's work per request. Subjects every request
crosses are read with a plain nats-py queue subscription instead. The contract stays that of
``shared.handling``: a refusal (``LeafwireError``) gets an ``error`` answer; a message that cannot be
parsed, or crashes its handler, gets one too and is dead-lettered. The subject is still declared on the
documentation broker so the AsyncAPI document lists it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel

from shared.envelope import Envelope, admission_subject
from shared.errors import Overloaded
from shared.handling import answer_failure
from shared.logging import bind_request

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[M, Msg, Envelope], Awaitable[None]]


class Intake(Generic[M]):
    """A queue subscription that parses each message as ``model`` and hands it to ``handler``.

    ``concurrency=None`` awaits the handler in the delivery loop (it must return quickly); an integer runs
    each message in its own task, at most that many at once. Past that, as many again wait for a slot, each
    at most ``slot_wait_s``; a message that finds no slot in time, or no room to wait, is refused at once
    with a 429 and Retry-After (overload is answered, never queued without bound or left silent).
    """

    def __init__(self, nc: NATS, *, subject: str, queue: str, model: type[M], handler: Handler[M], site: str,
                 service: str, concurrency: int | None = None, slot_wait_s: float = 2.0) -> None:
        self._nc = nc
        self._subject = subject
        self._queue = queue
        self._model = model
        self._handler = handler
        self._site = site
        self._service = service
        self._slots = asyncio.Semaphore(concurrency) if concurrency else None
        self._concurrency = concurrency or 0
        self._slot_wait_s = slot_wait_s
        self._waiting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Subscribe and flush, so messages are taken from now on."""
        self._sub = await self._nc.subscribe(self._subject, queue=self._queue, cb=self._deliver,
                                             pending_msgs_limit=100_000, pending_bytes_limit=256 * 1024 * 1024)
        await self._nc.flush()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Take nothing more; let handlers running in tasks finish (up to ``grace_s``)."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)

    async def _deliver(self, msg: Msg) -> None:
        if self._slots is None:
            await self._handle(msg)
            return
        if not self._slots.locked():
            await self._slots.acquire()  # free: returns at once
            self._spawn(self._handle(msg))
        elif self._waiting < self._concurrency:
            self._waiting += 1  # counted now: the next message is delivered before this task starts
            self._spawn(self._wait_for_slot(msg), slot=False)
        else:
            await self._refuse(msg)

    def _spawn(self, coro: Coroutine[Any, Any, None], slot: bool = True) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done if slot else self._tasks.discard)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._slots is not None:
            self._slots.release()

    async def _wait_for_slot(self, msg: Msg) -> None:
        assert self._slots is not None
        try:
            async with asyncio.timeout(self._slot_wait_s):
                await self._slots.acquire()
        except TimeoutError:
            await self._refuse(msg)
            return
        finally:
            self._waiting -= 1
        try:
            await self._handle(msg)
        finally:
            self._slots.release()

    async def _refuse(self, msg: Msg) -> None:
        busy = Overloaded(f"{self._service} has {self._concurrency} requests in hand and as many waiting; "
                          "try again shortly", retry_after=1)
        await answer_failure(self._nc, site=self._site, service=self._service, subject=msg.subject, data=msg.data,
                             headers=msg.headers, reply=admission_subject(msg.headers, msg.reply), exc=busy)

    async def _handle(self, msg: Msg) -> None:
        try:
            env = Envelope.from_message(msg.headers, msg.reply or None)
            bind_request(env.request_id, env.tenant, msg.subject)
            await self._handler(self._model.model_validate_json(msg.data), msg, env)
        except Exception as exc:
            await answer_failure(self._nc, site=self._site, service=self._service, subject=msg.subject,
                                 data=msg.data, headers=msg.headers, reply=admission_subject(msg.headers, msg.reply),
                                 exc=exc)
