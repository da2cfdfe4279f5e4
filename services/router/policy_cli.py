"""Check a routing policy, or install it live at the hub for every site or for one.

    uv run leafwire policy validate deploy/policy.yaml
    uv run leafwire policy push deploy/policy.yaml --nats nats://127.0.0.1:4222 --site edge1
    uv run leafwire policy push edge1.yaml --scope site --site edge1   # edge1 only
    uv run leafwire policy clear --scope site --site edge1             # edge1: global again
    uv run leafwire policy clear             # sites without their own key: their file

``push`` validates locally, writes the policy into the hub's ``config`` KV bucket (key ``router.policy``
for every site, ``router.policy.<site>`` with ``--scope site``), and waits for a router of ``--site`` to
say what it did: ``applied``, ``rejected`` (with the error), ``reverted`` (after ``clear``), or
``overridden`` (a global policy while the site has its own). ``--nats`` may be any server: the hub's,
or an edge's (the write crosses the leaf connection); a standalone server without a JetStream domain
keeps its own bucket. Edge sites read a mirror of the hub's bucket, so a router that starts while its
uplink is down still has the last policy it received.

``clear`` of a key the hub's bucket does not hold writes nothing and says so: no router would answer.

Exit status: 0 done (or nothing to clear), 1 invalid or rejected, 2 written but no router of the site
answered, 3 not written (NATS or the hub unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError

from services.router.masking import Masker
from services.router.policy import PolicyError, parse
from shared import config_bucket, subjects
from shared.argtypes import add_nats, nats_options, nats_servers, seconds, site_id
from shared.errors import HubUnreachable
from shared.nats import NoNatsServer, connect_once, shown

NO_VERDICT = 2
UNREACHABLE = 3


def validate(path: Path) -> int:
    """Parse the file and compile its masking patterns; print what is wrong."""
    try:
        policy = parse(path.read_text(), str(path))
        Masker.from_policy(policy.masking)
    except (PolicyError, ValueError) as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # missing, a directory, unreadable
        print(f"cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"valid: {len(policy.rules)} rule(s) ({', '.join(r.name for r in policy.rules)}), "
          f"{len(policy.aliases)} alias(es)")
    return 0


def key_for(scope: str, site: str) -> str:
    """The config key a scope writes: every site's, or one site's override."""
    return subjects.POLICY_KEY if scope == "global" else subjects.site_policy_key(site)


class Refused(Exception):
    """The command could not finish; the message says why and ``status`` is the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


async def connect(args: argparse.Namespace) -> NATS:
    """One attempt, no reconnects: the command should fail fast, not hang."""
    try:
        return await connect_once(nats_servers(args), 2.0, **nats_options(args))
    except NoNatsServer as exc:
        raise Refused(f"{exc}; nothing was written", UNREACHABLE) from exc


class NothingToClear(Exception):
    """``clear`` of a key the bucket does not hold: nothing is written, and no router would announce anything
    (the policy in force does not change), so there is no verdict to wait for."""


async def write(nc: NATS, url: str, key: str, text: bytes | None) -> str:
    """Write (``text``) or delete the key where the config bucket's owner keeps it; say where. Raises
    ``NothingToClear`` for a delete of a key that holds no value."""
    try:
        writer = await config_bucket.writer(nc)
    except HubUnreachable as exc:
        raise Refused(f"{exc.message}. Nothing was written (from {url}); run it again once the hub answers.",
                      UNREACHABLE) from exc
    except (APIError, NatsTimeout) as exc:
        raise Refused(f"JetStream refused or did not answer ({exc!r}, from {url}); nothing was written",
                      UNREACHABLE) from exc
    try:
        if text is None and not await writer.holds(key):
            raise NothingToClear(f"{key!r} is not set in {writer.where}: nothing to clear, nothing was written")
        await (writer.delete(key) if text is None else writer.put(key, text))
    except HubUnreachable as exc:
        raise Refused(f"{exc.message}. Run it again once the hub answers.", UNREACHABLE) from exc
    return f"{'deleted' if text is None else 'wrote'} {key!r} in {writer.where}"


async def verdict_of(events: Subscription, site: str, wait_s: float) -> dict[str, object]:
    """The first outcome a router of the site announces."""
    try:
        return dict(json.loads((await events.next_msg(timeout=wait_s)).data))
    except NatsTimeout as exc:
        raise Refused(f"written; no router of site {site!r} answered within {wait_s:g} s (an edge applies it "
                      "once its mirror of the hub's bucket has it: after an outage nats-server may take up to "
                      f"~2 minutes; {subjects.policy_events(site)} announces it)", NO_VERDICT) from exc


async def install(args: argparse.Namespace, key: str, text: bytes | None) -> int:
    """Write (or delete) a policy key and report the site's router's verdict."""
    site, wait_s, url = args.site, args.wait, shown(args.nats)
    try:
        nc = await connect(args)
        try:
            events = await nc.subscribe(subjects.policy_events(site))
            await nc.flush()
            print(await write(nc, url, key, text), file=sys.stderr)
            verdict = await verdict_of(events, site, wait_s)
        finally:
            await nc.drain()
    except Refused as exc:
        print(exc, file=sys.stderr)
        return exc.status
    except NothingToClear as exc:
        print(exc, file=sys.stderr)
        return 0
    print(json.dumps(verdict))
    if verdict.get("outcome") == "overridden":
        print(f"site {site!r} keeps its own policy ({verdict.get('source')}); the global one applies to "
              "sites without one", file=sys.stderr)
    return 0 if verdict.get("outcome") in ("applied", "reverted", "overridden") else 1


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["validate", "push", "clear"])
    parser.add_argument("file", nargs="?", type=Path)
    add_nats(parser, "any server: the hub's or an edge's")
    parser.add_argument("--site", type=site_id, default="edge1", help="the site whose router's verdict to wait for")
    parser.add_argument("--scope", choices=["global", "site"], default="global",
                        help="global: router.policy, every site; site: router.policy.<site>, that site only")
    parser.add_argument("--wait", type=seconds, default=5.0, help="seconds to wait for a router's verdict")
    args = parser.parse_args(argv)
    subjects.check_site(args.site)
    key = key_for(args.scope, args.site)
    if args.command == "clear":
        return asyncio.run(install(args, key, None))
    if args.file is None:
        parser.error(f"{args.command} needs a policy file")
    if validate(args.file) != 0:
        return 1
    if args.command == "push":
        return asyncio.run(install(args, key, args.file.read_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
