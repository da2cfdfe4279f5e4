"""The worker's handle on its decoder process: submit rows, read their events, cancel, restart on crash.

Pipe I/O runs in two threads (a blocking send of a long prompt must not stall the event loop, and a
blocking receive waits for the next step); events reach the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import queue
import threading
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from services.local_inference import decoder
from services.local_inference.ipc import (
    CancelRow,
    Finished,
    Loaded,
    Rejected,
    RowEvent,
    RowSpec,
    Shutdown,
    Started,
    Submit,
    ToDecoder,
)
from services.local_inference.registry import ModelSpec
from shared.errors import Unavailable, UpstreamError
from shared.logging import get_logger

log = get_logger("leafwire.local_inference.engine")

FINAL = (Finished, Rejected)


class RowHandle:
    """The events of one submitted row, in order, ending with ``Finished`` or ``Rejected``."""

    def __init__(self, key: int, engine: Engine) -> None:
        self.key = key
        self._engine = engine
        self._events: asyncio.Queue[RowEvent | BaseException] = asyncio.Queue()

    async def events(self) -> AsyncIterator[RowEvent]:
        """Iterate until the final event; raise if the decoder died under the row."""
        while True:
            item = await self._events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, FINAL):
                return

    def cancel(self) -> None:
        """Ask the decoder to stop this row (its ``Finished('cancelled')`` event follows)."""
        self._engine.cancel(self.key)


class Engine:
    """One decoder process for one model."""

    def __init__(self, spec: ModelSpec, *, max_batch: int, intra_op_threads: int,
                 load_timeout_s: float = 300.0) -> None:
        self.spec = spec
        self.max_batch = max_batch
        self.intra_op_threads = intra_op_threads
        self.load_timeout_s = load_timeout_s
        self.context_length = 0
        self.load_seconds = 0.0
        self.ready = False
        self._keys = itertools.count(1)
        self._rows: dict[int, RowHandle] = {}
        self._outbox: queue.Queue[ToDecoder | None] = queue.Queue()
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.on_crash: Callable[[], None] | None = None
        self.on_batch: Callable[[int], None] | None = None

    async def start(self) -> None:
        """Spawn the decoder process and wait until its model is loaded (reaping a dead one first)."""
        self._loop = asyncio.get_running_loop()
        if self._proc is not None:
            await asyncio.to_thread(self._proc.join, 5)
            if self._conn is not None:
                self._conn.close()
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._conn = parent
        self._proc = ctx.Process(target=decoder.main, name=f"decoder-{self.spec.name}", daemon=True,
                                 args=(child, self.spec, self.max_batch, self.intra_op_threads))
        self._proc.start()
        child.close()
        loaded = await asyncio.wait_for(asyncio.to_thread(self._wait_loaded, parent), self.load_timeout_s)
        self.context_length, self.load_seconds = loaded.context_length, loaded.load_seconds
        self._outbox = queue.Queue()
        threading.Thread(target=self._send_loop, args=(parent, self._outbox), daemon=True,
                         name="decoder-send").start()
        threading.Thread(target=self._recv_loop, args=(parent,), daemon=True, name="decoder-recv").start()
        self.ready = True
        log.info("model loaded", model=self.spec.name, seconds=round(self.load_seconds, 3),
                 context_length=self.context_length, pid=self._proc.pid)

    @staticmethod
    def _wait_loaded(conn: Connection) -> Loaded:
        msg = conn.recv()
        if not isinstance(msg, Loaded):
            raise RuntimeError(f"decoder sent {msg!r} before loading")
        return msg

    def submit(self, rows: list[RowSpec]) -> list[RowHandle]:
        """Queue rows for decoding; each handle yields that row's events."""
        if not self.ready:
            raise Unavailable(f"model {self.spec.name} is not loaded", retry_after=2)
        handles = []
        for row in rows:
            handle = RowHandle(row.key, self)
            self._rows[row.key] = handle
            handles.append(handle)
        self._outbox.put(Submit(rows))
        return handles

    def new_key(self) -> int:
        """A fresh row key."""
        return next(self._keys)

    def cancel(self, key: int) -> None:
        """Stop decoding ``key`` if it is still running."""
        if key in self._rows:
            self._outbox.put(CancelRow(key))

    @property
    def pid(self) -> int | None:
        """The decoder process id."""
        return self._proc.pid if self._proc else None

    # -- threads ----------------------------------------------------------------------------------

    def _send_loop(self, conn: Connection, outbox: queue.Queue[ToDecoder | None]) -> None:
        while (msg := outbox.get()) is not None:
            try:
                conn.send(msg)
            except (BrokenPipeError, OSError):
                return

    def _recv_loop(self, conn: Connection) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            try:
                events = conn.recv()
            except (EOFError, OSError):
                loop.call_soon_threadsafe(self._decoder_gone)
                return
            loop.call_soon_threadsafe(self._dispatch, events)

    # -- on the event loop ------------------------------------------------------------------------

    def _dispatch(self, events: list[RowEvent]) -> None:
        if events and isinstance(events[0], Started) and self.on_batch is not None:
            self.on_batch(events[0].batch_size)  # the decoder sends a batch's Started events together
        for event in events:
            handle = self._rows.get(event.key)
            if handle is None:
                continue
            if isinstance(event, FINAL):
                del self._rows[event.key]
            handle._events.put_nowait(event)

    def _decoder_gone(self) -> None:
        self.ready = False
        rows, self._rows = self._rows, {}
        if self._stopping:
            return
        code = self._proc.exitcode if self._proc else None
        log.error("decoder process died", model=self.spec.name, exitcode=code, rows_lost=len(rows))
        for handle in rows.values():
            handle._events.put_nowait(UpstreamError(f"the decoder of {self.spec.name} crashed mid-answer"))
        if self.on_crash is not None:
            self.on_crash()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Ask the decoder to finish its step and exit; kill it if it does not."""
        self._stopping = True
        self.ready = False
        self._outbox.put(Shutdown())
        self._outbox.put(None)
        proc = self._proc
        if proc is None:
            return
        await asyncio.to_thread(proc.join, grace_s)
        if proc.is_alive():
            proc.kill()
        proc.join(1)
        if self._conn is not None:
            self._conn.close()
