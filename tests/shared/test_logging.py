"""Logging processors."""

from __future__ import annotations

from shared.logging import REDACTED, redact_secrets


class TestRedaction:
    def test_secrets_are_redacted(self) -> None:
        """Keys that hold secrets never reach the log, at the top level or one level down."""
        event = redact_secrets(None, "info", {"event": "call", "api_key": "sk-123",
                                              "headers": {"Authorization": "Bearer sk-123", "accept": "json"}})
        assert event["api_key"] == REDACTED
        assert event["headers"] == {"Authorization": REDACTED, "accept": "json"}
        assert event["event"] == "call"
