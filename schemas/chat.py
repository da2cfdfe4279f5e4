"""Chat messages in OpenAI's wire format: the request, the streamed chunk, and the final completion.

The same shapes travel on NATS and over HTTP, so a NATS client reads exactly what an OpenAI client reads.
Fields leafwire does not use itself (``tools``, ``response_format``...) are kept (``extra="allow"``) so
they reach cloud providers unchanged.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "function_call", "cancelled", "error"]


class TextPart(BaseModel):
    """A text part of a multi-part message content."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


PART_TYPES = ("text", "image_url", "input_audio", "refusal", "audio", "file")  # OpenAI's, in its order


class OtherPart(BaseModel):
    """A non-text content part (an image, audio...): kept for providers whose models take it."""

    model_config = ConfigDict(extra="allow")
    type: str

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in PART_TYPES:  # as OpenAI refuses them: "input_text" is not taken for text
            raise PydanticCustomError(
                "invalid_value", "Invalid value: '{value}'. Supported values are: {supported}.",
                {"value": value, "supported": ", ".join(repr(t) for t in PART_TYPES)})
        return value


def _part_kind(part: Any) -> str:
    """A part is text when its type says so, whatever else it holds (a part without its text is refused as
    such, not taken for an image)."""
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return "TextPart" if kind == "text" else "OtherPart"


ContentPart = Annotated[Annotated[TextPart, Tag("TextPart")] | Annotated[OtherPart, Tag("OtherPart")],
                        Discriminator(_part_kind)]


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="allow")
    role: Role
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None = None  # [] is refused, as OpenAI does
    name: str | None = None

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":  # an assistant's may be null (it called tools)
            raise ValueError(f"a {self.role} message needs content (a string or a list of parts)")
        return self

    def text(self) -> str:
        """The message's text; non-text parts are skipped."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def has_non_text(self) -> bool:
        """True when the message carries parts a text-only model cannot read."""
        return isinstance(self.content, list) and any(not isinstance(p, TextPart) for p in self.content)


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    include_usage: StrictBool = False


MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 128  # n (prompts × n in text completions), OpenAI's bound


def choice_seed(seed: int | None, j: int) -> int | None:
    """The seed of a request's ``j``-th choice when the choices are sampled apart: ``seed + j``, kept a signed
    64-bit integer (what providers take)."""
    if seed is None or j == 0:
        return seed
    return (seed + j + 2**63) % 2**64 - 2**63


class ChatCompletionRequest(BaseModel):
    """The payload of ``lw.v1.<site>.chat``: ``POST /v1/chat/completions``'s body. ``n`` > 1 is answered in
    one call by an OpenAI-compatible cloud model, whole or streamed (each chunk's choice has its index); any
    other target answers an error ``n_unsupported`` (ask each choice as its own request, as the HTTP gateway
    then does)."""

    model_config = ConfigDict(extra="allow")
    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt | None, Field(ge=1)] = None  # true or "5" is refused, as OpenAI does
    max_completion_tokens: Annotated[StrictInt | None, Field(ge=1)] = None
    temperature: Annotated[StrictFloat | None, Field(ge=0.0, le=2.0)] = None  # 1 passes; "0.5" or true is refused
    top_p: Annotated[StrictFloat | None, Field(gt=0.0, le=1.0)] = None
    n: Annotated[StrictInt | None, Field(ge=1, le=MAX_CHOICES)] = None  # > 1: OpenAI-compatible cloud models only
    stream: StrictBool = False  # "yes" or 1 is refused, as OpenAI does
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    presence_penalty: Annotated[StrictFloat | None, Field(ge=-2.0, le=2.0)] = None
    frequency_penalty: Annotated[StrictFloat | None, Field(ge=-2.0, le=2.0)] = None
    user: str | None = None
    cache: StrictBool | None = Field(
        default=None, description="leafwire extension for cloud models: true answers from the exact-match "
                                  "cache when it can (and stores the answer), false never does; by default "
                                  "only requests with temperature 0 use it. Never sent to a provider.")
    drop_params: StrictBool | None = Field(
        default=None, description="LiteLLM's, for cloud models: true leaves the parameters the model does not take "
                                  "out of its call instead of refusing them, false refuses them; by default as the "
                                  "providers file says. Never sent to a provider.")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and info.data.get("stream") is False:  # (absent when stream itself was refused)
            raise PydanticCustomError("stream_options_without_stream",
                                      "stream_options is only allowed when stream is true")
        return value

    def stop_sequences(self) -> list[str]:
        """The stop sequences as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_limit(self) -> int | None:
        """The completion token limit the caller asked for (``max_completion_tokens`` wins)."""
        return self.max_completion_tokens or self.max_tokens

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class HttpChatRequest(ChatCompletionRequest):
    """``POST /v1/chat/completions``'s body. With ``n`` > 1 the gateway asks the site once with ``n`` (an
    OpenAI-compatible cloud model answers every choice in one call), or, when the target answers one choice a
    request (``n_unsupported``), a request per choice."""


class Compact(BaseModel):
    """A model whose unset (``None``) fields are left out of its JSON, as OpenAI leaves them out."""

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class Usage(Compact):
    """Token counts of one answer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = Field(
        default=None, description="as OpenAI's: `cached_tokens`, the prompt tokens a provider read from its cache, "
                                  "and `cache_write_tokens`, those it wrote to it")
    completion_tokens_details: dict[str, int] | None = Field(
        default=None, description="as OpenAI's: `reasoning_tokens`, the completion tokens a model spent reasoning")

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, *, cached: int | None = None,
           reasoning: int | None = None, written: int | None = None) -> Usage:
        """Usage with the total filled in (and the details a provider gave)."""
        prompt_details = {k: v for k, v in (("cached_tokens", cached), ("cache_write_tokens", written))
                          if v is not None}
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=prompt_details or None,
            completion_tokens_details=None if reasoning is None else {"reasoning_tokens": reasoning},
        )


class AssistantMessage(BaseModel):
    """The assistant's message in a non-streamed answer."""

    role: Literal["assistant"] = "assistant"
    content: str | None


class Choice(BaseModel):
    """One choice of a non-streamed answer."""

    index: int = 0
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None  # OpenAI's, as a cloud provider gave them (local models refuse them)
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    """A non-streamed answer (``object: chat.completion``); the ``result`` event on NATS."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Delta(Compact):
    """The new part of the answer in one chunk; absent keys are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    """One choice of a streamed chunk."""

    index: int = 0
    delta: Delta
    logprobs: dict[str, Any] | None = None  # those of this chunk's tokens, as a cloud provider gave them
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One piece of a streamed answer (``object: chat.completion.chunk``); the ``chunk`` event on NATS."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


def dump(model: BaseModel) -> bytes:
    """Serialise a message for the wire: JSON, ``None`` fields kept where OpenAI keeps them."""
    return model.model_dump_json().encode()


def request_extras(request: ChatCompletionRequest) -> dict[str, Any]:
    """Fields the caller sent that leafwire does not model (``tools``, ``response_format``...)."""
    return dict(request.model_extra or {})


class StreamEnd(BaseModel):
    """The ``done`` event that closes a streamed answer on NATS (after the last chunk)."""

    request_id: str
    finish_reason: FinishReason
    usage: Usage
