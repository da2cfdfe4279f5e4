"""The hub's USAGE stream sources each edge site's: events stored at an edge reach the hub once, also those
stored while the uplink was down. Real nats-servers: a one-node hub and an edge whose leaf link can be cut."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import structlog.testing
from nats.aio.msg import Msg

from schemas.cloud import UsageEvent
from shared import hub_usage, metrics, sites_cli, subjects, usage_report
from shared.config_bucket import HUB_TIMEOUT_S
from shared.errors import HubUnreachable
from shared.streams import ensure_stream
from shared.usage import UsagePublisher, usage_stream
from shared.usage_report import report
from tests.support import (
    CuttableSite,
    NatsServer,
    connected,
    eventually_async,
    leafwire,
    start_cuttable_site,
    usage_events,
)

SITE = "plant9"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[CuttableSite]:
    with start_cuttable_site(tmp_path, SITE) as started:
        yield started


@pytest.fixture
async def edge(site: CuttableSite) -> AsyncIterator[nats.NATS]:
    async with connected(site.edge.url) as client:
        yield client


@pytest.fixture
async def hub(site: CuttableSite) -> AsyncIterator[nats.NATS]:
    async with connected(site.hub.url) as client:
        yield client


def event(n: int) -> UsageEvent:
    return UsageEvent(request_id=f"r{n}", tenant="t", site=SITE, target="local/tiny", prompt_tokens=n,
                      completion_tokens=1)


async def request_ids(server: NatsServer, site: str) -> list[str]:
    """The request ids of ``site``'s events in the USAGE stream of ``server``, in order."""
    return [event["request_id"] for subject, event in await usage_events(server.url) if subject == subjects.usage(site)]


async def hub_holds(site: CuttableSite, count: int) -> list[str]:
    """The site's events at the hub, once there are ``count`` of them."""
    return await eventually_async(lambda: request_ids(site.hub, SITE),
                                  lambda ids: len(ids) >= count, within_s=20, what=f"{count} events at the hub")


async def copied_to_hub(site: CuttableSite, edge: nats.NATS, count: int) -> UsagePublisher:
    """A publisher of the site's usage, the site joined to the hub, and ``count`` events copied there."""
    publisher = UsagePublisher(edge, SITE, interval_s=0.01)
    await publisher.ensure_stream()
    await hub_usage.join(edge, SITE)
    for n in range(count):
        await publisher.usage(event(n))
    await publisher.flush()
    await hub_holds(site, count)
    return publisher


async def test_events_reach_the_hub_also_those_stored_offline(site: CuttableSite, edge: nats.NATS,
                                                              hub: nats.NATS) -> None:
    """Events stored at the edge reach the hub in order; those stored while the link was cut follow once it is
    back, and none arrives twice."""
    publisher = UsagePublisher(edge, SITE, interval_s=0.01)
    await publisher.ensure_stream()
    added, _ = await hub_usage.join(edge, SITE)
    assert added
    for n in range(5):
        await publisher.usage(event(n))
    await publisher.flush()
    assert await hub_holds(site, 5) == [f"r{n}" for n in range(5)]

    site.link.cut()
    for n in range(5, 40):
        await publisher.usage(event(n))
    await publisher.flush()  # stored by the edge alone
    with pytest.raises(HubUnreachable):
        await hub_usage.join(edge, SITE, wait_s=0.5)
    site.link.restore()
    assert await hub_holds(site, 40) == [f"r{n}" for n in range(40)]
    await asyncio.sleep(1)
    assert await request_ids(site.hub, SITE) == [f"r{n}" for n in range(40)]
    assert await hub_usage.join(edge, SITE) == (False, 0)  # already a source, and caught up
    at_hub = await report(edge, by=("site",), domain=subjects.HUB)  # what `leafwire usage --domain hub` adds up
    assert {key: totals.requests for key, totals in at_hub.groups.items()} == {(SITE,): 40}


async def test_sites_joining_together_all_stay_listed(edge: nats.NATS, hub: nats.NATS) -> None:
    """Eight sites adding themselves at once: each reads the list back, so none is overwritten by another."""
    names = [f"site{n}" for n in range(8)]
    results = await asyncio.gather(*(hub_usage.join(edge, name) for name in names))
    assert all(added for added, _ in results)
    info = await hub.jetstream().stream_info("USAGE")
    listed = [s.external.api for s in info.config.sources or [] if s.external is not None]
    assert sorted(listed) == sorted(subjects.js_api(name) for name in names)


async def test_the_hubs_own_stream_keeps_its_events_and_subjects(site: CuttableSite, edge: nats.NATS,
                                                                 hub: nats.NATS) -> None:
    """A USAGE stream the hub's own services made first gets the source added; their events stay, and their
    publisher declaring the stream again keeps the source."""
    hub_publisher = UsagePublisher(hub, subjects.HUB, interval_s=0.01)
    await hub_publisher.ensure_stream()
    await hub_publisher.usage(event(100))
    await hub_publisher.flush()
    await UsagePublisher(edge, SITE).ensure_stream()
    assert (await hub_usage.join(edge, SITE))[0]
    await ensure_stream(hub, usage_stream(subjects.HUB))
    info = await hub.jetstream().stream_info("USAGE")
    assert info.config.subjects == [subjects.usage_filter(subjects.HUB)]
    assert [s.external.api for s in info.config.sources or [] if s.external] == [subjects.js_api(SITE)]
    for n in range(101, 104):  # one atomic batch, on a stream that now has a source
        await hub_publisher.usage(event(n))
    await hub_publisher.flush()
    assert hub_publisher.atomic
    assert await request_ids(site.hub, subjects.HUB) == ["r100", "r101", "r102", "r103"]


async def test_keep_joined_waits_for_the_uplink(site: CuttableSite, edge: nats.NATS, hub: nats.NATS) -> None:
    """Started with the link cut, the loop joins once it is back and reports the hub's lag; at the hub
    itself it has nothing to do and returns."""
    await asyncio.wait_for(hub_usage.keep_joined(hub, subjects.HUB, check_s=1), 5)
    await UsagePublisher(edge, SITE).ensure_stream()
    site.link.cut()
    loop = asyncio.create_task(hub_usage.keep_joined(edge, SITE, check_s=0.5, retry_s=0.2))
    try:
        await asyncio.sleep(1.5)
        assert not loop.done()
        site.link.restore()

        async def sources() -> int:
            try:
                return len((await hub.jetstream().stream_info("USAGE")).config.sources or [])
            except nats.js.errors.NotFoundError:
                return 0

        await eventually_async(sources, lambda n: n == 1, within_s=20, what="the site to be a source")
        await eventually_async(lambda: asyncio.sleep(0, metrics.USAGE_HUB_LAG._value.get()),
                               lambda lag: lag == 0, within_s=5, what="the lag to be reported")
    finally:
        loop.cancel()


async def test_a_link_back_after_an_outage_has_the_hub_restart_its_sources(site: CuttableSite, edge: nats.NATS,
                                                                           hub: nats.NATS) -> None:
    """Once the hub answers again after an outage, the loop asks it to move its USAGE stream's leader, whose
    new leader starts copying this site's at once (nats-server otherwise retries a source with a back-off of
    up to two minutes: the hub missed the site's events 30-80 s after the link was back). A hub of one node
    has no other leader and says so; the request is what this checks."""
    await UsagePublisher(edge, SITE).ensure_stream()
    await hub_usage.join(edge, SITE)
    asked: list[str] = []

    async def seen(msg: Msg) -> None:
        asked.append(msg.subject)

    await hub.subscribe("$JS.API.STREAM.LEADER.STEPDOWN.>", cb=seen)  # the hub's own JetStream API
    await hub.flush()
    loop = asyncio.create_task(hub_usage.keep_joined(edge, SITE, check_s=0.3, retry_s=0.2))
    try:
        await asyncio.sleep(1.0)
        assert asked == []  # joined all along: nothing to restart
        assert metrics.USAGE_HUB_LAG._value.get() == 0
        site.link.cut()
        await asyncio.sleep(HUB_TIMEOUT_S + 1)  # a check finds the hub unreachable
        assert metrics.USAGE_HUB_LAG._value.get() == -1  # unknown offline, not the last figure heard
        site.link.restore()
        await eventually_async(lambda: asyncio.sleep(0, list(asked)), lambda a: len(a) >= 1, within_s=20,
                               what="the leader stepdown")
        assert asked[0] == "$JS.API.STREAM.LEADER.STEPDOWN.USAGE"  # $JS.hub.API, as the hub's server maps it
        await asyncio.sleep(1.0)
        assert len(asked) == 1  # once per outage, not at every check
    finally:
        loop.cancel()


async def test_the_lag_counts_what_the_hub_has_not_copied_even_when_its_own_figure_is_stale(
        site: CuttableSite, edge: nats.NATS, hub: nats.NATS) -> None:
    """The hub's lag figure for a site stays as it was while the site is cut off (and while nats-server backs
    off after the outage): 0, though the site stored more. The site counts from the last message the hub
    copied instead, so leafwire_usage_hub_lag_events is not 0 while the hub is behind."""
    publisher = await copied_to_hub(site, edge, 3)
    _, source = await hub_usage.read_hub(edge, SITE, 2)
    assert source is not None
    assert (source.copied, source.lag) == (3, 0)
    site.link.cut()
    for n in range(3, 7):
        await publisher.usage(event(n))
    await publisher.flush()
    assert await hub_usage.behind(edge, source, subjects.USAGE) == 4  # the hub's figure still says 0


async def test_the_sites_command_lists_and_removes(site: CuttableSite, edge: nats.NATS) -> None:
    """`leafwire sites` shows each site the hub collects, how far behind it is and when it was last heard
    from; `remove` takes one off the list and keeps what was copied."""
    publisher = UsagePublisher(edge, SITE, interval_s=0.01)
    await publisher.ensure_stream()
    await hub_usage.join(edge, SITE)
    await hub_usage.join(edge, "ghost")  # a site that never answers
    await hub_usage.join(edge, "ghost", collected=hub_usage.BUDGETS)  # creates the hub's budgets bucket too
    await publisher.usage(event(1))
    await publisher.flush()
    await hub_holds(site, 1)
    listed = leafwire("sites", "--nats", site.edge.url)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1:] for line in listed.stdout.splitlines()[1:]}
    assert rows["ghost"] == ["unknown", "never"]  # the hub's figure (0) for a site it never reached means nothing
    assert rows[SITE][0] == "0"
    assert rows[SITE][-1] == "ago"

    removed = leafwire("sites", "remove", "ghost", "--nats", site.hub.url)
    assert removed.returncode == 0, removed.stderr
    assert [s.site for s in await hub_usage.sites(edge)] == [SITE]
    budgets_config, ghost = await hub_usage.read_hub(edge, "ghost", 2, hub_usage.BUDGETS.stream)
    assert ghost is None  # off the budgets bucket's sources as well
    assert budgets_config.subjects == ["$KV.budgets.>"]  # a KV bucket as the hub's adapters make it
    again = leafwire("sites", "remove", "ghost", "--nats", site.hub.url)
    assert again.returncode == 2
    assert "site 'ghost' is not among the hub's usage sources" in again.stderr
    assert await request_ids(site.hub, SITE) == ["r1"]

    site.link.cut()
    offline = leafwire("sites", "--nats", site.edge.url, "--wait", "1")
    assert offline.returncode == 2
    assert "the hub's JetStream (domain 'hub') does not answer" in offline.stderr
    extra = leafwire("sites", "list", "ghost", "--nats", site.edge.url)  # refused before any NATS call
    assert extra.returncode == 2
    assert "list takes no site (got 'ghost'); did you mean `remove ghost`?" in extra.stderr


async def test_a_refused_join_is_said_once_and_asked_less_often(edge: nats.NATS,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Edges that may not change the hub's streams (NATS permissions): one warning, not one every few seconds,
    and the hub is asked less and less often (up to every ``check_s``)."""

    async def refused(*_: object, **__: object) -> tuple[bool, int]:
        raise nats.js.errors.APIError(code=403, description="permissions violation")

    waits: list[float] = []
    six = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 6:
            six.set()
        await asyncio.sleep(0)

    monkeypatch.setattr(hub_usage, "join", refused)
    with structlog.testing.capture_logs() as logs:
        loop = asyncio.create_task(hub_usage.keep_joined(edge, SITE, check_s=30, retry_s=5, sleep=sleep))
        try:
            await asyncio.wait_for(six.wait(), 10)
        finally:
            loop.cancel()
    assert waits[:6] == [5, 10, 20, 30, 30, 30]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert "permissions violation" in warnings[0]["error"]


async def test_a_report_cut_short_says_so(site: CuttableSite, edge: nats.NATS, monkeypatch: pytest.MonkeyPatch) -> None:
    """The uplink going down while the hub's usage is read: an error naming what was left, never a table
    that quietly leaves events out."""
    await copied_to_hub(site, edge, 5)
    monkeypatch.setattr(usage_report, "FETCH", 2)
    read = usage_report.events(edge, domain=subjects.HUB, site=SITE, since=None, wait_s=1)
    first = [await anext(read), await anext(read)]
    assert [json.loads(data)["request_id"] for data in first] == ["r0", "r1"]
    site.link.cut()
    with pytest.raises(usage_report.ReportError, match="stopped answering with 3 events still to read"):
        await anext(read)


async def test_the_sites_command_says_unknown_for_a_site_cut_off(site: CuttableSite, edge: nats.NATS, hub: nats.NATS,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked at the hub while a site is cut off, `leafwire sites` does not repeat the hub's lag figure (it stops
    where it was, 0 here, while the site goes on storing): it says unknown. An attached site that sends
    nothing is still heard (nats-server's heartbeats) and shows its figure."""
    monkeypatch.setattr(hub_usage, "DETACHED_AFTER_S", 2.5)
    publisher = await copied_to_hub(site, edge, 2)
    await asyncio.sleep(3.0)  # idle, longer than the threshold
    rows = sites_cli.table(await hub_usage.sites(hub)).splitlines()
    assert rows[1].split()[:2] == [SITE, "0"]
    site.link.cut()
    await publisher.usage(event(9))
    await publisher.flush()
    await asyncio.sleep(3.0)
    rows = sites_cli.table(await hub_usage.sites(hub)).splitlines()
    assert rows[1].split()[:2] == [SITE, "unknown"]
