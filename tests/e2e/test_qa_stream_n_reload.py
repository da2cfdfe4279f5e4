"""QA of streamed chat ``n`` in one cloud call, and of the providers file applied without a restart.

Streamed ``n``: test_cloud.py's stack (its fixture, started again for this module): httpx or a NATS client ->
gateway -> router -> the hub's cloud-adapter -> the fake providers of tests/fakes.py. Reload: a stack of its
own (its own nats-server, cloud-adapter checking its files every 0.2 s, router, gateway), as
test_cloud_reload.py's, and the adapter in this process for what a real process cannot time. Five tests are
what an OpenAI / LiteLLM user or an operator expects that QA found wrong, now fixed (a stream of n cut after
one choice ended, a partly cached stream, a key file arriving after its refused file, a request admitted just
before a reload, the providers file deleted); the others are behaviour checked correct that no other test
covers.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas.chat import ChatCompletionRequest
from services.cloud_adapter import app
from services.cloud_adapter.adapter import CloudAdapter
from services.cloud_adapter.dialect import Completion
from services.cloud_adapter.settings import CloudSettings
from shared import metrics
from shared.envelope import Envelope
from shared.errors import LeafwireError
from tests.conftest import serving_nats
from tests.e2e import test_cloud
from tests.e2e.test_cloud import CloudStack, sse_chunk, usage_event
from tests.e2e.test_qa_cloud_n import HEADERS
from tests.fakes import FakeProvider, Fault
from tests.support import Service, cloud_router_env, eventually, metric, running, tag

pytestmark = pytest.mark.e2e
cloud = test_cloud.cloud  # the same stack as test_cloud.py's, for this module
fresh_fakes = test_cloud._fresh_fakes


def stream_events(cloud: CloudStack, body: dict[str, Any]) -> tuple[httpx.Response, list[Any]]:
    """A streamed request's response and its events' data, parsed (``"[DONE]"`` kept as is)."""
    with httpx.stream("POST", f"{cloud.gateway.base}/v1/chat/completions", json={**body, "stream": True},
                      headers=HEADERS, timeout=30) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return r, [line if line == "[DONE]" else json.loads(line) for line in lines]


def by_choice(events: list[Any]) -> tuple[dict[int, dict[str, Any]], dict[int, str | None]]:
    """Each choice's message put together from its deltas (content concatenated, other fields as last sent,
    tool calls listed), and its finish reason."""
    messages: dict[int, dict[str, Any]] = {}
    finished: dict[int, str | None] = {}
    for data in events:
        if not isinstance(data, dict):
            continue
        for choice in data.get("choices") or []:
            message = messages.setdefault(choice["index"], {})
            for key, value in choice["delta"].items():
                if key == "content":
                    message["content"] = message.get("content", "") + (value or "")
                elif key == "tool_calls":
                    message.setdefault("tool_calls", []).extend(value)
                elif value is not None:
                    message[key] = value
            if choice.get("logprobs"):
                message.setdefault("logprobs", []).extend(choice["logprobs"]["content"])
            finished.setdefault(choice["index"], None)
            if choice.get("finish_reason"):
                finished[choice["index"]] = choice["finish_reason"]
    return messages, finished


def role(index: int) -> str:
    return sse_chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])


def text(index: int, words: str) -> str:
    return sse_chunk([{"index": index, "delta": {"content": words}, "finish_reason": None}])


def finish(index: int, reason: str = "stop") -> str:
    return sse_chunk([{"index": index, "delta": {}, "finish_reason": reason}])


USAGE = sse_chunk([], {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
DONE = "data: [DONE]\n\n"


class TestStreamedChoicesInOneCall:
    def test_a_stream_cut_before_every_choice_finished_ends_with_an_error(self, cloud: CloudStack) -> None:
        """The provider's stream ends (no [DONE]) after choice 0 finished but while choice 1 is still being
        written: the caller must get an error event ending the stream, not [DONE] with choice 1 cut short; the
        call is not made again."""
        events = [role(0), role(1), text(0, "all of zero"), text(1, "half of"), finish(0)]
        cloud.openai_fake.script(Fault.raw(200, events=events))
        r, got = stream_events(cloud, {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}],
                                       "n": 2})
        assert r.status_code == 200
        assert len(cloud.openai_fake.calls) == 1
        assert got[-1] != "[DONE]", by_choice(got)
        assert "error" in got[-1]

    def test_a_stream_of_choices_partly_cached_is_not_marked_hit(self, cloud: CloudStack) -> None:
        """Choice 0 stored (n: 1), then n: 2 streamed: every choice is answered, choice 1 by a provider call,
        and the response says `partial` (as the same request whole does), not `hit` (a wholly cached, free
        answer)."""
        body = {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}], "cache": True,
                "temperature": 1}
        cloud.openai_fake.script(Fault.ok("stored one"), Fault.ok("fresh two"))
        assert cloud.post(body).status_code == 200
        r, got = stream_events(cloud, {**body, "n": 2})
        messages, finished = by_choice(got)
        assert {j: m["content"] for j, m in messages.items()} == {0: "stored one", 1: "fresh two"}
        assert finished == {0: "stop", 1: "stop"}
        assert len(cloud.openai_fake.calls) == 2
        assert r.headers["x-leafwire-cache"] == "partial"

    def test_tool_calls_refusal_and_logprobs_stream_with_their_choice(self, cloud: CloudStack) -> None:
        """Several choices in one chunk, a tool call streamed in pieces, a refusal and logprobs: each reaches
        the caller at its own index with its own finish reason; one call."""
        lp = {"content": [{"token": "hi", "logprob": -0.1, "bytes": [104, 105], "top_logprobs": []}]}
        call0 = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}
        call1 = {"index": 0, "function": {"arguments": "{\"q\": 1}"}}
        events = [
            sse_chunk([{"index": j, "delta": {"role": "assistant", "content": None if j == 0 else ""},
                        "finish_reason": None} for j in range(3)]),
            sse_chunk([{"index": 0, "delta": {"tool_calls": [call0]}, "finish_reason": None},
                       {"index": 1, "delta": {"refusal": "I can't"}, "finish_reason": None},
                       {"index": 2, "delta": {"content": "hi"}, "logprobs": lp, "finish_reason": None}]),
            sse_chunk([{"index": 0, "delta": {"tool_calls": [call1]}, "finish_reason": None}]),
            sse_chunk([{"index": 2, "delta": {}, "finish_reason": "length"},
                       {"index": 1, "delta": {}, "finish_reason": "stop"},
                       {"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
            USAGE, DONE]
        cloud.openai_fake.script(Fault.raw(200, events=events))
        r, got = stream_events(cloud, {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}],
                                       "n": 3, "logprobs": True,
                                       "tools": [{"type": "function", "function": {"name": "lookup"}}]})
        assert r.status_code == 200, r.text
        assert got[-1] == "[DONE]"
        messages, finished = by_choice(got)
        assert finished == {0: "tool_calls", 1: "stop", 2: "length"}
        assert messages[0]["tool_calls"] == [call0, call1]
        assert messages[1]["refusal"] == "I can't"
        assert messages[2]["content"] == "hi"
        assert messages[2]["logprobs"] == lp["content"]
        assert [c.body["n"] for c in cloud.openai_fake.calls] == [3]

    def test_choices_streamed_one_after_another_are_each_relayed(self, cloud: CloudStack) -> None:
        """A provider that streams choice 0 to its end before choice 1 begins (allowed by OpenAI's format):
        still one call, both choices whole, usage counting the prompt once, no usage chunk when not asked."""
        events = [role(0), text(0, "first "), text(0, "whole"), finish(0), role(1), text(1, "second"), finish(1),
                  USAGE, DONE]
        cloud.openai_fake.script(Fault.raw(200, events=events))
        r, got = stream_events(cloud, {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}],
                                       "n": 2})
        assert r.status_code == 200, r.text
        messages, finished = by_choice(got)
        assert {j: m["content"] for j, m in messages.items()} == {0: "first whole", 1: "second"}
        assert finished == {0: "stop", 1: "stop"}
        assert all(data == "[DONE]" or data["choices"] for data in got)  # include_usage not asked: no usage chunk
        assert len(cloud.openai_fake.calls) == 1
        event = eventually(lambda: usage_event(cloud, r.headers["x-request-id"]), 10, "the usage event")
        assert (event["prompt_tokens"], event["completion_tokens"]) == (3, 4)
        assert event["cost_usd"] == pytest.approx((3 * 1 + 4 * 2) / 1e6)

    def test_an_error_event_mid_stream_ends_the_stream_and_is_not_retried(self, cloud: CloudStack) -> None:
        """The provider reports an error after every choice began: the caller's stream (already under way)
        ends with an error event, no [DONE], and the provider is not called again."""
        cloud.openai_fake.script(Fault.stream_error(after=4))
        r, got = stream_events(cloud, {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}],
                                       "n": 2})
        assert r.status_code == 200
        assert "error" in got[-1], got[-3:]
        assert len(cloud.openai_fake.calls) == 1

    def test_128_streamed_choices_are_one_call(self, cloud: CloudStack) -> None:
        """n: 128 streamed: one provider call, every choice at its index with its finish reason, the usage
        chunk counting the prompt once."""
        r, got = stream_events(cloud, {"model": "fake/echo", "messages": [{"role": "user", "content": "hi"}],
                                       "n": 128, "stream_options": {"include_usage": True}})
        assert r.status_code == 200, r.text
        messages, finished = by_choice(got)
        assert sorted(finished) == list(range(128))
        assert set(finished.values()) == {"stop"}
        assert {m["content"] for m in messages.values()} == {"pong hi"}
        assert [c.body["n"] for c in cloud.openai_fake.calls] == [128]
        assert (got[-2]["usage"]["prompt_tokens"], got[-2]["usage"]["completion_tokens"]) == (1, 256)

    def test_a_caller_leaving_mid_stream_closes_the_one_call(self, cloud: CloudStack) -> None:
        """Closing a stream of two choices midway stops the provider call (the provider sees its client go)."""
        cloud.openai_fake.script(Fault.drip(0.3, text=" ".join(["word"] * 40)), Fault.ok(" ".join(["x"] * 40)))
        with httpx.stream("POST", f"{cloud.gateway.base}/v1/chat/completions", headers=HEADERS, timeout=30,
                          json={"model": "fake/echo", "messages": [{"role": "user", "content": tag()}], "n": 2,
                                "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        eventually(lambda: cloud.openai_fake.disconnects == 1, 10, "the provider to see the call cancelled")
        assert len(cloud.openai_fake.calls) == 1
        assert eventually(lambda: metric(cloud.adapter.metrics(), "leafwire_cloud_requests_total", provider="fake",
                                         model="echo", outcome="cancelled") >= 1, 10, "a cancelled outcome")


# -- the providers file reloaded, in this process (what a real process cannot time)

RELOAD_KEY = "sk-qa-reload-0123456789"
PRICED = {"m": {"input_per_mtok": 1, "output_per_mtok": 1}}


def entry(name: str, url: str, key_file: Path, models: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"name": name, "kind": "openai-compatible", "base_url": url, "local": True,
            "api_key_file": str(key_file), "models": models,
            "timeouts": {"connect_s": 2, "first_byte_s": 2, "total_s": 10}, **more}


def write(path: Path, providers: list[dict[str, Any]], **more: Any) -> None:
    path.write_text(json.dumps({"providers": providers, **more}))


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider("openai", key=RELOAD_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture
async def running_adapter(tmp_path: Path, provider: FakeProvider) -> AsyncIterator[tuple[CloudAdapter, CloudSettings]]:
    """An adapter of providers ``a`` and ``b`` (model ``m``, $1 a million tokens, tenant acme $10 a day), its
    sessions open, its file checked every 0.05 s."""
    key = tmp_path / "key"
    key.write_text(RELOAD_KEY + "\n")
    file = tmp_path / "providers.yaml"
    write(file, [entry("a", provider.url, key, PRICED), entry("b", provider.url, key, PRICED)],
          budgets={"tenants": {"acme": {"daily_usd": 10}}})
    settings = CloudSettings(LW_PROVIDERS_FILE=file, LW_CLOUD_PROVIDERS_CHECK_S=0.05,
                             env="production", nats_url="nats://qa:qa@127.0.0.1:1")
    adapter = app.load_adapter(settings)
    await adapter.open_upstreams()
    keeping = asyncio.create_task(app.keep_configured(adapter, settings))
    try:
        yield adapter, settings
    finally:
        keeping.cancel()
        await asyncio.gather(keeping, return_exceptions=True)
        await adapter.close_upstreams()
        await adapter.wait_for_answers(0)


async def until(check: Any, seconds: float = 2.0) -> bool:
    """Whether ``check()`` became true within ``seconds``."""
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        if check():
            return True
        await asyncio.sleep(0.02)
    return bool(check())


def refusals() -> float:
    return float(metrics.PROVIDERS_RELOADS.labels("refused")._value.get())


def envelope(tenant: str = "acme") -> Envelope:
    return Envelope(request_id=uuid.uuid4().hex, tenant=tenant, reply="_INBOX.qa", deadline=time.time() + 30)


class TestReloadInProcess:
    async def test_a_key_file_arriving_after_its_refused_file_applies_it(
            self, running_adapter: tuple[CloudAdapter, CloudSettings], tmp_path: Path,
            provider: FakeProvider) -> None:
        """In production a file naming a key file not yet there is refused (a Kubernetes ConfigMap updated before
        its Secret); once the key file is written (the Secret lands), the file is applied by itself, as any
        change of a key file is: provider ``c`` is served."""
        adapter, settings = running_adapter
        refused = refusals()
        later = tmp_path / "key-c"
        write(settings.providers_file, [entry("a", provider.url, tmp_path / "key", PRICED),
                                        entry("b", provider.url, tmp_path / "key", PRICED),
                                        entry("c", provider.url, later, {"m": {}})])
        assert await until(lambda: refusals() > refused), "the file naming a missing key refused"
        assert "c/m" not in adapter.targets
        later.write_text(RELOAD_KEY + "\n")
        assert await until(lambda: "c/m" in adapter.targets), sorted(adapter.targets)

    async def test_a_request_admitted_just_before_a_reload_is_answered(
            self, running_adapter: tuple[CloudAdapter, CloudSettings], tmp_path: Path,
            provider: FakeProvider) -> None:
        """A request is admitted (``admit`` resolves its target) and, while its cache lookup is awaited, the file
        changes its provider (a price): the request is still answered, on the old session or the new one."""
        adapter, settings = running_adapter
        request = ChatCompletionRequest.model_validate({"model": "b/m", "messages": [{"role": "user",
                                                                                         "content": "hi"}]})
        env = envelope()
        reloaded = asyncio.Event()

        async def serve() -> Completion:  # serve's steps with the target admit gave: a lookup awaited, the call
            await reloaded.wait()  # the cache lookup, a KV round trip, and more under load
            await asyncio.sleep(0.1)
            with target.upstream.slot():
                call = target.upstream.call(request, target.model, target.spec, env.deadline)
                return await target.upstream.complete(call)

        target = adapter.admit(request, env)  # in the NATS handler, started at once (no await between)
        answering = asyncio.ensure_future(serve())


        async def answered() -> None:  # the request's task, which holds the provider it was admitted for
            await asyncio.wait({answering})

        adapter.start(answered(), env, target)
        write(settings.providers_file, [entry("a", provider.url, tmp_path / "key", PRICED),
                                        entry("b", provider.url, tmp_path / "key", {"m": {"input_per_mtok": 2}})])
        assert await until(lambda: adapter.targets["b/m"] is not target)
        reloaded.set()
        completion = await asyncio.wait_for(answering, 10)
        assert completion.message["content"] == "pong hi"

    async def test_a_deleted_providers_file_keeps_the_running_providers(
            self, running_adapter: tuple[CloudAdapter, CloudSettings]) -> None:
        """The providers file vanishes under a running adapter (removed by mistake, or replaced by delete then
        create): like a file that does not validate, it is refused with an error line and the running providers
        stay; an adapter starting without the file still starts with none."""
        adapter, settings = running_adapter
        refused = refusals()
        settings.providers_file.unlink()
        await until(lambda: refusals() > refused or not adapter.targets)
        assert sorted(adapter.targets) == ["a/m", "b/m"]

    async def test_a_budget_lowered_below_what_was_spent_refuses_the_next_request(
            self, running_adapter: tuple[CloudAdapter, CloudSettings], tmp_path: Path,
            provider: FakeProvider) -> None:
        """acme spent $4 of $10 today; the file lowers its daily budget to $3: the next request is refused
        budget_exceeded (429), another tenant's still admitted; the budget raised again admits acme."""
        adapter, settings = running_adapter
        request = ChatCompletionRequest.model_validate({"model": "a/m", "messages": [{"role": "user",
                                                                                         "content": "hi"}]})
        adapter.admit(request, envelope())
        adapter.ledger.charge("acme", 4.0)
        providers = [entry("a", provider.url, tmp_path / "key", PRICED),
                     entry("b", provider.url, tmp_path / "key", PRICED)]
        write(settings.providers_file, providers, budgets={"tenants": {"acme": {"daily_usd": 3}}})
        assert await until(lambda: adapter.ledger.budgets.tenants["acme"].daily_usd == 3)
        with pytest.raises(LeafwireError) as refused:
            adapter.admit(request, envelope())
        assert (refused.value.status, refused.value.code) == (429, "budget_exceeded")
        adapter.admit(request, envelope("globex"))
        write(settings.providers_file, providers, budgets={"tenants": {"acme": {"daily_usd": 5}}})
        assert await until(lambda: adapter.ledger.budgets.tenants["acme"].daily_usd == 5)
        adapter.admit(request, envelope())

    async def test_an_unchanged_providers_open_breaker_survives_a_reload(
            self, running_adapter: tuple[CloudAdapter, CloudSettings], tmp_path: Path,
            provider: FakeProvider) -> None:
        """Provider ``a``'s breaker is open; a reload that changes only ``b`` keeps ``a``'s breaker open (its
        calls still refused) and ``b`` gets a fresh one."""
        adapter, settings = running_adapter
        a = adapter.upstreams["a"]
        for _ in range(a.breaker.policy.failures):
            a.breaker.record(False, False)
        assert a.breaker.state.value == "open"
        write(settings.providers_file, [entry("a", provider.url, tmp_path / "key", PRICED),
                                        entry("b", provider.url, tmp_path / "key", {"m": {}, "m2": {}})])
        assert await until(lambda: "b/m2" in adapter.targets)
        assert adapter.upstreams["a"] is a
        assert adapter.upstreams["a"].breaker.state.value == "open"
        assert {h.provider: h.state.value for h in adapter.healths()}["a"] == "open"


# -- the providers file reloaded under a running stack, a call in flight

RELOAD_SITE = "qareload"


@pytest.fixture(scope="module")
def reload_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, FakeProvider, Path, Path]]:
    """Its own nats-server, cloud-adapter (file checked every 0.2 s), router and gateway; provider ``fake``
    (model ``echo``); the adapter, the fake, the providers file and the key file."""
    fake = FakeProvider("openai", key=RELOAD_KEY).start()
    folder = tmp_path_factory.mktemp("qa-reload")
    key = folder / "key"
    key.write_text(RELOAD_KEY + "\n")
    file = folder / "providers.yaml"
    write(file, [entry("fake", fake.url, key, {"echo": {}})])
    try:
        for server in serving_nats(tmp_path_factory, "qa-reload-nats"):
            env = {"LW_NATS_URL": server.url, "LW_SITE": RELOAD_SITE}
            adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(file),
                                                "LW_CLOUD_PROVIDERS_CHECK_S": "0.2", "LW_KEEPALIVE_S": "0.3"})
            gateway = Service("gateway", env)
            with running(adapter, Service("router", {**env, **cloud_router_env(folder)}), gateway):
                yield gateway, fake, file, key
    finally:
        fake.stop()


@pytest.mark.parametrize("change", ["changed", "removed"])
def test_a_stream_in_flight_finishes_when_its_provider_is_changed_or_removed(
        reload_stack: tuple[Service, FakeProvider, Path, Path], change: str) -> None:
    """A slow streamed answer (n: 2, one call) is under way when the file changes its provider (another
    timeout) or takes it out: the caller still gets both choices whole and [DONE]; the next request sees the
    new file (the model removed: a 404)."""
    gateway, fake, file, key = reload_stack
    write(file, [entry("fake", fake.url, key, {"echo": {}})])
    models = f"{gateway.base}/v1/models"
    eventually(lambda: "fake/echo" in httpx.get(models, timeout=10).text, 20, "fake/echo served")
    fake.reset()
    fake.script(Fault.drip(0.1, text=" ".join(["word"] * 15)), Fault.ok(" ".join(["more"] * 15)))
    with httpx.stream("POST", f"{gateway.base}/v1/chat/completions", timeout=30,
                      json={"model": "fake/echo", "messages": [{"role": "user", "content": "hi"}], "n": 2,
                            "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        if change == "changed":
            write(file, [entry("fake", fake.url, key, {"echo": {}}, timeouts={"connect_s": 3, "first_byte_s": 3,
                                                                               "total_s": 12})])
        else:
            write(file, [entry("other", fake.url, key, {"echo": {}})])
        got += list(lines)
    events = [line[6:] for line in got if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-2:]
    messages, finished = by_choice([json.loads(e) for e in events[:-1]])
    assert {j: m["content"] for j, m in messages.items()} == {0: " ".join(["word"] * 15),
                                                            1: " ".join(["more"] * 15)}
    assert finished == {0: "stop", 1: "stop"}
    assert len(fake.calls) == 1
    if change == "removed":
        eventually(lambda: httpx.post(f"{gateway.base}/v1/chat/completions", timeout=10, json={
            "model": "fake/echo", "messages": [{"role": "user", "content": "hi"}]}).status_code == 404,
            10, "fake/echo a 404")
