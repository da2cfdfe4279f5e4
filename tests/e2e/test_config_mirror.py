"""The config bucket lives at the hub and is mirrored to the edge: a policy set once at the hub reaches the
edge's router, also across an outage, and a site may override it.

Each test gets a one-node hub and an edge site whose leaf connection runs through a relay it can cut.
What a user sees is checked: the router's dry run over NATS (which rule decides, and where the policy
came from), the verdicts ``policy_cli`` prints, and the buckets on each side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.errors import NoRespondersError
from nats.js.errors import KeyNotFoundError, NotFoundError

from deploy import topology
from shared import config_bucket
from tests.support import (
    ROOT,
    CuttableSite,
    Service,
    eventually,
    running,
    start_cuttable_site,
    write_policy,
)

pytestmark = pytest.mark.e2e
SITE = "plant3"
CLOUD = "openai/gpt-4o-mini"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[CuttableSite]:
    with start_cuttable_site(tmp_path, SITE) as started:
        yield started


def policy(tmp: Path, rule: str) -> Path:
    """A policy whose one rule, named ``rule``, decides every request (so the dry run names it)."""
    return write_policy(tmp / f"{rule}.yaml", f"rules: [{{name: {rule}, route: [requested]}}]\n")


@contextlib.contextmanager
def edge_router(site: CuttableSite, tmp: Path) -> Iterator[Service]:
    """A router of the edge site (policy file: rule ``from-file``), answering dry runs."""
    router = Service("router", {"LW_NATS_URL": site.edge.url, "LW_SITE": SITE, "LW_ROUTER_UPLINK": "up",
                                "LW_ROUTER_POLICY_FILE": str(policy(tmp, "from-file")),
                                "LW_ROUTER_CONFIG_HUB_CHECK_S": "1"})
    with running(router):
        eventually(lambda: answers(site), 20, "the router to answer dry runs")
        yield router


def cli(*args: str, url: str, site: str = SITE, wait: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.router.policy_cli", *args, "--nats", url,
                           "--site", site, "--wait", str(wait)], capture_output=True, text=True, timeout=60, cwd=ROOT)


def verdict(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """The router's announcement policy_cli printed."""
    last = done.stdout.splitlines()[-1] if done.stdout else ""
    assert last.startswith("{"), f"no verdict (exit {done.returncode}): {done.stderr}"
    return dict(json.loads(last))


async def _dry_run(url: str) -> tuple[str, str]:
    nc = await nats.connect(url)
    try:
        body = {"model": CLOUD, "messages": [{"role": "user", "content": "hi"}]}
        answer = json.loads((await nc.request(f"lw.v1.{SITE}.route.dry_run", json.dumps(body).encode(), 5)).data)
    finally:
        await nc.drain()
    return str(answer["decision"]["rule"]), str(answer["policy_source"])


def decision(site: CuttableSite) -> tuple[str, str]:
    """(the rule that decides a request at the edge, where the router's policy came from)"""
    return asyncio.run(_dry_run(site.edge.url))


def answers(site: CuttableSite) -> bool:
    try:
        decision(site)
    except NoRespondersError:
        return False
    return True


def decides(site: CuttableSite, rule: str, source: str, within: float = 20) -> None:
    eventually(lambda: decision(site) == (rule, source), within, f"the edge router to use {rule} ({source})")


async def _config_value(url: str, key: str) -> bytes | None:
    """The value of ``key`` in the config bucket (the hub's, or an edge's mirror) at ``url`` (None: absent, or
    no bucket at this moment: an edge's router makes its mirror anew by deleting and creating it)."""
    nc = await nats.connect(url)
    try:
        try:
            kv = await nc.jetstream().key_value("config")
            return (await kv.get(key)).value
        except (KeyNotFoundError, NotFoundError, NoRespondersError):
            return None
    finally:
        await nc.drain()


async def _edge_stream_mirror(url: str) -> str | None:
    nc = await nats.connect(url)
    try:
        mirror = (await nc.jetstream().stream_info("KV_config")).config.mirror
    finally:
        await nc.drain()
    return None if mirror is None or mirror.external is None else f"{mirror.name} via {mirror.external.api}"


class TestHubToEdge:
    def test_policy_pushed_at_the_hub_applies_at_the_edge(self, site: CuttableSite, tmp_path: Path) -> None:
        """A policy pushed once at the hub is applied live by the edge's router, which announces it."""
        with edge_router(site, tmp_path):
            assert decision(site) == ("from-file", "file")
            pushed = cli("push", str(policy(tmp_path, "from-hub")), url=site.hub.url)
            assert pushed.returncode == 0, pushed.stderr
            assert verdict(pushed) == {"outcome": "applied", "source": "kv:router.policy", "rules": ["from-hub"]}
            assert decision(site) == ("from-hub", "kv:router.policy")

    def test_cli_against_the_edge_writes_at_the_hub(self, site: CuttableSite, tmp_path: Path) -> None:
        """policy_cli given the edge's URL writes the hub's bucket; the edge holds only the mirror of it."""
        text = policy(tmp_path, "via-edge")
        with edge_router(site, tmp_path):
            pushed = cli("push", str(text), url=site.edge.url)
            assert pushed.returncode == 0, pushed.stderr
            assert "the hub's 'config' bucket" in pushed.stderr
            assert verdict(pushed)["outcome"] == "applied"
        assert asyncio.run(_config_value(site.hub.url, "router.policy")) == text.read_bytes()
        assert asyncio.run(_edge_stream_mirror(site.edge.url)) == "KV_config via $JS.hub.API"

    def test_cli_with_the_hub_down_says_so(self, site: CuttableSite, tmp_path: Path) -> None:
        """With the hub stopped, policy_cli against the edge fails at once, saying the hub is unreachable."""
        site.hub.stop()
        eventually(lambda: not topology.leafnode_connected(site.edge.node), 10, "the edge to lose its uplink")
        refused = cli("push", str(policy(tmp_path, "lost")), url=site.edge.url)
        assert refused.returncode == 3
        assert "the hub's JetStream (domain 'hub') does not answer" in refused.stderr
        assert "Nothing was written" in refused.stderr


class TestOffline:
    def test_router_started_offline_gets_the_last_mirrored_policy(self, site: CuttableSite, tmp_path: Path) -> None:
        """An edge router started while the hub is down uses the last policy mirrored from the hub."""
        with edge_router(site, tmp_path):
            assert cli("push", str(policy(tmp_path, "from-hub")), url=site.hub.url).returncode == 0
        site.hub.stop()
        eventually(lambda: not topology.leafnode_connected(site.edge.node), 10, "the edge to lose its uplink")
        with edge_router(site, tmp_path):
            decides(site, "from-hub", "kv:router.policy")

    def test_change_made_while_cut_off_arrives_when_the_link_returns(self, site: CuttableSite,
                                                                     tmp_path: Path) -> None:
        """A policy changed at the hub while the edge's uplink is cut reaches the edge's router once it is back."""
        with edge_router(site, tmp_path):
            assert cli("push", str(policy(tmp_path, "before")), url=site.hub.url).returncode == 0
            site.link.cut()
            eventually(lambda: not topology.leafnode_connected(site.edge.node), 10, "the edge to lose its uplink")
            unheard = cli("push", str(policy(tmp_path, "during")), url=site.hub.url, wait=1)
            assert unheard.returncode == 2, unheard.stderr  # written at the hub; the edge router cannot answer
            assert decision(site) == ("before", "kv:router.policy")
            site.link.restore()
            decides(site, "during", "kv:router.policy", within=60)


    def test_change_reaches_a_router_whose_mirror_is_still_detached(self, site: CuttableSite,
                                                                    tmp_path: Path) -> None:
        """A mirror created while the uplink was down re-attaches only after nats-server's retry wait (30 s
        and more); a policy pushed at the hub once the link is back still applies at once: the router reads
        the hub while its mirror is silent. The mirror itself, silent while the hub answers, is made anew by
        the router and holds the change within seconds (readable offline from then)."""
        site.link.cut()
        eventually(lambda: not topology.leafnode_connected(site.edge.node), 10, "the edge to lose its uplink")
        with edge_router(site, tmp_path):
            site.link.restore()
            eventually(lambda: topology.leafnode_connected(site.edge.node), 20, "the uplink to return")
            text = policy(tmp_path, "from-hub")
            pushed = cli("push", str(text), url=site.hub.url)
            assert verdict(pushed)["outcome"] == "applied", pushed.stderr
            assert decision(site) == ("from-hub", "kv:router.policy")
            eventually(lambda: asyncio.run(_config_value(site.edge.url, "router.policy")) == text.read_bytes(), 20,
                       "the edge's mirror to hold the policy")


class TestHubBucketCreatedAnew:
    def test_edge_router_follows_a_hub_bucket_created_anew(self, site: CuttableSite, tmp_path: Path) -> None:
        """The hub's config deleted and created anew (a reset) reaches the edge by itself: its router applies the
        new bucket's policy, a site override only the old bucket had is gone, and the mirror holds what the hub
        holds (it would have skipped the new stream's messages up to the old one's sequence)."""
        with edge_router(site, tmp_path):
            old = {"router.policy": rule_text("old-global"), f"router.policy.{SITE}": rule_text("old-own")}
            asyncio.run(_write_at_hub(site.hub.url, old, fresh=False))
            decides(site, "old-own", f"kv:router.policy.{SITE}")
            asyncio.run(_write_at_hub(site.hub.url, {"router.policy": rule_text("new-global")}, fresh=True))
            decides(site, "new-global", "kv:router.policy")
        assert asyncio.run(_config_value(site.edge.url, "router.policy")) == rule_text("new-global")
        assert asyncio.run(_config_value(site.edge.url, f"router.policy.{SITE}")) is None


def rule_text(rule: str) -> bytes:
    return f"rules: [{{name: {rule}, route: [requested]}}]\n".encode()


async def _write_at_hub(url: str, values: dict[str, bytes], *, fresh: bool) -> None:
    """Write ``values`` into the hub's config bucket; ``fresh``: delete the bucket first and create it anew,
    as an operator resetting it would."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if fresh:
            await js.delete_stream("KV_config")
        kv = await config_bucket.ensure_bucket(js)
        for key, value in values.items():
            await kv.put(key, value)
    finally:
        await nc.drain()


class TestSiteOverride:
    def test_override_and_fallbacks(self, site: CuttableSite, tmp_path: Path) -> None:
        """router.policy.<site> wins over router.policy at that site only; deleting it falls back to the
        global policy, and deleting that to the router's file."""
        with edge_router(site, tmp_path):
            assert cli("push", str(policy(tmp_path, "global")), url=site.hub.url).returncode == 0
            own = cli("push", str(policy(tmp_path, "own")), "--scope", "site", url=site.hub.url)
            assert verdict(own) == {"outcome": "applied", "source": "kv:router.policy.plant3", "rules": ["own"]}
            shadowed = cli("push", str(policy(tmp_path, "global-2")), url=site.hub.url)
            assert shadowed.returncode == 0
            assert verdict(shadowed) == {"outcome": "overridden", "key": "router.policy",
                                         "source": "kv:router.policy.plant3"}
            elsewhere = cli("push", str(policy(tmp_path, "other")), "--scope", "site", url=site.hub.url,
                            site="plant4", wait=1)
            assert elsewhere.returncode == 2  # no router of plant4; and plant3's is unmoved:
            assert decision(site) == ("own", "kv:router.policy.plant3")

            back = cli("clear", "--scope", "site", url=site.hub.url)
            assert verdict(back) == {"outcome": "reverted", "source": "kv:router.policy", "rules": ["global-2"]}
            assert decision(site) == ("global-2", "kv:router.policy")
            to_file = cli("clear", url=site.hub.url)
            assert verdict(to_file) == {"outcome": "reverted", "source": "file", "rules": ["from-file"]}
            assert decision(site) == ("from-file", "file")

    def test_invalid_policy_at_the_hub_is_rejected_at_the_edge(self, site: CuttableSite, tmp_path: Path) -> None:
        """A broken policy written at the hub without the CLI's check is rejected by the edge's router,
        which says why and keeps the policy it had."""
        with edge_router(site, tmp_path):
            assert cli("push", str(policy(tmp_path, "good")), url=site.hub.url).returncode == 0
            announced = asyncio.run(_put_at_hub_and_listen(site, b"rules: [{name: x, route: []}]\n"))
            assert announced["outcome"] == "rejected"
            assert "rules.0.route" in str(announced["error"])
            assert decision(site) == ("good", "kv:router.policy")

    def test_clearing_a_key_the_hub_does_not_hold_says_so_at_once(self, site: CuttableSite, tmp_path: Path) -> None:
        """Clearing a key the hub's bucket does not hold (never pushed, cleared already, or held only by a bucket
        since created anew) changes no router's policy, so no router announces anything: the command says there
        was nothing to clear and exits 0 without writing, rather than exiting 2 after --wait seconds with a
        message about outages (found by QA)."""
        with edge_router(site, tmp_path):
            assert cli("push", str(policy(tmp_path, "global")), url=site.hub.url).returncode == 0
            never = cli("clear", "--scope", "site", url=site.hub.url)
            assert never.returncode == 0, never.stderr
            assert "nothing to clear" in never.stderr
            assert cli("push", str(policy(tmp_path, "own")), "--scope", "site", url=site.hub.url).returncode == 0
            assert verdict(cli("clear", "--scope", "site", url=site.hub.url))["outcome"] == "reverted"
            written = asyncio.run(_hub_last_seq(site.hub.url))
            again = cli("clear", "--scope", "site", url=site.hub.url)
            assert again.returncode == 0, again.stderr
            assert "nothing to clear" in again.stderr
            assert asyncio.run(_hub_last_seq(site.hub.url)) == written  # no delete marker written
            assert decision(site) == ("global", "kv:router.policy")


async def _hub_last_seq(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info("KV_config")).state.last_seq)
    finally:
        await nc.drain()


async def _put_at_hub_and_listen(site: CuttableSite, value: bytes) -> dict[str, object]:
    """Write router.policy straight into the hub's bucket; return what the edge's router announces."""
    edge, hub = await nats.connect(site.edge.url), await nats.connect(site.hub.url)
    try:
        events = await edge.subscribe(f"lw.v1.{SITE}.router.policy")
        await edge.flush()
        await (await hub.jetstream().key_value("config")).put("router.policy", value)
        return dict(json.loads((await events.next_msg(timeout=20)).data))
    finally:
        await edge.drain()
        await hub.drain()


class TestUpgrade:
    def test_plain_bucket_of_an_older_version_is_replaced(self, site: CuttableSite, tmp_path: Path) -> None:
        """An edge whose own domain holds a plain config bucket (older leafwire) gets the mirror when its
        router starts: the hub's policy wins, and the log says what was dropped."""
        asyncio.run(_plain_bucket(site.edge.url, b"rules: [{name: edge-local, route: [requested]}]\n"))
        assert cli("push", str(policy(tmp_path, "from-hub")), url=site.hub.url, wait=0.5).returncode == 2
        with edge_router(site, tmp_path) as router:
            decides(site, "from-hub", "kv:router.policy")
            log = router.log()
        assert asyncio.run(_edge_stream_mirror(site.edge.url)) == "KV_config via $JS.hub.API"
        assert "replacing this site's own config bucket with a mirror of the hub's" in log
        assert "edge-local" in log


async def _plain_bucket(url: str, value: bytes) -> None:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().create_key_value(bucket="config", history=10)
        await kv.put("router.policy", value)
    finally:
        await nc.drain()
