"""Control messages between services: admission, cancellation, worker announcements, the model list."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

REQUEST_ID_MAX = 128  # characters of a request id that are kept (Lw-Request-Id): longer ones are cut


class Admitted(BaseModel):
    """A worker's reply to a forwarded request: it took the work and will answer on the caller's subject."""

    worker_id: str
    request_id: str


class Cancel(BaseModel):
    """Stop generating for a request (the caller went away or asked to stop)."""

    request_id: str
    reason: str = "cancelled by client"
    target: str | None = Field(default=None, description="the model whose answer is given up (a router falling "
                               "back to its next target, same request id); absent: every answer of the request")

    @field_validator("request_id")
    @classmethod
    def _as_kept(cls, value: str) -> str:
        """Cut as the request's own id was (``Lw-Request-Id``): a cancel by the id the client sent finds it."""
        return value[:REQUEST_ID_MAX]


ModelKind = Literal["chat", "embeddings"]


class BatchingOptions(BaseModel):
    """How the batcher groups a model's requests: rows (chat) or inputs (embeddings) per batch, the
    longest a request waits for company, and the bound of the model's queue."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_batch: int = Field(default=8, ge=1, le=4096)
    max_wait_ms: float = Field(default=50.0, ge=0, le=10_000)
    max_queue: int = Field(default=64, ge=1, le=100_000)


class ModelInfo(BaseModel):
    """A model a worker serves."""

    name: str
    context_length: int | None = Field(default=None, description="unknown for some cloud models")
    kind: ModelKind = "chat"
    created: int = Field(default=0, description="unix time the model was made available: a local model's files "
                                                "built, a cloud model's providers file written (0: unknown)")
    dimensions: int | None = Field(default=None, description="vector size of an embeddings model")
    batching: BatchingOptions | None = None
    idle: bool = Field(default=True, description="no request of this model is being answered by the worker")
    batches: int = Field(default=0, description="batches of this model the worker has taken so far; tells a "
                                                "batcher whether this heartbeat was sent after its last batch")


class WorkerHeartbeat(BaseModel):
    """A worker's announcement of itself, sent every ``interval_s`` seconds and on roll call."""

    worker_id: str
    service: str
    site: str
    models: list[ModelInfo]
    inflight: int = 0
    capacity: int = 1
    interval_s: float = 2.0
    sent_at: float = Field(default_factory=time.time)
    serves_all_sites: bool = Field(default=False, description="a hub worker that backs up every site")
    leaving: bool = Field(default=False, description="shutting down: finishing its answers, taking no new work")
    cloud_models: list[str] | None = Field(default=None, description="a cloud-adapter's: every <provider>/<model> "
                                           "chat model it is configured for, its providers' keys set or not")
    cloud_embeddings: list[str] | None = Field(default=None, description="a cloud-adapter's: every "
                                               "<provider>/<model> embeddings model it is configured for, its "
                                               "providers' keys set or not")
    uplink_free: list[str] = Field(default_factory=list, description="a cloud-adapter's: those of its cloud "
                                   "models whose provider is `local: true` (on a private network, e.g. a vLLM on "
                                   "the plant's LAN): its routers try them with the uplink down")


class ModelLocation(BaseModel):
    """Where a model runs: a site id or ``hub``, and how many workers serve it there."""

    site: str
    workers: int


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models`` (OpenAI's fields plus where the model runs)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default=0, description="unix time: a local model's files built, a cloud model's providers "
                                                "file written, a routed name's policy applied by this router")
    owned_by: str = "leafwire"
    context_length: int | None = None
    kind: ModelKind = "chat"
    locations: list[ModelLocation] = Field(default_factory=list)
    routed: bool = Field(default=False, description="a name the router resolves per request (an alias of the "
                                                    "routing policy, or auto), not a model of its own")


class ModelList(BaseModel):
    """``GET /v1/models``; also the reply of ``lw.v1.<site>.models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class RouteDecision(BaseModel):
    """Where the router sent a request and why; travels as the ``Lw-Route`` header and the HTTP
    ``x-leafwire-route`` header as ``target=...; rule=...; reason=...``."""

    target: str
    rule: str = "default"
    reason: str = ""
    variant: str | None = None

    def header(self) -> str:
        """The compact header form (``;``-separated ``key=value``, no ``;`` inside values)."""
        parts = [f"target={self.target}", f"rule={self.rule}"]
        if self.variant:
            parts.append(f"variant={self.variant}")
        if self.reason:
            parts.append(f"reason={self.reason}")
        return "; ".join(p.replace("\n", " ") for p in parts)

    @classmethod
    def parse(cls, header: str) -> RouteDecision:
        """Read the header form back."""
        fields = dict(p.strip().split("=", 1) for p in header.split(";") if "=" in p)
        return cls.model_validate(fields)


class SkippedTarget(BaseModel):
    """A target the decision left out, and why."""

    target: str
    reason: str


class DryRun(BaseModel):
    """What the router would do with a request (``POST /v1/route/dry-run``, ``lw.v1.<site>.route.dry_run``)."""

    decision: RouteDecision
    requested: str | None
    chain: list[str]
    skipped: list[SkippedTarget]
    prompt_tokens: int
    complexity: float
    masked_for_cloud: dict[str, int] = Field(description="what masking replaces if the request leaves the site")
    policy_source: str
