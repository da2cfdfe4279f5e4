"""QA of the cloud adapter's resilience end to end: retries, timeouts, the circuit breaker and what a caller
using the official ``openai`` client (or plain HTTP) notices of them.

Its own stack: gateway and router of site ``plant`` and a hub cloud-adapter (as tests/e2e/test_cloud.py's),
with four OpenAI-compatible fakes, so that which provider was called is plain: ``fake`` (A), ``flaky`` (B,
a breaker of 3 failures, open 4 s, one probe), ``busy`` (C, ``max_concurrent: 1``) and ``rated`` (D, a breaker
opening on its error rate), ``long`` (A again: total_s 1.5 s, a breaker of 2 failures), and an Anthropic fake
``claude``. ``flaky/spare`` and ``busy/spare`` are routed ``[requested, fake/echo]``. QA found three bugs,
fixed since (long answers cut by the adapter's own total_s opened the breaker; a refusal the adapter does not
retry, and a failure it already retried, were retried again by the openai client); the others check behaviour
no other test covers.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate
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
KEY = "sk-qa-resilience-1a2b3c4d5e"
CLAUDE_KEY = "sk-ant-qa-resilience-6f7a8b"
HEADERS = {"Authorization": "Bearer key-acme"}
OPEN_S = 4
POLICY = """
last_resort: none
rules:
  - {name: spare, when: {model: [flaky/spare, busy/spare]}, route: [requested, fake/echo]}
  - {name: default, route: [requested]}
"""


class StallingFake(FakeProvider):
    """A fake that also knows ``Fault("stall", delay_s=...)``: a stream's headers at once, then nothing for
    ``delay_s`` before its first event (a provider that accepted the call and hangs)."""

    async def _write_events(self, request: web.Request, resp: web.StreamResponse, events: list[bytes],
                            fault: Fault) -> None:
        if fault.kind == "stall":
            await asyncio.sleep(fault.delay_s)
        await super()._write_events(request, resp, events, fault)


@dataclass
class QA:
    nats: NatsServer
    gateway: Service
    router: Service
    adapter: Service
    a: StallingFake  # provider fake
    b: StallingFake  # provider flaky
    c: StallingFake  # provider busy
    d: StallingFake  # provider rated
    claude: StallingFake

    def client(self, max_retries: int = 0, timeout: float = 30) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key="key-acme", max_retries=max_retries,
                             timeout=timeout)

    def post(self, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
        return httpx.post(f"{self.gateway.base}/v1/chat/completions", json=body, headers=HEADERS, timeout=timeout)


def providers(path: Path, a: FakeProvider, b: FakeProvider, c: FakeProvider, d: FakeProvider,
              claude: FakeProvider) -> Path:
    def entry(name: str, fake: FakeProvider, key_var: str, models: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"name": name, "kind": "openai-compatible" if fake.kind == "openai" else "anthropic",
                "base_url": fake.url, "local": True, "api_key_env": key_var, "models": models,
                "timeouts": {"connect_s": 2, "first_byte_s": 2, "total_s": 10}, **more}
    priced = {"input_per_mtok": 1, "output_per_mtok": 2}
    path.write_text(json.dumps({"providers": [
        entry("fake", a, "LW_QA_KEY", {"echo": priced}),
        entry("flaky", b, "LW_QA_KEY", {"echo": {}, "spare": {"upstream": "echo"}},
              breaker={"failures": 3, "open_s": OPEN_S, "probes": 1}),
        entry("busy", c, "LW_QA_KEY", {"echo": {}, "spare": {"upstream": "echo"}}, max_concurrent=1),
        entry("long", a, "LW_QA_KEY", {"echo": {"upstream": "long-1"}},
              timeouts={"connect_s": 2, "first_byte_s": 1, "total_s": 1.5}, breaker={"failures": 2, "open_s": 30}),
        entry("rated", d, "LW_QA_KEY", {"echo": {}},
              breaker={"failures": 100, "min_calls": 6, "error_rate": 0.5, "open_s": 30}),
        entry("claude", claude, "LW_QA_CLAUDE_KEY", {"haiku": {"upstream": "claude-haiku-x", "max_tokens": 64,
                                                               **priced}}),
    ]}))
    return path


@pytest.fixture(scope="module")
def qa(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QA]:
    tmp = tmp_path_factory.mktemp("qa-resilience")
    a, b, c, d = (StallingFake("openai", key=KEY) for _ in range(4))
    claude = StallingFake("anthropic", key=CLAUDE_KEY)
    fakes = (a, b, c, d, claude)
    for fake in fakes:
        fake.start()
    file = providers(tmp / "providers.yaml", a, b, c, d, claude)
    keepalive = {"LW_KEEPALIVE_S": "0.3"}
    adapter = Service("cloud_adapter", {
        "LW_NATS_URL": nats_server.url, "LW_SITE": "hub", "LW_PROVIDERS_FILE": str(file), "LW_QA_KEY": KEY,
        "LW_QA_CLAUDE_KEY": CLAUDE_KEY, "LW_CLOUD_BACKOFF_BASE_S": "0.01", "LW_CLOUD_BACKOFF_CAP_S": "0.05",
        "LW_CLOUD_BREAKER_FAILURES": "1000", "LW_CLOUD_HEALTH_INTERVAL_S": "1", **keepalive})
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE}
    router = Service("router", {**env, "LW_ROUTER_UPLINK": "up", **keepalive,
                                "LW_ROUTER_POLICY_FILE": str(write_policy(tmp / "policy.yaml", POLICY))})
    gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": "key-acme:acme", "LW_GATEWAY_IDLE_TIMEOUT_S": "1.5"})
    try:
        with running(adapter, router, gateway):
            yield QA(nats_server, gateway, router, adapter, a, b, c, d, claude)
    finally:
        for fake in fakes:
            fake.stop()


@pytest.fixture(autouse=True)
def _fresh(qa: QA) -> None:
    for fake in (qa.a, qa.b, qa.c, qa.d, qa.claude):
        fake.reset()


def ask(content: str | None = None) -> Any:
    """A message no other test sends (the cache outlives a test)."""
    return [{"role": "user", "content": content or f"qa {uuid.uuid4().hex[:8]}"}]


def streamed_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def kv(qa: QA, bucket: str, key: str) -> Any:
    return support.kv_json(qa.nats.url, bucket, key)


def usage_event(qa: QA, request_id: str) -> Any:
    return support.usage_event(qa.nats.url, request_id)


def breaker(qa: QA, provider: str) -> float:
    return metric(qa.adapter.metrics(), "leafwire_cloud_breaker_state", provider=provider)


# -- retries: what the provider asks for


def test_a_retry_after_given_as_an_http_date_is_honoured(qa: QA) -> None:
    """``Retry-After: <HTTP date 3 s ahead>`` on a 429: the adapter waits until then and the caller gets the answer."""
    qa.a.script(Fault.error(429, Retry_After=formatdate(time.time() + 3, usegmt=True)))
    r = qa.client().chat.completions.create(model="fake/echo", messages=ask("dated"))
    assert r.choices[0].message.content == "pong dated"
    first, second = qa.a.calls
    assert 1.0 <= second.at - first.at < 6


def test_an_exhausted_openai_reset_header_is_honoured_not_the_other(qa: QA) -> None:
    """OpenAI's 429 with requests exhausted (reset ``1s``) and tokens left (reset ``1m30s``): about a second is
    waited (the exhausted limit's reset), not the 90 s of the limit that was not hit."""
    qa.a.script(Fault.error(429, **{"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s",
                                    "x-ratelimit-remaining-tokens": "9000", "x-ratelimit-reset-tokens": "1m30s"}))
    r = qa.client().chat.completions.create(model="fake/echo", messages=ask("reset"))
    assert r.choices[0].message.content == "pong reset"
    first, second = qa.a.calls
    assert 0.9 <= second.at - first.at < 5


def test_a_retry_after_over_the_longest_wait_fails_at_once_and_falls_back(qa: QA) -> None:
    """A 429 asking for 120 s (over LW_CLOUD_MAX_RETRY_WAIT_S): no wait, no second call; a lone model's caller
    gets 429 upstream_rate_limited with Retry-After 120, a routed one the next target's answer."""
    qa.c.script(Fault.error(429, Retry_After="120"))
    started = time.monotonic()
    r = qa.post({"model": "busy/echo", "messages": ask()})
    assert time.monotonic() - started < 5
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "upstream_rate_limited"
    assert r.headers["retry-after"] == "120"
    assert len(qa.c.calls) == 1
    qa.c.script(Fault.error(429, Retry_After="120"))
    routed = qa.post({"model": "busy/spare", "messages": ask("routed")})
    assert routed.status_code == 200
    assert routed.json()["choices"][0]["message"]["content"] == "pong routed"
    assert len(qa.c.calls) == 2
    assert len(qa.a.calls) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_529_overloaded_is_retried(qa: QA, stream: bool) -> None:
    """Anthropic's 529 overloaded_error before the answer is retried; the caller gets the answer."""
    qa.claude.script(Fault.error(529))
    text: str | None
    if stream:
        text = streamed_text(list(qa.client().chat.completions.create(model="claude/haiku", messages=ask("busy"),
                                                                     stream=True)))
    else:
        whole = qa.client().chat.completions.create(model="claude/haiku", messages=ask("busy"))
        text = whole.choices[0].message.content
    assert text == "pong busy"
    assert len(qa.claude.calls) == 2


@pytest.mark.parametrize("model", ["fake/echo", "claude/haiku"])
def test_an_error_as_the_first_stream_event_is_retried(qa: QA, model: str) -> None:
    """A 200 stream whose first event is an error (Anthropic's overloaded_error): nothing reached the caller,
    so it is retried, and the caller gets the whole answer."""
    fake = qa.claude if model.startswith("claude") else qa.a
    fake.script(Fault.stream_error(after=0))
    chunks = list(qa.client().chat.completions.create(model=model, messages=ask("again"), stream=True))
    assert streamed_text(chunks) == "pong again"
    assert len(fake.calls) == 2


# -- after the first byte


@pytest.mark.parametrize(("model", "after"), [("fake/echo", 3), ("claude/haiku", 5)])
def test_a_cut_stream_raises_is_billed_and_leaves_no_cache_entry(qa: QA, model: str, after: int) -> None:
    """A cacheable stream cut after its first words: the openai client raises, the usage event records what the
    provider was paid for (an error, tokens and cost above 0), and the same request again is a cache miss that
    calls the provider (no partial answer was stored)."""
    fake = qa.claude if model.startswith("claude") else qa.a
    fake.script(Fault.cut(after=after))  # after the first word
    messages = ask()
    raw = qa.client().chat.completions.with_raw_response.create(model=model, messages=messages, stream=True,
                                                                temperature=0)
    received: list[Any] = []
    with pytest.raises(openai.APIError):
        received.extend(raw.parse())
    assert streamed_text(received)
    event = eventually(lambda: usage_event(qa, raw.headers["x-request-id"]), 10, "the usage event")
    assert event["outcome"] == "error"
    assert event["prompt_tokens"] > 0
    assert event["completion_tokens"] > 0
    assert event["cost_usd"] > 0
    again = qa.client().chat.completions.with_raw_response.create(model=model, messages=messages, temperature=0)
    assert again.headers["x-leafwire-cache"] == "miss"
    assert len(fake.calls) == 2


def test_headers_then_silence_before_the_first_event_is_retried(qa: QA) -> None:
    """A provider that sends its stream's headers and then nothing for longer than first_byte_s (2 s): nothing
    reached the caller, so that try is abandoned and the next one answers."""
    qa.a.script(Fault("stall", delay_s=5))
    started = time.monotonic()
    chunks = list(qa.client().chat.completions.create(model="fake/echo", messages=ask("stalled"), stream=True))
    assert streamed_text(chunks) == "pong stalled"
    assert len(qa.a.calls) == 2
    assert time.monotonic() - started < 5


def test_silence_mid_stream_ends_it_with_an_error(qa: QA) -> None:
    """A stream that goes quiet for longer than first_byte_s after its first words ends with an error the
    openai client raises; it is not retried."""
    qa.a.script(Fault.drip(4, text="one two three"))
    received: list[Any] = []
    with pytest.raises(openai.APIError) as exc:
        received.extend(qa.client().chat.completions.create(model="fake/echo", messages=ask(), stream=True))
    assert "mid-answer" in exc.value.message
    assert len(qa.a.calls) == 1


# -- callers that leave


def test_callers_leaving_mid_stream_do_not_open_the_breaker(qa: QA) -> None:
    """Three callers closing their streams midway (flaky's breaker opens at 3 failures): each provider call is
    stopped, none counts as the provider failing, and the next request is answered."""
    for _ in range(3):
        qa.b.script(Fault.drip(0.3, text=" ".join(["word"] * 40)))
        with httpx.stream("POST", f"{qa.gateway.base}/v1/chat/completions", headers=HEADERS, timeout=30,
                          json={"model": "flaky/echo", "messages": ask(), "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
    eventually(lambda: qa.b.disconnects == 3, 10, "the provider to see each call stopped")
    time.sleep(0.5)
    assert breaker(qa, "flaky") == 0
    assert qa.post({"model": "flaky/echo", "messages": ask()}).status_code == 200


def test_a_caller_gone_during_a_retry_wait_is_not_called_for(qa: QA) -> None:
    """A caller that gives up while the adapter waits out a provider's Retry-After (2 s): the provider is not
    called again for nobody."""
    qa.a.script(Fault.error(429, Retry_After="2"))
    with pytest.raises(httpx.TimeoutException):
        qa.post({"model": "fake/echo", "messages": ask(), "stream": True}, timeout=0.8)
    time.sleep(3)
    assert len(qa.a.calls) == 1


# -- the breaker


def test_an_open_breaker_is_passed_over_then_half_open_lets_one_probe_through(qa: QA) -> None:
    """flaky/spare is routed [requested, fake/echo]: with flaky's breaker open (KV says so) the answer comes
    from fake and flaky is not called. Once it half-opens (probes: 1), five requests at once: one reaches the
    provider, the others are refused at once with 503 provider_unavailable and a Retry-After, and the probe's
    success closes the breaker."""
    qa.b.script(*[Fault.error(503)] * 3)
    assert qa.post({"model": "flaky/echo", "messages": ask()}).status_code == 502
    eventually(lambda: (kv(qa, "provider-health", "flaky") or {}).get("state") == "open", 10, "KV to say open")
    assert breaker(qa, "flaky") == 2
    r = qa.post({"model": "flaky/spare", "messages": ask("elsewhere")})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "pong elsewhere"
    assert len(qa.b.calls) == 3
    eventually(lambda: (kv(qa, "provider-health", "flaky") or {}).get("state") == "half_open", OPEN_S + 10,
               "KV to say half open")
    time.sleep(0.5)
    qa.b.reset()
    qa.b.script(Fault.ok(delay_s=1.5))  # within first_byte_s (2 s)
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: qa.post({"model": "flaky/echo", "messages": ask()}), range(5)))
    assert sorted(r.status_code for r in answers) == [200, 503, 503, 503, 503]
    for r in answers:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "provider_unavailable"
            assert int(r.headers["retry-after"]) >= 1
    assert len(qa.b.calls) == 1
    eventually(lambda: breaker(qa, "flaky") == 0, 10, "the probe to close the breaker")


def test_an_error_rate_over_the_window_opens_the_breaker(qa: QA) -> None:
    """`rated` (min_calls 6, error_rate 0.5, failures 100): failures that are never consecutive but half of six
    calls open its breaker; the next request is a 503 that does not reach the provider."""
    qa.d.script(Fault.ok(), Fault.error(401), Fault.ok(), Fault.error(401), Fault.ok(), Fault.error(401))
    codes = [qa.post({"model": "rated/echo", "messages": ask()}).status_code for _ in range(6)]
    assert codes == [200, 502] * 3
    r = qa.post({"model": "rated/echo", "messages": ask()})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "provider_unavailable"
    assert len(qa.d.calls) == 6


def test_long_answers_cut_by_total_s_do_not_open_the_breaker(qa: QA) -> None:
    """`long` (total_s 1.5 s, first_byte_s 1 s, breaker of 2 failures): two streams whose words come every 0.3 s
    but take longer than total_s each end with an error (the adapter's limit, not the provider's silence). The
    provider answered steadily all along: its breaker must stay closed, and the next request be answered rather
    than refused with 503 provider_unavailable for open_s."""
    for _ in range(2):
        qa.a.script(Fault.drip(0.3, text=" ".join(["word"] * 12)))
        with pytest.raises(openai.APIError) as exc:
            list(qa.client().chat.completions.create(model="long/echo", messages=ask(), stream=True))
        assert "ran out of time" in exc.value.message
    time.sleep(0.3)
    assert breaker(qa, "long") == 0
    assert qa.post({"model": "long/echo", "messages": ask()}).status_code == 200


# -- max_concurrent


def test_a_provider_at_max_concurrent_refuses_with_retry_after_and_routes_fall_back(qa: QA) -> None:
    """busy has max_concurrent 1: with one call in flight another is a 429 overloaded with Retry-After at once
    (not sent to the provider nor retried), and a routed one is answered by the next target."""
    qa.c.script(Fault.ok(delay_s=5))
    done = threading.Event()

    def slow() -> None:
        qa.post({"model": "busy/echo", "messages": ask()})
        done.set()

    threading.Thread(target=slow, daemon=True).start()
    eventually(lambda: len(qa.c.calls) == 1, 10, "the first call to reach busy")
    started = time.monotonic()
    r = qa.post({"model": "busy/echo", "messages": ask()})
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "overloaded"
    assert int(r.headers["retry-after"]) >= 1
    assert time.monotonic() - started < 2
    routed = qa.post({"model": "busy/spare", "messages": ask("spared")})
    assert routed.status_code == 200
    assert routed.json()["choices"][0]["message"]["content"] == "pong spared"
    assert len(qa.c.calls) == 1
    assert done.wait(10)


# -- the openai client's own retries (max_retries=2, its default)


@pytest.mark.parametrize("status", [307, 418])
def test_a_refusal_no_retry_can_mend_is_not_retried_by_the_openai_client(qa: QA, status: int) -> None:
    """A provider answering a redirect (never followed) or a 4xx leafwire does not retry: the adapter calls it
    once, and the 502 must tell the openai client not to retry either (``x-should-retry: false``, as leafwire
    already does for a refused key): each of its retries calls the provider again for the same refusal (and a
    redirect counts against the breaker each time)."""
    qa.c.script(*[Fault.error(status, Location="http://127.0.0.1:9/elsewhere")] * 3)
    with pytest.raises(openai.APIStatusError) as exc:
        qa.client(max_retries=2).chat.completions.create(model="busy/echo", messages=ask())
    assert exc.value.status_code == 502
    assert len(qa.c.calls) == 1
    assert exc.value.response.headers.get("x-should-retry") == "false"


def test_the_openai_clients_retries_do_not_multiply_the_adapters(qa: QA) -> None:
    """A provider failing with 500: the adapter tries 3 times (LW_CLOUD_MAX_ATTEMPTS) and answers 502 without
    ``x-should-retry: false``, so the openai client (max_retries=2) asks twice more and each ask is 3 more
    tries: 9 provider calls for one call of the user's, 3 times the load and the wait that
    LW_CLOUD_MAX_ATTEMPTS is meant to bound."""
    qa.c.script(*[Fault.error(500)] * 9)
    with pytest.raises(openai.InternalServerError):
        qa.client(max_retries=2).chat.completions.create(model="busy/echo", messages=ask())
    assert len(qa.c.calls) <= 3
