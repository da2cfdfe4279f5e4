"""QA: a model's own ``rpm``/``tpm`` (``models.<name>.rpm`` / ``tpm``) beside its provider's, kept by the site's
adapters together through KV ``provider-rates`` (docs/cloud.md: "The providers file", "Settings", "NATS
contracts").

The stack is test_cloud.py's ``cloud_stack`` (real nats-server, gateway, router, a hub cloud-adapter, the fake
OpenAI-compatible provider of tests/fakes.py), with one provider per test (a minute cannot be waited out), each
model with its own upstream name so the fake's calls can be told apart. A second adapter of the site is started
with ``running(Service("cloud_adapter", ...))``. Unit-level tests (an adapter in this process, as
tests/services/cloud_adapter/test_reload.py) cover reloads the e2e stack cannot time.

Probed:
- a model named ``ft:gpt-4o-mini:acme.v2@x`` (``.``, ``:``, ``@``) with rpm 2 on two adapters: 2 calls in all,
  refusals name the model; the ``provider-rates`` entries: keys ``<provider>.<worker>[.<16 hex>]``, values with
  ``model``, none for unlimited models.
- provider rpm and model rpm both set, two adapters: a refusal by the model leaves the provider's minute
  untouched (another model still gets the provider's calls), and (unit) a refusal by the provider leaves the
  model's minute untouched.
- a model's tpm: its calls' tokens count in the model's and the provider's minute; another model of the provider
  is unaffected.
- retries: a 500 then an answer counts twice in the model's minute; a provider 429 with Retry-After is retried
  and counted; a retry refused at the model's rpm gives the caller a 429 ``provider_rate_limit`` (Retry-After
  1..60) with no further call; a route with a fallback goes on to its next target on the model's 429.
- an embeddings model with its own rpm; a chat model of the same provider unaffected.
- text completions with a list of prompts (a call per prompt): each counts in the model's minute.
- a provider without ``n`` (``n: false``): n = 2 is a call per choice, each counted.
- reloads: a model's rpm lowered (count kept, also on the other adapter), a model's rpm removed and put back,
  a provider changed elsewhere (model minute kept).
- ``leafwire providers validate``: ``[rpm N, tpm M]`` per model, rpm 0 / tpm 0 on a model refused.

Findings (each was a strict xfail test; fixed since, and the tests below pass):
1. A model's rpm/tpm taken out of the providers file and put back within the minute (two reloads) starts the
   model's count afresh, while the provider's own rpm taken out and put back keeps the minute's calls (its
   ``MinuteLimits`` is kept by ``limit_to``): the docs say the model's limits work "the same as the provider's",
   and a reload "keeps the minute's count". The model's calls of the minute are forgotten by this adapter,
   though the other adapters' entries for them still count (``provider-rates``): the model gets up to its rpm
   again from this adapter. (upstream.py ``Upstream.keep_minutes``: only models with limits in *both* the old
   and the new entry keep their ``MinuteLimits``; ``Upstream.__init__`` builds ``model_limits`` only for
   limited models.)

Noted, not an xfail (a race, so a strict test would flake; since then a call is counted when it is sent,
``Upstream._post``, and its slot only checks, so a request cancelled before its call goes out fills no minute;
one cancelled while its call is being sent still counts, as the provider may well have counted it):
/v1/completions with three prompts sent to a model
with rpm 2. The gateway asks the three at once. The third is refused, so the gateway cancels the other two.
Those two are counted in the model's minute when their slot is taken (``Upstream.slot``), before the POST.
In some runs neither reached the fake provider (0 calls), yet the model's minute held 2 calls
(``provider-rates`` said ``calls: [[t, 2]]``), and every request for the rest of the minute got a 429.
In other runs both calls reached the provider first. So the rpm can be used up by calls the provider never
received.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import openai
import pytest

from services.cloud_adapter import app
from services.cloud_adapter.settings import CloudSettings
from shared.errors import Overloaded
from tests.e2e.test_cloud import CloudStack, cloud_stack
from tests.e2e.test_cloud import providers_file as base_providers
from tests.e2e.test_qa_rates_drop import adapter_like, ask, calls_of
from tests.fakes import FakeProvider, Fault
from tests.services.cloud_adapter.test_reload import send
from tests.support import NatsServer, leafwire, running

HEADERS = {"Authorization": "Bearer key-acme"}
SYNC_S = 0.1
OAI_KEY_ENV = "LW_TEST_FAKE_KEY"
ODD = "ft:gpt-4o-mini:acme.v2@x"
POLICY = """
last_resort: none
rules:
  - {name: fallback, when: {model: [fb/m]}, route: [requested, spare/echo]}
  - {name: default, route: [requested]}
"""
# provider name -> (provider fields, models)
PROVIDERS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    "odd": ({}, {ODD: {"upstream": "odd-ft", "rpm": 2}, "plain": {"upstream": "odd-plain"}}),
    "both": ({"rpm": 3}, {"a": {"upstream": "both-a", "rpm": 1}, "b": {"upstream": "both-b"}}),
    "mtok": ({"tpm": 100000}, {"t": {"upstream": "mtok-t", "tpm": 20}, "u": {"upstream": "mtok-u"}}),
    "mretry": ({}, {"m": {"upstream": "mretry-m", "rpm": 2}}),
    "mretry1": ({}, {"m": {"upstream": "mretry1-m", "rpm": 1}}),
    "m429": ({}, {"m": {"upstream": "m429-m", "rpm": 3}}),
    "fb": ({}, {"m": {"upstream": "fb-m", "rpm": 1}}),
    "spare": ({}, {"echo": {"upstream": "spare-echo"}}),
    "memb": ({}, {"vec": {"kind": "embeddings", "upstream": "memb-vec", "rpm": 1},
                  "chat": {"upstream": "memb-chat"}}),
    "mtext": ({}, {"m": {"upstream": "mtext-m", "rpm": 2}}),
    "nonn": ({"n": False}, {"m": {"upstream": "nonn-m", "rpm": 2}}),
    "mreload": ({}, {"m": {"upstream": "mreload-m", "rpm": 3}}),
}


def write_providers(path: Path, oai: FakeProvider, claude: FakeProvider) -> Path:
    base_providers(path, oai, claude)
    config = json.loads(path.read_text())
    common = {"kind": "openai-compatible", "base_url": oai.url, "local": True, "api_key_env": OAI_KEY_ENV,
              "timeouts": {"connect_s": 2, "first_byte_s": 5, "total_s": 10}}
    for name, (fields, models) in PROVIDERS.items():
        config["providers"].append({**common, "name": name, **fields, "models": models})
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def cloud(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudStack]:
    with cloud_stack(nats_server, tmp_path_factory.mktemp("qa-model-limits"), write=write_providers,
                     policy=POLICY, LW_CLOUD_RATE_SYNC_S=str(SYNC_S), LW_CLOUD_STATE_CHECK_S="1",
                     LW_CLOUD_PROVIDERS_CHECK_S="0.5", LW_CLOUD_N_RECHECK_S="0") as stack:
        yield stack


@pytest.fixture
def fresh(cloud: CloudStack) -> CloudStack:
    cloud.openai_fake.reset()
    cloud.claude_fake.reset()
    return cloud


def assert_refusal(r: httpx.Response, names: str, what: str = "rpm") -> None:
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == "provider_rate_limit", r.text
    assert names in err["message"], err["message"]
    assert what in err["message"], err["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60, r.headers.get("retry-after")


async def _rate_entries(url: str) -> dict[str, dict[str, Any]]:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("provider-rates")
        try:
            keys = list(await kv.keys())
        except Exception:  # no keys
            return {}
        out = {}
        for key in keys:
            entry = await kv.get(key)
            if entry.value:
                out[key] = json.loads(entry.value)
        return out
    finally:
        await nc.drain()


# -- a model's rpm kept by the site's adapters


@pytest.mark.e2e
def test_odd_model_name_rpm_kept_by_two_adapters_and_its_bucket_entries(fresh: CloudStack) -> None:
    """``ft:gpt-4o-mini:acme.v2@x`` rpm 2 (its provider unlimited), two adapters, requests paced past the sync:
    the model gets 2 calls in all, every other request is a 429 naming the model; ``odd/plain`` is answered.
    ``provider-rates`` holds the model's entries under valid keys, with ``model`` set, and none for ``plain``
    nor for the unlimited provider itself."""
    cloud = fresh
    with running(adapter_like(cloud)):
        answers = []
        for _ in range(10):
            answers.append(ask(cloud, f"odd/{ODD}"))
            time.sleep(3 * SYNC_S)
        ok = [r for r in answers if r.status_code == 200]
        assert len(ok) == 2, [(r.status_code, r.text[:120]) for r in answers]
        for r in answers:
            if r.status_code != 200:
                assert_refusal(r, f"model {ODD} of provider odd")
        assert calls_of(cloud.openai_fake, "odd-ft") == 2
        assert [ask(cloud, "odd/plain").status_code for _ in range(3)] == [200] * 3
        time.sleep(3 * SYNC_S)
        entries = {k: v for k, v in asyncio.run(_rate_entries(cloud.nats.url)).items() if v["provider"] == "odd"}
    assert entries, "no provider-rates entry for odd"
    for key, value in entries.items():
        assert re.fullmatch(r"odd\.ca-[0-9a-f]{8}\.[0-9a-f]{16}", key), key
        assert value["model"] == ODD, value
    assert sum(n for v in entries.values() for _, n in v["calls"]) == 2, entries


@pytest.mark.e2e
def test_a_model_refusal_leaves_the_providers_minute_untouched_across_adapters(fresh: CloudStack) -> None:
    """Provider ``both`` rpm 3, its model ``a`` rpm 1, two adapters: ``a`` answered once then refused (naming
    the model) several times; those refusals count nowhere, so ``b`` still gets the provider's two other
    calls; then ``b`` is refused naming the provider."""
    cloud = fresh
    with running(adapter_like(cloud)):
        assert ask(cloud, "both/a").status_code == 200
        time.sleep(3 * SYNC_S)
        for _ in range(4):
            assert_refusal(ask(cloud, "both/a"), "model a of provider both")
            time.sleep(3 * SYNC_S)
        statuses = []
        for _ in range(2):
            statuses.append(ask(cloud, "both/b").status_code)
            time.sleep(3 * SYNC_S)
        assert statuses == [200, 200], statuses
        for _ in range(3):
            r = ask(cloud, "both/b")
            assert_refusal(r, "provider both had 3 calls")
            time.sleep(3 * SYNC_S)
    assert calls_of(cloud.openai_fake, "both-a") == 1
    assert calls_of(cloud.openai_fake, "both-b") == 2


@pytest.mark.e2e
def test_a_models_tpm_counts_its_tokens_apart(fresh: CloudStack) -> None:
    """``mtok/t`` tpm 20 (the provider's 100000): answered until its reported tokens reach 20, then a 429
    naming the model and tpm; ``mtok/u`` still answered; the tokens of ``t`` counted in the provider's minute
    too (its bucket entry)."""
    cloud = fresh
    used = 0
    for _ in range(20):
        r = ask(cloud, "mtok/t")
        if r.status_code != 200:
            assert_refusal(r, "model t of provider mtok", "tpm")
            break
        used += r.json()["usage"]["total_tokens"]
    else:
        pytest.fail("never refused")
    assert used >= 20
    assert ask(cloud, "mtok/u").status_code == 200
    time.sleep(5 * SYNC_S)
    entries = asyncio.run(_rate_entries(cloud.nats.url))
    own = cloud_adapter_entries(entries, "mtok")
    provider_tokens = sum(n for v in own if v["model"] is None for _, n in v["tokens"])
    model_tokens = sum(n for v in own if v["model"] == "t" for _, n in v["tokens"])
    assert model_tokens == used, own
    assert provider_tokens >= used, own  # u's tokens too
    assert not [v for v in own if v["model"] == "u"], own


def cloud_adapter_entries(entries: dict[str, dict[str, Any]], provider: str) -> list[dict[str, Any]]:
    return [v for v in entries.values() if v["provider"] == provider]


# -- retries


@pytest.mark.e2e
def test_a_retry_counts_in_the_models_minute(fresh: CloudStack) -> None:
    """``mretry/m`` rpm 2: a 500 then an answer is two calls of the model's minute; the next request is a 429
    naming the model, without a call."""
    cloud = fresh
    cloud.openai_fake.script(Fault.error(500))
    assert ask(cloud, "mretry/m").status_code == 200
    assert calls_of(cloud.openai_fake, "mretry-m") == 2
    assert_refusal(ask(cloud, "mretry/m"), "model m of provider mretry")
    assert calls_of(cloud.openai_fake, "mretry-m") == 2


@pytest.mark.e2e
def test_a_retry_refused_at_the_models_rpm_is_a_429(fresh: CloudStack) -> None:
    """``mretry1/m`` rpm 1: the first try gets a 500; its retry would pass the model's rpm: not made, and the
    caller gets the 429 ``provider_rate_limit`` with a Retry-After in 1..60."""
    cloud = fresh
    cloud.openai_fake.script(Fault.error(500))
    r = ask(cloud, "mretry1/m")
    assert calls_of(cloud.openai_fake, "mretry1-m") == 1
    assert_refusal(r, "model m of provider mretry1")


@pytest.mark.e2e
def test_a_providers_429_is_retried_and_counted(fresh: CloudStack) -> None:
    """``m429/m`` rpm 3: the provider's 429 (Retry-After 0) then an answer: two calls counted; one more
    request answered, the fourth refused naming the model."""
    cloud = fresh
    cloud.openai_fake.script(Fault.error(429, retry_after="0"))
    assert ask(cloud, "m429/m").status_code == 200
    assert calls_of(cloud.openai_fake, "m429-m") == 2
    assert ask(cloud, "m429/m").status_code == 200
    assert_refusal(ask(cloud, "m429/m"), "model m of provider m429")
    assert calls_of(cloud.openai_fake, "m429-m") == 3


@pytest.mark.e2e
def test_a_route_falls_back_past_a_model_at_its_rpm(fresh: CloudStack) -> None:
    """``fb/m`` rpm 1 routed [requested, spare/echo]: the second request of the minute is answered by
    ``spare/echo``, the route naming the model's 429."""
    cloud = fresh
    first = ask(cloud, "fb/m")
    assert first.status_code == 200, first.text
    r = ask(cloud, "fb/m")
    assert r.status_code == 200, r.text
    route = r.headers["x-leafwire-route"]
    assert route.startswith("target=spare/echo;"), route
    assert "fell back from fb/m (429 provider_rate_limit)" in route
    assert calls_of(cloud.openai_fake, "fb-m") == 1


# -- kinds of requests


@pytest.mark.e2e
def test_an_embeddings_models_own_rpm(fresh: CloudStack) -> None:
    """``memb/vec`` (embeddings) rpm 1: a second embeddings request is refused naming the model; the provider's
    chat model is answered."""
    cloud = fresh
    client = cloud.client()
    client.embeddings.create(model="memb/vec", input=[f"a {uuid.uuid4().hex}"])
    with pytest.raises(openai.RateLimitError) as exc:
        client.embeddings.create(model="memb/vec", input=[f"b {uuid.uuid4().hex}"])
    assert "model vec of provider memb" in str(exc.value)
    assert ask(cloud, "memb/chat").status_code == 200
    assert calls_of(cloud.openai_fake, "memb-vec") == 1


@pytest.mark.e2e
def test_text_completions_of_several_prompts_count_a_call_each(fresh: CloudStack) -> None:
    """``mtext/m`` rpm 2: /v1/completions with three prompts asks a call per prompt (at once): the third is
    refused, so the request is a 429 naming the model, and at most two calls reach the provider; nothing more
    is let through in the minute. (The two others are cancelled with the request: whether they were sent
    before is a race; one cancelled before its call goes out is not counted, one cancelled while it is sent
    is, whether or not the provider read it.)"""
    cloud = fresh
    body = {"model": "mtext/m", "prompt": [f"p{i} {uuid.uuid4().hex[:6]}" for i in range(3)], "max_tokens": 8}
    r = httpx.post(f"{cloud.gateway.base}/v1/completions", json=body, headers=HEADERS, timeout=30)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "provider_rate_limit"
    assert "model m of provider mtext" in r.json()["error"]["message"]
    assert calls_of(cloud.openai_fake, "mtext-m") <= 2
    time.sleep(0.3)
    made = calls_of(cloud.openai_fake, "mtext-m")
    later = [ask(cloud, "mtext/m").status_code for _ in range(3)]
    assert later.count(200) <= 2 - made, (made, later)
    assert calls_of(cloud.openai_fake, "mtext-m") <= 2


@pytest.mark.e2e
def test_n_choices_one_by_one_count_a_call_each(fresh: CloudStack) -> None:
    """``nonn`` has no ``n``: n = 2 on ``nonn/m`` (rpm 2) is a call per choice, two calls in the model's
    minute: the next request is refused naming the model."""
    cloud = fresh
    r = ask(cloud, "nonn/m", n=2)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2
    assert calls_of(cloud.openai_fake, "nonn-m") == 2
    assert_refusal(ask(cloud, "nonn/m"), "model m of provider nonn")
    assert calls_of(cloud.openai_fake, "nonn-m") == 2


# -- reloads (e2e)


@pytest.mark.e2e
def test_a_reload_lowering_a_models_rpm_keeps_the_sites_minute(fresh: CloudStack) -> None:
    """``mreload/m`` rpm 3, two adapters, two calls made; the file lowers it to 2 (both adapters reload): every
    request of the minute is then refused naming ``rpm (2)``, whichever adapter takes it."""
    cloud = fresh
    file = Path(cloud.adapter.env["LW_PROVIDERS_FILE"])
    original = file.read_text()
    try:
        with running(adapter_like(cloud)):
            for _ in range(2):
                assert ask(cloud, "mreload/m").status_code == 200
                time.sleep(3 * SYNC_S)
            config = json.loads(original)
            entry = next(p for p in config["providers"] if p["name"] == "mreload")
            entry["models"]["m"]["rpm"] = 2
            entry["max_concurrent"] = 7  # something else of the entry changed too
            file.write_text(json.dumps(config))
            time.sleep(2.5)  # both adapters have reloaded (LW_CLOUD_PROVIDERS_CHECK_S 0.5)
            for _ in range(6):
                assert_refusal(ask(cloud, "mreload/m"), "model m of provider mreload", "rpm (2)")
                time.sleep(2 * SYNC_S)
        assert calls_of(cloud.openai_fake, "mreload-m") == 2
    finally:
        file.write_text(original)
        time.sleep(1.5)


# -- unit level: reloads in an adapter of this process

KEY_ENV = "LW_TEST_QA22_KEY"


def provider(name: str, models: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"name": name, "kind": "openai-compatible", "base_url": "http://127.0.0.1:9/v1", "local": True,
            "api_key_env": KEY_ENV, "models": models, **more}


def write(path: Path, providers: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"providers": providers}))


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CloudSettings:
    monkeypatch.setenv(KEY_ENV, "sk-qa22-0123456789")
    file = tmp_path / "providers.yaml"
    write(file, [provider("a", {"m": {}})])
    return CloudSettings(LW_PROVIDERS_FILE=file, LW_CLOUD_PROVIDERS_CHECK_S=0)


async def test_a_provider_refusal_leaves_the_models_minute_untouched(settings: CloudSettings) -> None:
    """Provider rpm 1, its model ``big`` rpm 2: ``big`` once, then refused by the provider (twice); the
    provider's rpm raised to 10 by a reload: ``big`` gets exactly one more call (its minute holds one), then is
    refused naming the model."""
    write(settings.providers_file, [provider("a", {"big": {"rpm": 2}}, rpm=1)])
    adapter = app.load_adapter(settings)
    await adapter.open_upstreams()
    try:
        send(adapter.upstreams["a"], "big")
        for _ in range(2):
            with pytest.raises(Overloaded) as exc:
                adapter.upstreams["a"].slot("big")
            assert exc.value.message.startswith("provider a had 1 calls"), exc.value.message
        write(settings.providers_file, [provider("a", {"big": {"rpm": 2}}, rpm=10)])
        assert await app.reload_providers(adapter, settings)
        send(adapter.upstreams["a"], "big")
        with pytest.raises(Overloaded) as exc:
            adapter.upstreams["a"].slot("big")
        assert "model big of provider a had 2 calls" in exc.value.message
    finally:
        await adapter.close_upstreams()


async def test_a_provider_rpm_taken_out_and_put_back_keeps_its_minute(settings: CloudSettings) -> None:
    """The provider's own rpm 1, reached; the file takes it out, then puts it back: the minute's call still
    counts (the reference behaviour for the model's limits below)."""
    write(settings.providers_file, [provider("a", {"m": {}}, rpm=1)])
    adapter = app.load_adapter(settings)
    await adapter.open_upstreams()
    try:
        send(adapter.upstreams["a"], "m")
        write(settings.providers_file, [provider("a", {"m": {}})])
        assert await app.reload_providers(adapter, settings)
        write(settings.providers_file, [provider("a", {"m": {}}, rpm=1)])
        assert await app.reload_providers(adapter, settings)
        with pytest.raises(Overloaded):
            adapter.upstreams["a"].slot("m")
    finally:
        await adapter.close_upstreams()


async def test_a_models_rpm_taken_out_and_put_back_keeps_its_minute(settings: CloudSettings) -> None:
    """The model's own rpm 1, reached; the file takes it out (the provider changed), then puts it back within
    the minute: as for the provider's rpm, the minute's call still counts and the next call is refused."""
    write(settings.providers_file, [provider("a", {"big": {"rpm": 1}})])
    adapter = app.load_adapter(settings)
    await adapter.open_upstreams()
    try:
        send(adapter.upstreams["a"], "big")
        write(settings.providers_file, [provider("a", {"big": {}})])
        assert await app.reload_providers(adapter, settings)
        write(settings.providers_file, [provider("a", {"big": {"rpm": 1}})])
        assert await app.reload_providers(adapter, settings)
        with pytest.raises(Overloaded):
            adapter.upstreams["a"].slot("big")
    finally:
        await adapter.close_upstreams()


async def test_a_reload_changing_something_else_keeps_the_models_minute_and_tally(settings: CloudSettings) -> None:
    """The model's tpm 10 and rpm 5, a call made and 12 tokens used; the provider's key header changed: the
    model's minute is kept (refused naming tpm) and its tally still says the call and tokens, with ``model``."""
    write(settings.providers_file, [provider("a", {"big": {"rpm": 5, "tpm": 10}, "small": {}})])
    adapter = app.load_adapter(settings)
    await adapter.open_upstreams()
    try:
        send(adapter.upstreams["a"], "big")
        adapter.upstreams["a"].used("big", 12)
        write(settings.providers_file, [provider("a", {"big": {"rpm": 5, "tpm": 10}, "small": {}},
                                                 headers={"X-Team": "qa"})])
        assert await app.reload_providers(adapter, settings)
        with pytest.raises(Overloaded) as exc:
            adapter.upstreams["a"].slot("big")
        assert "model big of provider a" in exc.value.message
        assert "tpm (10)" in exc.value.message
        tallies = adapter.rate_tallies(again=True)
        assert [(t.model, sum(n for _, n in t.calls), sum(n for _, n in t.tokens)) for t in tallies] == [
            ("big", 1, 12)]
    finally:
        await adapter.close_upstreams()


# -- leafwire providers validate


def _validate(tmp_path: Path, models: dict[str, Any], **more: Any) -> Any:
    file = tmp_path / "providers.yaml"
    base = {"name": "x", "kind": "openai-compatible", "base_url": "https://api.example.com/v1", "models": models,
            **more}
    file.write_text(json.dumps({"providers": [base]}))
    return leafwire("providers", "validate", str(file))


def test_providers_validate_shows_and_checks_a_models_limits(tmp_path: Path) -> None:
    """Each model with limits shows ``[rpm N, tpm M]``; rpm 0, tpm 0 or a negative on a model are refused."""
    good = _validate(tmp_path, {ODD: {"rpm": 5, "tpm": 1000}, "vec": {"kind": "embeddings", "rpm": 7},
                                "free": {}}, rpm=50)
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"{ODD} [rpm 5, tpm 1000]" in good.stdout, good.stdout
    assert "vec [embeddings] [rpm 7]" in good.stdout, good.stdout
    assert "free [" not in good.stdout, good.stdout
    assert "rpm 50" in good.stdout
    for bad in ({"rpm": 0}, {"tpm": 0}, {"rpm": -1}, {"rpm": "many"}, {"rpm": 10_000_001}):
        result = _validate(tmp_path, {"m": bad})
        assert result.returncode != 0, (bad, result.stdout)
