"""The OpenAI-compatible dialect: OpenAI, Azure OpenAI, DeepSeek, vLLM, another leafwire gateway. No I/O.

The request goes out as the caller sent it (every field, ``tools`` and ``response_format`` included), with
the provider's model name, without leafwire's own fields, and — when streamed — asking for a closing usage
chunk (``stream_options.include_usage``) so that every call's cost is known. The answer's message fields
are relayed as they come (``content``, ``tool_calls``, ``refusal``, ``reasoning_content``...), and so are
its ``logprobs`` and ``system_fingerprint``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic_core import to_json

from schemas.chat import ChatCompletionRequest
from services.cloud_adapter.config import ModelSpec
from services.cloud_adapter.dialect import (
    Choices,
    ChoicesIgnored,
    Completion,
    Delta,
    ErrorInfo,
    Fingerprint,
    Finish,
    Piece,
    Tokens,
    as_int,
    bad_response,
    finish_reason,
    load_json,
    read_error,
)
from shared.errors import UpstreamError
from shared.logging import scrub

LEAFWIRE_FIELDS = frozenset({"cache", "drop_params"})


def _usage(value: Any) -> Tokens | None:
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get("prompt_tokens_details"), value.get("completion_tokens_details")
    cached = as_int(prompt.get("cached_tokens")) if isinstance(prompt, dict) else None
    if cached is None:  # DeepSeek's own field for the prompt's tokens read from its cache
        cached = as_int(value.get("prompt_cache_hit_tokens"))
    return Tokens(as_int(value.get("prompt_tokens")), as_int(value.get("completion_tokens")), cached,
                  as_int(completion.get("reasoning_tokens")) if isinstance(completion, dict) else None,
                  as_int(prompt.get("cache_write_tokens")) if isinstance(prompt, dict) else None)


def _logprobs(choice: dict[str, Any]) -> dict[str, Any] | None:
    """A choice's ``logprobs`` object (``None`` when absent, null, or not an object)."""
    value = choice.get("logprobs")
    return value if isinstance(value, dict) else None


def _index(choice: dict[str, Any]) -> int:
    value = choice.get("index")
    return value if isinstance(value, int) else -1


def _fingerprint(body: dict[str, Any]) -> str | None:
    value = body.get("system_fingerprint")
    return value if isinstance(value, str) else None


def _error_of(parsed: Any) -> ErrorInfo | None:
    """The error of a body or stream event: OpenAI's ``{"error": {...}}``, or the error object itself as vLLM
    and SGLang write it (``{"object": "error", "message": ...}``); ``None`` for anything else."""
    if not isinstance(parsed, dict):
        return None
    if parsed.get("error") is not None:
        return _error_info(parsed["error"])
    if parsed.get("object") == "error":
        return _error_info(parsed)
    return None


def _error_info(value: Any) -> ErrorInfo:
    if isinstance(value, dict):
        return ErrorInfo(message=str(value.get("message") or "no message"),
                         type=value.get("type") if isinstance(value.get("type"), str) else None,
                         code=value.get("code") if isinstance(value.get("code"), str) else None,
                         param=value.get("param") if isinstance(value.get("param"), str) else None)
    return ErrorInfo(message=str(value)[:200])


@dataclass
class OpenAIStream:
    """Parser of one OpenAI chat.completion.chunk stream, of ``n`` choices (each chunk's choices carry their
    ``index``; with ``n`` 1 only the first choice of a chunk is read, as index 0)."""

    provider: str
    n: int = 1
    done: bool = False
    fingerprint: str | None = None

    def feed(self, event: str, data: str) -> list[Piece]:
        """Pieces of one ``data:`` event; ``[DONE]`` ends the stream; an error object raises."""
        if data.strip() == "[DONE]":
            self.done = True
            return []
        chunk = load_json(self.provider, data)
        if not isinstance(chunk, dict):
            raise bad_response(self.provider, "a stream event is not a JSON object")
        if (info := _error_of(chunk)) is not None:
            raise UpstreamError(f"{self.provider} reported an error mid-stream: {scrub(info.message)[:300]}",
                                retryable=True)
        pieces: list[Piece] = []
        fingerprint = chunk.get("system_fingerprint")
        if isinstance(fingerprint, str) and fingerprint != self.fingerprint:
            self.fingerprint = fingerprint
            pieces.append(Fingerprint(fingerprint))
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            if self.n == 1:
                self._pieces_of(choices[0], 0, pieces, begins=False)
            else:
                for choice in choices:
                    self._pieces_of(choice, self._index_of(choice), pieces, begins=True)
        elif choices is not None and not isinstance(choices, list):
            raise bad_response(self.provider, "`choices` is not a list")
        usage = _usage(chunk.get("usage"))
        if usage is not None:
            pieces.append(usage)
        return pieces

    @staticmethod
    def _pieces_of(choice: dict[str, Any], index: int, pieces: list[Piece], begins: bool) -> None:
        """The pieces of one choice of a chunk; with ``begins``, an empty delta too (the role chunk that
        begins a choice of several: the adapter waits for every choice to begin)."""
        delta = choice.get("delta")
        logprobs = _logprobs(choice)
        if isinstance(delta, dict):
            fields = {k: v for k, v in delta.items() if v is not None and k != "role" and v != ""}
            if fields or logprobs is not None or begins:
                pieces.append(Delta(fields, logprobs, index))
        if choice.get("finish_reason") is not None:
            pieces.append(Finish(finish_reason(choice["finish_reason"]), index))

    def _index_of(self, choice: Any) -> int:
        """The index of a choice of a stream of ``n``: 0 to ``n - 1``, else the stream cannot be read."""
        if not isinstance(choice, dict):
            raise bad_response(self.provider, "a streamed choice is not a JSON object")
        index = _index(choice)
        if not 0 <= index < self.n:
            raise bad_response(self.provider,
                               f"a streamed choice of index {choice.get('index')!r:.20} for n = {self.n}")
        return index


REASONING_REFUSES = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs",
                     "logit_bias")
"""What OpenAI's reasoning models answer a 400 for (``temperature`` and ``top_p`` other than 1), as LiteLLM's
o-series config lists them; with ``drop_params`` these are left out of their calls."""


@dataclass(frozen=True)
class OpenAICompatible:
    """The dialect object for an OpenAI-compatible provider."""

    native_n: ClassVar[bool] = True
    provider: str
    drop_params: bool = False

    def body(self, request: ChatCompletionRequest, model: ModelSpec, upstream: str, stream: bool,
             usage: bool = True) -> bytes:
        """The caller's request with the provider's model name and its completion limit in the field the model
        takes; streamed, with a usage chunk asked for unless ``usage`` is false (a server refusing
        ``stream_options``). A reasoning model set to drop parameters is not sent the sampling parameters it
        refuses (``REASONING_REFUSES``); otherwise they go as given, and its own 400 names them."""
        out = request.model_dump(mode="json", exclude_unset=True, exclude=set(LEAFWIRE_FIELDS))
        if model.drops(self.drop_params, request.drop_params) and model.is_reasoning(upstream):
            for param in REASONING_REFUSES:
                out.pop(param, None)
        out["model"] = upstream
        out.pop("stream_options", None)
        if stream:
            out["stream"] = True
            if usage:
                out["stream_options"] = {"include_usage": True}
        else:
            out.pop("stream", None)
        field = model.limit_field(upstream)
        limit = request.token_limit()
        if field is not None and limit is not None:
            out.pop("max_tokens", None)
            out.pop("max_completion_tokens", None)
            out[field] = limit
        return to_json(out)

    def headers(self) -> dict[str, str]:
        """No extra headers beyond the key."""
        return {}

    def resume(self, body: bytes, answers: list[bytes]) -> bytes | None:
        """OpenAI-compatible servers pause no turn."""
        return None

    def combined(self, answers: list[bytes]) -> bytes:
        """The one answer (nothing is resumed)."""
        return answers[-1]

    def completion(self, data: bytes, request: ChatCompletionRequest | None = None) -> Completion:
        """The message, finish reason and usage of a ``chat.completion`` (of any request: it is relayed)."""
        body, choices = self._choices(data)
        usage = _usage(body.get("usage")) or Tokens()
        return self._choice(choices[0], "first", usage, _fingerprint(body))

    def choices(self, data: bytes, n: int) -> Choices:
        """Every choice of a ``chat.completion`` asked with ``n``, by index (``0`` to ``n - 1``, each once),
        and the call's usage."""
        body, choices = self._choices(data)
        if len(choices) == 1 < n:  # a server without n (many are): one sample, billed
            raise ChoicesIgnored(self.provider, _usage(body.get("usage")))
        indexed = sorted(choices, key=_index)
        if [c.get("index") for c in indexed] != list(range(n)):
            raise bad_response(self.provider, f"{len(choices)} choices (indexes "
                               f"{[c.get('index') for c in indexed][:8]}) for n = {n}")
        usage = _usage(body.get("usage")) or Tokens()
        return Choices([self._choice(c, f"index {i}", Tokens(), None) for i, c in enumerate(indexed)],
                       usage.prompt, usage.completion, usage.cached, usage.reasoning, _fingerprint(body),
                       usage.written)

    def _choices(self, data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        body = load_json(self.provider, data)
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
            raise bad_response(self.provider, "no `choices` in the answer")
        return body, choices

    def _choice(self, choice: dict[str, Any], which: str, usage: Tokens, fingerprint: str | None) -> Completion:
        message = choice.get("message")
        if not isinstance(message, dict):
            raise bad_response(self.provider, f"no `message` in the answer's {which} choice")
        return Completion({k: v for k, v in message.items() if k != "role"},
                          finish_reason(choice.get("finish_reason")), usage.prompt, usage.completion,
                          usage.cached, usage.reasoning, _logprobs(choice), fingerprint, usage.written)

    def stream_parser(self, n: int = 1, request: ChatCompletionRequest | None = None) -> OpenAIStream:
        """A parser for one streamed answer of ``n`` choices (of any request: it is relayed)."""
        return OpenAIStream(self.provider, n)

    def error_info(self, body: bytes) -> ErrorInfo:
        """``{"error": {"message", "type", "code", "param"}}``, vLLM's and SGLang's ``{"object": "error",
        "message", "type", "code"}``, or the body's text."""
        return read_error(body, _error_of)
