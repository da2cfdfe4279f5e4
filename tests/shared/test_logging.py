"""Logging processors."""

from __future__ import annotations

from shared.logging import REDACTED, redact_secrets, register_secret, scrub, scrub_secret_values


class TestRedaction:
    def test_secrets_are_redacted(self) -> None:
        """Keys that hold secrets never reach the log, at the top level or one level down."""
        event = redact_secrets(None, "info", {"event": "call", "api_key": "sk-123",
                                              "headers": {"Authorization": "Bearer sk-123", "accept": "json"}})
        assert event["api_key"] == REDACTED
        assert event["headers"] == {"Authorization": REDACTED, "accept": "json"}
        assert event["event"] == "call"

    def test_registered_secret_values_are_scrubbed_everywhere(self) -> None:
        """A registered key is replaced wherever it appears: messages, nested values, exception text."""
        register_secret("sk-very-secret-0042")
        event = scrub_secret_values(None, "info", {
            "event": "call failed: Incorrect API key provided: sk-very-secret-0042.",
            "detail": {"headers": ["Bearer sk-very-secret-0042"]},
            "exception": "Traceback...\nValueError: sk-very-secret-0042",
        })
        assert "sk-very-secret-0042" not in str(event)
        assert event["event"] == f"call failed: Incorrect API key provided: {REDACTED}."

    def test_short_values_are_not_registered(self) -> None:
        """Values too short to be keys are not scrubbed (they would mangle ordinary words)."""
        register_secret("abc")
        assert scrub("abc def") == "abc def"

    def test_a_short_key_is_scrubbed_as_a_whole_token(self) -> None:
        """A local server's short key (4 to 7 characters) is replaced where it stands alone, quoted or after
        "Bearer", and left alone inside a longer word or key, which replacing would mangle."""
        register_secret("vllm7k")
        assert scrub('Invalid key "vllm7k" (Bearer vllm7k).') == f'Invalid key "{REDACTED}" (Bearer {REDACTED}).'
        assert scrub("vllm7k") == REDACTED
        assert scrub("vllm7kx xvllm7k sk-vllm7k vllm7k_2") == "vllm7kx xvllm7k sk-vllm7k vllm7k_2"
