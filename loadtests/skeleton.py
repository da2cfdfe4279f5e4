"""The cloud path with nothing on it: the least a gateway, a router and a cloud-adapter can do per request.

    uv run python -m loadtests.cloud_bench --floor      # runs these instead of leafwire's services

Each role is its own process, like leafwire's services, and keeps the path's hops and messages: the gateway
(aiohttp) reads the body and publishes it with a reply subject, then answers with what arrives there; the
router (nats-py) hands it off to the adapter with the caller's subject in ``Lw-Reply``, as leafwire's router
does a request with no fallback; the adapter (nats-py and one pooled aiohttp session) POSTs it to the
upstream and publishes the upstream's body to the caller. Nothing else: no validation, routing
policy, masking, cache, retries, breaker, budgets, usage events, metrics or logs. What this path cannot do
on a machine, leafwire cannot either: the difference between the two is what leafwire's features cost.
Never a service: benchmarks only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import Awaitable, Callable

import aiohttp
import nats
from aiohttp import web
from nats.aio.msg import Msg

CHAT, CLOUD = "skeleton.chat", "skeleton.cloud"
REPLY = "Lw-Reply"


def in_tasks(handle: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
    """A subscription callback that runs ``handle`` in a task per message, as the services' intakes do."""
    tasks: set[asyncio.Task[None]] = set()

    async def deliver(msg: Msg) -> None:
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return deliver


async def gateway(nats_url: str, port: int) -> None:
    """HTTP in, one NATS message out with a reply subject, the first reply back as the HTTP answer."""
    nc = await nats.connect(nats_url)
    prefix = nc.new_inbox()
    waiting: dict[str, asyncio.Future[bytes]] = {}
    ids = itertools.count()

    async def on_reply(msg: Msg) -> None:
        future = waiting.pop(msg.subject[len(prefix) + 1:], None)
        if future is not None and not future.done():
            future.set_result(msg.data)

    await nc.subscribe(f"{prefix}.*", cb=on_reply)

    async def chat(request: web.Request) -> web.Response:
        body = await request.read()
        key = str(next(ids))
        answer = waiting[key] = asyncio.get_running_loop().create_future()
        try:
            await nc.publish(CHAT, body, reply=f"{prefix}.{key}")
            async with asyncio.timeout(30):
                return web.Response(body=await answer, content_type="application/json")
        finally:
            waiting.pop(key, None)

    async def ready(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def router(nats_url: str) -> None:
    """Hand each request off to the adapter, the caller's subject in ``Lw-Reply``."""
    nc = await nats.connect(nats_url)

    async def hand_off(msg: Msg) -> None:
        await nc.publish(CLOUD, msg.data, headers={REPLY: msg.reply})

    await nc.subscribe(CHAT, queue="router", cb=in_tasks(hand_off))
    await asyncio.Event().wait()


async def adapter(nats_url: str, upstream: str) -> None:
    """POST each request to the upstream; the answer to the caller."""
    nc = await nats.connect(nats_url)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4096),
                                    cookie_jar=aiohttp.DummyCookieJar())
    headers = {"Content-Type": "application/json"}

    async def call(msg: Msg) -> None:
        async with session.post(upstream, data=msg.data, headers=headers) as resp:
            body = await resp.read()
        await nc.publish((msg.headers or {})[REPLY], body, headers={"Lw-Event": "result"})

    await nc.subscribe(CLOUD, queue="adapter", cb=in_tasks(call))
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["gateway", "router", "adapter"])
    parser.add_argument("--nats", required=True)
    parser.add_argument("--port", type=int, default=0, help="the gateway's HTTP port")
    parser.add_argument("--upstream", default="", help="the adapter's upstream URL")
    args = parser.parse_args()
    roles = {"gateway": lambda: gateway(args.nats, args.port), "router": lambda: router(args.nats),
             "adapter": lambda: adapter(args.nats, args.upstream)}
    import uvloop

    from shared import nats_headers

    nats_headers.install()  # the same nats-py client as leafwire's services: not a feature, the floor's too
    uvloop.run(roles[args.role]())


if __name__ == "__main__":
    main()
