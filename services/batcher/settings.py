"""batcher settings (environment variables ``LW_*``)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import ServiceSettings


class BatcherSettings(ServiceSettings):
    """Batching defaults for models whose workers announce none, and how workers are watched.

    Per-model batching options live in the model registry; workers announce them in their heartbeats.
    """

    max_batch: int = Field(default=8, ge=1, le=4096, alias="LW_BATCHER_MAX_BATCH",
                           description="chat rows per batch when the worker does not say")
    max_wait_ms: float = Field(default=50.0, ge=0, le=10_000, alias="LW_BATCHER_MAX_WAIT_MS",
                               description="longest a chat request waits for company")
    max_queue: int = Field(default=64, ge=1, alias="LW_BATCHER_MAX_QUEUE",
                           description="requests waiting per model before 429")
    embeddings_max_batch: int = Field(default=64, ge=1, le=4096, alias="LW_BATCHER_EMBEDDINGS_MAX_BATCH")
    embeddings_max_wait_ms: float = Field(default=5.0, ge=0, le=10_000,
                                          alias="LW_BATCHER_EMBEDDINGS_MAX_WAIT_MS")
    offer_timeout_s: float = Field(default=5.0, gt=0, alias="LW_BATCHER_OFFER_TIMEOUT_S",
                                   description="how long a worker may take to accept or decline a batch")
    watch_interval_s: float = Field(default=0.25, gt=0, alias="LW_BATCHER_WATCH_INTERVAL_S",
                                    description="how often workers holding rows are asked what they still answer")
    worker_timeout_s: float = Field(default=10.0, gt=0, alias="LW_BATCHER_WORKER_TIMEOUT_S",
                                    description="a worker silent this long under its rows counts as gone")
    gone_after_s: float = Field(default=2.0, ge=0, alias="LW_BATCHER_GONE_AFTER_S",
                                description="a worker whose status subject has had no listener this long counts "
                                            "as gone (not at once: one reconnecting to NATS is briefly missing)")
    idle_poll_s: float = Field(default=0.5, gt=0, alias="LW_BATCHER_IDLE_POLL_S",
                               description="longest wait for an idle worker before looking again")
    sweep_interval_s: float = Field(default=0.1, gt=0, alias="LW_BATCHER_SWEEP_INTERVAL_S",
                                    description="how often waiting requests are checked against their deadline")
    roll_call_wait_s: float = Field(default=0.5, ge=0, alias="LW_BATCHER_ROLL_CALL_WAIT_S")
