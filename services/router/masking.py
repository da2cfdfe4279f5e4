"""Masking of personal data in prompts that leave the site.

Built-in patterns (what each replaces):

| name          | matches                                                               | becomes         |
|---------------|-----------------------------------------------------------------------|-----------------|
| `email`       | `name@example.com`                                                    | `[EMAIL]`       |
| `phone`       | international `+49 30 1234567`, `+1-202-555-0143`; `(202) 555-0143`, `202-555-0143` | `[PHONE]` |
| `national_id` | US SSN `123-45-6789`; UK National Insurance `QQ 12 34 56 C`           | `[NATIONAL_ID]` |

Dates, times, order numbers, measurements and plain numbers are left alone. Custom patterns come from
the policy (``{name, regex, replacement}``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from schemas.chat import ChatCompletionRequest, ChatMessage, TextPart
from schemas.embeddings import EmbeddingRequest
from services.router.policy import Masking, Pattern

# A pattern is only run over text that holds its required character: most prompts skip most patterns.
NEEDS: dict[str, re.Pattern[str]] = {"email": re.compile("@"), "national_id": re.compile(r"\d"),
                                     "phone": re.compile(r"\d")}
BUILTIN: dict[str, tuple[str, str]] = {
    "email": (r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b", "[EMAIL]"),
    "national_id": (r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"
                    r"|\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b", "[NATIONAL_ID]"),
    "phone": (r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{2,4}){2,5}(?!\d)"
              r"|(?<![\w-])(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\d-])", "[PHONE]"),
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
        """A copy of the request with every message's text masked; the request itself when nothing matched
        (no copy of any message: this runs for every request that leaves the site)."""
        total: Counter[str] = Counter()
        messages: list[ChatMessage] | None = None
        for i, m in enumerate(request.messages):
            masked = self._mask_message(m, total)
            if masked is not m:
                messages = messages or list(request.messages)
                messages[i] = masked
        if messages is None:
            return request, total
        return request.model_copy(update={"messages": messages}), total

    def mask_inputs(self, request: EmbeddingRequest) -> tuple[EmbeddingRequest, Counter[str]]:
        """A copy of an embeddings request with every text input masked; the request itself when nothing
        matched. Inputs of token ids go as given: the router has no tokenizer to read them with."""
        total: Counter[str] = Counter()
        texts = request.texts()
        if texts is None:
            return request, total
        masked = [self._apply(text, total) for text in texts]
        if not total:
            return request, total
        return request.model_copy(update={"input": masked[0] if isinstance(request.input, str) else masked}), total

    def _mask_message(self, message: ChatMessage, total: Counter[str]) -> ChatMessage:
        if isinstance(message.content, str):
            text = self._apply(message.content, total)
            return message if text is message.content else message.model_copy(update={"content": text})
        if not message.content:
            return message
        parts = list(message.content)
        changed = False
        for i, part in enumerate(parts):
            if isinstance(part, TextPart):
                text = self._apply(part.text, total)
                if text is not part.text:
                    parts[i] = part.model_copy(update={"text": text})
                    changed = True
        return message.model_copy(update={"content": parts}) if changed else message
