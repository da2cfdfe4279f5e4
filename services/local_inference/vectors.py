"""Vectors into OpenAI's embeddings answer."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from schemas.embeddings import Embedding, EmbeddingResponse, EmbeddingUsage
from shared.vectors import encode_vector


def embedding_response(model: str, vectors: npt.NDArray[np.float32], tokens: int,
                       encoding_format: str) -> EmbeddingResponse:
    """The answer of one embeddings request, vectors in input order."""
    return EmbeddingResponse(
        data=[Embedding(index=i, embedding=encode_vector(v, encoding_format)) for i, v in enumerate(vectors)],
        model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
