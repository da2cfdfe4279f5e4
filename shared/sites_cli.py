"""The edge sites whose usage the hub collects, and taking a decommissioned one off the list.

    uv run leafwire sites                          # each site: events not copied yet, when last heard from
    uv run leafwire sites remove plant3            # stop collecting plant3's usage and spending (copies stay)

An edge site puts itself on the list (``docs/cloud.md``, every site's usage at the hub); a site whose services
still run puts itself back within ``LW_USAGE_HUB_CHECK_S``, so stop them (or set it to 0) first.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from shared import hub_usage, subjects
from shared.argtypes import add_nats, nats_options, nats_servers, seconds, site_id
from shared.columns import aligned
from shared.errors import HubUnreachable
from shared.nats import NoNatsServer, connect_once


def heard(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def not_copied(source: hub_usage.SiteSource) -> str:
    """The hub's lag behind a site, or ``unknown`` when its source is not attached: the hub's figure stops
    where it was when the link went (0, often) while the site goes on storing."""
    return str(source.lag) if source.attached else "unknown"


def table(found: list[hub_usage.SiteSource]) -> str:
    if not found:
        return "no site sends its usage to the hub yet"
    rows = [("site", "not copied yet", "last heard", "problem")]
    rows += [(s.site, not_copied(s), heard(s.heard_s), s.error or "") for s in sorted(found, key=lambda s: s.site)]
    return "\n".join(aligned(rows, right=(1,)))


async def _run(args: argparse.Namespace) -> str:
    nc = await connect_once(nats_servers(args), args.wait, **nats_options(args))
    try:
        if args.command == "remove":
            if not await hub_usage.leave(nc, args.site, args.wait):
                raise ValueError(f"site {args.site!r} is not among the hub's usage sources")
            return (f"the hub no longer collects the usage and budget spending of site {args.site!r} "
                    "(what it copied stays)")
        return table(await hub_usage.sites(nc, args.wait))
    finally:
        await nc.drain()


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["list", "remove"], default="list")
    parser.add_argument("site", nargs="?", type=site_id, help="the site to remove")
    add_nats(parser, "any server: the hub's or an edge's")
    parser.add_argument("--wait", type=seconds, default=5.0, help="seconds to wait for NATS and the hub")
    args = parser.parse_args(argv)
    try:
        if args.command == "remove":
            if args.site is None:
                raise ValueError("remove needs the site to take off the list")
            subjects.check_site(args.site)
        elif args.site is not None:
            raise ValueError(f"list takes no site (got {args.site!r}); did you mean `remove {args.site}`?")
        print(asyncio.run(_run(args)))
    except (ValueError, NoNatsServer, HubUnreachable, RuntimeError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
