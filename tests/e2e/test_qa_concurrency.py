"""QA of the cloud path under concurrency: what a user sending many requests at once would notice.

Its own stack: a nats-server, a hub cloud-adapter, a router and a gateway of site ``plant``, and four
fakes of tests/fakes.py (a subclass that also counts the calls it is answering at once, can hold every call a
moment, and can number its answers): ``wide`` (max_concurrent 300, priced), ``narrow`` (max_concurrent 3),
``brk`` (a breaker of 3 failures, open 3 s, two probes), ``cached`` (each answer numbered, so that an answer
tells which call made it) and ``rated`` (rpm 5, on narrow's fake). The adapter writes budgets every 0.05 s.
Checked:

- 200 requests at once, whole answers and streams, each with its own prompt: each caller gets its own answer,
  each stream ends with ``[DONE]``, the provider gets each prompt exactly once, the USAGE stream has exactly
  one event per request, and the tenant's spending in the ``budgets`` bucket (and ``leafwire budgets``) is the
  sum of its events' costs: no charge lost between concurrent requests;
- three tenants at once: the global spending written is the sum of every usage event's cost;
- a budget limit reached by concurrent requests: those already in flight are answered (as documented), the
  spending written is exactly their cost, each level crossed is alerted once, and every later request is
  refused without reaching the provider;
- two adapters writing one tenant's spending at once (compare-and-set on the same entries): none lost;
- ``max_concurrent``: the provider never sees more calls at once than that; the others are refused at once
  with 429 ``overloaded`` (never queued, never sent), and the in-flight gauge goes back to 0; ``rpm`` lets
  exactly its calls through when asked at once;
- the exact cache with concurrent identical temperature-0 requests of two tenants: every ``miss`` is one
  provider call and every ``hit`` none (no single flight is promised), every caller gets a complete answer,
  and each tenant's entry is an answer that tenant got, never the other tenant's;
- callers hanging up mid-stream while others read on: the others get their whole answer, each abandoned
  call's provider connection is closed, one usage event per request, the gauge back to 0; the same for
  whole answers given up before the provider answered;
- the breaker under concurrent failures: it opens once (one transition), not once per failed call; half
  open, it lets through exactly its ``probes`` (2) of ten concurrent requests, and their success closes it once.

One finding, fixed since: ``max_concurrent`` refusals were counted in ``leafwire_rejected_requests_total`` as
``reason="provider_busy"``, not by the code callers get (``overloaded``) as docs/cloud.md says.
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
import pytest
from aiohttp import web

from tests.fakes import FakeProvider, Fault, Received
from tests.support import (
    NatsServer,
    Service,
    cloud_router_env,
    eventually,
    kv_json,
    leafwire,
    metric,
    running,
    usage_events,
)

pytestmark = pytest.mark.e2e
SITE = "plant"
KEY = "sk-qa13-conc-5e6f7a8b9c0d1e2f"
PRICED = {"input_per_mtok": 1000, "output_per_mtok": 1000}  # "qa13 <tag>": 2 + 3 tokens = $0.005
COST = 0.005
CAPPED_LIMIT = 0.05  # ten requests' worth
TIMEOUTS = {"connect_s": 2, "first_byte_s": 6, "total_s": 20}
API_KEYS = "key-quit:quit,key-duo:duo,key-bulk:bulk,key-capped:capped,key-one:one,key-two:two,key-acme:acme"


class CountingFake(FakeProvider):
    """A fake that counts the calls it is answering at once (``peak``), holds each call ``hold_s`` before
    answering, and, when ``numbered``, answers ``answer <k>`` for its k-th unscripted call."""

    def __init__(self, kind: str = "openai", key: str | None = None, numbered: bool = False) -> None:
        super().__init__(kind, key)
        self.hold_s = 0.0
        self.numbered = numbered
        self.now = 0
        self.peak = 0
        self.answered = 0
        self.abandoned = 0  # calls whose connection the client closed before the answer was written

    def reset(self) -> None:
        super().reset()
        self.hold_s, self.now, self.peak, self.abandoned = 0.0, 0, 0, 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:  # all on the fake's one loop
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            if self.hold_s:
                try:
                    await asyncio.sleep(self.hold_s)
                except asyncio.CancelledError:
                    self.abandoned += 1
                    raise
            return await super()._handle(request)
        finally:
            self.now -= 1

    def _next(self) -> Fault:
        fault = super()._next()
        if self.numbered and fault.kind == "ok" and fault.text is None:
            self.answered += 1
            return Fault.ok(text=f"answer {self.answered}")
        return fault


@dataclass
class Conc:
    nats: NatsServer
    adapter: Service
    gateway: Service
    wide: CountingFake
    narrow: CountingFake
    brk: CountingFake
    cached: CountingFake

    @property
    def url(self) -> str:
        return f"{self.gateway.base}/v1/chat/completions"

    def another_adapter(self) -> Service:
        """A second hub cloud-adapter like the first (not started)."""
        return Service("cloud_adapter", dict(self.adapter.env))

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.adapter.metrics(), name, **labels)


def write_providers(path: Path, conc: dict[str, CountingFake]) -> None:
    def entry(name: str, fake: str | None = None, **more: Any) -> dict[str, Any]:
        return {"name": name, "kind": "openai-compatible", "base_url": conc[fake or name].url, "local": True,
                "api_key_env": "LW_QA13_KEY", "timeouts": TIMEOUTS, "models": {"echo": PRICED}, **more}
    path.write_text(json.dumps({
        "providers": [entry("wide", max_concurrent=300), entry("narrow", max_concurrent=3),
                      entry("brk", breaker={"failures": 3, "open_s": 3, "probes": 2}), entry("cached"),
                      entry("rated", "narrow", rpm=5)],
        "budgets": {"tenants": {"capped": {"daily_usd": CAPPED_LIMIT}}}}))


@pytest.fixture(scope="module")
def conc(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Conc]:
    tmp = tmp_path_factory.mktemp("qa-concurrency")
    fakes = {"wide": CountingFake(key=KEY), "narrow": CountingFake(key=KEY), "brk": CountingFake(key=KEY),
             "cached": CountingFake(key=KEY, numbered=True)}
    started: list[CountingFake] = []
    try:
        for fake in fakes.values():
            started.append(fake.start())
        file = tmp / "providers.yaml"
        write_providers(file, fakes)
        env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE}
        adapter = Service("cloud_adapter", {
            "LW_NATS_URL": nats_server.url, "LW_SITE": "hub", "LW_PROVIDERS_FILE": str(file), "LW_QA13_KEY": KEY,
            "LW_CLOUD_BACKOFF_BASE_S": "0.01", "LW_CLOUD_BACKOFF_CAP_S": "0.02", "LW_CLOUD_BREAKER_FAILURES": "1000",
            "LW_CLOUD_HEALTH_INTERVAL_S": "1", "LW_KEEPALIVE_S": "1", "LW_CLOUD_BUDGET_FLUSH_S": "0.05"})
        router = Service("router", {**env, **cloud_router_env(tmp), "LW_KEEPALIVE_S": "1"})
        gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": API_KEYS, "LW_KEEPALIVE_S": "1"})
        with running(adapter, router, gateway):
            stack = Conc(nats_server, adapter, gateway, **fakes)
            eventually(lambda: httpx.post(stack.url, timeout=20, headers={"Authorization": "Bearer key-acme"},
                                          json={"model": "wide/echo", "messages": [{"role": "user", "content": "up"}]}
                                          ).status_code == 200, 30, "the stack to answer")
            yield stack
    finally:
        for fake in started:
            fake.stop()


@pytest.fixture(autouse=True)
def _fresh(conc: Conc) -> None:
    for fake in (conc.wide, conc.narrow, conc.brk, conc.cached):
        fake.reset()


# -- helpers


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    content: str | None  # the whole answer's, or the stream's text put together
    body: dict[str, Any] | None  # a whole answer's (or an error's) JSON
    done: bool  # a stream ended with data: [DONE]
    errors: list[dict[str, Any]]  # error events in a stream


async def ask(client: httpx.AsyncClient, url: str, key: str, body: dict[str, Any], hang_up_after: int = 0) -> Reply:
    """One request; a stream is read to its end (or, with ``hang_up_after``, closed after that many chunks)."""
    headers = {"Authorization": f"Bearer {key}"}
    if not body.get("stream"):
        r = await client.post(url, json=body, headers=headers)
        data = r.json()
        content = data["choices"][0]["message"]["content"] if r.status_code == 200 else None
        return Reply(r.status_code, r.headers, content, data, False, [])
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return Reply(r.status_code, r.headers, None, json.loads(r.text), False, [])
        text, done, errors, chunks = [], False, [], 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event["error"])
                continue
            chunks += 1
            for choice in event.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
            if hang_up_after and chunks >= hang_up_after:
                break
        return Reply(200, r.headers, "".join(text), None, done, errors)


async def at_once(conc: Conc, asks: list[tuple[str, dict[str, Any], int]], give_up_s: float = 0) -> list[Reply | None]:
    """Every ``(key, body, hang_up_after)`` sent at once; with ``give_up_s``, a whole answer asked with
    ``hang_up_after`` set is given up (its connection closed) after that long: ``None``."""
    limits = httpx.Limits(max_connections=len(asks) + 10, max_keepalive_connections=0)

    async def one(client: httpx.AsyncClient, key: str, body: dict[str, Any], hang: int) -> Reply | None:
        if give_up_s and hang and not body.get("stream"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ask(client, conc.url, key, body), give_up_s)
            return None
        return await ask(client, conc.url, key, body, hang)

    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, key, body, hang) for key, body, hang in asks)))


def all_at_once(conc: Conc, asks: list[tuple[str, dict[str, Any], int]]) -> list[Reply]:
    """``at_once``, none given up."""
    replies = asyncio.run(at_once(conc, asks))
    return [r for r in replies if r is not None]


def chat(model: str, text: str, **more: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **more}


def events_of(conc: Conc, ids: set[str], within_s: float = 15) -> list[dict[str, Any]]:
    """The USAGE stream's events of these request ids, once there is one for each (all of them, duplicates too)."""
    def found() -> list[dict[str, Any]] | None:
        events = [e for _, e in asyncio.run(usage_events(conc.nats.url)) if e.get("request_id") in ids]
        return events if {e["request_id"] for e in events} >= ids else None
    eventually(found, within_s, f"usage events of {len(ids)} requests")
    time.sleep(0.3)  # a duplicate would come in the same or the next batch (50 ms)
    return [e for _, e in asyncio.run(usage_events(conc.nats.url)) if e.get("request_id") in ids]


def spent(conc: Conc, scope: str) -> float | None:
    entry = kv_json(conc.nats.url, "budgets", f"{scope}.daily.hub")
    return entry["spent_usd"] if entry else None


def prompts(calls: list[Received]) -> list[str]:
    return [c.body["messages"][-1]["content"] for c in calls]


def transitions(conc: Conc, state: str) -> float:
    return conc.metric("leafwire_cloud_breaker_transitions_total", provider="brk", state=state)


# -- many at once


def test_two_hundred_requests_at_once_each_get_their_own_answer_once(conc: Conc) -> None:
    """200 requests of tenant bulk at once, every other one streamed, each with its own prompt: each caller gets
    ``pong <its prompt>``, each stream its [DONE] and no error event; the provider got each prompt exactly once;
    the USAGE stream has one event per request, and bulk's spending (bucket, ``leafwire budgets``) is their sum."""
    texts = [f"qa13 bulk{i:03d}" for i in range(200)]
    replies = all_at_once(conc, [("key-bulk", chat("wide/echo", t, stream=i % 2 == 0), 0)
                                         for i, t in enumerate(texts)])
    assert [r.status for r in replies] == [200] * 200
    assert [r.content for r in replies] == [f"pong {t}" for t in texts]
    assert all(r.done and not r.errors for i, r in enumerate(replies) if i % 2 == 0)
    assert sorted(prompts(conc.wide.calls)) == sorted(texts)  # none lost, none duplicated
    ids = {r.headers["x-request-id"] for r in replies}
    assert len(ids) == 200
    events = events_of(conc, ids)
    assert sorted(e["request_id"] for e in events) == sorted(ids)  # exactly one each
    assert all(e["outcome"] == "ok" and e["tenant"] == "bulk" and e["target"] == "wide/echo" for e in events)
    assert sum(e["cost_usd"] for e in events) == pytest.approx(200 * COST)
    all_bulk = sum(e["cost_usd"] for _, e in asyncio.run(usage_events(conc.nats.url)) if e.get("tenant") == "bulk")
    eventually(lambda: spent(conc, "tenant-bulk") == pytest.approx(all_bulk), 10, "bulk's spending written")
    shown = leafwire("budgets", "--nats", conc.nats.url, "--tenant", "bulk", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {(row["scope"], row["period"]): row for row in json.loads(shown.stdout)}
    assert rows[("tenant-bulk", "daily")]["spent_usd"] == pytest.approx(all_bulk)
    assert rows[("tenant-bulk", "monthly")]["spent_usd"] == pytest.approx(all_bulk)


def test_the_global_budget_adds_up_every_tenants_concurrent_spending(conc: Conc) -> None:
    """Three tenants' requests at once: the global daily spending written equals the sum of every usage event's
    cost on the site (none charged twice or lost between scopes)."""
    asks = [(key, chat("wide/echo", f"qa13 g{key[-3:]}{i}", stream=i % 3 == 0), 0)
            for i in range(30) for key in ("key-one", "key-two", "key-acme")]
    replies = all_at_once(conc, asks)
    assert {r.status for r in replies} == {200}
    events_of(conc, {r.headers["x-request-id"] for r in replies})

    def adds_up() -> bool:
        total = sum(e.get("cost_usd", 0) for s, e in asyncio.run(usage_events(conc.nats.url)) if s.endswith(".events"))
        return spent(conc, "global") == pytest.approx(total)
    eventually(adds_up, 10, "global spending to equal the sum of the usage events")


def test_concurrent_requests_over_a_budget_are_answered_then_the_tenant_is_refused(conc: Conc) -> None:
    """capped may spend $0.05 a day (ten requests). Thirty at once, each held 1 s by the provider: all are admitted
    before any is paid for, so all are answered (the documented overrun: what is in flight); the spending written is
    exactly their cost, and ten more at once are then refused with 429 without reaching the provider or the USAGE
    stream."""
    conc.wide.hold_s = 1.0
    replies = all_at_once(conc, [("key-capped", chat("wide/echo", f"qa13 cap{i}", stream=i % 2 == 0), 0)
                                         for i in range(30)])
    assert [r.status for r in replies] == [200] * 30
    assert len(conc.wide.calls) == 30
    events = events_of(conc, {r.headers["x-request-id"] for r in replies})
    assert len(events) == 30
    assert sum(e["cost_usd"] for e in events) == pytest.approx(30 * COST)
    eventually(lambda: spent(conc, "tenant-capped") == pytest.approx(30 * COST), 10, "capped's spending written")
    alerts = [e for s, e in asyncio.run(usage_events(conc.nats.url))
              if s.endswith(".usage.budget") and e.get("scope") == "tenant-capped" and e.get("period") == "daily"]
    assert sorted(e["state"] for e in alerts) == ["exhausted", "warning"]  # each crossing reported once
    conc.wide.reset()
    later = all_at_once(conc, [("key-capped", chat("wide/echo", f"qa13 late{i}"), 0) for i in range(10)])
    assert [r.status for r in later] == [429] * 10
    assert all(r.body and r.body["error"]["code"] == "budget_exceeded" for r in later)
    assert conc.wide.calls == []
    time.sleep(0.5)
    ids = {r.headers.get("x-request-id") for r in later}
    assert not [e for _, e in asyncio.run(usage_events(conc.nats.url)) if e.get("request_id") in ids]


# -- max_concurrent


def test_max_concurrent_is_never_exceeded_and_the_rest_are_refused_at_once(conc: Conc) -> None:
    """narrow has max_concurrent 3: twenty requests at once, each call held 2 s. The provider never answers more
    than 3 at once; every request it did not get is a 429 ``overloaded`` with Retry-After (not queued, not sent
    later); the in-flight gauge is back to 0 and the next request is answered."""
    conc.narrow.hold_s = 2.0
    replies = all_at_once(conc, [("key-acme", chat("narrow/echo", f"qa13 nar{i}", stream=i % 2 == 0), 0)
                                         for i in range(20)])
    assert conc.narrow.peak <= 3
    ok = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status != 200]
    assert len(ok) == len(conc.narrow.calls) <= 20
    assert refused, "twenty at once against max_concurrent 3 refused none"
    for r in refused:
        assert r.status == 429
        assert r.body
        assert r.body["error"]["code"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1
    assert sorted(prompts(conc.narrow.calls)) == sorted(r.content.removeprefix("pong ") for r in ok if r.content)
    eventually(lambda: conc.metric("leafwire_cloud_inflight_requests", provider="narrow") == 0, 10,
               "narrow's in-flight gauge back to 0")
    conc.narrow.hold_s = 0
    assert all_at_once(conc, [("key-acme", chat("narrow/echo", "qa13 after"), 0)])[0].status == 200


# -- the cache


def test_concurrent_identical_cached_requests_of_two_tenants_never_mix(conc: Conc) -> None:
    """Tenants one and two each send the same temperature-0 request ten times at once (both bursts together). The
    fake numbers its answers, so an answer tells which call made it. Every caller gets a whole answer; each ``miss``
    is one provider call and each ``hit`` none; no answer reached both tenants; and afterwards each tenant's cached
    answer is one that tenant got, not the other's."""
    body = chat("cached/echo", "qa13 same question", temperature=0)
    asks = [(key, {**body, "stream": i % 2 == 0}, 0) for i in range(10) for key in ("key-one", "key-two")]
    replies = all_at_once(conc, asks)
    assert {r.status for r in replies} == {200}
    assert all(r.content and r.content.startswith("answer ") for r in replies)
    marks = [r.headers["x-leafwire-cache"] for r in replies]
    assert set(marks) <= {"hit", "miss"}
    assert marks.count("miss") == len(conc.cached.calls)
    got = {key: {r.content for (k, _, _), r in zip(asks, replies, strict=True) if k == key}
           for key in ("key-one", "key-two")}
    assert not got["key-one"] & got["key-two"]
    time.sleep(0.5)  # the entries are written in the background
    calls = len(conc.cached.calls)
    after = all_at_once(conc, [("key-one", body, 0), ("key-two", body, 0)])
    assert [r.headers["x-leafwire-cache"] for r in after] == ["hit", "hit"]
    assert len(conc.cached.calls) == calls
    assert after[0].content in got["key-one"]
    assert after[1].content in got["key-two"]


# -- hanging up


def test_callers_hanging_up_mid_stream_leave_the_others_whole(conc: Conc) -> None:
    """Twenty slow streams at once (a word every 0.15 s); every other caller hangs up after two chunks. The others
    get their whole answer and [DONE]; each abandoned call's provider connection is closed; the USAGE stream has one
    event per request (ten ok, ten cancelled); the in-flight gauge is back to 0."""
    words = " ".join(f"w{j}" for j in range(12))
    conc.wide.script(*[Fault.drip(0.15, text=words)] * 20)
    replies = all_at_once(conc, [("key-acme", chat("wide/echo", f"qa13 hang{i}", stream=True),
                                          2 if i % 2 else 0) for i in range(20)])
    assert {r.status for r in replies} == {200}
    for r in replies[0::2]:
        assert r.content == words
        assert r.done
        assert not r.errors
    assert len(conc.wide.calls) == 20
    eventually(lambda: conc.wide.disconnects == 10, 10, "the ten abandoned calls' connections closed")
    events = events_of(conc, {r.headers["x-request-id"] for r in replies})
    outcome = {e["request_id"]: e["outcome"] for e in events}
    assert len(events) == 20
    assert sorted(outcome[r.headers["x-request-id"]] for r in replies[0::2]) == ["ok"] * 10
    assert sorted(outcome[r.headers["x-request-id"]] for r in replies[1::2]) == ["cancelled"] * 10
    eventually(lambda: conc.metric("leafwire_cloud_inflight_requests", provider="wide") == 0, 10,
               "wide's in-flight gauge back to 0")


# -- the breaker


def test_concurrent_failures_open_the_breaker_once_and_half_open_lets_its_probes_through(conc: Conc) -> None:
    """brk (3 failures, open 3 s, 2 probes): thirty requests at once, each call held 0.5 s and failing with 500:
    every caller gets a 502 or 503 and the breaker opens once (one transition to open), not once per failed call.
    Once half open, ten requests at once: exactly two reach the provider, the other eight are 503
    provider_unavailable; the probes' success closes the breaker once."""
    opened, half, closed = transitions(conc, "open"), transitions(conc, "half_open"), transitions(conc, "closed")
    conc.brk.hold_s = 0.5
    conc.brk.script(*[Fault.error(500)] * 200)
    replies = all_at_once(conc, [("key-acme", chat("brk/echo", f"qa13 brk{i}", stream=i % 2 == 0), 0)
                                         for i in range(30)])
    assert {r.status for r in replies} <= {502, 503}
    assert conc.metric("leafwire_cloud_breaker_state", provider="brk") == 2
    assert transitions(conc, "open") == opened + 1
    eventually(lambda: (kv_json(conc.nats.url, "provider-health", "brk") or {}).get("state") == "half_open", 15,
               "brk's breaker to half-open")
    time.sleep(0.3)
    conc.brk.reset()
    conc.brk.hold_s = 1.5
    probes = all_at_once(conc, [("key-acme", chat("brk/echo", f"qa13 probe{i}", stream=i % 2 == 0), 0)
                                        for i in range(10)])
    assert sorted(r.status for r in probes) == [200] * 2 + [503] * 8
    assert len(conc.brk.calls) == 2
    for r in probes:
        if r.status == 503:
            assert r.body
            assert r.body["error"]["code"] == "provider_unavailable"
        else:
            assert r.content
            assert r.content.startswith("pong qa13 probe")
    eventually(lambda: conc.metric("leafwire_cloud_breaker_state", provider="brk") == 0, 10, "brk closed")
    assert transitions(conc, "half_open") == half + 1
    assert transitions(conc, "closed") == closed + 1
    assert transitions(conc, "open") == opened + 1


def test_two_adapters_writing_one_tenants_spending_at_once_lose_none(conc: Conc) -> None:
    """A second adapter joins the first (each writes its pending spending every 0.05 s with a compare-and-set on
    the same ``budgets`` entries): 160 requests of tenant duo in waves, served by both. The entry's spending is
    the sum of duo's usage events, $0.005 each: no write lost between the two adapters."""
    with running(conc.another_adapter()):
        served: set[str] = set()
        ids: set[str] = set()
        for wave in range(4):
            replies = all_at_once(conc, [("key-duo", chat("wide/echo", f"qa13 duo{wave}x{i}",
                                                                  stream=i % 2 == 0), 0) for i in range(40)])
            assert [r.status for r in replies] == [200] * 40
            served |= {r.headers["x-leafwire-served-by"] for r in replies}
            ids |= {r.headers["x-request-id"] for r in replies}
            time.sleep(0.1)
        assert len(served) == 2, served
        events = events_of(conc, ids)
        assert len(events) == 160
        assert sum(e["cost_usd"] for e in events) == pytest.approx(160 * COST)
        eventually(lambda: spent(conc, "tenant-duo") == pytest.approx(160 * COST), 10, "duo's spending written")
        time.sleep(0.5)  # nothing more is added later
        assert spent(conc, "tenant-duo") == pytest.approx(160 * COST)


def test_whole_answers_given_up_on_at_once_stop_their_calls_and_leave_the_others(conc: Conc) -> None:
    """Twenty whole answers at once, each call held 2 s by the provider; ten callers give up after 0.8 s (closing
    their connection). The other ten get their own answer; the provider sees each of the ten abandoned calls'
    connection closed before it answered; one usage event per request (ten ok, ten cancelled); the in-flight gauge
    back to 0."""
    conc.wide.hold_s = 2.0
    asks = [("key-quit", chat("wide/echo", f"qa13 quit{i}"), i % 2) for i in range(20)]
    replies = asyncio.run(at_once(conc, asks, give_up_s=0.8))
    kept = [r for r in replies[0::2] if r is not None]
    assert [r.status for r in kept] == [200] * 10
    assert [r.content for r in kept] == [f"pong qa13 quit{i}" for i in range(0, 20, 2)]
    assert all(r is None for r in replies[1::2])
    eventually(lambda: conc.wide.abandoned == 10, 10, "the ten given-up calls' connections closed")
    assert len(conc.wide.calls) == 10  # only the kept ones were answered (the fake records a call as it answers)
    eventually(lambda: conc.metric("leafwire_cloud_inflight_requests", provider="wide") == 0, 10,
               "wide's in-flight gauge back to 0")
    def twenty() -> list[dict[str, Any]] | None:
        found = [e for _, e in asyncio.run(usage_events(conc.nats.url)) if e.get("tenant") == "quit"]
        return found if len(found) >= 20 else None
    events = eventually(twenty, 15, "twenty usage events")
    time.sleep(0.3)  # no more come
    events = [e for _, e in asyncio.run(usage_events(conc.nats.url)) if e.get("tenant") == "quit"]
    assert sorted(e["outcome"] for e in events) == ["cancelled"] * 10 + ["ok"] * 10


def test_rpm_lets_exactly_its_calls_through_when_asked_at_once(conc: Conc) -> None:
    """rated has rpm 5: twelve requests at once (each call held 0.5 s) give exactly five answers and seven 429
    ``provider_rate_limit`` with Retry-After; the provider got five calls."""
    conc.narrow.hold_s = 0.5
    replies = all_at_once(conc, [("key-acme", chat("rated/echo", f"qa13 rpm{i}", stream=i % 2 == 0), 0)
                                 for i in range(12)])
    assert sorted(r.status for r in replies) == [200] * 5 + [429] * 7
    for r in replies:
        if r.status == 429:
            assert r.body
            assert r.body["error"]["code"] == "provider_rate_limit"
            assert int(r.headers["retry-after"]) >= 1
    assert len(conc.narrow.calls) == 5


def test_max_concurrent_refusals_are_counted_by_the_code_callers_get(conc: Conc) -> None:
    """docs/cloud.md: a call ``max_concurrent`` refused "counts in leafwire_rejected_requests_total
    {service="cloud-adapter"} by its code". Callers get 429 ``overloaded``: the counter of that code must grow by
    exactly the number of such refusals (as ``provider_rate_limit`` and ``provider_unavailable`` do)."""
    def rejected() -> float:
        return conc.metric("leafwire_rejected_requests_total", service="cloud-adapter", reason="overloaded")
    before = rejected()
    conc.narrow.hold_s = 1.5
    replies = all_at_once(conc, [("key-acme", chat("narrow/echo", f"qa13 cnt{i}"), 0) for i in range(10)])
    refused = [r for r in replies if r.status == 429]
    assert refused
    assert all(r.body and r.body["error"]["code"] == "overloaded" for r in refused)
    assert rejected() - before == len(refused)
