"""QA of two things landed together: what an OpenAI-compatible provider is sent where servers differ (the
completion limit's field for OpenAI's reasoning models, ``token_limit_field``; a stream refused for
``stream_options`` asked again without it), and an edge site's router following the hub adapters' breakers
and budgets from its mirrors of the hub's ``provider-health`` and ``budgets`` buckets.

One stack for the module: real nats-servers (a hub, and an edge ``plant7`` joined through a relay the tests
can cut, ``tests.support.start_cuttable_site``); the hub's cloud-adapter (the edge has none at first); the
edge's router and gateway; fake providers. Every request goes the way an edge's does: the edge's gateway and
router, across the leaf link, to the hub's adapter.

- the completion limit: a reasoning model gets ``max_completion_tokens`` across the edge, also with ``n`` and
  from ``/v1/completions`` (its default 16); a model named ``o3`` at an Anthropic provider gets Anthropic's
  ``max_tokens``.
- ``stream_options`` refused: an ``n`` = 2 stream is asked again without it and the caller gets both choices
  and its usage chunk; it is asked with it again once ``LW_CLOUD_N_RECHECK_S`` has passed; a refusal never
  counts as a failure for the breaker.
- budgets spent at the hub: the edge's router refuses the tenant itself (429, Retry-After), without a call.
- the hub's breakers at an edge without its own adapter: a policy rule on ``provider_health`` reads them; they
  are followed after the hub's bucket is deleted and made again, after the link is cut and restored, and by a
  restarted router at once; an edge with its own adapter for the provider goes by its own breaker.

QA found two bugs, fixed since: a fine-tuned o4-mini (``ft:o4-mini-...``) was sent ``max_tokens``; an edge
whose own cloud-adapter has other providers than the hub's answered the hub-only providers' models 404 (its
adapter, the local member of the queue group, took the request and refused it); the router now sends such a
model's work on the ``hub`` subject, which only the hub's adapters read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.js.errors import NotFoundError

from deploy import topology
from shared import subjects
from tests.fakes import FakeProvider, Fault
from tests.support import (
    CuttableSite,
    Service,
    eventually,
    running,
    start_cuttable_site,
    write_policy,
)

pytestmark = pytest.mark.e2e
SITE = "plant7"
ACME = {"Authorization": "Bearer key-acme"}
SPENDER = {"Authorization": "Bearer key-spender"}
RECHECK_S = 4.0
STREAM_OPTIONS_REFUSED = {"error": {"message": "Unrecognized request argument supplied: stream_options",
                                    "type": "invalid_request_error", "param": None, "code": None}}
FT_O4 = "ft:o4-mini-2025-04-16:acme:qa:AbC123"
POLICY = """\
last_resort: none
rules:
  - name: brk-open-goes-to-spare
    when: {provider_health: {brk: open}, model: [brk/echo]}
    route: [spare/echo]
  - name: brk2-open-goes-to-spare
    when: {provider_health: {brk2: open}, model: [brk2/echo]}
    route: [spare/echo]
  - name: brk3-open-goes-to-spare
    when: {provider_health: {brk3: open}, model: [brk3/echo]}
    route: [spare/echo]
  - name: brk4-open-goes-to-spare
    when: {provider_health: {brk4: open}, model: [brk4/echo]}
    route: [spare/echo]
"""


@dataclass
class Stack:
    site: CuttableSite
    fakes: dict[str, FakeProvider]
    router: Service
    gateway: Service
    tmp: Path


def entry(name: str, fake: FakeProvider, models: dict[str, Any], **more: Any) -> dict[str, Any]:
    kind = "anthropic" if fake.kind == "anthropic" else "openai-compatible"
    return {"name": name, "kind": kind, "base_url": fake.url, "local": True, "models": models,
            "timeouts": {"connect_s": 2, "first_byte_s": 3, "total_s": 10}, **more}


def hub_providers(path: Path, fakes: dict[str, FakeProvider]) -> Path:
    path.write_text(json.dumps({
        "providers": [
            entry("oai", fakes["oai"], {"o3": {"upstream": "o3-mini-2025-01-31"}, "gpt": {"upstream": "gpt-4o-mini"},
                                        "ft": {"upstream": FT_O4}}),
            entry("old", fakes["old"], {"m": {}}, breaker={"failures": 2, "open_s": 30}),
            entry("ant", fakes["ant"], {"o3": {}}),
            entry("brk", fakes["brk"], {"echo": {}}, breaker={"failures": 2, "open_s": 25}),
            entry("brk2", fakes["brk2"], {"echo": {}}, breaker={"failures": 2, "open_s": 25}),
            entry("brk3", fakes["brk3"], {"echo": {}}, breaker={"failures": 2, "open_s": 25}),
            entry("brk4", fakes["brk4"], {"echo": {}}, breaker={"failures": 2, "open_s": 25}),
            entry("spare", fakes["spare"], {"echo": {}}),
            entry("pay", fakes["pay"], {"echo": {"input_per_mtok": 50_000, "output_per_mtok": 50_000}}),
        ],
        "budgets": {"tenants": {"spender": {"daily_usd": 0.01}}}}))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("qa-reasoning-edge")
    fakes = {name: FakeProvider("anthropic" if name == "ant" else "openai").start()
             for name in ("oai", "old", "ant", "brk", "brk2", "brk3", "brk4", "spare", "pay", "edge")}
    try:
        with start_cuttable_site(tmp, SITE) as site:
            hub_adapter = Service("cloud_adapter", {
                "LW_NATS_URL": site.hub.url, "LW_SITE": "hub", "LW_KEEPALIVE_S": "1",
                "LW_PROVIDERS_FILE": str(hub_providers(tmp / "providers.yaml", fakes)),
                "LW_CLOUD_N_RECHECK_S": str(RECHECK_S), "LW_CLOUD_BACKOFF_BASE_S": "0.01",
                "LW_CLOUD_BACKOFF_CAP_S": "0.02", "LW_CLOUD_BUDGET_FLUSH_S": "0.2",
                "LW_CLOUD_STATE_CHECK_S": "1", "LW_CLOUD_HEALTH_INTERVAL_S": "1"})
            env = {"LW_NATS_URL": site.edge.url, "LW_SITE": SITE, "LW_KEEPALIVE_S": "1"}
            router = Service("router", {**env, "LW_ROUTER_UPLINK_PROBE_S": "0.3",
                                        "LW_ROUTER_POLICY_FILE": str(write_policy(tmp / "policy.yaml", POLICY))})
            gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": "key-acme:acme,key-spender:spender",
                                          "LW_GATEWAY_REQUEST_TIMEOUT_S": "20"})
            with running(hub_adapter, router, gateway):
                stack = Stack(site, fakes, router, gateway, tmp)
                eventually(lambda: (r := ask(stack, "oai/gpt", "ready?")).status_code == 200
                           and r.headers.get("x-leafwire-served-by", "").startswith("hub/"), 60,
                           "the hub's adapter to answer the edge")
                yield stack
    finally:
        for fake in fakes.values():
            fake.stop()


@pytest.fixture(autouse=True)
def _fresh(stack: Stack) -> None:
    for fake in stack.fakes.values():
        fake.reset()


def ask(stack: Stack, model: str, text: str, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    return httpx.post(f"{stack.gateway.base}/v1/chat/completions", timeout=30, headers=headers or ACME,
                      json={"model": model, "messages": [{"role": "user", "content": text}], **extra})


def stream(stack: Stack, model: str, text: str, **extra: Any) -> tuple[httpx.Response, list[dict[str, Any]]]:
    chunks: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{stack.gateway.base}/v1/chat/completions", timeout=30, headers=ACME,
                      json={"model": model, "stream": True, "messages": [{"role": "user", "content": text}],
                            **extra}) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return r, chunks


def limits_sent(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in ("max_tokens", "max_completion_tokens") if k in body}


# --- the completion limit's field ----------------------------------------------------------------------------


def test_a_reasoning_model_gets_max_completion_tokens_across_the_edge(stack: Stack) -> None:
    """Chat with ``max_tokens`` and with ``n`` = 2; the limit goes as ``max_completion_tokens``; a model that is
    no reasoning model keeps the caller's field."""
    r = ask(stack, "oai/o3", "think", max_tokens=50)
    assert r.status_code == 200, r.text
    assert r.headers["x-leafwire-served-by"].startswith("hub/")
    assert limits_sent(stack.fakes["oai"].calls[-1].body) == {"max_completion_tokens": 50}
    r = ask(stack, "oai/o3", "think twice", max_tokens=30, n=2)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2
    assert all(limits_sent(c.body) == {"max_completion_tokens": 30} for c in stack.fakes["oai"].calls[1:])
    r = ask(stack, "oai/gpt", "plain", max_tokens=20)
    assert r.status_code == 200, r.text
    assert limits_sent(stack.fakes["oai"].calls[-1].body) == {"max_tokens": 20}


def test_a_text_completion_of_a_reasoning_model_sends_its_limit_as_max_completion_tokens(stack: Stack) -> None:
    """``/v1/completions`` (its default limit 16, as OpenAI's): the limit goes as ``max_completion_tokens``."""
    r = httpx.post(f"{stack.gateway.base}/v1/completions", timeout=30, headers=ACME,
                   json={"model": "oai/o3", "prompt": "once upon a time"})
    assert r.status_code == 200, r.text
    assert limits_sent(stack.fakes["oai"].calls[-1].body) == {"max_completion_tokens": 16}


def test_a_fine_tuned_reasoning_model_gets_max_completion_tokens(stack: Stack) -> None:
    """OpenAI's reinforcement fine-tunes of o4-mini are named ``ft:o4-mini-2025-04-16:<org>:<suffix>:<id>`` and
    refuse ``max_tokens`` as o4-mini does."""
    r = ask(stack, "oai/ft", "tuned", max_tokens=50)
    assert r.status_code == 200, r.text
    assert limits_sent(stack.fakes["oai"].calls[-1].body) == {"max_completion_tokens": 50}


def test_a_model_named_o3_at_an_anthropic_provider_gets_anthropics_max_tokens(stack: Stack) -> None:
    r = ask(stack, "ant/o3", "hello", max_completion_tokens=40)
    assert r.status_code == 200, r.text
    body = stack.fakes["ant"].calls[-1].body
    assert body["max_tokens"] == 40
    assert "max_completion_tokens" not in body


# --- stream_options refused ----------------------------------------------------------------------------------


def test_an_n2_stream_refused_for_stream_options_gets_both_choices_and_usage(stack: Stack) -> None:
    """Both choices are asked again in one call without ``stream_options``; the usage is estimated."""
    fake = stack.fakes["old"]
    fake.script(Fault.error(400, STREAM_OPTIONS_REFUSED))
    r, chunks = stream(stack, "old/m", "two ways", n=2, stream_options={"include_usage": True})
    assert r.status_code == 200, r.text
    assert {c["choices"][0]["index"] for c in chunks if c.get("choices")} == {0, 1}
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    first, second = fake.calls[:2]
    assert first.body["stream_options"] == {"include_usage": True}
    assert "stream_options" not in second.body
    assert second.body.get("n") == 2


def test_stream_options_is_asked_again_after_the_recheck_period(stack: Stack) -> None:
    fake = stack.fakes["old"]
    time.sleep(RECHECK_S + 0.5)  # whatever an earlier test found out is forgotten by now
    for _ in range(3):  # each time found out anew: never a failure for the breaker (failures: 2)
        fake.reset()
        fake.script(Fault.error(400, STREAM_OPTIONS_REFUSED))
        r, chunks = stream(stack, "old/m", "hello", stream_options={"include_usage": True})
        assert r.status_code == 200, r.text
        assert chunks[-1]["usage"]["completion_tokens"] > 0
        assert [("stream_options" in c.body) for c in fake.calls] == [True, False]
        fake.reset()
        r, _ = stream(stack, "old/m", "at once")  # remembered: no refused call first
        assert r.status_code == 200, r.text
        assert [("stream_options" in c.body) for c in fake.calls] == [False]
        time.sleep(RECHECK_S + 0.5)
    fake.reset()
    r, _ = stream(stack, "old/m", "upgraded")  # the server takes it now: asked with it, once
    assert r.status_code == 200, r.text
    assert [("stream_options" in c.body) for c in fake.calls] == [True]


# --- budgets spent at the hub, seen from the edge --------------------------------------------------------------


def test_a_budget_spent_at_the_hub_is_refused_by_the_edge_router(stack: Stack) -> None:
    """The tenant spends its day's budget through the hub's adapter; the edge's router, from its mirror of the
    hub's budgets, refuses the next request itself (429 with Retry-After), and nobody calls the provider."""
    fake = stack.fakes["pay"]
    r = ask(stack, "pay/echo", "spend it all on this one", SPENDER, max_tokens=20)
    assert r.status_code == 200, r.text
    assert len(fake.calls) == 1

    def refused_here() -> httpx.Response | None:  # the router's own words; the hub adapter's differ
        r = ask(stack, "pay/echo", "more", SPENDER)
        return r if r.status_code == 429 and "(pay/echo: budget exhausted)" in r.text else None

    r = eventually(refused_here, 10, "the edge's router to refuse the tenant itself")
    assert r.json()["error"]["code"] == "budget_exceeded"
    assert int(r.headers["Retry-After"]) > 0
    assert len(fake.calls) == 1
    assert ask(stack, "pay/echo", "another tenant").status_code == 200


# --- the hub's breakers, seen from the edge -------------------------------------------------------------------


def trip_brk(stack: Stack, provider: str = "brk") -> None:
    stack.fakes[provider].script(*[Fault.error(500)] * 4)
    failed = ask(stack, f"{provider}/echo", "trip it", max_tokens=4)
    assert failed.status_code in (200, 502), failed.text
    stack.fakes[provider].script()


def routed_by_hub_breaker(stack: Stack, provider: str, within: float) -> httpx.Response:
    """A request for ``<provider>/echo`` that the edge's router sends to spare/echo (its policy's rule for the
    provider's breaker open), the provider not called."""
    calls = len(stack.fakes[provider].calls)
    r = eventually(lambda: r if (r := ask(stack, f"{provider}/echo", "while open")).status_code == 200
                   and "spare/echo" in r.headers.get("x-leafwire-route", "") else None, within,
                   f"the edge to route by the hub's {provider} breaker")
    assert len(stack.fakes[provider].calls) == calls
    return r


async def delete_hub_health_bucket(url: str) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=5)
        await js.delete_key_value(subjects.PROVIDER_HEALTH)
        for _ in range(100):  # the hub's adapter makes it again (LW_CLOUD_STATE_CHECK_S: 1)
            await asyncio.sleep(0.2)
            with contextlib.suppress(NotFoundError):
                await js.stream_info(subjects.kv_stream(subjects.PROVIDER_HEALTH))
                return
        raise AssertionError("the hub's adapter did not make its provider-health bucket again")
    finally:
        await nc.close()


def test_the_hubs_health_bucket_deleted_and_made_again_is_followed_at_the_edge(stack: Stack) -> None:
    """An operator deletes the hub's provider-health bucket (to clear it); the hub's adapter makes it again.
    A breaker that opens at the hub afterwards is known at the edge (its mirror made anew) within the
    router's hub check (LW_ROUTER_CONFIG_HUB_CHECK_S, 10 s) and a few seconds."""
    asyncio.run(delete_hub_health_bucket(stack.site.hub.url))
    time.sleep(2)
    trip_brk(stack, "brk2")
    routed_by_hub_breaker(stack, "brk2", 25)


def test_the_health_mirror_resumes_after_the_link_is_cut_and_restored(stack: Stack) -> None:
    """The uplink cut for 3 s and back: a breaker that opens at the hub afterwards is known at the edge."""
    stack.site.link.cut()
    eventually(lambda: not topology.leafnode_connected(stack.site.edge.node), 10, "the edge to lose its uplink")
    time.sleep(3)
    stack.site.link.restore()
    eventually(lambda: topology.leafnode_connected(stack.site.edge.node), 20, "the uplink to return")
    eventually(lambda: (r := ask(stack, "oai/gpt", "back?")).status_code == 200
               and r.headers.get("x-leafwire-served-by", "").startswith("hub/"), 30, "the cloud again")
    trip_brk(stack, "brk3")
    routed_by_hub_breaker(stack, "brk3", 15)


def test_the_hubs_open_breaker_takes_a_provider_health_rule_at_the_edge(stack: Stack) -> None:
    """The policy routes ``brk/echo`` to ``spare/echo`` while brk is open: with the hub's breaker open, the edge
    (no adapter of its own) applies the rule, and brk is not called."""
    trip_brk(stack)
    calls = len(stack.fakes["brk"].calls)
    r = eventually(lambda: r if (r := ask(stack, "brk/echo", "while open")).status_code == 200
                   and "spare/echo" in r.headers.get("x-leafwire-route", "") else None, 5,
                   "the edge to route by the hub's breaker")
    assert r.headers["x-leafwire-served-by"].startswith("hub/")
    assert len(stack.fakes["brk"].calls) == calls
    assert len(stack.fakes["spare"].calls) >= 1


def test_a_restarted_edge_router_knows_the_hubs_open_breaker_at_once(stack: Stack) -> None:
    """The edge's router restarted while the hub's brk4 breaker is open: its first request, once it is ready,
    already goes by that breaker (the mirror is on the edge's disk)."""
    trip_brk(stack, "brk4")
    routed_by_hub_breaker(stack, "brk4", 5)
    stack.router.stop()
    stack.router.start().wait_ready()
    calls = len(stack.fakes["brk4"].calls)
    r = ask(stack, "brk4/echo", "first after the restart")
    assert r.status_code == 200, r.text
    assert "spare/echo" in r.headers["x-leafwire-route"], r.headers["x-leafwire-route"]
    assert len(stack.fakes["brk4"].calls) == calls


@pytest.fixture(scope="module")
def edge_adapter(stack: Stack) -> Iterator[Service]:
    """A cloud-adapter of the edge's own with only provider ``brk`` (at another, healthy, fake)."""
    path = stack.tmp / "edge-providers.yaml"
    path.write_text(json.dumps({"providers": [entry("brk", stack.fakes["edge"], {"echo": {}})]}))
    adapter = Service("cloud_adapter", {"LW_NATS_URL": stack.site.edge.url, "LW_SITE": SITE, "LW_KEEPALIVE_S": "1",
                                        "LW_PROVIDERS_FILE": str(path)})
    with running(adapter):
        yield adapter


def test_an_edge_with_its_own_adapter_goes_by_its_own_breaker(stack: Stack, edge_adapter: Service) -> None:
    """The hub's brk breaker open (25 s); the edge's own adapter has brk, closed: the edge's requests for it go
    to its own adapter, which answers."""
    trip_brk(stack)
    r = eventually(lambda: r if (r := ask(stack, "brk/echo", "mine", max_tokens=4)).status_code == 200
                   and r.headers.get("x-leafwire-served-by", "").startswith(f"{SITE}/") else None, 15,
                   "the edge's own adapter to answer brk/echo")
    assert r.headers["x-leafwire-route"].startswith("target=brk/echo"), r.headers["x-leafwire-route"]
    assert stack.fakes["edge"].calls


def test_an_edge_adapter_with_other_providers_leaves_the_hubs_to_the_hub(stack: Stack,
                                                                        edge_adapter: Service) -> None:
    """docs/cloud.md: a provider the site's own adapter lacks goes by the hub's adapters. ``oai`` is the hub's
    only: the edge's requests for it must still be answered (by the hub's adapter)."""
    eventually(lambda: edge_adapter.readyz()[0] == 200, 10, "the edge adapter")
    time.sleep(2)  # its heartbeats reach the router
    r = ask(stack, "oai/gpt", "hub only", max_tokens=4)
    assert r.status_code == 200, r.text
    assert r.headers["x-leafwire-served-by"].startswith("hub/")
