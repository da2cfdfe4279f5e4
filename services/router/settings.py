"""router settings (environment variables ``LW_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from shared import subjects
from shared.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    """How long the router waits for a worker to take a request, and how many it handles at once."""

    admission_timeout_s: float = Field(default=5.0, gt=0, alias="LW_ROUTER_ADMISSION_TIMEOUT_S")
    cloud_admission_timeout_s: float = Field(
        default=75.0, gt=0, alias="LW_ROUTER_CLOUD_ADMISSION_TIMEOUT_S",
        description="wait for a cloud-adapter's admission (it admits at the provider's first byte, after "
                    "retries) when the route has a fallback (a lone cloud model is handed off, not waited "
                    "for); keep it above the providers' total_s (the adapter keeps the caller waiting meanwhile)")
    max_concurrency: int = Field(default=256, ge=1, alias="LW_ROUTER_MAX_CONCURRENCY",
                                 description="chat requests routed at once; as many more may wait for a slot")
    slot_wait_s: float = Field(default=2.0, gt=0, alias="LW_ROUTER_SLOT_WAIT_S",
                               description="longest a chat request waits for a slot before a 429 with Retry-After")
    roll_call_wait_s: float = Field(default=0.5, ge=0, alias="LW_ROUTER_ROLL_CALL_WAIT_S")
    policy_file: Path = Field(default=Path("deploy/policy.yaml"), alias="LW_ROUTER_POLICY_FILE")
    uplink: Literal["auto", "up", "down"] = Field(
        default="auto", alias="LW_ROUTER_UPLINK",
        description="auto: up while the hub's JetStream answers; up/down: fixed (a site without a hub: up)")
    uplink_probe_s: float = Field(default=2.0, gt=0, alias="LW_ROUTER_UPLINK_PROBE_S")
    config_hub_check_s: float = Field(
        default=10.0, gt=0, alias="LW_ROUTER_CONFIG_HUB_CHECK_S",
        description="edge: how often to ask the hub whether its config bucket, or the provider-health and budgets "
                    "buckets the router mirrors, were created anew (the mirror is then made anew); at once while "
                    "the config mirror hears nothing from the hub")
    config_check_s: float = Field(
        default=1.0, gt=0, alias="LW_ROUTER_CONFIG_CHECK_S",
        description="edge: how often to check that the config mirror (and the provider-health and budgets mirrors) "
                    "hears from the hub (while the config mirror does not, the "
                    "policy keys are read from the hub directly) and still copies the hub's bucket (one stuck for "
                    "5 s, or copying a hub bucket created anew, is made anew), and how often the bucket's watch "
                    "looks up a mirror that brought no update (to follow one made anew)")

    @property
    def probes_uplink(self) -> bool:
        """Whether the uplink's state is probed (``auto`` at an edge): only then can it go down under a wait."""
        return self.uplink == "auto" and self.site != subjects.HUB
