"""``POST /v1/completions``: the legacy text-completions endpoint, answered down the chat path.

A lone prompt's ``n`` is asked once first, whole or streamed (``FanOut.at_once``: an OpenAI-compatible cloud model
answers every choice in one call). Otherwise each choice (a prompt, ``n`` times) is one chat request to the site's
router (``completion_request.plan``), asked and merged as every request of several choices is (``fanout``) into
one ``text_completion`` (``completion_answer``). A ``param`` naming the chat request's messages names the
``prompt`` here.
"""

from __future__ import annotations

import time

from aiohttp import web

from services.gateway.completion_answer import TextAnswers
from services.gateway.completion_request import CompletionRequest, plan, with_n
from services.gateway.fanout import FanOut, OneByOne


class CompletionsBridge(FanOut):
    """``POST /v1/completions`` over NATS."""

    async def create(self, http: web.Request, request: CompletionRequest, tenant: str) -> web.StreamResponse:
        """Answer one text completion request (a 400 before anything is sent when it cannot be honoured)."""
        env = self.envelope(tenant)
        choices = plan(request, env)
        merge = TextAnswers(env.request_id, int(time.time()), request.prompts(), request.choices_per_prompt(),
                            bool(request.echo))
        before = OneByOne()
        if merge.n > 1 and len(merge.prompts) == 1:  # one prompt's n: asked once first
            body = with_n(request).model_dump_json(exclude_unset=True).encode()
            native = await self.at_once(http, body, env, merge.all_at_once, merge.error, merge.native_chunk)
            if isinstance(native, web.StreamResponse):
                return native
            before = native
        return await self.fan_out(http, env, choices, merge, stream=request.stream,
                                  include_usage=request.include_usage(), before=before)
