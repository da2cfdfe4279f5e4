"""QA of two things landed together: what a whole cloud answer says it cost (``x-leafwire-cost-usd``, NATS
``Lw-Cost``), and an edge whose own cloud-adapter lacks a model the hub's adapters have (its work goes on the
hub's subject, ``lw.v1.hub.cloud.chat``/``.embeddings``).

Two stacks, real nats-servers and services, fake providers only:

- ``site``: one site ``qacost`` with a local model (``tiny``), a cloud-adapter, a router and a gateway. The header
  is held against the usage event of the request (stream ``USAGE``) and what the adapter charged
  (``leafwire_cloud_cost_usd_total``, counted where the budgets are charged): Anthropic prompt caching prices,
  DeepSeek's ``prompt_cache_hit_tokens``, a provider that reports no usage, ``n`` partly cached, text
  completions (``n``, a list of prompts), embeddings partly cached and in parts, a route falling back from a
  failing cloud model, a retried call, tools and JSON answers, a provider ignoring ``n``; none on streams, errors
  and local answers; the openai client's ``with_raw_response`` and a NATS caller's ``Lw-Cost``.
- ``edge``: a hub and an edge ``plant19`` joined through a relay the tests can cut; the hub's adapter has ``hubo``
  (chat and embeddings) and ``nono`` (no ``n``), the edge's own adapter only ``edgep``. Embeddings, ``n``, a
  route with a fallback, a caller hanging up, the edge's adapter stopped and back, or hung, the uplink cut.

QA found two bugs, fixed since: a provider that takes ``n`` but answers one choice is charged for that call,
and the header of the answer (its choices then asked apart) left it out (the refusal now carries ``Lw-Cost``);
an edge adapter that hangs (heartbeats expired, subscriptions still there) got the hub-only model's work again
(on the edge's subject) and the caller a 504, though the hub's adapter is live and has the model.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from deploy import topology
from shared import subjects
from shared.envelope import COST, Envelope
from tests.fakes import FakeProvider, Fault
from tests.support import (
    CuttableSite,
    NatsServer,
    Service,
    connected,
    eventually,
    local_and_cloud_site,
    metric,
    running,
    start_cuttable_site,
    usage_events,
    write_policy,
)

pytestmark = pytest.mark.e2e
SITE = "qacost"
EDGE = "plant19"
# Anthropic's prompt-cache prices: reads half, 5-minute writes 1.25x, 1-hour writes 2x the input
CACHE_PRICES = {"upstream": "claude-haiku-x", "max_tokens": 64, "input_per_mtok": 1, "output_per_mtok": 2,
                "cached_input_per_mtok": 0.5, "cache_write_input_per_mtok": 1.25,
                "cache_write_1h_input_per_mtok": 2}
POLICY = """\
local_model: tiny
last_resort: none
aliases:
  fbk: dead/echo
  slowfb: oai/ds
rules:
  - {name: fallback, when: {model: fbk}, route: [dead/echo, oai/echo]}
  - {name: slow-fallback, when: {model: slowfb}, route: [oai/ds, oai/echo]}
  - {name: default, route: [requested]}
"""


def entry(name: str, url: str, models: dict[str, Any], kind: str = "openai-compatible", **more: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "base_url": url, "local": True, "models": models,
            "timeouts": {"connect_s": 2, "first_byte_s": 3, "total_s": 10}, **more}


@dataclass
class Site:
    nats: NatsServer
    gateway: Service
    adapter: Service
    oai: FakeProvider
    claude: FakeProvider

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key="none", max_retries=0, timeout=30)

    def post(self, body: dict[str, Any], path: str = "chat/completions") -> httpx.Response:
        return httpx.post(f"{self.gateway.base}/v1/{path}", json=body, timeout=30)

    def charged(self, provider: str, model: str) -> float:
        return metric(self.adapter.metrics(), "leafwire_cloud_cost_usd_total", provider=provider, model=model)


@pytest.fixture(scope="module")
def site(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("qa-cost")
    oai, claude = FakeProvider("openai").start(), FakeProvider("anthropic").start()
    dead = f"http://127.0.0.1:{topology.free_port()}/v1"  # nobody listens: every call fails
    providers = tmp / "providers.yaml"
    providers.write_text(json.dumps({"providers": [
        entry("oai", oai.url, {"echo": {"input_per_mtok": 1, "output_per_mtok": 2, "cached_input_per_mtok": 0.5},
                               "ds": {"upstream": "deepseek-chat", "input_per_mtok": 0.27, "output_per_mtok": 1.1,
                                      "cached_input_per_mtok": 0.07},
                               "embed": {"kind": "embeddings", "input_per_mtok": 2}}),
        entry("dead", dead, {"echo": {"input_per_mtok": 100, "output_per_mtok": 100}}),
        entry("claude", claude.url, {"cache": CACHE_PRICES}, kind="anthropic"),
    ]}))
    worker, adapter, router, gateway = local_and_cloud_site(nats_server.url, SITE, tmp, providers, POLICY,
                                                          {"LW_CLOUD_N_RECHECK_S": "0"})  # no n: not remembered
    try:
        with running(worker, adapter, router, gateway):
            yield Site(nats_server, gateway, adapter, oai, claude)
    finally:
        oai.stop()
        claude.stop()


@pytest.fixture
def qa(site: Site) -> Site:
    site.oai.reset()
    site.claude.reset()
    return site


def uid() -> str:
    return uuid.uuid4().hex[:12]


def events_of(site: Site, request_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The usage events of ``request_id`` (at least ``count``)."""
    def found() -> list[dict[str, Any]] | None:
        events = [e for _, e in asyncio.run(usage_events(site.nats.url)) if e.get("request_id") == request_id]
        return events if len(events) >= count else None
    return eventually(found, 10, f"the usage event of {request_id}")


def cost(r: httpx.Response | Any) -> float:
    return float(r.headers["x-leafwire-cost-usd"])


def agrees(site: Site, r: httpx.Response, provider: str, model: str, before: float) -> float:
    """The header equals the request's usage event and the adapter's charge since ``before``; the cost."""
    assert r.status_code == 200, r.text
    said = cost(r)
    events = events_of(site, r.headers["x-request-id"])
    assert said == pytest.approx(sum(e["cost_usd"] for e in events), abs=2e-9), events
    eventually(lambda: abs(site.charged(provider, model) - before - said) < 2e-9 or None, 5,
               f"the charge to be {said} (is {site.charged(provider, model) - before})")
    return said


# --- the cost header, as the usage event and the budgets say ---------------------------------------------------


def test_anthropic_cached_and_cache_written_tokens_are_priced_as_the_event_says(qa: Site) -> None:
    """Claude read 2 prompt tokens from its cache and wrote 3 (2 of them for an hour): the header is the event's
    cost, and that is the tokens at Anthropic's cache prices."""
    qa.claude.script(Fault.ok(cache_read_input_tokens=2, cache_creation_input_tokens=3,
                              cache_creation={"ephemeral_5m_input_tokens": 1, "ephemeral_1h_input_tokens": 2}))
    before = qa.charged("claude", "cache")
    r = qa.post({"model": "claude/cache", "messages": [{"role": "user", "content": f"hi {uid()}"}]})
    said = agrees(qa, r, "claude", "cache", before)
    usage = r.json()["usage"]
    plain = usage["prompt_tokens"] - 5
    assert said == pytest.approx((plain * 1 + 2 * 0.5 + 1 * 1.25 + 2 * 2 + usage["completion_tokens"] * 2) / 1e6,
                                 abs=2e-9)


def test_deepseek_prompt_cache_hit_tokens_are_priced_as_the_event_says(qa: Site) -> None:
    qa.oai.script(Fault.ok(prompt_cache_hit_tokens=2, prompt_cache_miss_tokens=1))
    before = qa.charged("oai", "ds")
    r = qa.post({"model": "oai/ds", "messages": [{"role": "user", "content": f"deep {uid()}"}]})
    said = agrees(qa, r, "oai", "ds", before)
    usage = r.json()["usage"]
    assert said == pytest.approx(((usage["prompt_tokens"] - 2) * 0.27 + 2 * 0.07
                                  + usage["completion_tokens"] * 1.1) / 1e6, abs=2e-9)


def test_a_provider_without_usage_is_charged_its_estimate_and_says_so(qa: Site) -> None:
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "echo-1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "an answer of some length here"},
                         "finish_reason": "stop"}]}
    qa.oai.script(Fault.raw(body=body))
    before = qa.charged("oai", "echo")
    r = qa.post({"model": "oai/echo", "messages": [{"role": "user", "content": f"no usage {uid()}"}]})
    assert agrees(qa, r, "oai", "echo", before) > 0


def test_a_call_retried_after_a_500_costs_once(qa: Site) -> None:
    qa.oai.script(Fault.error(500), Fault.ok())
    before = qa.charged("oai", "echo")
    r = qa.post({"model": "oai/echo", "messages": [{"role": "user", "content": f"retry {uid()}"}]})
    said = agrees(qa, r, "oai", "echo", before)
    assert len(qa.oai.calls) == 2
    usage = r.json()["usage"]
    assert said == pytest.approx((usage["prompt_tokens"] + 2 * usage["completion_tokens"]) / 1e6, abs=2e-9)


def test_tools_and_json_answers_say_their_cost(qa: Site) -> None:
    tool_call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
    qa.oai.script(Fault.raw(body={
        "id": "x", "object": "chat.completion", "created": 1, "model": "echo-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [tool_call]},
                     "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}}))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    before = qa.charged("oai", "echo")
    r = qa.post({"model": "oai/echo", "messages": [{"role": "user", "content": f"tool {uid()}"}], "tools": tools})
    assert agrees(qa, r, "oai", "echo", before) == pytest.approx((40 + 24) / 1e6, abs=2e-9)
    before = qa.charged("oai", "echo")
    r = qa.post({"model": "oai/echo", "messages": [{"role": "user", "content": f"json {uid()}"}],
                 "response_format": {"type": "json_object"}})
    assert agrees(qa, r, "oai", "echo", before) > 0


def test_n_partly_from_the_cache_costs_the_call_for_the_others(qa: Site) -> None:
    """n=1 stored first (temperature 0), then n=3 of the same: choice 0 from the cache, one call for two."""
    messages = [{"role": "user", "content": f"choices {uid()}"}]
    first = qa.post({"model": "oai/echo", "messages": messages, "temperature": 0})
    assert first.status_code == 200
    before = qa.charged("oai", "echo")
    r = qa.post({"model": "oai/echo", "messages": messages, "temperature": 0, "n": 3})
    assert r.headers.get("x-leafwire-cache") == "partial"
    said = agrees(qa, r, "oai", "echo", before)
    assert qa.oai.calls[-1].body["n"] == 2
    assert said > 0


def test_a_provider_ignoring_n_says_what_every_call_cost(qa: Site) -> None:
    """A server that takes ``n`` but answers one choice: that call is billed and charged, then each choice is
    asked apart. The header must add up every call charged, the one that ignored ``n`` too."""
    one = {"id": "x", "object": "chat.completion", "created": 1, "model": "echo-1",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "just one"}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000}}
    qa.oai.script(Fault.raw(body=one))
    before = qa.charged("oai", "echo")
    r = qa.post({"model": "oai/echo", "messages": [{"role": "user", "content": f"ignored {uid()}"}], "n": 2,
                 "temperature": 1})
    assert r.status_code == 200, r.text
    assert len(qa.oai.calls) == 3
    charged = eventually(lambda: (c := qa.charged("oai", "echo") - before) > 3000 / 1e6 and c, 5, "the charges")
    assert cost(r) == pytest.approx(charged, abs=5e-9)


def test_text_completions_say_what_their_calls_cost_together(qa: Site) -> None:
    """A lone prompt with n=2 (one call), and a list of two prompts (a call each)."""
    before = qa.charged("oai", "echo")
    r = qa.post({"model": "oai/echo", "prompt": f"once {uid()}", "n": 2, "temperature": 1}, "completions")
    assert len(r.json()["choices"]) == 2
    agrees(qa, r, "oai", "echo", before)
    before = qa.charged("oai", "echo")
    r = qa.post({"model": "oai/echo", "prompt": [f"one {uid()}", f"two more {uid()}"]}, "completions")
    assert r.status_code == 200, r.text
    assert len(qa.oai.calls) == 3
    usage = r.json()["usage"]
    said = cost(r)
    assert said == pytest.approx((usage["prompt_tokens"] + 2 * usage["completion_tokens"]) / 1e6, abs=2e-9)
    eventually(lambda: abs(qa.charged("oai", "echo") - before - said) < 3e-9 or None, 5, "the charges to agree")


def test_embeddings_in_parts_and_partly_cached_say_what_was_charged(qa: Site) -> None:
    """300 inputs (two parts of base64 vectors, as the openai client asks), 10 of them cached before."""
    inputs = [f"line {i} of {uid()}" for i in range(300)]
    qa.client().embeddings.create(model="oai/embed", input=inputs[:10])
    before = qa.charged("oai", "embed")
    raw = qa.client().embeddings.with_raw_response.create(model="oai/embed", input=inputs)
    assert raw.headers["x-leafwire-cache"] == "partial"
    said = cost(raw)
    assert said == pytest.approx(290 * 4 * 2 / 1e6, abs=2e-9)  # 4 words an input at $2/M; the 10 cached are free
    eventually(lambda: abs(qa.charged("oai", "embed") - before - said) < 3e-9 or None, 5, "the charge to agree")


def test_a_fallback_says_what_the_model_that_answered_cost(qa: Site) -> None:
    """Route [dead/echo (connection refused), oai/echo]: the answer's cost is oai/echo's, as charged."""
    before = qa.charged("oai", "echo")
    r = qa.post({"model": "fbk", "messages": [{"role": "user", "content": f"fall {uid()}"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-leafwire-route"].startswith("target=oai/echo"), r.headers["x-leafwire-route"]
    said = cost(r)
    assert said > 0
    assert qa.charged("dead", "echo") == 0
    eventually(lambda: abs(qa.charged("oai", "echo") - before - said) < 2e-9 or None, 5, "the charge to agree")


def test_a_fallback_after_a_paid_call_says_what_the_answer_cost(qa: Site) -> None:
    """Route [oai/ds, oai/echo]: oai/ds is slower than the router's admission wait (1.5 s), so it is stopped and
    oai/echo answers. The header is what oai/echo's call cost (as LiteLLM's is the answering deployment's);
    the stopped call is charged too (its prompt, estimated: a ``cancelled`` usage event under the same id),
    which the header leaves out."""
    qa.oai.script(Fault.slow(4), Fault.ok())
    before = qa.charged("oai", "ds")
    r = qa.post({"model": "slowfb", "messages": [{"role": "user", "content": f"slow {uid()}"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-leafwire-route"].startswith("target=oai/echo"), r.headers["x-leafwire-route"]
    events = {e["outcome"]: e for e in events_of(qa, r.headers["x-request-id"], 2)}
    assert cost(r) == pytest.approx(events["ok"]["cost_usd"], abs=2e-9)
    assert events["cancelled"]["target"] == "oai/ds"
    assert events["cancelled"]["cost_usd"] > 0
    eventually(lambda: qa.charged("oai", "ds") > before or None, 5, "the stopped call charged")


def test_none_on_streams_errors_and_local_answers(qa: Site) -> None:
    messages = [{"role": "user", "content": f"stream {uid()}"}]
    with httpx.stream("POST", f"{qa.gateway.base}/v1/chat/completions", timeout=30,
                      json={"model": "oai/echo", "messages": messages, "stream": True, "n": 2}) as r:
        assert r.status_code == 200
        assert "x-leafwire-cost-usd" not in r.headers
        r.read()
    with httpx.stream("POST", f"{qa.gateway.base}/v1/completions", timeout=30,
                      json={"model": "oai/echo", "prompt": ["a", "b"], "stream": True}) as r:
        assert r.status_code == 200
        assert "x-leafwire-cost-usd" not in r.headers
        r.read()
    qa.oai.script(Fault.error(400))
    r = qa.post({"model": "oai/echo", "messages": [{"role": "user", "content": f"err {uid()}"}]})
    assert r.status_code == 400
    assert "x-leafwire-cost-usd" not in r.headers
    for body, path in (({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                        "chat/completions"),
                       ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2},
                        "chat/completions"),
                       ({"model": "tiny", "prompt": ["a", "b"], "max_tokens": 4}, "completions")):
        r = qa.post(body, path)
        assert r.status_code == 200, r.text
        assert "x-leafwire-cost-usd" not in r.headers, (body, r.headers)


def test_the_openai_client_reads_it_with_raw_response(qa: Site) -> None:
    raw = qa.client().chat.completions.with_raw_response.create(
        model="oai/echo", messages=[{"role": "user", "content": f"sdk {uid()}"}])
    answer = raw.parse()
    assert answer.usage is not None
    assert float(raw.headers["x-leafwire-cost-usd"]) == pytest.approx(
        (answer.usage.prompt_tokens + 2 * answer.usage.completion_tokens) / 1e6, abs=2e-9)


def test_a_nats_caller_reads_lw_cost_on_the_result(qa: Site) -> None:
    """docs/nats-api.md: a request on ``lw.v1.<site>.chat`` gets ``Lw-Cost`` on its ``result``."""
    async def ask() -> tuple[dict[str, str], dict[str, Any]]:
        async with connected(qa.nats.url) as nc:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            env = Envelope(request_id=uuid.uuid4().hex, tenant="acme", reply=inbox, deadline=time.time() + 20)
            body = {"model": "oai/echo", "messages": [{"role": "user", "content": f"nats {uid()}"}]}
            await nc.publish(subjects.chat(SITE), json.dumps(body).encode(), reply=inbox,
                             headers=dict(env.headers()))
            while True:
                msg = await sub.next_msg(timeout=20)
                if (msg.headers or {}).get("Lw-Event") in ("result", "error"):
                    return dict(msg.headers or {}), json.loads(msg.data)
    headers, answer = asyncio.run(ask())
    assert headers["Lw-Event"] == "result", answer
    usage = answer["usage"]
    assert float(headers[COST]) == pytest.approx((usage["prompt_tokens"] + 2 * usage["completion_tokens"]) / 1e6,
                                                 abs=2e-9)


# --- an edge whose own adapter lacks the hub's models ------------------------------------------------------------


@dataclass
class Edge:
    site: CuttableSite
    hub_fake: FakeProvider
    edge_fake: FakeProvider
    hub_adapter: Service
    edge_adapter: Service
    router: Service
    gateway: Service

    def post(self, body: dict[str, Any], path: str = "chat/completions") -> httpx.Response:
        return httpx.post(f"{self.gateway.base}/v1/{path}", json=body, timeout=30)


EDGE_POLICY = """\
last_resort: none
aliases:
  hubfirst: hubo/echo
rules:
  - {name: fallback, when: {model: hubfirst}, route: [hubo/echo, edgep/echo]}
  - {name: default, route: [requested]}
"""


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("qa-cost-edge")
    hub_fake, edge_fake = FakeProvider("openai").start(), FakeProvider("openai").start()
    (tmp / "hub.yaml").write_text(json.dumps({"providers": [
        entry("hubo", hub_fake.url, {"echo": {"input_per_mtok": 1, "output_per_mtok": 2},
                                     "emb": {"kind": "embeddings", "input_per_mtok": 2}}),
        entry("nono", hub_fake.url, {"echo": {}}, n=False)]}))
    (tmp / "edge.yaml").write_text(json.dumps({"providers": [entry("edgep", edge_fake.url, {"echo": {}})]}))
    try:
        with start_cuttable_site(tmp, EDGE) as cut:
            # a keepalive far longer than the tests: only a cancel can stop an answer nobody waits for
            hub_adapter = Service("cloud_adapter", {"LW_NATS_URL": cut.hub.url, "LW_SITE": "hub",
                                                    "LW_KEEPALIVE_S": "60", "LW_PROVIDERS_FILE": str(tmp / "hub.yaml")})
            env = {"LW_NATS_URL": cut.edge.url, "LW_SITE": EDGE, "LW_KEEPALIVE_S": "1"}
            edge_adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(tmp / "edge.yaml")})
            router = Service("router", {**env, "LW_ROUTER_UPLINK_PROBE_S": "0.3",
                                        "LW_ROUTER_POLICY_FILE": str(write_policy(tmp / "policy.yaml", EDGE_POLICY))})
            gateway = Service("gateway", {**env, "LW_GATEWAY_REQUEST_TIMEOUT_S": "20"})
            with running(hub_adapter, edge_adapter, router, gateway):
                stack = Edge(cut, hub_fake, edge_fake, hub_adapter, edge_adapter, router, gateway)
                hub_ready(stack)
                yield stack
    finally:
        hub_fake.stop()
        edge_fake.stop()


def hub_ready(stack: Edge, within: float = 60) -> None:
    eventually(lambda: (r := stack.post({"model": "hubo/echo", "messages": [{"role": "user", "content": "ready"}]}))
               .status_code == 200 and r.headers.get("x-leafwire-served-by", "").startswith("hub/"), within,
               "the hub's adapter to answer hubo/echo at the edge")


@pytest.fixture
def ed(edge: Edge) -> Edge:
    edge.hub_fake.reset()
    edge.edge_fake.reset()
    return edge


def test_embeddings_of_a_hub_only_model_from_the_edge(ed: Edge) -> None:
    r = ed.post({"model": "hubo/emb", "input": [f"a {uid()}", f"b {uid()}"]}, "embeddings")
    assert r.status_code == 200, r.text
    assert r.headers["x-leafwire-served-by"].startswith("hub/")
    assert len(r.json()["data"]) == 2
    assert float(r.headers["x-leafwire-cost-usd"]) == pytest.approx(4 * 2 / 1e6, abs=2e-9)


def test_n_of_a_hub_only_model_from_the_edge(ed: Edge) -> None:
    """One call with n (hubo), and a call a choice (nono, no n): both answered by the hub."""
    for model, calls in (("hubo/echo", 1), ("nono/echo", 2)):
        ed.hub_fake.reset()
        r = ed.post({"model": model, "messages": [{"role": "user", "content": f"n {uid()}"}], "n": 2,
                     "temperature": 1})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2
        assert r.headers["x-leafwire-served-by"].startswith("hub/")
        assert len(ed.hub_fake.calls) == calls
        assert not ed.edge_fake.calls


def test_a_route_with_a_fallback_and_a_lone_model_both_reach_the_hub(ed: Edge) -> None:
    """Route [hubo/echo, edgep/echo] (offered, waits for admission) and hubo/echo alone (handed off)."""
    for model in ("hubfirst", "hubo/echo"):
        r = ed.post({"model": model, "messages": [{"role": "user", "content": f"route {uid()}"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-leafwire-served-by"].startswith("hub/"), r.headers
        assert r.headers["x-leafwire-route"].startswith("target=hubo/echo"), r.headers["x-leafwire-route"]
    assert not ed.edge_fake.calls
    r = ed.post({"model": "edgep/echo", "messages": [{"role": "user", "content": "mine"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-leafwire-served-by"].startswith(f"{EDGE}/")


def test_a_caller_hanging_up_stops_the_hub_adapters_call(ed: Edge) -> None:
    """A stream of hubo/echo from the edge, the caller gone after its first chunk: the cancel (on the edge's
    subject) reaches the hub's adapter, which closes the provider's stream (its keepalive is 60 s)."""
    ed.hub_fake.script(Fault.drip(0.5, " ".join(["word"] * 40)))
    with httpx.stream("POST", f"{ed.gateway.base}/v1/chat/completions", timeout=30,
                      json={"model": "hubo/echo", "stream": True,
                            "messages": [{"role": "user", "content": f"long {uid()}"}]}) as r:
        assert r.status_code == 200
        assert r.headers["x-leafwire-served-by"].startswith("hub/")
        next(r.iter_lines())
    eventually(lambda: ed.hub_fake.disconnects >= 1 or None, 8, "the hub adapter to stop the provider's stream")


def test_the_edge_adapter_stopped_and_back(ed: Edge) -> None:
    """With the edge's adapter gone (its heartbeats expired) the hub answers hubo/echo; with it back, every
    request for hubo/echo made meanwhile is answered too (none taken by it and refused 404)."""
    ed.edge_adapter.stop()
    time.sleep(1)
    r = ed.post({"model": "hubo/echo", "messages": [{"role": "user", "content": f"alone {uid()}"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-leafwire-served-by"].startswith("hub/")
    ed.edge_adapter.start()
    statuses: list[int] = []
    ends = time.monotonic() + 15
    while time.monotonic() < ends:
        statuses.append(ed.post({"model": "hubo/echo", "messages": [{"role": "user", "content": "back"}]}).status_code)
        if ed.edge_adapter.readyz()[0] == 200 and len(statuses) > 20:
            break
    ed.edge_adapter.wait_ready()
    time.sleep(2)
    r = ed.post({"model": "edgep/echo", "messages": [{"role": "user", "content": "mine again"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-leafwire-served-by"].startswith(f"{EDGE}/")
    assert set(statuses) == {200}, statuses


def test_with_the_uplink_cut_a_hub_only_model_is_skipped_as_needing_it(ed: Edge) -> None:
    """The edge's own model still answers; the hub's is refused at once as needing the uplink (a 503), not
    taken by the edge's adapter and refused 404."""
    ed.site.link.cut()
    try:
        eventually(lambda: not topology.leafnode_connected(ed.site.edge.node), 10, "the uplink down")
        time.sleep(1)
        started = time.monotonic()
        r = ed.post({"model": "hubo/echo", "messages": [{"role": "user", "content": "offline"}]})
        assert r.status_code == 503, r.text
        assert time.monotonic() - started < 5
        r = ed.post({"model": "edgep/echo", "messages": [{"role": "user", "content": "offline mine"}]})
        assert r.status_code == 200, r.text
    finally:
        ed.site.link.restore()
    eventually(lambda: topology.leafnode_connected(ed.site.edge.node), 20, "the uplink back")
    hub_ready(ed, 30)


def test_a_hub_only_model_while_the_edge_adapter_hangs(ed: Edge) -> None:
    """The edge's adapter hangs (SIGSTOP: its heartbeats stop, its NATS connection and subscriptions stay until
    the server's pings give up, minutes later). hubo/echo, which it never had, is still the hub's to answer:
    while its heartbeats are fresh it is (the hub's subject); once they expired the router sends it on the
    edge's subject, whose local queue member is the hung adapter: a 504 after the request's 20 s."""
    ed.edge_adapter.pause()
    try:
        r = ed.post({"model": "hubo/echo", "messages": [{"role": "user", "content": f"hang {uid()}"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-leafwire-served-by"].startswith("hub/")
        time.sleep(8)  # 3 missed beats of 2 s: gone for the router
        r = ed.post({"model": "hubo/echo", "messages": [{"role": "user", "content": f"hang {uid()}"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-leafwire-served-by"].startswith("hub/")
    finally:
        ed.edge_adapter.resume()
    ed.edge_adapter.wait_ready()
    time.sleep(2)
