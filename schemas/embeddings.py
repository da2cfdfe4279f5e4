"""Embeddings in OpenAI's wire format: ``POST /v1/embeddings`` and its answer.

The same shapes travel on NATS (``lw.v1.<site>.embeddings``) and over HTTP. ``input`` is checked by hand
rather than by a pydantic union, so a wrong value gets one clear message naming ``input`` instead of one
error per union member.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

MAX_INPUTS = 2048  # OpenAI's limit of inputs per request

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_item(i: int, item: Any) -> None:
    if isinstance(item, str):
        if not item:
            raise ValueError(f"input[{i}] is an empty string; every input must have text")
    elif isinstance(item, list):
        if not item or not all(_is_int(t) for t in item):
            raise ValueError(f"input[{i}] must be a string or a non-empty array of integer token ids")
    else:
        raise ValueError(f"input[{i}] must be a string (or an array of token ids), not {type(item).__name__}")


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` body; also the payload of ``lw.v1.<site>.embeddings``."""

    model_config = ConfigDict(extra="allow")
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt | None, Field(ge=1)] = None  # "32" is refused, as OpenAI does
    user: str | None = None
    cache: StrictBool | None = Field(
        default=None, description="leafwire extension for cloud models: false neither reads nor stores "
                                  "cached vectors; by default each input's vector is read from the cache when "
                                  "stored, and stored when made. Never sent to a provider.")

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: Any) -> EmbeddingInput:
        if isinstance(value, str):
            if not value:
                raise ValueError("input is an empty string")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("input must be a non-empty string or a non-empty array")
        if all(_is_int(t) for t in value):
            return value  # one input given as token ids
        if len(value) > MAX_INPUTS:
            raise ValueError(f"input has {len(value)} items; at most {MAX_INPUTS} are allowed per request")
        for i, item in enumerate(value):
            _check_item(i, item)
        if any(isinstance(item, str) for item in value) and any(isinstance(item, list) for item in value):
            raise ValueError("input mixes strings and token arrays")
        return value

    def texts(self) -> list[str] | None:
        """The inputs as a list of strings, or None when they were given as token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, str) for item in self.input):
            return list(self.input)
        return None

    def count(self) -> int:
        """How many embeddings this request asks for."""
        if isinstance(self.input, str) or all(_is_int(t) for t in self.input):
            return 1
        return len(self.input)


class Embedding(BaseModel):
    """One vector: a list of floats, or little-endian float32 bytes in base64."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    """Tokens read to make the vectors."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """The answer of ``POST /v1/embeddings``; the ``result`` event on NATS."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
