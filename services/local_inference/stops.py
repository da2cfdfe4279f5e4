"""Stop sequences on streamed text: emit as early as possible, never emit a stop sequence or part of one."""

from __future__ import annotations


class StopMatcher:
    """Feeds on text pieces; says what is safe to send and whether a stop sequence was reached.

    Text that could be the start of a stop sequence is held back until the next pieces settle it.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._text = ""
        self._sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add ``piece``; return the text that may be sent now (empty once stopped)."""
        if self.stopped:
            return ""
        self._text += piece
        if not self._stops:
            return self._take(len(self._text))
        start = max(0, self._sent - self._longest + 1)
        hits = [i for s in self._stops if (i := self._text.find(s, start)) != -1]
        if hits:
            self.stopped = True
            end = min(hits)
            self._text = self._text[:end]
            return self._take(end)
        return self._take(len(self._text) - self._held_back())

    def flush(self) -> str:
        """The held-back text, sent when the answer ends without a stop sequence."""
        return "" if self.stopped else self._take(len(self._text))

    @property
    def text(self) -> str:
        """All text of the answer so far (without any stop sequence)."""
        return self._text

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop sequence."""
        tail = self._text[-self._longest:] if self._longest else ""
        for n in range(min(len(tail), self._longest - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self._stops):
                return n
        return 0

    def _take(self, end: int) -> str:
        out = self._text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return out
