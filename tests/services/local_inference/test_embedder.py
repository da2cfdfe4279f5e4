"""Sentence vectors with onnxruntime + tokenizers, on the tiny BERT fixture."""

from __future__ import annotations

import numpy as np
import pytest

from services.local_inference.embedder import Embedded, Embedder, TooLong, pool
from services.local_inference.registry import ModelSpec
from tests.support import FIXTURE_EMBEDDER

TEXTS = ["The pump on line 3 is leaking oil.", "hello", "Check the hydraulic pressure before restarting."]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    e = Embedder(ModelSpec(name="tiny-embed", kind="embeddings", path=FIXTURE_EMBEDDER, context_length=16),
                 sub_batch=2)
    e.load()
    return e


class TestEmbedder:
    def test_one_unit_vector_per_input_in_order(self, embedder: Embedder) -> None:
        """Each input gets a unit-length vector, in input order, the same as when embedded alone."""
        (result,) = embedder.embed_many([TEXTS])
        assert isinstance(result, Embedded)
        assert result.vectors.shape == (3, embedder.dimensions)
        assert np.linalg.norm(result.vectors, axis=1) == pytest.approx(1.0, abs=1e-5)
        for i, text in enumerate(TEXTS):
            (alone,) = embedder.embed_many([[text]])
            assert isinstance(alone, Embedded)
            assert np.allclose(alone.vectors[0], result.vectors[i], atol=1e-5)

    def test_requests_of_a_batch_get_their_own_vectors(self, embedder: Embedder) -> None:
        """Several requests encoded together each get exactly their inputs' vectors and token counts."""
        together = embedder.embed_many([TEXTS[:2], TEXTS[2:]])
        apart = [embedder.embed_many([TEXTS[:2]])[0], embedder.embed_many([TEXTS[2:]])[0]]
        for t, a in zip(together, apart, strict=True):
            assert isinstance(t, Embedded)
            assert isinstance(a, Embedded)
            assert t.tokens == a.tokens
            assert np.allclose(t.vectors, a.vectors, atol=1e-5)

    def test_too_long_input_is_named_with_both_numbers(self, embedder: Embedder) -> None:
        """An input over the context length is reported (index, tokens, limit); other requests still work."""
        long_text = " ".join(["pump"] * 40)
        bad, good = embedder.embed_many([["ok", long_text], ["fine"]])
        assert isinstance(bad, TooLong)
        assert (bad.index, bad.limit) == (1, 16)
        assert bad.tokens > 16
        assert isinstance(good, Embedded)


def test_mean_pooling_ignores_padding() -> None:
    """Padding positions do not move the mean; normalising gives unit length."""
    hidden = np.array([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])
    assert pool(hidden, mask, normalize=False).tolist() == [[2.0, 0.0]]
    assert pool(hidden, mask, normalize=True).tolist() == [[1.0, 0.0]]
