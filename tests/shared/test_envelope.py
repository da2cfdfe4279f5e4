"""The request envelope carried in headers."""

from __future__ import annotations

import time

import pytest

from shared.envelope import DEFAULT_TENANT, Envelope, money
from shared.errors import InvalidRequest


class TestEnvelope:
    def test_round_trip(self) -> None:
        """An envelope written to headers reads back the same."""
        env = Envelope("rid", "acme", "_INBOX.x", 1_763_760_000.5, route="target=local/x")
        assert Envelope.from_message(env.headers(), None) == env
        sample = Envelope("rid", "acme", "_INBOX.x", 1_763_760_000.5, choice=2)
        assert sample.headers()["Lw-Choice"] == "2"
        assert Envelope.from_message(sample.headers(), None) == sample
        assert Envelope.from_message(sample.headers(), None).with_route("target=cloud/p/m").choice == 2
        assert "Lw-Choice" not in env.headers()

    @pytest.mark.parametrize("choice", ["-1", "two", "1.5", "", "1000001", "\u0663"])
    def test_a_choice_that_is_no_whole_number_is_refused(self, choice: str) -> None:
        """Lw-Choice (which sample of a request) must be 0 to a million: otherwise a 400 naming the header;
        answering that message (strict=False) reads it as the first sample."""
        with pytest.raises(InvalidRequest, match="the Lw-Choice header must be a whole number") as refused:
            Envelope.from_message({"Lw-Choice": choice}, "r")
        assert refused.value.param == "Lw-Choice"
        assert Envelope.from_message({"Lw-Choice": choice}, "r", strict=False).choice == 0

    def test_reply_header_wins_over_message_reply(self) -> None:
        """On internal hops the caller's subject is in Lw-Reply, not the message's reply."""
        env = Envelope.from_message({"Lw-Reply": "caller"}, "router-inbox")
        assert env.reply == "caller"

    def test_defaults_for_a_bare_nats_request(self) -> None:
        """A NATS client sending no headers gets a request id, the default tenant and a deadline."""
        env = Envelope.from_message(None, "_INBOX.c")
        assert len(env.request_id) == 32
        assert env.tenant == DEFAULT_TENANT
        assert env.reply == "_INBOX.c"
        assert 290 < env.remaining() <= 300

    @pytest.mark.parametrize("deadline", ["soon", "inf", "nan", "30", ""])
    def test_a_deadline_that_is_no_unix_time_is_refused(self, deadline: str) -> None:
        """Not a number, not finite, or a duration (30) where a unix time belongs: a 400 naming the header;
        answering that message (strict=False) falls back to the default deadline."""
        with pytest.raises(InvalidRequest, match="the Lw-Deadline header must be a unix time") as refused:
            Envelope.from_message({"Lw-Deadline": deadline}, "r")
        assert refused.value.param == "Lw-Deadline"
        assert not Envelope.from_message({"Lw-Deadline": deadline}, "r", strict=False).expired()

    def test_expired(self) -> None:
        """A deadline in the past is expired."""
        assert Envelope("r", "t", "x", time.time() - 1).expired()

    def test_variant_from_the_route(self) -> None:
        """The A/B variant is read from the router's decision; no variant, no value."""
        assert Envelope("r", "t", "x", 1.0, route="target=local/m; rule=ab; variant=blue; reason=x").variant == "blue"
        assert Envelope("r", "t", "x", 1.0, route="target=local/m; rule=default").variant is None
        assert Envelope("r", "t", "x", 1.0).variant is None


@pytest.mark.parametrize(("usd", "said"), [(0.0, "0"), (0.000015, "0.000015"), (1.5, "1.5"), (12.0, "12"),
                                           (0.0000000004, "0"), (2.5e-05 + 1e-05, "0.000035")])
def test_money_is_decimal_dollars_to_a_billionth(usd: float, said: str) -> None:
    assert money(usd) == said
