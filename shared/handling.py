"""What happens when a NATS handler fails: the caller gets an error event, the message is kept.

``ErrorReplies`` is a FastStream middleware. A ``LeafwireError`` (an expected refusal: unknown model,
queue full...) becomes an ``error`` event on the caller's reply subject. A message that cannot be
parsed or crashes its handler is also answered with an error, and is dead-lettered: re-published with
the failure in its headers to ``lw.v1.<site>.dlq.<service>``, kept by the ``DEAD_LETTERS`` stream; so is a
refused message that has nowhere to send its error (a chat request published without a reply subject), rather
than dropped in silence. No exception escapes to crash the service.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from faststream import BaseMiddleware
from faststream.message import StreamMessage
from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError
from pydantic import ValidationError
from pydantic_core import from_json

from shared import metrics, subjects
from shared.envelope import Envelope
from shared.errors import InvalidRequest, LeafwireError
from shared.logging import bind_request, get_logger
from shared.nats_headers import too_large
from shared.replies import publish_error

log = get_logger("leafwire.handling")

DLQ_SERVICE = "Lw-Dlq-Service"
DLQ_REASON = "Lw-Dlq-Reason"
DLQ_SUBJECT = "Lw-Dlq-Subject"


def invalid_request(exc: ValidationError) -> InvalidRequest:
    """A pydantic validation failure as a 400, naming the first offending parameter."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "body_")]
    param = ".".join(loc) or None
    where = f" at '{param}'" if param else ""
    return InvalidRequest(f"Invalid request{where}: {first.get('msg', 'invalid value')}", param=param)


def not_json(data: bytes) -> InvalidRequest | None:
    """The 400 for a body that is not JSON at all (said as such, on every subject), else ``None``."""
    try:
        from_json(data)
    except ValueError as exc:
        return InvalidRequest(f"Invalid JSON: {exc}")
    return None


async def dead_letter(nc: NATS, site: str, service: str, subject: str, data: bytes,
                      headers: dict[str, str] | None, reason: str) -> None:
    """Keep a message that could not be processed, with why, for an operator to look at."""
    h = dict(headers or {})
    h.update({DLQ_SERVICE: service, DLQ_REASON: reason[:500], DLQ_SUBJECT: subject})
    metrics.DEAD_LETTERS.labels(service, reason.split(":", 1)[0][:40]).inc()
    try:
        await nc.publish(subjects.dead_letter(site, service), data, headers=h)
    except Exception as exc:  # the DLQ is best effort: never let it take the service down
        log.error("dead letter lost", error=repr(exc), subject=subject)


def forwarded_envelope(msg: StreamMessage[Any]) -> Envelope:
    """The envelope of a request a router forwarded (it must name the caller's subject), bound to the logs."""
    env = Envelope.from_message(msg.headers, None)
    bind_request(env.request_id, env.tenant, str(getattr(msg.raw_message, "subject", "")))
    return env.require_reply()


async def answer_failure(nc: NATS, *, site: str, service: str, subject: str, data: bytes,
                         headers: Mapping[str, str] | None, reply: str | None, exc: Exception) -> None:
    """What a message whose handling failed gets (see the module doc): an ``error`` answer to whoever
    waits for one (the message's reply subject, else the caller's ``Lw-Reply``), and a dead letter when
    it was unreadable or crashed its handler."""
    env = Envelope.from_message(headers, reply, strict=False)
    dead: str | None = None
    if isinstance(exc, LeafwireError):
        err = exc
    elif isinstance(exc, MaxPayloadError):  # what it would have sent on is too big: no dead letter either
        err = too_large(exc, data, nc.max_payload)
    elif isinstance(exc, ValidationError):
        err = not_json(data) or invalid_request(exc)
        dead = f"invalid: {exc.errors()[0].get('msg', '') if exc.errors() else ''}"
    else:
        log.error("handler crashed", subject=subject, exc_info=exc)
        err = LeafwireError(f"internal error in {service}: {type(exc).__name__}")
        dead = f"crash: {exc!r}"
    metrics.REJECTED.labels(service, err.code or type(err).__name__).inc()
    log.info("request refused", status=err.status, code=err.code, message=err.message,
             request_id=env.request_id, tenant=env.tenant, subject=subject)
    answer_to = reply or env.reply
    if not answer_to and dead is None and isinstance(exc, LeafwireError):  # nobody to tell: kept, not lost
        dead = f"unanswered: no reply subject to send the error to ({err.code or err.status}: {err.message})"
    await publish_error(nc, answer_to, env, err)
    if dead is not None:
        await dead_letter(nc, site, service, subject, data, {k: str(v) for k, v in (headers or {}).items()}, dead)


class ErrorReplies(BaseMiddleware):
    """FastStream middleware: map handler failures to error events and dead letters (see module doc)."""

    site = ""
    service = ""

    @classmethod
    def for_service(cls, site: str, service: str) -> type[ErrorReplies]:
        """A middleware class bound to a site and service (FastStream builds one per message)."""
        return type(f"ErrorReplies_{subjects.token(service)}", (cls,), {"site": site, "service": service})

    async def consume_scope(self, call_next: Any, msg: StreamMessage[Any]) -> Any:
        try:
            return await call_next(msg)
        except Exception as exc:
            broker = self.context.get("broker")
            await answer_failure(broker.connection, site=self.site, service=self.service,
                                 subject=str(getattr(msg.raw_message, "subject", "")), data=msg.body,
                                 headers=msg.headers, reply=msg.reply_to or None, exc=exc)
        return None
