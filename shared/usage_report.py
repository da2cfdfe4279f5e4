"""Who used what, and what it cost: the usage events of a ``USAGE`` stream, added up in a table.

    uv run leafwire usage                              # the last 24 h, as this site has them
    uv run leafwire usage --domain hub --by site       # every site, as the hub has them
    uv run leafwire usage --since 2026-11-01 --by day,tenant --json

An edge's stream holds that site's events; the hub's holds the hub's own and a copy of every edge's
(``docs/cloud.md``, every site's usage at the hub). Events are counted by when they were answered (their
``at``), not by when a stream stored them: a site that was offline sends its events late, and they still
count on the day they happened. Read-only: an ephemeral consumer, nothing acknowledged or changed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError
from pydantic import ValidationError

from schemas.cloud import UsageEvent
from shared import subjects
from shared.argtypes import add_nats, nats_options, nats_servers, seconds, site_id
from shared.columns import aligned
from shared.nats import NoNatsServer, connect_once

FIELDS = ("site", "tenant", "target", "outcome", "variant", "cached", "day")
FETCH = 1000
_SPAN = re.compile(r"^(\d+(?:\.\d+)?)([mhd])$")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400}


class ReportError(Exception):
    """Something the report cannot do, said for the person who asked."""


def parse_time(text: str, now: float) -> float | None:
    """A point in time: ``all`` (none), a span back from now (``30m``, ``24h``, ``7d``), or an ISO 8601 date
    or date and time (UTC unless it names a zone)."""
    if text == "all":
        return None
    if span := _SPAN.fullmatch(text):
        return max(0.0, now - float(span.group(1)) * _UNIT_S[span.group(2)])  # before 1970 is all there is
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"{text!r} is not a time: use all, 30m, 24h, 7d, 2026-11-01 or 2026-11-01T08:00") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def parse_fields(text: str) -> tuple[str, ...]:
    """The comma-separated fields to group by; each one of ``FIELDS``, once (a repeat is dropped)."""
    fields = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    unknown = [f for f in fields if f not in FIELDS]
    if unknown or not fields:
        raise ReportError(f"cannot group by {', '.join(unknown) or 'nothing'}: choose from {', '.join(FIELDS)}")
    return fields


def value_of(event: UsageEvent, field: str) -> str:
    """``field`` of ``event`` as it is shown (``day``: the UTC date it was answered)."""
    if field == "day":
        return dt.datetime.fromtimestamp(event.at, dt.UTC).date().isoformat()
    if field == "cached":
        return "cached" if event.cached else "-"
    value = getattr(event, field)
    return "-" if value is None else str(value)


@dataclass
class Totals:
    """What one group of events used."""

    requests: int = 0
    errors: int = 0
    cached_requests: int = 0  # not ``cached``: that is the name of a field to group by, in the same JSON object
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, event: UsageEvent) -> None:
        self.requests += 1
        self.errors += event.outcome == "error"
        self.cached_requests += event.cached
        self.prompt_tokens += event.prompt_tokens
        self.completion_tokens += event.completion_tokens
        self.cost_usd += event.cost_usd


@dataclass
class Report:
    """Totals per group, in the order of ``by``; ``unreadable`` counts messages that were no usage event."""

    by: tuple[str, ...]
    groups: dict[tuple[str, ...], Totals]
    unreadable: int = 0

    def total(self) -> Totals:
        whole = Totals()
        for t in self.groups.values():
            for name, value in asdict(t).items():
                setattr(whole, name, getattr(whole, name) + value)
        return whole

    def table(self) -> str:
        """Aligned columns, most expensive group first, then a total line."""
        head = [*self.by, "requests", "errors", "cache hits", "prompt tokens", "completion tokens", "cost USD"]
        order = sorted(self.groups.items(), key=lambda kv: (-kv[1].cost_usd, -kv[1].requests, kv[0]))
        rows = [[*key, *_numbers(t)] for key, t in order]
        rows.append(["total", *[""] * (len(self.by) - 1), *_numbers(self.total())])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        out = aligned([head, ["-" * w for w in widths], *rows], right=range(len(self.by), len(head)))
        if self.unreadable:
            out.append(f"({self.unreadable} messages were not usage events and are left out)")
        return "\n".join(out)

    def as_json(self) -> str:
        return json.dumps({"by": list(self.by), "unreadable": self.unreadable, "total": asdict(self.total()),
                           "groups": [{**dict(zip(self.by, key, strict=True)), **asdict(t)}
                                      for key, t in sorted(self.groups.items())]}, indent=2)


def _numbers(t: Totals) -> list[str]:
    return [str(t.requests), str(t.errors), str(t.cached_requests), str(t.prompt_tokens), str(t.completion_tokens),
            f"{t.cost_usd:.4f}"]


async def events(nc: NATS, *, domain: str | None, site: str | None, since: float | None,
                 wait_s: float) -> AsyncIterator[bytes]:
    """The raw usage events of ``site`` (every site when ``None``) stored since ``since``, oldest first."""
    js = nc.jetstream(domain=domain, timeout=wait_s)
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True,
                            deliver_policy=DeliverPolicy.ALL if since is None else DeliverPolicy.BY_START_TIME,
                            opt_start_time=None if since is None else dt.datetime.fromtimestamp(since, dt.UTC))
    where = f"domain {domain!r}" if domain else "this server's domain"
    try:
        sub = await js.pull_subscribe(subjects.usage(site or subjects.ANY_SITE), stream=subjects.USAGE, config=config)
    except NotFoundError:
        raise ReportError(f"no USAGE stream in {where}: nothing has been answered there yet") from None
    except (ServiceUnavailableError, NoRespondersError, NatsTimeout, TimeoutError):
        raise ReportError(f"JetStream in {where} does not answer (for the hub's: is the uplink up?)") from None
    try:
        pending = (await sub.consumer_info()).num_pending
        while pending:
            try:
                batch = await sub.fetch(FETCH, timeout=wait_s)
            except (NatsTimeout, TimeoutError, NoRespondersError, APIError):  # how the link's loss shows varies
                raise ReportError(f"JetStream in {where} stopped answering with {pending} events still to read; "
                                  "no report rather than an incomplete one (try a larger --wait)") from None
            for msg in batch:
                yield msg.data
            pending = batch[-1].metadata.num_pending if batch else 0
    finally:
        await sub.unsubscribe()


async def report(nc: NATS, *, by: tuple[str, ...], domain: str | None = None, site: str | None = None,
                 tenant: str | None = None, since: float | None = None, until: float | None = None,
                 wait_s: float = 5.0) -> Report:
    """Add up the usage events answered in [``since``, ``until``) by the groups ``by``."""
    out = Report(by, {})
    async for data in events(nc, domain=domain, site=site, since=since, wait_s=wait_s):
        try:
            event = UsageEvent.model_validate_json(data)
        except ValidationError:
            out.unreadable += 1
            continue
        if (since is not None and event.at < since) or (until is not None and event.at >= until):
            continue
        if tenant is not None and event.tenant != tenant:
            continue
        key = tuple(value_of(event, f) for f in by)
        out.groups.setdefault(key, Totals()).add(event)
    return out


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_nats(parser, "a NATS server (the edge's or a hub's)")
    parser.add_argument("--domain", type=site_id,
                        help="read the USAGE stream of this JetStream domain (e.g. hub); default: the server's own")
    parser.add_argument("--since", default="24h", help="all, a span back from now (30m, 24h, 7d) or an ISO date")
    parser.add_argument("--until", help="same forms as --since; default: now")
    parser.add_argument("--by", default="site,tenant,target", help=f"group by, comma-separated: {', '.join(FIELDS)}")
    parser.add_argument("--site", type=site_id, help="only this site's events")
    parser.add_argument("--tenant", help="only this tenant's events")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    parser.add_argument("--wait", type=seconds, default=5.0, help="seconds to wait for NATS")
    args = parser.parse_args(argv)
    try:
        now = dt.datetime.now(dt.UTC).timestamp()
        by = parse_fields(args.by)
        since, until = parse_time(args.since, now), None if args.until is None else parse_time(args.until, now)
        if since is not None and until is not None and since >= until:
            raise ReportError(f"--since ({args.since}) must come before --until ({args.until}): "
                              "a span back from now is further back the larger it is")
        if args.site is not None:
            subjects.check_site(args.site)
        result = asyncio.run(_run(args, by, since, until))
    except (ReportError, ValueError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    print(result.as_json() if args.json else result.table())
    return 0


async def _run(args: argparse.Namespace, by: tuple[str, ...], since: float | None, until: float | None) -> Report:
    try:
        nc = await connect_once(nats_servers(args), args.wait, **nats_options(args))
    except NoNatsServer as exc:
        raise ReportError(str(exc)) from None
    try:
        return await report(nc, by=by, domain=args.domain, site=args.site, tenant=args.tenant, since=since,
                            until=until, wait_s=args.wait)
    finally:
        await nc.drain()


if __name__ == "__main__":
    sys.exit(main())
