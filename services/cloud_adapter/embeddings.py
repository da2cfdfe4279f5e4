"""Embeddings of OpenAI-compatible providers (OpenAI, Azure, vLLM, another leafwire): the body of a call and
the answer read back. No I/O.

The request goes out as the caller sent it — ``input`` as strings or as token ids (a cloud model takes
OpenAI's), ``encoding_format``, ``dimensions``, ``user`` and any other field but leafwire's own (``cache``) —
with the provider's model name. The answer must hold one vector per input; it is answered as OpenAI's list
under the name the caller used, the vectors in input order and in the encoding asked for (a provider that
answers floats to a base64 request has them encoded, base64 to a float request decoded), and its usage as
the provider reported it (``prompt_tokens``, or ``total_tokens`` where that is all it says; estimated at 4
characters, or one token id, a token where it reported none).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ValidationError
from pydantic_core import to_json

from schemas.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from services.cloud_adapter.dialect import CHARS_PER_TOKEN, bad_response
from services.cloud_adapter.openai_compat import LEAFWIRE_FIELDS
from shared.vectors import decode_vector, encode_vector


class ProviderUsage(BaseModel):
    """A provider's usage: OpenAI's has both counts; some (Voyage's) ``total_tokens`` only."""

    prompt_tokens: int | None = None
    total_tokens: int | None = None

    def tokens(self) -> int | None:
        """The input tokens it counted, if it says."""
        return self.prompt_tokens if self.prompt_tokens is not None else self.total_tokens


class ProviderList(BaseModel):
    """What the provider answers, as far as leafwire reads it (its other fields are dropped)."""

    data: list[Embedding]
    usage: ProviderUsage | None = None


@dataclass(frozen=True, slots=True)
class Vectors:
    """The caller's answer, ready to publish, and the tokens the provider read for it."""

    answer: bytes
    prompt_tokens: int
    embeddings: list[bytes]  # each vector's JSON value, in input order, as the answer holds it (for the cache)


def body(request: EmbeddingRequest, upstream: str) -> bytes:
    """The caller's request with the provider's name for the model."""
    out = request.model_dump(mode="json", exclude_unset=True, exclude=set(LEAFWIRE_FIELDS))
    out["model"] = upstream
    return to_json(out)


def estimate(request: EmbeddingRequest) -> int:
    """Tokens of the inputs when the provider does not say: 4 characters a token, or the token ids given."""
    texts = request.texts()
    if texts is not None:
        return sum(len(t) for t in texts) // CHARS_PER_TOKEN + 1
    rows = [request.input] if isinstance(request.input[0], int) else request.input
    return sum(len(row) for row in rows)


def read(provider: str, data: bytes, request: EmbeddingRequest) -> Vectors:
    """The provider's answer as the caller's (CPU-heavy for many vectors: run it off the event loop); an
    answer that is not an embeddings list, or not one vector per input, is a bad response (retried)."""
    try:
        answer = ProviderList.model_validate_json(data)
    except ValidationError as exc:
        raise bad_response(provider, f"not an embeddings list ({exc.errors()[0]['msg']})") from exc
    vectors = sorted(answer.data, key=lambda e: e.index)
    if [e.index for e in vectors] != list(range(request.count())):
        raise bad_response(provider, f"{len(vectors)} vectors for {request.count()} inputs")
    if request.encoding_format == "base64":  # some OpenAI-compatible servers answer floats whatever was asked
        vectors = [e if isinstance(e.embedding, str) else
                   e.model_copy(update={"embedding": encode_vector(e.embedding, "base64")}) for e in vectors]
    elif any(isinstance(e.embedding, str) for e in vectors):  # and some base64: floats were asked
        try:
            vectors = [e if not isinstance(e.embedding, str) else
                       e.model_copy(update={"embedding": decode_vector(e.embedding)}) for e in vectors]
        except ValueError as exc:
            raise bad_response(provider, str(exc)) from exc
    counted = answer.usage.tokens() if answer.usage is not None else None
    tokens = counted if counted is not None else estimate(request)
    whole = EmbeddingResponse(data=vectors, model=request.model,
                              usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
    return Vectors(whole.model_dump_json().encode(), tokens, [to_json(e.embedding) for e in vectors])
