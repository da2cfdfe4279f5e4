"""The decoder process: owns one onnxruntime-genai model and decodes static batches of rows.

Runs in its own process (onnxruntime-genai holds the GIL while it computes). Between decode steps it
reads the pipe, so cancellations and new rows are seen within one step. Queued rows (up to
``max_batch``, first come first served) are decoded together in one generator whatever their sampling
parameters: when every row is greedy, with no penalty and no logit bias, the library's own search picks
the tokens; otherwise each row's token is chosen from its own logits (``sampling.py``). Each row finishes
on its own (end of sequence, its own stop sequences, its own max_tokens) and the batch ends when no live
row is left.

A prompt longer than ``PREFILL_CHUNK`` tokens is decoded in a batch of its own and read into the model a
chunk at a time (a 7,000-token prompt takes over a minute on two cores, in one call that nothing can stop).
Before each chunk the pipe is read: a cancel or a passed deadline ends the row there, and one batch of rows
with short prompts that arrived meanwhile is answered first, so one long prompt does not stall everyone else.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from services.local_inference.ipc import (
    CancelRow,
    Delta,
    Finished,
    Loaded,
    Reading,
    Rejected,
    RowEvent,
    RowSpec,
    Shutdown,
    Started,
    Submit,
    ToDecoder,
)
from services.local_inference.registry import ModelSpec
from services.local_inference.sampling import RowSampler
from services.local_inference.stops import StopMatcher

ROLE_MAP = {"developer": "system"}
PREFILL_CHUNK = 256
"""Tokens read into the model per call for a long prompt (about a second each with one thread, two cores)."""


@dataclass
class LiveRow:
    """A row being decoded."""

    spec: RowSpec
    prompt: str
    prompt_tokens: int
    max_new: int
    matcher: StopMatcher
    stream: Any
    sampler: RowSampler
    ids: Any = None  # the prompt's token ids, as tokenized to check its length
    generated: int = 0
    done: bool = False


@dataclass
class Decoder:
    """The model, the tokenizer and the queue of rows waiting for a batch."""

    spec: ModelSpec
    max_batch: int
    conn: Connection
    og: Any = None
    model: Any = None
    tokenizer: Any = None
    context_length: int = 0
    vocab_size: int = 0
    eos: frozenset[int] = frozenset()
    queue: deque[RowSpec] = field(default_factory=deque)
    cancelled: set[int] = field(default_factory=set)
    running: bool = True
    waiting_long: deque[LiveRow] = field(default_factory=deque)  # prepared rows with long prompts, oldest first

    def load(self, intra_op_threads: int) -> Loaded:
        """Load the model (the only slow step at start)."""
        import onnxruntime_genai as og

        started = time.monotonic()
        self.og = og
        config = og.Config(str(self.spec.path))
        if intra_op_threads > 0:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": intra_op_threads}}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.context_length = self.spec.resolved_context_length()
        genai_config = json.loads((self.spec.path / "genai_config.json").read_text())
        self.vocab_size = int(genai_config["model"]["vocab_size"])
        self.eos = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        return Loaded(self.context_length, time.monotonic() - started)

    # -- the pipe ---------------------------------------------------------------------------------

    def handle(self, msg: ToDecoder) -> None:
        """Apply one message from the worker."""
        if isinstance(msg, Submit):
            self.queue.extend(msg.rows)
        elif isinstance(msg, CancelRow):
            self.cancelled.add(msg.key)
        elif isinstance(msg, Shutdown):
            self.running = False

    def poll(self) -> None:
        """Read every message waiting on the pipe without blocking."""
        while self.conn.poll():
            self.handle(self.conn.recv())

    def send(self, events: list[RowEvent]) -> None:
        """Send the events of one step in one message."""
        if events:
            self.conn.send(events)

    # -- batches ----------------------------------------------------------------------------------

    def next_batch(self) -> list[RowSpec]:
        """Take up to ``max_batch`` queued rows, oldest first (any sampling parameters mix)."""
        return [self.queue.popleft() for _ in range(min(self.max_batch, len(self.queue)))]

    def prepare(self, rows: Iterable[RowSpec], events: list[RowEvent]) -> list[LiveRow]:
        """Template and tokenize rows; reject those cancelled, expired or too long for the context."""
        live = []
        for row in rows:
            if row.key in self.cancelled:
                self.cancelled.discard(row.key)
                events.append(Finished(row.key, "cancelled", 0, 0))
                continue
            if time.time() >= row.deadline:
                events.append(Rejected(row.key, "deadline", "the request's deadline passed before decoding",
                                       {}))
                continue
            if (unknown := self.unknown_bias_token(row)) is not None:
                events.append(unknown)
                continue
            messages = [{"role": ROLE_MAP.get(m["role"], m["role"]), "content": m["content"]}
                        for m in row.messages]
            prompt = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
            ids = self.tokenizer.encode(prompt)
            n = len(ids)
            room = self.context_length - n
            if (row.max_tokens is not None and row.max_tokens > room) or room < 1:
                asked = row.max_tokens or 1
                events.append(Rejected(row.key, "context_length", "prompt and completion exceed the context",
                                       {"context_length": self.context_length, "prompt_tokens": n,
                                        "max_tokens": asked}))
                continue
            max_new = row.max_tokens or min(self.spec.defaults.max_tokens, room)
            live.append(LiveRow(row, prompt, n, max_new, StopMatcher(row.stop),
                                self.tokenizer.create_stream(), self.sampler(row, ids), ids))
        return live

    def unknown_bias_token(self, row: RowSpec) -> Rejected | None:
        """The refusal of a row whose ``logit_bias`` names a token the model does not have (as OpenAI's 400)."""
        outside = sorted(t for t in row.logit_bias or {} if not 0 <= t < self.vocab_size)
        if not outside:
            return None
        return Rejected(row.key, "invalid", f"Invalid key in 'logit_bias': {outside[0]}. This model's token ids "
                        f"go from 0 to {self.vocab_size - 1}.", {"token": outside[0], "vocab_size": self.vocab_size})

    def sampler(self, row: RowSpec, prompt_ids: Any) -> RowSampler:
        """How ``row`` picks its tokens (the model's defaults fill in top_k and the repetition penalty)."""
        d = self.spec.defaults
        return RowSampler(temperature=row.temperature, top_p=row.top_p, top_k=d.top_k,
                          repetition_penalty=d.repetition_penalty, seed=row.seed,
                          history=(int(t) for t in prompt_ids) if d.repetition_penalty != 1.0 else (),
                          presence_penalty=row.presence_penalty, frequency_penalty=row.frequency_penalty,
                          logit_bias=row.logit_bias)

    def generator(self, rows: list[LiveRow]) -> Any:
        """A greedy static-batch generator holding every row's prompt; ``None`` when the lone row of a long
        prompt was cancelled or ran out of time while its prompt was read (its finish is sent)."""
        og = self.og
        params = og.GeneratorParams(self.model)
        longest = max(r.prompt_tokens for r in rows)
        params.set_search_options(batch_size=len(rows), do_sample=False,
                                  max_length=min(self.context_length, longest + max(r.max_new for r in rows)))
        generator = og.Generator(self.model, params)
        if len(rows) > 1 or rows[0].prompt_tokens <= PREFILL_CHUNK:
            generator.append_tokens(self.tokenizer.encode_batch([r.prompt for r in rows]))
            return generator
        row, ids = rows[0], rows[0].ids
        self.send([Reading(row.spec.key, True)])
        for start in range(0, len(ids), PREFILL_CHUNK):
            self.poll()
            if row.spec.key in self.cancelled or not self.running:
                events: list[RowEvent] = []
                self.finish(row, "cancelled", events)
                self.send(events)
                return None
            if time.time() >= row.spec.deadline:
                row.done = True
                self.send([Rejected(row.spec.key, "deadline", "the request's deadline passed while its prompt "
                                    "was read", {})])
                return None
            self.answer_short_waiting()
            generator.append_tokens(ids[start:start + PREFILL_CHUNK])
        self.send([Reading(row.spec.key, False)])
        return generator

    def answer_short_waiting(self) -> None:
        """While a long prompt is read: decode one batch of the queued rows with short prompts (those with long
        ones wait their turn). One batch a chunk: under steady load the long prompt still moves on."""
        if self.queue and self.running:
            short = self.take_batch()
            if short:
                self.decode(short)

    def take_batch(self) -> list[LiveRow]:
        """The next queued rows, prepared: those with short prompts, to decode together; those with long ones
        join ``waiting_long`` (each is decoded alone)."""
        events: list[RowEvent] = []
        rows = self.prepare(self.next_batch(), events)
        self.send(events)
        self.waiting_long.extend(r for r in rows if r.prompt_tokens > PREFILL_CHUNK)
        return [r for r in rows if r.prompt_tokens <= PREFILL_CHUNK]

    def decode(self, rows: list[LiveRow]) -> None:
        """Decode one static batch until every row has finished or been cancelled."""
        self.send([Started(r.spec.key, r.prompt_tokens, len(rows)) for r in rows])
        generator = self.generator(rows)
        if generator is None:
            return
        choose = None if all(r.sampler.native for r in rows) else RowChoices(rows, self.pad_token())
        while not generator.is_done():
            if choose is not None:
                generator.set_logits(choose.one_hot(generator.get_logits()))
            generator.generate_next_token()
            tokens = generator.get_next_tokens()
            events: list[RowEvent] = []
            for row, token in zip(rows, tokens, strict=True):
                if not row.done:
                    self.step_row(row, int(token), events)
            self.poll()
            for row in rows:
                if not row.done and row.spec.key in self.cancelled:
                    self.finish(row, "cancelled", events)
            self.send(events)
            if all(r.done for r in rows) or not self.running:
                break
        leftovers: list[RowEvent] = []
        for row in rows:
            if not row.done:
                self.finish(row, "length", leftovers)
        self.send(leftovers)

    def pad_token(self) -> int:
        """What a finished row is fed while its batch goes on (an end-of-sequence token)."""
        return min(self.eos) if self.eos else 0

    def step_row(self, row: LiveRow, token: int, events: list[RowEvent]) -> None:
        """Account one new token of ``row``: end of sequence, text, stop sequences, max_tokens."""
        row.generated += 1
        if token in self.eos:
            self.finish(row, "stop", events)
            return
        text = row.matcher.feed(row.stream.decode(token))
        if text:
            events.append(Delta(row.spec.key, text))
        if row.matcher.stopped:
            self.finish(row, "stop", events)
        elif row.generated >= row.max_new:
            self.finish(row, "length", events)

    def finish(self, row: LiveRow, reason: str, events: list[RowEvent]) -> None:
        """End ``row``: send what the stop matcher held back, then the finish event."""
        tail = row.matcher.flush() if reason != "cancelled" else ""
        if tail:
            events.append(Delta(row.spec.key, tail))
        events.append(Finished(row.spec.key, reason, row.prompt_tokens, row.generated))  # type: ignore[arg-type]
        self.cancelled.discard(row.spec.key)
        row.done = True

    def run(self) -> None:
        """Serve until told to shut down or the worker goes away."""
        while self.running:
            if not self.queue:
                self.handle(self.conn.recv())
            self.poll()
            if not self.queue:
                continue
            short = self.take_batch()
            if short:
                self.decode(short)
            while self.waiting_long and self.running:  # each alone, its prompt read a chunk at a time
                self.decode([self.waiting_long.popleft()])


class RowChoices:
    """Per-row token choice for a batch whose rows do not all decode greedily (see ``sampling.py``)."""

    def __init__(self, rows: list[LiveRow], pad: int) -> None:
        self.rows = rows
        self.pad = pad
        self.forced: np.ndarray[Any, np.dtype[np.float32]] | None = None
        self.chosen = np.zeros(len(rows), dtype=np.int64)

    def one_hot(self, logits: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
        """Logits under which greedy search takes each row's own choice."""
        batch = np.asarray(logits, dtype=np.float32).reshape(len(self.rows), -1)
        if self.forced is None:
            self.forced = np.full((len(self.rows), 1, batch.shape[1]), -1e30, dtype=np.float32)
        rows = np.arange(len(self.rows))
        self.forced[rows, 0, self.chosen] = -1e30
        for i, row in enumerate(self.rows):
            self.chosen[i] = self.pad if row.done else row.sampler.choose(batch[i])
        self.forced[rows, 0, self.chosen] = 0.0
        return self.forced


def main(conn: Connection, spec: ModelSpec, max_batch: int, intra_op_threads: int) -> None:
    """Entry point of the decoder process."""
    decoder = Decoder(spec=spec, max_batch=max_batch, conn=conn)
    try:
        conn.send(decoder.load(intra_op_threads))
        decoder.run()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the worker went away or is stopping us: nothing left to answer
