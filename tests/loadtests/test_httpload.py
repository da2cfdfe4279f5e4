"""The benchmark harness: the keep-alive client, the raw fake upstream and the open-loop pacer.

What a benchmark user relies on: answers are read whole (Content-Length and chunked), connections are reused
and bounded, a server that hangs up fails the request instead of hanging the run, and the upstream speaks
HTTP/1.1 well enough for aiohttp's client (the cloud-adapter's) to accept it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web

from deploy import topology
from loadtests import fake_upstream
from loadtests.httpload import ConnectionClosed, HttpPool
from loadtests.pacing import paced

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "bench/echo", "messages": [{"role": "user", "content": "Say pong."}]}).encode()
STREAM_BODY = json.dumps({"model": "bench/echo", "messages": [], "stream": True}).encode()


def completion(body: bytes) -> dict[str, object]:
    """The answer without ``created``: the upstream process stamps it when it starts, this one on import."""
    answer = json.loads(body)
    assert isinstance(answer, dict)
    answer.pop("created")
    return answer


WHOLE = completion(fake_upstream.WHOLE)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """``loadtests.fake_upstream`` as its own process; yields its base URL, stops it by PID."""
    port = topology.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loadtests.fake_upstream", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"fake upstream exited with {proc.returncode}: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.fixture
async def pool(upstream: str) -> AsyncIterator[HttpPool]:
    p = await HttpPool.open(upstream)
    try:
        yield p
    finally:
        await p.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """In-process TCP servers with a hand-written handler, for what a well-behaved server never does."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request with a Content-Length body (what HttpPool sends)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


# the client against the fake upstream


async def test_whole_answer_parses_as_the_upstream_json(pool: HttpPool) -> None:
    status, headers, body = await pool.post(CHAT, BODY)
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["Content-Length"] == str(len(body))  # names are case-insensitive
    assert completion(body) == WHOLE
    assert json.loads(body)["choices"][0]["message"]["content"] == "pong"


async def test_stream_answer_is_the_whole_event_stream(pool: HttpPool) -> None:
    status, headers, body = await pool.post(CHAT, STREAM_BODY)
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert body.endswith(b"data: [DONE]\n\n")
    assert body == fake_upstream.STREAM


async def test_other_paths_are_404(pool: HttpPool) -> None:
    status, _, body = await pool.post("/v1/nothing", BODY)
    assert status == 404
    assert body == b"404: Not Found"
    assert (await pool.post(CHAT, BODY))[0] == 200  # the connection is still good


async def test_concurrent_requests_succeed_on_a_bounded_pool(pool: HttpPool) -> None:
    answers = await asyncio.gather(*(pool.post(CHAT, BODY) for _ in range(50)))
    assert all(status == 200 and completion(body) == WHOLE for status, _, body in answers)
    assert pool.opened <= 50
    assert pool.size == pool.opened  # all still open, none leaked or closed
    again = await asyncio.gather(*(pool.post(CHAT, BODY) for _ in range(50)))
    assert all(status == 200 for status, _, _ in again)
    assert pool.opened <= 50  # the second burst reused them


async def test_sequential_requests_reuse_one_connection(pool: HttpPool) -> None:
    for _ in range(20):
        assert (await pool.post(CHAT, BODY))[0] == 200
    assert pool.opened == 1


async def test_requests_beyond_the_limit_wait_for_a_connection(upstream: str) -> None:
    pool = await HttpPool.open(upstream, limit=4)
    try:
        answers = await asyncio.gather(*(pool.post(CHAT, BODY) for _ in range(40)))
        assert [status for status, _, _ in answers] == [200] * 40
        assert pool.opened <= 4
    finally:
        await pool.close()


async def test_submit_without_a_task(pool: HttpPool) -> None:
    """The open-loop sender's way: a Future per request and a callback, no coroutine."""
    seen: list[int] = []
    futures = [pool.submit(CHAT, BODY) for _ in range(10)]
    for f in futures:
        f.add_done_callback(lambda f: seen.append(f.result()[0]))
    await asyncio.gather(*futures)
    await asyncio.sleep(0)
    assert seen == [200] * 10


def test_under_uvloop(upstream: str) -> None:
    async def main() -> list[int]:
        pool = await HttpPool.open(upstream)
        try:
            answers = await asyncio.gather(*(pool.post(CHAT, b) for b in (BODY, STREAM_BODY) * 10))
            return [status for status, _, _ in answers] + [pool.opened]
        finally:
            await pool.close()

    *statuses, opened = uvloop.run(main())
    assert statuses == [200] * 20
    assert opened <= 20


# the fake upstream seen by other clients


async def test_upstream_answers_aiohttp_with_content_types(upstream: str) -> None:
    """The cloud-adapter's client is aiohttp, and it checks the Content-Type."""
    async with aiohttp.ClientSession() as session:
        async with session.post(upstream + CHAT, data=BODY, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            assert (await r.json())["object"] == "chat.completion"
        async with session.post(upstream + CHAT, data=STREAM_BODY) as r:
            assert r.content_type == "text/event-stream"
            lines = [line async for line in r.content]
            assert lines[-2:] == [b"data: [DONE]\n", b"\n"]


async def test_upstream_answers_pipelined_and_split_requests_in_order(upstream: str) -> None:
    port = int(upstream.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        def request(body: bytes, path: str = CHAT) -> bytes:
            return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body

        # three requests in one write, the third cut in the middle of its body
        data = request(BODY) + request(STREAM_BODY, "/elsewhere") + request(STREAM_BODY)
        writer.write(data[:-5])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(data[-5:] + b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = await asyncio.wait_for(reader.read(), 5)  # to EOF: the last request asked to close
    finally:
        writer.close()
    statuses = [part[:3] for part in answers.split(b"HTTP/1.1 ")[1:]]  # bodies have no CRLF: split on the line
    assert statuses == [b"200", b"404", b"200", b"405"]
    assert answers.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    assert fake_upstream.NOT_FOUND + fake_upstream.ANSWER_STREAM + fake_upstream.NOT_ALLOWED in answers


# the client against servers that frame or behave otherwise


async def test_chunked_response_is_read_to_the_last_chunk() -> None:
    """aiohttp.web streaming an event stream chunked, as the gateway does for ``"stream": true``."""
    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Leafwire-Cache": "miss"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(5):
            await response.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.01)  # separate segments: the client sees the body arrive in pieces
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post(CHAT, stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    pool = await HttpPool.open(f"http://127.0.0.1:{port}")
    try:
        for _ in range(2):
            status, headers, body = await asyncio.wait_for(pool.post(CHAT, STREAM_BODY), 5)
            assert status == 200
            assert headers["transfer-encoding"] == "chunked"
            assert headers.get("x-leafwire-cache") == "miss"
            assert body == b"".join(f"data: {i}\n\n".encode() for i in range(5)) + b"data: [DONE]\n\n"
        assert pool.opened == 1  # the connection is reusable after the 0-chunk
    finally:
        await pool.close()
        await runner.cleanup()


async def test_chunked_response_with_extensions_and_trailers_byte_by_byte(
        raw_server: Callable[[Handler], Awaitable[str]]) -> None:
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Leafwire-Cache: hit\r\n\r\n"
              b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: yes\r\n\r\n")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            for i in range(len(answer)):
                writer.write(answer[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0)
        writer.close()

    pool = await HttpPool.open(await raw_server(handler))
    try:
        for _ in range(2):
            status, headers, body = await asyncio.wait_for(pool.post(CHAT, BODY), 5)
            assert (status, headers["x-leafwire-cache"], body) == (200, "hit", b"hello 0123456789")
        assert pool.opened == 1
    finally:
        await pool.close()


async def test_server_hanging_up_fails_the_request_and_the_pool_recovers(
        raw_server: Callable[[Handler], Awaitable[str]]) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:  # the first connection: read the request, close without an answer
            await read_request(reader)
            writer.close()
            return
        while True:
            try:
                await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(fake_upstream.ANSWER)
        writer.close()

    pool = await HttpPool.open(await raw_server(handler))
    try:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(pool.post(CHAT, BODY), 5)
        assert pool.size == 0
        status, _, body = await asyncio.wait_for(pool.post(CHAT, BODY), 5)
        assert (status, body) == (200, fake_upstream.WHOLE)
        assert (pool.opened, pool.size) == (2, 1)
    finally:
        await pool.close()


async def test_connection_close_from_the_server_retires_the_connection(
        raw_server: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    pool = await HttpPool.open(await raw_server(handler))
    try:
        for _ in range(3):
            status, headers, body = await asyncio.wait_for(pool.post(CHAT, BODY), 5)
            assert (status, headers["connection"], body) == (200, "close", b"ok")
        assert pool.opened == 3  # never reused
    finally:
        await pool.close()


async def test_body_until_close_and_no_answer_in_time(raw_server: Callable[[Handler], Awaitable[str]]) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    pool = await HttpPool.open(await raw_server(until_close))
    try:
        assert (await asyncio.wait_for(pool.post(CHAT, BODY), 5))[2] == b"all of it"
    finally:
        await pool.close()
    pool = await HttpPool.open(await raw_server(silent), request_timeout=0.2)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.post(CHAT, BODY), 5)
        assert pool.size == 0
    finally:
        await pool.close()


# pacing


@pytest.mark.parametrize("use_timerfd", [True, False])
async def test_paced_fires_every_request_in_order_never_early(use_timerfd: bool) -> None:
    fired: list[tuple[float, float]] = []
    start, rate, total = time.perf_counter() + 0.01, 1000.0, 100
    await paced(start, rate, total, lambda due: fired.append((due, time.perf_counter())), use_timerfd=use_timerfd)
    assert [due for due, _ in fired] == [start + i / rate for i in range(total)]
    assert all(at >= due - 1e-4 for due, at in fired)  # a tick is never meaningfully early
    assert fired[-1][1] - start < 1.0


async def test_paced_raises_what_fire_raises() -> None:
    def fire(due: float) -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await paced(time.perf_counter(), 1000.0, 10, fire)
