"""Vectors into OpenAI's embeddings answer."""

from __future__ import annotations

import base64

import numpy as np
import numpy.typing as npt

from schemas.embeddings import Embedding, EmbeddingResponse, EmbeddingUsage


def encode_vector(vector: npt.NDArray[np.float32], encoding_format: str) -> list[float] | str:
    """One vector as OpenAI sends it: a list of floats, or little-endian float32 bytes in base64."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def embedding_response(model: str, vectors: npt.NDArray[np.float32], tokens: int,
                       encoding_format: str) -> EmbeddingResponse:
    """The answer of one embeddings request, vectors in input order."""
    return EmbeddingResponse(
        data=[Embedding(index=i, embedding=encode_vector(v, encoding_format)) for i, v in enumerate(vectors)],
        model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
