"""Reading a provider's embeddings answer: the encoding the caller asked for, usage as the provider says it."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest

from schemas.embeddings import EmbeddingRequest
from services.cloud_adapter.embeddings import read
from shared.errors import UpstreamError, renumber_inputs


def answer(*vectors: list[float] | str, usage: dict[str, Any] | None = None) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    body: dict[str, Any] = {"object": "list", "model": "m", "data": data}
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


def b64(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def request(**kw: Any) -> EmbeddingRequest:
    return EmbeddingRequest.model_validate({"model": "p/m", "input": ["one", "two"], **kw})


@pytest.mark.parametrize("asked", [None, "float"])
def test_base64_answered_to_floats_asked_is_decoded(asked: str | None) -> None:
    asking = request() if asked is None else request(encoding_format=asked)
    got = json.loads(read("p", answer(b64([0.25, -1.5]), [0.5, 2.0]), asking).answer)
    assert [e["embedding"] for e in got["data"]] == [[0.25, -1.5], [0.5, 2.0]]


def test_floats_answered_to_base64_asked_are_encoded() -> None:
    got = json.loads(read("p", answer([0.25, -1.5], b64([0.5])), request(encoding_format="base64")).answer)
    assert [e["embedding"] for e in got["data"]] == [b64([0.25, -1.5]), b64([0.5])]


@pytest.mark.parametrize("bad", ["not base64!", base64.b64encode(b"\x00\x01\x02").decode()])
def test_a_string_that_is_no_base64_vector_is_a_bad_response(bad: str) -> None:
    with pytest.raises(UpstreamError) as refused:
        read("p", answer(bad, [0.5]), request())
    assert refused.value.code == "upstream_bad_response"


@pytest.mark.parametrize(("usage", "tokens"), [
    ({"prompt_tokens": 5, "total_tokens": 5}, 5),
    ({"total_tokens": 7}, 7),  # Voyage's shape
    ({}, 2),  # nothing said: estimated, 4 characters a token ("one" + "two" -> 6 // 4 + 1)
    (None, 2),
])
def test_usage_as_the_provider_says_it(usage: dict[str, int] | None, tokens: int) -> None:
    got = read("p", answer([0.5], [0.25], usage=usage), request())
    assert got.prompt_tokens == tokens
    assert json.loads(got.answer)["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_inputs_named_in_an_error_are_renumbered() -> None:
    sent = [2, 5]
    assert renumber_inputs("input[0] and input[1] are too long; input[9]?",
                           lambda i: sent[i] if i < len(sent) else i) == "input[2] and input[5] are too long; input[9]?"
