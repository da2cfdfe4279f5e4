"""The gateway's HTTP app: routes, authentication, metrics, and its life cycle."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from schemas.chat import HttpChatRequest
from schemas.control import ModelList
from schemas.embeddings import EmbeddingRequest
from services.gateway.bridge import request_headers
from services.gateway.chat import ChatBridge
from services.gateway.chat_choices import ChatChoicesBridge
from services.gateway.completion_request import CompletionRequest
from services.gateway.completions import CompletionsBridge
from services.gateway.embeddings import EmbeddingsBridge
from services.gateway.errors import (
    BODY_TIMEOUT_S,
    MAX_BODY,
    REQUEST_ID,
    openai_errors,
    read_json,
    read_model,
    validate,
)
from services.gateway.settings import ANSWERS_END_S, GatewaySettings
from shared import metrics, subjects
from shared import nats as lw_nats
from shared.envelope import EVENT, new_request_id
from shared.errors import BadConfiguration, ModelNotFound, Unauthorized, Unavailable
from shared.logging import bind_request, get_logger
from shared.ops import Readiness, add_routes, bound_port
from shared.replies import Event, ReplyReader, error_of
from shared.tasks import stop_tasks

SERVICE = "gateway"
log = get_logger("leafwire.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Gateway:
    """Everything the handlers share."""

    settings: GatewaySettings
    nc: NATS
    bridge: ChatBridge
    embed: EmbeddingsBridge
    complete: CompletionsBridge
    choices: ChatChoicesBridge
    keys: dict[str, str]
    models_ok_at: float = 0.0

    def tenant_of(self, request: web.Request) -> str:
        """The tenant of the caller's API key; any caller is ``default`` when no keys are configured."""
        if not self.keys:
            return "default"
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        tenant = self.keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise Unauthorized("Incorrect API key provided. "
                               "Pass a valid key as 'Authorization: Bearer <key>'.")
        return tenant

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``"""
        tenant = self.tenant_of(request)
        chat, raw = await read_model(request, HttpChatRequest)
        bind_request("-", tenant, subjects.chat(self.settings.site))
        if chat.n is not None and chat.n > 1:  # a request per choice; n: 1 stays chat's own path, untouched
            return await self.choices.create(request, chat, raw, tenant)
        return await self.bridge.complete(request, chat, raw, tenant)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions``: the legacy text completions, answered down the chat path."""
        tenant = self.tenant_of(request)
        body, _ = await read_model(request, CompletionRequest)
        bind_request("-", tenant, subjects.chat(self.settings.site))
        return await self.complete.create(request, body, tenant)

    async def dry_run(self, request: web.Request) -> web.Response:
        """``POST /v1/route/dry-run``: where a chat request would run, and why, without running it."""
        tenant = self.tenant_of(request)
        chat = validate(HttpChatRequest, await read_json(request))
        env = self.bridge.envelope(tenant)
        try:  # each choice of n is routed alike: the router is asked about one
            reply = await self.nc.request(subjects.route_dry_run(self.settings.site),
                                          chat.model_dump_json(exclude_unset=True, exclude={"n"}).encode(),
                                          timeout=self.settings.models_timeout_s,
                                          headers=request_headers(env, request))
        except (NoRespondersError, NatsTimeout, TimeoutError) as exc:
            raise Unavailable(f"no router is serving site '{self.settings.site}'", retry_after=2) from exc
        if (reply.headers or {}).get(EVENT) == Event.ERROR.value:
            raise error_of(reply.headers or {}, reply.data)
        return web.Response(body=reply.data, content_type="application/json", headers={REQUEST_ID: env.request_id})

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/embeddings``"""
        tenant = self.tenant_of(request)
        body, raw = await read_model(request, EmbeddingRequest)
        bind_request("-", tenant, subjects.embeddings(self.settings.site))
        return await self.embed.create(request, body, raw, tenant)

    async def _models(self) -> bytes:
        try:
            reply = await self.nc.request(subjects.models(self.settings.site), b"",
                                          timeout=self.settings.models_timeout_s)
        except (NoRespondersError, NatsTimeout, TimeoutError) as exc:
            raise Unavailable(f"no router is serving site '{self.settings.site}'", retry_after=2) from exc
        self.models_ok_at = time.monotonic()
        return bytes(reply.data)

    async def list_models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: what the site's router knows, with where each model runs and its kind."""
        self.tenant_of(request)
        return web.Response(body=await self._models(), content_type="application/json",
                            headers={REQUEST_ID: new_request_id()})

    async def get_model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}``: one model; 404 when nobody serves it."""
        self.tenant_of(request)
        name = request.match_info["model"]
        card = next((c for c in ModelList.model_validate_json(await self._models()).data if c.id == name), None)
        if card is None:
            raise ModelNotFound(name)
        return web.json_response(card.model_dump(), headers={REQUEST_ID: new_request_id()})

    def ready(self) -> str | None:
        """Ready when connected to NATS (the router is probed separately)."""
        return None if self.nc.is_connected else "not connected to NATS"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every API request by route (not by raw path: label values stay bounded)."""
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else "unmatched"
    started = time.perf_counter()
    metrics.HTTP_INFLIGHT.inc()
    status = 499
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    finally:
        metrics.HTTP_INFLIGHT.dec()
        metrics.child(metrics.HTTP_REQUESTS, endpoint, str(status)).inc()
        metrics.child(metrics.HTTP_DURATION, endpoint).observe(time.perf_counter() - started)


def build_app(gateway: Gateway, readiness: Readiness) -> web.Application:
    """The aiohttp application."""
    app = web.Application(client_max_size=gateway.settings.max_body_bytes,
                          middlewares=[observe, openai_errors])
    app[MAX_BODY] = gateway.settings.max_body_bytes
    app[BODY_TIMEOUT_S] = gateway.settings.body_timeout_s
    app.router.add_post("/v1/chat/completions", gateway.chat_completions)
    app.router.add_post("/v1/completions", gateway.completions)
    app.router.add_post("/v1/embeddings", gateway.embeddings)
    app.router.add_get("/v1/models", gateway.list_models)
    app.router.add_post("/v1/route/dry-run", gateway.dry_run)
    app.router.add_get("/v1/models/{model:.+}", gateway.get_model)  # cloud models are <provider>/<model>
    add_routes(app, SERVICE, readiness, gateway.tenant_of if gateway.settings.metrics_need_key else None)
    return app


async def probe_router(gateway: Gateway, readiness: Readiness, interval: float = 5.0) -> None:
    """Keep readiness honest: the gateway is ready only while the site's router answers."""
    state: dict[str, str | None] = {"router": "router not probed yet"}
    readiness.add("router", lambda: state["router"])
    while True:
        try:
            await gateway.nc.request(subjects.models(gateway.settings.site), b"", timeout=2)
            state["router"] = None
        except Exception as exc:
            state["router"] = (f"router of site '{gateway.settings.site}' does not answer "
                               f"({type(exc).__name__})")
        await asyncio.sleep(interval if state["router"] is None else 0.5)


async def wind_down(runner: web.AppRunner, replies: ReplyReader, grace_s: float) -> None:
    """Shutdown, first step (NATS is still up): take no new connections nor requests (503), give the answers
    in flight ``grace_s`` to finish, then end the rest with the same 503, which a stream gets as an error
    event, and cancel them at the site. Then aiohttp closes the connections."""
    for site in list(runner.sites):
        await site.stop()
    stopping = Unavailable("The gateway is shutting down; send the request again.", retry_after=1,
                           code="shutting_down")
    replies.refuse_new(stopping)  # a request on a kept-alive connection: 503 at once, never sent to the site
    if not await replies.emptied(grace_s):
        log.warning("shutting down: ending answers in flight", answers=len(replies), grace_s=grace_s)
    replies.end(stopping)


async def main(settings: GatewaySettings, readiness: Readiness, stack: AsyncExitStack) -> None:
    """Connect to NATS and serve HTTP."""
    try:
        keys = settings.key_table()
    except (ValueError, OSError) as exc:  # OSError: LW_GATEWAY_API_KEYS_FILE cannot be read
        raise BadConfiguration(f"LW_GATEWAY_API_KEYS / LW_GATEWAY_API_KEYS_FILE: {exc}") from exc
    nc = await lw_nats.connect(settings, SERVICE)
    stack.push_async_callback(nc.drain)
    replies = ReplyReader(nc, subjects.reply_prefix(f"gw-{uuid.uuid4().hex[:12]}"))
    await replies.start()
    stack.push_async_callback(replies.stop)
    gateway = Gateway(settings, nc, ChatBridge(nc, replies, settings), EmbeddingsBridge(nc, replies, settings),
                      CompletionsBridge(nc, replies, settings), ChatChoicesBridge(nc, replies, settings), keys)
    readiness.add("nats", gateway.ready)
    probe = asyncio.create_task(probe_router(gateway, readiness))
    stack.push_async_callback(stop_tasks, [probe])
    runner = web.AppRunner(build_app(gateway, readiness), handler_cancellation=True, access_log=None,
                           shutdown_timeout=ANSWERS_END_S, auto_decompress=False)  # errors.read_body decodes
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    stack.push_async_callback(wind_down, runner, replies, settings.shutdown_grace_s)
    port = bound_port(site, settings.port)
    log.info("gateway listening", url=f"http://{settings.host}:{port}/v1", auth=bool(keys))
