"""QA: a provider's ``rpm``/``tpm`` kept by all the site's cloud-adapters together (KV ``provider-rates``), and
``drop_params`` / ``reasoning`` (docs/cloud.md: "The providers file", "What is translated", "Settings",
"NATS contracts").

The stack is test_cloud.py's ``cloud_stack`` (real nats-server, gateway, router, a hub cloud-adapter, the fake
OpenAI-compatible and Anthropic providers of tests/fakes.py), with one rate-limited provider per test (a minute
cannot be waited out in a test), each with its own upstream model name so the fake's calls can be told apart.
Extra adapters of the site are started with ``running(Service("cloud_adapter", ...))``.

Probed:
- rpm kept by three adapters with requests from parallel threads (paced past LW_CLOUD_RATE_SYNC_S): the site
  stays within rpm plus what the others began in the last sync period; every refusal is a 429
  ``provider_rate_limit`` with a Retry-After in 1..60.
- tpm kept by two adapters (the fake's reported usage).
- an adapter stopped and another started: the minute's calls of the site still count for the newcomer.
- the ``provider-rates`` bucket deleted underneath: recreated, and does sharing resume?
- a provider's own retries (a 500 then an answer): do they count against its rpm?
- two rate-limited providers (names with ``-`` and ``_``) on two adapters: no leak between providers.
- embeddings, streams and n > 1 against rpm (n in one call: one call counted).
- a providers-file reload raising rpm: the new limit applies at once.
- drop_params on OpenAI reasoning models: streamed, n > 1, /v1/completions (temperature/top_p; the gateway
  refuses logprobs on text completions anyway), model-level override both ways,
  the cache (temperature 0 still cached, keyed by the caller's parameters).
- drop_params on Anthropic: temperature 1.5 (answered vs 400), parameters without a counterpart left out,
  tool_choice allowed_tools still refused, thinking through extra_body (temperature/top_p/top_k left out).
- ``leafwire providers validate`` with the new fields, good and bad values.

Findings (each was a strict xfail test; all three are fixed since, and the tests below pass):
1. Retries are not counted against rpm: ``Upstream.slot()`` (and so ``MinuteLimits.take``) is taken once per
   request in adapter.py (``_call``, ``_call_choices``...), while ``Upstream._with_retries`` may call the
   provider up to LW_CLOUD_MAX_ATTEMPTS times inside it. A provider answering a 500 (or its own 429) then
   an answer gets more calls in the minute than its rpm: rpm 2 -> 3 calls, and a further request is still
   let through.
2. The ``provider-rates`` bucket deleted underneath is created again, but an adapter only writes its entry when
   its minute changes (``MinuteLimits.tally`` returns None unless ``_changed``), so the minute it had written
   is never put back: an adapter started (or one that read the new bucket) then lets the provider reach its
   rpm a second time within the minute. (state.py ``rates_loop`` / ``_keep_open``, rate.py ``tally``.)
3. Retry-After of 61 s: a refusal counted against another adapter's call made in the current second says
   ``Retry-After: 61`` (rate.py ``_oldest`` counts a peer's call from the end of its second, ``others + 1``,
   and the gateway rounds up), though the call leaves the 60 s window within 60 s.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import nats
import openai
import pytest

from tests.e2e.test_cloud import CloudStack, cloud_stack
from tests.e2e.test_cloud import providers_file as base_providers
from tests.fakes import FakeProvider, Fault
from tests.support import NatsServer, Service, eventually, leafwire, running

pytestmark = pytest.mark.e2e
HEADERS = {"Authorization": "Bearer key-acme"}
SYNC_S = 0.1
OAI_KEY_ENV = "LW_TEST_FAKE_KEY"
# provider name -> (rpm, tpm, upstream model name) for the rate tests: one provider a test
RATED: dict[str, tuple[int | None, int | None]] = {
    "par": (6, None), "tok": (None, 30), "restart": (3, None), "wiped": (3, None), "retry": (2, None),
    "r-one": (2, None), "r_two": (2, None), "emb": (2, None), "kinds": (3, None), "reload": (2, None),
    "race": (3, None), "after": (1, None),
}


def write_providers(path: Path, oai: FakeProvider, claude: FakeProvider) -> Path:
    base_providers(path, oai, claude)
    config = json.loads(path.read_text())
    common = {"kind": "openai-compatible", "base_url": oai.url, "local": True, "api_key_env": OAI_KEY_ENV,
              "timeouts": {"connect_s": 2, "first_byte_s": 5, "total_s": 10}}
    for name, (rpm, tpm) in RATED.items():
        entry: dict[str, Any] = {**common, "name": name, "models": {"echo": {"upstream": f"{name}-up"}}}
        if name == "emb":
            entry["models"]["vec"] = {"kind": "embeddings", "upstream": "emb-vec"}
        if rpm is not None:
            entry["rpm"] = rpm
        if tpm is not None:
            entry["tpm"] = tpm
        config["providers"].append(entry)
    config["providers"] += [
        {**common, "name": "lenient", "drop_params": True, "models": {
            "o3": {"upstream": "o3-mini-2025-01-31"}, "gpt": {"upstream": "gpt-4o-mini"},
            "strict": {"upstream": "o4-mini", "drop_params": False}}},
        {**common, "name": "oai", "models": {"o3": {"upstream": "o3"},
                                             "o3d": {"upstream": "o3-d", "drop_params": True},
                                             "dep": {"upstream": "plant-brain", "reasoning": True,
                                                     "drop_params": True}}},
        {"name": "claudel", "kind": "anthropic", "base_url": claude.url, "local": True,
         "api_key_env": "LW_TEST_CLAUDE_KEY", "drop_params": True,
         "timeouts": {"connect_s": 2, "first_byte_s": 5, "total_s": 10},
         "models": {"haiku": {"upstream": "claude-lenient", "max_tokens": 64},
                    "strict": {"upstream": "claude-strict", "max_tokens": 64, "drop_params": False}}},
    ]
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def cloud(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudStack]:
    with cloud_stack(nats_server, tmp_path_factory.mktemp("qa-rates"), write=write_providers,
                     LW_CLOUD_RATE_SYNC_S=str(SYNC_S), LW_CLOUD_STATE_CHECK_S="1",
                     LW_CLOUD_PROVIDERS_CHECK_S="0.5", LW_CLOUD_N_RECHECK_S="0") as stack:
        yield stack


@pytest.fixture(autouse=True)
def _fresh(cloud: CloudStack) -> None:
    cloud.openai_fake.reset()
    cloud.claude_fake.reset()


def ask(cloud: CloudStack, model: str, **more: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": f"hello {uuid.uuid4().hex[:8]}"}], **more}
    return httpx.post(f"{cloud.gateway.base}/v1/chat/completions", json=body, headers=HEADERS, timeout=30)


def calls_of(fake: FakeProvider, upstream: str) -> int:
    return sum(1 for c in list(fake.calls) if c.body.get("model") == upstream)


def adapter_like(cloud: CloudStack) -> Service:
    return Service("cloud_adapter", dict(cloud.adapter.env))


def assert_rate_refusal(r: httpx.Response, what: str = "rpm") -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "provider_rate_limit", r.text
    assert what in r.json()["error"]["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60, r.headers.get("retry-after")


# -- rpm / tpm kept together


def test_three_adapters_keep_rpm_with_parallel_callers(cloud: CloudStack) -> None:
    """rpm 6, three adapters, three threads each sending 6 requests 0.4 s apart (past the 0.1 s sync): the
    provider gets at least 6 and at most 6 + what others began within one sync period (a few) calls; every
    other request is a 429 with a sane Retry-After."""
    with running(adapter_like(cloud), adapter_like(cloud)):
        answers: list[httpx.Response] = []
        lock = threading.Lock()

        def caller() -> None:
            for _ in range(6):
                r = ask(cloud, "par/echo")
                with lock:
                    answers.append(r)
                time.sleep(0.4)

        with ThreadPoolExecutor(3) as pool:
            for f in [pool.submit(caller) for _ in range(3)]:
                f.result()
        ok = [r for r in answers if r.status_code == 200]
        for r in answers:
            if r.status_code != 200:
                assert_rate_refusal(r)
        assert 6 <= len(ok) <= 6 + 2, [r.status_code for r in answers]
        assert calls_of(cloud.openai_fake, "par-up") == len(ok)


def test_two_adapters_keep_tpm_together(cloud: CloudStack) -> None:
    """tpm 30 with two adapters: requests (paced past the sync) are answered until the minute's reported tokens
    reach 30, then refused naming tpm, whichever adapter takes them; the site passes 30 by at most one call's."""
    with running(adapter_like(cloud)):
        used, largest, refused = 0, 0, []
        for _ in range(30):
            r = ask(cloud, "tok/echo")
            if r.status_code == 200:
                tokens = r.json()["usage"]["total_tokens"]
                used, largest = used + tokens, max(largest, tokens)
            else:
                refused.append(r)
                if len(refused) >= 4:
                    break
            time.sleep(3 * SYNC_S)
        assert refused, "never refused"
        for r in refused:
            assert_rate_refusal(r, "tpm")
        assert 30 <= used < 30 + largest, (used, largest)


def test_a_new_adapter_counts_the_minute_of_one_stopped(cloud: CloudStack) -> None:
    """rpm 3 reached by the module's adapter and a second one; the second stops, a third starts: every
    request in the minute is still refused (the stopped adapter's calls stay in ``provider-rates``)."""
    second = adapter_like(cloud)
    with running(second):
        answered = 0
        while answered < 3:
            r = ask(cloud, "restart/echo")
            assert r.status_code == 200, r.text
            answered += 1
            time.sleep(3 * SYNC_S)
        time.sleep(5 * SYNC_S)
    with running(adapter_like(cloud)):
        time.sleep(1.0)  # its watch has read the bucket
        for _ in range(8):
            assert_rate_refusal(ask(cloud, "restart/echo"))
    assert calls_of(cloud.openai_fake, "restart-up") == 3


def test_an_adapter_just_ready_already_counts_the_sites_minute(cloud: CloudStack) -> None:
    """rpm 3 reached by the module's adapter alone; a second adapter started: requests sent the moment it is
    ready (/readyz 200), in parallel, are all refused: it has read the site's minute before taking them."""
    for _ in range(3):
        assert ask(cloud, "race/echo").status_code == 200
    time.sleep(5 * SYNC_S)
    with running(adapter_like(cloud)), ThreadPoolExecutor(2) as pool:
        statuses = [r.status_code for r in pool.map(lambda _: ask(cloud, "race/echo"), range(8))]
    assert calls_of(cloud.openai_fake, "race-up") == 3, statuses
    assert set(statuses) == {429}, statuses


def test_retry_after_never_passes_the_minute(cloud: CloudStack) -> None:
    """rpm 1, two adapters: one answers a request at the start of a second; requests right after are refused,
    and every Retry-After is at most 60 (the call leaves the minute 60 s after it was made)."""
    with running(adapter_like(cloud)):
        while time.time() % 1 > 0.05:  # the call at the start of a second
            time.sleep(0.005)
        assert ask(cloud, "after/echo").status_code == 200
        time.sleep(2 * SYNC_S)
        refused = [ask(cloud, "after/echo") for _ in range(8)]
    for r in refused:
        assert r.status_code == 429, r.text
    waits = [int(r.headers["retry-after"]) for r in refused]
    assert max(waits) <= 60, waits


async def _delete_rates_bucket(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_key_value("provider-rates")
    finally:
        await nc.drain()


async def _rates_bucket_keys(url: str) -> list[str] | None:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("provider-rates")
        try:
            return list(await kv.keys())
        except Exception:  # no keys
            return []
    except Exception:
        return None
    finally:
        await nc.drain()


def test_the_rates_bucket_deleted_underneath_keeps_the_sites_minute(cloud: CloudStack) -> None:
    """rpm 3 reached by the module's adapter alone; ``provider-rates`` deleted; once it is back, an adapter
    started afterwards must still see those 3 calls: nothing more reaches the provider this minute."""
    for _ in range(3):
        assert ask(cloud, "wiped/echo").status_code == 200
    time.sleep(5 * SYNC_S)
    asyncio.run(_delete_rates_bucket(cloud.nats.url))
    eventually(lambda: asyncio.run(_rates_bucket_keys(cloud.nats.url)) is not None, 15, "provider-rates back")
    time.sleep(2.0)  # several sync periods: the adapter has had every chance to write its minute again
    with running(adapter_like(cloud)):
        time.sleep(1.0)
        statuses = [ask(cloud, "wiped/echo").status_code for _ in range(8)]
    assert calls_of(cloud.openai_fake, "wiped-up") == 3, statuses
    assert set(statuses) == {429}, statuses


def test_retried_calls_count_against_rpm(cloud: CloudStack) -> None:
    """rpm 2: a request answered on its second try (a 500 first) made two calls: the provider's minute is
    full, and the next request is refused without a call."""
    cloud.openai_fake.script(Fault.error(500))
    assert ask(cloud, "retry/echo").status_code == 200
    assert calls_of(cloud.openai_fake, "retry-up") == 2  # the 500 and the answer
    r = ask(cloud, "retry/echo")
    assert calls_of(cloud.openai_fake, "retry-up") <= 2, "the provider got more calls than its rpm"
    assert_rate_refusal(r)


def test_two_providers_on_two_adapters_count_apart(cloud: CloudStack) -> None:
    """``r-one`` and ``r_two`` (rpm 2 each), two adapters: each is answered twice, then refused; one's calls
    never use up the other's minute."""
    with running(adapter_like(cloud)):
        for _ in range(2):
            assert ask(cloud, "r-one/echo").status_code == 200
            time.sleep(3 * SYNC_S)
        for _ in range(3):
            assert_rate_refusal(ask(cloud, "r-one/echo"))
        for _ in range(2):
            r = ask(cloud, "r_two/echo")
            assert r.status_code == 200, r.text
            time.sleep(3 * SYNC_S)
        for _ in range(3):
            r = ask(cloud, "r_two/echo")
            assert_rate_refusal(r)
            assert "r_two" in r.json()["error"]["message"]
    assert calls_of(cloud.openai_fake, "r-one-up") == 2
    assert calls_of(cloud.openai_fake, "r_two-up") == 2


def test_embeddings_count_against_rpm(cloud: CloudStack) -> None:
    """rpm 2: two embeddings calls fill the provider's minute; a third, and a chat request, are refused."""
    client = cloud.client()
    for i in range(2):
        client.embeddings.create(model="emb/vec", input=[f"text {i} {uuid.uuid4().hex}"])
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model="emb/vec", input=[f"again {uuid.uuid4().hex}"])
    assert_rate_refusal(ask(cloud, "emb/echo"))
    assert calls_of(cloud.openai_fake, "emb-vec") == 2


def test_a_stream_and_n_choices_count_one_call_each(cloud: CloudStack) -> None:
    """rpm 3: a stream (one call), n=3 in one call, a whole answer: all answered; the fourth is refused."""
    client = cloud.client()
    chunks = list(client.chat.completions.create(model="kinds/echo", stream=True,
                                                 messages=[{"role": "user", "content": "stream me"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    three = client.chat.completions.create(model="kinds/echo", n=3, messages=[{"role": "user", "content": "three"}])
    assert len(three.choices) == 3
    assert ask(cloud, "kinds/echo").status_code == 200
    assert calls_of(cloud.openai_fake, "kinds-up") == 3
    assert_rate_refusal(ask(cloud, "kinds/echo"))


def test_a_reload_raising_rpm_applies_at_once(cloud: CloudStack, tmp_path: Path) -> None:
    """rpm 2 reached; the providers file raised to rpm 4: the provider is answered again up to its new rpm (the
    minute's two calls still count: a reload keeps the minute), then refused naming rpm (4)."""
    for _ in range(2):
        assert ask(cloud, "reload/echo").status_code == 200
    assert_rate_refusal(ask(cloud, "reload/echo"))
    file = Path(cloud.adapter.env["LW_PROVIDERS_FILE"])
    original = file.read_text()
    config = json.loads(original)
    next(p for p in config["providers"] if p["name"] == "reload")["rpm"] = 4
    try:
        file.write_text(json.dumps(config))
        eventually(lambda: ask(cloud, "reload/echo").status_code == 200, 15, "rpm 4 applied")  # the third call
        statuses = [ask(cloud, "reload/echo").status_code for _ in range(4)]
        assert statuses == [200, 429, 429, 429], statuses
        assert calls_of(cloud.openai_fake, "reload-up") == 4
        r = ask(cloud, "reload/echo")
        assert_rate_refusal(r)
        assert "rpm (4)" in r.json()["error"]["message"]
    finally:
        file.write_text(original)
        time.sleep(1.5)  # reloaded back before the next test


# -- drop_params and reasoning: OpenAI-compatible

SAMPLING = {"temperature": 0.3, "top_p": 0.5, "presence_penalty": 0.4, "frequency_penalty": 0.2,
            "logit_bias": {"1734": -5}}


def last_body(fake: FakeProvider, upstream: str) -> dict[str, Any]:
    return [c.body for c in fake.calls if c.body.get("model") == upstream][-1]


def test_drop_params_on_a_reasoning_models_stream_and_choices(cloud: CloudStack) -> None:
    """lenient/o3 (provider drop_params): streamed, and with n=2 (one call), the call carries no sampling
    parameter and the answers come."""
    client = cloud.client()
    chunks = list(client.chat.completions.create(model="lenient/o3", stream=True, max_tokens=30,
                                                 messages=[{"role": "user", "content": "stream"}],
                                                 **SAMPLING))  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    sent = last_body(cloud.openai_fake, "o3-mini-2025-01-31")
    assert not set(SAMPLING) & set(sent), sent
    assert sent["max_completion_tokens"] == 30
    two = client.chat.completions.create(model="lenient/o3", n=2, messages=[{"role": "user", "content": "two"}],
                                         **SAMPLING)  # type: ignore[call-overload]
    assert len(two.choices) == 2
    assert calls_of(cloud.openai_fake, "o3-mini-2025-01-31") == 2
    sent = last_body(cloud.openai_fake, "o3-mini-2025-01-31")
    assert not set(SAMPLING) & set(sent), sent
    assert sent["n"] == 2


def test_drop_params_on_text_completions(cloud: CloudStack) -> None:
    """/v1/completions to a drop_params reasoning model with a temperature and top_p: answered; the call
    carries neither (text completions refuse logprobs at the gateway: no log probabilities there)."""
    r = httpx.post(f"{cloud.gateway.base}/v1/completions", headers=HEADERS, timeout=30,
                   json={"model": "lenient/o3", "prompt": "Once upon", "temperature": 0.2,
                         "max_tokens": 20, "top_p": 0.3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]
    sent = last_body(cloud.openai_fake, "o3-mini-2025-01-31")
    assert not {"temperature", "top_p", "logprobs", "top_logprobs"} & set(sent), sent


@pytest.mark.parametrize(("model", "upstream", "dropped"), [
    ("lenient/strict", "o4-mini", False),  # the model's drop_params: false wins over the provider's true
    ("oai/o3d", "o3-d", True),  # the model's drop_params: true under a provider without
    ("oai/o3", "o3", False),  # neither: sent as given
    ("oai/dep", "plant-brain", True),  # reasoning: true, a name not recognised
    ("lenient/gpt", "gpt-4o-mini", False),  # not a reasoning model: it takes them
])
def test_the_models_own_drop_params_and_reasoning(cloud: CloudStack, model: str, upstream: str,
                                                  dropped: bool) -> None:
    answer = cloud.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                    **SAMPLING)  # type: ignore[call-overload]
    assert answer.choices[0].message.content
    sent = last_body(cloud.openai_fake, upstream)
    if dropped:
        assert not set(SAMPLING) & set(sent), sent
    else:
        assert {k: sent.get(k) for k in SAMPLING} == SAMPLING


def test_the_cache_of_a_drop_params_model_keys_the_callers_parameters(cloud: CloudStack) -> None:
    """temperature 0 to lenient/o3: cached (a hit the second time, one call); the same prompt with another
    top_p is another entry (a miss, its own call), though both calls carried the same body."""
    client = cloud.client()
    prompt = [{"role": "user", "content": f"cache {uuid.uuid4().hex}"}]
    first = client.chat.completions.with_raw_response.create(model="lenient/o3", messages=prompt, temperature=0)
    again = client.chat.completions.with_raw_response.create(model="lenient/o3", messages=prompt, temperature=0)
    assert first.headers["x-leafwire-cache"] == "miss"
    assert again.headers["x-leafwire-cache"] == "hit"
    other = client.chat.completions.with_raw_response.create(model="lenient/o3", messages=prompt, temperature=0,
                                                             top_p=0.2)
    assert other.headers["x-leafwire-cache"] == "miss"
    assert calls_of(cloud.openai_fake, "o3-mini-2025-01-31") == 2


# -- drop_params: Anthropic


def test_anthropic_temperature_above_one_with_and_without_drop_params(cloud: CloudStack) -> None:
    """temperature 1.5: claudel/haiku (drop_params) answers, its call without a temperature; claudel/strict
    (the model's drop_params: false) and claude/haiku (none) are a 400 naming temperature, with no call."""
    client = cloud.client()
    answer = client.chat.completions.create(model="claudel/haiku", temperature=1.5,
                                            messages=[{"role": "user", "content": "hot"}])
    assert answer.choices[0].message.content
    assert "temperature" not in last_body(cloud.claude_fake, "claude-lenient")
    for model in ("claudel/strict", "claude/haiku"):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=model, temperature=1.5, messages=[{"role": "user", "content": "x"}])
        assert exc.value.param == "temperature"  # type: ignore[attr-defined]
    assert len(cloud.claude_fake.calls) == 1


def test_anthropic_drop_params_leaves_out_what_has_no_counterpart(cloud: CloudStack) -> None:
    """logprobs, top_logprobs, logit_bias, penalties, verbosity: answered with drop_params, none sent; without,
    a 400 ``unsupported_parameter``; a tool_choice Anthropic cannot say is refused either way."""
    client = cloud.client()
    extras = {"logprobs": True, "top_logprobs": 2, "logit_bias": {"5": 1}, "presence_penalty": 0.5,
              "frequency_penalty": 0.5}
    answer = client.chat.completions.create(model="claudel/haiku", messages=[{"role": "user", "content": "hi"}],
                                            extra_body={"verbosity": "low"}, **extras)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    sent = last_body(cloud.claude_fake, "claude-lenient")
    assert not (set(extras) | {"verbosity"}) & set(sent), sent
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="claudel/strict", messages=[{"role": "user", "content": "hi"}],
                                       presence_penalty=0.5)
    assert exc.value.code == "unsupported_parameter"  # type: ignore[attr-defined]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="claudel/haiku", messages=[{"role": "user", "content": "hi"}], tools=[tool],  # type: ignore[list-item]
            tool_choice={"type": "allowed_tools",  # type: ignore[arg-type]
                         "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "f"}}]}})
    assert exc.value.param == "tool_choice"  # type: ignore[attr-defined]
    assert len(cloud.claude_fake.calls) == 1


def test_anthropic_thinking_with_drop_params_leaves_out_sampling(cloud: CloudStack) -> None:
    """thinking through extra_body with temperature 0.5, top_p 0.5 and top_k: with drop_params the call has
    the thinking and none of them; without, they are sent as given (Anthropic's own 400 is the caller's)."""
    client = cloud.client()
    thinking = {"type": "enabled", "budget_tokens": 2000}
    client.chat.completions.create(model="claudel/haiku", messages=[{"role": "user", "content": "think"}],
                                   temperature=0.5, top_p=0.5, extra_body={"thinking": thinking, "top_k": 5})
    sent = last_body(cloud.claude_fake, "claude-lenient")
    assert sent["thinking"] == thinking
    assert not {"temperature", "top_p", "top_k"} & set(sent), sent
    assert sent["max_tokens"] == 64 + 2000
    client.chat.completions.create(model="claudel/strict", messages=[{"role": "user", "content": "think"}],
                                   temperature=0.5, top_p=0.5, extra_body={"thinking": thinking, "top_k": 5})
    sent = last_body(cloud.claude_fake, "claude-strict")
    assert (sent["temperature"], sent["top_p"], sent["top_k"]) == (0.5, 0.5, 5)


# -- leafwire providers validate


def _validate(tmp_path: Path, provider: dict[str, Any]) -> Any:
    file = tmp_path / "providers.yaml"
    base = {"name": "x", "kind": "openai-compatible", "base_url": "https://api.example.com/v1",
            "models": {"o3": {}}}
    file.write_text(json.dumps({"providers": [{**base, **provider}]}))
    return leafwire("providers", "validate", str(file))


def test_providers_validate_takes_the_new_fields(tmp_path: Path) -> None:
    good = _validate(tmp_path, {"drop_params": True, "rpm": 10, "tpm": 1000,
                                "models": {"o3": {"drop_params": False}, "dep": {"reasoning": True}}})
    assert good.returncode == 0, good.stdout + good.stderr
    assert "rpm 10" in good.stdout
    for bad in ({"drop_params": "maybe"}, {"models": {"o3": {"reasoning": 3}}}, {"models": {"o3": {"drop_params":
                                                                                                   "sometimes"}}},
                {"rpm": 0}, {"tpm": -5}):
        result = _validate(tmp_path, bad)
        assert result.returncode != 0, (bad, result.stdout)
