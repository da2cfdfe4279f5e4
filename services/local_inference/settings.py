"""local-inference settings (environment variables ``LW_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from shared.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    """What a local-inference worker loads and how much it takes on."""

    models_file: Path = Field(default=Path("deploy/models.yaml"), alias="LW_MODELS_FILE")
    max_batch: int = Field(default=8, ge=1, le=64, alias="LW_INFERENCE_MAX_BATCH",
                           description="rows decoded together in one generator")
    max_inflight: int = Field(default=64, ge=1, alias="LW_INFERENCE_MAX_INFLIGHT",
                              description="requests admitted and not finished; more get 429")
    intra_op_threads: int = Field(default=1, ge=0, alias="LW_INFERENCE_THREADS",
                                  description="onnxruntime intra-op threads per decoder (0 = default)")
    heartbeat_s: float = Field(default=2.0, gt=0, alias="LW_INFERENCE_HEARTBEAT_S")
    serve_all_sites: bool | None = Field(
        default=None, alias="LW_INFERENCE_SERVE_ALL_SITES",
        description="also take work of every edge site that has no worker of its own (default: on the hub)")

    @property
    def serves_all_sites(self) -> bool:
        """Hub workers back up every site unless told otherwise."""
        return self.site == "hub" if self.serve_all_sites is None else self.serve_all_sites
