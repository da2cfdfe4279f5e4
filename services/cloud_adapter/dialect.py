"""What every provider dialect produces, and how provider errors map to leafwire's. No I/O.

A dialect (``openai_compat``, ``anthropic``) turns an OpenAI chat request into the provider's HTTP body,
and the provider's answer back into OpenAI pieces: a whole ``Completion``, or a stream of ``Delta``
(fields of the assistant message: ``content``, ``tool_calls``...), ``Finish`` and ``Tokens``.

How a provider's HTTP status maps (``classify``), and whether it is retried:

| provider says | caller gets | retried | counts against the breaker |
|---|---|---|---|
| 400, 413, 422 (the request is wrong) | 400 with the provider's message and param | no | no |
| 404 (no such model at the provider) | 404 ``model_not_found`` | no | no |
| 401, 403 (leafwire's key refused) | 502 ``upstream_auth_failed`` (the provider's text is not relayed) | no | yes |
| 402, or 429 ``insufficient_quota`` | 502 ``upstream_insufficient_quota`` | no | yes |
| 429 (rate limit) | 429 ``upstream_rate_limited`` + Retry-After | yes | yes |
| 408, 409, 425, 5xx, 529 | 502 ``upstream_error`` (504 ``upstream_timeout`` for 408/504) | yes | yes |
| 3xx (redirects are never followed) | 502 ``upstream_bad_response`` | no | yes |
| any other 4xx | 502 ``upstream_error`` | no | no |
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic_core import from_json

from schemas.chat import ChatCompletionRequest, FinishReason
from services.cloud_adapter.config import ModelSpec
from shared.errors import (
    InvalidRequest,
    LeafwireError,
    ModelNotFound,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from shared.logging import scrub

_MAX_MESSAGE = 500
CHARS_PER_TOKEN = 4  # estimate when a provider reports no usage
FINISH_REASONS: frozenset[str] = frozenset({"stop", "length", "content_filter", "tool_calls", "function_call"})
# Other OpenAI-compatible servers' words for OpenAI's reasons: a cut answer must say ``length`` (Mistral's
# model_length: the context window filled), a filtered one ``content_filter`` (Gemini's safety, recitation).
FINISH_ALIASES: dict[str, FinishReason] = {
    "model_length": "length", "max_tokens": "length", "model_context_window_exceeded": "length",
    "eos": "stop", "eos_token": "stop", "stop_sequence": "stop", "end_turn": "stop",
    "safety": "content_filter", "recitation": "content_filter", "tool_use": "tool_calls",
}


@dataclass(frozen=True, slots=True)
class Delta:
    """New fields of the assistant message (``content``, ``tool_calls`` pieces, ``reasoning_content``...), and
    the log probabilities of its tokens when the provider gave them; of choice ``index`` (a call of ``n``)."""

    fields: dict[str, Any]
    logprobs: dict[str, Any] | None = None
    index: int = 0


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The provider's ``system_fingerprint`` (its backend configuration, for callers who use seeds)."""

    value: str


@dataclass(frozen=True, slots=True)
class Finish:
    """Why the answer (its choice ``index``) ended."""

    reason: FinishReason
    index: int = 0


@dataclass(frozen=True, slots=True)
class Tokens:
    """Token counts as the provider reports them; ``None`` where this report does not say."""

    prompt: int | None = None
    completion: int | None = None
    cached: int | None = None  # of the prompt, read from the provider's prompt cache
    reasoning: int | None = None  # of the completion, spent reasoning
    written: int | None = None  # of the prompt, written to the provider's prompt cache (Anthropic prices them apart)
    written_1h: int | None = None  # of those, written for an hour (Anthropic's dearer TTL)
    searches: int | None = None  # web searches the provider ran for the answer (Anthropic's server tool)


Piece = Delta | Finish | Tokens | Fingerprint


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole (non-streamed) answer."""

    message: dict[str, Any]
    finish: FinishReason
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    logprobs: dict[str, Any] | None = None
    fingerprint: str | None = None
    written_tokens: int | None = None
    written_1h_tokens: int | None = None
    searches: int | None = None  # web searches run for it


@dataclass(frozen=True, slots=True)
class Choices:
    """A whole answer of ``n`` > 1 choices, in index order, and what the call as a whole counted (the prompt
    once: one call)."""

    completions: list[Completion]
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    fingerprint: str | None = None
    written_tokens: int | None = None


class StreamParser(Protocol):
    """Turns a provider's server-sent events into pieces; raises the error an event reports."""

    done: bool

    def feed(self, event: str, data: str) -> list[Piece]:
        """Pieces carried by one event."""
        ...


class Dialect(Protocol):
    """How to talk to one kind of provider."""

    @property
    def native_n(self) -> bool:
        """Whether one call answers ``n`` choices (else each choice is a call of its own)."""
        ...

    def body(self, request: ChatCompletionRequest, model: ModelSpec, upstream: str, stream: bool,
             usage: bool = True) -> bytes:
        """The HTTP body of a chat call (streamed: asking for the usage where the dialect must, and ``usage``)."""
        ...

    def headers(self) -> dict[str, str]:
        """Headers every call carries (never the key: that is added by the caller)."""
        ...

    def completion(self, data: bytes, request: ChatCompletionRequest | None = None) -> Completion:
        """The answer of a non-streamed call (of ``request``, where the translation depends on it)."""
        ...

    def choices(self, data: bytes, n: int) -> Choices | None:
        """The ``n`` choices of a non-streamed call that asked for them; ``None``: the dialect has no ``n``
        (each choice is a call of its own)."""
        ...

    def resume(self, body: bytes, answers: list[bytes]) -> bytes | None:
        """The body of the call that goes on with a turn the provider paused (its ``answers`` so far, each a
        non-streamed answer to ``body`` or to the call that went on from it); ``None``: the last one was not
        paused."""
        ...

    def combined(self, answers: list[bytes]) -> bytes:
        """One non-streamed answer of a turn answered in several parts (``resume``): what ``completion`` reads."""
        ...

    def stream_parser(self, n: int = 1, request: ChatCompletionRequest | None = None) -> StreamParser:
        """A parser for one streamed answer (of ``n`` choices: only a dialect with ``native_n`` is asked more) of
        ``request``."""
        ...

    def error_info(self, body: bytes) -> ErrorInfo:
        """What the provider's error body says."""
        ...


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The fields of a provider's error body that leafwire uses."""

    message: str
    type: str | None = None
    code: str | None = None
    param: str | None = None


class ChoicesIgnored(UpstreamError):
    """A provider that has no ``n``: it answered one choice to a call asking for several (what it counted:
    ``tokens``, billed), or refused ``n`` with a 400 naming it. Not retried; its choices are asked a call each."""

    default_code = "n_ignored"

    def __init__(self, provider: str, tokens: Tokens | None = None) -> None:
        super().__init__(f"{provider} has no n: it answers one choice a call", provider_fault=False)
        self.tokens = tokens


def bad_response(provider: str, what: str) -> UpstreamError:
    """A provider answer leafwire cannot read (retryable: the next try may be fine)."""
    return UpstreamError(f"{provider} sent an answer that could not be read: {what}",
                         code="upstream_bad_response", retryable=True)


def load_json(provider: str, data: bytes | str) -> Any:
    """JSON from the provider, or a bad-response error."""
    try:
        return from_json(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_response(provider, f"malformed JSON ({str(exc)[:80]})") from exc


def finish_reason(value: Any) -> FinishReason:
    """An OpenAI finish reason from a provider's (other servers' words for them mapped, ``FINISH_ALIASES``;
    unknown reasons become ``stop``; ``function_call``, of the legacy ``functions``, stays: its answer has a
    ``function_call``, no ``tool_calls``)."""
    if not isinstance(value, str):
        return "stop"
    if value in FINISH_REASONS:
        return value  # type: ignore[return-value]
    return FINISH_ALIASES.get(value.lower(), "stop")


def as_int(value: Any) -> int | None:
    """A token count, or ``None`` when the provider did not give a whole number (``100.0`` is one: some
    OpenAI-compatible servers write counts as floats)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def text_of(body: bytes) -> str:
    """A short, printable excerpt of a body that is not a known error object."""
    return scrub(body[:4096].decode(errors="replace"))[:200].strip() or "(empty body)"  # a key cut short would leak


def read_error(body: bytes, pick: Callable[[Any], ErrorInfo | None]) -> ErrorInfo:
    """A provider's error from its body: ``pick`` reads the dialect's JSON shape; when the body is not JSON,
    or ``pick`` finds no error in it, the body's text."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ErrorInfo(message=text_of(body))
    return pick(parsed) or ErrorInfo(message=text_of(body))


def classify(provider: str, model: str, status: int, info: ErrorInfo,
             hint: float | None) -> LeafwireError:
    """The leafwire error for a provider's error answer (see the table in the module docstring)."""
    message = scrub(info.message)[:_MAX_MESSAGE]
    quota = "insufficient_quota" in (info.type, info.code) or status == 402
    if status in (400, 413, 422):
        return InvalidRequest(f"{provider}: {message}", param=info.param, code=info.code)
    if status == 404:
        return ModelNotFound(model)
    if status in (401, 403):
        return UpstreamError(f"{provider} refused the adapter's credentials ({status}); "
                             "an operator must check the provider's API key", code="upstream_auth_failed")
    if quota:
        return UpstreamError(f"{provider}: the provider account is out of credit",
                             code="upstream_insufficient_quota")
    if status == 429:
        return UpstreamRateLimited(f"{provider} is rate limiting calls: {message}", retry_after=hint,
                                   retryable=True)
    if status in (408, 504):
        return UpstreamTimeout(f"{provider} timed out ({status})", retry_after=hint, retryable=True)
    if status in (409, 425) or status >= 500:
        return UpstreamError(f"{provider} failed ({status}): {message}", retry_after=hint, retryable=True)
    if 300 <= status < 400:
        return UpstreamError(f"{provider} answered with a redirect ({status}), which is not followed",
                             code="upstream_bad_response")
    return UpstreamError(f"{provider} refused the call ({status}): {message}", provider_fault=False)


def retryable(err: LeafwireError) -> bool:
    """Whether another try of the call may succeed."""
    return isinstance(err, UpstreamError) and err.retryable


def provider_fault(err: LeafwireError) -> bool:
    """Whether the failure counts against the provider's breaker."""
    return isinstance(err, UpstreamError) and err.provider_fault
