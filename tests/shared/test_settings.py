"""Settings refuse what is unsafe or invalid at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.settings import GatewaySettings
from shared.settings import ServiceSettings


class TestSettings:
    @pytest.mark.parametrize("site", ["Edge1", "a.b", "a*", "", "x" * 65])
    def test_site_ids_are_checked(self, site: str) -> None:
        """Site ids are also JetStream domains: only [a-z0-9_-] is accepted."""
        with pytest.raises(ValidationError):
            ServiceSettings(site=site)

    def test_production_needs_nats_credentials(self) -> None:
        """Outside development a service refuses to start without NATS credentials."""
        with pytest.raises(ValidationError, match="credentials"):
            ServiceSettings(env="production")

    def test_production_gateway_needs_api_keys(self) -> None:
        """Outside development the gateway refuses to start without API keys."""
        with pytest.raises(ValidationError, match="API keys"):
            GatewaySettings(env="production", nats_url="nats://u:p@127.0.0.1:4222")

    def test_metrics_behind_a_key_need_keys(self) -> None:
        """/metrics cannot be closed to callers without a key when no key exists."""
        with pytest.raises(ValidationError, match="LW_GATEWAY_METRICS_NEED_KEY needs API keys"):
            GatewaySettings(metrics_need_key=True)
        assert GatewaySettings(metrics_need_key=True, api_keys="k1:acme").metrics_need_key

    def test_key_table(self) -> None:
        """API keys are key:tenant pairs."""
        assert GatewaySettings(api_keys="k1:acme, k2:globex").key_table() == {"k1": "acme", "k2": "globex"}
