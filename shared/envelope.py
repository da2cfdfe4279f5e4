"""The request context that travels with every hop in NATS headers.

Each hop forwards the caller's reply subject, the request id, the tenant and the deadline, so the worker
that produces the answer publishes it straight to the caller; replies never travel back through the chain.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from schemas.batch import RowEnvelope
from schemas.control import REQUEST_ID_MAX
from shared.errors import InvalidRequest
from shared.numbers import finite

REQUEST_ID = "Lw-Request-Id"
TENANT = "Lw-Tenant"
DEADLINE = "Lw-Deadline"
REPLY = "Lw-Reply"
ROUTE = "Lw-Route"
SERVED_BY = "Lw-Served-By"
RESIDENCY = "Lw-Residency"  # "onsite": the request must not leave the site
EVENT = "Lw-Event"
STATUS = "Lw-Status"
RETRY_AFTER = "Lw-Retry-After"
SEQ = "Lw-Seq"  # on each event of an answer after the first: its number (the first is 0), so a gap shows
CACHE = "Lw-Cache"  # on the first message of an answer: "hit" (from the cache) or "miss" (looked up, absent)
# on a whole answer (a ``result``) a cloud-adapter made: what it cost, US dollars (``money``; "0": from the cache)
COST = "Lw-Cost"
# "1": the sender waits for no admission; every answer, a refusal too, goes to Lw-Reply (the message's own
# reply subject only catches NATS's no-responders status)
HANDOFF = "Lw-Handoff"
# which of several samples of one request this is (choice ``j`` of ``n``; absent for the first): it keeps the
# samples' cache entries apart, so a cached request of ``n`` choices does not answer each with the same one
CHOICE = "Lw-Choice"
# targets of the request's route to pass over (comma-separated): they refused this request already, as the
# choices of a request of n asked one by one after a fallback (``ChoicesOneByOne.failed``); never all of a route
SKIP = "Lw-Skip"
# "1" on an error event: retrying the request cannot mend it soon (``LeafwireError.final``)
FINAL = "Lw-Final"

DEFAULT_TENANT = "default"
DEFAULT_TIMEOUT_S = 300.0
_MAX_ID_LEN = REQUEST_ID_MAX
MAX_CHOICE = 1_000_000
_EARLIEST = 1_000_000_000.0  # 2001-09-09: a smaller deadline is a duration by mistake, not a unix time


def admission_subject(headers: Mapping[str, str] | None, reply: str | None) -> str | None:
    """Where the sender of a forwarded request waits for its admission (or refusal): the message's reply
    subject, unless the request was handed off (``Lw-Handoff``) — then nobody waits and every answer goes
    to the caller (``Lw-Reply``)."""
    if headers and HANDOFF in headers:
        return None
    return reply or None


def new_request_id() -> str:
    """A fresh request id, also used as the OpenAI completion id suffix."""
    return os.urandom(16).hex()  # as random as uuid4, without building a UUID


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who asked, where the answer goes, and by when."""

    request_id: str
    tenant: str
    reply: str
    deadline: float
    route: str = ""
    choice: int = 0

    @classmethod
    def from_message(cls, headers: Mapping[str, str] | None, reply_to: str | None, *,
                     strict: bool = True) -> Envelope:
        """Read the envelope of a received message; a missing request id or deadline gets a default.

        A deadline that is not a unix time (``soon``, ``inf``) is refused (``InvalidRequest``) unless
        ``strict`` is false (answering such a message: it then gets the default). ``Lw-Reply`` wins over the
        message's own reply subject: on internal hops the message's reply subject belongs to the forwarding
        service (for the admission answer), not to the caller.
        """
        h = headers or {}
        request_id = h.get(REQUEST_ID, "")[:_MAX_ID_LEN] or new_request_id()
        raw = h.get(DEADLINE)
        deadline = _unix_time(raw) if raw is not None else None
        if deadline is None:
            if raw is not None and strict:
                early = " (a time before 2001: a duration by mistake?)" if finite(raw) is not None else ""
                raise InvalidRequest(f"the {DEADLINE} header must be a unix time in seconds (the moment the answer "
                                     f"is due, like {time.time() + 30:.0f}), not {raw[:40]!r}{early}", param=DEADLINE)
            deadline = time.time() + DEFAULT_TIMEOUT_S
        return cls(
            request_id=request_id,
            tenant=h.get(TENANT, "")[:_MAX_ID_LEN] or DEFAULT_TENANT,
            reply=h.get(REPLY) or reply_to or "",
            deadline=deadline,
            route=h.get(ROUTE, ""),
            choice=_choice(h[CHOICE], strict) if CHOICE in h else 0,
        )

    @classmethod
    def from_row(cls, row: RowEnvelope) -> Envelope:
        """The envelope of one row of a batch."""
        return cls(request_id=row.request_id, tenant=row.tenant, reply=row.reply, deadline=row.deadline,
                   route=row.route)

    def row(self, queued_s: float = 0.0) -> RowEnvelope:
        """This envelope as it travels inside a batch."""
        return RowEnvelope(request_id=self.request_id, tenant=self.tenant, reply=self.reply,
                           deadline=self.deadline, route=self.route, queued_s=queued_s)

    def headers(self) -> dict[str, str]:
        """Headers that carry this envelope to the next hop."""
        h = {
            REQUEST_ID: self.request_id,
            TENANT: self.tenant,
            DEADLINE: f"{self.deadline:.3f}",
            REPLY: self.reply,
        }
        if self.route:
            h[ROUTE] = self.route
        if self.choice:
            h[CHOICE] = str(self.choice)
        return h

    @property
    def variant(self) -> str | None:
        """The A/B variant the router picked, read from the route decision (``variant=...``)."""
        for part in self.route.split(";"):
            key, _, value = part.strip().partition("=")
            if key == "variant" and value:
                return value
        return None

    def require_reply(self) -> Envelope:
        """This envelope, if it names the caller's subject (``Lw-Reply``), as a forwarded request must."""
        if not self.reply:
            raise InvalidRequest("no Lw-Reply header: nowhere to send the answer")
        return self

    def remaining(self) -> float:
        """Seconds left before the deadline (negative once passed)."""
        return self.deadline - time.time()

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.remaining() <= 0

    def with_route(self, route: str) -> Envelope:
        """A copy carrying the router's decision (built directly: ``dataclasses.replace`` costs ~5× more, once
        a request)."""
        return Envelope(self.request_id, self.tenant, self.reply, self.deadline, route, self.choice)


def _choice(text: str, strict: bool) -> int:
    """The ``Lw-Choice`` header's number; a malformed one is refused (``InvalidRequest``), or read as 0 when
    not ``strict``."""
    if text.isascii() and text.isdigit() and int(text) <= MAX_CHOICE:
        return int(text)
    if not strict:
        return 0
    raise InvalidRequest(f"the {CHOICE} header must be a whole number from 0 to {MAX_CHOICE} (which sample of the "
                         f"request this is), not {text[:40]!r}", param=CHOICE)


def _unix_time(text: str) -> float | None:
    """A unix time in seconds, or ``None`` for anything else: not a number, not finite, or so small it must
    be a duration someone meant (``30``) rather than a moment of 1970."""
    value = finite(text)
    return value if value is not None and value >= _EARLIEST else None


def money(usd: float) -> str:
    """US dollars as ``Lw-Cost`` and ``x-leafwire-cost-usd`` say them: decimal, to a billionth, no trailing
    zeros (``0.000015``; ``0``)."""
    return f"{usd:.9f}".rstrip("0").rstrip(".") or "0"
