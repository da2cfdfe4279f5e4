"""The Anthropic Messages dialect, translated both ways (requests, answers, streams, usage). No I/O.

Request (OpenAI → Anthropic):
- ``system`` and ``developer`` messages become ``system`` (strings joined by blank lines; when one is a list
  of text parts, every one becomes a text block of ``system``, so parts stay apart as a user message's do);
  consecutive messages of one role are merged (Anthropic wants user and assistant to alternate).
- text parts → ``text`` blocks (and an assistant's ``refusal`` parts: what it said); ``image_url`` parts →
  ``image`` blocks (a ``data:`` URL as base64, else as a URL); other part types are refused (400).
- assistant ``tool_calls`` → ``tool_use`` blocks; ``tool`` messages → ``tool_result`` blocks of a user turn
  (their text parts as text blocks of the result).
- ``tools`` → ``name``/``description``/``input_schema``; ``tool_choice`` auto/none/required/a function →
  auto/none/any/tool; ``parallel_tool_calls: false`` → ``disable_parallel_tool_use``.
- ``max_tokens`` (required by Anthropic) defaults to the model's ``max_tokens`` in the providers file;
  ``stop`` → ``stop_sequences``; ``temperature`` above 1 is refused (400: Anthropic takes 0-1);
  ``top_p``; ``user`` → ``metadata.user_id``. ``seed`` is not sent (Anthropic has none; OpenAI calls it best
  effort too). What Anthropic cannot honour and would change the answer is refused (400
  ``unsupported_parameter``) rather than dropped: ``response_format`` other than text, ``logprobs``,
  ``logit_bias``, non-zero penalties, audio and the other OpenAI-only parameters of
  ``shared.local_params.UNHONOURED``. Other unknown fields are not sent.

Answer (Anthropic → OpenAI): text blocks → ``content``; ``tool_use`` → ``tool_calls`` (input as JSON
text; a tool call without arguments has ``{}``, streamed too); ``stop_reason`` end_turn/stop_sequence/
pause_turn → stop, max_tokens and model_context_window_exceeded → length, tool_use → tool_calls, refusal →
content_filter; usage ``input_tokens`` (+ cache creation and cache read) → prompt,
``output_tokens`` → completion. Streams: ``message_start`` (prompt tokens), ``content_block_start`` /
``content_block_delta`` (text and tool-call argument pieces), ``message_delta`` (stop reason, output
tokens), ``message_stop``; ``ping`` is ignored; an ``error`` event raises.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from schemas.chat import ChatCompletionRequest, ChatMessage, FinishReason, TextPart, request_extras
from services.cloud_adapter.config import ModelSpec
from services.cloud_adapter.dialect import (
    Completion,
    Delta,
    ErrorInfo,
    Finish,
    Piece,
    Tokens,
    as_int,
    bad_response,
    load_json,
    read_error,
)
from shared import local_params
from shared.errors import InvalidRequest, LeafwireError, UpstreamError, UpstreamRateLimited
from shared.logging import scrub

STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
    "tool_use": "tool_calls", "refusal": "content_filter", "model_context_window_exceeded": "length",
}
_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+);base64,(.*)$", re.DOTALL)
Block = dict[str, Any]


def _image(url: Any) -> Block:
    if not isinstance(url, str):
        raise InvalidRequest("an image_url part needs a url", param="messages")
    m = _DATA_URL.match(url)
    if m:
        return {"type": "image", "source": {"type": "base64", "media_type": m.group(1), "data": m.group(2)}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _content_blocks(message: ChatMessage) -> list[Block]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [{"type": "text", "text": message.content}] if message.content else []
    blocks: list[Block] = []
    for part in message.content:
        if isinstance(part, TextPart):
            blocks.append({"type": "text", "text": part.text})
        elif part.type == "image_url":
            extra = part.model_extra or {}
            image = extra.get("image_url")
            blocks.append(_image(image.get("url") if isinstance(image, dict) else image))
        elif part.type == "refusal" and message.role == "assistant":  # what the assistant said when it refused
            refusal = (part.model_extra or {}).get("refusal")
            if isinstance(refusal, str) and refusal:
                blocks.append({"type": "text", "text": refusal})
        else:
            raise InvalidRequest(f"anthropic models do not take message parts of type {part.type!r}",
                                 param="messages")
    return blocks


def _tool_use(call: Any) -> Block:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest("each tool call needs function.name", param="messages")
    try:
        arguments = json.loads(fn.get("arguments") or "{}")
    except ValueError as exc:
        raise InvalidRequest(f"the arguments of tool call {fn['name']!r} are not JSON", param="messages") from exc
    return {"type": "tool_use", "id": str(call.get("id") or ""), "name": fn["name"], "input": arguments}


def _turn(message: ChatMessage) -> tuple[str, list[Block]]:
    extra = message.model_extra or {}
    if message.role == "tool":
        result = message.text() if isinstance(message.content, str) else _content_blocks(message)
        return "user", [{"type": "tool_result", "tool_use_id": str(extra.get("tool_call_id") or ""),
                         "content": result}]
    blocks = _content_blocks(message)
    if message.role == "assistant":
        blocks += [_tool_use(call) for call in extra.get("tool_calls") or []]
    return ("assistant" if message.role == "assistant" else "user"), blocks


def translate_messages(messages: list[ChatMessage]) -> tuple[str | list[Block], list[dict[str, Any]]]:
    """(system text or text blocks, Anthropic messages with alternating roles)."""
    system: list[ChatMessage] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role in ("system", "developer"):
            system.append(message)
            continue
        role, blocks = _turn(message)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise InvalidRequest("anthropic models need at least one user or assistant message", param="messages")
    return _system(system), turns


def _system(messages: list[ChatMessage]) -> str | list[Block]:
    """The ``system`` of the system and developer messages: their strings joined by blank lines, or text
    blocks when any of them is a list of parts (joining parts would run their words together)."""
    if all(isinstance(m.content, str) for m in messages):
        return "\n\n".join(m.text() for m in messages if m.text())
    blocks = [b for m in messages for b in _content_blocks(m)]
    if any(b["type"] != "text" for b in blocks):
        raise InvalidRequest("a system or developer message can hold text only", param="messages")
    return [b for b in blocks if b["text"]]  # Anthropic refuses empty text blocks


def _tool(tool: Any) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest("each tool needs a function with a name", param="tools")
    return {"name": fn["name"], "description": fn.get("description") or "",
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}


def _tools(extras: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tools = extras.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise InvalidRequest("tools must be a list", param="tools")
        out["tools"] = [_tool(t) for t in tools]
    choice = extras.get("tool_choice")
    mapped: dict[str, Any] | None = None
    if choice in ("auto", "none"):
        mapped = {"type": choice}
    elif choice == "required":
        mapped = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        mapped = {"type": "tool", "name": choice["function"].get("name", "")}
    elif choice is not None:  # allowed_tools, custom tools...: a restriction Anthropic's four choices cannot say
        raise InvalidRequest(f"The Anthropic model does not support this tool_choice ({json.dumps(choice)[:80]}); "
                             "it takes \"auto\", \"none\", \"required\" or one named function.",
                             param="tool_choice", code="unsupported_parameter")
    if extras.get("parallel_tool_calls") is False and (mapped or {}).get("type") != "none":
        mapped = {**(mapped or {"type": "auto"}), "disable_parallel_tool_use": True}  # "none" takes no flag
    if mapped is not None:
        out["tool_choice"] = mapped
    return out


def _message(content: Any) -> tuple[dict[str, Any], bool]:
    """An OpenAI assistant message from Anthropic content blocks; and whether it holds tool calls."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id", ""), "type": "function",
                          "function": {"name": block.get("name", ""),
                                       "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
    message: dict[str, Any] = {"content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message, bool(calls)


def _prompt_tokens(usage: dict[str, Any]) -> int | None:
    parts = [as_int(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens",
                                            "cache_read_input_tokens")]
    return None if parts[0] is None else sum(p or 0 for p in parts)


def _stream_error(provider: str, error: Any) -> LeafwireError:
    info = error if isinstance(error, dict) else {}
    kind, message = scrub(str(info.get("type", "")))[:100], scrub(str(info.get("message", "no message")))[:300]
    if kind == "rate_limit_error":
        return UpstreamRateLimited(f"{provider} is rate limiting calls: {message}", retryable=True)
    if kind == "invalid_request_error":
        return InvalidRequest(f"{provider}: {message}")
    return UpstreamError(f"{provider} reported {kind or 'an error'} mid-stream: {message}", retryable=True)


def _error_info(parsed: Any) -> ErrorInfo | None:
    """``{"type": "error", "error": {"type", "message"}}``; ``None`` for any other shape."""
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None
    kind = error.get("type") if isinstance(error.get("type"), str) else None
    return ErrorInfo(message=str(error.get("message") or "no message"), type=kind, code=kind)


@dataclass
class AnthropicStream:
    """Parser of one Anthropic Messages stream, producing OpenAI pieces."""

    provider: str
    done: bool = False
    _tools: dict[int, int] = field(default_factory=dict)  # Anthropic block index → OpenAI tool call index
    _argued: set[int] = field(default_factory=set)  # tool blocks whose arguments have begun

    def feed(self, event: str, data: str) -> list[Piece]:
        """Pieces of one event (see the module docstring)."""
        body = load_json(self.provider, data)
        if not isinstance(body, dict):
            raise bad_response(self.provider, "a stream event is not a JSON object")
        kind = body.get("type", event)
        handler = getattr(self, f"_on_{kind}", None)
        return handler(body) if handler is not None else []

    def _on_message_start(self, body: dict[str, Any]) -> list[Piece]:
        usage = (body.get("message") or {}).get("usage") or {}
        return [Tokens(prompt=_prompt_tokens(usage), cached=as_int(usage.get("cache_read_input_tokens")))]

    def _on_content_block_start(self, body: dict[str, Any]) -> list[Piece]:
        block = body.get("content_block") or {}
        if block.get("type") == "tool_use":
            index = self._tools.setdefault(int(body.get("index", 0)), len(self._tools))
            return [Delta({"tool_calls": [{"index": index, "id": block.get("id", ""), "type": "function",
                                           "function": {"name": block.get("name", ""), "arguments": ""}}]})]
        if block.get("type") == "text" and block.get("text"):
            return [Delta({"content": block["text"]})]
        return []

    def _on_content_block_delta(self, body: dict[str, Any]) -> list[Piece]:
        delta = body.get("delta") or {}
        if delta.get("type") == "text_delta" and delta.get("text"):
            return [Delta({"content": delta["text"]})]
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            block = int(body.get("index", 0))
            self._argued.add(block)
            index = self._tools.get(block, 0)
            return [Delta({"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]})]
        return []

    def _on_content_block_stop(self, body: dict[str, Any]) -> list[Piece]:
        """A tool call that ends without arguments (a tool with no parameters) has ``{}``, as OpenAI's and
        the whole answer's: ``""`` is not JSON."""
        block = int(body.get("index", 0))
        if block not in self._tools or block in self._argued:
            return []
        self._argued.add(block)
        return [Delta({"tool_calls": [{"index": self._tools[block], "function": {"arguments": "{}"}}]})]

    def _on_message_delta(self, body: dict[str, Any]) -> list[Piece]:
        pieces: list[Piece] = []
        reason = (body.get("delta") or {}).get("stop_reason")
        if reason:
            pieces.append(Finish(STOP_REASONS.get(reason, "stop")))
        usage = body.get("usage") or {}
        pieces.append(Tokens(prompt=_prompt_tokens(usage), completion=as_int(usage.get("output_tokens"))))
        return pieces

    def _on_message_stop(self, body: dict[str, Any]) -> list[Piece]:
        self.done = True
        return []

    def _on_error(self, body: dict[str, Any]) -> list[Piece]:
        raise _stream_error(self.provider, body.get("error"))


UNHONOURED = {param: accepted for param, accepted in local_params.UNHONOURED.items()
              if param not in ("tools", "tool_choice")} | {"logit_bias": ({},)}
"""OpenAI parameters Anthropic's Messages API has no counterpart for, with the values that ask for nothing."""


def refuse_unhonoured(upstream: str, request: ChatCompletionRequest) -> None:
    """Refuse what Anthropic would ignore, naming it, instead of answering as if it were absent."""
    for param in ("presence_penalty", "frequency_penalty"):
        if getattr(request, param):
            raise InvalidRequest(f"The Anthropic model {upstream} does not support {param} other than 0; "
                                 "OpenAI-compatible providers do.", param=param, code="unsupported_parameter")
    local_params.refuse_unhonoured(upstream, request_extras(request), table=UNHONOURED,
                                   neutral=local_params.NEUTRAL - {"logit_bias"}, unknown=False,
                                   speaker="The Anthropic model", elsewhere="OpenAI-compatible providers do")


@dataclass(frozen=True)
class Anthropic:
    """The dialect object for an Anthropic Messages provider."""

    native_n: ClassVar[bool] = False
    provider: str
    version: str = "2023-06-01"

    def body(self, request: ChatCompletionRequest, model: ModelSpec, upstream: str, stream: bool) -> bytes:
        """The Messages API body of an OpenAI chat request."""
        refuse_unhonoured(upstream, request)
        system, messages = translate_messages(request.messages)
        out: dict[str, Any] = {"model": upstream, "max_tokens": request.token_limit() or model.max_tokens,
                               "messages": messages}
        if system:
            out["system"] = system
        if request.temperature is not None:
            if request.temperature > 1:
                raise InvalidRequest("anthropic models take a temperature between 0 and 1", param="temperature")
            out["temperature"] = request.temperature
        if request.top_p is not None:
            out["top_p"] = request.top_p
        if request.stop_sequences():
            out["stop_sequences"] = request.stop_sequences()
        if request.user:
            out["metadata"] = {"user_id": request.user}
        out.update(_tools(request_extras(request)))
        if stream:
            out["stream"] = True
        return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode()

    def headers(self) -> dict[str, str]:
        """The API version header."""
        return {"anthropic-version": self.version}

    def choices(self, data: bytes, n: int) -> None:
        """The Messages API has no ``n``: each choice is a request of its own."""
        return None

    def completion(self, data: bytes) -> Completion:
        """A Messages answer as an OpenAI message."""
        body = load_json(self.provider, data)
        if not isinstance(body, dict) or not isinstance(body.get("content"), list):
            raise bad_response(self.provider, "no `content` list in the answer")
        message, _ = _message(body["content"])
        usage = body.get("usage") or {}
        return Completion(message, STOP_REASONS.get(str(body.get("stop_reason")), "stop"),
                          _prompt_tokens(usage), as_int(usage.get("output_tokens")),
                          as_int(usage.get("cache_read_input_tokens")))

    def stream_parser(self, n: int = 1) -> AnthropicStream:
        """A parser for one streamed answer (one choice: the Messages API has no ``n``)."""
        return AnthropicStream(self.provider)

    def error_info(self, body: bytes) -> ErrorInfo:
        """``{"type": "error", "error": {"type", "message"}}``, or the body's text."""
        return read_error(body, _error_info)
