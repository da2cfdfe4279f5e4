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
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel

from shared.envelope import Envelope, admission_subject
from shared.handling import answer_failure
from shared.logging import bind_request

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[M, Msg, Envelope], Awaitable[None]]


class Intake(Generic[M]):
    """A queue subscription that parses each message as ``model`` and hands it to ``handler``.

    ``concurrency=None`` awaits the handler in the delivery loop (it must return quickly); an integer runs
    each message in its own task, at most that many at once — past that, delivery waits for a slot.
    """

    def __init__(self, nc: NATS, *, subject: str, queue: str, model: type[M], handler: Handler[M], site: str,
                 service: str, concurrency: int | None = None) -> None:
        self._nc = nc
        self._subject = subject
        self._queue = queue
        self._model = model
        self._handler = handler
        self._site = site
        self._service = service
        self._slots = asyncio.Semaphore(concurrency) if concurrency else None
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
        await self._slots.acquire()
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._slots is not None:
            self._slots.release()

    async def _handle(self, msg: Msg) -> None:
        try:
            env = Envelope.from_message(msg.headers, msg.reply or None)
            bind_request(env.request_id, env.tenant, msg.subject)
            await self._handler(self._model.model_validate_json(msg.data), msg, env)
        except Exception as exc:
            await answer_failure(self._nc, site=self._site, service=self._service, subject=msg.subject,
                                 data=msg.data, headers=msg.headers, reply=admission_subject(msg.headers, msg.reply),
                                 exc=exc)
