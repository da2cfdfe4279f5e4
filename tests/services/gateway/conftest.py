"""The gateway's HTTP app on a real nats-server, and the fake site that answers it (``fake_site``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.app import Gateway, build_app
from services.gateway.chat import ChatBridge
from services.gateway.chat_choices import ChatChoicesBridge
from services.gateway.completions import CompletionsBridge
from services.gateway.embeddings import EmbeddingsBridge
from services.gateway.settings import GatewaySettings
from shared import subjects
from shared.ops import Readiness
from shared.replies import ReplyReader
from tests.services.gateway.fake_site import SITE, FakeSite, HttpClient, reading


@pytest.fixture
async def site(nc: nats.NATS) -> AsyncIterator[FakeSite]:
    async with reading(nc, subjects.chat(SITE), SITE, FakeSite) as fake:
        yield fake


@pytest.fixture
async def client(nc: nats.NATS) -> AsyncIterator[HttpClient]:
    """The gateway's HTTP app, keeping 2 choices of a request out at once."""
    reader = ReplyReader(nc, subjects.reply_prefix("test-completions"))
    await reader.start()
    settings = GatewaySettings(site=SITE, completions_parallel=2)
    gateway = Gateway(settings, nc, ChatBridge(nc, reader, settings), EmbeddingsBridge(nc, reader, settings),
                      CompletionsBridge(nc, reader, settings), ChatChoicesBridge(nc, reader, settings), keys={})
    app = build_app(gateway, Readiness())
    try:
        async with TestClient(TestServer(app)) as http_client:
            yield http_client
    finally:
        await reader.stop()
