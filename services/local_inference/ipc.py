"""Messages between the worker's event loop and its decoder process (pickled over a pipe).

NamedTuples: cheap to pickle, typed, and nothing of NATS or HTTP in them.
"""

from __future__ import annotations

from typing import Literal, NamedTuple


class RowSpec(NamedTuple):
    """One request to decode."""

    key: int
    messages: list[dict[str, str]]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    deadline: float
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit


class Submit(NamedTuple):
    """Queue rows for decoding (rows of one Submit are decoded together when they are compatible)."""

    rows: list[RowSpec]


class CancelRow(NamedTuple):
    """Stop decoding a row."""

    key: int


class Shutdown(NamedTuple):
    """Finish the current step and exit."""


class Loaded(NamedTuple):
    """The model is loaded and the decoder takes work."""

    context_length: int
    load_seconds: float


class Started(NamedTuple):
    """A row's prompt was taken into a batch."""

    key: int
    prompt_tokens: int
    batch_size: int


class Reading(NamedTuple):
    """A lone long prompt is being read a chunk at a time (``True``), or has been read (``False``). While it
    is read the decoder answers rows that arrive, so the worker may take more."""

    key: int
    reading: bool


class Delta(NamedTuple):
    """New text of a row."""

    key: int
    text: str


FinishReason = Literal["stop", "length", "cancelled"]


class Finished(NamedTuple):
    """A row ended."""

    key: int
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


RejectReason = Literal["context_length", "deadline", "invalid"]


class Rejected(NamedTuple):
    """A row could not be decoded at all; ``detail`` holds the numbers behind the reason."""

    key: int
    reason: RejectReason
    message: str
    detail: dict[str, int]


RowEvent = Started | Reading | Delta | Finished | Rejected
ToDecoder = Submit | CancelRow | Shutdown
FromDecoder = Loaded | list[RowEvent]
