"""Masking of personal data in prompts that leave the site.

Built-in patterns (what each replaces):

| name          | matches                                                               | becomes         |
|---------------|-----------------------------------------------------------------------|-----------------|
| `email`       | `name@example.com`                                                    | `[EMAIL]`       |
| `phone`       | international `+49 30 1234567`, `+1-202-555-0143`; `(202) 555-0143`, `202-555-0143` | `[PHONE]` |
| `national_id` | US SSN `123-45-6789`; UK National Insurance `QQ 12 34 56 C`           | `[NATIONAL_ID]` |

Dates, times, order numbers, measurements and plain numbers are left alone. Custom patterns come from
the policy (``{name, regex, replacement}``).

What is masked: every message's text (string content and text parts, and the file names of file parts), its
``name``, the arguments of the tool calls an assistant message made (``tool_calls[].function.arguments``, and
the legacy ``function_call.arguments``), and the request's ``user``: whatever of the prompt a provider reads
as written.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from schemas.chat import ChatCompletionRequest, ChatMessage, TextPart
from schemas.embeddings import EmbeddingRequest
from services.router.policy import Masking, Pattern

# A pattern is only run over text that holds its required character: most prompts skip most patterns.
NEEDS: dict[str, re.Pattern[str]] = {"email": re.compile("@"), "national_id": re.compile(r"\d"),
                                     "phone": re.compile(r"\d")}
# Text is often JSON written out (tool call arguments, a tool's result): a value may follow an escape (``\n``,
# ``\t``, ``\u00e9``) whose last character is a letter or digit. That counts as the start of a word here, and
# no match starts inside an escape: a replacement never breaks the JSON, and what follows the escape is masked.
_AFTER_ESCAPE = r"(?<=\\[nrtbf])|(?<=\\u[0-9a-fA-F]{4})"
BUILTIN: dict[str, tuple[str, str]] = {
    "email": (rf"(?:(?<![\w.+-])(?!(?<=\\)[nrtbfu])|{_AFTER_ESCAPE})"
              r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b", "[EMAIL]"),
    "national_id": (r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"
                    rf"|(?:\b|{_AFTER_ESCAPE})[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{{2}} ?\d{{2}} ?\d{{2}} ?[A-D]\b",
                    "[NATIONAL_ID]"),
    "phone": (rf"(?:(?<![\w+])|{_AFTER_ESCAPE})\+\d{{1,3}}(?:[ .-]?\(\d{{1,4}}\))?(?:[ .-]?\d{{2,4}}){{2,5}}(?!\d)"
              rf"|(?:(?<![\w-])|{_AFTER_ESCAPE})(?:\(\d{{3}}\) ?|\d{{3}}[ .-])\d{{3}}[ .-]\d{{4}}(?![\d-])", "[PHONE]"),
}


@dataclass(frozen=True)
class Masker:
    """Compiled masking patterns, applied in order."""

    patterns: tuple[tuple[str, re.Pattern[str], str], ...]

    @classmethod
    def from_policy(cls, masking: Masking) -> Masker:
        """The patterns a policy asks for (none when masking is disabled)."""
        if not masking.enabled:
            return cls(())
        compiled = []
        for p in masking.patterns:
            if isinstance(p, Pattern):
                compiled.append((p.name, re.compile(p.regex), p.replacement or f"[{p.name.upper()}]"))
            elif p in BUILTIN:
                regex, replacement = BUILTIN[p]
                compiled.append((p, re.compile(regex), replacement))
            else:
                raise ValueError(f"unknown masking pattern {p!r}; built-in ones: {sorted(BUILTIN)}")
        return cls(tuple(compiled))

    def mask(self, text: str) -> tuple[str, Counter[str]]:
        """``text`` with every match replaced, and how many of each pattern were masked."""
        counts: Counter[str] = Counter()
        return self._apply(text, counts), counts

    def _apply(self, text: str, counts: Counter[str]) -> str:
        """``text`` with every match replaced (the same object when nothing matched), counted in ``counts``."""
        for name, regex, replacement in self.patterns:
            needed = NEEDS.get(name)
            if needed is not None and not needed.search(text):
                continue
            masked, n = regex.subn(replacement, text)
            if n:
                text = masked
                counts[name] += n
        return text

    def mask_request(self, request: ChatCompletionRequest) -> tuple[ChatCompletionRequest, Counter[str]]:
        """A copy of the request with every message masked, and its ``user``; the request itself when
        nothing matched (no copy of any message: this runs for every request that leaves the site)."""
        total: Counter[str] = Counter()
        update: dict[str, Any] = {}
        messages: list[ChatMessage] | None = None
        for i, m in enumerate(request.messages):
            masked = self._mask_message(m, total)
            if masked is not m:
                messages = messages or list(request.messages)
                messages[i] = masked
        if messages is not None:
            update["messages"] = messages
        if (user := self._changed(request.user, total)) is not None:
            update["user"] = user
        return (request.model_copy(update=update) if update else request), total

    def mask_inputs(self, request: EmbeddingRequest) -> tuple[EmbeddingRequest, Counter[str]]:
        """A copy of an embeddings request with every text input and its ``user`` masked; the request itself
        when nothing matched. Inputs of token ids go as given: the router has no tokenizer to read them with."""
        total: Counter[str] = Counter()
        update: dict[str, Any] = {}
        texts = request.texts()
        if texts is not None:
            masked = [self._apply(text, total) for text in texts]
            if total:
                update["input"] = masked[0] if isinstance(request.input, str) else masked
        if (user := self._changed(request.user, total)) is not None:
            update["user"] = user
        return (request.model_copy(update=update) if update else request), total

    def _changed(self, text: str | None, total: Counter[str]) -> str | None:
        """``text`` masked when something in it matched; ``None`` when it is absent or nothing did."""
        if text is None:
            return None
        masked = self._apply(text, total)
        return None if masked is text else masked

    def _mask_message(self, message: ChatMessage, total: Counter[str]) -> ChatMessage:
        update: dict[str, Any] = {}
        content = self._mask_content(message.content, total)
        if content is not message.content:
            update["content"] = content
        if (name := self._changed(message.name, total)) is not None:
            update["name"] = name
        extra = message.model_extra or {}
        for field in ("tool_calls", "function_call"):
            if extra.get(field):
                calls = self._mask_calls(extra[field], total)
                if calls is not extra[field]:
                    update[field] = calls
        return message.model_copy(update=update) if update else message

    def _mask_content(self, content: str | list[Any] | None, total: Counter[str]) -> str | list[Any] | None:
        """The content with its text masked (the same object when nothing matched)."""
        if isinstance(content, str):
            return self._apply(content, total)
        if not content:
            return content
        parts = list(content)
        changed = False
        for i, part in enumerate(parts):
            if isinstance(part, TextPart):
                text = self._apply(part.text, total)
                if text is not part.text:
                    parts[i] = part.model_copy(update={"text": text})
                    changed = True
            elif part.type == "file":  # its file name is read too (Anthropic's document title)
                file = (part.model_extra or {}).get("file")
                if (isinstance(file, dict) and isinstance(name := file.get("filename"), str)
                        and (masked := self._changed(name, total)) is not None):
                    parts[i] = part.model_copy(update={"file": {**file, "filename": masked}})
                    changed = True
        return parts if changed else content

    def _mask_calls(self, calls: Any, total: Counter[str]) -> Any:
        """An assistant message's ``tool_calls`` (a list) or legacy ``function_call`` (one) with the
        arguments' text masked: they are JSON text, and a replacement (``[EMAIL]``) keeps it JSON. The same
        object when nothing matched; what is not a call's shape is left as it is."""
        if isinstance(calls, list):
            masked = [self._mask_calls(c, total) for c in calls]
            return masked if any(m is not c for m, c in zip(masked, calls, strict=True)) else calls
        if not isinstance(calls, dict):
            return calls
        function = calls.get("function", calls)  # a tool call holds a function; function_call is one
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if not isinstance(arguments, str) or (text := self._apply(arguments, total)) is arguments:
            return calls
        masked_function = {**function, "arguments": text}
        return {**calls, "function": masked_function} if "function" in calls else masked_function
