"""Embedding vectors as OpenAI sends them: a list of floats, or little-endian float32 bytes in base64."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from schemas.embeddings import EmbeddingRequest
from shared.errors import AnswerTooLarge
from shared.nats_headers import HEADERS_ROOM


def encode_vector(vector: npt.NDArray[np.float32] | Sequence[float], encoding_format: str) -> list[float] | str:
    """One vector in ``encoding_format`` (``base64`` or ``float``)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def decode_vector(text: str) -> list[float]:
    """A base64 vector (little-endian float32) as floats; ``ValueError`` when it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError("an embedding is a string that is not base64") from exc
    if len(raw) % 4:
        raise ValueError(f"a base64 embedding of {len(raw)} bytes is no float32 vector")
    return [float(x) for x in np.frombuffer(raw, dtype="<f4")]


def oversized(answer: bytes, max_payload: int, request: EmbeddingRequest) -> AnswerTooLarge | None:
    """The 413 for an embeddings ``answer`` one NATS message cannot carry with its headers (many float vectors
    of a large model), or ``None`` when it fits."""
    if len(answer) + HEADERS_ROOM <= max_payload:
        return None
    return AnswerTooLarge(len(answer), max_payload, request.count(), request.encoding_format == "float")
