"""Each row's next token, chosen from that row's own logits with that row's own parameters.

onnxruntime-genai applies one set of search options to a whole static batch. To let requests with
different temperature, top_p or seed share a batch, the decoder reads the batch's logits, picks every
row's token here, and hands the choice back as one-hot logits to a greedy generator. A seeded row draws
from its own random generator, so its answer depends on its seed and prompt only, never on which other
rows shared its batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

Logits = npt.NDArray[np.float32]


class RowSampler:
    """Greedy or top-k / top-p sampling with temperature and repetition penalty, for one row."""

    def __init__(self, *, temperature: float, top_p: float, top_k: int, repetition_penalty: float,
                 seed: int | None, history: Iterable[int] = ()) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.penalty = repetition_penalty
        self.rng = np.random.default_rng(None if seed is None else seed % 2**63)
        self._seen: set[int] = set(history) if repetition_penalty != 1.0 else set()

    @property
    def greedy(self) -> bool:
        """True when the row always takes its most likely token."""
        return self.temperature == 0

    @property
    def native(self) -> bool:
        """True when onnxruntime-genai's own greedy search picks the same token (no penalty to apply)."""
        return self.greedy and self.penalty == 1.0

    def choose(self, logits: Logits) -> int:
        """The next token given the row's logits over the vocabulary."""
        if self._seen:
            logits = penalize(logits, np.fromiter(self._seen, dtype=np.int64), self.penalty)
        token = int(np.argmax(logits)) if self.greedy else self._sample(logits)
        if self.penalty != 1.0:
            self._seen.add(token)
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
