"""The hop-cost probe: real round trips between two processes, and no process left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loadtests import hop_cost


@pytest.mark.parametrize("in_flight", [1, 32])
def test_measures_round_trips_and_reaps_its_echo(in_flight: int) -> None:
    before = children()
    got = hop_cost.measure(300, in_flight)
    assert min(got["wall_us"], got["sender_us"], got["echo_us"]) > 0
    assert 0 <= got["sender_sys"] <= 1  # a share; 300 quick hops may spend less than one tick in the kernel
    assert children() == before  # the echoing child has ended and been waited for (no zombie either)


def children() -> set[int]:
    """This process's children, zombies included."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            found.add(int(stat.parent.name))
    return found
