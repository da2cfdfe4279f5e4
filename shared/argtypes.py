"""Argument types shared by the operator commands (``leafwire usage``, ``policy``, ``sites``, ``budgets``)."""

from __future__ import annotations

import argparse
import math


def seconds(text: str) -> float:
    """A wait in seconds: a finite number above 0 (argparse then says what was wrong, in one line)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the wait must be more than 0 seconds")
    return value
