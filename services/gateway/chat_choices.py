"""``POST /v1/chat/completions`` with ``n`` > 1: asked once as it is (``FanOut.at_once``: an OpenAI-compatible
cloud model answers every choice in one call, whole or streamed); when its target answers one choice a request
(``n_unsupported``), each choice is the caller's request without ``n`` (with a
``seed``, choice ``j`` has ``seed + j``: the samples differ, and choice 0 is what ``n: 1`` gets), sent down the
chat path as its own request (``fanout``); their answers become one ``chat.completion`` whose ``choices[j]``
is choice ``j``'s, or its ``chat.completion.chunk`` events interleaved, each with its index. The answers are
edited as JSON, not through the schema, so what a provider adds (``tool_calls``, ``refusal``...) stays.

A request with ``n`` absent or 1 never comes here: it is chat's own path (``chat.ChatBridge``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic_core import from_json, to_json

from schemas.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Usage, choice_seed
from services.gateway.choices import Choice, choice_env, event, parse, total_usage
from services.gateway.fanout import FanOut
from shared.envelope import Envelope
from shared.errors import LeafwireError, UpstreamError
from shared.replies import Reply


def plan(request: ChatCompletionRequest, raw: bytes, env: Envelope) -> list[Choice]:
    """The chat requests that answer ``request`` (its body ``raw``), one per choice, ids ``<id>-<index>``."""
    body: dict[str, Any] = from_json(raw)  # as the caller sent it: every field goes on as it would with n: 1
    del body["n"]
    body.pop("seed", None)  # each choice's own goes on as it is asked
    base, n = to_json(body), request.n or 1  # one copy that every choice shares
    return [Choice(j, base, choice_env(env, j, n, j), choice_seed(request.seed, j)) for j in range(n)]


@dataclass(frozen=True, slots=True)
class ChatAnswered:
    """One choice's answer: its ``chat.completion`` (as JSON, its choice indexed), and its usage."""

    index: int
    body: dict[str, Any]
    usage: Usage


@dataclass
class ChatAnswers:
    """One chat completion made of its choices' answers (its ``choices.Merge``)."""

    request_id: str
    created: int
    model: str = ""  # of the last chunk: the usage chunk's

    @property
    def completion_id(self) -> str:
        """The OpenAI id of the chat completion."""
        return f"chatcmpl-{self.request_id}"

    def answered(self, choice: Choice, data: bytes) -> ChatAnswered:
        """A choice's ``chat.completion`` as choice ``choice.index`` of the answer."""
        checked = parse(ChatCompletion, data)
        if not checked.choices:
            raise UpstreamError("the site answered no choice", code="upstream_bad_response")
        body: dict[str, Any] = from_json(data)
        body["choices"][0]["index"] = choice.index
        return ChatAnswered(choice.index, body, checked.usage or Usage.of(0, 0))

    def whole(self, answers: list[ChatAnswered]) -> bytes:
        """One ``chat.completion`` of every choice, in index order; all else is the first choice's."""
        ordered = sorted(answers, key=lambda a: a.index)
        return to_json({**ordered[0].body, "id": self.completion_id, "created": self.created,
                        "choices": [a.body["choices"][0] for a in ordered],
                        "usage": total_usage(a.usage for a in ordered).model_dump()})

    def chunk(self, choice: Choice, data: bytes) -> bytes:
        """A choice's chunk with the request's id and the choice's index (``b""`` for its usage chunk: the
        stream ends with one of them all)."""
        checked = parse(ChatCompletionChunk, data)
        self.model = checked.model
        if not checked.choices:
            return b""
        body: dict[str, Any] = from_json(data)
        body["id"], body["created"] = self.completion_id, self.created
        body["choices"][0]["index"] = choice.index
        return event(to_json(body))

    def usage(self, usage: Usage) -> bytes:
        """The last chunk of a stream asked to include usage: no choices, the usage of them all."""
        return event(to_json({
            "id": self.completion_id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": [], "usage": usage.model_dump(), "system_fingerprint": None,
        }))

    @staticmethod
    def error(err: LeafwireError) -> LeafwireError:
        """Chat's errors are the caller's as they are."""
        return err


def relay(reply: Reply, headers: dict[str, str]) -> web.StreamResponse:
    """The site's ``chat.completion`` of every choice, as it is."""
    return web.Response(body=reply.data, content_type="application/json", headers=headers)


class ChatChoicesBridge(FanOut):
    """``POST /v1/chat/completions`` with ``n`` > 1 over NATS."""

    async def create(self, http: web.Request, request: ChatCompletionRequest, raw: bytes,
                     tenant: str) -> web.StreamResponse:
        """Answer one chat completion request of ``n`` choices, asked once as it is (an OpenAI-compatible
        cloud model answers every choice in one call, whole or streamed: the prompt is paid once), else a
        request per choice."""
        env = self.envelope(tenant)
        native = await self.at_once(http, raw, env, relay)
        if isinstance(native, web.StreamResponse):
            return native
        merge = ChatAnswers(env.request_id, int(time.time()))
        return await self.fan_out(http, env, plan(request, raw, env), merge, stream=request.stream,
                                  include_usage=request.include_usage(), before=native)
