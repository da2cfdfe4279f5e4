"""QA of three features: Lw-Skip after a fallback (choices of n pass over the cloud targets that refused the
request of every choice), a lone prompt's streamed n to a cloud model in one call (text completions), and
cloud calls through an HTTP proxy per provider. QA found three things wrong, now mended: a cloud target
without n reached after a fallback did not pass the failing target on to the choices, Lw-Skip with spaces
after its commas named nothing, and the docs promised a proxy error code for what is the provider's 502."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from deploy.topology import free_port
from tests.e2e import test_cloud_proxy
from tests.fakes import FakeProvider, Fault
from tests.support import (
    NatsServer,
    Service,
    cloud_router_env,
    eventually,
    local_and_cloud_site,
    running,
)

pytestmark = pytest.mark.e2e
SITE = "qaskip"
KEY = "sk-qa-skip-0a1b2c3d4e"
ASK = [{"role": "user", "content": "hello"}]
POLICY = """
local_model: tiny
aliases:
  twoclouds: fake/echo2
  viaplain: plain/other
rules:
  - {name: two-clouds, when: {model: twoclouds}, route: [fake/echo, fake/echo2, local]}
  - {name: via-plain, when: {model: viaplain}, route: [fake/echo, plain/other, local]}
  - {name: default, route: [requested, local]}
"""


@dataclass
class Site:
    nats: NatsServer
    worker: Service
    gateway: Service
    provider: FakeProvider

    def calls(self, model: str) -> int:
        return sum(1 for c in self.provider.calls if c.body.get("model") == model)


@pytest.fixture(scope="module")
def site(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A site with the tiny local model and one fake OpenAI-compatible server behind two providers: ``fake``
    (answers n in one call; models echo, echo2) and ``plain`` (``n: false``: a call a choice; model other)."""
    tmp = tmp_path_factory.mktemp("qa-skip")
    provider = FakeProvider("openai", key=KEY).start()

    def entry(name: str, models: list[str], **more: Any) -> dict[str, Any]:
        return {"name": name, "kind": "openai-compatible", "base_url": provider.url, "local": True,
                "api_key_env": "LW_TEST_KEY", "models": {m: {} for m in models},
                "timeouts": {"connect_s": 2, "first_byte_s": 2, "total_s": 10}, **more}

    providers = tmp / "providers.yaml"
    providers.write_text(json.dumps({"providers": [entry("fake", ["echo", "echo2"]),
                                                   entry("plain", ["other"], n=False)]}))
    worker, adapter, router, gateway = local_and_cloud_site(nats_server.url, SITE, tmp, providers, POLICY,
                                                            {"LW_TEST_KEY": KEY})
    try:
        with running(worker, adapter, router, gateway):
            yield Site(nats_server, worker, gateway, provider)
    finally:
        provider.stop()


def post(site: Site, path: str, body: dict[str, Any]) -> tuple[httpx.Response, str]:
    with httpx.stream("POST", f"{site.gateway.base}{path}", json=body, timeout=60) as r:
        return r, r.read().decode()


def sse(text: str) -> list[dict[str, Any]]:
    """The JSON events of a server-sent event stream."""
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


# -- 1. Lw-Skip after a fallback

def test_choices_after_a_fallback_to_a_provider_without_n_skip_the_failing_provider(site: Site) -> None:
    """Route [fake/echo, plain/other (n: false), local], n=3: fake/echo fails its 3 tries, plain/other answers a
    choice a request (n_unsupported). A user expects the failing fake/echo passed over by the 3 choices (as
    for a fallback to a local model): 3 calls to it in all, the choices answered by plain/other."""
    site.provider.reset()
    site.provider.script(*[Fault.error(503)] * 3)
    r, text = post(site, "/v1/chat/completions", {"model": "viaplain", "messages": ASK, "max_tokens": 3, "n": 3})
    assert r.status_code == 200, text
    assert len(json.loads(text)["choices"]) == 3
    assert site.calls("echo") == 3  # observed 6: each choice went to fake/echo again (and it answered them)
    assert site.calls("other") == 3
    assert r.headers["x-leafwire-route"].startswith("target=plain/other")


def test_choices_after_two_failing_clouds_skip_both(site: Site) -> None:
    """Route [fake/echo, fake/echo2, local], n=3, both providers failing: the request of n tries each (3 tries
    each), and the 3 choices go straight to the local model, the route header naming both as passed over."""
    site.provider.reset()
    site.provider.script(*[Fault.error(503)] * 6)
    r, text = post(site, "/v1/chat/completions", {"model": "twoclouds", "messages": ASK, "max_tokens": 3, "n": 3})
    assert r.status_code == 200, text
    assert {c["index"] for c in json.loads(text)["choices"]} == {0, 1, 2}
    assert (site.calls("echo"), site.calls("echo2")) == (3, 3)
    route = r.headers["x-leafwire-route"]
    assert route.startswith("target=local/tiny")
    assert "fell back from fake/echo (it refused the request of every choice)" in route
    assert "fell back from fake/echo2 (it refused the request of every choice)" in route


@pytest.mark.parametrize("stream", [False, True])
def test_text_completion_n_after_a_fallback_skips_the_failing_provider(site: Site, stream: bool) -> None:
    """/v1/completions, one prompt, n=3, to a failing cloud model with the local fallback: the provider is
    tried by the request of n only (3 tries); the 3 choices come from the local model."""
    site.provider.reset()
    site.provider.script(*[Fault.error(503)] * 3)
    r, text = post(site, "/v1/completions", {"model": "fake/echo", "prompt": "hello", "max_tokens": 3, "n": 3,
                                             "stream": stream})
    assert r.status_code == 200, text
    if stream:
        assert text.rstrip().endswith("data: [DONE]")
        indexes = {c["index"] for e in sse(text) for c in e["choices"]}
        assert {e["object"] for e in sse(text)} == {"text_completion"}
    else:
        indexes = {c["index"] for c in json.loads(text)["choices"]}
    assert indexes == {0, 1, 2}
    assert site.calls("echo") == 3
    assert r.headers["x-leafwire-route"].startswith("target=local/tiny")
    assert "fell back from fake/echo (it refused the request of every choice)" in r.headers["x-leafwire-route"]


async def ask_nats(site: Site, skip: str) -> str:
    nc = await nats.connect(site.nats.url)
    try:
        msg = await nc.request(f"lw.v1.{SITE}.chat", json.dumps({"model": "fake/echo", "messages": ASK,
                                                                "max_tokens": 3}).encode(),
                               timeout=20, headers={"Lw-Skip": skip})
    finally:
        await nc.drain()
    assert (msg.headers or {}).get("Lw-Event") == "result", msg.data
    return str(json.loads(msg.data)["model"])


async def test_lw_skip_naming_every_target_with_spaces_is_ignored(site: Site) -> None:
    """A NATS client writing the comma-separated list as 'fake/echo, tiny' names every target of the route:
    the docs say that is ignored, so the request is answered by its first target, fake/echo."""
    site.provider.reset()
    assert await ask_nats(site, "fake/echo, tiny") == "fake/echo"


async def test_lw_skip_naming_no_target_of_the_route_changes_nothing(site: Site) -> None:
    """Lw-Skip naming nothing of the route (an unknown name, an empty list) leaves the route as it is."""
    site.provider.reset()
    for skip in ("nope/model", ",", "fake/echo2"):
        assert await ask_nats(site, skip) == "fake/echo"


# -- 2. a lone prompt's streamed n to a cloud model, in one call

def test_streamed_n_of_one_prompt_without_usage_and_with_an_error(site: Site) -> None:
    """Streamed n=2 of one prompt to fake/echo without include_usage: one call, text_completion chunks named
    by the model asked, no usage chunk, [DONE]; a stream the provider breaks mid-way ends with an error event
    in OpenAI's shape and no [DONE]."""
    site.provider.reset()
    site.provider.script(Fault.ok("a b"), Fault.ok("c"))
    r, text = post(site, "/v1/completions", {"model": "fake/echo", "prompt": "hello there", "n": 2, "stream": True,
                                             "max_tokens": 5})
    assert r.status_code == 200, text
    events = sse(text)
    assert len(site.provider.calls) == 1
    assert all(e["choices"] and e["usage"] is None for e in events)
    assert {e["model"] for e in events} == {"fake/echo"}
    assert text.rstrip().endswith("data: [DONE]")
    site.provider.reset()
    site.provider.script(Fault.stream_error(after=4))
    r, text = post(site, "/v1/completions", {"model": "fake/echo", "prompt": "hello there", "n": 2, "stream": True})
    assert r.status_code == 200, text
    assert sse(text)[-1]["error"]["type"] == "upstream_error"
    assert "[DONE]" not in text


# -- 3. an HTTP proxy per provider

proxy = test_cloud_proxy.proxy
PROXY_AUTH = f"{test_cloud_proxy.PROXY_USER}:{test_cloud_proxy.PROXY_PASSWORD}"


@dataclass
class Proxied:
    gateway: Service
    adapter: Service
    fake: FakeProvider
    anth: FakeProvider | None = None


@pytest.fixture(scope="module")
def proxied(nats_server: NatsServer, proxy: tuple[int, Any],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    """A cloud-adapter whose providers all go through the proxy: https ones to a closed port (with good and
    wrong proxy credentials), an http one to a closed port, an Anthropic one, an embeddings model."""
    port, _ = proxy
    fake = FakeProvider("openai", key=KEY).start()
    anth = FakeProvider("anthropic", key=KEY).start()
    folder = tmp_path_factory.mktemp("qa-proxied")
    closed = free_port()

    def entry(name: str, base_url: str, auth_env: str = "LW_QA_PROXY_AUTH", kind: str = "openai-compatible",
              **more: Any) -> dict[str, Any]:
        return {"name": name, "kind": kind, "base_url": base_url, "local": True,
                "api_key_env": "LW_QA_KEY", "proxy": f"http://127.0.0.1:{port}", "proxy_auth_env": auth_env,
                "models": {"echo": {}}, "timeouts": {"connect_s": 2, "first_byte_s": 5, "total_s": 10}, **more}

    (folder / "providers.yaml").write_text(json.dumps({"providers": [
        entry("tunnel", f"https://127.0.0.1:{closed}/v1"),
        entry("tunnelbad", f"https://127.0.0.1:{closed}/v1", "LW_QA_PROXY_BAD"),
        entry("behind", f"http://127.0.0.1:{closed}/v1"),
        entry("anth", anth.url, kind="anthropic"),
        entry("anthbad", anth.url, "LW_QA_PROXY_BAD", kind="anthropic"),
        {**entry("emb", fake.url), "models": {"vec": {"kind": "embeddings"}}},
        {**entry("embbad", fake.url, "LW_QA_PROXY_BAD"), "models": {"vec": {"kind": "embeddings"}}},
    ]}))
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": "qaproxy"}
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(folder / "providers.yaml"),
                                        "LW_QA_KEY": KEY, "LW_QA_PROXY_AUTH": PROXY_AUTH,
                                        "LW_QA_PROXY_BAD": "edge:wrong-password-77aa",
                                        "LW_CLOUD_BACKOFF_BASE_S": "0.01", "LW_CLOUD_BACKOFF_CAP_S": "0.02",
                                        "LW_LOG_LEVEL": "debug"})
    gateway = Service("gateway", env)
    try:
        with running(adapter, Service("router", {**env, **cloud_router_env(folder)}), gateway):
            yield Proxied(gateway, adapter, fake, anth)
    finally:
        fake.stop()
        anth.stop()


def chat(stack: Proxied, model: str, **more: Any) -> httpx.Response:
    return httpx.post(f"{stack.gateway.base}/v1/chat/completions", timeout=60,
                      json={"model": model, "messages": ASK, "max_tokens": 3, **more})


def test_a_proxy_that_cannot_reach_an_http_provider_is_the_providers_502(proxied: Proxied) -> None:
    """docs/cloud.md: to an http provider, a proxy's own 5xx cannot be told from the provider's (the request
    goes to the proxy whole, and the answer is whatever comes back): a 502 upstream_error, retried as such,
    that names the provider and the status (QA expected upstream_proxy_error; the docs now say why not)."""
    r = chat(proxied, "behind/echo")
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_error"
    assert "(502)" in r.json()["error"]["message"]


def test_the_proxy_refusing_or_failing_a_connect_tunnel(proxied: Proxied) -> None:
    """An https provider through a CONNECT tunnel: wrong proxy credentials are 502 upstream_proxy_auth_failed
    (x-should-retry: false), whole and streamed, the password nowhere in the answer or the adapter's debug
    log; a tunnel the proxy cannot open (nothing at the provider's address) is 502 upstream_proxy_error (not to
    be retried either: the adapter did)."""
    for more in ({}, {"stream": True}):
        r = chat(proxied, "tunnelbad/echo", **more)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "upstream_proxy_auth_failed"
        assert r.headers["x-should-retry"] == "false"
        assert "wrong-password-77aa" not in r.text
    r = chat(proxied, "tunnel/echo")
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_proxy_error"
    assert r.headers["x-should-retry"] == "false"  # the adapter retried it already: the client's retries would add up
    log = proxied.adapter.log_path.read_text() if proxied.adapter.log_path else ""
    assert "wrong-password-77aa" not in log
    assert test_cloud_proxy.PROXY_PASSWORD not in log


def test_anthropic_and_embeddings_go_through_the_proxy(proxied: Proxied) -> None:
    """An Anthropic provider (whole and streamed) and an embeddings model with a proxy are answered through it;
    the same ones with wrong proxy credentials are 502 upstream_proxy_auth_failed, never reaching the provider
    (so the calls do cross the proxy)."""
    assert proxied.anth is not None
    proxied.anth.reset()
    proxied.fake.reset()
    assert chat(proxied, "anth/echo").json()["choices"][0]["message"]["content"] == "pong hello"
    r = chat(proxied, "anth/echo", stream=True)
    assert r.status_code == 200
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in sse(r.text) if c["choices"]) == "pong hello"

    def embed(model: str) -> httpx.Response:
        return httpx.post(f"{proxied.gateway.base}/v1/embeddings", timeout=60, json={"model": model, "input": "hi"})

    r = embed("emb/vec")
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["embedding"]) == 8
    assert (len(proxied.anth.calls), len(proxied.fake.calls)) == (2, 1)
    for r in (chat(proxied, "anthbad/echo"), chat(proxied, "anthbad/echo", stream=True), embed("embbad/vec")):
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "upstream_proxy_auth_failed"
    assert (len(proxied.anth.calls), len(proxied.fake.calls)) == (2, 1)


def test_proxy_auth_file_rotated_applies_without_a_restart(nats_server: NatsServer, proxy: tuple[int, Any],
                                                           tmp_path: Path) -> None:
    """A proxy_auth_file with wrong credentials (407) corrected in place applies at the next check: the next
    request crosses the proxy; a reload removing the proxy calls the provider directly; one naming an unset
    proxy_auth_env disables the provider (503 provider_key_missing naming the variable)."""
    port, _ = proxy
    fake = FakeProvider("openai", key=KEY).start()
    auth = tmp_path / "proxy-auth"
    auth.write_text("edge:wrong-password-rot1\n")
    providers = tmp_path / "providers.yaml"

    def write(**more: Any) -> None:
        providers.write_text(json.dumps({"providers": [{
            "name": "rot", "kind": "openai-compatible", "base_url": fake.url, "local": True,
            "api_key_env": "LW_QA_KEY", "models": {"echo": {}},
            "timeouts": {"connect_s": 2, "first_byte_s": 5, "total_s": 10}, **more}]}))

    write(proxy=f"http://127.0.0.1:{port}", proxy_auth_file=str(auth))
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": "qarot"}
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(providers), "LW_QA_KEY": KEY,
                                        "LW_CLOUD_PROVIDERS_CHECK_S": "0.2", "LW_LOG_LEVEL": "debug",
                                        "LW_CLOUD_BACKOFF_BASE_S": "0.01", "LW_CLOUD_BACKOFF_CAP_S": "0.02"})
    gateway = Service("gateway", env)
    try:
        with running(adapter, Service("router", {**env, **cloud_router_env(tmp_path)}), gateway):
            stack = Proxied(gateway, adapter, fake)
            r = chat(stack, "rot/echo")
            assert r.json()["error"]["code"] == "upstream_proxy_auth_failed"
            assert fake.calls == []
            auth.write_text(PROXY_AUTH + "\n")
            eventually(lambda: chat(stack, "rot/echo").status_code == 200, 10, "the new proxy credentials")
            write()

            def applied() -> int:
                return (adapter.log_path.read_text() if adapter.log_path else "").count("providers file applied")

            eventually(lambda: applied() >= 2, 10, "the file without the proxy applied")
            assert chat(stack, "rot/echo").status_code == 200
            write(proxy=f"http://127.0.0.1:{port}", proxy_auth_env="LW_QA_UNSET_PROXY_AUTH")
            r = eventually(lambda: x if (x := chat(stack, "rot/echo")).status_code == 503 else None, 10,
                           "the provider disabled")
            assert r.json()["error"]["code"] == "provider_key_missing"
            assert "LW_QA_UNSET_PROXY_AUTH" in r.json()["error"]["message"]
            log = adapter.log_path.read_text() if adapter.log_path else ""
            assert "wrong-password-rot1" not in log
            assert test_cloud_proxy.PROXY_PASSWORD not in log
    finally:
        fake.stop()
