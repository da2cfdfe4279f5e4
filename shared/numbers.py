"""Reading numbers from text that anyone may send (headers, command lines)."""

from __future__ import annotations

import math


def finite(text: str) -> float | None:
    """The number ``text`` spells, or ``None`` when it is none or not finite (``inf``, ``nan``, ``1e400``)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
