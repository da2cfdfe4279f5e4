"""Cheap facts about a prompt the policy can match on: its length in tokens and a complexity score.

Both run on every request, before routing, so they must stay far under a millisecond
(``loadtests/router_signals.py`` measures them).

Tokens are estimated, not counted: ``max(words * 4/3, characters / 4)``, which tracks BPE tokenizers of
English text within ~15% and never needs a tokenizer file on the router.

The complexity score is in [0, 1], the sum of four capped parts:

| part       | weight | full weight at                                                   |
|------------|--------|------------------------------------------------------------------|
| length     | 0.35   | 2,000 estimated tokens (linear below)                             |
| code       | 0.25   | a fenced block, or 3+ lines that look like code                    |
| reasoning  | 0.25   | 3+ reasoning markers (why, explain, step by step, prove, compare...) |
| questions  | 0.15   | 4+ question marks                                                 |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"\S+")
_FENCE = re.compile(r"```")
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import|return\b|function\b|const |let |var |public |private |"
    r"#include|SELECT\b|INSERT\b|UPDATE\b|for\s*\(|while\s*\(|if\s*\(|\}|\{|<\w+[^>]*>)", re.M | re.I)
_REASONING = re.compile(
    r"\b(why|explain|step[- ]by[- ]step|prove|derive|compare|analy[sz]e|reason|trade-?offs?|evaluate|"
    r"justify|root cause|diagnos\w*|plan)\b", re.I)

WEIGHTS = {"length": 0.35, "code": 0.25, "reasoning": 0.25, "questions": 0.15}
LENGTH_FULL = 2000
CODE_LINES_FULL = 3
REASONING_FULL = 3
QUESTIONS_FULL = 4


def estimate_tokens(text: str) -> int:
    """Estimated BPE tokens of ``text``."""
    words = len(_WORD.findall(text))
    return int(max(words * 4 / 3, len(text) / 4))


@dataclass(frozen=True, slots=True)
class Signals:
    """What the policy may match on about the prompt."""

    prompt_tokens: int
    complexity: float


def complexity(text: str, tokens: int) -> float:
    """The complexity score of a prompt (see the module table)."""
    code = 1.0 if _FENCE.search(text) else min(1.0, len(_CODE_LINE.findall(text)) / CODE_LINES_FULL)
    parts = {
        "length": min(1.0, tokens / LENGTH_FULL),
        "code": code,
        "reasoning": min(1.0, len(_REASONING.findall(text)) / REASONING_FULL),
        "questions": min(1.0, text.count("?") / QUESTIONS_FULL),
    }
    return round(sum(WEIGHTS[k] * v for k, v in parts.items()), 4)


def signals(text: str) -> Signals:
    """Token estimate and complexity of the prompt text."""
    tokens = estimate_tokens(text)
    return Signals(tokens, complexity(text, tokens))
