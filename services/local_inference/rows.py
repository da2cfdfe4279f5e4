"""One request's side of decoding: the decoder's view of a chat request, the errors a row can end with,
and the timing of its tokens (into the metrics). No NATS in here.

A parameter a local model cannot honour is refused (400, ``param`` naming it, code
``unsupported_parameter``) rather than ignored: code that asks for JSON mode, logprobs or a forced tool
call must not get free text with a 200. Default values pass, since many clients send them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

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
    defaults, extras = engine.spec.defaults, request.model_extra or {}
    for m in request.messages:
        refuse_unsupported(engine.spec.name, m)
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


def refuse_unsupported(model: str, message: ChatMessage) -> None:
    """Local models read text only."""
    if message.has_non_text():
        raise InvalidRequest(f"model {model} reads text only; the message has non-text content",
                             param="messages")


# OpenAI parameters a local model does not honour, with the values that ask for nothing (accepted). ``None``
# and ``[]`` (no tools, no functions) count as absent for every parameter; ``{}`` does not (an empty
# ``web_search_options`` asks for a search).
UNHONOURED: dict[str, tuple[object, ...]] = {
    "tools": (),
    "tool_choice": ("none", "auto"),
    "functions": (),
    "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "modalities": (["text"],),
    "audio": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
}
NEUTRAL = frozenset({"logit_bias", "parallel_tool_calls", "store", "metadata", "service_tier", "prediction",
                     "prompt_cache_key", "safety_identifier"})
"""Request fields kept as extras that a local model accepts: ``logit_bias`` is honoured (``row_spec``); the
others do not change its answer (no tools to call in parallel, nothing stored, no service tiers)."""
MAX_LOGIT_BIAS = 100.0


def refuse_unhonoured(model: str, extras: Mapping[str, Any]) -> None:
    """Refuse the first parameter the local model would ignore: a known one set to a non-default value, or
    one that is not an OpenAI chat parameter at all (OpenAI refuses those too)."""
    for param, value in extras.items():
        if value is None or value == [] or param in NEUTRAL:
            continue
        if param not in UNHONOURED:
            raise InvalidRequest(f"Unrecognized request argument supplied: {param}. The local model {model} "
                                 "takes OpenAI's chat parameters only.", param=param, code="unsupported_parameter")
        accepted = UNHONOURED[param]
        if value not in accepted:
            other = f" other than {' or '.join(json.dumps(v) for v in accepted)}" if accepted else ""
            raise InvalidRequest(f"The local model {model} does not support {param}{other}; OpenAI-compatible "
                                 "cloud models (<provider>/<model>) do.", param=param, code="unsupported_parameter")


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
