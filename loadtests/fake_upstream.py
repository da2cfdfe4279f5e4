"""An OpenAI-compatible upstream that answers at once, for benchmarks (never a real provider).

    uv run python -m loadtests.fake_upstream --port 9600

``POST /v1/chat/completions`` answers ``pong`` (a ``chat.completion``, or, when the JSON body has
``"stream": true``, an event stream with a role chunk, one text chunk, the finish chunk, a usage chunk and
``[DONE]``); any other path is a 404. Whole responses, head included, are precomputed bytes.

Why a raw asyncio Protocol instead of aiohttp.web: the benchmark runs this upstream on the same two cores as
the system under test, so every microsecond it spends per request is taken from leafwire. aiohttp.web cost
~0.24 ms of CPU a request (request objects, routing, header multidicts, a Task per request); this server
finds the end of the head and the Content-Length with ``bytes.find`` and writes a prebuilt answer. It is
still real HTTP/1.1 over TCP: keep-alive, Content-Length request bodies, several pipelined requests in one
read answered in order, ``Connection: close`` honoured, well-formed responses with Content-Type and
Content-Length (the cloud-adapter's aiohttp client checks the Content-Type). Not supported, and refused with
a status rather than misread: chunked request bodies (501) and heads over 64 KiB (431).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import cast

USAGE = {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}
WHOLE = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": "echo",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}, "finish_reason": "stop"}],
    "usage": USAGE}).encode()


def _chunk(delta: dict[str, object], finish: str | None = None, usage: object = None) -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "echo",
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


STREAM = b"".join([_chunk({"role": "assistant", "content": ""}), _chunk({"content": "pong"}), _chunk({}, "stop"),
                   _chunk({}, usage=USAGE), b"data: [DONE]\n\n"])

CHAT_PATH = b"/v1/chat/completions"
MAX_HEAD = 64 * 1024


def response(status: str, content_type: str, body: bytes, close: bool = False) -> bytes:
    """A whole HTTP/1.1 response as bytes, built once at import."""
    connection = "Connection: close\r\n" if close else ""
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"{connection}\r\n").encode() + body


ANSWER = response("200 OK", "application/json", WHOLE)
ANSWER_STREAM = response("200 OK", "text/event-stream", STREAM)
NOT_FOUND = response("404 Not Found", "text/plain; charset=utf-8", b"404: Not Found")
NOT_ALLOWED = response("405 Method Not Allowed", "text/plain; charset=utf-8", b"405: Method Not Allowed")
# framing errors: the rest of the stream can not be read, so these close the connection
BAD_REQUEST = response("400 Bad Request", "text/plain; charset=utf-8", b"400: Bad Request", close=True)
NOT_IMPLEMENTED = response("501 Not Implemented", "text/plain; charset=utf-8",
                           b"501: chunked request bodies are not supported", close=True)
HEAD_TOO_LARGE = response("431 Request Header Fields Too Large", "text/plain; charset=utf-8",
                          b"431: Request Header Fields Too Large", close=True)


def answer(method: bytes, target: bytes, body: bytes) -> bytes:
    """The response to one request."""
    if target != CHAT_PATH and target.partition(b"?")[0] != CHAT_PATH:
        return NOT_FOUND
    if method != b"POST":
        return NOT_ALLOWED
    if b'"stream":true' in body.replace(b" ", b""):
        return ANSWER_STREAM
    return ANSWER


class Upstream(asyncio.Protocol):
    """One client connection: requests parsed as they arrive, answered in order."""

    __slots__ = ("_buf", "_transport")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos, close = 0, False
        while not close:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                if len(buf) - pos > MAX_HEAD:
                    out.append(HEAD_TOO_LARGE)
                    close = True
                break
            line_end = buf.find(b"\r\n", pos)
            request_line = buf[pos:line_end].split(b" ")
            if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/1."):
                out.append(BAD_REQUEST)
                close = True
                break
            method, target, version = request_line
            fields = buf[line_end:end + 2].lower()  # "\r\nname: value...\r\n"
            if field_has(fields, b"\r\ntransfer-encoding:", b"chunked"):
                out.append(NOT_IMPLEMENTED)
                close = True
                break
            at = fields.find(b"\r\ncontent-length:")
            try:
                length = int(fields[at + 17:fields.find(b"\r\n", at + 17)]) if at >= 0 else 0
            except ValueError:
                length = -1
            if length < 0:
                out.append(BAD_REQUEST)
                close = True
                break
            start = end + 4
            if len(buf) < start + length:
                break  # the body is still coming
            out.append(answer(method, target, buf[start:start + length]))
            pos = start + length
            if version == b"HTTP/1.0":
                close = not field_has(fields, b"\r\nconnection:", b"keep-alive")
            else:
                close = field_has(fields, b"\r\nconnection:", b"close")
        self._buf = b"" if close else buf[pos:]
        transport = self._transport
        assert transport is not None
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            transport.close()  # after the buffered answers are written


def field_has(fields: bytes, name: bytes, token: bytes) -> bool:
    """Whether the lower-cased header block has field ``name`` with ``token`` in its value."""
    at = fields.find(name)
    return at >= 0 and fields.find(token, at, fields.find(b"\r\n", at + 2)) >= 0


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then stop listening and return (open connections die with the process:
    waiting for clients to hang up first could hold a benchmark's shutdown)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(Upstream, host, port, backlog=4096)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9600)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
