"""The batcher's side of NATS: offer batches to workers, ask them for status, answer callers."""

from __future__ import annotations

import time
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from schemas.batch import BatchAnswer, ChatBatch, ChatRow, EmbeddingsBatch, EmbeddingsRow, WorkerStatus
from schemas.chat import ChatCompletionRequest
from schemas.control import Cancel, ModelKind
from schemas.embeddings import EmbeddingRequest
from services.batcher.pool import WorkerRef
from services.batcher.queue import Row
from services.batcher.scheduler import Declined, Failed, Offer, Taken
from services.batcher.settings import BatcherSettings
from shared import envelope as hdr
from shared import subjects
from shared.errors import LeafwireError, Unavailable
from shared.nats_headers import too_large
from shared.replies import Event, Presence, error_of, ping, publish_error


def batch_body(kind: ModelKind, model: str, rows: list[Row]) -> bytes:
    """The batch message: every row with its own envelope and how long it waited here."""
    now = time.monotonic()
    if kind == "chat":
        chat = [ChatRow(envelope=r.env.row(now - r.arrived), request=r.request) for r in rows
                if isinstance(r.request, ChatCompletionRequest)]
        return ChatBatch(model=model, rows=chat).model_dump_json(exclude_unset=True).encode()
    embed = [EmbeddingsRow(envelope=r.env.row(now - r.arrived), request=r.request) for r in rows
             if isinstance(r.request, EmbeddingRequest)]
    return EmbeddingsBatch(model=model, rows=embed).model_dump_json().encode()


@dataclass
class NatsTransport:
    """``Transport`` over a nats-py connection."""

    settings: BatcherSettings
    connection: NATS | None = None

    @property
    def nc(self) -> NATS:
        """The connection (set once the broker has started)."""
        assert self.connection is not None, "the batcher's NATS connection is not up yet"
        return self.connection

    @property
    def max_payload(self) -> int:
        """The most bytes one message may carry on this connection."""
        return self.nc.max_payload

    async def offer(self, worker: WorkerRef, kind: ModelKind, model: str, rows: list[Row]) -> Offer:
        """Hand a batch to one worker and read its answer."""
        subject = subjects.worker_batch(worker.site, worker.worker_id, kind)
        body = batch_body(kind, model, rows)
        try:
            msg = await self.nc.request(subject, body, timeout=self.settings.offer_timeout_s)
        except NoRespondersError:
            return Declined("gone")
        except MaxPayloadError as exc:  # the scheduler cuts batches to fit: only a row too big by itself
            return Failed(too_large(exc, body, self.nc.max_payload))
        except (NatsTimeout, TimeoutError):
            return Failed(Unavailable(f"worker {worker.worker_id} did not take the request within "
                                      f"{self.settings.offer_timeout_s:g} s", retry_after=1))
        headers = msg.headers or {}
        if headers.get(hdr.EVENT) == Event.ERROR.value:
            err = error_of(headers, msg.data)
            # 503: the worker cannot serve the model right now (loading, restarting its decoder): ask another
            return Declined("gone") if err.status == 503 else Failed(err)
        answer = BatchAnswer.model_validate_json(msg.data)
        if answer.taken:
            return Taken(frozenset(answer.request_ids), answer.batches)
        return Declined(answer.reason or "busy", answer.batches)

    async def status(self, worker: WorkerRef) -> set[str] | None:
        """The requests the worker still answers; None when nobody answers on its subject."""
        try:
            msg = await self.nc.request(subjects.worker_status(worker.site, worker.worker_id), b"",
                                        timeout=min(1.0, self.settings.worker_timeout_s))
        except NoRespondersError:
            return None
        except NatsTimeout as exc:
            raise TimeoutError from exc
        return set(WorkerStatus.model_validate_json(msg.data).request_ids)

    async def error(self, row: Row, err: LeafwireError) -> None:
        """Send ``err`` to the row's caller."""
        await publish_error(self.nc, row.env.reply, row.env, err)

    async def cancel(self, request_id: str) -> None:
        """Broadcast a cancel on the site (workers listen)."""
        await self.nc.publish(subjects.cancel(self.settings.site),
                              Cancel(request_id=request_id, reason="cancelled while being handed over")
                              .model_dump_json().encode())

    async def ping(self, row: Row) -> Presence:
        """A progress event to the row's caller; whether it still waits."""
        return await ping(self.nc, row.env.reply)
