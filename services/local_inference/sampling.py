"""Each row's next token, chosen from that row's own logits with that row's own parameters.

onnxruntime-genai applies one set of search options to a whole static batch. To let requests with
different temperature, top_p or seed share a batch, the decoder reads the batch's logits, picks every
row's token here, and hands the choice back as one-hot logits to a greedy generator. A seeded row draws
from its own random generator, so its sampling never depends on which other rows shared its batch (the
logits themselves may, in int4: docs/local-inference.md). OpenAI's ``logit_bias``, ``presence_penalty``
and ``frequency_penalty`` are applied here too, per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

Logits = npt.NDArray[np.float32]


class RowSampler:
    """Greedy or top-k / top-p sampling with temperature, repetition penalty, OpenAI's presence and frequency
    penalties and logit bias, for one row."""

    def __init__(self, *, temperature: float, top_p: float, top_k: int, repetition_penalty: float,
                 seed: int | None, history: Iterable[int] = (), presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, logit_bias: Mapping[int, float] | None = None) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.penalty = repetition_penalty
        self.rng = np.random.default_rng(None if seed is None else seed % 2**63)
        self._seen: set[int] = set(history) if repetition_penalty != 1.0 else set()
        self.presence = presence_penalty
        self.frequency = frequency_penalty
        self._counts: dict[int, int] = {}  # tokens this row generated, for the presence / frequency penalties
        bias = logit_bias or {}
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self._bias = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    @property
    def greedy(self) -> bool:
        """True when the row always takes its most likely token."""
        return self.temperature == 0

    @property
    def native(self) -> bool:
        """True when onnxruntime-genai's own greedy search picks the same token (nothing to apply)."""
        return (self.greedy and self.penalty == 1.0 and self.presence == 0 and self.frequency == 0
                and not self._bias_ids.size)

    def choose(self, logits: Logits) -> int:
        """The next token given the row's logits over the vocabulary."""
        if self._bias_ids.size:
            logits = logits.copy()
            logits[self._bias_ids] += self._bias
        if self._seen:
            logits = penalize(logits, np.fromiter(self._seen, dtype=np.int64), self.penalty)
        if self._counts:
            logits = penalize_counts(logits, self._counts, self.presence, self.frequency)
        token = int(np.argmax(logits)) if self.greedy else self._sample(logits)
        if self.penalty != 1.0:
            self._seen.add(token)
        if self.presence or self.frequency:
            self._counts[token] = self._counts.get(token, 0) + 1
        return token

    def _sample(self, logits: Logits) -> int:
        ids, probs = top_k_probs(logits, self.top_k, self.temperature)
        cumulative = np.cumsum(probs)
        if self.top_p < 1.0:
            keep = int(np.searchsorted(cumulative, self.top_p)) + 1
            ids, cumulative = ids[:keep], cumulative[:keep]
        draw = self.rng.random() * float(cumulative[-1])
        return int(ids[min(int(np.searchsorted(cumulative, draw, side="right")), len(ids) - 1)])


def penalize(logits: Logits, seen: npt.NDArray[np.int64], penalty: float) -> Logits:
    """Make tokens already in the sequence less likely (the CTRL / Hugging Face rule)."""
    out = logits.copy()
    picked = out[seen]
    out[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def penalize_counts(logits: Logits, counts: Mapping[int, int], presence: float, frequency: float) -> Logits:
    """OpenAI's rule: ``logit[t] -= frequency * count[t] + presence * (count[t] > 0)`` over generated tokens."""
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    out = logits.copy()
    out[ids] -= frequency * n + presence
    return out


def top_k_probs(logits: Logits, top_k: int, temperature: float) -> tuple[npt.NDArray[np.int64], Logits]:
    """The ``top_k`` most likely tokens (all when 0), most likely first, with their softmax probabilities."""
    size = logits.shape[-1]
    k = size if top_k <= 0 else min(top_k, size)
    ids = np.argpartition(logits, size - k)[size - k:] if k < size else np.arange(size)
    order = np.argsort(-logits[ids], kind="stable")
    ids = ids[order].astype(np.int64)
    scaled = (logits[ids] - logits[ids[0]]) / temperature
    probs = np.exp(scaled).astype(np.float32)
    return ids, probs / probs.sum()
