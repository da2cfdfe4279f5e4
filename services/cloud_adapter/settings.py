"""cloud-adapter settings (environment variables ``LW_*``). Providers and budgets are in the providers file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.cloud_adapter.breaker import BreakerPolicy
from services.cloud_adapter.retry import RetryPolicy
from shared.settings import ServiceSettings


class CloudSettings(ServiceSettings):
    """Where the providers file is, how calls are retried, how the breaker, cache and ledger behave."""

    providers_file: Path = Field(default=Path("deploy/providers.yaml"), alias="LW_PROVIDERS_FILE",
                                 description="providers, models, keys, prices and budgets (absent: none)")
    providers_check_s: float = Field(default=5.0, ge=0, alias="LW_CLOUD_PROVIDERS_CHECK_S",
                                     description="how often the providers file and its key files are checked for a "
                                                 "change, read again when changed (0: only on SIGHUP)")
    serve_all_sites: bool | None = Field(
        default=None, alias="LW_CLOUD_SERVE_ALL_SITES",
        description="also take cloud work of every edge site without an adapter (default: on the hub)")
    max_attempts: int = Field(default=3, ge=1, le=10, alias="LW_CLOUD_MAX_ATTEMPTS",
                              description="tries of one call before the first byte (1 = no retry)")
    backoff_base_s: float = Field(default=0.5, gt=0, alias="LW_CLOUD_BACKOFF_BASE_S")
    backoff_cap_s: float = Field(default=8.0, gt=0, alias="LW_CLOUD_BACKOFF_CAP_S")
    max_retry_wait_s: float = Field(default=20.0, ge=0, alias="LW_CLOUD_MAX_RETRY_WAIT_S",
                                    description="a provider asking to wait longer (Retry-After) fails the call "
                                                "at once with its hint, so the router can go elsewhere")
    breaker_failures: int = Field(default=5, ge=1, alias="LW_CLOUD_BREAKER_FAILURES",
                                  description="consecutive failures that open a provider's breaker")
    breaker_error_rate: float = Field(default=0.5, gt=0, le=1, alias="LW_CLOUD_BREAKER_ERROR_RATE")
    breaker_min_calls: int = Field(default=20, ge=1, alias="LW_CLOUD_BREAKER_MIN_CALLS",
                                   description="calls in the window before the error rate can open it")
    breaker_window_s: int = Field(default=60, ge=1, le=3600, alias="LW_CLOUD_BREAKER_WINDOW_S")
    breaker_open_s: float = Field(default=30.0, gt=0, alias="LW_CLOUD_BREAKER_OPEN_S",
                                  description="how long an open breaker refuses calls before probing")
    breaker_probes: int = Field(default=1, ge=1, alias="LW_CLOUD_BREAKER_PROBES",
                                description="calls let through at once while half open")
    cache_ttl_s: float = Field(default=3600.0, gt=0, alias="LW_CLOUD_CACHE_TTL_S")
    cache_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024, alias="LW_CLOUD_CACHE_MAX_BYTES")
    cache_max_entry_bytes: int = Field(default=512 * 1024, ge=1024, alias="LW_CLOUD_CACHE_MAX_ENTRY_BYTES")
    near_cache_bytes: int = Field(default=32 * 1024 * 1024, ge=0, alias="LW_CLOUD_NEAR_CACHE_BYTES",
                                  description="recently used cache entries kept in memory (0: always ask KV)")
    near_cache_ttl_s: float = Field(default=30.0, gt=0, alias="LW_CLOUD_NEAR_CACHE_TTL_S",
                                    description="longest a copy in memory is served (also after a KV purge)")
    kv_replicas: int = Field(default=1, ge=1, le=5, alias="LW_CLOUD_KV_REPLICAS",
                             description="replicas of the adapter's KV buckets and stream (3 on the hub)")
    budget_flush_s: float = Field(default=1.0, gt=0, alias="LW_CLOUD_BUDGET_FLUSH_S",
                                  description="how often spending is added to the budgets KV bucket")
    health_interval_s: float = Field(default=10.0, gt=0, alias="LW_CLOUD_HEALTH_INTERVAL_S",
                                     description="how often provider health is re-published even unchanged")
    state_check_s: float = Field(default=10.0, gt=0, alias="LW_CLOUD_STATE_CHECK_S",
                                 description="how often the buckets and the USAGE stream are checked to still "
                                             "exist (created again when deleted)")
    rate_sync_s: float = Field(default=1.0, gt=0, le=30, alias="LW_CLOUD_RATE_SYNC_S",
                               description="how often this adapter's last minute of calls and tokens of a provider "
                                           "with rpm or tpm is written for the site's other adapters (while it "
                                           "changes); what the others began since is not seen yet")
    heartbeat_s: float = Field(default=2.0, gt=0, alias="LW_CLOUD_HEARTBEAT_S")
    max_response_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, alias="LW_CLOUD_MAX_RESPONSE_BYTES",
                                    description="largest provider answer (or stream event) read")
    n_recheck_s: float = Field(default=3600.0, ge=0, alias="LW_CLOUD_N_RECHECK_S",
                               description="how long a model whose server was found to have no n (one choice "
                                           "answered, or n refused) has its choices asked a call each before "
                                           "n is tried again")
    usage_pending_max: int = Field(default=10_000, ge=1, alias="LW_CLOUD_USAGE_PENDING_MAX",
                                   description="usage events awaiting a JetStream ack; more are dropped")

    @property
    def serves_all_sites(self) -> bool:
        """Hub adapters back up every site unless told otherwise."""
        return self.site == "hub" if self.serve_all_sites is None else self.serve_all_sites

    def retry_policy(self) -> RetryPolicy:
        """How failed provider calls are retried."""
        return RetryPolicy(max_attempts=self.max_attempts, base_s=self.backoff_base_s, cap_s=self.backoff_cap_s,
                           max_wait_s=self.max_retry_wait_s)

    def breaker_policy(self) -> BreakerPolicy:
        """When a provider's breaker opens and how it recovers."""
        return BreakerPolicy(failures=self.breaker_failures, error_rate=self.breaker_error_rate,
                             min_calls=self.breaker_min_calls, window_s=self.breaker_window_s,
                             open_s=self.breaker_open_s, probes=self.breaker_probes)
