"""Usage of every site at the hub: the hub's ``USAGE`` stream sources each edge site's (store and forward), and
so does the hub's ``budgets`` bucket (``BUDGETS``: each site's spending, see ``shared/budgets.py``).

An edge keeps its usage events in the ``USAGE`` stream of its own JetStream domain (subjects
``lw.v1.<site>.usage.>``), which works offline. The hub's ``USAGE`` stream (domain ``hub``; its own subjects
``lw.v1.hub.usage.>`` hold what is answered at the hub) lists each edge's stream as a source: nats-server copies
what the edge stored, from where it stopped, whenever the leaf connection is up. Nothing is lost while a site is
offline (within the edge stream's limits) and nothing is copied twice; the copies keep their subjects, so a
reader of the hub's stream filters one site with ``lw.v1.<site>.usage.>``.

An edge puts itself on the hub's list: its usage publishers (cloud-adapter, local-inference) run
``keep_joined``, which adds the site's source when missing — creating the hub's stream if there is none —
and checks again every ``check_s`` (the list is read, changed and written whole, so two sites joining at the
same moment can overwrite each other; each reads the list back and adds itself again, after a random wait
that doubles each time). A site already listed is never dropped this way: only one added between another's
read and write can be. The hub's lag behind this site is exported as ``leafwire_usage_hub_lag_events``;
``sites`` and ``leave`` are ``leafwire sites`` (list, remove a decommissioned site). The cloud-adapter keeps its
site's budgets bucket joined the same way (``keep_joined(..., collected=(USAGE, BUDGETS))``). When the hub answers
again after an outage, ``keep_joined`` has each of its streams change leader (``nudge``): nats-server retries a
source that failed with a back-off of up to two minutes, and a new leader starts its sources at once.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import ExternalStream, StreamConfig, StreamSource
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from shared import budgets, metrics, subjects
from shared.config_bucket import (
    HUB_REPLICAS,
    HUB_TIMEOUT_S,
    HUB_UNREACHABLE,
    REPLICAS_NOT_SUPPORTED,
    hub_unreachable,
    role_of,
)
from shared.errors import HubUnreachable
from shared.logging import get_logger
from shared.usage import usage_stream

log = get_logger("leafwire.usage.hub")
JOIN_TRIES = 8
SETTLE_S = 0.05  # the first wait (at random, up to this, doubling each try) before reading the list back


@dataclass(frozen=True)
class Collected:
    """A stream that each edge keeps in its own JetStream domain and the hub's stream of the same name sources."""

    stream: str
    create: Callable[[JetStreamContext, int, StreamSource], Awaitable[None]]
    """makes the hub's stream (replicas, a first source); may leave the source for the caller to add"""


def site_source(site: str, stream: str = subjects.USAGE) -> StreamSource:
    """The source entry of ``site``'s ``stream``, read through the site's JetStream domain."""
    return StreamSource(name=stream, external=ExternalStream(api=subjects.js_api(site)))


def is_source_of(source: StreamSource, site: str, stream: str = subjects.USAGE) -> bool:
    """True when ``source`` is ``site``'s ``stream``."""
    return source.name == stream and source.external is not None and source.external.api == subjects.js_api(site)


def hub_stream(replicas: int, sources: list[StreamSource]) -> StreamConfig:
    """The hub's ``USAGE`` stream: the hub's own events, and copies of the edges' from ``sources``."""
    config = usage_stream(subjects.HUB, replicas)
    config.sources = sources
    return config


async def _create_usage(hub: JetStreamContext, replicas: int, first: StreamSource) -> None:
    await hub.add_stream(hub_stream(replicas, [first]))


async def _create_budgets(hub: JetStreamContext, replicas: int, _: StreamSource) -> None:
    await hub.create_key_value(budgets.bucket_config(replicas))  # as the hub's adapters make it; sources follow


USAGE = Collected(subjects.USAGE, _create_usage)
BUDGETS = Collected(budgets.STREAM, _create_budgets)


DETACHED_AFTER_S = 10.0


@dataclass(frozen=True)
class SiteSource:
    """One edge site the hub's ``USAGE`` stream sources, as the hub sees it."""

    site: str
    lag: int  # events the hub has not copied yet (as of its last contact)
    heard_s: float | None  # seconds since the hub last heard from the site's stream; None: never
    error: str | None  # what the hub's last attempt to reach it said
    copied: int | None = None  # the sequence, in the site's stream, of the last message the hub copied

    @property
    def attached(self) -> bool:
        """Whether the hub's copy runs now: nats-server hears an attached source at least every second (its
        heartbeats), so one silent for longer than ``DETACHED_AFTER_S`` is cut off, or was never reached."""
        return self.heard_s is not None and self.heard_s < DETACHED_AFTER_S


async def _info(nc: NATS, wait_s: float, stream: str = subjects.USAGE) -> dict[str, Any]:
    """The hub stream's info as JetStream sends it (nats-py's ``stream_info`` drops each source's domain)."""
    subject = f"{subjects.HUB_JS_API}.STREAM.INFO.{stream}"
    resp: dict[str, Any] = json.loads((await nc.request(subject, b"", timeout=wait_s)).data)
    if "error" in resp:
        APIError.from_error(resp["error"])
    return resp


def _sources(resp: dict[str, Any]) -> list[SiteSource]:
    found = []
    for s in resp.get("sources") or []:
        api = str((s.get("external") or {}).get("api") or "")
        if not (api.startswith("$JS.") and api.endswith(".API")):
            continue
        active = int(s.get("active", -1))
        error = s.get("error")
        found.append(SiteSource(api[len("$JS."):-len(".API")], int(s.get("lag") or 0),
                                None if active < 0 else active / 1e9,
                                str(error.get("description", error)) if isinstance(error, dict) else None,
                                int(s["seq"]) if "seq" in s else None))
    return found


async def read_hub(nc: NATS, site: str, wait_s: float,
                   stream: str = subjects.USAGE) -> tuple[StreamConfig, SiteSource | None]:
    """The hub stream's configuration, and ``site`` as one of its sources (``None``: not a source).

    Raises ``NotFoundError`` when the hub has no such stream yet.
    """
    resp = await _info(nc, wait_s, stream)
    return StreamConfig.from_response(resp["config"]), next((s for s in _sources(resp) if s.site == site), None)


async def behind(nc: NATS, source: SiteSource, stream: str) -> int:
    """Messages of this site's ``stream`` the hub has not copied. The hub's own figure goes stale while its
    source is detached (an outage, then nats-server's back-off) and says 0 meanwhile; what this site stored
    past the last message the hub copied does not."""
    if source.copied is None:
        return source.lag
    try:
        last = (await nc.jetstream(timeout=HUB_TIMEOUT_S).stream_info(stream)).state.last_seq
    except Exception:  # this site's own stream: not there (yet), or JetStream busy; the hub's figure then
        return source.lag
    return max(source.lag, last - source.copied)


async def sites(nc: NATS, wait_s: float = HUB_TIMEOUT_S) -> list[SiteSource]:
    """Every site the hub's ``USAGE`` stream sources (none when it has no such stream yet). Raises
    ``HubUnreachable`` when the hub's JetStream does not answer."""
    try:
        return _sources(await _info(nc, wait_s))
    except NotFoundError:
        return []
    except HUB_UNREACHABLE as exc:
        raise hub_unreachable(wait_s) from exc


async def leave(nc: NATS, site: str, wait_s: float = HUB_TIMEOUT_S) -> bool:
    """Take ``site`` off the sources of the hub's ``USAGE`` stream and ``budgets`` bucket (what was copied
    stays); False when it was on neither.

    A site whose services still run puts itself back within ``LW_USAGE_HUB_CHECK_S``. Raises
    ``HubUnreachable`` when the hub does not answer, ``RuntimeError`` when the site kept coming back.
    """
    removed = [(await _set_listed(nc, site, False, wait_s, collected))[0] for collected in (USAGE, BUDGETS)]
    return any(removed)


async def _create(hub: JetStreamContext, site: str, collected: Collected) -> None:
    """Create the hub's stream with ``site`` as its first source (one replica on a one-node hub); a stream
    created meanwhile by someone else is left as it is."""
    for replicas in (HUB_REPLICAS, 1):
        try:
            await collected.create(hub, replicas, site_source(site, collected.stream))
            log.info("hub stream created", stream=collected.stream, replicas=replicas, site=site)
            return
        except APIError as exc:
            if exc.err_code == REPLICAS_NOT_SUPPORTED:
                continue
            try:
                await hub.stream_info(collected.stream)
            except NotFoundError:
                raise exc from None
            return


async def join(nc: NATS, site: str, wait_s: float = HUB_TIMEOUT_S, collected: Collected = USAGE) -> tuple[bool, int]:
    """Make the hub's stream source ``site``'s: ``(added now, the hub's lag behind the site)``.

    Raises ``HubUnreachable`` when the hub's JetStream does not answer, and ``RuntimeError`` when the source
    did not stay on the list after ``JOIN_TRIES`` writes (other sites kept rewriting it).
    """
    added, lag = await _set_listed(nc, site, True, wait_s, collected)
    return added, lag or 0


async def _set_listed(nc: NATS, site: str, listed: bool, wait_s: float,
                      collected: Collected) -> tuple[bool, int | None]:
    """Put ``site`` on (``listed``) or off the hub stream's sources, creating the stream to put it on: each
    write is read back after a random wait that doubles each try, as another site may have rewritten the
    list meanwhile. ``(whether this call changed it, the hub's lag behind the site when listed)``."""
    hub = nc.jetstream(domain=subjects.HUB, timeout=wait_s)
    name = collected.stream
    changed = False
    try:
        for attempt in range(JOIN_TRIES):
            try:
                config, source = await read_hub(nc, site, wait_s, name)
            except NotFoundError:
                if not listed:
                    return changed, None
                await _create(hub, site, collected)
                changed = True
                continue
            if (source is not None) == listed:
                return changed, None if source is None else await behind(nc, source, name)
            others = [s for s in config.sources or [] if not is_source_of(s, site, name)]
            config.sources = [*others, site_source(site, name)] if listed else others
            await hub.update_stream(config)
            changed = True
            await asyncio.sleep(random.uniform(0, SETTLE_S * 2**attempt))
    except HUB_UNREACHABLE as exc:
        raise hub_unreachable(wait_s) from exc
    if listed:
        raise RuntimeError(f"site {site!r} did not stay among the sources of the hub's {name} after {JOIN_TRIES} "
                           "writes")
    raise RuntimeError(f"site {site!r} came back among the sources of the hub's {name} {JOIN_TRIES} times: is it "
                       "still running? (LW_USAGE_HUB_CHECK_S=0 keeps it off)")


async def nudge(nc: NATS, stream: str, wait_s: float = HUB_TIMEOUT_S) -> None:
    """Have the hub's stream ``stream`` change leader, whose new leader starts its sources at once. After an
    outage nats-server retries a source with a back-off of up to two minutes, which no setting changes: the
    hub went on missing a site's events (and spending) 30-80 s after its link was back. Best effort: a hub
    of one node has no other leader, and says so."""
    subject = f"{subjects.HUB_JS_API}.STREAM.LEADER.STEPDOWN.{stream}"
    try:
        answer = json.loads((await nc.request(subject, b"", timeout=wait_s)).data)
    except Exception as exc:
        log.debug("could not move the hub stream's leader", stream=stream, error=repr(exc))
        return
    log.info("the hub's stream changed leader, to copy this site's at once", stream=stream,
             error=(answer.get("error") or {}).get("description"))


async def keep_joined(nc: NATS, site: str, check_s: float, retry_s: float = 5.0,
                      sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                      collected: Sequence[Collected] = (USAGE,)) -> None:
    """Keep the hub's streams of ``collected`` sourcing this site's, for as long as it runs; returns at once on
    the hub or a standalone server (nothing to forward), and does nothing when ``check_s`` is 0. (``sleep``:
    how it waits between checks.)"""
    if check_s <= 0:
        return
    while True:
        try:
            role = await role_of(nc.jetstream(timeout=HUB_TIMEOUT_S))
            break
        except Exception as exc:  # JetStream still starting: ask again
            log.debug("JetStream domain unknown yet", error=repr(exc))
            await asyncio.sleep(retry_s)
    if role != "edge":
        return
    unreachable, failures, said = False, 0, ""
    while True:
        try:
            for each in collected:
                added, lag = await join(nc, site, collected=each)
                if each is USAGE:
                    metrics.USAGE_HUB_LAG.set(lag)
                if added or unreachable or failures:
                    log.info("the hub's stream sources this site's", stream=each.stream, site=site, lag=lag)
                if unreachable:  # the link is back: have the hub copy what was stored meanwhile now
                    await nudge(nc, each.stream)
            unreachable, failures, said, wait = False, 0, "", check_s
        except HubUnreachable as exc:
            metrics.USAGE_HUB_LAG.set(-1)  # unknown: the hub cannot say, and this site goes on storing
            if not unreachable:
                log.info("hub not reachable: usage events and spending wait in this site's streams",
                         reason=exc.message)
            unreachable, wait = True, retry_s
        except Exception as exc:  # refused (permissions, limits): said once per kind, asked less and less often
            failures += 1
            wait = min(check_s, retry_s * 2 ** (failures - 1))
            if (text := str(exc) or repr(exc)) != said:  # str: nats-py's errors say nothing in their repr
                said = text
                log.warning("could not add this site to the hub's sources; retrying", error=said, retry_s=wait)
        await sleep(wait)
