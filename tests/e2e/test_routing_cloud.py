"""Routing with a real cloud-adapter and a fault-injecting fake provider.

Fallback happens only before the first byte reaches the client: a provider failing before it answers
sends the request to the local model; a stream cut after it started ends with an error event and is
never re-run elsewhere. A/B variants are recorded in the usage events.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import pytest

from tests.fakes import FakeProvider, Fault, providers_file
from tests.support import (
    NatsServer,
    Service,
    eventually,
    last_usage,
    local_and_cloud_site,
    metric,
    running,
    write_policy,
)

pytestmark = pytest.mark.e2e
SITE = "rc"
KEY = "sk-routing-test-5e4d3c2b1a"
ASK = [{"role": "user", "content": "hello"}]
POLICY = """
local_model: tiny
aliases:
  assistant:
    sticky: user
    variants:
      - {name: blue, target: fake/echo, weight: 1}
      - {name: green, target: fake/echo, weight: 1}
rules: [{name: default, route: [requested, local]}]
"""


@dataclass
class Site:
    nats: NatsServer
    worker: Service
    router: Service
    gateway: Service
    provider: FakeProvider
    adapter: Service


@pytest.fixture(scope="module")
def site(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("routing-cloud")
    provider = FakeProvider("openai", key=KEY).start()
    providers = providers_file(tmp / "providers.yaml", provider)
    worker, adapter, router, gateway = local_and_cloud_site(nats_server.url, SITE, tmp, providers, POLICY,
                                                            {"LW_TEST_KEY": KEY})
    try:
        with running(worker, adapter, router, gateway):
            yield Site(nats_server, worker, router, gateway, provider, adapter)
    finally:
        provider.stop()


def generations(site: Site) -> float:
    return sum(metric(site.worker.metrics(), "leafwire_generations_total", model="tiny", finish_reason=r)
               for r in ("length", "stop", "cancelled"))


def test_a_misspelt_cloud_model_is_404_not_a_local_answer(site: Site) -> None:
    """A <provider>/<model> no cloud-adapter is configured for is not found, as OpenAI, LiteLLM and vLLM
    answer an unknown model, rather than quietly answered by the local fallback with 200."""
    site.provider.reset()
    for model in ("fake/ecoh", "nope/echo"):
        r = httpx.post(f"{site.gateway.base}/v1/chat/completions", timeout=30,
                       json={"model": model, "messages": ASK, "max_tokens": 3})
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "model_not_found"
        assert model in r.json()["error"]["message"]
    assert site.provider.calls == []


def test_provider_failing_before_its_first_byte_falls_back(site: Site) -> None:
    """A provider that keeps failing before answering hands the request to the local model."""
    site.provider.reset()
    site.provider.script(*[Fault.error(503)] * 3)
    before = generations(site)
    r = httpx.post(f"{site.gateway.base}/v1/chat/completions", timeout=30,
                   json={"model": "fake/echo", "messages": ASK, "max_tokens": 3})
    assert r.status_code == 200
    assert r.json()["model"] == "tiny"
    assert r.headers["x-leafwire-route"].startswith("target=local/tiny")
    assert "fell back from fake/echo (" in r.headers["x-leafwire-route"]
    assert len(site.provider.calls) == 3  # the adapter's retries, then the fallback
    assert generations(site) == before + 1


@pytest.mark.parametrize("stream", [False, True])
def test_choices_after_a_fallback_do_not_ask_the_failing_provider_again(site: Site, stream: bool) -> None:
    """n=3 whose provider fails before answering: the request of the three choices tries it (its retries),
    falls back to the local model, which answers a choice a request, and each choice then goes straight to
    the local model (Lw-Skip) instead of failing through the provider's retries three times more."""
    site.provider.reset()
    site.provider.script(*[Fault.error(503)] * 3)
    before = generations(site)
    body = {"model": "fake/echo", "messages": ASK, "max_tokens": 3, "n": 3, "stream": stream}
    with httpx.stream("POST", f"{site.gateway.base}/v1/chat/completions", json=body, timeout=30) as r:
        text = r.read().decode()
    assert r.status_code == 200, text
    if stream:
        assert text.rstrip().endswith("data: [DONE]")
        indexes = {c["index"] for line in text.splitlines() if line.startswith("data: {")
                   for c in json.loads(line[6:])["choices"]}
    else:
        indexes = {c["index"] for c in json.loads(text)["choices"]}
    assert indexes == {0, 1, 2}
    assert r.headers["x-leafwire-route"].startswith("target=local/tiny")
    assert "fell back from fake/echo (it refused the request of every choice)" in r.headers["x-leafwire-route"]
    assert len(site.provider.calls) == 3  # the request of n's tries only
    assert generations(site) == before + 3


async def test_lw_skip_passes_over_targets_but_never_all(site: Site) -> None:
    """A NATS client's Lw-Skip naming the cloud target sends the request to the local model; naming every
    target of the route is ignored (the request is still answered, by its first target)."""
    site.provider.reset()
    nc = await nats.connect(site.nats.url)
    try:
        served = []
        for skip in ("fake/echo", "fake/echo,tiny"):
            msg = await nc.request(f"lw.v1.{SITE}.chat", json.dumps({"model": "fake/echo", "messages": ASK,
                                                                    "max_tokens": 3}).encode(),
                                   timeout=20, headers={"Lw-Skip": skip})
            assert (msg.headers or {}).get("Lw-Event") == "result", msg.data
            served.append(json.loads(msg.data)["model"])
    finally:
        await nc.drain()
    assert served == ["tiny", "fake/echo"]
    assert len(site.provider.calls) == 1


def test_a_target_too_slow_to_take_it_is_cancelled(site: Site) -> None:
    """A provider silent past the router's wait is cancelled (the adapter hangs up on it) and the caller
    gets the local answer alone."""
    site.provider.reset()
    site.provider.script(Fault.slow(8))

    def cancelled() -> float:
        return metric(site.adapter.metrics(), "leafwire_cloud_requests_total", provider="fake", model="echo",
                      outcome="cancelled")

    before = cancelled()
    r = httpx.post(f"{site.gateway.base}/v1/chat/completions", timeout=30,
                   json={"model": "fake/echo", "messages": ASK, "max_tokens": 3})
    assert r.status_code == 200
    assert r.json()["model"] == "tiny"
    assert "fell back from fake/echo (503 unavailable)" in r.headers["x-leafwire-route"]
    eventually(lambda: cancelled() == before + 1, 10, "the adapter to drop the cancelled call")


def test_a_cancelled_request_is_not_run_by_the_fallback(site: Site) -> None:
    """A caller that leaves while the provider has not answered yet cancels its request: the cloud call is
    dropped and the local model is not asked instead (a cancel is no refusal to fall back from)."""
    site.provider.reset()
    site.provider.script(Fault.slow(8))
    before = generations(site)

    def cancelled() -> float:
        return metric(site.adapter.metrics(), "leafwire_cloud_requests_total", provider="fake", model="echo",
                      outcome="cancelled")

    dropped = cancelled()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up before the router's 1.5 s wait ends
        httpx.post(f"{site.gateway.base}/v1/chat/completions", timeout=0.7,
                   json={"model": "fake/echo", "messages": ASK, "max_tokens": 3})
    eventually(lambda: cancelled() == dropped + 1, 10, "the adapter to drop the cancelled call")
    time.sleep(2)  # past the router's wait: a fallback would have run by now
    assert generations(site) == before


def test_no_fallback_after_the_first_byte(site: Site) -> None:
    """A cloud stream cut midway ends with an error event after the text already sent; nothing re-runs it."""
    site.provider.reset()
    site.provider.script(Fault.cut(after=2))
    before = generations(site)
    with httpx.stream("POST", f"{site.gateway.base}/v1/chat/completions", timeout=30,
                      json={"model": "fake/echo", "messages": ASK, "stream": True}) as r:
        assert r.headers["x-leafwire-route"].startswith("target=fake/echo")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    assert any(c.get("choices") and c["choices"][0]["delta"].get("content") for c in chunks)
    assert "error" in chunks[-1]
    assert "[DONE]" not in events
    assert len(site.provider.calls) == 1
    assert generations(site) == before


def test_variant_in_headers_and_usage_events(site: Site) -> None:
    """The A/B variant a user got is in the response's route header and in the usage event."""
    site.provider.reset()
    r = httpx.post(f"{site.gateway.base}/v1/chat/completions", timeout=30,
                   json={"model": "assistant", "messages": ASK, "user": "operator-12"})
    assert r.status_code == 200
    variant = r.headers["x-leafwire-route"].split("variant=")[1].split(";")[0]
    assert variant in ("blue", "green")
    event = eventually(lambda: (e := asyncio.run(last_usage(site.nats.url, SITE)))["request_id"]
                       == r.headers["x-request-id"] and e, 10, "the usage event")
    assert event["variant"] == variant
    assert event["target"] == "fake/echo"


def test_masked_before_leaving_the_site(site: Site, tmp_path: Path) -> None:
    """The provider receives the prompt with personal data masked; the local model would get it as is."""
    site.provider.reset()
    content = "Call Jane at +44 20 7946 0958 or jane.doe@plant.example about line 3"
    r = httpx.post(f"{site.gateway.base}/v1/chat/completions", timeout=30,
                   json={"model": "fake/echo", "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200
    (call,) = site.provider.calls
    sent = call.body["messages"][0]["content"]
    assert sent == "Call Jane at [PHONE] or [EMAIL] about line 3"
    assert metric(site.router.metrics(), "leafwire_masked_total", pattern="email") >= 1


def test_a_provider_on_the_sites_network_answers_with_the_uplink_down(site: Site, tmp_path: Path) -> None:
    """A provider marked `local: true` (a vLLM on the plant's LAN; here the fake on 127.0.0.1) is reached by
    the site's own cloud-adapter without the uplink: with the uplink down its model still answers, where
    every other cloud model is skipped ("uplink down")."""
    site.provider.reset()
    env = {"LW_NATS_URL": site.nats.url, "LW_SITE": "lan-site"}
    providers = tmp_path / "providers.yaml"
    providers.write_text(json.dumps({"providers": [{
        "name": "lan", "kind": "openai-compatible", "base_url": site.provider.url, "local": True,
        "api_key_env": "LW_TEST_KEY", "models": {"echo": {}},
        "timeouts": {"connect_s": 2, "first_byte_s": 2, "total_s": 10}}]}))
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(providers), "LW_TEST_KEY": KEY})
    router = Service("router", {**env, "LW_ROUTER_UPLINK": "down",
                                "LW_ROUTER_POLICY_FILE": str(write_policy(tmp_path / "policy.yaml", "{}"))})
    gateway = Service("gateway", env)
    with running(adapter, router, gateway):
        def ask() -> httpx.Response:
            return httpx.post(f"{gateway.base}/v1/chat/completions", timeout=30,
                              json={"model": "lan/echo", "messages": ASK, "max_tokens": 3})

        r = eventually(lambda: answer if (answer := ask()).status_code == 200 else None, 20,
                       "the LAN provider to answer with the uplink down")
        assert r.headers["x-leafwire-route"].startswith("target=lan/echo")
        assert len(site.provider.calls) >= 1


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]


def test_a_request_for_tools_skips_the_local_model(site: Site) -> None:
    """The local model cannot call tools, so the router drops it from the chain and says so; a provider that
    fails is then the caller's error, not a fallback to a model that would only refuse (or ignore) the tools."""
    site.provider.reset()
    r = httpx.post(f"{site.gateway.base}/v1/chat/completions", timeout=30,
                   json={"model": "fake/echo", "messages": ASK, "max_tokens": 3, "tools": TOOLS})
    assert r.status_code == 200, r.text
    assert "skipped tiny (does not support tools)" in r.headers["x-leafwire-route"]
    assert site.provider.calls[-1].body["tools"] == TOOLS

    site.provider.reset()
    site.provider.script(*[Fault.error(503)] * 3)
    before = generations(site)
    r = httpx.post(f"{site.gateway.base}/v1/chat/completions", timeout=30,
                   json={"model": "fake/echo", "messages": ASK, "max_tokens": 3, "tools": TOOLS})
    assert r.status_code >= 500, r.text
    assert "tiny" not in r.json()["error"]["message"]
    assert len(site.provider.calls) == 3
    assert generations(site) == before


def test_tools_for_the_local_model_alone_are_refused_by_the_router(site: Site) -> None:
    """Asked of the local model, tools are the 400 the model would give, naming the parameter, and the
    worker never sees the request."""
    before = generations(site)
    r = httpx.post(f"{site.gateway.base}/v1/chat/completions", timeout=30,
                   json={"model": "tiny", "messages": ASK, "max_tokens": 3, "tools": TOOLS})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools"
    assert r.json()["error"]["code"] == "unsupported_parameter"
    dry = httpx.post(f"{site.gateway.base}/v1/route/dry-run", timeout=30,
                     json={"model": "fake/echo", "messages": ASK, "tools": TOOLS})
    assert dry.status_code == 200, dry.text
    assert {"target": "tiny", "reason": "does not support tools"} in dry.json()["skipped"]
    assert generations(site) == before
