"""What a local model (onnxruntime-genai, text in, text out) cannot do, in one place for the router and the
local-inference service.

A parameter a local model cannot honour is refused (400, ``param`` naming it, code
``unsupported_parameter``) rather than ignored: code that asks for JSON mode, logprobs or a forced tool
call must not get free text with a 200. Default values pass, since many clients send them.

The cloud-adapter's Anthropic dialect reads the same table for what Anthropic has no counterpart for.
The router reads it before it routes (a request a local model would refuse goes to a cloud model of its
chain instead, or is refused at once when none is left); local-inference reads it again for what arrives
without a router (a NATS client publishing to a worker's subject).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from schemas.chat import ChatCompletionRequest, ChatMessage
from shared.errors import InvalidRequest

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
"""Request fields kept as extras that a local model accepts: ``logit_bias`` is honoured (local-inference's
``row_spec``); the others do not change its answer (no tools to call in parallel, nothing stored, no service
tiers)."""


def refuse_unsupported(model: str, messages: Iterable[ChatMessage]) -> None:
    """Local models read text only."""
    if any(m.has_non_text() for m in messages):
        raise InvalidRequest(f"model {model} reads text only; the message has non-text content",
                             param="messages")


def refuse_unhonoured(model: str, extras: Mapping[str, Any], *, table: Mapping[str, tuple[object, ...]] = UNHONOURED,
                      neutral: frozenset[str] = NEUTRAL, unknown: bool = True, speaker: str = "The local model",
                      elsewhere: str = "OpenAI-compatible cloud models (<provider>/<model>) do") -> None:
    """Refuse the first parameter ``model`` would ignore: one of ``table`` set to a value other than those
    that ask for nothing, or (``unknown``) one that is not an OpenAI chat parameter at all (OpenAI refuses
    those too). Parameters in ``neutral`` pass whatever their value, and so do tools (functions) that
    ``tool_choice`` (``function_call``) ``"none"`` forbids calling: the answer is text either way."""
    uncalled = {"tools"} if extras.get("tool_choice") == "none" else set()
    uncalled |= {"functions"} if extras.get("function_call") == "none" else set()
    for param, value in extras.items():
        if value is None or value == [] or param in neutral or param in uncalled:
            continue
        if param not in table:
            if not unknown:
                continue
            raise InvalidRequest(f"Unrecognized request argument supplied: {param}. {speaker} {model} "
                                 "takes OpenAI's chat parameters only.", param=param, code="unsupported_parameter")
        accepted = table[param]
        if value not in accepted:
            other = f" other than {' or '.join(json.dumps(v) for v in accepted)}" if accepted else ""
            raise InvalidRequest(f"{speaker} {model} does not support {param}{other}; {elsewhere}.",
                                 param=param, code="unsupported_parameter")


def local_refusal(model: str, request: ChatCompletionRequest) -> InvalidRequest | None:
    """Why the local model ``model`` would refuse ``request``, or ``None`` when it can serve it."""
    try:
        refuse_unsupported(model, request.messages)
        refuse_unhonoured(model, request.model_extra or {})
    except InvalidRequest as refused:
        return refused
    return None
