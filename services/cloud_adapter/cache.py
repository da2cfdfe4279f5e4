"""The exact-match answer cache: which requests use it, their keys, and what is stored. No I/O.

A request uses the cache when it says ``"cache": true``, or when it leaves ``cache`` out and asks for
``temperature: 0`` (a deterministic answer is worth reusing; a sampled one is not). ``"cache": false``
never uses it.

The key is ``<tenant hash>.<request hash>``: the request hash covers the tenant, the ``<provider>/<model>``
and where its calls go (the upstream model and the provider's URL: a reload pointing the name at another model
does not serve the old one's answers), the normalised messages and every generation parameter, so tenants
never see each other's entries (and one tenant's entries can be purged by the prefix). Normalised: text-only
part lists read as the plain string they spell, ``stop`` as a list, ``max_completion_tokens`` as
``max_tokens``, unset and null parameters alike; ``stream``, ``stream_options``, ``user`` and ``cache`` do not
change the answer and are left out. Only complete answers (finish reason ``stop``, ``length`` or
``tool_calls``) are stored, and never those of a request asking for ``logprobs``: an entry holds the message,
not its tokens' log probabilities, so a hit could not give them back.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.chat import ChatCompletionRequest, ChatMessage, FinishReason, TextPart, Usage, choice_seed

STORED_REASONS: frozenset[str] = frozenset({"stop", "length", "tool_calls", "function_call"})
_NOT_IN_KEY = {"model", "messages", "stream", "stream_options", "user", "cache", "max_completion_tokens",
               "max_tokens", "stop", "n"}
_VERSION = 1


def eligible(request: ChatCompletionRequest) -> bool:
    """Whether this request may be answered from (and stored in) the cache."""
    if (request.model_extra or {}).get("logprobs"):
        return False
    if request.cache is not None:
        return request.cache
    return request.temperature == 0


def _message(message: ChatMessage) -> dict[str, Any]:
    out = {k: v for k, v in message.model_dump(mode="json", exclude_none=True).items() if k != "content"}
    content = message.content
    if isinstance(content, list) and all(isinstance(p, TextPart) for p in content):
        out["content"] = "".join(p.text for p in content if isinstance(p, TextPart))
    elif content is not None:
        out["content"] = content if isinstance(content, str) else [
            p.model_dump(mode="json", exclude_none=True) for p in content]
    return out


def _params(request: ChatCompletionRequest) -> dict[str, Any]:
    params = {k: v for k, v in request.model_dump(mode="json", exclude_none=True).items() if k not in _NOT_IN_KEY}
    if request.token_limit() is not None:
        params["max_tokens"] = request.token_limit()
    if request.stop_sequences():
        params["stop"] = request.stop_sequences()
    return params


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def key(tenant: str, target: str, request: ChatCompletionRequest, choice: int = 0) -> str:
    """The KV key of a request's answer (``target``: ``<provider>/<model>`` and the URL its calls go to, the
    adapter's ``Target.cache_id``); ``choice`` is which sample of
    the request it is (``Lw-Choice``): the ``n`` choices of one request are ``n`` entries, not one answer
    ``n`` times. The first sample's key is the request's own."""
    whole: dict[str, Any] = {"tenant": tenant, "target": target, "messages": [_message(m) for m in request.messages],
                             "params": _params(request)}
    if choice:
        whole["choice"] = choice
    canonical = json.dumps(whole, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f"{_sha(tenant)[:16]}.{_sha(canonical)}"


def choice_keys(tenant: str, target: str, request: ChatCompletionRequest) -> list[str]:
    """The keys of the ``n`` choices of one request answered in one call: choice ``j``'s is the key a request
    of its own for it has (the gateway's, when it asks the choices one by one: ``n`` left out, ``seed + j``
    with a seed), so both ways share the entries."""
    seed = request.seed
    return [key(tenant, target, request if not (seed is not None and j) else
                request.model_copy(update={"seed": choice_seed(seed, j)}), j) for j in range(request.n or 1)]


def share_out(total: int, sizes: Sequence[int]) -> list[int]:
    """``total`` (tokens a call counted as a whole) shared among its parts by their ``sizes`` (each at least
    1), adding up to it: what each part's entry says it used."""
    out = [total * size // sum(sizes) for size in sizes]
    for i in range(total - sum(out)):  # what rounding down left, one each to the first parts
        out[i % len(out)] += 1
    return out


def tenant_prefix(tenant: str) -> str:
    """The key prefix of every entry of ``tenant`` (to purge them)."""
    return f"{_sha(tenant)[:16]}."


@dataclass(frozen=True)
class Entry:
    """A stored answer: the assistant message, why it ended, what it used, and the provider's
    ``system_fingerprint`` (a hit gives it back as the answer stored had it); ``stored_at``: when (unix time,
    so that a copy in memory does not outlive the bucket's TTL)."""

    message: dict[str, Any]
    finish_reason: FinishReason
    usage: Usage
    fingerprint: str | None = None
    stored_at: float = field(default_factory=time.time, compare=False)  # the same answer whenever stored

    def encode(self) -> bytes:
        """The KV value."""
        value = {"v": _VERSION, "message": self.message, "finish_reason": self.finish_reason,
                 "usage": self.usage.model_dump(), "at": self.stored_at}
        if self.fingerprint is not None:
            value["fp"] = self.fingerprint
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Entry | None:
        """An entry read back; ``None`` for anything unreadable or of another format version."""
        try:
            raw = json.loads(data)
            if raw.get("v") != _VERSION or raw["finish_reason"] not in STORED_REASONS:
                return None
            fingerprint, at = raw.get("fp"), raw.get("at")
            return cls(dict(raw["message"]), raw["finish_reason"], Usage.model_validate(raw["usage"]),
                       fingerprint if isinstance(fingerprint, str) else None,
                       float(at) if isinstance(at, int | float) else 0.0)  # no time: not kept in memory
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
