"""``POST /v1/embeddings``: one HTTP request becomes one NATS request to the site's router; one ``result``
(OpenAI's embeddings list) or one ``error`` comes back. A caller that goes away before the answer gets
its request cancelled (it may still be waiting in the batcher).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from schemas.embeddings import EmbeddingRequest
from services.gateway.bridge import Bridge
from services.gateway.errors import error_response
from shared import metrics, subjects
from shared.errors import LeafwireError, UpstreamError


class EmbeddingsBridge(Bridge):
    """``POST /v1/embeddings`` over NATS."""

    async def create(self, http: web.Request, request: EmbeddingRequest, raw: bytes, tenant: str) -> web.Response:
        """Answer one embeddings request."""
        env = self.envelope(tenant)
        async with self.replies.stream() as stream:
            answered = False
            try:
                await self.ask(subjects.embeddings(self.settings.site), raw, stream, env, http)
                reply = await self.next(stream, env)
                answered = True
                headers = self.answer_headers(reply, env)
                reply.raise_for_error()
                if reply.event.value != "result":
                    raise UpstreamError(f"unexpected {reply.event.value!r} event for an embeddings request")
                return web.Response(body=reply.data, content_type="application/json", headers=headers)
            except LeafwireError as err:
                return error_response(err, {"x-request-id": env.request_id})
            except (asyncio.CancelledError, ConnectionResetError):
                metrics.CLIENT_DISCONNECTS.inc()
                raise
            finally:
                if not answered:
                    await self.cancel(env)
