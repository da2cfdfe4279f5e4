"""Chat with leafwire over NATS, without HTTP.

    uv run python examples/nats_chat.py "What is the capital of France?"
    uv run python examples/nats_chat.py --no-stream "Name three pumps."

Publish an OpenAI-shaped chat request to ``lw.v1.<site>.chat`` with a reply subject; the answer arrives on
that subject, the kind of each message in the ``Lw-Event`` header: ``chunk`` (an OpenAI
chat.completion.chunk) ... then ``done``; or one ``result`` (stream=false); or ``error``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import nats
import nats.errors


async def streamed(nc: nats.NATS, site: str, body: dict[str, object], wait_s: float) -> int:
    """Subscribe to a fresh inbox first, then publish: no reply can be missed."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.flush()
    await nc.publish(f"lw.v1.{site}.chat", json.dumps({**body, "stream": True}).encode(), reply=inbox,
                     headers={"Lw-Tenant": "examples"})
    route = "?"
    try:
        while True:
            msg = await sub.next_msg(timeout=wait_s)
            headers = msg.headers or {}
            event = headers.get("Lw-Event")
            route = headers.get("Lw-Route", route)  # the first message carries the routing decision
            if headers.get("Status") == "503":
                print(f"no router is serving site {site!r}", file=sys.stderr)
                return 1
            if event == "chunk":
                for choice in json.loads(msg.data)["choices"]:
                    print(choice["delta"].get("content") or "", end="", flush=True)
            elif event == "done":
                usage = json.loads(msg.data)["usage"]
                print(f"\n[{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens, "
                      f"route: {route}]")
                return 0
            elif event == "error":
                print(f"\nerror {headers.get('Lw-Status')}: {json.loads(msg.data)['error']['message']}",
                      file=sys.stderr)
                return 1
    finally:
        await sub.unsubscribe()


async def whole(nc: nats.NATS, site: str, body: dict[str, object], wait_s: float) -> int:
    """A plain NATS request: the one reply is the whole answer (or an error)."""
    msg = await nc.request(f"lw.v1.{site}.chat", json.dumps(body).encode(), timeout=wait_s)
    reply = json.loads(msg.data)
    if (msg.headers or {}).get("Lw-Event") == "error":
        print(f"error {msg.headers['Lw-Status']}: {reply['error']['message']}", file=sys.stderr)
        return 1
    print(reply["choices"][0]["message"]["content"])
    return 0


async def connect(url: str) -> nats.NATS | None:
    """Two quick tries, then give up (nats-py's defaults retry for two minutes, and 0 attempts means forever)."""

    async def quiet(_: Exception) -> None:
        pass

    try:
        return await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1, reconnect_time_wait=0,
                                  error_cb=quiet)
    except Exception:  # nats-py raises several unrelated types for "nobody there"
        return None


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--site", default="edge1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    body = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}]}
    nc = await connect(args.nats)
    if nc is None:
        print(f"no NATS server at {args.nats} (is `just up` running?)", file=sys.stderr)
        return 2
    try:
        run = whole if args.no_stream else streamed
        return await run(nc, args.site, body, args.timeout)
    except nats.errors.NoRespondersError:
        print(f"no router is serving site {args.site!r}", file=sys.stderr)
        return 1
    except (nats.errors.TimeoutError, TimeoutError):
        print(f"no answer within {args.timeout:g} s", file=sys.stderr)
        return 1
    finally:
        await nc.drain()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
