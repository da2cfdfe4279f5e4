"""Cloud models end to end: the official openai client -> gateway -> router -> cloud-adapter -> a fake provider.

The gateway and router serve site ``plant``, which has no cloud-adapter of its own: the adapter runs as a hub
adapter (``LW_SITE=hub``), so every request here also proves that sites without an adapter fall back to the
hub's. Providers are fault-injecting fakes (tests/fakes.py): an OpenAI-compatible one (``fake``, ``flaky``,
``wrongkey`` and ``priced`` point at it) and an Anthropic one (``claude``). The OpenAI-compatible providers
also have an embeddings model, ``embed`` (tests/e2e/test_cloud_embeddings.py runs this stack too).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import openai
import pytest

from tests import support
from tests.fakes import FakeProvider, Fault
from tests.support import ROOT, NatsServer, Service, cloud_router_env, eventually, metric, running

pytestmark = pytest.mark.e2e
SITE = "plant"
KEY = "sk-fake-openai-9f8e7d6c5b4a"
CLAUDE_KEY = "sk-ant-fake-0a1b2c3d4e5f"
WRONG_KEY = "sk-wrong-key-123456789"
MESSAGES = [{"role": "user", "content": "hello there"}]
API_KEYS = "key-acme:acme,key-globex:globex,key-poor:poor,key-broke:broke"
EMBED = {"embed": {"kind": "embeddings"}}
OPEN_S = 6  # `flaky`'s breaker stays open this long: room for a loaded machine between its checks


@dataclass
class CloudStack:
    nats: NatsServer
    gateway: Service
    router: Service
    adapter: Service
    openai_fake: FakeProvider
    claude_fake: FakeProvider

    def client(self, key: str = "key-acme") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key=key, max_retries=0, timeout=30)

    def post(self, body: dict[str, Any], key: str = "key-acme") -> httpx.Response:
        return httpx.post(f"{self.gateway.base}/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key}"})


KEEPALIVE = {"LW_KEEPALIVE_S": "0.3"}


def providers_file(path: Path, openai_fake: FakeProvider, claude_fake: FakeProvider) -> Path:
    def entry(name: str, fake: FakeProvider, key_var: str, models: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "kind": "openai-compatible" if fake.kind == "openai" else "anthropic",
                "base_url": fake.url, "local": True, "api_key_env": key_var, "models": models,
                "timeouts": {"connect_s": 2, "first_byte_s": 2, "total_s": 10}}
    config = {
        "providers": [
            entry("fake", openai_fake, "LW_TEST_FAKE_KEY", {"echo": {"upstream": "echo-1", "input_per_mtok": 1,
                                                                     "output_per_mtok": 2,
                                                                     "cached_input_per_mtok": 0.5},
                                                            "embed": {"kind": "embeddings", "upstream": "embed-1",
                                                                      "input_per_mtok": 2}}),
            {**entry("flaky", openai_fake, "LW_TEST_FAKE_KEY", {"echo": {}, **EMBED}),
             "breaker": {"failures": 3, "open_s": OPEN_S}},
            entry("wrongkey", openai_fake, "LW_TEST_WRONG_KEY", {"echo": {}, **EMBED}),
            entry("keyless", openai_fake, "LW_TEST_UNSET_KEY", {"echo": {}}),
            entry("priced", openai_fake, "LW_TEST_FAKE_KEY", {"echo": {"input_per_mtok": 1000,
                                                                       "output_per_mtok": 1000},
                                                              "embed": {"kind": "embeddings",
                                                                        "input_per_mtok": 1000}}),
            entry("claude", claude_fake, "LW_TEST_CLAUDE_KEY", {"haiku": {"upstream": "claude-haiku-x",
                                                                          "max_tokens": 64}}),
        ],
        "budgets": {"tenants": {"poor": {"daily_usd": 0.006}, "broke": {"daily_usd": 0.001}}},
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@contextlib.contextmanager
def cloud_stack(nats_server: NatsServer, folder: Path,
                write: Callable[[Path, FakeProvider, FakeProvider], Path] = providers_file, api_keys: str = API_KEYS,
                policy: str = "last_resort: none\n", **adapter_env: str) -> Iterator[CloudStack]:
    """The fakes, and a hub adapter, a router and a gateway for site ``plant``: the providers file is what
    ``write`` writes (``providers_file``'s by default), the gateway's keys ``api_keys``, the router's policy
    ``policy``, ``adapter_env`` more settings of the adapter."""
    openai_fake = FakeProvider("openai", key=KEY).start()
    claude_fake = FakeProvider("anthropic", key=CLAUDE_KEY).start()
    file = write(folder / "providers.yaml", openai_fake, claude_fake)
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE}
    adapter = Service("cloud_adapter", {
        "LW_NATS_URL": nats_server.url, "LW_SITE": "hub", "LW_PROVIDERS_FILE": str(file),
        "LW_TEST_FAKE_KEY": KEY, "LW_TEST_WRONG_KEY": WRONG_KEY, "LW_TEST_CLAUDE_KEY": CLAUDE_KEY,
        "LW_CLOUD_BACKOFF_BASE_S": "0.01", "LW_CLOUD_BACKOFF_CAP_S": "0.05", "LW_CLOUD_BREAKER_FAILURES": "1000",
        "LW_CLOUD_BREAKER_OPEN_S": "60", "LW_LOG_LEVEL": "debug", **KEEPALIVE, **adapter_env})
    router = Service("router", {**env, **cloud_router_env(file.parent, policy), **KEEPALIVE})
    # an idle timeout shorter than the provider's slowest answers: the adapter keeps its callers waiting
    gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": api_keys, "LW_GATEWAY_IDLE_TIMEOUT_S": "1.5",
                                  "LW_GATEWAY_METRICS_NEED_KEY": "true"})
    try:
        with running(adapter, router, gateway):
            yield CloudStack(nats_server, gateway, router, adapter, openai_fake, claude_fake)
    finally:
        openai_fake.stop()
        claude_fake.stop()


@pytest.fixture(scope="module")
def cloud(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudStack]:
    # A server found to have no n is not remembered: each test scripts the fake anew, with n or without
    # (tests/e2e/test_cloud_n_memory.py covers remembering).
    with cloud_stack(nats_server, tmp_path_factory.mktemp("cloud"), LW_CLOUD_N_RECHECK_S="0") as stack:
        yield stack


@pytest.fixture(autouse=True)
def _fresh_fakes(cloud: CloudStack) -> None:
    cloud.openai_fake.reset()
    cloud.claude_fake.reset()


def chat(cloud: CloudStack, model: str = "fake/echo", key: str = "key-acme", **kw: Any) -> Any:
    return cloud.client(key).chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **kw)


@contextlib.contextmanager
def streaming(gateway: Service) -> Iterator[None]:
    """A streamed ``fake/echo`` answer through ``gateway``, its first lines read; closed on leaving."""
    with httpx.stream("POST", f"{gateway.base}/v1/chat/completions", timeout=30,
                      headers={"Authorization": "Bearer key-acme"},
                      json={"model": "fake/echo", "messages": MESSAGES, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        yield


class TestAnswers:
    def test_whole_answer(self, cloud: CloudStack) -> None:
        """A cloud model answers in OpenAI's shape with usage, its own request id, route and server."""
        raw = chat(cloud)
        r = raw.parse()
        assert r.choices[0].message.content == "pong hello there"
        assert r.model == "fake/echo"
        assert r.id == f"chatcmpl-{raw.headers['x-request-id']}"
        assert r.usage.prompt_tokens == 2
        assert r.usage.completion_tokens == 3
        assert raw.headers["x-leafwire-route"].startswith("target=fake/echo")
        assert raw.headers["x-leafwire-served-by"].startswith("hub/ca-")  # the hub's adapter backs up the site
        (call,) = cloud.openai_fake.calls
        assert call.body["model"] == "echo-1"
        assert call.headers["Authorization"] == f"Bearer {KEY}"

    def test_streamed_answer_with_usage(self, cloud: CloudStack) -> None:
        """Streaming relays the provider's text as chunks, then a finish chunk and the usage chunk."""
        chunks = list(cloud.client().chat.completions.create(model="fake/echo", messages=MESSAGES, stream=True,
                                                             stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "pong hello there"
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 3

    def test_anthropic_whole_and_streamed(self, cloud: CloudStack) -> None:
        """An Anthropic model answers through the same API, both ways, with usage translated."""
        whole = chat(cloud, "claude/haiku", max_tokens=20).parse()
        assert whole.choices[0].message.content == "pong hello there"
        assert whole.choices[0].finish_reason == "stop"
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (2, 3)
        chunks = list(cloud.client().chat.completions.create(model="claude/haiku", messages=MESSAGES, stream=True,
                                                             stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "pong hello there"
        assert chunks[-1].usage.completion_tokens == 3  # type: ignore[union-attr]
        sent = cloud.claude_fake.calls[0]
        assert sent.body["model"] == "claude-haiku-x"
        assert sent.body["max_tokens"] == 20
        assert cloud.claude_fake.calls[1].body["max_tokens"] == 64  # the model's default from the file
        assert sent.headers["x-api-key"] == CLAUDE_KEY

    def test_models_list_names_cloud_models(self, cloud: CloudStack) -> None:
        """GET /v1/models lists the configured cloud models with where they are served from."""
        def listed() -> dict[str, Any]:
            cards = {m.id: m for m in cloud.client().models.list().data}
            return cards if "claude/haiku" in cards else {}
        cards = eventually(listed, 10, "cloud models in the catalog")
        assert cards["fake/echo"].model_extra["locations"] == [{"site": "hub", "workers": 1}]  # type: ignore[index]
        assert cards["fake/echo"].created > 1_600_000_000  # its providers file's time, not 0 (1970)

    def test_one_cloud_model_by_its_plain_path(self, cloud: CloudStack) -> None:
        """GET /v1/models/fake/echo (the slash not escaped, as curl sends it) returns that model, as does
        the openai client; an unconfigured one is a 404 model_not_found."""
        eventually(lambda: httpx.get(f"{cloud.gateway.base}/v1/models/fake/echo", timeout=10,
                                     headers={"Authorization": "Bearer key-acme"}).status_code == 200,
                   10, "the cloud model in the catalog")
        r = httpx.get(f"{cloud.gateway.base}/v1/models/fake/echo", timeout=10,
                      headers={"Authorization": "Bearer key-acme"})
        assert r.json()["id"] == "fake/echo"
        assert cloud.client().models.retrieve("fake/echo").id == "fake/echo"
        missing = httpx.get(f"{cloud.gateway.base}/v1/models/fake/nope", timeout=10,
                            headers={"Authorization": "Bearer key-acme"})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"


class TestBadInput:
    @pytest.mark.parametrize("model", ["nobody/x", "fake/not-configured", "fake/../../etc/passwd",
                                       "http://169.254.169.254/latest"])
    def test_unconfigured_models_are_404(self, cloud: CloudStack, model: str) -> None:
        """Only configured provider/model pairs are called: anything else is 404 and reaches no provider."""
        r = cloud.post({"model": model, "messages": MESSAGES})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert cloud.openai_fake.calls == []

    def test_what_anthropic_cannot_take(self, cloud: CloudStack) -> None:
        """A temperature above 1 for an Anthropic model is a 400 naming `temperature`, before any call."""
        r = cloud.post({"model": "claude/haiku", "messages": MESSAGES, "temperature": 1.5})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "temperature"
        assert cloud.claude_fake.calls == []

    def test_provider_400_is_relayed(self, cloud: CloudStack) -> None:
        """A request the provider rejects gets the provider's message and parameter as a 400."""
        cloud.openai_fake.script(Fault.error(400, {"error": {
            "message": "context too long", "type": "invalid_request_error", "param": "messages",
            "code": "context_length_exceeded"}}))
        r = cloud.post({"model": "fake/echo", "messages": MESSAGES})
        assert r.status_code == 400
        assert r.json()["error"] == {"message": "fake: context too long", "type": "invalid_request_error",
                                     "param": "messages", "code": "context_length_exceeded"}
        assert len(cloud.openai_fake.calls) == 1


class TestUsageDetails:
    @pytest.mark.parametrize("stream", [False, True])
    def test_cached_and_reasoning_tokens_reach_the_caller(self, cloud: CloudStack, stream: bool) -> None:
        """OpenAI's prompt_tokens_details.cached_tokens and completion_tokens_details.reasoning_tokens, and
        Anthropic's cache_read_input_tokens, reach the caller's usage (whole, and a stream's last chunk)."""
        cloud.openai_fake.script(Fault.ok(prompt_tokens_details={"cached_tokens": 2, "audio_tokens": 0},
                                          completion_tokens_details={"reasoning_tokens": 1}))
        cloud.claude_fake.script(Fault.ok(cache_read_input_tokens=1))
        for model, cached, reasoning in (("fake/echo", 2, {"reasoning_tokens": 1}), ("claude/haiku", 1, None)):
            if stream:
                chunks = list(cloud.client().chat.completions.create(
                    model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
                usage = chunks[-1].usage
            else:
                usage = cloud.client().chat.completions.create(model=model, messages=MESSAGES).usage
            assert usage is not None
            assert usage.prompt_tokens_details is not None
            assert usage.prompt_tokens_details.cached_tokens == cached
            details = usage.completion_tokens_details
            assert (details.model_dump(exclude_none=True) if details else None) == reasoning


class TestResilience:
    def test_429_with_retry_after_is_retried(self, cloud: CloudStack) -> None:
        """A rate-limited first call is retried after the provider's Retry-After; the caller sees an answer."""
        cloud.openai_fake.script(Fault.error(429, Retry_After="1"))
        assert chat(cloud).parse().choices[0].message.content == "pong hello there"
        first, second = cloud.openai_fake.calls
        assert second.at - first.at >= 1.0

    def test_429_with_a_retry_after_that_is_no_number(self, cloud: CloudStack) -> None:
        """``Retry-After: inf`` is no hint: the call is retried with backoff, and the caller gets a 429
        upstream_rate_limited in OpenAI's shape (it was a 500 from the gateway)."""
        cloud.openai_fake.script(*[Fault.error(429, Retry_After="inf")] * 3)
        r = cloud.post({"model": "fake/echo", "messages": MESSAGES})
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "upstream_rate_limited"
        assert "retry-after" not in r.headers
        assert len(cloud.openai_fake.calls) == 3

    @pytest.mark.parametrize("stream", [False, True])
    def test_failure_before_first_byte_is_a_plain_http_error(self, cloud: CloudStack, stream: bool) -> None:
        """Failing tries before any byte: the caller gets an HTTP 502 (not a broken stream), so a router
        could still have fallen back."""
        cloud.openai_fake.script(*[Fault.error(500)] * 3)
        r = cloud.post({"model": "fake/echo", "messages": MESSAGES, "stream": stream})
        assert r.status_code == 502
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] == "upstream_error"
        assert len(cloud.openai_fake.calls) == 3

    def test_slow_first_byte_then_answer(self, cloud: CloudStack) -> None:
        """A provider silent past the first-byte timeout (2 s) is abandoned and retried; the caller's
        gateway, whose idle timeout is 1.5 s, keeps waiting: the adapter tells it the answer is coming."""
        cloud.openai_fake.script(Fault.slow(4))
        chunks = list(cloud.client().chat.completions.create(model="fake/echo", messages=MESSAGES, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "pong hello there"
        assert len(cloud.openai_fake.calls) == 2

    def test_stream_cut_midway_ends_with_an_error_event(self, cloud: CloudStack) -> None:
        """A stream dropped after its first byte is not retried: the caller's stream ends with an error."""
        cloud.openai_fake.script(Fault.cut(after=2))
        received: list[Any] = []
        stream = cloud.client().chat.completions.create(model="fake/echo", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as exc:
            received.extend(stream)
        assert received  # the answer had started
        # EOF mid-answer or a broken chunked body, depending on where the connection drop lands
        assert "ended before the answer did" in exc.value.message or "was cut" in exc.value.message
        assert len(cloud.openai_fake.calls) == 1

    def test_breaker_opens_is_published_and_recovers(self, cloud: CloudStack) -> None:
        """Three failed tries open `flaky`'s breaker: KV provider-health and the metric say open, and the
        next request is refused with 503 (Retry-After: until it half-opens) without calling the provider.
        After open_s it half-opens by itself: the router, which sends nothing to an open provider, lets the
        next request through as the probe, and its success closes the breaker."""
        cloud.openai_fake.script(*[Fault.error(503)] * 3)
        assert cloud.post({"model": "flaky/echo", "messages": MESSAGES}).status_code == 502
        eventually(lambda: metric(cloud.adapter.metrics(), "leafwire_cloud_breaker_state", provider="flaky") == 2,
                   10, "the breaker metric to say open")
        r = cloud.post({"model": "flaky/echo", "messages": MESSAGES})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "provider_unavailable"
        assert 1 <= int(r.headers["retry-after"]) <= OPEN_S
        assert len(cloud.openai_fake.calls) == 3
        health = eventually(lambda: kv_value(cloud, "provider-health", "flaky", lambda v: v["state"] == "open"),
                            10, "provider-health to say open")
        assert health["consecutive_failures"] >= 3
        assert health["probe_at"] == pytest.approx(health["since"] + OPEN_S)
        assert kv_value(cloud, "provider-health", "fake")["state"] == "closed"
        eventually(lambda: kv_value(cloud, "provider-health", "flaky", lambda v: v["state"] == "half_open"),
                   10, "provider-health to say half open")
        assert cloud.post({"model": "flaky/echo", "messages": MESSAGES}).status_code == 200
        assert len(cloud.openai_fake.calls) == 4
        eventually(lambda: kv_value(cloud, "provider-health", "flaky", lambda v: v["state"] == "closed"),
                   10, "provider-health to say closed")
        assert metric(cloud.adapter.metrics(), "leafwire_cloud_breaker_state", provider="flaky") == 0

    def test_client_going_away_closes_the_provider_connection(self, cloud: CloudStack) -> None:
        """Closing a stream mid-answer cancels the cloud call: the provider sees its client leave."""
        cloud.openai_fake.script(Fault.drip(0.3, text=" ".join(["word"] * 40)))
        with streaming(cloud.gateway):
            pass
        eventually(lambda: cloud.openai_fake.disconnects == 1, 10, "the provider to see the call cancelled")
        assert eventually(lambda: metric(cloud.adapter.metrics(), "leafwire_cloud_requests_total", provider="fake",
                                         model="echo", outcome="cancelled") >= 1, 10, "a cancelled outcome")

    def test_a_killed_gateway_stops_its_cloud_calls(self, cloud: CloudStack) -> None:
        """kill -9 of the gateway under a slow cloud answer: the adapter finds nobody waits for it and closes
        the provider connection instead of paying for the rest of the answer."""
        cloud.openai_fake.script(Fault.drip(0.3, text=" ".join(["word"] * 100)))
        gateway = Service("gateway", {"LW_NATS_URL": cloud.nats.url, "LW_SITE": SITE, "LW_GATEWAY_API_KEYS": API_KEYS})
        with running(gateway):
            with streaming(gateway):
                gateway.kill()
            eventually(lambda: cloud.openai_fake.disconnects == 1, 10, "the provider to see the call stopped")
        assert metric(cloud.adapter.metrics(), "leafwire_callers_gone_total", service="cloud-adapter") >= 1


class TestCache:
    def test_deterministic_request_is_answered_from_the_cache(self, cloud: CloudStack) -> None:
        """The same temperature-0 request twice: the second is a hit (header says so), no provider call."""
        messages = [{"role": "user", "content": "cache me please"}]
        first = cloud.client().chat.completions.with_raw_response.create(model="fake/echo", messages=messages,
                                                                          temperature=0)
        second = cloud.client().chat.completions.with_raw_response.create(model="fake/echo", messages=messages,
                                                                           temperature=0)
        assert first.headers["x-leafwire-cache"] == "miss"
        assert second.headers["x-leafwire-cache"] == "hit"
        assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
        assert second.parse().usage == first.parse().usage
        assert second.parse().id != first.parse().id
        assert len(cloud.openai_fake.calls) == 1

    def test_a_hit_can_be_streamed(self, cloud: CloudStack) -> None:
        """A cached answer replays as a stream when the request streams."""
        messages = [{"role": "user", "content": "stream a cached answer"}]
        chat_args: dict[str, Any] = {"model": "fake/echo", "messages": messages, "temperature": 0}
        cloud.client().chat.completions.create(**chat_args)
        with httpx.stream("POST", f"{cloud.gateway.base}/v1/chat/completions", timeout=30,
                          headers={"Authorization": "Bearer key-acme"}, json={**chat_args, "stream": True}) as r:
            assert r.headers["x-leafwire-cache"] == "hit"
            events = [line for line in r.iter_lines() if line]
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "")
                       for e in events[:-1] if json.loads(e[6:])["choices"])
        assert text == "pong stream a cached answer"
        assert events[-1] == "data: [DONE]"
        assert len(cloud.openai_fake.calls) == 1

    def test_tenants_do_not_share_entries(self, cloud: CloudStack) -> None:
        """Another tenant asking the same thing misses: tenants never see each other's answers."""
        messages = [{"role": "user", "content": "tenant secret question"}]
        for key in ("key-acme", "key-globex"):
            raw = cloud.client(key).chat.completions.with_raw_response.create(model="fake/echo", messages=messages,
                                                                               temperature=0)
            assert raw.headers["x-leafwire-cache"] == "miss"
        assert len(cloud.openai_fake.calls) == 2

    def test_the_choices_of_a_cached_request_are_each_their_own_entry(self, cloud: CloudStack) -> None:
        """``cache: true`` with ``n`` 3 at temperature 0.9 and no seed: one call of three samples, three entries
        (not one answer three times); the same request again gets the same three, each at its index, all from
        the cache; the same request with ``n`` 1 gets the first."""
        messages = [{"role": "user", "content": "three different ideas"}]
        cloud.openai_fake.script(Fault.ok("idea one"), Fault.ok("idea two"), Fault.ok("idea three"))
        body = {"model": "fake/echo", "messages": messages, "temperature": 0.9, "n": 3, "cache": True}
        first, again = cloud.post(body), cloud.post(body)
        assert first.status_code == again.status_code == 200, first.text
        texts = [c["message"]["content"] for c in first.json()["choices"]]
        assert sorted(texts) == ["idea one", "idea three", "idea two"]
        assert first.headers["x-leafwire-cache"] == "miss"
        assert [c["message"]["content"] for c in again.json()["choices"]] == texts
        assert again.headers["x-leafwire-cache"] == "hit"
        single = cloud.post({**body, "n": 1})
        assert single.headers["x-leafwire-cache"] == "hit"
        assert single.json()["choices"][0]["message"]["content"] == texts[0]
        (call,) = cloud.openai_fake.calls
        assert call.body["n"] == 3

    def test_sampled_requests_skip_the_cache(self, cloud: CloudStack) -> None:
        """A request with temperature above 0 (and no cache: true) always calls the provider."""
        for _ in range(2):
            raw = chat(cloud, temperature=0.7)
            assert "x-leafwire-cache" not in raw.headers
        assert len(cloud.openai_fake.calls) == 2


def test_an_anthropic_model_gets_a_call_a_choice(cloud: CloudStack) -> None:
    """The Messages API has no `n`: n=2 to an Anthropic model is two calls, one answer of both choices."""
    r = cloud.post({"model": "claude/haiku", "messages": MESSAGES, "n": 2})
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert len(cloud.claude_fake.calls) == 2
    assert cloud.openai_fake.calls == []


async def test_a_nats_client_gets_every_choice_of_one_call(cloud: CloudStack) -> None:
    """Over NATS, `n: 2` to an OpenAI-compatible model is answered in one `result` of both choices, from
    one call; streamed, in one stream of both choices' chunks (each with its index) from one call too."""
    body = {"model": "fake/echo", "messages": MESSAGES, "n": 2}
    cloud.openai_fake.script(Fault.ok("a b"), Fault.ok("c d"), Fault.ok("e f"), Fault.ok("g h"))
    nc = await nats.connect(cloud.nats.url)
    try:
        whole = await nc.request("lw.v1.plant.chat", json.dumps(body).encode(), timeout=10,
                                 headers={"Lw-Tenant": "acme"})
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("lw.v1.plant.chat", json.dumps({**body, "stream": True}).encode(), reply=inbox,
                         headers={"Lw-Tenant": "acme"})
        events: list[tuple[str, Any]] = []
        while not events or events[-1][0] not in ("done", "error"):
            msg = await sub.next_msg(timeout=10)
            events.append(((msg.headers or {}).get("Lw-Event", ""), json.loads(msg.data)))
    finally:
        await nc.drain()
    assert (whole.headers or {})["Lw-Event"] == "result"
    assert [c["message"]["content"] for c in json.loads(whole.data)["choices"]] == ["a b", "c d"]
    texts: dict[int, str] = {}
    for kind, data in events:
        if kind == "chunk":
            for choice in data["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert events[-1][0] == "done", events[-1]
    assert texts == {0: "e f", 1: "g h"}
    assert [(c.body["n"], c.body.get("stream")) for c in cloud.openai_fake.calls] == [(2, None), (2, True)]


def sse_chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
    """One ``chat.completion.chunk`` event of a provider's stream."""
    return "data: " + json.dumps({"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1,
                                  "model": "echo-1", "choices": choices, "usage": usage}) + "\n\n"


def streamed_choices(cloud: CloudStack, body: dict[str, Any]) -> tuple[httpx.Response, dict[int, str], Any]:
    """A streamed request's response, each choice's text by index, and its last data (the usage chunk when
    asked)."""
    with httpx.stream("POST", f"{cloud.gateway.base}/v1/chat/completions", json={**body, "stream": True},
                      headers={"Authorization": "Bearer key-acme"}, timeout=30) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    texts: dict[int, str] = {}
    for data in map(json.loads, lines[:-1]):
        assert "error" not in data, data
        for choice in data["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    return r, texts, json.loads(lines[-2])


class TestStreamedChoices:
    """Streamed ``n`` to an OpenAI-compatible model: one call, its choices' chunks relayed as they come."""

    @pytest.mark.parametrize("answer", ["one choice", "400 on n"])
    def test_a_provider_without_n_still_streams_every_choice(self, cloud: CloudStack, answer: str) -> None:
        """A server without n streams one choice (or refuses n with a 400 naming it): nothing reached the
        caller yet, so the choices are asked a call each, and the caller gets both in one stream. What the
        call with n was billed is accounted."""
        one = [sse_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
               sse_chunk([{"index": 0, "delta": {"content": "only one"}}]),
               sse_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
               sse_chunk([], {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}), "data: [DONE]\n\n"]
        cloud.openai_fake.script(
            Fault.raw(200, events=one) if answer == "one choice" else
            Fault.error(400, {"error": {"message": "n must be 1", "type": "invalid_request_error", "param": "n",
                                        "code": None}}),
            Fault.ok("first"), Fault.ok("second"))
        r, texts, _ = streamed_choices(cloud, {"model": "fake/echo", "messages": MESSAGES, "n": 2})
        assert texts == {0: "first", 1: "second"}
        assert [c.body.get("n") for c in cloud.openai_fake.calls] == [2, None, None]  # not retried with n
        if answer == "one choice":
            event = eventually(lambda: usage_event(cloud, r.headers["x-request-id"]), 10, "the usage event")
            assert (event["prompt_tokens"], event["completion_tokens"]) == (3, 2)
            assert event["cost_usd"] > 0

    def test_choices_are_cached_each_and_replayed(self, cloud: CloudStack) -> None:
        """``cache: true``, n 2, streamed: one call, each choice stored as its own entry; the same stream
        again is replayed from the cache (a hit, no call), and the whole request and n 1 find them too."""
        body = {"model": "fake/echo", "messages": [{"role": "user", "content": "streamed pair"}], "n": 2,
                "temperature": 1, "cache": True, "stream_options": {"include_usage": True}}
        cloud.openai_fake.script(Fault.ok("alpha beta"), Fault.ok("gamma"))
        first, texts, usage = streamed_choices(cloud, body)
        again, replayed, usage_again = streamed_choices(cloud, body)
        assert texts == replayed == {0: "alpha beta", 1: "gamma"}
        assert (first.headers["x-leafwire-cache"], again.headers["x-leafwire-cache"]) == ("miss", "hit")
        assert usage["usage"] == usage_again["usage"]
        assert usage["usage"]["completion_tokens"] == 3
        whole = cloud.post({k: v for k, v in body.items() if k != "stream_options"})
        assert whole.headers["x-leafwire-cache"] == "hit"
        assert [c["message"]["content"] for c in whole.json()["choices"]] == ["alpha beta", "gamma"]
        single = cloud.post({"model": "fake/echo", "messages": body["messages"], "temperature": 1, "cache": True})
        assert single.json()["choices"][0]["message"]["content"] == "alpha beta"
        assert len(cloud.openai_fake.calls) == 1

    def test_a_choice_index_out_of_range_is_502_before_anything_is_sent(self, cloud: CloudStack) -> None:
        """A provider streaming a choice 5 for n 2 cannot be relayed: the caller gets a 502
        upstream_bad_response as its status, not a stream of some choices."""
        bad = [sse_chunk([{"index": 5, "delta": {"role": "assistant", "content": ""}}]), "data: [DONE]\n\n"]
        cloud.openai_fake.script(*[Fault.raw(200, events=bad)] * 3)
        r = httpx.post(f"{cloud.gateway.base}/v1/chat/completions", timeout=30,
                       headers={"Authorization": "Bearer key-acme"},
                       json={"model": "fake/echo", "messages": MESSAGES, "n": 2, "stream": True})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_bad_response"


def test_identical_prompts_of_a_cached_completion_are_each_their_own_entry(cloud: CloudStack) -> None:
    """`prompt: [p, p]` with `cache: true` at temperature 0.8: two samples, and the same request again gets
    the same two: the second prompt's samples are numbered on (`Lw-Choice`), not one entry for both."""
    body = {"model": "fake/echo", "prompt": ["qa same prompt", "qa same prompt"], "cache": True, "temperature": 0.8,
            "max_tokens": 10}
    cloud.openai_fake.script(Fault.ok("sample one"), Fault.ok("sample two"))
    headers = {"Authorization": "Bearer key-acme"}
    first, again = (httpx.post(f"{cloud.gateway.base}/v1/completions", json=body, headers=headers, timeout=30)
                    for _ in range(2))
    texts = [[c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])] for r in (first, again)]
    assert sorted(texts[0]) == ["sample one", "sample two"]
    assert texts[1] == texts[0]
    assert len(cloud.openai_fake.calls) == 2


def test_a_partly_cached_request_of_n_choices_is_not_marked_hit(cloud: CloudStack) -> None:
    """The request with `n: 1` fills choice 0's entry; with `n: 3` the provider is asked for the other two only
    (`n: 2`, one call): the answer says `partial`, not choice 0's `hit` (a wholly cached answer, free), and its
    choice 0 is the stored one."""
    body = {"model": "fake/echo", "messages": [{"role": "user", "content": "qa partly cached"}], "cache": True,
            "temperature": 1}
    cloud.openai_fake.script(Fault.ok("first"), Fault.ok("second"), Fault.ok("third"))
    assert cloud.post(body).status_code == 200
    r = cloud.post({**body, "n": 3})
    assert r.status_code == 200
    assert [c.body.get("n") for c in cloud.openai_fake.calls] == [None, 2]
    assert r.headers["x-leafwire-cache"] == "partial"
    assert [c["message"]["content"] for c in r.json()["choices"]] == ["first", "second", "third"]
    again = cloud.post({**body, "n": 3})
    assert again.headers["x-leafwire-cache"] == "hit"  # now all three are there
    assert again.json()["choices"] == r.json()["choices"]
    assert len(cloud.openai_fake.calls) == 2


class TestBudgetsAndUsage:
    def test_spent_budget_refuses_with_budget_exceeded(self, cloud: CloudStack) -> None:
        """Tenant `poor` ($0.006 a day) crosses 80% then 100%: a warning and an exhausted event are published,
        the bucket says exhausted, and the next request is a 429 budget_exceeded with Retry-After."""
        alerts = subscribe(cloud, "lw.v1.hub.usage.budget")
        assert chat(cloud, "priced/echo", key="key-poor").status_code == 200  # 2+3 tokens at $1000/M: $0.005
        eventually(lambda: kv_value(cloud, "budgets", "tenant-poor.daily.hub", lambda v: v["state"] == "warning"),
                   10, "the budget to reach its warning level")
        assert chat(cloud, "priced/echo", key="key-poor").status_code == 200  # $0.010: over
        r = cloud.post({"model": "priced/echo", "messages": MESSAGES}, key="key-poor")
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "budget_exceeded"
        assert r.json()["error"]["type"] == "insufficient_quota"
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-should-retry"] == "false"  # OpenAI's clients would retry a 429 at once otherwise
        assert len(cloud.openai_fake.calls) == 2
        status = eventually(lambda: kv_value(cloud, "budgets", "tenant-poor.daily.hub",
                                             lambda v: v["state"] == "exhausted"), 10, "the budget to be exhausted")
        assert status["spent_usd"] == pytest.approx(0.010)
        assert status["limit_usd"] == 0.006
        assert [a["state"] for a in alerts.wait(2)] == ["warning", "exhausted"]

        def refused_by_router() -> httpx.Response | None:  # once it has heard: before the adapter is asked
            r = cloud.post({"model": "priced/echo", "messages": MESSAGES}, key="key-poor")
            return r if "no local model can serve this" in r.json()["error"]["message"] else None

        r = eventually(refused_by_router, 10, "the router to refuse on its own")
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "budget_exceeded"
        assert "the daily cloud budget of tenant 'poor' ($0.006) is spent: $0.0100" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 86_400  # until the next UTC day
        assert len(cloud.openai_fake.calls) == 2
        assert cloud.post({"model": "fake/echo", "messages": MESSAGES}, key="key-acme").status_code == 200

    def test_every_call_publishes_a_usage_event(self, cloud: CloudStack) -> None:
        """Each answered call leaves a usage event (tokens, cost, target, tenant) in the USAGE stream."""
        raw = chat(cloud, key="key-globex")
        request_id = raw.headers["x-request-id"]
        event = eventually(lambda: usage_event(cloud, request_id), 10, "the usage event")
        assert event["tenant"] == "globex"
        assert event["target"] == "fake/echo"
        assert (event["prompt_tokens"], event["completion_tokens"]) == (2, 3)
        assert event["cost_usd"] == pytest.approx((2 * 1 + 3 * 2) / 1e6)
        assert event["outcome"] == "ok"
        assert event["cached"] is False

    def test_prompt_tokens_from_the_providers_cache_cost_the_cached_price(self, cloud: CloudStack) -> None:
        """Prompt tokens the provider read from its own prompt cache are charged at the cached-input price."""
        cloud.openai_fake.script(Fault.ok(prompt_tokens_details={"cached_tokens": 2}))
        request_id = chat(cloud, key="key-globex").headers["x-request-id"]
        event = eventually(lambda: usage_event(cloud, request_id), 10, "the usage event")
        assert (event["prompt_tokens"], event["completion_tokens"]) == (2, 3)
        assert event["cost_usd"] == pytest.approx((2 * 0.5 + 3 * 2) / 1e6)  # not (2 * 1 + 3 * 2)


class TestSecrets:
    def test_a_wrong_api_key_is_401_and_runs_nothing(self, cloud: CloudStack) -> None:
        """A missing or unknown key gets OpenAI's 401 (the client's AuthenticationError); no provider call."""
        with pytest.raises(openai.AuthenticationError) as exc:
            cloud.client("key-nobody").chat.completions.create(model="fake/echo", messages=MESSAGES)
        assert exc.value.code == "invalid_api_key"
        keyless = httpx.post(f"{cloud.gateway.base}/v1/chat/completions", json={"model": "fake/echo",
                                                                                "messages": MESSAGES})
        assert keyless.status_code == 401
        assert keyless.json()["error"]["code"] == "invalid_api_key"
        assert cloud.openai_fake.calls == []

    def test_a_provider_without_its_key_is_503_naming_it_and_not_worth_retrying_soon(self, cloud: CloudStack) -> None:
        """A provider whose key is not set is refused at once with the variable to set, and no Retry-After:
        the OpenAI client honours one of up to 60 s before each of its retries, for a fault only an operator
        can mend."""
        r = cloud.post({"model": "keyless/echo", "messages": MESSAGES})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "provider_key_missing"
        assert r.headers["x-should-retry"] == "false"  # OpenAI's clients would retry a 503 otherwise
        assert "LW_TEST_UNSET_KEY" in r.json()["error"]["message"]
        assert "retry-after" not in r.headers
        assert cloud.openai_fake.calls == []

    def test_metrics_answer_only_a_caller_with_a_key_when_asked_to(self, cloud: CloudStack) -> None:
        """With LW_GATEWAY_METRICS_NEED_KEY the gateway's /metrics (on the API's port) is a 401 in OpenAI's
        shape without a key, and the usual text with one; health stays open to probes."""
        bare = httpx.get(f"{cloud.gateway.base}/metrics")
        assert bare.status_code == 401
        assert bare.json()["error"]["code"] == "invalid_api_key"
        keyed = httpx.get(f"{cloud.gateway.base}/metrics", headers={"Authorization": "Bearer key-globex"})
        assert keyed.status_code == 200
        assert "leafwire_http_requests_total" in keyed.text
        assert httpx.get(f"{cloud.gateway.base}/readyz").status_code == 200

    def test_keys_never_reach_callers_nats_or_logs(self, cloud: CloudStack) -> None:
        """A provider refusing the key (and echoing it) yields a 502 without it; no key ever crosses NATS
        or appears in the adapter's log, even at debug level."""
        traffic = subscribe(cloud, ">")
        r = cloud.post({"model": "wrongkey/echo", "messages": MESSAGES})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_auth_failed"
        assert chat(cloud).status_code == 200
        assert chat(cloud, "claude/haiku").status_code == 200
        seen = traffic.raw(1)
        log = cloud.adapter.log_path.read_text()  # type: ignore[union-attr]
        for key in (KEY, CLAUDE_KEY, WRONG_KEY):
            assert key not in r.text
            assert key.encode() not in seen
            assert key not in log
        assert b"upstream_auth_failed" in seen  # the capture did see the traffic

    def test_a_key_a_provider_echoes_in_an_error_is_not_relayed(self, cloud: CloudStack) -> None:
        """A provider that puts the adapter's key in an error's message, param or code (a 400, or an error
        event mid-stream, cut at any length): the caller and NATS get the error without the key."""
        traffic = subscribe(cloud, ">")
        echoed = "x" * 190 + f"Bearer {KEY} was sent"  # the key straddles the 200-character excerpt
        cloud.openai_fake.script(
            Fault.error(400, {"error": {"message": f"bad request with Bearer {KEY}", "type": "invalid_request_error",
                                        "param": f"Bearer {KEY}", "code": KEY}}),
            Fault.error(418, echoed),
            Fault.stream_error(2, message=f"oops Bearer {KEY}"))
        refused = cloud.post({"model": "fake/echo", "messages": MESSAGES})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "Bearer [redacted]"
        failed = cloud.post({"model": "fake/echo", "messages": MESSAGES, "temperature": 0.5})
        assert failed.status_code == 502  # "refused the call (418): ..." with the body's first 200 characters
        with httpx.stream("POST", f"{cloud.gateway.base}/v1/chat/completions", timeout=30,
                          headers={"Authorization": "Bearer key-acme"},
                          json={"model": "fake/echo", "messages": MESSAGES, "stream": True}) as r:
            streamed = r.read().decode()
        assert "reported an error mid-stream" in streamed
        for text in (refused.text, failed.text, streamed):
            assert KEY not in text
            assert KEY[:12] not in text  # not even a part cut off at an excerpt's end
        assert KEY.encode() not in traffic.raw(1)


def test_bad_providers_file_refuses_the_start(tmp_path: Path, nats_server: NatsServer) -> None:
    """A provider at a loopback address not marked local: the adapter exits at once, saying why."""
    bad = tmp_path / "providers.yaml"
    bad.write_text("providers:\n  - {name: x, kind: openai-compatible, base_url: 'https://127.0.0.1:9/v1', "
                   "models: [m]}\n")
    env = {**os.environ, "LW_NATS_URL": nats_server.url, "LW_PROVIDERS_FILE": str(bad)}
    out = subprocess.run([sys.executable, "-m", "services.cloud_adapter"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
    assert "private, loopback or link-local" in out.stderr


def test_no_providers_file_still_starts(tmp_path: Path, nats_server: NatsServer) -> None:
    """An edge site without an uplink runs the adapter without a providers file: it starts and is ready."""
    adapter = Service("cloud_adapter", {"LW_NATS_URL": nats_server.url, "LW_SITE": "offline",
                                        "LW_PROVIDERS_FILE": str(tmp_path / "absent.yaml")})
    with running(adapter):
        assert metric(adapter.metrics(), "leafwire_up", service="cloud-adapter") == 1
        assert metric(adapter.metrics(), "leafwire_nats_connected", service="cloud-adapter") == 1


# -- helpers reading NATS directly


class Capture:
    """Messages of a subscription made from a background thread's event loop."""

    def __init__(self, url: str, subject: str) -> None:
        import asyncio
        import threading
        self.msgs: list[tuple[str, dict[str, str], bytes]] = []
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def run() -> None:
            nc = await nats.connect(url)

            async def keep(msg: Any) -> None:
                self.msgs.append((msg.subject, dict(msg.headers or {}), msg.data))
            await nc.subscribe(subject, cb=keep)
            await nc.flush()
            self._nc = nc
            ready.set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(run(), self._loop)
        assert ready.wait(10)

    def close(self) -> None:
        import asyncio
        asyncio.run_coroutine_threadsafe(self._nc.drain(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def wait(self, count: int, timeout: float = 10) -> list[Any]:
        eventually(lambda: len(self.msgs) >= count, timeout, f"{count} messages")
        self.close()
        return [json.loads(data) for _, _, data in self.msgs]

    def raw(self, settle_s: float) -> bytes:
        """Everything captured (subjects, headers, payloads) once the traffic has settled."""
        deadline = time.monotonic() + settle_s
        eventually(lambda: time.monotonic() > deadline, settle_s + 1, "traffic to settle")
        self.close()
        return b"\n".join(s.encode() + json.dumps(h).encode() + d for s, h, d in self.msgs)


def subscribe(cloud: CloudStack, subject: str) -> Capture:
    return Capture(cloud.nats.url, subject)


def kv_value(cloud: CloudStack, bucket: str, key: str, accept: Any = None) -> Any:
    value = support.kv_json(cloud.nats.url, bucket, key)
    return value if accept is None or (value and accept(value)) else None


def usage_event(cloud: CloudStack, request_id: str) -> Any:
    """The usage event of a request, from the hub's USAGE stream (``None``: not yet)."""
    return support.usage_event(cloud.nats.url, request_id)
