"""One budget ledger across sites: each site writes its own spending, the hub collects it, each edge mirrors it.

A budget counts what every site spent, but an edge must keep counting while its uplink is down, so no site
writes another's numbers (no write ever waits on the uplink, and nothing needs merging):

    where                 stream          holds                                 written by
    each site's domain    ``KV_budgets``  the site's spending (key ``<scope>.<period>.<site>``)    its adapters
    the hub's domain      ``KV_budgets``  the hub's own, and every edge's (sourced from each edge)  hub adapters
    each edge's domain    ``HUB_BUDGETS``  a mirror of the hub's: every site's, readable offline    nats-server

An edge's adapters put the site's bucket on the hub's list of sources (``shared.hub_usage.keep_joined``, as
for usage events), so what an edge spends reaches the hub, and then every other edge's mirror, within
milliseconds while the links are up, and once they are back after an outage. A reader adds up the sites: its
own from its own bucket (freshest), the others from the mirror (as last synced).

nats-py's ``KeyValue`` reads the mirror as a read-only bucket (``open_mirror``): get, watch and status work on
any stream whose messages carry ``$KV.budgets.<key>`` subjects.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from schemas.cloud import BudgetLevel, BudgetStatus, budget_window
from shared import subjects
from shared.errors import BudgetExceeded
from shared.hub_mirror import STUCK_S, HubMirror, ensure_kv_mirror, kv_mirror_bucket

STREAM = subjects.kv_stream(subjects.BUDGETS)
SEVERITY: dict[BudgetLevel, int] = {"ok": 0, "warning": 1, "exhausted": 2}


def seconds_left(period: str, now: float) -> float:
    """Seconds until the next ``daily`` or ``monthly`` period starts (UTC midnight, or the first of next month)."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    nxt = day + timedelta(days=1) if period == "daily" else (day.replace(day=1) + timedelta(days=32)).replace(day=1)
    return nxt.timestamp() - now


def exceeded(tenant: str, scope: str, period: str, limit: float, spent: float, window: str, now: float,
             then: str = "cloud models are refused until it resets") -> BudgetExceeded:
    """The refusal for a spent budget, naming it, with Retry-After = until its period starts again."""
    which = (f"the global {period} cloud budget" if scope == subjects.GLOBAL_SCOPE
             else f"the {period} cloud budget of tenant {tenant!r}")
    return BudgetExceeded(f"{which} (${limit:g}) is spent: ${spent:.4f} in {window}; {then}",
                          scope=scope, period=period, retry_after=seconds_left(period, now))


def bucket_config(replicas: int) -> KeyValueConfig:
    """The ``budgets`` bucket of a site (or of the hub: the same, and it sources the edges')."""
    return KeyValueConfig(bucket=subjects.BUDGETS, history=1, direct=True, storage=StorageType.FILE,
                          replicas=replicas, description="leafwire budget ledger: spending by scope, period and site")


MIRRORED = "every site's budget spending, mirrored from the hub"


async def ensure_mirror(js: JetStreamContext) -> None:
    """Create the edge's mirror when absent (its adapters and its router do); needs no uplink."""
    await ensure_kv_mirror(js, subjects.HUB_BUDGETS, STREAM, MIRRORED)


def hub_mirror(stuck_s: float = STUCK_S) -> HubMirror:
    """The edge's mirror of the hub's budgets, made anew (``resync``), while the hub answers, when it is stuck
    or copies a stream that is gone (``shared.hub_mirror``). Keep one for a service's lifetime: it then also
    sees a hub bucket created anew that already holds as many messages as the old one did.

    Stuck, the edge went on counting the other sites' spending as before an outage for 30-150 s after its
    link was back, and overran budgets. Copying a stream that is gone (the hub's bucket deleted to reset it),
    it kept counting the old spending.
    """
    return HubMirror(subjects.HUB_BUDGETS, STREAM, ensure_mirror, stuck_s)


async def open_mirror(js: JetStreamContext) -> KeyValue:
    """The mirror as a read-only bucket. Raises ``NotFoundError`` while there is none (no adapter at the site
    has made it yet)."""
    await js.stream_info(subjects.HUB_BUDGETS)
    return mirror_bucket(js)


def mirror_bucket(js: JetStreamContext) -> KeyValue:
    """The mirror as a read-only bucket, once its stream is known to be there (no I/O)."""
    return kv_mirror_bucket(js, subjects.BUDGETS, subjects.HUB_BUDGETS)


def key_site(key: str) -> str | None:
    """The site a ``budgets`` key counts (``None``: a key written before budgets counted across sites)."""
    parts = key.split(".")
    return parts[2] if len(parts) == 3 else None


def elsewhere(key: str, site: str) -> bool:
    """True when a key of the hub's mirror counts another site than ``site``: the site's own entries are
    fresher in its own bucket, and entries without a site count only where they were written."""
    return key_site(key) not in (None, site)


@dataclass
class Total:
    """One budget (scope and period) in its current window: every site's spending added up."""

    scope: str
    period: str
    window: str
    spent: float = 0.0
    limit: float | None = None
    worst: BudgetLevel = "ok"  # the worst state a writer saw
    sites: dict[str, float] = field(default_factory=dict)

    @property
    def level(self) -> BudgetLevel:
        """``exhausted`` once the sites together reached the limit (even if no writer saw that total), else
        the worst level a writer saw."""
        return "exhausted" if self.limit is not None and self.spent >= self.limit else self.worst


def totals(entries: Iterable[BudgetStatus], now: float, scopes: Container[str] | None = None) -> list[Total]:
    """Each budget's total over the entries of its current window (of ``scopes`` only, when given); entries of
    an earlier day or month count as nothing spent."""
    current = {p: budget_window(p, now) for p in ("daily", "monthly")}
    found: dict[tuple[str, str], Total] = {}
    for s in entries:
        if s.window != current[s.period] or (scopes is not None and s.scope not in scopes):
            continue
        total = found.get((s.scope, s.period))
        if total is None:
            total = found[(s.scope, s.period)] = Total(s.scope, s.period, s.window)
        total.spent += s.spent_usd
        total.sites[s.site or "(before sites)"] = s.spent_usd
        total.limit = s.limit_usd if s.limit_usd is not None else total.limit
        total.worst = max(total.worst, s.state, key=SEVERITY.__getitem__)
    return list(found.values())
