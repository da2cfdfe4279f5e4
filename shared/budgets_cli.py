"""Budgets as the cloud path sees them: what every site spent today and this month, against each limit.

    uv run leafwire budgets                        # every budget with spending, in the current day and month
    uv run leafwire budgets --tenant acme          # the global budget and acme's
    uv run leafwire budgets --json                 # for machines

Read from any server: on an edge site, the site's own spending from its ``budgets`` bucket and the other
sites' from its mirror of the hub's (as last synced, so it also works offline: the table ends with when the
mirror last heard from the hub); at the hub, every site's.
A budget counts what all sites spent together (``docs/cloud.md``, one ledger across sites).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from schemas.cloud import BudgetStatus
from shared import budgets, subjects
from shared.argtypes import add_nats, nats_options, nats_servers, seconds
from shared.columns import aligned
from shared.config_bucket import HUB_UNREACHABLE, role_of
from shared.nats import NoNatsServer, connect_once
from shared.sites_cli import heard


class ReadError(Exception):
    """The buckets could not be read."""


async def _entries(kv: KeyValue) -> dict[str, BudgetStatus]:
    found: dict[str, BudgetStatus] = {}
    try:
        keys = await kv.keys()
    except NoKeysError:
        return found
    for key in keys:
        try:
            found[key] = BudgetStatus.model_validate_json((await kv.get(key)).value or b"")
        except (ValidationError, NotFoundError):  # unreadable, or deleted meanwhile
            continue
    return found


@dataclass(frozen=True)
class Found:
    """Every site's entries as one server knows them; on an edge, how fresh its copy of the other sites' is."""

    entries: list[BudgetStatus]
    edge: bool = False
    mirror: bool = False  # the edge has its mirror of the hub's bucket
    heard_s: float | None = None  # seconds since that mirror last heard from the hub (None: never)

    def freshness(self) -> str:
        """The line saying how current the other sites' spending is (empty at the hub)."""
        if not self.edge:
            return ""
        if not self.mirror:
            return "other sites' spending: not known here yet (no mirror of the hub's budgets: no cloud-adapter " \
                   "of this site has made one)"
        return f"other sites' spending: as this edge's mirror of the hub last heard it, {heard(self.heard_s)}"


async def read(nc: NATS, wait_s: float) -> Found:
    """Every site's entries, as the server ``nc`` is connected to knows them."""
    js = nc.jetstream(timeout=wait_s)
    try:
        try:
            own = await _entries(await js.key_value(subjects.BUDGETS))
        except BucketNotFoundError:
            own = {}
        if await role_of(js) != "edge":
            return Found(list(own.values()))
        try:
            info = await js.stream_info(subjects.HUB_BUDGETS)  # it is there (else NotFoundError), and how fresh
            mirrored = await _entries(budgets.mirror_bucket(js))
        except NotFoundError:
            return Found(list(own.values()), edge=True)
    except HUB_UNREACHABLE as exc:
        raise ReadError(f"JetStream does not answer within {wait_s:g} s") from exc
    here = {s.site for s in own.values()}
    others = [s for key, s in mirrored.items() if budgets.key_site(key) not in here | {None}]
    active = info.mirror.active if info.mirror is not None and info.mirror.active is not None else -1
    return Found([*own.values(), *others], edge=True, mirror=True, heard_s=None if active < 0 else active / 1e9)


def render(found: list[budgets.Total]) -> str:
    if not found:
        return "no cloud spending recorded in the current day or month"
    rows = [("scope", "period", "window", "spent $", "limit $", "used", "state", "by site")]
    for t in found:
        used = f"{t.spent / t.limit:.0%}" if t.limit else ""
        sites = ", ".join(f"{site} {spent:.4f}" for site, spent in sorted(t.sites.items(), key=lambda kv: -kv[1]))
        rows.append((t.scope, t.period, t.window, f"{t.spent:.4f}", "" if t.limit is None else f"{t.limit:g}",
                     used, t.level, sites))
    return "\n".join(aligned(rows, right=(3, 4, 5)))


def as_json(found: list[budgets.Total]) -> str:
    return json.dumps([{"scope": t.scope, "period": t.period, "window": t.window, "spent_usd": round(t.spent, 6),
                        "limit_usd": t.limit, "state": t.level, "sites": t.sites} for t in found], indent=2)


async def _run(args: argparse.Namespace) -> str:
    nc = await connect_once(nats_servers(args), args.wait, **nats_options(args))
    try:
        read_back = await read(nc, args.wait)
    finally:
        await nc.drain()
    scopes = None if args.tenant is None else {subjects.GLOBAL_SCOPE, subjects.tenant_scope(args.tenant)}
    found = budgets.totals(read_back.entries, time.time(), scopes)
    found.sort(key=lambda t: (t.scope != subjects.GLOBAL_SCOPE, -t.spent, t.scope, t.period))
    if args.json:
        return as_json(found)
    return "\n".join(line for line in (render(found), read_back.freshness()) if line)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenant", help="only the global budget and this tenant's")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    add_nats(parser, "any server: an edge's or the hub's")
    parser.add_argument("--wait", type=seconds, default=5.0, help="seconds to wait for NATS")
    args = parser.parse_args(argv)
    try:
        print(asyncio.run(_run(args)))
    except (NoNatsServer, ReadError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
