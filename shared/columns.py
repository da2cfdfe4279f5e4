"""Plain-text tables for the operator commands (``leafwire usage``, ``sites``, ``budgets``; ``just status``)."""

from __future__ import annotations

from collections.abc import Container, Sequence


def aligned(rows: Sequence[Sequence[str]], right: Container[int] = (), indent: str = "") -> list[str]:
    """Each row as one line of columns two spaces apart, as wide as their widest cell; the columns whose index
    is in ``right`` (numbers) are right-aligned, the others left-aligned; trailing spaces are dropped."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]
