"""The ``config`` KV bucket: written at the hub, mirrored read-only into every edge site's JetStream domain.

What a process finds depends on the JetStream domain of the server it is connected to:

    domain    role          the local ``config`` bucket                   writes go to
    hub       hub           the bucket itself (replicas 3 on a cluster)    the bucket
    <site>    edge          a mirror of the hub's ``KV_config`` stream     the hub's bucket, across the leaf
    (none)    standalone    a plain bucket: there is no hub to mirror      the bucket

An edge creates its mirror without asking the hub, so a site that starts offline still has one: empty
(or as last synced) until the uplink returns, then filled in by nats-server. Reads of the mirror (get,
keys, history, watch) work offline; writes must go to the hub (``writer``). A plain ``config`` bucket
left in an edge's domain by an older leafwire is replaced by the mirror, and what it held is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterable
from typing import Literal

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import DiscardPolicy, ExternalStream, KeyValueConfig, StorageType, StreamConfig, StreamSource
from nats.js.client import JetStreamContext
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyNotFoundError,
    NoKeysError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KV_DEL, KV_OP, KeyValue

from shared import subjects
from shared.errors import HubUnreachable
from shared.logging import get_logger

log = get_logger("leafwire.config")

Role = Literal["hub", "edge", "standalone"]
HISTORY = 10
HUB_REPLICAS = 3
STREAM = subjects.kv_stream(subjects.CONFIG_BUCKET)
HUB_TIMEOUT_S = 2.0
REPLICAS_NOT_SUPPORTED = 10074  # "replicas > 1 not supported in non-clustered mode": a one-node hub
HUB_UNREACHABLE = (ServiceUnavailableError, NoRespondersError, NoStreamResponseError, NatsTimeout, TimeoutError)


def hub_unreachable(wait_s: float) -> HubUnreachable:
    """The error for a hub's JetStream that did not answer within ``wait_s``."""
    return HubUnreachable(f"the hub's JetStream (domain {subjects.HUB!r}) does not answer within {wait_s:g} s: "
                          "the uplink is down or the hub is not running")


async def role_of(js: JetStreamContext) -> Role:
    """The part the connected server plays, from its JetStream domain."""
    domain = (await js.account_info()).domain
    if not domain:
        return "standalone"
    return "hub" if domain == subjects.HUB else "edge"


def bucket_config(replicas: int = 1) -> KeyValueConfig:
    """The bucket as its owner (the hub, or a standalone server) holds it."""
    return KeyValueConfig(bucket=subjects.CONFIG_BUCKET, history=HISTORY, replicas=replicas, direct=True,
                          storage=StorageType.FILE, description="leafwire configuration (written at the hub)")


def mirror_config() -> StreamConfig:
    """An edge's read-only copy of the hub's bucket (what nats-py's ``key_value`` needs to read it)."""
    return StreamConfig(name=STREAM, description="leafwire configuration, mirrored from the hub",
                        mirror=StreamSource(name=STREAM, external=ExternalStream(api=subjects.HUB_JS_API)),
                        max_msgs_per_subject=HISTORY, allow_rollup_hdrs=True, discard=DiscardPolicy.NEW,
                        allow_direct=True, mirror_direct=True, deny_delete=True, storage=StorageType.FILE)


def is_hub_mirror(config: StreamConfig, stream: str = STREAM) -> bool:
    """True when ``config`` is a mirror of the hub's stream ``stream`` (by default the config bucket's)."""
    source = config.mirror
    return (source is not None and source.name == stream and source.external is not None
            and source.external.api == subjects.HUB_JS_API)


async def ensure_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """Open the bucket where ``js`` points, creating it when absent (one replica on a one-node hub)."""
    try:
        return await js.key_value(subjects.CONFIG_BUCKET)
    except BucketNotFoundError:
        pass
    try:
        kv = await js.create_key_value(bucket_config(replicas))
    except APIError as exc:
        if exc.err_code == REPLICAS_NOT_SUPPORTED and replicas > 1:
            return await ensure_bucket(js, 1)
        try:
            return await js.key_value(subjects.CONFIG_BUCKET)  # created meanwhile by another process
        except BucketNotFoundError:
            raise exc from None
    log.info("config bucket created", replicas=replicas)
    return kv


async def ensure_mirror(js: JetStreamContext) -> None:
    """Make the edge's ``KV_config`` a mirror of the hub's; needs no uplink."""
    try:
        info = await js.stream_info(STREAM)
    except NotFoundError:
        info = None
    if info is not None and is_hub_mirror(info.config):
        return
    if info is not None:
        await _replace_plain_bucket(js)
    try:
        await js.add_stream(mirror_config())
    except APIError:  # another router of the site created it first
        if not is_hub_mirror((await js.stream_info(STREAM)).config):
            raise
        return
    log.info("config bucket mirrors the hub's", stream=STREAM, api=subjects.HUB_JS_API)


async def _replace_plain_bucket(js: JetStreamContext) -> None:
    """Drop a site-local bucket (from a leafwire before the mirror) so the mirror can take its name. What it
    held is logged: a site-specific policy it carried belongs at the hub now (``router.policy.<site>``)."""
    held: dict[str, str] = {}
    try:
        kv = await js.key_value(subjects.CONFIG_BUCKET)
        for key in await kv.keys():
            held[key] = ((await kv.get(key)).value or b"").decode(errors="replace")[:2000]
    except (NoKeysError, APIError, BucketNotFoundError):
        pass
    log.warning("replacing this site's own config bucket with a mirror of the hub's; its keys are dropped "
                "(write them at the hub: services.router.policy_cli push --scope site)", stream=STREAM,
                dropped=held)
    with contextlib.suppress(NotFoundError):  # another router of the site replaced it first
        await js.delete_stream(STREAM)


async def ensure_hub_bucket(nc: NATS, wait_s: float = HUB_TIMEOUT_S) -> KeyValue:
    """The hub's bucket, created when absent, reached from the hub or from any edge site.

    Raises ``HubUnreachable`` when the hub's JetStream does not answer (uplink down, hub stopped).
    """
    hub = nc.jetstream(domain=subjects.HUB, timeout=wait_s)
    try:
        return await ensure_bucket(hub, HUB_REPLICAS)
    except HUB_UNREACHABLE as exc:
        raise hub_unreachable(wait_s) from exc


async def open_bucket(nc: NATS, wait_s: float = 5.0) -> KeyValue:
    """The config bucket to read on the server ``nc`` is connected to, set up for its role.

    On an edge the hub's bucket is created first when the hub answers, so a new mirror finds its source
    at once; when it does not, the mirror is created anyway and fills in once the uplink returns.
    """
    js = nc.jetstream(timeout=wait_s)
    role = await role_of(js)
    if role == "edge":
        try:
            hub = await ensure_hub_bucket(nc)
        except HubUnreachable as exc:
            log.info("hub not reachable: reading the config mirror as last synced", reason=exc.message)
            hub = None
        await ensure_mirror(js)
        if hub is not None:
            await _copied(js, hub)
        return await js.key_value(subjects.CONFIG_BUCKET)
    return await ensure_bucket(js, HUB_REPLICAS if role == "hub" else 1)


async def _copied(js: JetStreamContext, hub: KeyValue, within_s: float = HUB_TIMEOUT_S) -> None:
    """Wait, at most ``within_s``, until the edge's mirror holds as much as the hub's bucket: a mirror just
    made anew is empty for ~0.2 s, and a watch opened on it then would take the keys it has not copied yet
    for deleted (the router falling back to its policy file meanwhile)."""
    with contextlib.suppress(*HUB_UNREACHABLE):
        async with asyncio.timeout(within_s):
            last = (await hub.status()).stream_info.state.last_seq
            while True:
                if (await js.stream_info(STREAM)).state.last_seq >= last:
                    return
                await asyncio.sleep(0.05)


async def mirror_silence_s(js: JetStreamContext) -> float | None:
    """Seconds since this edge's mirror last heard from the hub (``inf``: not since its server started);
    ``None`` where ``KV_config`` is no mirror (hub, standalone). An attached mirror hears a heartbeat
    every second; nats-server re-attaches a silent one only after its stall check and retry back-off."""
    info = await js.stream_info(STREAM)
    if not is_hub_mirror(info.config) or info.mirror is None:
        return None
    active = info.mirror.active
    return math.inf if active is None or active < 0 else active / 1e9


async def read_hub(nc: NATS, keys: Iterable[str], wait_s: float = HUB_TIMEOUT_S) -> list[tuple[str, int, bytes | None]]:
    """``(key, revision, value)`` of each key as the hub's bucket holds it now (value ``None``: deleted);
    keys never written are left out. Raises ``HubUnreachable`` when the hub does not answer."""
    found: list[tuple[str, int, bytes | None]] = []
    try:
        kv = await nc.jetstream(domain=subjects.HUB, timeout=wait_s).key_value(subjects.CONFIG_BUCKET)
        for key in keys:
            try:
                entry = await kv.get(key)
                found.append((key, entry.revision or 0, entry.value))
            except KeyNotFoundError as exc:
                if exc.entry is not None:  # deleted: the marker's revision
                    found.append((key, exc.entry.revision or 0, None))
    except HUB_UNREACHABLE as exc:
        raise HubUnreachable(f"the hub's JetStream (domain {subjects.HUB!r}) does not answer") from exc
    return found


class ConfigWriter:
    """Writes keys of the bucket's owner: the hub's bucket (also from an edge), or a standalone server's."""

    def __init__(self, js: JetStreamContext, *, via_hub: bool) -> None:
        self._js = js
        self.via_hub = via_hub

    @property
    def where(self) -> str:
        """Where the writes land, for messages."""
        return f"the hub's {subjects.CONFIG_BUCKET!r} bucket" if self.via_hub else \
            f"the {subjects.CONFIG_BUCKET!r} bucket of this standalone server"

    async def holds(self, key: str) -> bool:
        """True when ``key`` has a value where the writes land (False: never written, or deleted). Raises
        ``HubUnreachable`` when the hub does not answer."""
        try:
            await (await self._js.key_value(subjects.CONFIG_BUCKET)).get(key)
        except KeyNotFoundError:
            return False
        except HUB_UNREACHABLE as exc:
            raise HubUnreachable(f"{self.where} did not answer whether it holds {key!r}") from exc
        return True

    async def put(self, key: str, value: bytes) -> int:
        """Write ``key``; returns its new revision."""
        return await self._publish(key, value, None)

    async def delete(self, key: str) -> int:
        """Delete ``key`` (readers see a delete); returns the revision of the delete marker."""
        return await self._publish(key, b"", {KV_OP: KV_DEL})

    async def _publish(self, key: str, value: bytes, headers: dict[str, str] | None) -> int:
        subject = subjects.kv_put_subject(subjects.CONFIG_BUCKET, key, via_hub=self.via_hub)
        try:
            ack = await self._js.publish(subject, value, stream=STREAM, headers=headers)
        except HUB_UNREACHABLE as exc:
            raise HubUnreachable(f"{self.where} did not confirm the write of {key!r}: the uplink or the hub "
                                 "went away; the write may or may not have happened") from exc
        return int(ack.seq)


async def writer(nc: NATS, wait_s: float = 5.0) -> ConfigWriter:
    """A writer of the config bucket for a client of any server: through the hub's JetStream domain when
    there is one (the bucket is created when absent), else the standalone server's own bucket.

    Raises ``HubUnreachable`` when the hub does not answer: nothing is written then.
    """
    local = nc.jetstream(timeout=wait_s)
    if await role_of(local) == "standalone":
        await ensure_bucket(local)
        return ConfigWriter(local, via_hub=False)
    await ensure_hub_bucket(nc, wait_s)
    return ConfigWriter(nc.jetstream(domain=subjects.HUB, timeout=wait_s), via_hub=True)
