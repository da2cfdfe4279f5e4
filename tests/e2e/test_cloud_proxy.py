"""Cloud calls through an HTTP proxy, as an edge site behind a corporate proxy makes them.

The proxy is a real one (proxy.py, from PyPI) on loopback, asking for basic credentials; the provider is the
fake of tests/fakes.py; a real nats-server, cloud-adapter, router and gateway; the official openai client.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from deploy.topology import free_port
from tests.fakes import FakeProvider
from tests.support import NatsServer, Service, cloud_router_env, eventually, running

pytestmark = pytest.mark.e2e
SITE = "proxied"
KEY = "sk-proxied-0123456789"
PROXY_USER, PROXY_PASSWORD = "edge", "proxy-pass-5f4e3d2c"
MESSAGES = [{"role": "user", "content": "hello there"}]


@dataclass
class ProxyStack:
    gateway: Service
    adapter: Service
    fake: FakeProvider

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key="unused", max_retries=0, timeout=30)

    def ask(self, model: str, **kw: Any) -> Any:
        return self.client().chat.completions.create(model=model, messages=MESSAGES, **kw)  # type: ignore[arg-type]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """proxy.py on loopback, with basic credentials; its log."""
    port, log = free_port(), tmp_path_factory.mktemp("proxy") / "access.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port),
                                 "--basic-auth", f"{PROXY_USER}:{PROXY_PASSWORD}", "--num-workers", "1",
                                 "--num-acceptors", "1"], stdout=out, stderr=subprocess.STDOUT)
    try:
        eventually(lambda: listening(port), 20, "the proxy to listen")
        yield port, log
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def stack(nats_server: NatsServer, proxy: tuple[int, Path],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyStack]:
    port, _ = proxy
    fake = FakeProvider("openai", key=KEY).start()
    folder = tmp_path_factory.mktemp("proxied")

    def entry(name: str, proxy_url: str, auth_env: str) -> dict[str, Any]:
        return {"name": name, "kind": "openai-compatible", "base_url": fake.url, "local": True,
                "api_key_env": "LW_TEST_PROXIED_KEY", "proxy": proxy_url, "proxy_auth_env": auth_env,
                "models": {"echo": {}}, "timeouts": {"connect_s": 2, "first_byte_s": 5, "total_s": 10}}

    closed = free_port()  # nothing listens there
    (folder / "providers.yaml").write_text(json.dumps({"providers": [
        entry("viaproxy", f"http://127.0.0.1:{port}", "LW_TEST_PROXY_AUTH"),
        entry("badauth", f"http://127.0.0.1:{port}", "LW_TEST_PROXY_BAD_AUTH"),
        entry("proxydown", f"http://127.0.0.1:{closed}", "LW_TEST_PROXY_AUTH"),
    ]}))
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE}
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(folder / "providers.yaml"),
                                        "LW_TEST_PROXIED_KEY": KEY,
                                        "LW_TEST_PROXY_AUTH": f"{PROXY_USER}:{PROXY_PASSWORD}",
                                        "LW_TEST_PROXY_BAD_AUTH": f"{PROXY_USER}:wrong-password-9f8e",
                                        "LW_CLOUD_BACKOFF_BASE_S": "0.01", "LW_CLOUD_BACKOFF_CAP_S": "0.02",
                                        "LW_LOG_LEVEL": "debug"})
    gateway = Service("gateway", env)
    try:
        with running(adapter, Service("router", {**env, **cloud_router_env(folder)}), gateway):
            yield ProxyStack(gateway, adapter, fake)
    finally:
        fake.stop()


def test_calls_go_through_the_proxy_with_its_credentials(stack: ProxyStack) -> None:
    """A provider with a proxy is called through it, whole and streamed: the provider gets its own key and
    the answers are the provider's. (That the calls cross the proxy, the two tests below show: the same
    provider behind the same proxy with wrong proxy credentials, or no proxy there, is never reached.)"""
    assert stack.ask("viaproxy/echo").choices[0].message.content == "pong hello there"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stack.ask("viaproxy/echo", stream=True)
                       if chunk.choices)
    assert streamed == "pong hello there"
    assert all(call.headers["Authorization"] == f"Bearer {KEY}" for call in stack.fake.calls)


def test_wrong_proxy_credentials_are_a_502_naming_the_proxy(stack: ProxyStack) -> None:
    """The proxy refusing the adapter's credentials (407) is a 502 upstream_proxy_auth_failed that says so,
    not worth retrying (x-should-retry: false); the password is in neither the answer nor the adapter's log."""
    calls = len(stack.fake.calls)
    with pytest.raises(openai.APIStatusError) as exc:
        stack.ask("badauth/echo")
    assert exc.value.status_code == 502
    body = exc.value.body
    assert isinstance(body, dict)
    assert body["code"] == "upstream_proxy_auth_failed"
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert "proxy credentials" in body["message"]
    assert len(stack.fake.calls) == calls  # the provider never saw it
    time.sleep(0.2)
    log = stack.adapter.log_path.read_text() if stack.adapter.log_path else ""
    assert "upstream_proxy_auth_failed" in log
    assert "wrong-password-9f8e" not in log
    assert "wrong-password-9f8e" not in json.dumps(body)


def test_a_proxy_that_is_not_there_is_a_502_saying_so(stack: ProxyStack) -> None:
    """Nothing listening at the proxy's address: a 502 upstream_proxy_error naming the proxy, after the
    retries."""
    with pytest.raises(openai.APIStatusError) as exc:
        stack.ask("proxydown/echo")
    assert exc.value.status_code == 502
    body = exc.value.body
    assert isinstance(body, dict)
    assert body["code"] == "upstream_proxy_error"
    assert "could not connect to the proxy of proxydown" in body["message"]
