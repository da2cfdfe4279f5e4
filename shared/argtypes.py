"""Argument types shared by the operator commands (``leafwire usage``, ``policy``, ``sites``, ``budgets``)."""

from __future__ import annotations

import argparse

from shared.numbers import finite


def seconds(text: str) -> float:
    """A wait in seconds: a finite number above 0 (argparse then says what was wrong, in one line)."""
    value = finite(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the wait must be more than 0 seconds")
    return value
