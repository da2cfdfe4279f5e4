"""One request's side of decoding: the decoder's view of a chat request, the errors a row can end with,
and the timing of its tokens (into the metrics). No NATS in here."""

from __future__ import annotations

import time

from schemas.chat import ChatCompletionRequest, ChatMessage
from services.local_inference.embedder import TooLong
from services.local_inference.engine import Engine
from services.local_inference.ipc import Rejected, RowSpec
from shared import metrics
from shared.envelope import Envelope
from shared.errors import ContextLengthExceeded, DeadlineExceeded, InvalidRequest, LeafwireError


class TokenClock:
    """Time to first token, inter-token latency and decode speed of one answer, into the metrics."""

    def __init__(self, model: str, arrived: float) -> None:
        self.model = model
        self.arrived = arrived
        self.first = 0.0
        self.last = 0.0

    def tick(self) -> None:
        """A piece of text arrived."""
        now = time.monotonic()
        if self.last:
            metrics.INTER_TOKEN.labels(self.model).observe(now - self.last)
        else:
            self.first = now
            metrics.TTFT.labels(self.model).observe(now - self.arrived)
        self.last = now

    def done(self, tokens: int) -> None:
        """The answer ended after ``tokens`` tokens."""
        if tokens > 1 and self.last > self.first:
            metrics.DECODE_RATE.labels(self.model).observe((tokens - 1) / (self.last - self.first))


def row_spec(engine: Engine, request: ChatCompletionRequest, env: Envelope) -> RowSpec:
    """The decoder's view of a request, with the model's defaults filled in."""
    defaults = engine.spec.defaults
    for m in request.messages:
        refuse_unsupported(engine.spec.name, m)
    if request.model_extra and request.model_extra.get("tools"):
        raise InvalidRequest(f"model {engine.spec.name} does not support tools", param="tools")
    return RowSpec(
        key=engine.new_key(),
        messages=[{"role": m.role, "content": m.text()} for m in request.messages],
        max_tokens=request.token_limit(),
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=request.stop_sequences(),
        deadline=env.deadline,
    )


def refuse_unsupported(model: str, message: ChatMessage) -> None:
    """Local models read text only."""
    if message.has_non_text():
        raise InvalidRequest(f"model {model} reads text only; the message has non-text content",
                             param="messages")


def rejection(model: str, event: Rejected) -> LeafwireError:
    """The caller-facing error for a row the decoder refused."""
    if event.reason == "context_length":
        d = event.detail
        return ContextLengthExceeded(model=model, context_length=d["context_length"],
                                     prompt_tokens=d["prompt_tokens"], max_tokens=d["max_tokens"])
    if event.reason == "deadline":
        return DeadlineExceeded(event.message)  # before decoding, or while a long prompt was read
    return InvalidRequest(event.message)


def too_long(model: str, result: TooLong) -> InvalidRequest:
    """The 400 for an embeddings input longer than the model reads, stating both numbers."""
    return InvalidRequest(f"This model's maximum context length is {result.limit} tokens per input. However, "
                          f"input[{result.index}] has {result.tokens} tokens. Please shorten it.",
                          param="input", code="context_length_exceeded")
