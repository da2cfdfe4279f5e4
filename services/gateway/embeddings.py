"""``POST /v1/embeddings``: one HTTP request becomes one NATS request to the site's router; one ``result``
(OpenAI's embeddings list) or one ``error`` comes back. A caller that goes away before the answer gets
its request cancelled (it may still be waiting in the batcher).
"""

from __future__ import annotations

from aiohttp import web

from schemas.embeddings import EmbeddingRequest
from services.gateway.bridge import Bridge, Exchange
from shared import subjects
from shared.errors import UpstreamError
from shared.replies import Event


class EmbeddingsBridge(Bridge):
    """``POST /v1/embeddings`` over NATS."""

    async def create(self, http: web.Request, request: EmbeddingRequest, raw: bytes,
                     tenant: str) -> web.StreamResponse:
        """Answer one embeddings request."""
        env = self.envelope(tenant)

        async def respond(exchange: Exchange) -> web.StreamResponse:
            await self.ask(subjects.embeddings(self.settings.site), raw, exchange.stream, env, http)
            reply = await self.next(exchange.stream, env)
            exchange.finished = True
            headers = self.answer_headers(reply, env)
            reply.raise_for_error()
            if reply.event is not Event.RESULT:
                raise UpstreamError(f"unexpected {reply.event.value!r} event for an embeddings request")
            return web.Response(body=reply.data, content_type="application/json", headers=headers)

        return await self.exchange(env, respond)
