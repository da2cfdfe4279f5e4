"""QA: embeddings of cloud providers as the official openai client, LiteLLM or LangChain meet them.

One stack for the module: nats-server, a cloud-adapter, a router and a gateway of site ``plant`` (real
processes), and two fake OpenAI-compatible providers (``tests.fakes.FakeProvider``): ``oai`` (key in
``Authorization``) behind providers ``oai``, ``priced`` and ``limited`` (``rpm: 1``), and a keyless one behind
``azure`` (``embeddings_path`` of its own, the key in ``api-key``). Covered: base64 and float vectors coming
back exactly (through the cache too), duplicates in one request, LangChain's token-id batches, usage when the
provider reports none or reports it another way, the answer's encoding when the provider ignores the one
asked, errors naming an input, malformed answers, budgets, the provider's ``rpm``, an embeddings model asked
on the completions paths, the input checks, and Azure-style paths. QA found three bugs, fixed since: usage
given as ``total_tokens`` only (Voyage's) failed the answer, retried and paid three times; base64 vectors
answered to a request for floats reached the caller as strings; an error naming an input, of a request some
of whose inputs came from the cache, named it among those sent to the provider, not among the caller's.
"""

from __future__ import annotations

import base64
import json
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests import support
from tests.fakes import DIMENSIONS, FakeProvider, Fault, vector
from tests.support import NatsServer, Service, cloud_router_env, eventually, running

pytestmark = pytest.mark.e2e
SITE = "plant"
KEY = "sk-qa18-embeddings-1a2b3c4d5e"
AZURE_KEY = "azure-qa18-key-9z8y7x"
API_KEYS = "key-acme:acme,key-globex:globex,key-broke:broke"


@dataclass
class Stack:
    nats: NatsServer
    gateway: Service
    oai: FakeProvider
    azure: FakeProvider

    def client(self, key: str = "key-acme") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key=key, max_retries=0, timeout=30)

    def post(self, body: dict[str, Any], key: str = "key-acme", path: str = "/v1/embeddings") -> httpx.Response:
        return httpx.post(f"{self.gateway.base}{path}", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key}"})


def write_providers(path: Path, oai: FakeProvider, azure: FakeProvider) -> Path:
    timeouts = {"connect_s": 2, "first_byte_s": 2, "total_s": 10}

    def entry(name: str, models: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"name": name, "kind": "openai-compatible", "base_url": oai.url, "local": True,
                "api_key_env": "LW_QA18_KEY", "timeouts": timeouts, "models": models, **more}

    config = {
        "providers": [
            entry("oai", {"embed": {"kind": "embeddings", "upstream": "embed-1", "input_per_mtok": 2},
                          "echo": {"upstream": "echo-1"}}),
            entry("priced", {"embed": {"kind": "embeddings", "input_per_mtok": 1000}}),
            entry("limited", {"embed": {"kind": "embeddings"}}, rpm=1),
            {"name": "azure", "kind": "openai-compatible", "base_url": f"http://127.0.0.1:{azure.port}",
             "local": True, "timeouts": timeouts, "api_key_env": "LW_QA18_AZURE_KEY", "api_key_header": "api-key",
             "path": "/v1/chat/completions?api-version=2024-10-21",
             "embeddings_path": "/v1/embeddings?api-version=2024-10-21",
             "models": {"large": {"kind": "embeddings", "upstream": "text-embedding-3-large"}}},
        ],
        "budgets": {"tenants": {"broke": {"daily_usd": 0.001}}},
    }
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def stack(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    oai, azure = FakeProvider("openai", key=KEY).start(), FakeProvider("openai").start()
    file = write_providers(tmp_path_factory.mktemp("qa18") / "providers.yaml", oai, azure)
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE}
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(file), "LW_QA18_KEY": KEY,
                                        "LW_QA18_AZURE_KEY": AZURE_KEY, "LW_CLOUD_BACKOFF_BASE_S": "0.01",
                                        "LW_CLOUD_BACKOFF_CAP_S": "0.05", "LW_CLOUD_BREAKER_FAILURES": "1000"})
    router = Service("router", {**env, **cloud_router_env(file.parent)})
    gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": API_KEYS})
    try:
        with running(adapter, router, gateway):
            yield Stack(nats_server, gateway, oai, azure)
    finally:
        oai.stop()
        azure.stop()


@pytest.fixture(autouse=True)
def _fresh(stack: Stack) -> None:
    stack.oai.reset()
    stack.azure.reset()


def unique(n: int, what: str = "chunk") -> list[str]:
    """Inputs no other test asks for (the cache outlives a test)."""
    tag = uuid.uuid4().hex[:8]
    return [f"{what} {tag} number {i}" for i in range(n)]


def floats(value: list[float] | str) -> list[float]:
    if isinstance(value, str):
        raw = base64.b64decode(value)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return value


def b64(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def answer_of(data: list[Any], tokens: int | None = 3) -> dict[str, Any]:
    out: dict[str, Any] = {"object": "list", "model": "embed-1",
                           "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)]}
    if tokens is not None:
        out["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return out


def usage_event(stack: Stack, request_id: str) -> Any:
    return support.usage_event(stack.nats.url, request_id, site=SITE)


# -- vectors come back exactly


def test_openai_client_default_base64_gives_the_exact_vectors(stack: Stack) -> None:
    """The openai client asks base64 by default and decodes it: one string, a list, and `dimensions` all
    come back as the provider's float32 vectors, bit for bit, each at its index."""
    texts = unique(3)
    client = stack.client()
    one = client.embeddings.create(model="oai/embed", input=texts[0])
    assert [d.embedding for d in one.data] == [vector(texts[0])]
    many = client.embeddings.create(model="oai/embed", input=texts, dimensions=32)
    assert [d.index for d in many.data] == [0, 1, 2]
    assert [d.embedding for d in many.data] == [vector(t, 32) for t in texts]
    assert {c.body["encoding_format"] for c in stack.oai.calls} == {"base64"}
    assert stack.oai.calls[1].body["dimensions"] == 32


def test_a_cache_hit_is_the_same_bytes_in_either_encoding(stack: Stack) -> None:
    """Asked twice, the second answer is `hit` and its vectors are byte-for-byte the first's, as base64 and as
    floats (a provider's full float64 digits included); one provider call each."""
    text = unique(1)[0]
    long_digits = [0.1, 1 / 3, -2.718281828459045, 1e-7]
    for fmt, answer in (("float", long_digits), ("base64", b64(long_digits))):
        stack.oai.reset()
        stack.oai.script(Fault.raw(body=answer_of([answer])))
        first = stack.post({"model": "oai/embed", "input": [text], "encoding_format": fmt})
        again = stack.post({"model": "oai/embed", "input": [text], "encoding_format": fmt})
        assert (first.headers["x-leafwire-cache"], again.headers["x-leafwire-cache"]) == ("miss", "hit")
        assert first.json()["data"] == again.json()["data"]
        assert first.json()["data"][0]["embedding"] == answer
        assert len(stack.oai.calls) == 1


def test_an_input_given_twice_is_asked_once_and_answered_twice(stack: Stack) -> None:
    """[a, b, a]: the provider embeds a and b once each; the caller gets three vectors in input order, its
    usage counting every input; the usage event only what was paid for."""
    a, b = unique(2)
    raw = stack.client().embeddings.with_raw_response.create(model="oai/embed", input=[a, b, a],
                                                             encoding_format="float")
    (call,) = stack.oai.calls
    assert call.body["input"] == [a, b]
    r = raw.parse()
    assert [d.embedding for d in r.data] == [vector(a), vector(b), vector(a)]
    assert r.usage.prompt_tokens == 12  # four words each, a counted twice
    event = eventually(lambda: usage_event(stack, raw.headers["x-request-id"]), 10, "the usage event")
    assert (event["prompt_tokens"], event["cost_usd"]) == (8, pytest.approx(8 * 2 / 1e6))


def test_user_shares_the_cache_but_a_providers_own_field_does_not(stack: Stack) -> None:
    """`user` does not change a vector (a hit for another user of the tenant); `input_type` (Voyage's, sent on)
    does (a miss, sent to the provider with the field)."""
    text = unique(1)[0]
    asks: list[tuple[dict[str, Any], str]] = [({"user": "u1"}, "miss"), ({"user": "u2"}, "hit"),
                                              ({"input_type": "query"}, "miss"), ({"input_type": "query"}, "hit")]
    for extra, expected in asks:
        r = stack.post({"model": "oai/embed", "input": text, **extra})
        assert r.headers["x-leafwire-cache"] == expected, extra
    assert [c.body.get("input_type") for c in stack.oai.calls] == [None, "query"]


def test_langchain_style_batch_of_token_arrays_keeps_its_order(stack: Stack) -> None:
    """LangChain's OpenAIEmbeddings sends up to 1000 inputs as token-id arrays, base64 (the client's default):
    the gateway sends them in parts of 256, and every vector comes back at its index."""
    seed = uuid.uuid4().int % 50_000
    rows = [[seed, i, i * 7 % 1000] for i in range(1000)]
    r = stack.client().embeddings.create(model="oai/embed", input=rows)
    assert sorted(len(c.body["input"]) for c in stack.oai.calls) == [232, 256, 256, 256]
    assert [d.index for d in r.data] == list(range(1000))
    assert [d.embedding for d in r.data] == [vector(row) for row in rows]
    assert r.usage.prompt_tokens == 3000


def test_usage_is_estimated_when_the_provider_reports_none(stack: Stack) -> None:
    """A provider answering without `usage` (some local servers): 4 characters a token, as documented."""
    text = "x" * 40
    stack.oai.script(Fault.raw(body=answer_of([[0.5, 0.25]], tokens=None)))
    r = stack.post({"model": "oai/embed", "input": text, "cache": False})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == r.json()["usage"]["total_tokens"] == 11


def test_usage_reported_as_total_tokens_only_is_read(stack: Stack) -> None:
    """Voyage's OpenAI-shaped answer has `usage: {"total_tokens": n}` only: the vectors are good, so the
    caller gets them (usage from total_tokens or an estimate), after one call."""
    body = answer_of([[0.5, 0.25]], tokens=None) | {"usage": {"total_tokens": 7}}
    stack.oai.script(*[Fault.raw(body=body)] * 3)
    r = stack.post({"model": "oai/embed", "input": "hello voyage", "cache": False})
    assert r.status_code == 200, r.text
    assert len(stack.oai.calls) == 1
    assert r.json()["data"][0]["embedding"] == [0.5, 0.25]


def test_floats_asked_are_floats_even_when_the_provider_answers_base64(stack: Stack) -> None:
    """The docs: vectors come back 'as floats or base64 as asked'. A provider answering base64 to a float
    request must not hand the caller a string where the openai client expects a list of floats."""
    stack.oai.script(Fault.raw(body=answer_of([b64([0.25, 0.5])])))
    r = stack.post({"model": "oai/embed", "input": "hello", "encoding_format": "float", "cache": False})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["embedding"] == [0.25, 0.5]


# -- errors


def test_an_error_naming_an_input_names_it_in_the_callers_request(stack: Stack) -> None:
    """[cached, cached, bad]: the provider is sent [bad] and says `input[0]` is too long (as a leafwire peer or a
    local server names it); the caller must be told input[2], as the gateway does for its own parts."""
    a, b = unique(2)
    assert stack.post({"model": "oai/embed", "input": [a, b]}).status_code == 200
    stack.oai.reset()
    stack.oai.script(Fault.error(400, {"error": {"message": "input[0] is longer than the model's context",
                                                 "type": "invalid_request_error", "param": "input",
                                                 "code": "context_length_exceeded"}}))
    r = stack.post({"model": "oai/embed", "input": [a, b, "word " * 50]})
    assert [c.body["input"] for c in stack.oai.calls] == [["word " * 50]]
    assert r.status_code == 400
    assert "input[2]" in r.json()["error"]["message"], r.json()


def test_a_malformed_200_is_502_after_the_retries(stack: Stack) -> None:
    """Three 200s of broken JSON: 502 upstream_bad_response in OpenAI's error shape, x-should-retry: false
    (so the openai client does not multiply the calls), three provider calls."""
    stack.oai.script(*[Fault.malformed()] * 3)
    r = stack.post({"model": "oai/embed", "input": "hello", "cache": False})
    assert r.status_code == 502
    assert set(r.json()["error"]) >= {"message", "type", "code", "param"}
    assert r.json()["error"]["code"] == "upstream_bad_response"
    assert r.headers.get("x-should-retry") == "false"
    assert len(stack.oai.calls) == 3


def test_duplicate_indexes_are_not_taken_for_a_list(stack: Stack) -> None:
    """A provider answering two vectors both at index 0 for two inputs: 502, not a vector in the wrong place."""
    bad = answer_of([[0.5], [0.25]])
    bad["data"][1]["index"] = 0
    stack.oai.script(*[Fault.raw(body=bad)] * 3)
    r = stack.post({"model": "oai/embed", "input": ["one", "two"], "cache": False})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_bad_response"


def test_a_spent_budget_refuses_embeddings_in_openai_shape(stack: Stack) -> None:
    """Tenant `broke` ($0.001 a day) spends past it on one call; the next embeddings request is a 429
    budget_exceeded (type insufficient_quota) with Retry-After and x-should-retry: false; the openai client
    raises RateLimitError; no second provider call."""
    assert stack.post({"model": "priced/embed", "input": unique(1)}, key="key-broke").status_code == 200

    def refused() -> httpx.Response | None:
        r = stack.post({"model": "priced/embed", "input": unique(1)}, key="key-broke")
        return r if r.status_code == 429 else None
    r = eventually(refused, 10, "the budget to refuse")
    error = r.json()["error"]
    assert (error["code"], error["type"]) == ("budget_exceeded", "insufficient_quota")
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers.get("x-should-retry") == "false"
    calls = len(stack.oai.calls)
    with pytest.raises(openai.RateLimitError):
        stack.client("key-broke").embeddings.create(model="priced/embed", input="anything")
    assert len(stack.oai.calls) == calls


def test_the_providers_rpm_holds_embeddings_too(stack: Stack) -> None:
    """`rpm: 1`: the second call in a minute is refused without a call, 429 provider_rate_limit + Retry-After."""
    assert stack.post({"model": "limited/embed", "input": unique(1)}).status_code == 200
    r = stack.post({"model": "limited/embed", "input": unique(1)})
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "provider_rate_limit"
    assert 1 <= int(r.headers["retry-after"]) <= 61
    assert len(stack.oai.calls) == 1


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"}),
])
def test_an_embeddings_model_on_the_generation_paths_is_404(stack: Stack, path: str, body: dict[str, Any]) -> None:
    """Chat and text completions of an embeddings model: 404 model_not_found, param model, saying what it is."""
    r = stack.post({"model": "oai/embed", **body}, path=path)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert "embeddings model" in error["message"]
    assert stack.oai.calls == []


def test_a_chat_model_on_embeddings_is_404(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        stack.client().embeddings.create(model="oai/echo", input="hello")
    assert "is a chat model" in exc.value.message
    assert stack.oai.calls == []


@pytest.mark.parametrize("given", [
    "", [], [""], ["ok", ""], [[]], ["ok", [1, 2]], ["t"] * 2049, [[1]] * 2049, [1.5], None, {"text": "x"},
])
def test_inputs_openai_refuses_are_400_naming_input(stack: Stack, given: Any) -> None:
    """Empty strings or lists, mixed kinds, more than 2048 inputs, wrong types: 400 invalid_request_error,
    param input, and nothing reaches the provider."""
    r = stack.post({"model": "oai/embed", "input": given})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "input", error
    assert stack.oai.calls == []


@pytest.mark.parametrize(("field", "value"), [
    ("dimensions", 0), ("dimensions", "32"), ("encoding_format", "int8"), ("cache", "no"),
])
def test_bad_parameters_are_400_naming_them(stack: Stack, field: str, value: Any) -> None:
    """A parameter OpenAI would refuse is a 400 whose param names it, before any provider call."""
    r = stack.post({"model": "oai/embed", "input": "hello", field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.json()
    assert stack.oai.calls == []


def test_one_input_as_a_flat_token_array(stack: Stack) -> None:
    """`input=[101, 2023, 102]` is one input of token ids (tiktoken's output, as LangChain sends a single
    text): one vector, the ids sent as given."""
    ids = [101, uuid.uuid4().int % 50_000, 102]
    r = stack.client().embeddings.create(model="oai/embed", input=ids)
    assert [d.embedding for d in r.data] == [vector(ids)]
    assert stack.oai.calls[0].body["input"] == ids
    assert r.usage.prompt_tokens == 3


def test_a_very_long_text_reaches_the_provider_which_decides(stack: Stack) -> None:
    """A text of 200,000 characters (past any model's context) is not cut or refused by leafwire: the
    provider's own 400 context_length_exceeded reaches the caller."""
    stack.oai.script(Fault.error(400, {"error": {"message": "maximum context length is 8192 tokens",
                                                 "type": "invalid_request_error", "param": None,
                                                 "code": "context_length_exceeded"}}))
    text = "pressure " * 22_000
    with pytest.raises(openai.BadRequestError) as exc:
        stack.client().embeddings.create(model="oai/embed", input=text, extra_body={"cache": False})
    assert exc.value.code == "context_length_exceeded"
    assert stack.oai.calls[0].body["input"] == text


def test_2048_inputs_are_taken(stack: Stack) -> None:
    """OpenAI's limit itself: 2048 short texts (LangChain's chunk_size can be set to it) all answered."""
    texts = unique(2048, "t")
    r = stack.client().embeddings.create(model="oai/embed", input=texts)
    assert len(r.data) == 2048
    assert r.data[2047].embedding == vector(texts[2047])
    assert len(stack.oai.calls) == 8


@pytest.mark.parametrize(("fmt", "count"), [("float", 64), ("base64", 256)])
def test_a_whole_part_of_4096_dimension_vectors_fits(stack: Stack, fmt: str, count: int) -> None:
    """The docs: a part (64 float or 256 base64 vectors) of up to 4,096 dimensions fits one NATS message
    (8 MB): the caller gets every vector, not a 413 after the provider charged for them."""
    texts = unique(count, "d")
    r = stack.post({"model": "oai/embed", "input": texts, "encoding_format": fmt, "dimensions": 4096,
                    "cache": False})
    assert r.status_code == 200, r.text[:300]
    data = r.json()["data"]
    assert floats(data[-1]["embedding"]) == vector(texts[-1], 4096)
    assert len(stack.oai.calls) == 1


# -- Azure-style paths and the catalog


def test_azure_style_embeddings_path_and_key_header(stack: Stack) -> None:
    """`embeddings_path` of its own and `api_key_header: api-key`: the call goes to that path with the key in
    api-key (no Authorization), the deployment's model name in the body; the answer is named as asked."""
    r = stack.client().embeddings.create(model="azure/large", input=unique(2))
    assert r.model == "azure/large"
    (call,) = stack.azure.calls
    assert call.path == "/v1/embeddings"
    assert call.headers.get("api-key") == AZURE_KEY
    assert "Authorization" not in call.headers
    assert call.body["model"] == "text-embedding-3-large"
    assert len(r.data[0].embedding) == DIMENSIONS


def test_models_list_shows_each_embeddings_model_with_its_kind(stack: Stack) -> None:
    def listed() -> dict[str, Any] | None:
        cards = {m.id: m.model_extra or {} for m in stack.client().models.list().data}
        return cards if {"oai/embed", "azure/large", "oai/echo"} <= set(cards) else None
    cards = eventually(listed, 10, "the models in the catalog")
    assert {cards[m]["kind"] for m in ("oai/embed", "azure/large", "priced/embed")} == {"embeddings"}
    assert cards["oai/echo"]["kind"] == "chat"
