"""The adapter's JetStream state on real nats-servers: buckets, the cache, and one ledger shared by adapters and
by sites (a hub and an edge whose leaf link can be cut)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import nats
import pytest
from nats.js.api import KeyValueConfig

from schemas.chat import Usage
from schemas.cloud import BudgetStatus
from services.cloud_adapter.budget import Ledger
from services.cloud_adapter.cache import Entry
from services.cloud_adapter.config import Budgets
from services.cloud_adapter.settings import CloudSettings
from services.cloud_adapter.state import CloudState
from shared import hub_usage
from shared.errors import BudgetExceeded
from shared.streams import ensure_kv
from tests.support import CuttableSite, connected, free_port, leafwire, start_cuttable_site, start_single

T = TypeVar("T")
BUDGETS = Budgets.model_validate({"tenant_default": {"daily_usd": 1.0}})


async def opened(nc: nats.NATS, ledger: Ledger, tmp: Path, **env: object) -> CloudState:
    settings = CloudSettings.model_validate({"site": "state", "LW_PROVIDERS_FILE": str(tmp / "none.yaml"),
                                             **env})
    state = CloudState(nc, settings, ledger)
    await asyncio.wait_for(state.open(), 10)
    return state


async def eventually(probe: Callable[[], T]) -> T:
    """Poll ``probe`` until it is truthy, for at most 10 s (a watcher or a background write to land)."""
    async with asyncio.timeout(10):
        while True:
            if value := probe():
                return value
            await asyncio.sleep(0.02)


async def test_cache_round_trip(nc: nats.NATS, tmp_path: Path) -> None:
    """An answer stored under a key reads back whole; an absent key reads as a miss."""
    state = await opened(nc, Ledger(BUDGETS, "state"), tmp_path)
    entry = Entry({"content": "hi"}, "stop", Usage.of(2, 1))
    state.cache_put("t.k1", entry)
    await eventually(lambda: state._writes == set())
    assert await state.cache_get("t.k1") == entry
    assert await state.cache_get("t.absent") is None
    await state.close(lambda _: None)


async def test_changed_ttl_is_applied_to_the_existing_bucket(nc: nats.NATS) -> None:
    """Reopening a bucket with another TTL changes it in place (values kept)."""
    kv = await ensure_kv(nc, KeyValueConfig(bucket="ttl-test", ttl=60))
    await kv.put("k", b"v")
    await ensure_kv(nc, KeyValueConfig(bucket="ttl-test", ttl=120))
    info = await nc.jetstream().stream_info("KV_ttl-test")
    assert info.config.max_age == 120
    assert (await kv.get("k")).value == b"v"


async def test_two_adapters_share_one_ledger(nc: nats.NATS, tmp_path: Path) -> None:
    """Spending written by two adapters adds up in the bucket; each sees the other's; the crossing into
    'warning' is reported once, by the adapter whose write crossed it."""
    a, b = Ledger(BUDGETS, "state"), Ledger(BUDGETS, "state")
    state_a, state_b = await opened(nc, a, tmp_path), await opened(nc, b, tmp_path)
    alerts: list[tuple[str, BudgetStatus]] = []
    a.charge("shared", 0.5)
    await state_a.flush_budgets(lambda s: alerts.append(("a", s)))
    b.charge("shared", 0.35)
    await eventually(lambda: b.account("tenant-shared", "daily").known == 0.5)  # b's watcher saw a's write
    await state_b.flush_budgets(lambda s: alerts.append(("b", s)))
    kv = await nc.jetstream().key_value("budgets")
    stored = BudgetStatus.model_validate_json((await kv.get("tenant-shared.daily.state")).value or b"")
    assert stored.spent_usd == pytest.approx(0.85)
    assert stored.state == "warning"
    assert [(who, s.scope, s.state) for who, s in alerts] == [("b", "tenant-shared", "warning")]
    await eventually(lambda: a.account("tenant-shared", "daily").spent == pytest.approx(0.85))
    a.charge("shared", 0.2)
    with pytest.raises(Exception, match="budget"):
        a.check("shared")
    await state_a.close(lambda _: None)
    await state_b.close(lambda _: None)


async def test_usage_events_are_kept(nc: nats.NATS, tmp_path: Path) -> None:
    """A usage event published by the state is stored by the site's USAGE stream."""
    from schemas.cloud import UsageEvent
    state = await opened(nc, Ledger(BUDGETS, "state"), tmp_path)
    await state.publish_usage(UsageEvent(request_id="u1", tenant="t", site="state", target="p/m",
                                         prompt_tokens=1, completion_tokens=2, cost_usd=0.1))
    await state.close(lambda _: None)
    msg = await nc.jetstream().get_last_msg("USAGE", "lw.v1.state.usage.events")
    assert json.loads(msg.data)["request_id"] == "u1"


async def test_buckets_and_stream_deleted_underneath_come_back(nc: nats.NATS, tmp_path: Path) -> None:
    """An operator resets budgets by deleting the bucket (or the server lost its storage): the adapter creates
    what is missing again, forgets what the old bucket said was spent, and counts from zero; usage events
    are stored again too."""
    from schemas.cloud import UsageEvent
    ledger = Ledger(BUDGETS, "state")
    state = await opened(nc, ledger, tmp_path, LW_CLOUD_STATE_CHECK_S=0.2)
    ledger.charge("reset", 0.5)
    await state.flush_budgets(lambda _: None)
    await eventually(lambda: ledger.account("tenant-reset", "daily").spent == pytest.approx(0.5))
    js = nc.jetstream()
    await js.delete_key_value("budgets")
    await js.delete_stream("USAGE")

    async def exists(name: str) -> bool:
        try:
            await js.stream_info(name)
            return True
        except nats.js.errors.NotFoundError:
            return False

    async with asyncio.timeout(10):
        while not (await exists("KV_budgets") and await exists("USAGE")):  # noqa: ASYNC110 - polling NATS
            await asyncio.sleep(0.05)
    await eventually(lambda: ledger.account("tenant-reset", "daily").spent == 0)
    ledger.charge("reset", 0.1)
    await state.flush_budgets(lambda _: None)
    kv = await js.key_value("budgets")
    stored = BudgetStatus.model_validate_json((await kv.get("tenant-reset.daily.state")).value or b"")
    assert stored.spent_usd == pytest.approx(0.1)
    await state.publish_usage(UsageEvent(request_id="after-reset", tenant="t", site="state", target="p/m",
                                         prompt_tokens=1, completion_tokens=1))
    await state.close(lambda _: None)
    msg = await js.get_last_msg("USAGE", "lw.v1.state.usage.events")
    assert json.loads(msg.data)["request_id"] == "after-reset"


def test_the_budgets_command_before_any_spending_and_without_nats(tmp_path: Path) -> None:
    """`leafwire budgets` on a server where no adapter ran says nothing was spent (exit 0); with no server
    there, one line and exit 2."""
    server = start_single(tmp_path)
    try:
        empty = leafwire("budgets", "--nats", server.url)
    finally:
        server.stop()
    assert (empty.returncode, empty.stdout.strip()) == (0, "no cloud spending recorded in the current day or month")
    absent = leafwire("budgets", "--nats", f"nats://127.0.0.1:{free_port()}", "--wait", "1")
    assert absent.returncode == 2
    assert absent.stderr.startswith("leafwire budgets: no NATS server at")
    assert len(absent.stderr.splitlines()) == 1


async def test_one_budget_across_sites_also_offline(tmp_path: Path) -> None:
    """An edge's and the hub's spending count against one budget: each ledger learns the other's; with the
    uplink cut the edge keeps counting (and refuses once its own spending takes the total over), and once the
    link is back both know everything that was spent meanwhile."""
    with start_cuttable_site(tmp_path, "plant7") as site:
        async with connected(site.hub.url) as hub_nc, connected(site.edge.url) as edge_nc:
            await sites_share_a_budget(site, hub_nc, edge_nc, tmp_path)


async def sites_share_a_budget(site: CuttableSite, hub_nc: nats.NATS, edge_nc: nats.NATS, tmp: Path) -> None:
    at_hub, at_edge = Ledger(BUDGETS, "hub"), Ledger(BUDGETS, "plant7")
    hub_state = await opened(hub_nc, at_hub, tmp, site="hub")
    edge_state = await opened(edge_nc, at_edge, tmp, site="plant7")
    assert (await hub_usage.join(edge_nc, "plant7", collected=hub_usage.BUDGETS))[0]
    alerts: list[tuple[str, BudgetStatus]] = []

    def spent(ledger: Ledger) -> float:
        return ledger.account("tenant-acme", "daily").spent

    at_hub.charge("acme", 0.3)
    await hub_state.flush_budgets(lambda s: alerts.append(("hub", s)))
    at_edge.charge("acme", 0.4)
    await edge_state.flush_budgets(lambda s: alerts.append(("edge", s)))
    await eventually(lambda: spent(at_hub) == pytest.approx(0.7) and spent(at_edge) == pytest.approx(0.7))

    site.link.cut()
    at_edge.charge("acme", 0.35)
    await edge_state.flush_budgets(lambda s: alerts.append(("edge", s)))  # written at the edge, offline
    with pytest.raises(BudgetExceeded):
        at_edge.check("acme")
    await edge_state.close(lambda _: None)  # the edge's adapter restarts while offline: it reads what it knew
    at_edge = Ledger(BUDGETS, "plant7")
    edge_state = await opened(edge_nc, at_edge, tmp, site="plant7")
    await eventually(lambda: spent(at_edge) == pytest.approx(1.05))
    at_hub.charge("acme", 0.1)
    await hub_state.flush_budgets(lambda s: alerts.append(("hub", s)))
    at_hub.check("acme")  # 0.8 as far as the hub knows
    assert [(who, s.state, round(s.total_usd or 0, 2)) for who, s in alerts] == [  # the edge jumped 0.7 -> 1.05
        ("edge", "warning", 1.05), ("edge", "exhausted", 1.05), ("hub", "warning", 0.8)]
    offline = await asyncio.to_thread(leafwire, "budgets", "--nats", site.edge.url, "--tenant", "acme", "--json")
    assert offline.returncode == 0, offline.stderr
    daily = next(b for b in json.loads(offline.stdout) if b["scope"] == "tenant-acme" and b["period"] == "daily")
    assert (daily["spent_usd"], daily["limit_usd"], daily["state"]) == (1.05, 1.0, "exhausted")
    assert daily["sites"] == {"hub": pytest.approx(0.3), "plant7": pytest.approx(0.75)}
    offline_table = await asyncio.to_thread(leafwire, "budgets", "--nats", site.edge.url)
    last = offline_table.stdout.splitlines()[-1]  # the hub's figures are a copy: the table says how old
    assert re.fullmatch(r"other sites' spending: as this edge's mirror of the hub last heard it, \d+ s ago", last)

    site.link.restore()
    await eventually(lambda: spent(at_hub) == pytest.approx(1.15) and spent(at_edge) == pytest.approx(1.15))
    with pytest.raises(BudgetExceeded):
        at_hub.check("acme")
    table = await asyncio.to_thread(leafwire, "budgets", "--nats", site.hub.url)
    assert table.returncode == 0, table.stderr
    row = next(line.split() for line in table.stdout.splitlines() if line.startswith("tenant-acme  daily"))
    assert row[3:7] == ["1.1500", "1", "115%", "exhausted"]
    assert " ".join(row[7:]) == "plant7 0.7500, hub 0.4000"
    assert "other sites' spending" not in table.stdout  # the hub's table is every site's own
    kv = await hub_nc.jetstream().key_value("budgets")
    stored = {key: BudgetStatus.model_validate_json((await kv.get(key)).value or b"").spent_usd
              for key in ("tenant-acme.daily.hub", "tenant-acme.daily.plant7")}
    assert stored == {"tenant-acme.daily.hub": pytest.approx(0.4), "tenant-acme.daily.plant7": pytest.approx(0.75)}
    await hub_state.close(lambda _: None)
    await edge_state.close(lambda _: None)


async def test_after_an_outage_the_edge_learns_the_hubs_spending_at_once(tmp_path: Path) -> None:
    """An outage long enough for nats-server to give up on the edge's mirror of the hub's budgets (a lost
    request, then its back-off: 30-150 s more after the link is back). The edge's adapter, finding the mirror
    silent while the hub answers, creates it anew: it knows what the hub spent meanwhile within seconds."""
    with start_cuttable_site(tmp_path, "plant8") as site:
        async with connected(site.hub.url) as hub_nc, connected(site.edge.url) as edge_nc:
            at_hub, at_edge = Ledger(BUDGETS, "hub"), Ledger(BUDGETS, "plant8")
            hub_state = await opened(hub_nc, at_hub, tmp_path, site="hub")
            edge_state = await opened(edge_nc, at_edge, tmp_path, site="plant8", LW_CLOUD_STATE_CHECK_S=1)
            try:
                at_hub.charge("acme", 0.2)
                await hub_state.flush_budgets(lambda _: None)
                await eventually(lambda: at_edge.account("tenant-acme", "daily").spent == pytest.approx(0.2))
                site.link.cut()
                await asyncio.sleep(22)  # the mirror finds its source silent (10-15 s); its next request is lost
                at_hub.charge("acme", 0.5)
                await hub_state.flush_budgets(lambda _: None)
                site.link.restore()
                await eventually(lambda: at_edge.account("tenant-acme", "daily").spent == pytest.approx(0.7))
            finally:
                await hub_state.close(lambda _: None)
                await edge_state.close(lambda _: None)


async def test_a_hub_budgets_bucket_made_anew_reaches_the_edge(tmp_path: Path) -> None:
    """The hub's budgets bucket deleted to reset it (or a hub that lost its storage) is made anew by the hub's
    adapter. The edge's mirror would wait for the new stream's sequence to pass the old one, counting the old
    spending until then; the edge's adapter makes the mirror anew and counts what the hub spends from then."""
    with start_cuttable_site(tmp_path, "plant6") as site:
        async with connected(site.hub.url) as hub_nc, connected(site.edge.url) as edge_nc:
            at_hub, at_edge = Ledger(BUDGETS, "hub"), Ledger(BUDGETS, "plant6")
            hub_state = await opened(hub_nc, at_hub, tmp_path, site="hub", LW_CLOUD_STATE_CHECK_S=1)
            edge_state = await opened(edge_nc, at_edge, tmp_path, site="plant6", LW_CLOUD_STATE_CHECK_S=1)
            try:
                for _ in range(5):  # five writes: the hub's stream is at sequence 5
                    at_hub.charge("acme", 0.04)
                    await hub_state.flush_budgets(lambda _: None)
                await eventually(lambda: at_edge.account("tenant-acme", "daily").spent == pytest.approx(0.2))
                await hub_nc.jetstream().delete_stream("KV_budgets")
                await eventually(lambda: at_hub.account("tenant-acme", "daily").spent == 0)  # reset at the hub
                at_hub.charge("acme", 0.05)
                await hub_state.flush_budgets(lambda _: None)
                await eventually(lambda: at_edge.account("tenant-acme", "daily").spent == pytest.approx(0.05))
            finally:
                await hub_state.close(lambda _: None)
                await edge_state.close(lambda _: None)
