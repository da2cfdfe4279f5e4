"""The decoder process's loop, driven in-process over a real pipe with the tiny test model: a long prompt is
read a chunk at a time, and between chunks a cancel, a passed deadline and newly arrived short prompts are
seen (one long prompt used to hold the model for a minute, deaf to all of them)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from multiprocessing import Pipe
from typing import Any

from services.local_inference.decoder import PREFILL_CHUNK, Decoder
from services.local_inference.ipc import (
    CancelRow,
    Finished,
    Reading,
    Rejected,
    RowEvent,
    RowSpec,
    Shutdown,
    Started,
    Submit,
)
from services.local_inference.registry import ModelSpec
from tests.support import FIXTURE_MODEL

LONG = " ".join(["word"] * (3 * PREFILL_CHUNK))


def row(key: int, text: str, max_tokens: int = 3, deadline_s: float = 60.0) -> RowSpec:
    return RowSpec(key=key, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0.0,
                   top_p=1.0, seed=None, stop=[], deadline=time.time() + deadline_s)


class Scripted(Decoder):
    """A decoder that, when it reads the pipe after the first chunk of a lone long prompt was read, runs
    ``meanwhile`` (as if the worker had just sent something, or time had passed)."""

    meanwhile: Callable[[Decoder], None] | None = None
    reading_long = False
    polls = 0

    def generator(self, rows: list[Any]) -> Any:
        self.reading_long = len(rows) == 1 and rows[0].prompt_tokens > PREFILL_CHUNK
        try:
            return super().generator(rows)
        finally:
            self.reading_long = False

    def poll(self) -> None:
        if self.reading_long:
            self.polls += 1
            if self.polls == 2 and self.meanwhile is not None:  # before the second chunk
                act, self.meanwhile = self.meanwhile, None
                act(self)
        super().poll()


def drive(first: list[RowSpec], meanwhile: Callable[[Decoder], None]) -> list[RowEvent]:
    """Run the loop until every row has ended; the events it sent, in order."""
    ours, theirs = Pipe()
    d = Scripted(spec=ModelSpec(name="tiny", path=FIXTURE_MODEL, context_length=4096), max_batch=8, conn=theirs)
    d.meanwhile = meanwhile
    d.load(1)
    ours.send(Submit(first))
    loop = threading.Thread(target=d.run, daemon=True)
    loop.start()
    events: list[RowEvent] = []
    until = time.monotonic() + 60
    while time.monotonic() < until and not (events and all(
            any(isinstance(e, Finished | Rejected) and e.key == k for e in events) for k in seen_keys(events))):
        if ours.poll(0.1):
            events.extend(ours.recv())
    ours.send(Shutdown())
    loop.join(10)
    assert d.meanwhile is None, "the long prompt was read in one call"
    return events


def seen_keys(events: list[RowEvent]) -> set[int]:
    return {e.key for e in events}


def ended(events: list[RowEvent], key: int) -> Finished | Rejected:
    return next(e for e in events if isinstance(e, Finished | Rejected) and e.key == key)


def test_short_prompts_that_arrive_are_answered_while_a_long_one_is_read() -> None:
    """Two short prompts arriving while a long one is read are decoded together at once; the long one then
    goes on and is answered in full."""
    events = drive([row(1, LONG)], lambda d: d.handle(Submit([row(2, "hi"), row(3, "hello")])))
    order = [e.key for e in events if isinstance(e, Finished)]
    assert sorted(order[:2]) == [2, 3]
    assert order[2:] == [1]
    long_done = ended(events, 1)
    assert isinstance(long_done, Finished)
    assert long_done.prompt_tokens > 2 * PREFILL_CHUNK
    assert long_done.completion_tokens == 3
    started = {e.key: e for e in events if isinstance(e, Started)}
    assert (started[1].batch_size, started[2].batch_size, started[3].batch_size) == (1, 2, 2)
    # the worker is told while the long prompt is read, so it can say it takes more (a batcher then sends them)
    marks = [(type(e).__name__, e.key) for e in events if isinstance(e, Reading | Finished)]
    assert marks[0] == ("Reading", 1)
    assert marks[3:] == [("Reading", 1), ("Finished", 1)]
    assert [e.reading for e in events if isinstance(e, Reading)] == [True, False]


def test_a_cancel_stops_a_long_prompt_while_it_is_read() -> None:
    events = drive([row(1, LONG, max_tokens=50)], lambda d: d.handle(CancelRow(1)))
    done = ended(events, 1)
    assert isinstance(done, Finished)
    assert (done.finish_reason, done.completion_tokens) == ("cancelled", 0)


def test_a_deadline_that_passes_while_a_long_prompt_is_read() -> None:
    events = drive([row(1, LONG, deadline_s=1.0)], lambda _: time.sleep(1.2))
    done = ended(events, 1)
    assert isinstance(done, Rejected)
    assert done.reason == "deadline"
