"""The cache of cloud embeddings: keys, stored values, tokens shared among inputs, answers put together."""

from __future__ import annotations

import json

import pytest

from schemas.embeddings import EmbeddingRequest, EmbeddingResponse
from services.cloud_adapter import cache, vector_cache
from services.cloud_adapter.vector_cache import Vector


def request(**fields: object) -> EmbeddingRequest:
    return EmbeddingRequest.model_validate({"model": "openai/small", "input": ["a", "b"], **fields})


def test_used_unless_the_request_says_false() -> None:
    assert vector_cache.eligible(request())
    assert vector_cache.eligible(request(cache=True))
    assert not vector_cache.eligible(request(cache=False))


def test_one_key_an_input_covering_tenant_model_dimensions_and_encoding() -> None:
    """The same input in another request is the same key; another tenant, model, size or encoding is not. Keys
    start with the tenant's prefix, the chat cache's (one purge removes both)."""
    a, b = vector_cache.keys("acme", "openai/small", request())
    assert a != b
    assert vector_cache.keys("acme", "openai/small", request(input=["b"])) == [b]
    assert vector_cache.keys("acme", "openai/small", request(input="a", user="u", cache=True)) == [a]
    for other in (vector_cache.keys("globex", "openai/small", request()),
                  vector_cache.keys("acme", "openai/large", request()),
                  vector_cache.keys("acme", "openai/small", request(dimensions=8)),
                  vector_cache.keys("acme", "openai/small", request(encoding_format="base64"))):
        assert not {a, b} & set(other)
    assert a.startswith(cache.tenant_prefix("acme") + "e")
    ids = vector_cache.keys("acme", "openai/small", request(input=[1, 2, 3]))  # one input as token ids
    assert len(ids) == 1
    assert ids != vector_cache.keys("acme", "openai/small", request(input=[[1, 2, 3], [4]]))[1:]


@pytest.mark.parametrize("embedding", [b"[0.25,-0.5,1e-05]", b'"AACAPgAAAL8="'])
def test_a_stored_vector_reads_back_as_the_same_bytes(embedding: bytes) -> None:
    stored = Vector(embedding, 7)
    assert Vector.decode(stored.encode()) == stored


@pytest.mark.parametrize("value", [b"", b"[0.1]", b"2 7\n[0.1]", b"1 x\n[0.1]", b"1 7\n{}", b"1 7"])
def test_unreadable_entries_are_misses(value: bytes) -> None:
    """Anything but a version-1 head and a JSON list or string is no vector (read as absent, then stored
    anew)."""
    assert Vector.decode(value) is None


@pytest.mark.parametrize(("tokens", "items", "expected"), [
    (10, ["aaaa", "a"], [8, 2]),
    (3, ["ab", "ab", "ab", "ab"], [1, 1, 1, 0]),
    (7, ["x"], [7]),
    (0, ["a", "b"], [0, 0]),
    (5, [[1, 2], [3, 4, 5]], [2, 3]),
])
def test_the_calls_tokens_are_shared_by_length_and_add_up(tokens: int, items: list[str | list[int]],
                                                            expected: list[int]) -> None:
    shares = vector_cache.shares(tokens, items)
    assert shares == expected
    assert sum(shares) == tokens


def test_an_answer_of_stored_vectors_is_openais_list_in_order() -> None:
    body = vector_cache.answer([Vector(b"[0.5,1.0]", 3), Vector(b"[0.25,0.0]", 4)], "openai/small")
    answer = EmbeddingResponse.model_validate_json(body)
    assert [(d.index, d.embedding) for d in answer.data] == [(0, [0.5, 1.0]), (1, [0.25, 0.0])]
    assert (answer.model, answer.usage.prompt_tokens, answer.usage.total_tokens) == ("openai/small", 7, 7)
    assert json.loads(body)["object"] == "list"
    with pytest.raises(ValueError, match="missing"):
        vector_cache.answer([Vector(b"[0.5]", 1), None], "openai/small")
