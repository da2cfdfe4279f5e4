"""A cloud model with no fallback is handed off: the router does not wait for the adapter's admission, and
the adapter answers the caller for everything. What a user sees must not change, including when no adapter
runs or the adapter has just crashed (the router's catalog still lists it): a prompt 503, never a hang.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fakes import FakeProvider
from tests.support import NatsServer, Service, cloud_router_env, eventually, metric, running

pytestmark = pytest.mark.e2e
SITE = "handoff"
KEY = "sk-fake-handoff-0123456789"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider("openai", key=KEY).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def front(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    """A gateway and a router whose policy has no fallback for cloud models; no adapter yet."""
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE}
    router = Service("router", {**env, **cloud_router_env(tmp_path_factory.mktemp("handoff"))})
    gateway = Service("gateway", env)
    with running(router, gateway):
        yield router, gateway


def adapter(nats_server: NatsServer, provider: FakeProvider, tmp: Path) -> Service:
    file = tmp / "providers.yaml"
    file.write_text(json.dumps({"providers": [{
        "name": "fake", "kind": "openai-compatible", "base_url": provider.url, "local": True,
        "api_key_env": "LW_TEST_FAKE_KEY", "models": {"echo": {"upstream": "echo-1"}}}]}))
    return Service("cloud_adapter", {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE,
                                     "LW_PROVIDERS_FILE": str(file), "LW_TEST_FAKE_KEY": KEY})


def client(gateway: Service) -> openai.OpenAI:
    # The request's own deadline is the gateway's default (minutes): a lost hand-off would time out here.
    return openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="unused", max_retries=0, timeout=15)


def assert_no_adapter(gateway: Service) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        client(gateway).chat.completions.create(model="fake/echo", messages=MESSAGES)  # type: ignore[arg-type]
    assert err.value.status_code == 503
    assert err.value.response.headers["retry-after"] == "2"
    assert "no cloud adapter is running right now" in err.value.message


def test_no_adapter_is_a_prompt_503(front: tuple[Service, Service]) -> None:
    """Nobody listens for cloud work: NATS says so, and the caller gets a 503 with Retry-After at once."""
    router, gateway = front
    assert_no_adapter(gateway)
    assert metric(router.metrics(), "leafwire_route_decisions_total", outcome="no_responders") >= 1


def test_answered_handed_off_and_a_crash_is_a_503(front: tuple[Service, Service], nats_server: NatsServer,
                                                   provider: FakeProvider, tmp_path: Path) -> None:
    """With an adapter the answer comes through the hand-off (no admission round trip); when the adapter
    is killed, the next request is a 503 at once, while the router's catalog still lists the adapter."""
    router, gateway = front
    before = metric(router.metrics(), "leafwire_route_decisions_total", kind="cloud", outcome="handed_off")
    admitted = metric(router.metrics(), "leafwire_route_decisions_total", kind="cloud", outcome="admitted")
    ca = adapter(nats_server, provider, tmp_path)
    with running(ca):
        eventually(lambda: "fake/echo" in {m.id for m in client(gateway).models.list().data}, 20,
                   "the router's catalog lists the adapter's model")
        r = client(gateway).chat.completions.create(model="fake/echo", messages=MESSAGES)  # type: ignore[arg-type]
        assert r.choices[0].message.content == "pong hello there"
        text = router.metrics()
        assert metric(text, "leafwire_route_decisions_total", kind="cloud", outcome="handed_off") == before + 1
        assert metric(text, "leafwire_route_decisions_total", kind="cloud", outcome="admitted") == admitted
        ca.kill()
        assert "fake/echo" in {m.id for m in client(gateway).models.list().data}  # still in the catalog
        assert_no_adapter(gateway)
