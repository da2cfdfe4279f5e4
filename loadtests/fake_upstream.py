"""An OpenAI-compatible upstream that answers at once, for benchmarks (never a real provider).

    uv run python -m loadtests.fake_upstream --port 9600

``POST /v1/chat/completions`` answers ``pong`` (a ``chat.completion``, or an event stream with a role
chunk, one text chunk, the finish chunk, a usage chunk and ``[DONE]``), with precomputed bytes so that
the upstream costs as little as possible and the benchmark measures leafwire.
"""

from __future__ import annotations

import argparse
import json
import time

from aiohttp import web

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


async def chat(request: web.Request) -> web.StreamResponse:
    """Answer at once."""
    body = await request.read()
    if b'"stream":true' in body.replace(b" ", b""):
        return web.Response(body=STREAM, content_type="text/event-stream")
    return web.Response(body=WHOLE, content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9600)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
