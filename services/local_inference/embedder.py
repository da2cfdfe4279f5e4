"""Sentence embeddings with plain onnxruntime and ``tokenizers``: mean pooling over the attention mask,
then L2 normalisation (what sentence-transformers does for all-MiniLM-L6-v2).

``Embedder`` is synchronous and knows nothing of NATS. Inputs are sorted by token length and run in
sub-batches of similar length, so one long input does not make every short one pay for its padding.
``EmbedEngine`` runs it on one thread of its own: onnxruntime and the tokenizer release the GIL while they
compute, so the worker's event loop keeps serving while vectors are made.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.local_inference.registry import ModelSpec

Vectors = npt.NDArray[np.float32]
SUB_BATCH = 16  # inputs per onnxruntime call: 8-16 measured fastest, 64 slowest (docs/local-inference.md)


@dataclass(frozen=True, slots=True)
class Embedded:
    """The vectors of one request's inputs, in input order, and the tokens read."""

    vectors: Vectors
    tokens: int


@dataclass(frozen=True, slots=True)
class TooLong:
    """One input of a request has more tokens than the model reads."""

    index: int
    tokens: int
    limit: int


class Embedder:
    """One embeddings model: its onnxruntime session and tokenizer."""

    def __init__(self, spec: ModelSpec, intra_op_threads: int = 1, sub_batch: int = SUB_BATCH) -> None:
        self.spec = spec
        self.intra_op_threads = intra_op_threads
        self.sub_batch = sub_batch
        self.context_length = spec.resolved_context_length()
        self.dimensions = 0
        self._session: Any = None
        self._tokenizer: Any = None
        self._inputs: frozenset[str] = frozenset()

    def load(self) -> float:
        """Load the session and tokenizer; return the seconds it took."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        started = time.monotonic()
        options = ort.SessionOptions()
        if self.intra_op_threads > 0:
            options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(self.spec.path / self.spec.embeddings.file), options,
                                             providers=["CPUExecutionProvider"])
        self._inputs = frozenset(i.name for i in self._session.get_inputs())
        tokenizer = Tokenizer.from_file(str(self.spec.path / "tokenizer.json"))
        tokenizer.no_truncation()  # too long is an error the caller sees, never a silent cut
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.dimensions = int(self._run([[0, 0]]).shape[1])
        return time.monotonic() - started

    def embed_many(self, requests: Sequence[Sequence[str]]) -> list[Embedded | TooLong]:
        """Vectors for several requests at once (one result per request, in order)."""
        flat = [text for texts in requests for text in texts]
        ids = [e.ids for e in self._tokenizer.encode_batch(flat)] if flat else []
        results: list[Embedded | TooLong] = []
        runnable: list[list[int]] = []
        spans: list[tuple[int, int]] = []
        start = 0
        for texts in requests:
            mine = ids[start:start + len(texts)]
            start += len(texts)
            too_long = next((i for i, t in enumerate(mine) if len(t) > self.context_length), None)
            if too_long is not None:
                results.append(TooLong(too_long, len(mine[too_long]), self.context_length))
                spans.append((-1, -1))
                continue
            spans.append((len(runnable), len(runnable) + len(mine)))
            runnable.extend(mine)
            results.append(Embedded(np.empty((0, 0), np.float32), sum(len(t) for t in mine)))
        vectors = self.encode(runnable)
        return [r if isinstance(r, TooLong) else Embedded(vectors[a:b], r.tokens)
                for r, (a, b) in zip(results, spans, strict=True)]

    def encode(self, ids: list[list[int]]) -> Vectors:
        """Vectors of token id sequences, shortest first in sub-batches, returned in the given order."""
        out = np.zeros((len(ids), self.dimensions), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for at in range(0, len(order), self.sub_batch):
            chunk = order[at:at + self.sub_batch]
            out[chunk] = self._run([ids[i] for i in chunk])
        return out

    def _run(self, ids: list[list[int]]) -> Vectors:
        width = max(len(t) for t in ids)
        input_ids = np.zeros((len(ids), width), dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, tokens in enumerate(ids):
            input_ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        hidden = self._session.run(None, {k: v for k, v in feed.items() if k in self._inputs})[0]
        return pool(hidden, mask, self.spec.embeddings.normalize)


def pool(hidden: npt.NDArray[np.float32], mask: npt.NDArray[np.int64], normalize: bool) -> Vectors:
    """Mean of the token vectors the attention mask keeps, optionally scaled to unit length."""
    weights = mask[:, :, None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    mean = summed / np.clip(weights.sum(axis=1), 1e-9, None)
    if normalize:
        mean = mean / np.clip(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12, None)
    out: Vectors = mean.astype(np.float32)
    return out


class EmbedEngine:
    """An ``Embedder`` on a thread of its own, for the worker's event loop."""

    def __init__(self, spec: ModelSpec, intra_op_threads: int = 1) -> None:
        self.spec = spec
        self.embedder = Embedder(spec, intra_op_threads)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"embed-{spec.name}")
        self.load_seconds = 0.0
        self.ready = False
        self.busy = 0

    @property
    def context_length(self) -> int:
        """Tokens one input may have."""
        return self.embedder.context_length

    @property
    def dimensions(self) -> int:
        """Size of each vector."""
        return self.embedder.dimensions

    async def start(self) -> None:
        """Load the model on the engine's thread."""
        loop = asyncio.get_running_loop()
        self.load_seconds = await loop.run_in_executor(self.executor, self.embedder.load)
        self.ready = True

    async def embed_many(self, requests: Sequence[Sequence[str]]) -> list[Embedded | TooLong]:
        """``Embedder.embed_many`` off the event loop; requests queue behind each other."""
        self.busy += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self.embedder.embed_many, requests)
        finally:
            self.busy -= 1

    async def stop(self) -> None:
        """Finish the running job and release the thread."""
        self.ready = False
        await asyncio.to_thread(self.executor.shutdown, True, cancel_futures=True)
