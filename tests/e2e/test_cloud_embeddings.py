"""Embeddings of cloud models end to end: the official openai client -> gateway -> router -> cloud-adapter -> the
fake OpenAI-compatible provider's /embeddings.

The stack is test_cloud.py's (its fixture, started again for this module): site ``plant`` without an adapter
of its own, the hub's adapter, providers ``fake``, ``flaky``, ``wrongkey`` and ``priced`` with an embeddings
model ``embed``. The fake makes each input's vector from its text (``tests.fakes.vector``), so every test
knows the vector each input must get.
"""

from __future__ import annotations

import base64
import struct
import uuid
from typing import Any

import httpx
import openai
import pytest

from tests.e2e import test_cloud
from tests.e2e.test_cloud import API_KEYS, KEY, MESSAGES, CloudStack, subscribe, usage_event
from tests.fakes import DIMENSIONS, Fault, vector
from tests.support import Service, eventually, metric, running

pytestmark = pytest.mark.e2e
cloud = test_cloud.cloud  # the same stack as test_cloud.py's, for this module
fresh_fakes = test_cloud._fresh_fakes
TEXTS = ["The pump on line 3 is leaking oil.", "hello", "Check the hydraulic pressure before restarting."]


def post(cloud: CloudStack, body: dict[str, Any], key: str = "key-acme", **headers: str) -> httpx.Response:
    return httpx.post(f"{cloud.gateway.base}/v1/embeddings", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}", **headers})


def floats(values: list[float] | str) -> list[float]:
    """A vector as the openai client gives it (floats), or as base64 little-endian float32 decodes."""
    if isinstance(values, str):
        raw = base64.b64decode(values)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return values


class TestAnswers:
    def test_whole_answer_in_openai_shape(self, cloud: CloudStack) -> None:
        """A cloud embeddings model answers OpenAI's list through the openai client: each input's vector at its
        index, usage, the name asked for; the route and the hub's adapter in the headers; the provider got its
        own model name, the key, and every parameter as sent."""
        raw = cloud.client().embeddings.with_raw_response.create(
            model="fake/embed", input=TEXTS, encoding_format="float", dimensions=16, user="op-7")
        r = raw.parse()
        assert r.model == "fake/embed"
        assert [d.index for d in r.data] == [0, 1, 2]
        assert [d.embedding for d in r.data] == [vector(t, 16) for t in TEXTS]
        assert r.usage.prompt_tokens == r.usage.total_tokens == 15
        assert raw.headers["x-leafwire-route"].startswith("target=fake/embed; rule=embeddings")
        assert raw.headers["x-leafwire-served-by"].startswith("hub/ca-")
        (call,) = cloud.openai_fake.calls
        assert call.path == "/v1/embeddings"
        assert call.headers["Authorization"] == f"Bearer {KEY}"
        assert call.body == {"model": "embed-1", "input": TEXTS, "encoding_format": "float", "dimensions": 16,
                             "user": "op-7"}

    def test_base64_is_asked_of_the_provider_and_decodes_to_the_vectors(self, cloud: CloudStack) -> None:
        """The openai client's default (base64) goes to the provider as such, and the client decodes the
        answer to the same vectors."""
        r = cloud.client().embeddings.create(model="fake/embed", input=TEXTS)
        assert [d.embedding for d in r.data] == [vector(t) for t in TEXTS]
        assert cloud.openai_fake.calls[0].body["encoding_format"] == "base64"
        assert "dimensions" not in cloud.openai_fake.calls[0].body  # the provider's own size: 8 for the fake
        assert len(r.data[0].embedding) == DIMENSIONS
        plain = post(cloud, {"model": "fake/embed", "input": "hello", "encoding_format": "base64"}).json()
        assert isinstance(plain["data"][0]["embedding"], str)
        assert floats(plain["data"][0]["embedding"]) == vector("hello")

    def test_token_ids_reach_the_provider_as_given(self, cloud: CloudStack) -> None:
        """A cloud model takes OpenAI's token ids: they are sent as given (where a local model refuses them)."""
        r = cloud.client().embeddings.create(model="fake/embed", input=[[101, 2023, 102], [7]],
                                             encoding_format="float")
        assert [d.embedding for d in r.data] == [vector([101, 2023, 102]), vector([7])]
        assert cloud.openai_fake.calls[0].body["input"] == [[101, 2023, 102], [7]]

    def test_order_is_kept_across_the_gateways_parts(self, cloud: CloudStack) -> None:
        """600 inputs go to the site in parts: of 256 for base64 vectors (three provider calls), of 64 for float
        ones (ten: float JSON is ~4x the bytes); the answer holds every vector in input order, and the usage of
        all the parts."""
        many = [f"gauge {i} reads {i * 7 % 50} bar" for i in range(600)]
        for encoding, parts in (("base64", [88, 256, 256]), ("float", [24] + [64] * 9)):
            cloud.openai_fake.reset()
            asked: dict[str, Any] = {} if encoding == "base64" else {"encoding_format": "float"}  # base64: the
            r = cloud.client().embeddings.create(model="fake/embed", input=many, **asked)  # client's default
            assert {c.body["encoding_format"] for c in cloud.openai_fake.calls} == {encoding}
            assert [d.index for d in r.data] == list(range(600))
            assert [d.embedding for d in r.data] == [vector(t) for t in many]
            assert sorted(len(c.body["input"]) for c in cloud.openai_fake.calls) == parts
            assert r.usage.prompt_tokens == 600 * 5  # five words each

    def test_inputs_are_masked_before_leaving_the_site(self, cloud: CloudStack) -> None:
        """Personal data in the inputs is masked, as in chat prompts, before the provider sees them."""
        cloud.client().embeddings.create(model="fake/embed", input=["mail jane.doe@plant.example", "line 3"])
        assert cloud.openai_fake.calls[0].body["input"] == ["mail [EMAIL]", "line 3"]

    def test_models_list_names_the_embeddings_model(self, cloud: CloudStack) -> None:
        """GET /v1/models lists the cloud embeddings model with its kind and where it is served from."""
        def listed() -> dict[str, Any] | None:
            cards = {m.id: m.model_extra for m in cloud.client().models.list().data}
            return cards if "fake/embed" in cards else None
        cards = eventually(listed, 10, "the embeddings model in the catalog")
        assert cards["fake/embed"]["kind"] == "embeddings"
        assert cards["fake/embed"]["locations"] == [{"site": "hub", "workers": 1}]
        assert cards["fake/echo"]["kind"] == "chat"


class TestAccounting:
    def test_a_usage_event_with_its_cost(self, cloud: CloudStack) -> None:
        """Each call leaves a usage event: the tokens read, no output, their cost at the input price ($2 a
        million here); the requests metric counts it as chat's do."""
        before = metric(cloud.adapter.metrics(), "leafwire_cloud_requests_total", provider="fake", model="embed",
                        outcome="ok")
        raw = cloud.client("key-globex").embeddings.with_raw_response.create(model="fake/embed", input=TEXTS)
        event = eventually(lambda: usage_event(cloud, raw.headers["x-request-id"]), 10, "the usage event")
        assert (event["tenant"], event["target"], event["outcome"]) == ("globex", "fake/embed", "ok")
        assert (event["prompt_tokens"], event["completion_tokens"]) == (15, 0)
        assert event["cost_usd"] == pytest.approx(15 * 2 / 1e6)
        assert metric(cloud.adapter.metrics(), "leafwire_cloud_requests_total", provider="fake", model="embed",
                      outcome="ok") == before + 1

    def test_a_spent_budget_is_429(self, cloud: CloudStack) -> None:
        """Tenant `broke` ($0.001 a day) spends $0.002 on one call ($1000 a million tokens); the next is a 429
        budget_exceeded with Retry-After, and the provider is not called again."""
        assert post(cloud, {"model": "priced/embed", "input": "hello there"}, key="key-broke").status_code == 200
        r = post(cloud, {"model": "priced/embed", "input": "hello there"}, key="key-broke")
        assert r.status_code == 429
        assert (r.json()["error"]["code"], r.json()["error"]["type"]) == ("budget_exceeded", "insufficient_quota")
        assert int(r.headers["retry-after"]) >= 1
        assert len(cloud.openai_fake.calls) == 1


class TestResilience:
    def test_429_with_retry_after_is_retried(self, cloud: CloudStack) -> None:
        """A rate-limited call is tried again after the provider's Retry-After; the caller gets its vectors."""
        cloud.openai_fake.script(Fault.error(429, Retry_After="1"))
        r = cloud.client().embeddings.create(model="fake/embed", input="hello", encoding_format="float")
        assert r.data[0].embedding == vector("hello")
        first, second = cloud.openai_fake.calls
        assert second.at - first.at >= 1.0

    def test_provider_failures_open_the_breaker(self, cloud: CloudStack) -> None:
        """Three 500s: the caller gets a 502 upstream_error after the retries, `flaky`'s breaker opens, and the
        next request is a 503 provider_unavailable with Retry-After, without a call to the provider."""
        cloud.openai_fake.script(*[Fault.error(500)] * 3)
        failed = post(cloud, {"model": "flaky/embed", "input": "hello"})
        assert failed.status_code == 502
        assert failed.json()["error"]["code"] == "upstream_error"
        eventually(lambda: metric(cloud.adapter.metrics(), "leafwire_cloud_breaker_state", provider="flaky") == 2,
                   10, "the breaker to open")
        r = post(cloud, {"model": "flaky/embed", "input": "hello"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "provider_unavailable"
        assert 1 <= int(r.headers["retry-after"]) <= test_cloud.OPEN_S
        assert len(cloud.openai_fake.calls) == 3

    def test_a_provider_400_is_relayed(self, cloud: CloudStack) -> None:
        """A request the provider refuses gets its message, param and code as a 400, once (not retried)."""
        cloud.openai_fake.script(Fault.error(400, {"error": {
            "message": "dimensions too large", "type": "invalid_request_error", "param": "dimensions",
            "code": None}}))
        with pytest.raises(openai.BadRequestError) as exc:
            cloud.client().embeddings.create(model="fake/embed", input="hello", dimensions=99_999)
        assert exc.value.body == {"message": "fake: dimensions too large", "type": "invalid_request_error",
                                  "param": "dimensions", "code": None}
        assert len(cloud.openai_fake.calls) == 1

    def test_an_answer_that_is_no_list_of_one_vector_an_input_is_502(self, cloud: CloudStack) -> None:
        """A provider answering two vectors for three inputs (three times: it is retried) is a 502
        upstream_bad_response, not a short list."""
        short = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [0.5]} for i in (0, 1)],
                 "usage": {"prompt_tokens": 3, "total_tokens": 3}}
        cloud.openai_fake.script(*[Fault.error(200, short)] * 3)
        r = post(cloud, {"model": "fake/embed", "input": TEXTS, "cache": False})  # the provider's answer
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_bad_response"
        assert "2 vectors for 3 inputs" in r.json()["error"]["message"]


class TestRefusals:
    def test_onsite_residency_is_refused(self, cloud: CloudStack) -> None:
        """x-leafwire-residency: onsite keeps the request on the site: a cloud embeddings model is a 403
        data_residency, as chat's is, and the provider is not called."""
        r = post(cloud, {"model": "fake/embed", "input": "hello"}, **{"x-leafwire-residency": "onsite"})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "data_residency"
        assert cloud.openai_fake.calls == []

    @pytest.mark.parametrize("model", ["fake/nope", "nobody/embed", "keyless/embed"])
    def test_unknown_cloud_models_are_404(self, cloud: CloudStack, model: str) -> None:
        """A cloud model no provider has as an embeddings model is a 404 model_not_found naming it."""
        r = post(cloud, {"model": model, "input": "hello"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert model in r.json()["error"]["message"]
        assert cloud.openai_fake.calls == []

    def test_a_chat_request_to_an_embeddings_model_and_the_other_way(self, cloud: CloudStack) -> None:
        """Chat of an embeddings model, and vectors of a chat model, are each a 404 model_not_found (param
        `model`, as a local model of the other kind gets) saying what the model is for."""
        with pytest.raises(openai.NotFoundError) as chat:
            cloud.client().chat.completions.create(model="fake/embed", messages=MESSAGES)
        assert (chat.value.code, chat.value.param) == ("model_not_found", "model")  # type: ignore[attr-defined]
        assert "is an embeddings model" in chat.value.message
        with pytest.raises(openai.NotFoundError) as vectors:
            cloud.client().embeddings.create(model="fake/echo", input="hello")
        assert "is a chat model" in vectors.value.message
        assert cloud.openai_fake.calls == []

    def test_uplink_down_is_503(self, cloud: CloudStack) -> None:
        """A site whose uplink is down does not send embeddings to a cloud model: 503 uplink_down with
        Retry-After, as chat gets; no local model answers instead."""
        env = {"LW_NATS_URL": cloud.nats.url, "LW_SITE": "cutoff"}
        router = Service("router", {**env, "LW_ROUTER_UPLINK": "down"})
        gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": API_KEYS})
        with running(router, gateway):
            r = httpx.post(f"{gateway.base}/v1/embeddings", json={"model": "fake/embed", "input": "hello"},
                           headers={"Authorization": "Bearer key-acme"}, timeout=30)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "uplink_down"
        assert r.headers["retry-after"] == "5"
        assert cloud.openai_fake.calls == []


class TestSecrets:
    def test_keys_never_reach_callers_nats_or_logs(self, cloud: CloudStack) -> None:
        """Around an answer, a provider refusing the key (and echoing it) and a 400 that echoes it: no key in
        what callers get, on NATS, or in the adapter's debug log."""
        traffic = subscribe(cloud, ">")
        cloud.openai_fake.script(Fault.ok(), Fault.error(400, {"error": {
            "message": f"bad input for Bearer {KEY}", "type": "invalid_request_error", "param": "input"}}))
        answers = [post(cloud, {"model": "fake/embed", "input": "hello", "cache": False}),
                   post(cloud, {"model": "fake/embed", "input": "hello", "cache": False}),
                   post(cloud, {"model": "wrongkey/embed", "input": "hello"})]
        assert [a.status_code for a in answers] == [200, 400, 502]
        assert answers[2].json()["error"]["code"] == "upstream_auth_failed"
        seen = traffic.raw(1)
        log = cloud.adapter.log_path.read_text()  # type: ignore[union-attr]
        for key in (KEY, test_cloud.WRONG_KEY):
            assert all(key not in a.text for a in answers)
            assert key.encode() not in seen
            assert key not in log
        assert b"lw.v1.hub.cloud.embeddings" in seen  # the capture did see the traffic (the hub adapter's subject)


def test_embeddings_user_is_masked_before_leaving_the_site(cloud: CloudStack) -> None:
    """`user` (commonly the end user's e-mail address) is masked before it leaves the site, as a chat
    request's is."""
    cloud.client().embeddings.create(model="fake/embed", input=["line 3"], user="jane.doe@plant.example",
                                     extra_body={"cache": False})
    (call,) = cloud.openai_fake.calls
    assert call.body["user"] == "[EMAIL]"


def test_the_leafwire_cache_field_is_not_sent_to_the_embeddings_provider(cloud: CloudStack) -> None:
    """`cache` is leafwire's field: not sent on (OpenAI would refuse it as an unrecognized argument), so a
    client sending `extra_body={"cache": False}` with every call works for embeddings too."""
    cloud.client().embeddings.create(model="fake/embed", input="hello", extra_body={"cache": False})
    (call,) = cloud.openai_fake.calls
    assert "cache" not in call.body


def test_base64_asked_is_base64_even_when_the_provider_answers_floats(cloud: CloudStack) -> None:
    """A provider that ignores `encoding_format` and answers floats: the caller who asked base64 gets base64."""
    cloud.openai_fake.script(Fault.raw(body={
        "object": "list", "model": "embed-1", "data": [{"object": "embedding", "index": 0, "embedding": [0.25, 0.5]}],
        "usage": {"prompt_tokens": 1, "total_tokens": 1}}))
    r = post(cloud, {"model": "fake/embed", "input": "hello", "encoding_format": "base64", "cache": False})
    assert r.status_code == 200
    assert floats(r.json()["data"][0]["embedding"]) == [0.25, 0.5]  # a string, little-endian float32


class TestCache:
    """Each input's vector is stored (``x-leafwire-cache``); inputs asked again are not sent to the provider."""

    @staticmethod
    def texts(n: int) -> list[str]:
        """Inputs no other test asks for (the cache outlives a test)."""
        tag = uuid.uuid4().hex[:8]
        return [f"valve {tag} {i} is stuck" for i in range(n)]

    def test_the_same_inputs_again_are_not_sent_to_the_provider(self, cloud: CloudStack) -> None:
        """The second time: the same vectors and usage, a hit, no provider call, and a usage event marked
        cached that costs nothing."""
        texts = self.texts(3)
        first = cloud.client().embeddings.with_raw_response.create(model="fake/embed", input=texts,
                                                                   encoding_format="float")
        again = cloud.client().embeddings.with_raw_response.create(model="fake/embed", input=texts,
                                                                   encoding_format="float")
        assert (first.headers["x-leafwire-cache"], again.headers["x-leafwire-cache"]) == ("miss", "hit")
        assert len(cloud.openai_fake.calls) == 1
        assert [d.embedding for d in again.parse().data] == [vector(t) for t in texts]
        assert again.parse().usage == first.parse().usage
        event = eventually(lambda: usage_event(cloud, again.headers["x-request-id"]), 10, "the usage event")
        assert (event["outcome"], event["cached"], event["cost_usd"]) == ("ok", True, 0)
        assert event["prompt_tokens"] == first.parse().usage.prompt_tokens  # what it would have read, as chat's

    def test_only_the_inputs_not_stored_go_to_the_provider(self, cloud: CloudStack) -> None:
        """Inputs partly asked before: the provider gets only the new ones, the answer every vector in input
        order (partial), its usage the tokens of all; the usage event counts the tokens paid for."""
        a, b, c = self.texts(3)
        cloud.client().embeddings.create(model="fake/embed", input=[a, b], encoding_format="float")
        cloud.openai_fake.reset()
        r = cloud.client().embeddings.with_raw_response.create(model="fake/embed", input=[b, c, a],
                                                               encoding_format="float")
        assert r.headers["x-leafwire-cache"] == "partial"
        (call,) = cloud.openai_fake.calls
        assert call.body["input"] == [c]
        answer = r.parse()
        assert [d.index for d in answer.data] == [0, 1, 2]
        assert [d.embedding for d in answer.data] == [vector(t) for t in (b, c, a)]
        assert answer.usage.prompt_tokens == 15  # five words each: the stored inputs' tokens as well
        event = eventually(lambda: usage_event(cloud, r.headers["x-request-id"]), 10, "the usage event")
        assert (event["prompt_tokens"], event["cached"]) == (5, False)

    def test_what_the_key_covers(self, cloud: CloudStack) -> None:
        """Another tenant, other dimensions or another encoding is another vector: asked of the provider.
        `cache: false` neither reads nor stores, and says nothing of the cache."""
        texts = self.texts(1)
        cloud.client().embeddings.create(model="fake/embed", input=texts, encoding_format="float")
        asks = [({"key": "key-globex"}, {}), ({}, {"dimensions": 16}), ({}, {"encoding_format": "base64"}),
                ({}, {"cache": False})]
        for who, extra in asks:
            cloud.openai_fake.reset()
            r = post(cloud, {"model": "fake/embed", "input": texts, **extra}, **who)
            assert r.status_code == 200, r.text
            assert len(cloud.openai_fake.calls) == 1, (who, extra)
            assert r.headers.get("x-leafwire-cache") == (None if "cache" in extra else "miss")
        cloud.openai_fake.reset()
        assert post(cloud, {"model": "fake/embed", "input": texts, "cache": False}).status_code == 200
        assert len(cloud.openai_fake.calls) == 1  # the request before it stored nothing

    def test_a_request_in_parts_says_how_much_was_stored(self, cloud: CloudStack) -> None:
        """Split by the gateway (float vectors go in parts of 64): each part reads the cache; the answer is a
        hit when every part was, partial when some were."""
        texts = self.texts(100)
        cloud.client().embeddings.create(model="fake/embed", input=texts[:64], encoding_format="float")
        cloud.openai_fake.reset()
        r = cloud.client().embeddings.with_raw_response.create(model="fake/embed", input=texts,
                                                               encoding_format="float")
        assert r.headers["x-leafwire-cache"] == "partial"
        assert [len(c.body["input"]) for c in cloud.openai_fake.calls] == [36]
        assert [d.embedding for d in r.parse().data] == [vector(t) for t in texts]
        whole = cloud.client().embeddings.with_raw_response.create(model="fake/embed", input=texts,
                                                                   encoding_format="float")
        assert whole.headers["x-leafwire-cache"] == "hit"
        assert len(cloud.openai_fake.calls) == 1
