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

Length is exact; code, reasoning markers and questions are looked for in the first 16,000 characters
(each part is full after a few hits, and a prompt that long already scores high on length).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import islice

_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import|return\b|function\b|const |let |var |public |private |"
    r"#include|SELECT\b|INSERT\b|UPDATE\b|for\s*\(|while\s*\(|if\s*\(|\}|\{|<\w+[^>]*>)", re.M | re.I)
_REASONING = re.compile(  # matched on lower-cased text: cheaper than re.IGNORECASE
    r"\b(why|explain|step[- ]by[- ]step|prove|derive|compare|analy[sz]e|reason|trade-?offs?|evaluate|"
    r"justify|root cause|diagnos\w*|plan)\b")

WEIGHTS = {"length": 0.35, "code": 0.25, "reasoning": 0.25, "questions": 0.15}
LENGTH_FULL = 2000
CODE_LINES_FULL = 3
REASONING_FULL = 3
QUESTIONS_FULL = 4
SCAN_CHARS = 16_000


def estimate_tokens(text: str) -> int:
    """Estimated BPE tokens of ``text``."""
    return int(max(len(text.split()) * 4 / 3, len(text) / 4))


@dataclass(frozen=True, slots=True)
class Signals:
    """What the policy may match on about the prompt."""

    prompt_tokens: int
    complexity: float


def _hits(regex: re.Pattern[str], text: str, cap: int) -> float:
    """Matches of ``regex`` as a fraction of ``cap``, stopping at ``cap``."""
    return sum(1 for _ in islice(regex.finditer(text), cap)) / cap


def complexity(text: str, tokens: int) -> float:
    """The complexity score of a prompt (see the module table)."""
    head = text[:SCAN_CHARS]
    parts = {
        "length": min(1.0, tokens / LENGTH_FULL),
        "code": 1.0 if "```" in head else _hits(_CODE_LINE, head, CODE_LINES_FULL),
        "reasoning": _hits(_REASONING, head.lower(), REASONING_FULL),
        "questions": min(1.0, head.count("?") / QUESTIONS_FULL),
    }
    return round(sum(WEIGHTS[k] * v for k, v in parts.items()), 4)


UNMEASURED = Signals(0, 0.0)  # for a policy whose rules never read the prompt


def signals(text: str) -> Signals:
    """Token estimate and complexity of the prompt text."""
    tokens = estimate_tokens(text)
    return Signals(tokens, complexity(text, tokens))
