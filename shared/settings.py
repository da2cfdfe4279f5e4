"""Settings every service shares. Each service subclasses ``ServiceSettings`` in its own ``settings.py``,
the only place that reads the environment. Values are validated at start; unsafe defaults are refused
outside development.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import subjects


def default_home() -> Path:
    """Where leafwire keeps models and build environments by default."""
    return Path.home() / ".cache" / "leafwire"


class ServiceSettings(BaseSettings):
    """Settings common to every service (environment variables ``LW_*``)."""

    model_config = SettingsConfigDict(env_prefix="LW_", extra="ignore", frozen=True, populate_by_name=True)

    env: Literal["development", "production"] = "development"
    site: str = "edge1"
    nats_url: str = "nats://127.0.0.1:4222"
    nats_connect_timeout_s: float = Field(default=10.0, gt=0)
    nats_drain_timeout_s: float = Field(default=10.0, gt=0)
    nats_creds: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    ops_host: str = "127.0.0.1"
    ops_port: int = Field(default=0, ge=0, le=65535,
                          description="port of /healthz /readyz /metrics; 0 = any free port")
    home: Path = Field(default_factory=default_home)
    instance: str = ""
    keepalive_s: float = Field(default=5.0, gt=0,
                               description="while a service holds a request, it sends the caller a progress event "
                                           "this often and drops the request if the caller no longer waits")
    usage_hub_check_s: float = Field(default=30.0, ge=0,
                                     description="an edge's usage publishers check this often that the hub's USAGE "
                                                 "stream sources the site's (0: never; the hub's list is kept by hand)")

    @field_validator("site")
    @classmethod
    def _site(cls, value: str) -> str:
        return subjects.check_site(value)

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> ServiceSettings:
        if self.env == "production" and self.nats_creds is None and "@" not in self.nats_url:
            raise ValueError("production needs NATS credentials: set LW_NATS_CREDS or a user in LW_NATS_URL")
        return self

    @property
    def stop_within_s(self) -> float:
        """How long stopping may take (answers finishing, NATS draining) before the service exits anyway."""
        return self.nats_drain_timeout_s + 5

    @property
    def nats_servers(self) -> list[str]:
        """``nats_url`` split on commas (several seed servers)."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]
