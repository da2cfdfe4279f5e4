"""Errors and their OpenAI shape."""

from __future__ import annotations

from shared.errors import ContextLengthExceeded, ModelNotFound, Overloaded, RemoteError
from shared.replies import error_of


class TestErrors:
    def test_openai_shape(self) -> None:
        """Errors serialise to OpenAI's {"error": {message, type, param, code}}."""
        body = ModelNotFound("m").to_response().model_dump()
        assert body == {"error": {"message": "The model 'm' does not exist or is not served here.",
                                  "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}

    def test_context_length_message_states_both_numbers(self) -> None:
        """The context error gives the limit and what was asked, split into messages and completion."""
        err = ContextLengthExceeded(model="m", context_length=2048, prompt_tokens=2000, max_tokens=100)
        assert "2048" in err.message
        assert "2100 tokens (2000 in the messages, 100 in the completion)" in err.message

    def test_error_event_round_trip(self) -> None:
        """An error sent over NATS comes back with its status, code and retry hint."""
        sent = Overloaded("busy", retry_after=3)
        got = error_of({"Lw-Status": "429", "Lw-Retry-After": "3"}, sent.to_response().model_dump_json().encode())
        assert isinstance(got, RemoteError)
        assert (got.status, got.code, got.retry_after, got.message) == (429, "overloaded", 3.0, "busy")

    def test_malformed_error_event(self) -> None:
        """An error event that is not an error object becomes a 502, not a crash."""
        assert error_of({"Lw-Status": "400"}, b"nonsense").status == 502
