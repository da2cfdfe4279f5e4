"""Check a routing policy, or install it live on a site.

    uv run python -m services.router.policy_cli validate deploy/policy.yaml
    uv run python -m services.router.policy_cli push deploy/policy.yaml --nats nats://127.0.0.1:4222 --site edge1
    uv run python -m services.router.policy_cli clear --nats nats://127.0.0.1:4222 --site edge1

``push`` validates locally, writes the ``router.policy`` key of the site's ``config`` KV bucket, and
waits for a router of the site to say whether it applied or rejected it. ``clear`` deletes the key:
routers go back to their policy file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import nats
from nats.js.api import KeyValueConfig

from services.router.masking import Masker
from services.router.policy import PolicyError, parse
from shared import subjects


def validate(path: Path) -> int:
    """Parse the file and compile its masking patterns; print what is wrong."""
    try:
        policy = parse(path.read_text(), str(path))
        Masker.from_policy(policy.masking)
    except (PolicyError, ValueError) as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(f"valid: {len(policy.rules)} rule(s) ({', '.join(r.name for r in policy.rules)}), "
          f"{len(policy.aliases)} alias(es)")
    return 0


async def install(url: str, site: str, text: bytes | None, wait_s: float) -> int:
    """Write (or delete) the policy key and report the router's verdict."""
    nc = await nats.connect(url)
    try:
        events = await nc.subscribe(subjects.policy_events(site))
        await nc.flush()
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=subjects.CONFIG_BUCKET, history=10))
        if text is None:
            await kv.delete(subjects.POLICY_KEY)
        else:
            await kv.put(subjects.POLICY_KEY, text)
        try:
            verdict = json.loads((await events.next_msg(timeout=wait_s)).data)
        except nats.errors.TimeoutError:
            print(f"written; no router of site {site!r} answered within {wait_s:g} s", file=sys.stderr)
            return 2
    finally:
        await nc.drain()
    print(json.dumps(verdict))
    return 0 if verdict.get("outcome") in ("applied", "reverted") else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["validate", "push", "clear"])
    parser.add_argument("file", nargs="?", type=Path)
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--site", default="edge1")
    parser.add_argument("--wait", type=float, default=5.0, help="seconds to wait for a router's verdict")
    args = parser.parse_args()
    if args.command == "clear":
        return asyncio.run(install(args.nats, args.site, None, args.wait))
    if args.file is None:
        parser.error(f"{args.command} needs a policy file")
    if validate(args.file) != 0:
        return 1
    if args.command == "push":
        return asyncio.run(install(args.nats, args.site, args.file.read_bytes(), args.wait))
    return 0


if __name__ == "__main__":
    sys.exit(main())
