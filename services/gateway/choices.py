"""What a request answered with several choices is made of, whichever endpoint it came to: one chat request
per choice (``Choice``, its own id ``<request id>-<index>`` and, with a ``seed``, its own ``seed + j``), and how
an endpoint turns its choices' answers into its own (``Merge``). ``fanout`` asks for the choices and merges.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from schemas.chat import StreamEnd, Usage
from shared.envelope import Envelope
from shared.errors import LeafwireError, UpstreamError

A = TypeVar("A")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Choice:
    """One choice asked of the site: its index in the answer, its chat request and its envelope.

    The request is a ``base`` that every choice of a prompt shares (a JSON object without a seed) and the choice's
    own ``seed``, put together only when the choice is asked (``body``): a 6 MB request of 128 choices held as
    128 copies took the gateway 800 MB, and building them stalled every other caller for seconds."""

    index: int
    base: bytes
    env: Envelope
    seed: int | None = None

    @property
    def body(self) -> bytes:
        """The chat request of this choice: its ``base``, with its ``seed`` when it has one."""
        if self.seed is None:
            return self.base
        more = b"," if len(self.base) > 2 else b""  # (compact JSON: "{}" has no field to follow)
        return b"".join((memoryview(self.base)[:-1], more, b'"seed":%d}' % self.seed))


def choice_env(env: Envelope, index: int, count: int, sample: int) -> Envelope:
    """The envelope of choice ``index`` of ``count``, the ``sample``-th of its prompt: a lone choice has the
    request's own (its id is the one the caller sees); several have ids ``<id>-<index>`` and their sample
    number (``Lw-Choice``: a prompt's samples have cache entries of their own, and its first has the entry
    that the same request with ``n: 1`` has)."""
    if count == 1:
        return env
    return Envelope(f"{env.request_id}-{index}", env.tenant, "", env.deadline, choice=sample)


class Merge(Protocol[A]):
    """How one endpoint's answer is made of its choices' chat answers."""

    def answered(self, choice: Choice, data: bytes) -> A:
        """A choice's ``chat.completion`` (its ``result`` event), parsed; a 502 when it is none."""

    def whole(self, answers: list[A]) -> bytes:
        """The endpoint's whole answer, of every choice's (in index order)."""

    def chunk(self, choice: Choice, data: bytes) -> bytes:
        """A choice's ``chat.completion.chunk`` as the endpoint's server-sent event (``b""``: none)."""

    def usage(self, usage: Usage) -> bytes:
        """The last event of a stream asked to include usage: the usage of every choice."""

    def error(self, err: LeafwireError) -> LeafwireError:
        """An error of the chat path as the endpoint's caller reads it."""


def parse(model: type[M], data: bytes) -> M:
    """A message of the site, or a 502 when it is malformed."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise UpstreamError(f"malformed {model.__name__} from the site", code="upstream_bad_response") from exc


def stream_end(data: bytes) -> StreamEnd:
    """The ``done`` event that closes one choice's stream (its finish reason and usage)."""
    return parse(StreamEnd, data)


def event(body: bytes) -> bytes:
    """One server-sent event."""
    return b"data: " + body + b"\n\n"


def total_usage(usages: Iterable[Usage]) -> Usage:
    """The choices' usage added up, each detail (cached, cache-write, reasoning tokens) where any choice had it."""
    listed = list(usages)
    prompt: dict[str, int] = {}
    completion: dict[str, int] = {}
    for u in listed:
        for details, total in ((u.prompt_tokens_details, prompt), (u.completion_tokens_details, completion)):
            for key, count in (details or {}).items():
                total[key] = total.get(key, 0) + count
    prompt_tokens, completion_tokens = sum(u.prompt_tokens for u in listed), sum(u.completion_tokens for u in listed)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=prompt or None,
                 completion_tokens_details=completion or None)
