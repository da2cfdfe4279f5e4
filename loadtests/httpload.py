"""A minimal HTTP/1.1 keep-alive client for load generation, built on asyncio Protocols (uvloop or not).

    pool = await HttpPool.open("http://127.0.0.1:8080")
    status, headers, body = await pool.post("/v1/chat/completions", b'{"model": ...}')
    future = pool.submit("/v1/chat/completions", body)   # no coroutine, no Task: for open-loop senders
    await pool.close()

Why not aiohttp's ClientSession: the benchmarks run the load generator on the same two cores as the system
under test, and aiohttp spends ~0.4 ms of CPU per request (request/response objects, header multidicts,
stream readers, a Task per request). Every millisecond the harness burns is taken from leafwire, so the
numbers would measure the harness. This client does the least that is still real HTTP/1.1 over TCP: request
heads are prebuilt bytes, a response is one Future, parsing is ``bytes.find`` over the buffer, and headers
are only split into a mapping when the caller reads one.

What it does: one request in flight per connection (no pipelining); a pool of persistent connections to one
host:port that grows on demand up to ``limit`` (requests beyond that wait for a free connection); bodies
framed by ``Content-Length``, by ``Transfer-Encoding: chunked`` (read to the terminating 0-chunk, trailers
skipped) or, failing both, by the server closing the connection. ``Connection: close`` from the server
retires the connection after its response; a connection the peer drops fails its in-flight request with
:class:`ConnectionClosed` and leaves the pool, which opens a new one for the next request. A request not
answered within ``timeout`` seconds fails with ``TimeoutError`` and its connection is closed (checked about once
a second, so that no timer is armed per request). No TLS, no redirects, no cookies, no proxies: it is a
measuring instrument, not a general client.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator, Mapping
from typing import cast
from urllib.parse import urlsplit

__all__ = ["ConnectionClosed", "Headers", "HttpPool", "ProtocolError", "Response"]

MAX_HEAD = 64 * 1024
"""A response head longer than this is treated as garbage rather than buffered without end."""


class ProtocolError(Exception):
    """The server sent something that is not an HTTP/1.1 response this client can frame."""


class ConnectionClosed(ConnectionError):
    """The connection closed before the response was complete (the request may or may not have run)."""


class Headers(Mapping[str, str]):
    """Response headers with lower-cased names, split from the raw head only when first read.

    Lazy because an open-loop benchmark mostly looks at the status alone; building a dict for every
    response would be per-request work nobody uses. A repeated header keeps its last value."""

    __slots__ = ("_map", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw  # the head after the status line, lines separated by CRLF
        self._map: dict[str, str] | None = None

    def _parsed(self) -> dict[str, str]:
        if self._map is None:
            found: dict[str, str] = {}
            for line in self._raw.split(b"\r\n"):
                name, sep, value = line.partition(b":")
                if sep:
                    found[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
            self._map = found
        return self._map

    def __getitem__(self, name: str) -> str:
        return self._parsed()[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parsed())

    def __len__(self) -> int:
        return len(self._parsed())

    def __repr__(self) -> str:
        return f"Headers({self._parsed()!r})"


Response = tuple[int, Headers, bytes]
"""(status, headers, body) of one answer."""

_NO_BODY = -2  # framing: 204/304, nothing follows the head
_UNTIL_CLOSE = -1  # framing: neither Content-Length nor chunked, the body ends when the server closes


class _Conn(asyncio.Protocol):
    """One persistent connection and the response being read on it.

    Parsing is incremental: a response arriving in many segments (a streamed SSE answer) is not rescanned
    from its start on every read; complete chunks move to ``_body`` and leave the buffer."""

    __slots__ = ("_body", "_buf", "_chunked", "_close_after", "_head", "_length", "_status", "alive",
                 "pool", "sent_at", "transport", "waiter")

    def __init__(self, pool: HttpPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.alive = True
        self.sent_at = 0.0
        self._buf = b""
        self._reset()

    def _reset(self) -> None:
        self._status = 0  # 0: still reading the head
        self._head = b""
        self._length = 0
        self._chunked = False
        self._close_after = False
        self._body: list[bytes] = []

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes with no request outstanding: the stream is out of step
            self._fail(ProtocolError(f"unsolicited data from the server: {data[:80]!r}"))
            return
        buf = self._buf + data if self._buf else data
        try:
            self._parse(buf)
        except (ValueError, ProtocolError) as exc:
            self._fail(exc if isinstance(exc, ProtocolError) else ProtocolError(f"malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        waiter = self.waiter
        if waiter is not None and self._status and self._length == _UNTIL_CLOSE:
            body, self._buf = self._buf, b""
            self._finish(body)  # the close is this body's end
            waiter = None
        self.waiter = None
        self.pool._lost(self)
        if waiter is not None and not waiter.done():
            why = ConnectionClosed("connection closed by the server before the response was complete")
            why.__cause__ = exc
            waiter.set_exception(why)

    # requests and responses

    def send(self, data: bytes, waiter: asyncio.Future[Response], now: float) -> None:
        assert self.transport is not None
        self.waiter = waiter
        self.sent_at = now
        self.transport.write(data)

    def _parse(self, buf: bytes) -> None:
        if not self._status:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError("response head too long")
                self._buf = buf
                return
            if buf[:7] != b"HTTP/1." or buf[12:13] not in (b" ", b"\r"):
                raise ProtocolError(f"not an HTTP/1.x status line: {buf[:40]!r}")
            status = int(buf[9:12])
            line_end = buf.find(b"\r\n")
            head = buf[line_end:end + 2]  # "\r\nName: value" ... "\r\n": every field starts after a CRLF
            buf = buf[end + 4:]
            if status < 200:  # 100 Continue and friends: an interim head, the real one follows
                self._buf = b""
                if buf:
                    self._parse(buf)
                return
            self._status, self._head = status, head
            lower = head.lower()
            self._close_after = buf_has(lower, b"\r\nconnection:", b"close")
            if status in (204, 304):
                self._length = _NO_BODY
            elif buf_has(lower, b"\r\ntransfer-encoding:", b"chunked"):
                self._chunked = True
            else:
                at = lower.find(b"\r\ncontent-length:")
                if at >= 0:
                    self._length = int(lower[at + 17:lower.find(b"\r\n", at + 17)])
                else:
                    self._length = _UNTIL_CLOSE
        if self._chunked:
            self._parse_chunks(buf)
        elif self._length >= 0:
            if len(buf) < self._length:
                self._buf = buf
                return
            body, rest = (buf, b"") if len(buf) == self._length else (buf[:self._length], buf[self._length:])
            self._buf = b""
            self._finish(body, rest)
        elif self._length == _NO_BODY:
            self._buf = b""
            self._finish(b"", buf)
        else:  # until close: keep everything, connection_lost finishes
            self._buf = buf

    def _parse_chunks(self, buf: bytes) -> None:
        pos, body = 0, self._body
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            semi = buf.find(b";", pos, eol)  # chunk extensions are allowed and ignored
            size = int(buf[pos:eol if semi < 0 else semi], 16)
            if size == 0:
                if buf[eol + 2:eol + 4] == b"\r\n":
                    end = eol + 4
                else:  # trailer fields: skip to the empty line
                    end = buf.find(b"\r\n\r\n", eol)
                    if end < 0:
                        break
                    end += 4
                self._buf = b""
                self._finish(b"".join(body), buf[end:])
                return
            start = eol + 2
            if len(buf) < start + size + 2:
                break
            if buf[start + size:start + size + 2] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            body.append(buf[start:start + size])
            pos = start + size + 2
        # keep only what is not consumed, so a long stream does not grow the buffer without end
        self._buf = buf[pos:] if pos else buf

    def _finish(self, body: bytes, rest: bytes = b"") -> None:
        waiter = self.waiter
        assert waiter is not None
        response = (self._status, Headers(self._head), body)
        close = self._close_after
        self.waiter = None
        self._reset()
        if rest or not self.alive:  # one request at a time: anything after the response is out of step
            close = True
        if close:
            self.alive = False
            if self.transport is not None:
                self.transport.close()
            self.pool._lost(self)
        else:
            self.pool._release(self)
        if not waiter.done():  # cancelled by its caller: the response is read, the connection stays usable
            waiter.set_result(response)

    def _fail(self, exc: BaseException) -> None:
        """Close the connection, failing its request with ``exc``."""
        waiter, self.waiter = self.waiter, None
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows and takes it out of the pool
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


def buf_has(lower_head: bytes, field: bytes, token: bytes) -> bool:
    """Whether the (lower-cased) head has ``field`` with ``token`` in its value."""
    at = lower_head.find(field)
    return at >= 0 and lower_head.find(token, at, lower_head.find(b"\r\n", at + 2)) >= 0


class HttpPool:
    """Persistent HTTP/1.1 connections to one host:port, opened on demand up to ``limit``."""

    def __init__(self, host: str, port: int, *, limit: int = 2000, timeout: float = 30.0) -> None:
        self.host, self.port, self.limit, self.timeout = host, port, limit, timeout
        self.opened = 0  # connections ever opened: shows whether connections are reused
        self._loop = asyncio.get_running_loop()
        self._conns: set[_Conn] = set()  # open or opening
        self._opening = 0
        self._idle: list[_Conn] = []
        self._queue: deque[tuple[bytes, asyncio.Future[Response]]] = deque()  # waiting for a connection
        self._heads: dict[tuple[str, str, int], bytes] = {}
        self._host_header = f"{host}:{port}"
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper = self._loop.create_task(self._sweep())

    @classmethod
    async def open(cls, url: str, *, limit: int = 2000, request_timeout: float = 30.0,
                   warm: int = 0) -> HttpPool:
        """A pool for ``url``'s host and port (``http://`` only; a path in ``url`` is ignored).

        ``warm`` connections are opened now, so that the first burst of a benchmark does not pay for them."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http://host:port URLs are supported, not {url!r}")
        pool = cls(parts.hostname, parts.port or 80, limit=limit, timeout=request_timeout)
        if warm:
            warm = min(warm, limit)
            pool._opening += warm
            conns = await asyncio.gather(*(pool._connect() for _ in range(warm)))
            for conn in conns:
                pool._release(conn)
        return pool

    @property
    def size(self) -> int:
        """Connections open (or being opened) now."""
        return len(self._conns) + self._opening

    def submit(self, path: str, body: bytes, content_type: str = "application/json") -> asyncio.Future[Response]:
        """Send a POST now (or as soon as a connection is free); the Future resolves to its response.

        A plain function, not a coroutine: an open-loop sender fires thousands of these a second and a
        Task per request would be a good part of the load generator's CPU. Cancelling the Future drops
        the response when it comes; the connection is reused after that."""
        key = (path, content_type, len(body))
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = (
                f"POST {path} HTTP/1.1\r\nHost: {self._host_header}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        data = head + body
        waiter: asyncio.Future[Response] = self._loop.create_future()
        if self._closed:
            waiter.set_exception(RuntimeError("pool is closed"))
            return waiter
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.alive:
                conn.send(data, waiter, self._loop.time())
                return waiter
        self._queue.append((data, waiter))
        if self.size < self.limit:
            self._spawn()
        return waiter

    async def post(self, path: str, body: bytes, content_type: str = "application/json") -> Response:
        """POST ``body`` to ``path``: (status, headers with lower-cased names, body bytes)."""
        return await self.submit(path, body, content_type)

    async def close(self) -> None:
        """Close every connection; requests still waiting fail with ``ConnectionClosed``."""
        self._closed = True
        self._sweeper.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(self._sweeper, *self._tasks, return_exceptions=True)
        while self._queue:
            _, waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionClosed("pool closed"))
        for conn in list(self._conns):
            conn._fail(ConnectionClosed("pool closed"))
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost

    # connections

    async def _connect(self) -> _Conn:
        """Open a connection the caller has already counted in ``_opening`` (so that requests queued in the
        same tick see it and do not each open one)."""
        try:
            _, conn = await self._loop.create_connection(lambda: _Conn(self), self.host, self.port)
        finally:
            self._opening -= 1
        self.opened += 1
        self._conns.add(conn)
        return conn

    def _spawn(self) -> None:
        """Open one more connection in the background for the queue."""
        self._opening += 1
        task = self._loop.create_task(self._grow())
        self._tasks.add(task)  # a reference, so that the task is not collected while it runs
        task.add_done_callback(self._tasks.discard)

    async def _grow(self) -> None:
        """Open one connection for the queue; a failure to connect fails the request it was for."""
        try:
            conn = await self._connect()
        except Exception as exc:  # refused, unreachable, out of file descriptors: fail a request, never hang it
            if self._queue:
                _, waiter = self._queue.popleft()
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        if self._closed:
            conn._fail(ConnectionClosed("pool closed"))
            return
        self._release(conn)

    def _release(self, conn: _Conn) -> None:
        """``conn`` is free: give it the oldest waiting request, else keep it idle."""
        queue = self._queue
        while queue:
            data, waiter = queue.popleft()
            if not waiter.cancelled():
                conn.send(data, waiter, self._loop.time())
                return
        self._idle.append(conn)

    def _lost(self, conn: _Conn) -> None:
        """``conn`` is closed: forget it; a queued request gets a new connection in its place."""
        if conn not in self._conns:  # already forgotten (closed by us, then its connection_lost)
            return
        self._conns.discard(conn)
        if self._queue and not self._closed and self.size < self.limit:
            self._spawn()

    async def _sweep(self) -> None:
        """Every second (sooner for short timeouts), fail requests older than ``timeout``; their connection
        is closed, since a late answer would arrive in the next request's place."""
        period = min(1.0, self.timeout / 2)
        while True:
            await asyncio.sleep(period)
            limit = self._loop.time() - self.timeout
            for conn in list(self._conns):
                if conn.waiter is not None and conn.sent_at < limit:
                    conn._fail(TimeoutError(f"no response within {self.timeout:g} s"))
