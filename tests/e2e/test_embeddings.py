"""POST /v1/embeddings end to end with the official client: OpenAI's shape, order, unit vectors, base64,
batching, many inputs sent in parts, and an OpenAI-shaped error for each kind of bad input. Mechanics on
the tiny BERT fixture; meaning on the real all-MiniLM-L6-v2 where `just models` has built it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import nats
import numpy as np
import openai
import pytest

from shared import paths
from tests.conftest import Stack, batcher_service, stack_services
from tests.support import (
    FIXTURE_EMBEDDER,
    FIXTURE_MODEL,
    REAL_MODELS,
    ROOT,
    NatsServer,
    eventually,
    last_usage,
    metric,
    running,
    start_single,
    stopped_on_error,
    write_registry,
)

pytestmark = pytest.mark.e2e
MODEL = "tiny-embed"
TEXTS = ["The pump on line 3 is leaking oil.", "hello", "Check the hydraulic pressure before restarting."]


def floats(stack: Stack, texts: list[str] | str, **kw: Any) -> list[list[float]]:
    r = stack.client().embeddings.create(model=MODEL, input=texts, encoding_format="float", **kw)
    return [d.embedding for d in r.data]


def post(stack: Stack, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/embeddings", json=body, timeout=30)


class TestShape:
    def test_openai_shape_order_and_usage(self, stack: Stack) -> None:
        """A list of inputs gives a list of embedding objects, indexed in input order, with token usage."""
        r = stack.client().embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
        assert r.object == "list"
        assert r.model == MODEL
        assert [(d.object, d.index) for d in r.data] == [("embedding", 0), ("embedding", 1), ("embedding", 2)]
        assert len({len(d.embedding) for d in r.data}) == 1
        assert r.usage.prompt_tokens == r.usage.total_tokens > len(TEXTS)

    def test_each_answer_is_a_usage_event(self, stack: Stack) -> None:
        """Vectors made on the site are in the usage report as chat answers are: one event per request, its
        tokens read, none written, under the request's id."""
        raw = stack.client().embeddings.with_raw_response.create(model=MODEL, input=TEXTS, encoding_format="float")
        rid = raw.headers["x-request-id"]

        def event() -> dict[str, object] | None:
            try:
                found = asyncio.run(last_usage(stack.nats.url, stack.site))
            except nats.js.errors.NotFoundError:
                return None
            return found if found["request_id"] == rid else None

        got = eventually(event, 10, "the embeddings request's usage event")
        assert (got["target"], got["prompt_tokens"], got["completion_tokens"], got["outcome"]) == (
            f"local/{MODEL}", raw.parse().usage.prompt_tokens, 0, "ok")

    def test_vectors_are_unit_length_and_match_each_input_alone(self, stack: Stack) -> None:
        """Each vector has length 1 and is the one its text gets when sent alone (so order is kept)."""
        together = np.array(floats(stack, TEXTS))
        assert np.linalg.norm(together, axis=1) == pytest.approx(1.0, abs=1e-5)
        alone = np.array([floats(stack, t)[0] for t in TEXTS])
        assert np.allclose(together, alone, atol=1e-5)
        assert not np.allclose(together[0], together[1], atol=1e-3)

    def test_base64_round_trip(self, stack: Stack) -> None:
        """encoding_format=base64 sends little-endian float32 bytes that decode to the float vectors."""
        raw = post(stack, {"model": MODEL, "input": TEXTS, "encoding_format": "base64"}).json()
        decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
        assert np.allclose(decoded, np.array(floats(stack, TEXTS)), atol=1e-7)

    def test_official_client_default_decodes_the_same(self, stack: Stack) -> None:
        """The openai client asks for base64 by default and decodes it; the vectors are the float ones."""
        r = stack.client().embeddings.create(model=MODEL, input=TEXTS)
        assert np.allclose(np.array([d.embedding for d in r.data]), np.array(floats(stack, TEXTS)), atol=1e-7)

    def test_concurrent_requests_are_batched_and_each_gets_its_own(self, stack: Stack) -> None:
        """Requests arriving together are encoded together, yet each caller gets its own vectors."""
        expected = {t: floats(stack, t)[0] for t in TEXTS}
        assert stack.batcher is not None
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda i: (TEXTS[i % 3], floats(stack, TEXTS[i % 3])[0]), range(24)))
        assert all(np.allclose(v, expected[t], atol=1e-5) for t, v in results)
        dispatched = metric(stack.batcher.metrics(), "leafwire_batch_dispatches_total", model=MODEL,
                            outcome="taken")
        requests = metric(stack.batcher.metrics(), "leafwire_queue_wait_seconds_count", model=MODEL)
        assert dispatched < requests  # some batches held more than one request


class TestBadInput:
    @pytest.mark.parametrize(("body", "param", "says"), [
        ({"input": []}, "input", "non-empty"),
        ({"input": ""}, "input", "empty string"),
        ({"input": ["fine", ""]}, "input", "input[1]"),
        ({"input": ["x"] * 2049}, "input", "2048"),
        ({"input": 42}, "input", "string"),
        ({"input": [{"text": "x"}]}, "input", "must be a string"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format", ""),
        ({"input": "x", "dimensions": 0}, "dimensions", ""),
        ({"input": "x", "dimensions": "32"}, "dimensions", "valid integer"),  # lax mode took "32" for 32
        ({}, "input", ""),
    ])
    def test_invalid_requests_are_400_naming_the_field(self, stack: Stack, body: dict[str, Any], param: str,
                                                        says: str) -> None:
        """Empty, oversized or mistyped input, a bad encoding or dimensions: 400 in OpenAI's shape."""
        r = post(stack, {"model": MODEL, **body})
        assert r.status_code == 400
        error = r.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", param)
        assert says in error["message"]

    def test_token_arrays_are_refused_by_a_text_model(self, stack: Stack) -> None:
        """Token ids (valid for OpenAI's own models) are a 400 here: the local model has its own tokenizer."""
        r = post(stack, {"model": MODEL, "input": [[101, 2023, 102]]})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "input"
        assert "token ids" in r.json()["error"]["message"]

    def test_too_long_input_states_both_numbers(self, stack: Stack) -> None:
        """An input over the model's 64 tokens is a 400 naming the input, its tokens and the limit."""
        with pytest.raises(openai.BadRequestError) as exc:
            stack.client().embeddings.create(model=MODEL, input=["short", "pump " * 100])
        assert exc.value.code == "context_length_exceeded"
        assert "input[1]" in exc.value.message
        assert "maximum context length is 64 tokens" in exc.value.message

    def test_other_dimensions_are_refused(self, stack: Stack) -> None:
        """Asking for a vector size the model does not make is a 400 naming `dimensions`."""
        with pytest.raises(openai.BadRequestError) as exc:
            stack.client().embeddings.create(model=MODEL, input="x", dimensions=7)
        assert exc.value.body["param"] == "dimensions"  # type: ignore[index]

    def test_unknown_model_is_404(self, stack: Stack) -> None:
        """An embeddings model nobody serves is a 404 model_not_found."""
        with pytest.raises(openai.NotFoundError) as exc:
            stack.client().embeddings.create(model="text-embedding-9", input="x")
        assert exc.value.code == "model_not_found"

    def test_chat_model_is_not_an_embeddings_model(self, stack: Stack) -> None:
        """Asking a chat model for embeddings does not reach it as chat work: it is a 404 for embeddings."""
        r = post(stack, {"model": "tiny", "input": "x"})
        assert r.status_code in (404, 503)
        assert r.json()["error"]["code"] in ("model_not_found", "unavailable")


class TestModels:
    def test_models_list_kind_and_location(self, stack: Stack) -> None:
        """GET /v1/models lists the chat and the embeddings model, each with its kind and where it runs."""
        models = {m.id: m.model_extra for m in stack.client().models.list().data}
        assert models["tiny"]["kind"] == "chat"  # type: ignore[index]
        assert models[MODEL]["kind"] == "embeddings"  # type: ignore[index]
        assert models[MODEL]["locations"] == [{"site": "edge1", "workers": 1}]  # type: ignore[index]
        assert not models["tiny"]["routed"]  # type: ignore[index]

    def test_models_have_a_creation_time(self, stack: Stack) -> None:
        """Each listed model has a real unix `created` (UIs sort and show it; it was 0, 1970): a local model's
        when its files were built, a routed name's when the policy took effect."""
        models = {m.id: m for m in stack.client().models.list().data}
        assert models["tiny"].created == paths.modified_at(FIXTURE_MODEL / "genai_config.json")
        built = paths.modified_at(FIXTURE_EMBEDDER / "model.onnx", FIXTURE_EMBEDDER / "tokenizer.json")
        assert models[MODEL].created == built
        assert time.time() - 3600 < models["auto"].created <= time.time()

    def test_model_answers_carry_a_request_id_as_every_answer_does(self, stack: Stack) -> None:
        """GET /v1/models, /v1/models/{id} and a dry run carry x-request-id, each its own."""
        dry = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        answers = [httpx.get(f"{stack.base_url}/models", timeout=10),
                   httpx.get(f"{stack.base_url}/models/tiny", timeout=10),
                   httpx.post(f"{stack.base_url}/route/dry-run", timeout=10, json=dry)]
        ids = [a.headers["x-request-id"] for a in answers]
        assert all(len(i) == 32 for i in ids)
        assert len(set(ids)) == 3

    def test_auto_is_listed_for_uis_that_offer_only_listed_models(self, stack: Stack) -> None:
        """`auto` (and each alias of the routing policy) is listed as routed: Open WebUI and the like offer only
        what /v1/models lists; it is answered like any model."""
        auto = stack.client().models.retrieve("auto")
        assert auto.model_extra is not None
        assert auto.model_extra["routed"] is True
        assert auto.owned_by == "leafwire-router"
        r = stack.client().chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2)
        assert r.model == "tiny"

    def test_one_model_and_an_unknown_one(self, stack: Stack) -> None:
        """GET /v1/models/{id} returns that model; an unknown id is a 404 model_not_found."""
        assert stack.client().models.retrieve(MODEL).id == MODEL
        with pytest.raises(openai.NotFoundError) as exc:
            stack.client().models.retrieve("gpt-17")
        assert exc.value.code == "model_not_found"


MAX_PAYLOAD = 64 * 1024  # what one NATS message may carry on the tight site (8 MB in deployments)
MANY = [f"gauge {i} reads {i * 7 % 50} bar at valve {chr(65 + i % 26)}" for i in range(150)]  # ~108 kB as floats


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, openai.OpenAI]]:
    """A site whose NATS carries at most 64 KiB a message, and whose gateway sends at most 16 inputs a request."""
    server = start_single(tmp_path_factory.mktemp("nats-tight"))
    with stopped_on_error([server]):
        conf = server.node.conf.read_text()
        assert "max_payload: 8MB" in conf
        server.node.conf.write_text(conf.replace("max_payload: 8MB", f"max_payload: {MAX_PAYLOAD}"))
        server.restart()
    registry = write_registry(tmp_path_factory.mktemp("registry-tight") / "models.yaml", embedder=MODEL)
    worker, router, gateway = stack_services(server.url, registry, site="tight",
                                             gateway_env={"LW_GATEWAY_EMBEDDINGS_SPLIT": "16"})
    try:
        with running(worker, batcher_service(server.url, "tight"), router, gateway):
            yield server, openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="x", max_retries=0)
    finally:
        server.stop()


class TestManyInputs:
    def test_more_vectors_than_one_nats_message_carries_come_back_whole(
            self, tight: tuple[NatsServer, openai.OpenAI]) -> None:
        """150 float vectors (more than a NATS message carries here): every one, in input order, each the
        vector its text gets alone, usage the sum of theirs."""
        _, client = tight
        r = client.embeddings.create(model=MODEL, input=MANY, encoding_format="float")
        assert [d.index for d in r.data] == list(range(len(MANY)))
        assert r.model == MODEL
        with ThreadPoolExecutor(8) as pool:
            alone = list(pool.map(lambda t: client.embeddings.create(model=MODEL, input=t, encoding_format="float"),
                                  MANY))
        assert np.allclose(np.array([d.embedding for d in r.data]), np.array([a.data[0].embedding for a in alone]),
                           atol=1e-5)
        assert r.usage.prompt_tokens == r.usage.total_tokens == sum(a.usage.prompt_tokens for a in alone)

    def test_base64_in_parts_decodes_to_the_float_vectors(self, tight: tuple[NatsServer, openai.OpenAI]) -> None:
        """The official client's default (base64) gets the same vectors, split or not."""
        _, client = tight
        encoded = client.embeddings.create(model=MODEL, input=MANY)
        floats_ = client.embeddings.create(model=MODEL, input=MANY, encoding_format="float")
        assert np.allclose(np.array([d.embedding for d in encoded.data]),
                           np.array([d.embedding for d in floats_.data]), atol=1e-7)

    def test_one_input_too_long_fails_the_whole_request_naming_it(
            self, tight: tuple[NatsServer, openai.OpenAI]) -> None:
        """Input 37 over the model's context: the whole request is a 400 naming input[37], not a partial list."""
        _, client = tight
        with pytest.raises(openai.BadRequestError) as exc:
            client.embeddings.create(model=MODEL, input=[*MANY[:37], "pump " * 100, *MANY[38:]])
        assert exc.value.code == "context_length_exceeded"
        assert "input[37] has" in exc.value.message

    def test_many_token_arrays_get_the_answer_one_request_gets(
            self, tight: tuple[NatsServer, openai.OpenAI]) -> None:
        """Forty token arrays are sent in parts like strings: the text model's 400 naming token ids."""
        _, client = tight
        with pytest.raises(openai.BadRequestError) as exc:
            client.embeddings.create(model=MODEL, input=[[101, 2023 + i, 102] for i in range(40)])
        assert exc.value.body["param"] == "input"  # type: ignore[index]
        assert "token ids" in exc.value.message

    async def test_a_nats_caller_whose_answer_is_too_large_is_told_what_to_do(
            self, tight: tuple[NatsServer, openai.OpenAI]) -> None:
        """Straight over NATS, 150 float vectors do not fit one message: a 413 naming max_payload and base64;
        the same request as base64 fits and is answered (the worker is still connected)."""
        server, _ = tight
        nc = await nats.connect(server.url)
        try:
            ask = {"model": MODEL, "input": MANY, "encoding_format": "float"}
            too_large = await nc.request("lw.v1.tight.embeddings", json.dumps(ask).encode(), timeout=20)
            ask["encoding_format"] = "base64"
            fits = await nc.request("lw.v1.tight.embeddings", json.dumps(ask).encode(), timeout=20)
        finally:
            await nc.drain()
        assert too_large.headers is not None
        assert (too_large.headers["Lw-Event"], too_large.headers["Lw-Status"]) == ("error", "413")
        error = json.loads(too_large.data)["error"]
        assert error["code"] == "answer_too_large"
        assert f"max_payload ({MAX_PAYLOAD} bytes)" in error["message"]
        assert "base64" in error["message"]
        assert fits.headers is not None
        assert fits.headers["Lw-Event"] == "result"
        assert len(json.loads(fits.data)["data"]) == len(MANY)


MINILM = REAL_MODELS / "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def minilm(nats_server: NatsServer) -> Iterator[openai.OpenAI]:
    if not (MINILM / ".complete").exists():
        pytest.skip(f"all-MiniLM-L6-v2 is not built in {REAL_MODELS}: run `uv run just models`")
    os.environ.setdefault("LW_MODELS_DIR", os.fspath(REAL_MODELS))
    worker, router, gateway = stack_services(nats_server.url, ROOT / "deploy" / "models.yaml", site="minilm")
    with running(worker, batcher_service(nats_server.url, "minilm"), router, gateway):
        yield openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="x", max_retries=0)


@pytest.mark.realmodel
def test_similar_sentences_are_closer_than_unrelated_ones(minilm: openai.OpenAI) -> None:
    """On all-MiniLM-L6-v2, two wordings of one fault are closer to each other than to an unrelated line."""
    texts = ["The pump on line 3 is leaking oil.", "Oil is leaking from the line 3 pump.",
             "The cafeteria serves pasta on Fridays."]
    r = minilm.embeddings.create(model="all-minilm-l6-v2", input=texts)
    v = np.array([d.embedding for d in r.data])
    assert v.shape == (3, 384)
    same, other = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert same > 0.8
    assert same > other + 0.5
