"""What happens when a NATS handler fails: the caller gets an error event, the message is kept.

``ErrorReplies`` is a FastStream middleware. A ``LeafwireError`` (an expected refusal: unknown model,
queue full...) becomes an ``error`` event on the caller's reply subject. A message that cannot be
parsed or crashes its handler is also answered with an error, and is dead-lettered: re-published with
the failure in its headers to ``lw.v1.<site>.dlq.<service>``, kept by the ``DEAD_LETTERS`` stream. No
exception escapes to crash the service.
"""

from __future__ import annotations

from typing import Any

from faststream import BaseMiddleware
from faststream.message import StreamMessage
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from shared import metrics, subjects
from shared.envelope import Envelope
from shared.errors import InvalidRequest, LeafwireError
from shared.logging import get_logger
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
        except LeafwireError as err:
            await self._reply(msg, err)
        except ValidationError as exc:
            await self._reply(msg, invalid_request(exc))
            await self._dead_letter(msg, f"invalid: {exc.errors()[0].get('msg', '') if exc.errors() else ''}")
        except Exception as exc:
            log.exception("handler crashed", subject=self._subject(msg))
            await self._reply(msg, LeafwireError(f"internal error in {self.service}: {type(exc).__name__}"))
            await self._dead_letter(msg, f"crash: {exc!r}")
        return None

    def _nc(self) -> NATS:
        broker = self.context.get("broker")
        return broker.connection  # type: ignore[no-any-return]

    @staticmethod
    def _subject(msg: StreamMessage[Any]) -> str:
        return str(getattr(msg.raw_message, "subject", ""))

    async def _reply(self, msg: StreamMessage[Any], err: LeafwireError) -> None:
        """Answer the immediate requester (a caller, or a router waiting for admission)."""
        env = Envelope.from_message(msg.headers, msg.reply_to)
        metrics.REJECTED.labels(self.service, err.code or type(err).__name__).inc()
        log.info("request refused", status=err.status, code=err.code, message=err.message,
                 request_id=env.request_id, tenant=env.tenant, subject=self._subject(msg))
        await publish_error(self._nc(), msg.reply_to, env, err)

    async def _dead_letter(self, msg: StreamMessage[Any], reason: str) -> None:
        headers = {k: str(v) for k, v in (msg.headers or {}).items()}
        await dead_letter(self._nc(), self.site, self.service, self._subject(msg), msg.body, headers, reason)
