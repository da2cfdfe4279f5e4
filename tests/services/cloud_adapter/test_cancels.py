"""Cancels that reach the cloud-adapter before their request (``EarlyCancels``)."""

from __future__ import annotations

import time

from services.cloud_adapter.adapter import EarlyCancels


def test_a_cancel_of_every_answer_refuses_the_request_once() -> None:
    """A caller's cancel (no target) refuses its request for any model, once: the same id asked again (a NATS
    client trying again) is answered."""
    cancels = EarlyCancels()
    cancels.add("r1", None)
    assert not cancels.take("r2", "oai/gpt")
    assert cancels.take("r1", "oai/gpt")
    assert not cancels.take("r1", "oai/gpt")


def test_a_cancel_naming_a_target_refuses_only_that_target() -> None:
    """A router's cancel of its wait for ``oai/gpt`` leaves its fallback ``claude/haiku`` (same id) alone."""
    cancels = EarlyCancels()
    cancels.add("r1", "oai/gpt")
    assert not cancels.take("r1", "claude/haiku")
    assert cancels.take("r1", "oai/gpt")


def test_cancels_are_forgotten_after_two_generations() -> None:
    """A cancel is kept ``keep_s`` to twice that, then forgotten (memory stays bounded with no timer)."""
    cancels = EarlyCancels(keep_s=0.05)
    cancels.add("old", None)
    time.sleep(0.06)
    cancels.add("newer", None)  # turns: "old" in the older generation
    assert cancels.take("newer", "m")
    time.sleep(0.06)
    cancels.add("newest", None)  # turns again: "old" is gone
    assert not cancels.take("old", "m")
    assert cancels.take("newest", "m")


def test_at_most_limit_cancels_a_generation() -> None:
    """Past ``limit`` in a generation, more cancels are not kept (a flood cannot grow memory)."""
    cancels = EarlyCancels(limit=2)
    for rid in ("a", "b", "c"):
        cancels.add(rid, None)
    assert [cancels.take(rid, "m") for rid in ("a", "b", "c")] == [True, True, False]
