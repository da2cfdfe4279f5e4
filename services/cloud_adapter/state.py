"""The cloud-adapter's state in NATS JetStream: the answer cache, provider health and budgets (KV buckets)
and usage events (the ``USAGE`` stream), all in the JetStream domain of the adapter's site. On an edge site,
also ``HUB_BUDGETS``: the mirror of the hub's budgets, where the other sites' spending is read
(``shared/budgets.py``).

This is the adapter's only JetStream boundary. JetStream may be unavailable (a cluster electing, a site
starting): the adapter still answers — the cache misses, spending stays pending in memory and is written
once the buckets open, health is published then — and ``/readyz`` says what is missing meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from schemas.cloud import BudgetStatus, ProviderHealth, ProviderRate, UsageEvent
from services.cloud_adapter.budget import Account, Ledger
from services.cloud_adapter.cache import Entry
from services.cloud_adapter.near_cache import NearCache
from services.cloud_adapter.rate import WINDOW_S, Peers, rate_key
from services.cloud_adapter.settings import CloudSettings
from services.cloud_adapter.vector_cache import Vector
from shared import budgets, subjects
from shared.config_bucket import Role, role_of
from shared.kv_follow import follow_bucket
from shared.logging import get_logger
from shared.streams import ensure_kv
from shared.tasks import stop_tasks
from shared.usage import UsagePublisher

C = TypeVar("C", Entry, Vector)
log = get_logger("leafwire.cloud_adapter.state")
CACHE_GET_TIMEOUT_S = 0.5
MAX_BACKGROUND_WRITES = 1000
CAS_TRIES = 5


class CloudState:
    """KV buckets and the usage stream, opened in the background and used best-effort."""

    def __init__(self, nc: NATS, settings: CloudSettings, ledger: Ledger) -> None:
        self._nc = nc
        self._settings = settings
        self._ledger = ledger
        self._usage = UsagePublisher(nc, settings.site, settings.usage_pending_max)
        # A copy in memory lives no longer than the bucket keeps the entry (LW_CLOUD_CACHE_TTL_S).
        self._near: NearCache[Entry | Vector] = NearCache(settings.near_cache_bytes,
                                                          min(settings.near_cache_ttl_s, settings.cache_ttl_s))
        self.cache: KeyValue | None = None
        self.health: KeyValue | None = None
        self.budgets: KeyValue | None = None
        self.rates: KeyValue | None = None
        self.role: Role | None = None
        self.opened = asyncio.Event()
        self._writes: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._hub_budgets = budgets.hub_mirror()  # one for the adapter's lifetime: it remembers what it saw

    def problem(self) -> str | None:
        """For ``/readyz``: ``None`` once every bucket and the stream are open."""
        return None if self.opened.is_set() else "JetStream state (KV buckets, USAGE stream) is not open yet"

    async def open(self, retry_s: float = 2.0) -> None:
        """Open (creating where needed) the buckets and the stream, retrying until JetStream answers."""
        while True:
            try:
                await self._open_once()
                break
            except Exception as exc:  # JetStream off, electing, or not reachable yet
                log.warning("JetStream state not open yet; retrying", error=repr(exc), retry_s=retry_s)
                await asyncio.sleep(retry_s)
        self.opened.set()
        log.info("JetStream state open", buckets=[subjects.CLOUD_CACHE, subjects.PROVIDER_HEALTH, subjects.BUDGETS,
                                                  subjects.PROVIDER_RATES],
                 stream=subjects.USAGE)
        self.spawn(follow_bucket(self._budgets_bucket, ">", self._budget_entry, name=subjects.BUDGETS,
                                 replaced=self._budgets_replaced, check_s=self._settings.state_check_s))
        if self.role == "edge":
            self.spawn(follow_bucket(lambda: budgets.open_mirror(self._nc.jetstream(timeout=5)), ">",
                                     self._other_sites_entry, name=subjects.HUB_BUDGETS,
                                     check_s=self._settings.state_check_s))
        self.spawn(self._keep_open(retry_s))

    async def _keep_open(self, retry_s: float) -> None:
        """Create again what was deleted underneath (a bucket removed to reset it, a server that lost its
        storage): checked every ``LW_CLOUD_STATE_CHECK_S``."""
        while True:
            await asyncio.sleep(self._settings.state_check_s)
            try:
                missing = await self._missing()
                if missing:
                    log.warning("JetStream state deleted underneath; creating it again", missing=missing)
                    await self._open_once()
                elif self.role == "edge" and (why := await self._hub_budgets.resync(
                        self._nc, self._nc.jetstream(timeout=5))) is not None:
                    log.info("the mirror of the hub's budgets was created anew", why=why)
            except Exception as exc:  # JetStream unavailable: the next round tries again
                log.debug("JetStream state check failed", error=repr(exc))

    async def _missing(self) -> list[str]:
        """The buckets' streams and the usage stream that do not exist."""
        js = self._nc.jetstream(timeout=5)
        names = [subjects.kv_stream(b) for b in (subjects.CLOUD_CACHE, subjects.PROVIDER_HEALTH, subjects.BUDGETS,
                                                 subjects.PROVIDER_RATES)]
        if self.role == "edge":
            names.append(subjects.HUB_BUDGETS)
        missing = []
        for name in [*names, subjects.USAGE]:
            try:
                await js.stream_info(name)
            except NotFoundError:
                missing.append(name)
        return missing

    async def _open_once(self) -> None:
        s = self._settings
        common = {"storage": StorageType.FILE, "replicas": s.kv_replicas, "history": 1}
        self.cache = await ensure_kv(self._nc, KeyValueConfig(
            bucket=subjects.CLOUD_CACHE, ttl=s.cache_ttl_s, max_bytes=s.cache_max_bytes,
            max_value_size=s.cache_max_entry_bytes, direct=True, **common),  # type: ignore[arg-type]
            drop_oldest=True)
        self.health = await ensure_kv(self._nc, KeyValueConfig(
            bucket=subjects.PROVIDER_HEALTH, direct=True, **common))  # type: ignore[arg-type]
        self.budgets = await ensure_kv(self._nc, budgets.bucket_config(s.kv_replicas))
        # A minute's counts: kept in memory, and an adapter's entry outlives its last call by a minute or more.
        self.rates = await ensure_kv(self._nc, KeyValueConfig(
            bucket=subjects.PROVIDER_RATES, ttl=2 * WINDOW_S, storage=StorageType.MEMORY,
            replicas=s.kv_replicas, history=1, direct=True))
        await self._usage.ensure_stream(s.kv_replicas)
        js = self._nc.jetstream(timeout=5)
        self.role = await role_of(js)
        if self.role == "edge":
            await budgets.ensure_mirror(js)

    async def _budgets_bucket(self) -> KeyValue:
        if self.budgets is None:
            raise BucketNotFoundError
        return self.budgets

    async def _budget_entry(self, key: str, value: bytes | None, revision: int) -> None:
        """Keep the ledger in step with what every adapter wrote."""
        if value is None:
            self._ledger.cleared(key)
            return
        try:
            self._ledger.seen(BudgetStatus.model_validate_json(value), revision)
        except ValidationError:
            log.warning("unreadable budget entry", key=key)

    async def _other_sites_entry(self, key: str, value: bytes | None, revision: int) -> None:
        """Other sites' spending, from the edge's mirror of the hub."""
        if budgets.elsewhere(key, self._settings.site):
            await self._budget_entry(key, value, revision)

    async def _budgets_replaced(self) -> None:
        self._ledger.forget_revisions()

    # -- cache

    async def cache_get(self, key: str) -> Entry | None:
        """The cached answer under ``key`` (from memory when recently used, else the KV bucket); ``None``
        when absent, unreadable, or JetStream is slow."""
        return await self._cached(key, Entry, Entry.decode)

    async def vectors_get(self, keys: Sequence[str]) -> list[Vector | None]:
        """The stored vector under each key (``None`` where absent or unreadable), asked all at once."""
        return list(await asyncio.gather(*(self._cached(key, Vector, Vector.decode) for key in keys)))

    async def _cached(self, key: str, kind: type[C], decode: Callable[[bytes], C | None]) -> C | None:
        """What is stored under ``key``, read as ``kind`` (from memory when recently used)."""
        if isinstance(near := self._near.get(key), kind):
            return near
        value = await self._cache_value(key)
        found = decode(value) if value else None
        if found is not None and value:
            left = (self._settings.cache_ttl_s - (time.time() - found.stored_at) if isinstance(found, Entry)
                    else None)  # a vector's age is not stored: at most the near cache's own life
            self._near.put(key, found, len(value), left)
        return found

    async def _cache_value(self, key: str) -> bytes | None:
        """The cache bucket's value under ``key``; ``None`` when absent, or JetStream is slow or failing."""
        if self.cache is None:
            return None
        try:
            async with asyncio.timeout(CACHE_GET_TIMEOUT_S):
                return (await self.cache.get(key)).value
        except KeyNotFoundError:
            return None
        except Exception as exc:
            log.warning("cache lookup failed", error=repr(exc))
            return None

    def cache_put(self, key: str, entry: Entry) -> None:
        """Store an answer in the background (skipped when too large or too many writes are pending)."""
        value = entry.encode()
        if self.cache is None or len(value) > self._settings.cache_max_entry_bytes:
            return
        self._near.put(key, entry, len(value))  # its life is capped at the bucket's TTL already
        self._background(self.cache.put(key, value), "cache write failed")

    def vectors_put(self, stored: Sequence[tuple[str, Vector]]) -> None:
        """Store new vectors in the background, one write after another (one pending write for them all);
        those too large for an entry are skipped."""
        if self.cache is None:
            return
        cache, values = self.cache, []
        for key, vector in stored:
            if len(value := vector.encode()) <= self._settings.cache_max_entry_bytes:
                values.append((key, value))
                self._near.put(key, vector, len(value))

        async def write() -> None:
            for key, value in values:
                await cache.put(key, value)

        if values:
            self._background(write(), "cache write failed")

    # -- provider health

    async def _read_health(self, provider: str) -> ProviderHealth | None:
        assert self.health is not None
        try:
            entry = await self.health.get(provider)
            return ProviderHealth.model_validate_json(entry.value or b"")
        except (KeyNotFoundError, ValidationError):
            return None
        except Exception as exc:  # JetStream busy: the breaker starts closed, as it would with no entry
            log.warning("provider health not read", provider=provider, error=repr(exc))
            return None

    def put_health(self, health: ProviderHealth) -> None:
        """Publish a provider's breaker state to the ``provider-health`` bucket (background)."""
        if self.health is not None:
            self._background(self.health.put(health.provider, health.model_dump_json().encode()),
                             "provider health write failed")

    async def health_loop(self, healths: Callable[[], Iterable[ProviderHealth]], changed: asyncio.Event,
                          resume: Callable[[ProviderHealth], None] = lambda _: None) -> None:
        """Publish every provider's health when one changes, and every ``health_interval_s`` anyway; first,
        ``resume`` gets what the bucket held for each provider (a breaker left open stays open)."""
        await self.opened.wait()
        for health in list(healths()):
            if (known := await self._read_health(health.provider)) is not None:
                resume(known)
        while True:
            for health in healths():
                self.put_health(health)
            changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.health_interval_s):
                    await changed.wait()

    # -- the site's adapters' rpm and tpm

    async def rates_loop(self, tallies: Callable[[bool], Iterable[ProviderRate]], peers: Peers) -> None:
        """Write this adapter's last minute of each provider with an rpm or tpm to ``provider-rates`` every
        ``rate_sync_s`` while it changes (all of it again to a bucket made anew), and follow the other
        adapters' entries into ``peers``."""
        await self.opened.wait()

        async def entry(key: str, value: bytes | None, revision: int) -> None:
            if value is None:
                peers.gone(key)
                return
            try:
                peers.seen(key, ProviderRate.model_validate_json(value))
            except ValidationError:
                log.warning("unreadable provider rate entry", key=key)

        self.spawn(follow_bucket(self._rates_bucket, ">", entry, name=subjects.PROVIDER_RATES,
                                 check_s=self._settings.state_check_s))
        written: KeyValue | None = None  # the bucket written last: one made anew lacks what was written before
        while True:
            await asyncio.sleep(self._settings.rate_sync_s)
            if (bucket := self.rates) is not None:
                for rate in tallies(bucket is not written):
                    self._background(bucket.put(rate_key(rate), rate.model_dump_json().encode()),
                                     "provider rate write failed")
                written = bucket

    async def _rates_bucket(self) -> KeyValue:
        if self.rates is None:
            raise BucketNotFoundError
        return self.rates

    # -- budgets

    async def budget_loop(self, alert: Callable[[BudgetStatus], None], after: Callable[[], None]) -> None:
        """Write pending spending every ``budget_flush_s``; ``alert`` gets each crossing of a level,
        ``after`` is called after each flush."""
        await self.opened.wait()
        while True:
            await asyncio.sleep(self._settings.budget_flush_s)
            await self.flush_budgets(alert)
            after()

    async def flush_budgets(self, alert: Callable[[BudgetStatus], None]) -> None:
        """Add every account's pending spending to the bucket (compare-and-set, retried on conflict)."""
        for acct in self._ledger.due():
            try:
                await self._flush_account(acct, alert)
            except Exception as exc:
                log.warning("budget write failed; kept for the next flush", key=acct.key, error=repr(exc))

    async def _flush_account(self, acct: Account, alert: Callable[[BudgetStatus], None]) -> None:
        assert self.budgets is not None
        for _ in range(CAS_TRIES):
            before, revision = await self._read_budget(acct)
            amount = acct.pending
            status = self._ledger.status(acct, before + amount)
            try:
                new_revision = await self.budgets.update(acct.key, status.model_dump_json().encode(), last=revision)
            except KeyWrongLastSequenceError:
                continue
            for crossed in self._ledger.written(acct, amount, before, before + amount, new_revision):
                alert(status if crossed == status.state else status.model_copy(update={"state": crossed}))
            return
        log.warning("budget write kept losing races; kept for the next flush", key=acct.key)

    async def _read_budget(self, acct: Account) -> tuple[float, int]:
        """(spent in the account's window, revision) as the bucket holds it now."""
        assert self.budgets is not None
        try:
            entry = await self.budgets.get(acct.key)
        except KeyNotFoundError:
            return 0.0, 0
        try:
            status = BudgetStatus.model_validate_json(entry.value or b"")
        except ValidationError:
            return 0.0, entry.revision or 0
        return (status.spent_usd if status.window == acct.window else 0.0), entry.revision or 0

    # -- usage events

    async def publish_usage(self, event: UsageEvent) -> None:
        """Publish a usage event to the ``USAGE`` stream; its ack is awaited in the background."""
        await self._usage.usage(event)

    async def publish_budget_alert(self, status: BudgetStatus) -> None:
        """Publish a budget that crossed its warning level or its limit (kept by ``USAGE`` as well)."""
        await self._usage.publish(subjects.budget_alerts(self._settings.site), status.model_dump_json().encode())

    # -- life cycle

    def _background(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        if len(self._writes) >= MAX_BACKGROUND_WRITES:
            coro.close()
            log.warning("too many pending writes; one skipped", what=what)
            return

        async def run() -> None:
            try:
                await coro
            except Exception as exc:
                log.warning(what, error=repr(exc))

        task = asyncio.create_task(run())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run one of this state's loops until ``close``."""
        self._tasks.append(asyncio.create_task(coro))

    async def close(self, alert: Callable[[BudgetStatus], None]) -> None:
        """Write what is pending (spending, cache, health, usage acks), then stop the loops."""
        if self.opened.is_set():
            with contextlib.suppress(Exception):
                await self.flush_budgets(alert)
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=5)
        await self._usage.flush()
        await stop_tasks(self._tasks)
