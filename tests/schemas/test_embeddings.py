"""The embeddings request: what OpenAI accepts, and a clear error naming `input` for what it refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.embeddings import MAX_INPUTS, EmbeddingRequest


def req(value: object, **kw: object) -> EmbeddingRequest:
    return EmbeddingRequest.model_validate({"model": "m", "input": value, **kw})


class TestEmbeddingRequest:
    @pytest.mark.parametrize(("value", "texts", "count"), [
        ("one", ["one"], 1),
        (["a", "b"], ["a", "b"], 2),
        ([1, 2, 3], None, 1),
        ([[1, 2], [3]], None, 2),
    ])
    def test_accepted_inputs(self, value: object, texts: list[str] | None, count: int) -> None:
        """A string, strings, token ids or arrays of token ids are accepted; texts() gives the strings."""
        r = req(value)
        assert r.texts() == texts
        assert r.count() == count
        assert r.encoding_format == "float"

    @pytest.mark.parametrize(("value", "says"), [
        ("", "empty string"),
        ([], "non-empty"),
        (["ok", ""], "input[1] is an empty string"),
        ([1.5], "must be a string"),
        (["a", [1]], "mixes"),
        ([None], "must be a string"),
        (7, "non-empty string or a non-empty array"),
        ([True], "must be a string"),
    ])
    def test_refused_inputs(self, value: object, says: str) -> None:
        """Empty, mistyped or mixed inputs are refused with a message naming `input`."""
        with pytest.raises(ValidationError) as exc:
            req(value)
        error = exc.value.errors()[0]
        assert error["loc"] == ("input",)
        assert says in error["msg"]

    def test_too_many_inputs(self) -> None:
        """More than 2048 inputs in one request are refused."""
        with pytest.raises(ValidationError, match=f"at most {MAX_INPUTS}"):
            req(["x"] * (MAX_INPUTS + 1))

    def test_encoding_format_is_float_or_base64(self) -> None:
        """Only OpenAI's two encodings are accepted."""
        assert req("x", encoding_format="base64").encoding_format == "base64"
        with pytest.raises(ValidationError):
            req("x", encoding_format="hex")
