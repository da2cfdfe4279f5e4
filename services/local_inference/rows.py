"""One request's side of decoding: the decoder's view of a chat request, the errors a row can end with,
and the timing of its tokens (into the metrics). No NATS in here.

What a local model cannot honour is refused (``shared.local_params``): the router has already routed such a
request elsewhere, but a NATS client may publish to a worker's subject directly.
"""

from __future__ import annotations

import math
import time
from typing import Any

from schemas.chat import ChatCompletionRequest
from services.local_inference.embedder import TooLong
from services.local_inference.engine import Engine
from services.local_inference.ipc import Rejected, RowSpec
from shared import metrics
from shared.envelope import Envelope
from shared.errors import ChoicesOneByOne, ContextLengthExceeded, DeadlineExceeded, InvalidRequest, LeafwireError
from shared.local_params import refuse_unhonoured, refuse_unsupported


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
    defaults, extras = engine.spec.defaults, request.model_extra or {}
    if (request.n or 1) > 1:
        raise ChoicesOneByOne(request.n or 1, f"local model {engine.spec.name}")
    refuse_unsupported(engine.spec.name, request.messages)
    refuse_unhonoured(engine.spec.name, extras)
    return RowSpec(
        key=engine.new_key(),
        messages=[{"role": m.role, "content": m.text()} for m in request.messages],
        max_tokens=request.token_limit(),
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=request.stop_sequences(),
        deadline=env.deadline,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=logit_bias(extras.get("logit_bias")),
    )


MAX_LOGIT_BIAS = 100.0


def logit_bias(value: Any) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (token ids as strings -> -100..100), checked; ``None`` when absent or empty."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("logit_bias must be an object mapping token ids to biases", param="logit_bias")
    out: dict[int, float] = {}
    for key, bias in value.items():
        token = str(key)
        if not token.isdecimal():
            raise InvalidRequest(f"Invalid key in 'logit_bias': {key!r} is not a token id", param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not (
                math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
            raise InvalidRequest(f"Invalid value for 'logit_bias' token {key}: {bias!r}; biases go from -100 to 100",
                                 param="logit_bias")
        out[int(token)] = float(bias)
    return out


def rejection(model: str, event: Rejected) -> LeafwireError:
    """The caller-facing error for a row the decoder refused."""
    if event.reason == "context_length":
        d = event.detail
        return ContextLengthExceeded(model=model, context_length=d["context_length"],
                                     prompt_tokens=d["prompt_tokens"], max_tokens=d["max_tokens"])
    if event.reason == "deadline":
        return DeadlineExceeded(event.message)  # before decoding, or while a long prompt was read
    return InvalidRequest(event.message, param="logit_bias")  # the decoder finds only unknown token ids invalid


def too_long(model: str, result: TooLong) -> InvalidRequest:
    """The 400 for an embeddings input longer than the model reads, stating both numbers."""
    return InvalidRequest(f"This model's maximum context length is {result.limit} tokens per input. However, "
                          f"input[{result.index}] has {result.tokens} tokens. Please shorten it.",
                          param="input", code="context_length_exceeded")
