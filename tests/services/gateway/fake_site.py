"""A fake site for the gateway's bridges of several choices (text completions, chat with n > 1): its chat
subject and cancel subject on a real nats-server, answered by the test; and the chat answers it sends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
from aiohttp import web
from aiohttp.test_utils import TestClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.chat import ChatCompletion, ChatCompletionChunk, ChunkChoice, Delta, StreamEnd, Usage
from schemas.chat import Choice as ChatChoice
from schemas.errors import ErrorBody, ErrorResponse
from shared import subjects

SITE = "texts"
HttpClient = TestClient[web.Request, web.Application]


def sent(body: bytes) -> dict[str, Any]:
    return dict(json.loads(body))


def chat_result(text: str, model: str = "m", usage: Usage | None = None) -> bytes:
    return ChatCompletion(id="chatcmpl-x", model=model, usage=usage or Usage.of(3, 2), choices=[
        ChatChoice(message={"content": text}, finish_reason="stop")]).model_dump_json().encode()  # type: ignore[arg-type]


def chat_chunk(text: str | None = None, finish: Any = None, role: bool = False) -> bytes:
    delta = Delta(role="assistant", content="") if role else Delta(content=text)
    return ChatCompletionChunk(id="chatcmpl-x", created=1, model="m", choices=[
        ChunkChoice(delta=delta, finish_reason=finish)]).model_dump_json().encode()


@dataclass
class SiteSubjects:
    """A subject the gateway asks the site on, and the site's cancel subject, read by the test."""

    nc: nats.NATS
    asked: Subscription
    cancels: Subscription

    async def nothing_more_asked(self) -> bool:
        await self.nc.flush()
        return self.asked.pending_msgs == 0

    async def cancelled(self, count: int) -> set[str]:
        """The request ids of the next ``count`` cancels."""
        return {json.loads((await self.cancels.next_msg(timeout=5)).data)["request_id"] for _ in range(count)}


S = TypeVar("S", bound=SiteSubjects)


@asynccontextmanager
async def reading(nc: nats.NATS, subject: str, site: str, kind: type[S]) -> AsyncIterator[S]:
    """``kind`` reading ``subject`` and the cancels of ``site`` until the block ends."""
    asked = await nc.subscribe(subject)
    cancels = await nc.subscribe(subjects.cancel(site))
    try:
        yield kind(nc, asked, cancels)
    finally:
        await asked.unsubscribe()
        await cancels.unsubscribe()


class FakeSite(SiteSubjects):
    """The site's chat subject and its cancel subject, read by the test."""

    async def next_choice(self) -> tuple[Msg, dict[str, Any]]:
        """The next request of one choice. A whole chat request of ``n`` > 1 (the gateway asks it once
        first) is answered as a local model's site does: ``n_unsupported``, so the choices come one by one."""
        msg = await self.asked.next_msg(timeout=5)
        body = sent(msg.data)
        if (body.get("n") or 1) > 1:
            await self.one_by_one(msg)
            return await self.next_choice()
        return msg, body

    async def one_by_one(self, msg: Msg) -> None:
        body = ErrorResponse(error=ErrorBody(message="local model m answers one choice a request", param="n",
                                             type="invalid_request_error", code="n_unsupported"))
        await self.send(msg, "error", body.model_dump_json().encode(), **{"Lw-Status": "400"})

    async def send(self, msg: Msg, event: str, body: bytes, **headers: str) -> None:
        await self.nc.publish(msg.reply, body, headers={"Lw-Event": event, **headers})

    async def stream(self, msg: Msg, *texts: str) -> None:
        await self.send(msg, "chunk", chat_chunk(role=True), **{"Lw-Route": "target=local/m"})
        for text in texts:
            await self.send(msg, "chunk", chat_chunk(text))

    async def end(self, msg: Msg) -> None:
        await self.send(msg, "chunk", chat_chunk(finish="stop"))
        await self.send(msg, "done", StreamEnd(request_id="x", finish_reason="stop",
                                               usage=Usage.of(3, 2)).model_dump_json().encode())

    async def fail(self, msg: Msg, status: int = 400, param: str | None = "messages", **headers: str) -> None:
        body = ErrorResponse(error=ErrorBody(message="no", type="invalid_request_error", param=param))
        await self.send(msg, "error", body.model_dump_json().encode(), **{"Lw-Status": str(status), **headers})


def request_id(msg: Msg) -> str:
    return (msg.headers or {})["Lw-Request-Id"]


def events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line]
