"""Per-row token choice: greedy, seeded sampling, top-k / top-p, repetition penalty."""

from __future__ import annotations

import numpy as np
import pytest

from services.local_inference.sampling import RowSampler, penalize, top_k_probs


def sampler(**kwargs: object) -> RowSampler:
    args: dict[str, object] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
                               "seed": 7, **kwargs}
    return RowSampler(**args)  # type: ignore[arg-type]


LOGITS = np.random.default_rng(0).normal(size=500).astype(np.float32)


class TestRowSampler:
    def test_greedy_takes_the_most_likely_token(self) -> None:
        """temperature 0 always picks the largest logit; the library's own search does the same."""
        s = sampler(temperature=0.0)
        assert s.native
        assert s.choose(LOGITS) == int(np.argmax(LOGITS))

    def test_same_seed_same_tokens(self) -> None:
        """Two rows with the same seed draw the same tokens from the same logits; another seed differs."""
        a, b, c = sampler(seed=7), sampler(seed=7), sampler(seed=8)
        seq_a = [a.choose(LOGITS) for _ in range(20)]
        assert seq_a == [b.choose(LOGITS) for _ in range(20)]
        assert seq_a != [c.choose(LOGITS) for _ in range(20)]

    def test_top_k_limits_the_choice(self) -> None:
        """With top_k 3 only the three most likely tokens are ever drawn."""
        s = sampler(top_k=3, temperature=5.0)
        allowed = set(np.argsort(-LOGITS)[:3].tolist())
        assert {s.choose(LOGITS) for _ in range(200)} <= allowed

    def test_top_p_keeps_the_smallest_likely_set(self) -> None:
        """A token holding more than top_p of the mass alone is the only one drawn."""
        logits = np.zeros(100, dtype=np.float32)
        logits[42] = 20.0
        s = sampler(top_p=0.9)
        assert {s.choose(logits) for _ in range(100)} == {42}

    def test_sampling_follows_the_probabilities(self) -> None:
        """Draws follow the softmax: a token with twice the probability comes up about twice as often."""
        logits = np.log(np.array([2.0, 1.0], dtype=np.float32))
        s = sampler(seed=1)
        draws = [s.choose(logits) for _ in range(3000)]
        assert draws.count(0) / draws.count(1) == pytest.approx(2.0, rel=0.15)

    def test_repetition_penalty_steers_away_from_seen_tokens(self) -> None:
        """With a strong penalty, greedy decoding does not repeat a token it has already produced."""
        s = sampler(temperature=0.0, repetition_penalty=100.0, history=[])
        assert not s.native
        tokens = [s.choose(LOGITS) for _ in range(5)]
        assert len(set(tokens)) == 5


def test_penalize_shrinks_positive_and_grows_negative_logits() -> None:
    """The CTRL rule: positive logits are divided by the penalty, negative ones multiplied."""
    out = penalize(np.array([2.0, -2.0, 1.0], dtype=np.float32), np.array([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_top_k_probs_are_sorted_and_sum_to_one() -> None:
    """The candidate tokens come most likely first, with probabilities summing to one."""
    ids, probs = top_k_probs(LOGITS, 10, 0.7)
    assert ids.tolist() == np.argsort(-LOGITS)[:10].tolist()
    assert float(probs.sum()) == pytest.approx(1.0)
    assert list(probs) == sorted(probs, reverse=True)
