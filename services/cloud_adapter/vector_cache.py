"""The cache of cloud embeddings, one entry per input: which requests use it, the keys, what is stored, and
an answer put together from stored and new vectors. No I/O.

A vector depends only on the model, the input and the asked ``dimensions`` and ``encoding_format``, so
an embeddings request uses the cache unless it says ``"cache": false``: re-embedding the same documents
(a knowledge base ingested again, a query asked twice) reads what is stored and pays for the rest, as
Dify's embedding cache does. Each input is its own entry, so a request that shares only some inputs with
earlier ones sends the provider only the others.

The key is ``<tenant hash>.e<hash>``: the hash covers the tenant, the ``<provider>/<model>`` and the URL its calls
go to (the upstream model's), the input (text
or token ids), ``dimensions``, ``encoding_format`` and any other field sent on to the provider (``input_type``,
say; not ``user``), so tenants never see each other's entries (and
share the chat cache's per-tenant prefix). An entry holds the vector as the provider's answer gave it (JSON:
floats, or a base64 string), so a hit is the same bytes, and the tokens its input was counted for: the
provider reports tokens for a whole call, which are shared among its inputs by their length.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.embeddings import EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from services.cloud_adapter.cache import share_out, tenant_prefix

_VERSION = b"1"


def eligible(request: EmbeddingRequest) -> bool:
    """Whether this request may be answered from (and stored in) the cache."""
    return request.cache is not False


def inputs(request: EmbeddingRequest) -> list[str | list[int]]:
    """The request's inputs, one per vector it asks for."""
    if isinstance(request.input, str):
        return [request.input]
    if request.input and isinstance(request.input[0], int):
        return [list(request.input)]  # one input given as token ids
    return list(request.input)


def keys(tenant: str, target: str, request: EmbeddingRequest) -> list[str]:
    """The KV key of each input's vector, in input order (``target`` as for ``cache.key``: the model's name and
    the URL its calls go to)."""
    prefix = tenant_prefix(tenant)
    common = {"tenant": tenant, "target": target, "dimensions": request.dimensions,
              "encoding_format": request.encoding_format,
              "extra": request.model_extra or {}}  # sent on: a provider's own fields (input_type...) make other vectors
    out = []
    for item in inputs(request):
        canonical = json.dumps({**common, "input": item}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        out.append(f"{prefix}e{hashlib.sha256(canonical.encode()).hexdigest()}")
    return out


@dataclass(frozen=True, slots=True)
class Vector:
    """One stored vector: its JSON value as the provider gave it, and the tokens its input counted for."""

    embedding: bytes
    tokens: int

    def encode(self) -> bytes:
        """The KV value: a short head, then the vector's JSON as it is (read back without parsing it)."""
        return b"%s %d\n" % (_VERSION, self.tokens) + self.embedding

    @classmethod
    def decode(cls, data: bytes) -> Vector | None:
        """A stored vector read back; ``None`` for anything unreadable or of another format version."""
        head, newline, embedding = data.partition(b"\n")
        version, _, tokens = head.partition(b" ")
        if not newline or version != _VERSION or not tokens.isdigit() or embedding[:1] not in (b"[", b'"'):
            return None
        return cls(embedding, int(tokens))


def shares(tokens: int, items: Sequence[str | list[int]]) -> list[int]:
    """``tokens``, what the provider counted for a call, shared among its inputs by their length (characters,
    or token ids), adding up to it."""
    return share_out(tokens, [max(len(item), 1) for item in items])


def answer(vectors: Sequence[Vector | None], model: str) -> bytes:
    """OpenAI's embeddings list of ``vectors`` (every one there) in input order, named ``model``, its usage
    the tokens each input counted for (as a cached chat answer gives the usage it had); the vectors' JSON is
    joined as it is, not parsed."""
    held = [v for v in vectors if v is not None]
    if len(held) != len(vectors):
        raise ValueError("a vector is missing from the answer")
    tokens = sum(v.tokens for v in held)
    shell = EmbeddingResponse(data=[], model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
    head, _, tail = shell.model_dump_json().encode().partition(b'"data":[]')
    items = b",".join(b'{"object":"embedding","index":%d,"embedding":%s}' % (i, v.embedding)
                      for i, v in enumerate(held))
    return b"".join((head, b'"data":[', items, b"]", tail))
