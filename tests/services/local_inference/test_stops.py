"""Stop sequences on streamed text."""

from __future__ import annotations

import pytest

from services.local_inference.stops import StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush()


class TestStopMatcher:
    def test_no_stops_passes_text_through(self) -> None:
        """Without stop sequences every piece is sent as it arrives."""
        m = StopMatcher([])
        assert [m.feed(p) for p in ["He", "llo"]] == ["He", "llo"]

    def test_stop_inside_one_piece(self) -> None:
        """Text before the stop sequence is sent, the rest is dropped."""
        m = StopMatcher(["END"])
        assert m.feed("abcENDxyz") == "abc"
        assert m.stopped
        assert m.feed("more") == ""

    def test_stop_spanning_pieces_is_never_shown(self) -> None:
        """A stop sequence split across pieces is held back, then dropped whole."""
        m = StopMatcher(["\n\nUser:"])
        sent = [m.feed(p) for p in ["Hi", "\n", "\nUs", "er:", " next"]]
        assert "".join(sent) == "Hi"
        assert m.stopped

    def test_false_start_is_released(self) -> None:
        """Text that looked like the start of a stop sequence is sent once it is clearly not one."""
        m = StopMatcher(["STOP"])
        assert m.feed("ST") == ""
        assert m.feed("AY") == "STAY"

    def test_earliest_stop_wins(self) -> None:
        """With several stop sequences the answer ends at the first one that appears."""
        assert feed_all(StopMatcher(["c", "b"]), ["a", "bc"]) == "a"

    def test_flush_sends_held_back_text_when_answer_ends(self) -> None:
        """At the end of the answer, text held back for a possible stop is sent."""
        m = StopMatcher(["xyz"])
        assert m.feed("abx") == "ab"
        assert m.flush() == "x"

    @pytest.mark.parametrize("cut", range(1, 12))
    def test_any_split_gives_the_same_text(self, cut: int) -> None:
        """However the text is split into pieces, the result is the same."""
        text = "hello world, goodbye"
        assert feed_all(StopMatcher(["ld, g"]), [text[:cut], text[cut:]]) == "hello wor"
