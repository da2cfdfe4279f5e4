"""Prompt signals: token estimate and complexity score."""

from __future__ import annotations

from services.router.signals import estimate_tokens, signals


class TestSignals:
    def test_token_estimate_tracks_length(self) -> None:
        """The estimate grows with the text and is near 4/3 tokens per English word."""
        assert estimate_tokens("") == 0
        assert 120 <= estimate_tokens("the pump stopped " * 33) <= 150

    def test_simple_question_is_simple(self) -> None:
        """A short factual question scores low."""
        assert signals("What is the capital of France?").complexity < 0.1

    def test_code_reasoning_and_questions_raise_the_score(self) -> None:
        """Code, reasoning markers and many questions each raise the score."""
        base = signals("Tell me about pumps.").complexity
        code = signals("Fix this:\n```python\ndef f(x):\n    return x\n```").complexity
        reasoning = signals("Explain why it failed, compare both designs and justify the trade-off.").complexity
        questions = signals("Which one? When? Where? Who? How?").complexity
        assert min(code, reasoning, questions) > base
        assert code >= 0.25

    def test_score_is_bounded(self) -> None:
        """The score never leaves [0, 1]."""
        text = "```\n" + "explain why step by step? " * 5000
        assert 0.0 <= signals(text).complexity <= 1.0
