"""Messages between the batcher and local-inference workers.

The batcher hands a worker a whole batch in one request (``lw.v1.<site>.workers.<id>.batch.<kind>``).
Each row carries its own envelope, since NATS headers belong to the message and a batch holds the rows
of many callers. The worker answers ``BatchAnswer`` (taken, or not: busy, stopping) and then publishes
every row's answer straight to that row's reply subject. While rows are out, the batcher asks the worker
``lw.v1.<site>.workers.<id>.status`` for the rows it still holds; no responders there means the worker is
gone, and its rows' callers get an error at once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from schemas.chat import ChatCompletionRequest
from schemas.embeddings import EmbeddingRequest


class RowEnvelope(BaseModel):
    """Who asked for one row of a batch, where its answer goes, and by when."""

    request_id: str
    tenant: str
    reply: str
    deadline: float = Field(description="unix seconds")
    route: str = ""
    queued_s: float = Field(default=0.0, description="seconds the row waited in the batcher")


class ChatRow(BaseModel):
    """One chat request of a batch."""

    envelope: RowEnvelope
    request: ChatCompletionRequest


class EmbeddingsRow(BaseModel):
    """One embeddings request of a batch (it may hold many inputs)."""

    envelope: RowEnvelope
    request: EmbeddingRequest


class ChatBatch(BaseModel):
    """Chat rows for one model, to be decoded together in one static batch."""

    model: str
    rows: list[ChatRow] = Field(min_length=1)


class EmbeddingsBatch(BaseModel):
    """Embeddings requests for one model, to be encoded together."""

    model: str
    rows: list[EmbeddingsRow] = Field(min_length=1)


class BatchAnswer(BaseModel):
    """A worker's answer to a batch: taken (it answers each taken row on the row's reply subject; rows it
    refused got their error there already), or not taken and why (``busy``: another batch of the model
    is running; ``stopping``: the worker is shutting down)."""

    worker_id: str
    site: str
    taken: bool = True
    reason: Literal["", "busy", "stopping"] = ""
    request_ids: list[str] = Field(default_factory=list)
    batches: int = Field(default=0, description="batches of the model taken so far, this one included")


class WorkerStatus(BaseModel):
    """The requests a worker is still answering (reply of ``lw.v1.<site>.workers.<id>.status``)."""

    worker_id: str
    request_ids: list[str]
