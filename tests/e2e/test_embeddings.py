"""POST /v1/embeddings end to end with the official client: OpenAI's shape, order, unit vectors, base64,
batching, and an OpenAI-shaped error for each kind of bad input. Mechanics on the tiny BERT fixture;
meaning on the real all-MiniLM-L6-v2 where `just models` has built it."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import Stack, batcher_service, stack_services
from tests.support import REAL_MODELS, ROOT, NatsServer, metric, running

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

    def test_one_model_and_an_unknown_one(self, stack: Stack) -> None:
        """GET /v1/models/{id} returns that model; an unknown id is a 404 model_not_found."""
        assert stack.client().models.retrieve(MODEL).id == MODEL
        with pytest.raises(openai.NotFoundError) as exc:
            stack.client().models.retrieve("gpt-17")
        assert exc.value.code == "model_not_found"


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
