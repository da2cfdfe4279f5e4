"""QA of callers that go away from cloud answers, and of the accounting that follows.

Its own stack: gateway and router of site ``plant`` and a hub cloud-adapter (as tests/e2e/test_cloud.py's), an
OpenAI-compatible fake ``oai`` and an Anthropic fake ``claude``, each ``max_concurrent: 2`` and priced, and the
route ``oai/spare`` -> ``[oai/spare, claude/haiku]`` (the router waits 1.5 s for a cloud admission). The adapter
keeps its callers at the default keepalive (5 s), so a provider call stopped within a second or two was stopped
by the gateway's cancel, not by the keepalive's backstop. The fakes count every call whose client left before
its answer was written (``left``), streamed or not. QA found three bugs, fixed since: a cancel that reached the
adapter before its request was forgotten (the provider called and billed for nobody); a router's fallback to
another cloud model of the same adapter, after its admission wait, was refused as "already being answered";
a whole answer of several choices given up on was free.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from tests import support
from tests.fakes import FakeProvider, Fault
from tests.support import NatsServer, Service, eventually, metric, running, write_policy

pytestmark = pytest.mark.e2e
SITE = "plant"
KEY = "sk-qa-aborts-0a1b2c3d4e"
CLAUDE_KEY = "sk-ant-qa-aborts-5f6a7b"
HEADERS = {"Authorization": "Bearer key-acme"}
POLICY = """
last_resort: none
rules:
  - {name: spare, when: {model: [oai/spare]}, route: [requested, claude/haiku]}
  - {name: default, route: [requested]}
"""
MODELS = {"oai": "oai/echo", "claude": "claude/haiku"}


class WatchedFake(FakeProvider):
    """A fake that counts the calls whose client went away before their answer was written."""

    def __init__(self, kind: str, key: str) -> None:
        super().__init__(kind, key)
        self.left = 0

    def reset(self) -> None:
        super().reset()
        self.left = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await super()._handle(request)
        except (asyncio.CancelledError, ConnectionResetError):
            with self._lock:
                self.left += 1
            raise


@dataclass
class QA:
    nats: NatsServer
    gateway: Service
    router: Service
    adapter: Service
    oai: WatchedFake
    claude: WatchedFake

    def fake(self, provider: str) -> WatchedFake:
        return self.oai if provider == "oai" else self.claude

    def client(self, timeout: float = 30) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key="key-acme", max_retries=0, timeout=timeout)

    def post(self, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
        return httpx.post(f"{self.gateway.base}/v1/chat/completions", json=body, headers=HEADERS, timeout=timeout)


def providers(path: Path, oai: FakeProvider, claude: FakeProvider) -> Path:
    priced = {"input_per_mtok": 1000, "output_per_mtok": 2000}
    timeouts = {"connect_s": 2, "first_byte_s": 3, "total_s": 15}
    path.write_text(json.dumps({"providers": [
        {"name": "oai", "kind": "openai-compatible", "base_url": oai.url, "local": True, "api_key_env": "LW_QA_KEY",
         "max_concurrent": 2, "timeouts": timeouts, "models": {"echo": priced, "spare": {"upstream": "echo"}}},
        {"name": "claude", "kind": "anthropic", "base_url": claude.url, "local": True,
         "api_key_env": "LW_QA_CLAUDE_KEY", "max_concurrent": 2, "timeouts": timeouts,
         "models": {"haiku": {"upstream": "claude-haiku-x", "max_tokens": 512, **priced}}},
    ], "budgets": {"tenants": {"acme": {"daily_usd": 1000}}}}))
    return path


@pytest.fixture(scope="module")
def qa(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QA]:
    tmp = tmp_path_factory.mktemp("qa-aborts")
    oai, claude = WatchedFake("openai", KEY), WatchedFake("anthropic", CLAUDE_KEY)
    for fake in (oai, claude):
        fake.start()
    file = providers(tmp / "providers.yaml", oai, claude)
    adapter = Service("cloud_adapter", {
        "LW_NATS_URL": nats_server.url, "LW_SITE": "hub", "LW_PROVIDERS_FILE": str(file), "LW_QA_KEY": KEY,
        "LW_QA_CLAUDE_KEY": CLAUDE_KEY, "LW_CLOUD_BACKOFF_BASE_S": "0.01", "LW_CLOUD_BACKOFF_CAP_S": "0.05",
        "LW_CLOUD_BREAKER_FAILURES": "1000", "LW_CLOUD_BUDGET_FLUSH_S": "0.2"})
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE}
    router = Service("router", {**env, "LW_ROUTER_UPLINK": "up", "LW_ROUTER_CLOUD_ADMISSION_TIMEOUT_S": "1.5",
                                "LW_ROUTER_POLICY_FILE": str(write_policy(tmp / "policy.yaml", POLICY))})
    gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": "key-acme:acme"})
    try:
        with running(adapter, router, gateway):
            yield QA(nats_server, gateway, router, adapter, oai, claude)
    finally:
        for fake in (oai, claude):
            fake.stop()


@pytest.fixture(autouse=True)
def _fresh(qa: QA) -> None:
    qa.oai.reset()
    qa.claude.reset()


def ask(content: str | None = None) -> Any:
    """A message no other test sends (the cache outlives a test)."""
    return [{"role": "user", "content": content or f"qa {uuid.uuid4().hex[:8]}"}]


def long_text(words: int = 60) -> str:
    return " ".join(f"w{i}" for i in range(words))


def abort_stream(qa: QA, body: dict[str, Any], lines: int = 8) -> str:
    """Open a streamed answer, read ``lines`` lines of it (events and the blank lines between them), hang up;
    the request's id."""
    with httpx.stream("POST", f"{qa.gateway.base}/v1/chat/completions", headers=HEADERS, timeout=30,
                      json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        it = r.iter_lines()
        for _ in range(lines):
            next(it)
        return r.headers["x-request-id"]


def usage(qa: QA, request_id: str) -> Any:
    return eventually(lambda: support.usage_event(qa.nats.url, request_id), 10, f"the usage event of {request_id}")


def events_since(qa: QA, since: float, target: str) -> list[dict[str, Any]]:
    return [e for _, e in asyncio.run(support.usage_events(qa.nats.url))
            if e.get("target") == target and e.get("at", 0) >= since]


def last_event(qa: QA, since: float, target: str) -> dict[str, Any]:
    """The last usage event of ``target`` answered since ``since`` (unix time), waited for."""
    return eventually(lambda: events_since(qa, since, target), 10, f"a usage event of {target}")[-1]


def inflight(qa: QA, provider: str) -> float:
    return metric(qa.adapter.metrics(), "leafwire_cloud_inflight_requests", provider=provider)


def spent(qa: QA) -> float:
    return metric(qa.adapter.metrics(), "leafwire_budget_spent_usd", scope="tenant-acme", period="daily")


# -- what works: a caller hanging up frees everything, and what it used is counted once


@pytest.mark.parametrize("provider", ["oai", "claude"])
def test_streams_hung_up_on_free_the_providers_slots_and_are_counted(qa: QA, provider: str) -> None:
    """Two callers (the provider's max_concurrent) hang up mid-stream: each provider call is stopped, the
    slots come back (a third request is served, not 429), and each request has one usage event, ``cancelled``,
    counting the words it streamed, whose cost reached the tenant's budget."""
    fake, model = qa.fake(provider), MODELS[provider]
    before = spent(qa)
    fake.script(Fault.drip(0.1, text=long_text()), Fault.drip(0.1, text=long_text()))
    ids = [abort_stream(qa, {"model": model, "messages": ask()}, lines=12) for _ in range(2)]
    eventually(lambda: fake.left == 2, 5, "the provider to see both callers' calls stopped")
    assert qa.post({"model": model, "messages": ask("again")}).json()["choices"][0]["message"]["content"] == \
        "pong again"
    events = [usage(qa, rid) for rid in ids]
    for event in events:
        assert event["outcome"] == "cancelled"
        assert event["prompt_tokens"] > 0
        assert event["completion_tokens"] >= 3  # five words streamed before the caller left
        assert event["cost_usd"] > 0
    assert sum(1 for e in events_since(qa, events[0]["at"] - 60, model) if e["request_id"] in ids) == 2  # once each
    eventually(lambda: spent(qa) >= before + sum(e["cost_usd"] for e in events) - 1e-9, 5,
               "the budget to count what was streamed")
    assert inflight(qa, provider) == 0


def test_a_whole_answer_given_up_on_stops_the_provider_call(qa: QA) -> None:
    """The openai client times out on a slow whole answer: the provider call is closed within moments, its
    slot comes back, and the request is counted ``cancelled``."""
    def cancelled() -> float:
        return metric(qa.adapter.metrics(), "leafwire_cloud_requests_total", provider="oai", model="echo",
                      outcome="cancelled")

    before = cancelled()
    qa.oai.script(Fault.slow(8), Fault.slow(8))
    for _ in range(2):
        with pytest.raises(openai.APITimeoutError):
            qa.client(timeout=0.5).chat.completions.create(model="oai/echo", messages=ask())
    eventually(lambda: qa.oai.left == 2, 3, "the provider to see both calls closed")
    eventually(lambda: cancelled() == before + 2, 5, "two cancelled requests")
    assert inflight(qa, "oai") == 0
    assert qa.post({"model": "oai/echo", "messages": ask()}).status_code == 200


@pytest.mark.parametrize("provider", ["oai", "claude"])
def test_a_stream_hung_up_on_is_not_cached(qa: QA, provider: str) -> None:
    """A temperature-0 stream the caller left midway leaves nothing in the cache: the same request again gets
    the whole answer (from the provider), whole or streamed."""
    fake, model, text = qa.fake(provider), MODELS[provider], long_text(30)
    messages = ask()
    fake.script(Fault.drip(0.1, text=text))
    abort_stream(qa, {"model": model, "messages": messages, "temperature": 0}, lines=12)
    eventually(lambda: fake.left == 1, 5, "the provider to see the call stopped")
    fake.script(Fault.ok(text=text))
    raw = qa.client().chat.completions.with_raw_response.create(model=model, messages=messages, temperature=0)
    assert raw.headers["x-leafwire-cache"] == "miss"
    assert raw.parse().choices[0].message.content == text
    chunks = list(qa.client().chat.completions.create(model=model, messages=messages, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_choices_asked_one_by_one_are_all_stopped(qa: QA) -> None:
    """n: 2 of an Anthropic model (a request a choice) hung up on mid-stream: both provider calls stop, and
    each choice has its own usage event for what it streamed."""
    qa.claude.script(Fault.drip(0.1, text=long_text()), Fault.drip(0.1, text=long_text()))
    rid = abort_stream(qa, {"model": "claude/haiku", "messages": ask(), "n": 2}, lines=12)
    eventually(lambda: qa.claude.left == 2, 5, "the provider to see both calls stopped")
    for j in range(2):
        event = usage(qa, f"{rid}-{j}")
        assert event["outcome"] == "cancelled"
        assert event["completion_tokens"] > 0
    assert inflight(qa, "claude") == 0


def test_thirty_hang_ups_in_a_row_leak_nothing(qa: QA) -> None:
    """30 callers leaving, streamed and whole, both providers: 30 cancelled requests, no provider call left in
    flight, no HTTP request left open at the gateway, and both providers still answer."""
    def cancelled() -> float:
        text = qa.adapter.metrics()
        return sum(metric(text, "leafwire_cloud_requests_total", provider=p, model=m.split("/")[1],
                          outcome="cancelled") for p, m in MODELS.items())

    before = cancelled()
    for i in range(30):
        provider = "oai" if i % 2 else "claude"
        fake, model = qa.fake(provider), MODELS[provider]
        if i % 3:
            fake.script(Fault.drip(0.1, text=long_text()))
            abort_stream(qa, {"model": model, "messages": ask()}, lines=4)
        else:
            fake.script(Fault.slow(5))
            with pytest.raises(httpx.TimeoutException):
                qa.post({"model": model, "messages": ask()}, timeout=0.3)
    eventually(lambda: qa.oai.left + qa.claude.left == 30, 10, "the providers to see every call stopped")
    eventually(lambda: cancelled() == before + 30, 5, "30 cancelled requests")
    assert inflight(qa, "oai") == inflight(qa, "claude") == 0
    assert metric(qa.gateway.metrics(), "leafwire_http_inflight_requests") == 1  # the /metrics request itself
    assert qa.post({"model": "oai/echo", "messages": ask()}).status_code == 200
    assert qa.post({"model": "claude/haiku", "messages": ask()}).status_code == 200


# -- bugs


def test_a_caller_gone_before_the_adapter_took_the_request_is_not_answered(qa: QA) -> None:
    """The caller gives up while its request is still on its way (the router busy for a moment: paused here):
    the gateway's cancel comes before the request reaches the adapter, which remembers it and refuses the
    request when it comes: the provider is not called for nobody, and nothing is billed (it answered in full
    and billed the tenant ``ok``, and a stream ran until the keepalive found the caller gone, 5 s)."""
    qa.oai.script(Fault.ok(text=long_text(), delay_s=1))
    started = time.time()
    qa.router.pause()
    try:
        with pytest.raises(httpx.TimeoutException):
            qa.post({"model": "oai/echo", "messages": ask()}, timeout=0.3)
        time.sleep(0.5)  # the gateway's cancel has gone out by now
    finally:
        qa.router.resume()
    time.sleep(2.5)  # the whole answer would take 1 s
    assert qa.oai.calls == []
    assert [e for e in events_since(qa, started, "oai/echo") if e["cost_usd"] > 0 or e["outcome"] == "ok"] == []


def test_a_fallback_after_the_routers_wait_reaches_the_next_cloud_model(qa: QA) -> None:
    """oai/spare routes [oai/spare, claude/haiku]; the provider is silent for 2.5 s (within its first_byte_s),
    past the router's 1.5 s wait: the router cancels it and offers the request, same id, to claude/haiku on
    the same adapter. The caller should get claude's answer; it gets a 400 because the adapter still holds the
    cancelled call under that id (in most tries: the cancel and the offer race)."""
    for _ in range(3):  # the adapter drops the cancelled call before the offer only now and then: each must work
        qa.oai.reset()
        qa.oai.script(Fault.slow(2.5))
        r = qa.post({"model": "oai/spare", "messages": ask("fallback")})
        eventually(lambda: qa.oai.left == 1, 5, "the slow call to be stopped")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "pong fallback"


def test_a_whole_answer_of_choices_given_up_on_counts_its_prompt(qa: QA) -> None:
    """The same slow whole answer given up on after 1 s, asked with n: 1 and n: 2 of an OpenAI-compatible
    provider (one call either way, which read the prompt): both usage events should count the prompt and
    charge it, as n: 1's does. n: 2's says 0 tokens, $0: an abandoned request of several choices is free."""
    counted = {}
    for n in (1, 2):
        started = time.time()
        qa.oai.script(Fault.slow(5))
        with pytest.raises(httpx.TimeoutException):
            qa.post({"model": "oai/echo", "messages": ask("one two three four five six seven eight"), "n": n},
                    timeout=1)
        eventually(lambda: qa.oai.left == 1, 5, "the call to be stopped")
        event = last_event(qa, started, "oai/echo")
        assert event["outcome"] == "cancelled"
        counted[n] = (event["prompt_tokens"], event["cost_usd"] > 0)
        qa.oai.reset()
    assert counted[1][0] > 0
    assert counted[2] == counted[1]
