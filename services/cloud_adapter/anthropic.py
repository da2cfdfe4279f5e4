"""The Anthropic Messages dialect, translated both ways (requests, answers, streams, usage). No I/O.

Request (OpenAI → Anthropic):
- ``system`` and ``developer`` messages become ``system`` (strings joined by blank lines; when one is a list
  of text parts, every one becomes a text block of ``system``, so parts stay apart as a user message's do);
  consecutive messages of one role are merged (Anthropic wants user and assistant to alternate).
- text parts → ``text`` blocks (and an assistant's ``refusal`` parts: what it said); ``image_url`` parts →
  ``image`` blocks (a ``data:`` URL as base64, else as a URL); ``file`` parts with a PDF in ``file_data`` →
  ``document`` blocks (the ``filename`` as its title); other part types are refused (400).
- assistant ``tool_calls`` → ``tool_use`` blocks; ``tool`` messages → ``tool_result`` blocks of a user turn
  (their text parts as text blocks of the result).
- ``tools`` → ``name``/``description``/``input_schema``; ``tool_choice`` auto/none/required/a function →
  auto/none/any/tool; ``parallel_tool_calls: false`` → ``disable_parallel_tool_use``.
- Prompt caching, as LiteLLM passes it on: ``cache_control`` on a content part, a message (its last block),
  or a tool goes with that block or tool (``{"type": "ephemeral"}``, with ``ttl`` ``5m`` or ``1h``).
- Extended thinking: ``thinking`` as Anthropic takes it, or ``reasoning_effort`` (minimal/low → 1,024
  thinking tokens, medium → 2,048, high → 4,096, none → off). The budget counts toward ``max_tokens``: the
  caller's limit must exceed it (400 otherwise); without one, the model's ``max_tokens`` plus the budget.
  An assistant's ``thinking_blocks`` (as answered, signatures included) go back before its other blocks, as
  Anthropic wants them when thinking continues across tool calls.
- ``web_search_options`` → Anthropic's web search tool (``web_search_tool``), beside the caller's tools.
- ``max_tokens`` (required by Anthropic) defaults to the model's ``max_tokens`` in the providers file;
  ``stop`` → ``stop_sequences``; ``temperature`` above 1 is refused (400: Anthropic takes 0-1);
  ``response_format`` ``json_object`` or ``json_schema`` (its schema an object) → a tool, ``json_answer``, with
  that schema as its input, which the model is made to call (or one of the caller's tools, when it gave
  some to call; with thinking, which a forced call may not follow, only offered), as LiteLLM does; the call's
  input is the answer's ``content`` and ends it with ``stop``;
  ``top_p``, and Anthropic's own ``top_k``; ``user`` → ``metadata.user_id``. ``seed`` is not sent (Anthropic
  has none; OpenAI calls it best effort too). What Anthropic cannot honour and would change the answer is
  refused (400 ``unsupported_parameter``) rather than dropped: ``logprobs``, ``logit_bias``, non-zero
  penalties, audio and the other OpenAI-only parameters of ``shared.local_params.UNHONOURED``; with
  ``drop_params`` (the provider's, the model's or the request's) they are left out instead, as are a
  temperature above 1 and, with thinking on, what Anthropic refuses with it. Other unknown fields are not sent.

Answer (Anthropic → OpenAI): text blocks → ``content``; ``tool_use`` → ``tool_calls`` (input as JSON
text; a tool call without arguments has ``{}``, streamed too); ``thinking`` blocks → ``reasoning_content``
(their text) and ``thinking_blocks`` (each block whole, with its signature; ``redacted_thinking`` too), as
LiteLLM has them; streamed, the thinking text comes as ``reasoning_content`` deltas and each block whole as a
``thinking_blocks`` delta when it ends; a text block citing web search results → ``url_citation``
``annotations`` of its span of ``content`` (streamed: an ``annotations`` delta when it ends), the search and its
results (``server_tool_use``, ``web_search_tool_result``) passed over; ``stop_reason`` end_turn/stop_sequence/
pause_turn → stop, max_tokens and model_context_window_exceeded → length, tool_use → tool_calls, refusal →
content_filter; usage ``input_tokens`` (+ cache creation and cache read) → prompt,
``output_tokens`` (thinking included) → completion, cache reads → ``cached_tokens`` and cache writes priced
apart (``Tokens.written``). Streams: ``message_start`` (prompt tokens), ``content_block_start`` /
``content_block_delta`` (text, thinking, signature and tool-call argument pieces), ``message_delta`` (stop
reason, output tokens), ``message_stop``; ``ping`` is ignored; an ``error`` event raises.
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
RESPONSE_TOOL = "json_answer"
"""The tool an Anthropic model is made to call to answer in JSON (``response_format``); its input is the answer."""
EFFORT_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096}
"""Thinking tokens of each ``reasoning_effort`` (as LiteLLM maps them; 1,024 is Anthropic's least)."""


def _cache_control(value: Any, param: str) -> Block:
    """A ``cache_control`` as Anthropic takes it: ``{"type": "ephemeral"}``, with a ``ttl`` of 5m or 1h."""
    if (not isinstance(value, dict) or value.get("type") != "ephemeral"
            or not set(value) <= {"type", "ttl"} or value.get("ttl", "5m") not in ("5m", "1h")):
        raise InvalidRequest(f"cache_control must be {{\"type\": \"ephemeral\"}}, with a ttl of \"5m\" or \"1h\" "
                             f"(got {json.dumps(value)[:80]})", param=param)
    return dict(value)


def _cached(block: Block, extra: dict[str, Any] | None, param: str = "messages") -> Block:
    """``block`` with the ``cache_control`` of the part, message or tool it came from (when it has one)."""
    if extra and extra.get("cache_control") is not None:
        block["cache_control"] = _cache_control(extra["cache_control"], param)
    return block


def _thinking_blocks(value: Any) -> list[Block]:
    """An assistant's ``thinking_blocks``, as they were answered, for Anthropic (signatures are required)."""
    if not isinstance(value, list):
        raise InvalidRequest("thinking_blocks must be a list of thinking blocks", param="messages")
    blocks: list[Block] = []
    for block in value:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "thinking" and isinstance(block.get("thinking"), str) and isinstance(block.get("signature"), str):
            blocks.append({"type": "thinking", "thinking": block["thinking"], "signature": block["signature"]})
        elif kind == "redacted_thinking" and isinstance(block.get("data"), str):
            blocks.append({"type": "redacted_thinking", "data": block["data"]})
        else:
            raise InvalidRequest("each of thinking_blocks is a thinking block (thinking and signature) or a "
                                 "redacted_thinking block (data), as the answer gave it", param="messages")
    return blocks


def _image(url: Any) -> Block:
    if not isinstance(url, str):
        raise InvalidRequest("an image_url part needs a url", param="messages")
    m = _DATA_URL.match(url)
    if m:
        return {"type": "image", "source": {"type": "base64", "media_type": m.group(1), "data": m.group(2)}}
    return {"type": "image", "source": {"type": "url", "url": url}}


_DATA_PDF = re.compile(r"^data:application/pdf;base64,(.*)$", re.DOTALL)


def _document(file: Any) -> Block:
    """A ``file`` part (``{"file_data": "data:application/pdf;base64,...", "filename": ...}``) as a PDF
    document block; a ``file_id`` (a file uploaded to OpenAI) or another type is a 400."""
    data = file.get("file_data") if isinstance(file, dict) else None
    m = _DATA_PDF.match(data) if isinstance(data, str) else None
    if m is None:
        raise InvalidRequest("an Anthropic model takes a file part as a PDF in file_data "
                             "(data:application/pdf;base64,...), not a file_id or another type", param="messages")
    block: Block = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                   "data": m.group(1)}}
    if isinstance(file.get("filename"), str) and file["filename"]:
        block["title"] = file["filename"]
    return block


def _content_blocks(message: ChatMessage) -> list[Block]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [{"type": "text", "text": message.content}] if message.content else []
    blocks: list[Block] = []
    for part in message.content:
        extra = part.model_extra or {}
        if isinstance(part, TextPart):
            if part.text:  # Anthropic refuses empty text blocks
                blocks.append(_cached({"type": "text", "text": part.text}, extra))
        elif part.type == "image_url":
            image = extra.get("image_url")
            blocks.append(_cached(_image(image.get("url") if isinstance(image, dict) else image), extra))
        elif part.type == "file":
            blocks.append(_cached(_document(extra.get("file")), extra))
        elif part.type == "refusal" and message.role == "assistant":  # what the assistant said when it refused
            refusal = extra.get("refusal")
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
    """The role and blocks of one message; a message's own ``cache_control`` marks its last block."""
    extra = message.model_extra or {}
    if message.role == "tool":
        result = message.text() if isinstance(message.content, str) else _content_blocks(message)
        return "user", [_cached({"type": "tool_result", "tool_use_id": str(extra.get("tool_call_id") or ""),
                                 "content": result}, extra)]
    blocks = _content_blocks(message)
    if message.role == "assistant":
        blocks += [_tool_use(call) for call in extra.get("tool_calls") or []]
    if blocks:
        _cached(blocks[-1], extra)
    if message.role == "assistant" and extra.get("thinking_blocks"):
        blocks = _thinking_blocks(extra["thinking_blocks"]) + blocks  # Anthropic wants them first
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
    if turns[-1:] and turns[-1]["role"] == "assistant":
        _trim_prefill(turns)
    if not turns:
        raise InvalidRequest("anthropic models need at least one user or assistant message", param="messages")
    return _system(system), turns


def _trim_prefill(turns: list[dict[str, Any]]) -> None:
    """A last assistant turn is a prefill, the answer's start: Anthropic refuses one ending in whitespace
    (400 "final assistant content cannot end with trailing whitespace"), so its last text loses it (a text
    left empty is dropped, and a turn left empty too)."""
    blocks = turns[-1]["content"]
    last = blocks[-1] if blocks else None
    if not (isinstance(last, dict) and last.get("type") == "text" and isinstance(last.get("text"), str)):
        return
    if text := last["text"].rstrip():
        blocks[-1] = {**last, "text": text}
        return
    blocks.pop()
    if not blocks:
        turns.pop()


def _system(messages: list[ChatMessage]) -> str | list[Block]:
    """The ``system`` of the system and developer messages: their strings joined by blank lines, or text
    blocks when any of them is a list of parts (joining parts would run their words together) or is marked
    for caching (``cache_control``: the message's last block)."""
    if all(isinstance(m.content, str) and (m.model_extra or {}).get("cache_control") is None for m in messages):
        return "\n\n".join(m.text() for m in messages if m.text())
    blocks: list[Block] = []
    for m in messages:
        own = _content_blocks(m)
        if own:
            _cached(own[-1], m.model_extra)
        blocks += own
    if any(b["type"] != "text" for b in blocks):
        raise InvalidRequest("a system or developer message can hold text only", param="messages")
    return blocks


def _tool(tool: Any) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest("each tool needs a function with a name", param="tools")
    return _cached({"name": fn["name"], "description": fn.get("description") or "",
                    "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}, tool, "tools")


def _thinking(extras: dict[str, Any]) -> Block | None:
    """Anthropic's ``thinking`` of a request: its own ``thinking`` as given, or from ``reasoning_effort``."""
    thinking = extras.get("thinking")
    if thinking is not None:
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        if not isinstance(thinking, dict) or not isinstance(thinking.get("type"), str) or (
                thinking["type"] == "enabled" and (not isinstance(budget, int) or isinstance(budget, bool))):
            raise InvalidRequest('thinking must be {"type": "enabled", "budget_tokens": <tokens>} or '
                                 '{"type": "disabled"}, as Anthropic takes it', param="thinking")
        return dict(thinking)
    effort = extras.get("reasoning_effort")
    if effort is None or effort == "none":
        return None
    if effort not in EFFORT_BUDGETS:
        raise InvalidRequest(f"reasoning_effort takes {', '.join(EFFORT_BUDGETS)} or none "
                             f"(got {json.dumps(effort)[:40]})", param="reasoning_effort")
    return {"type": "enabled", "budget_tokens": EFFORT_BUDGETS[effort]}


def response_schema(extras: dict[str, Any]) -> Block | None:
    """The JSON schema an answer must follow (``response_format`` ``json_object`` or ``json_schema``), or
    ``None`` for free text. Anthropic answers it through a tool it is made to call (``RESPONSE_TOOL``)."""
    fmt = extras.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = fmt.get("json_schema") if kind == "json_schema" else None
    if not isinstance(spec, dict):
        raise InvalidRequest('response_format takes {"type": "text"}, {"type": "json_object"} or {"type": '
                             '"json_schema", "json_schema": {"name": ..., "schema": {...}}}', param="response_format")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise InvalidRequest("the JSON schema of an answer for an Anthropic model must describe an object (its "
                             '"type" "object")', param="response_format")
    return {"type": "object", **schema}


def _tools(extras: dict[str, Any], schema: Block | None = None, thinking: bool = False) -> dict[str, Any]:
    """``tools`` and ``tool_choice``; with an answer ``schema``, the tool that answers it too, and a choice that
    makes the model call a tool (that one, or one of the caller's when it has tools to call) — unless the
    model is ``thinking`` (or searching the web), which a forced tool call, the answer's first block, would
    not let come first: then it is only offered."""
    out: dict[str, Any] = {}
    tools = extras.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise InvalidRequest("tools must be a list", param="tools")
        out["tools"] = [_tool(t) for t in tools]
    choice = extras.get("tool_choice")
    if schema is not None:
        if any(t["name"] == RESPONSE_TOOL for t in out.get("tools", [])):
            raise InvalidRequest(f"a tool named {RESPONSE_TOOL} cannot be given with a JSON response_format: the "
                                 "Anthropic model answers it through a tool of that name", param="tools")
        if choice == "none" or not out.get("tools"):
            out["tools"] = []
            choice = "auto" if thinking else {"type": "function", "function": {"name": RESPONSE_TOOL}}
        elif choice in (None, "auto") and not thinking:
            choice = "required"  # one of the caller's tools, or the answer
        out["tools"].append({"name": RESPONSE_TOOL, "description": "Give your answer, as the input of this tool.",
                             "input_schema": schema})
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


SEARCH_USES = {"low": 1, "medium": 5, "high": 10}
"""``web_search_options.search_context_size`` as the searches Anthropic may run for one answer (``max_uses``),
as LiteLLM maps it; unset: medium's."""
SEARCH_LOCATION = ("city", "region", "country", "timezone")


def web_search_tool(options: Any) -> Block | None:
    """OpenAI's ``web_search_options`` as Anthropic's web search server tool (``None`` when not asked): the
    search context size as its ``max_uses``, an approximate ``user_location`` as its own; 400 for anything
    else in it."""
    if options is None:
        return None
    if not isinstance(options, dict) or set(options) - {"search_context_size", "user_location"}:
        raise InvalidRequest("web_search_options takes search_context_size and user_location",
                             param="web_search_options")
    size = options.get("search_context_size")
    size = "medium" if size is None else size
    if size not in SEARCH_USES:
        raise InvalidRequest("web_search_options.search_context_size must be low, medium or high",
                             param="web_search_options.search_context_size")
    tool: Block = {"type": "web_search_20250305", "name": "web_search", "max_uses": SEARCH_USES[size]}
    if (location := options.get("user_location")) is not None:
        place = location.get("approximate") if isinstance(location, dict) else None
        if (not isinstance(location, dict) or not isinstance(place, dict) or set(location) - {"type", "approximate"}
                or location.get("type", "approximate") != "approximate" or set(place) - set(SEARCH_LOCATION)
                or not all(isinstance(place.get(k), str | None) for k in SEARCH_LOCATION)):
            raise InvalidRequest('web_search_options.user_location must be {"type": "approximate", "approximate": '
                                 '{city, region, country, timezone}}, each a string',
                                 param="web_search_options.user_location")
        tool["user_location"] = {"type": "approximate", **{k: place[k] for k in SEARCH_LOCATION if place.get(k)}}
    return tool


def url_citations(citations: Any, start: int, end: int) -> list[Block]:
    """The web search results a text block cites, as OpenAI's ``url_citation`` annotations of the message's
    characters ``start`` to ``end`` (the block's text); citations of other kinds (a document's) are not."""
    out: list[Block] = []
    for cited in citations if isinstance(citations, list) else []:
        if isinstance(cited, dict) and cited.get("type") == "web_search_result_location" and cited.get("url"):
            out.append({"type": "url_citation", "url_citation": {"start_index": start, "end_index": end,
                                                                  "url": str(cited["url"]),
                                                                  "title": str(cited.get("title") or "")}})
    return out


def searches(usage: dict[str, Any]) -> int | None:
    """The web searches an answer ran (``usage.server_tool_use.web_search_requests``), ``None`` when not said."""
    server = usage.get("server_tool_use")
    return as_int(server.get("web_search_requests")) if isinstance(server, dict) else None


MAX_RESUMES = 4
"""How many times a paused turn (``pause_turn``) is gone on with before its answer so far is the answer."""


def _add_usage(total: dict[str, Any], usage: dict[str, Any]) -> None:
    """Add an Anthropic usage object's counts (nested ones too: cache writes by TTL, server tool uses) to
    ``total``."""
    for key, value in usage.items():
        if isinstance(value, dict):
            _add_usage(total.setdefault(key, {}), value)
        elif isinstance(value, int) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value


def _thought(block: dict[str, Any]) -> Block | None:
    """A thinking block as ``thinking_blocks`` keeps it (to be sent back), or ``None`` for another block."""
    if block.get("type") == "thinking":
        return {"type": "thinking", "thinking": str(block.get("thinking", "")),
                "signature": str(block.get("signature", ""))}
    if block.get("type") == "redacted_thinking":
        return {"type": "redacted_thinking", "data": str(block.get("data", ""))}
    return None


def _message(content: Any, json_answer: bool = False) -> tuple[dict[str, Any], bool]:
    """An OpenAI assistant message from Anthropic content blocks; and whether it holds tool calls. With
    ``json_answer`` (a JSON ``response_format``), the input of the answer tool is the message's content."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    thoughts: list[Block] = []
    cited: list[Block] = []
    chars = 0
    answer: str | None = None
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if (thought := _thought(block)) is not None:
            thoughts.append(thought)
        elif block.get("type") == "text":
            text.append(words := str(block.get("text", "")))
            cited += url_citations(block.get("citations"), chars, chars + len(words))
            chars += len(words)
        elif json_answer and block.get("type") == "tool_use" and block.get("name") == RESPONSE_TOOL:
            answer = json.dumps(block.get("input", {}), ensure_ascii=False)
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id", ""), "type": "function",
                          "function": {"name": block.get("name", ""),
                                       "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
    message: dict[str, Any] = {"content": "".join(text) if text or not calls else None}
    if answer is not None:
        message["content"] = answer  # the JSON asked for, not the words (if any) around it
    elif cited and message["content"] is not None:
        message["annotations"] = cited
    if calls:
        message["tool_calls"] = calls
    if thoughts:
        message["reasoning_content"] = "".join(t.get("thinking", "") for t in thoughts)
        message["thinking_blocks"] = thoughts
    return message, bool(calls)


def _prompt_tokens(usage: dict[str, Any]) -> int | None:
    parts = [as_int(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens",
                                            "cache_read_input_tokens")]
    return None if parts[0] is None else sum(p or 0 for p in parts)


def _prompt_usage(usage: dict[str, Any]) -> Tokens:
    """The prompt's tokens of an Anthropic usage object: all of them, those read from its cache, those
    written to it (and of those, the ones written for an hour)."""
    creation = usage.get("cache_creation")
    return Tokens(prompt=_prompt_tokens(usage), cached=as_int(usage.get("cache_read_input_tokens")),
                  written=as_int(usage.get("cache_creation_input_tokens")),
                  written_1h=as_int(creation.get("ephemeral_1h_input_tokens")) if isinstance(creation, dict) else None)


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
    message = str(error.get("message") or "no message")
    if kind == "invalid_request_error" and message.lower().startswith("prompt is too long"):
        # OpenAI's code for it: what callers (and the router's fallback to a longer context) act on
        return ErrorInfo(message=message, type=kind, code="context_length_exceeded", param="messages")
    return ErrorInfo(message=message, type=kind, code=kind)


@dataclass
class AnthropicStream:
    """Parser of one Anthropic Messages stream, producing OpenAI pieces."""

    provider: str
    json_answer: bool = False  # a JSON response_format: the answer tool's input is the content
    done: bool = False
    _tools: dict[int, int] = field(default_factory=dict)  # Anthropic block index → OpenAI tool call index
    _answer: int | None = None  # the block index of the answer tool's call
    _argued: set[int] = field(default_factory=set)  # tool blocks whose arguments have begun
    _thoughts: dict[int, Block] = field(default_factory=dict)  # thinking blocks so far, by block index
    # With json_answer, text blocks are held back: the answer tool's JSON is the content (the words around it
    # are dropped, as the whole answer drops them); the words are the content only when no answer tool came.
    _held: list[str] = field(default_factory=list)
    _server: set[int] = field(default_factory=set)  # blocks of Anthropic's own tools (web search): not the caller's
    _chars: int = 0  # of the content so far (where a citation's text begins and ends)
    _cited: dict[int, tuple[int, list[Any]]] = field(default_factory=dict)  # text block → (its start, citations)
    _held_notes: list[Block] = field(default_factory=list)  # with json_answer, the held words' citations

    def _text(self, text: str) -> list[Piece]:
        self._chars += len(text)
        if self.json_answer:
            self._held.append(text)
            return []
        return [Delta({"content": text})]

    def feed(self, event: str, data: str) -> list[Piece]:
        """Pieces of one event (see the module docstring)."""
        body = load_json(self.provider, data)
        if not isinstance(body, dict):
            raise bad_response(self.provider, "a stream event is not a JSON object")
        kind = body.get("type", event)
        handler = getattr(self, f"_on_{kind}", None)
        return handler(body) if handler is not None else []

    def _on_message_start(self, body: dict[str, Any]) -> list[Piece]:
        return [_prompt_usage((body.get("message") or {}).get("usage") or {})]

    def _on_content_block_start(self, body: dict[str, Any]) -> list[Piece]:
        block = body.get("content_block") or {}
        if (thought := _thought(block)) is not None:
            self._thoughts[int(body.get("index", 0))] = thought
            return [Delta({"reasoning_content": thought["thinking"]})] if thought.get("thinking") else []
        if self.json_answer and block.get("type") == "tool_use" and block.get("name") == RESPONSE_TOOL:
            self._answer = int(body.get("index", 0))
            self._held.clear()
            return []
        if block.get("type") in ("server_tool_use", "web_search_tool_result"):
            self._server.add(int(body.get("index", 0)))  # the search and its results: Anthropic's, not relayed
            return []
        if block.get("type") == "tool_use":
            index = self._tools.setdefault(int(body.get("index", 0)), len(self._tools))
            return [Delta({"tool_calls": [{"index": index, "id": block.get("id", ""), "type": "function",
                                           "function": {"name": block.get("name", ""), "arguments": ""}}]})]
        if block.get("type") == "text":
            self._cited[int(body.get("index", 0))] = (self._chars, list(block.get("citations") or []))
            return self._text(str(block["text"])) if block.get("text") else []
        return []

    def _on_content_block_delta(self, body: dict[str, Any]) -> list[Piece]:
        delta = body.get("delta") or {}
        if delta.get("type") == "text_delta" and delta.get("text"):
            return self._text(str(delta["text"]))
        if delta.get("type") == "citations_delta" and (cited := self._cited.get(int(body.get("index", 0)))):
            cited[1].append(delta.get("citation"))
            return []
        if int(body.get("index", 0)) in self._server:
            return []
        thought = self._thoughts.get(int(body.get("index", 0)))
        if thought is not None and delta.get("type") == "thinking_delta" and delta.get("thinking"):
            thought["thinking"] += str(delta["thinking"])
            return [Delta({"reasoning_content": delta["thinking"]})]
        if thought is not None and delta.get("type") == "signature_delta":
            thought["signature"] = thought.get("signature", "") + str(delta.get("signature", ""))
            return []
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            block = int(body.get("index", 0))
            self._argued.add(block)
            if block == self._answer:
                return [Delta({"content": delta["partial_json"]})]
            index = self._tools.get(block, 0)
            return [Delta({"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]})]
        return []

    def _on_content_block_stop(self, body: dict[str, Any]) -> list[Piece]:
        """A tool call that ends without arguments (a tool with no parameters) has ``{}``, as OpenAI's and
        the whole answer's: ``""`` is not JSON."""
        block = int(body.get("index", 0))
        if (thought := self._thoughts.pop(block, None)) is not None:  # whole, to be sent back with its signature
            return [Delta({"thinking_blocks": [thought]})]
        if (cited := self._cited.pop(block, None)) is not None:
            annotations = url_citations(cited[1], cited[0], self._chars)
            if self.json_answer:  # they go with the held words, if the words are the answer
                self._held_notes += annotations
                return []
            return [Delta({"annotations": annotations})] if annotations else []
        if block == self._answer and block not in self._argued:
            self._argued.add(block)
            return [Delta({"content": "{}"})]
        if block not in self._tools or block in self._argued:
            return []
        self._argued.add(block)
        return [Delta({"tool_calls": [{"index": self._tools[block], "function": {"arguments": "{}"}}]})]

    def _on_message_delta(self, body: dict[str, Any]) -> list[Piece]:
        pieces: list[Piece] = []
        reason = (body.get("delta") or {}).get("stop_reason")
        if reason and self._held:
            if self._answer is None:  # words, not the JSON: the answer (or a refusal)
                pieces.append(Delta({"refusal" if reason == "refusal" else "content": "".join(self._held)}))
                if self._held_notes and reason != "refusal":
                    pieces.append(Delta({"annotations": list(self._held_notes)}))
            self._held.clear()
            self._held_notes.clear()
        if reason:
            answered = reason == "tool_use" and self._answer is not None and not self._tools
            pieces.append(Finish("stop" if answered else STOP_REASONS.get(reason, "stop")))
        usage = body.get("usage") or {}
        prompt = _prompt_usage(usage)
        pieces.append(Tokens(prompt=prompt.prompt, completion=as_int(usage.get("output_tokens")), cached=prompt.cached,
                             written=prompt.written, written_1h=prompt.written_1h, searches=searches(usage)))
        return pieces

    def _on_message_stop(self, body: dict[str, Any]) -> list[Piece]:
        self.done = True
        return []

    def _on_error(self, body: dict[str, Any]) -> list[Piece]:
        raise _stream_error(self.provider, body.get("error"))


def _sampling(request: ChatCompletionRequest, extras: dict[str, Any], *, drops: bool,
              thinking: bool) -> dict[str, Any]:
    """``temperature``, ``top_p`` and ``top_k`` as Anthropic takes them. A temperature above 1 is refused (400),
    or left out when the model drops what it does not take; so is, with thinking on, what Anthropic refuses
    with it (a temperature other than 1, ``top_p`` below 0.95, ``top_k``)."""
    out: dict[str, Any] = {}
    if (temperature := request.temperature) is not None:
        if temperature > 1 and not drops:
            raise InvalidRequest("anthropic models take a temperature between 0 and 1", param="temperature")
        if temperature <= 1 and not (drops and thinking and temperature != 1):
            out["temperature"] = temperature
    if (top_p := request.top_p) is not None and not (drops and thinking and top_p < 0.95):
        out["top_p"] = top_p
    if (top_k := extras.get("top_k")) is not None:  # Anthropic's own (LiteLLM passes it on too)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise InvalidRequest("top_k must be a whole number of 0 or more", param="top_k")
        if not (drops and thinking):
            out["top_k"] = top_k
    return out


UNHONOURED = {param: accepted for param, accepted in local_params.UNHONOURED.items()
              if param not in ("tools", "tool_choice", "reasoning_effort", "response_format", "web_search_options")
              } | {"logit_bias": ({},)}
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
    drop_params: bool = False

    def body(self, request: ChatCompletionRequest, model: ModelSpec, upstream: str, stream: bool,
             usage: bool = True) -> bytes:
        """The Messages API body of an OpenAI chat request."""
        drops = model.drops(self.drop_params, request.drop_params)
        if not drops:
            refuse_unhonoured(upstream, request)
        system, messages = translate_messages(request.messages)
        extras = request_extras(request)
        thinking = _thinking(extras)
        budget = thinking.get("budget_tokens") if thinking and thinking.get("type") == "enabled" else None
        limit = request.token_limit()
        if limit is not None and budget is not None and limit <= budget:
            param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            raise InvalidRequest(f"{param} ({limit}) must be larger than the thinking budget ({budget} tokens): "
                                 "the thinking counts toward it", param=param)
        out: dict[str, Any] = {"model": upstream, "messages": messages,
                               "max_tokens": limit or model.max_tokens + (budget or 0)}
        if thinking is not None:
            out["thinking"] = thinking
        if system:
            out["system"] = system
        out.update(_sampling(request, extras, drops=drops, thinking=budget is not None))
        if request.stop_sequences():
            out["stop_sequences"] = request.stop_sequences()
        if request.user:
            out["metadata"] = {"user_id": request.user}
        search = web_search_tool(extras.get("web_search_options"))
        out.update(_tools(extras, response_schema(extras), thinking=budget is not None or search is not None))
        if search is not None:
            out["tools"] = [*out.get("tools", []), search]
        if stream:
            out["stream"] = True
        return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode()

    def headers(self) -> dict[str, str]:
        """The API version header."""
        return {"anthropic-version": self.version}

    def resume(self, body: bytes, answers: list[bytes]) -> bytes | None:
        """A turn Anthropic paused (``pause_turn``: its server tools, a web search, ran long) goes on when its
        content so far is sent back as the assistant's turn, as Anthropic asks; at most ``MAX_RESUMES`` times."""
        if b'"pause_turn"' not in answers[-1] or len(answers) > MAX_RESUMES:
            return None
        parts = [load_json(self.provider, a) for a in answers]
        if not all(isinstance(p, dict) and isinstance(p.get("content"), list) for p in parts):
            return None
        if parts[-1].get("stop_reason") != "pause_turn":
            return None
        sent = json.loads(body)
        turn = [block for part in parts for block in part["content"]]
        sent["messages"] = [*sent["messages"], {"role": "assistant", "content": turn}]
        return json.dumps(sent, ensure_ascii=False, separators=(",", ":")).encode()

    def combined(self, answers: list[bytes]) -> bytes:
        """One Messages answer of a turn answered in parts: their content in order, the last's stop reason, and
        every part's usage added up (each call was billed its own)."""
        if len(answers) == 1:
            return answers[0]
        parts = [load_json(self.provider, a) for a in answers]
        if not all(isinstance(p, dict) and isinstance(p.get("content"), list) for p in parts):
            raise bad_response(self.provider, "the answer going on with a paused turn has no `content` list")
        usage: dict[str, Any] = {}
        for part in parts:
            _add_usage(usage, part.get("usage") or {})
        return json.dumps({**parts[-1], "content": [b for part in parts for b in part["content"]],
                           "usage": usage}).encode()

    def choices(self, data: bytes, n: int) -> None:
        """The Messages API has no ``n``: each choice is a request of its own."""
        return None

    def completion(self, data: bytes, request: ChatCompletionRequest | None = None) -> Completion:
        """A Messages answer as an OpenAI message (of ``request``: with a JSON ``response_format``, the answer
        tool's input is its content, and its call alone ends it with ``stop``)."""
        body = load_json(self.provider, data)
        if not isinstance(body, dict) or not isinstance(body.get("content"), list):
            raise bad_response(self.provider, "no `content` list in the answer")
        json_answer = request is not None and response_schema(request_extras(request)) is not None
        message, calls = _message(body["content"], json_answer)
        usage = body.get("usage") or {}
        prompt = _prompt_usage(usage)
        finish = STOP_REASONS.get(str(body.get("stop_reason")), "stop")
        if json_answer and body.get("stop_reason") == "refusal" and message.get("content"):
            message["refusal"], message["content"] = message["content"], None  # as OpenAI's structured outputs
            message.pop("annotations", None)  # of the content, which there is none of
        return Completion(message, "stop" if finish == "tool_calls" and json_answer and not calls else finish,
                          prompt.prompt, as_int(usage.get("output_tokens")), prompt.cached,
                          written_tokens=prompt.written, written_1h_tokens=prompt.written_1h, searches=searches(usage))

    def stream_parser(self, n: int = 1, request: ChatCompletionRequest | None = None) -> AnthropicStream:
        """A parser for one streamed answer of ``request`` (one choice: the Messages API has no ``n``)."""
        json_answer = request is not None and response_schema(request_extras(request)) is not None
        return AnthropicStream(self.provider, json_answer)

    def error_info(self, body: bytes) -> ErrorInfo:
        """``{"type": "error", "error": {"type", "message"}}``, or the body's text."""
        return read_error(body, _error_info)
