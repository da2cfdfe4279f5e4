"""JetStream streams the services declare for themselves at start (idempotent, never destructive)."""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from shared import subjects
from shared.logging import get_logger

log = get_logger("leafwire.streams")

WEEK_S = 7 * 24 * 3600


async def ensure_stream(nc: NATS, config: StreamConfig) -> None:
    """Create the stream, or add our subjects (and atomic batch publishing, if asked) to an existing one;
    never drop data or other subjects."""
    js = nc.jetstream(timeout=5)
    try:
        info = await js.stream_info(str(config.name))
    except NotFoundError:
        await js.add_stream(config)
        return
    have = set(info.config.subjects or [])
    want = set(config.subjects or [])
    atomic = bool(config.allow_atomic) and not info.config.allow_atomic  # a stream made before we asked for it
    if not want <= have or atomic:
        info.config.subjects = sorted(have | want)
        info.config.allow_atomic = info.config.allow_atomic or config.allow_atomic
        await js.update_stream(info.config)


async def ensure_dead_letters(nc: NATS, site: str) -> None:
    """The site's ``DEAD_LETTERS`` stream: a week (or 256 MB) of messages no service could process."""
    config = StreamConfig(name=subjects.DEAD_LETTERS, subjects=[subjects.dead_letter_filter(site)],
                          retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, max_age=WEEK_S,
                          max_bytes=256 * 1024 * 1024, discard=DiscardPolicy.OLD)
    try:
        await ensure_stream(nc, config)
    except Exception as exc:  # JetStream may be off or still electing: dead letters are then only logged
        log.warning("dead-letter stream unavailable", error=repr(exc), site=site)


async def ensure_kv(nc: NATS, config: KeyValueConfig, *, drop_oldest: bool = False) -> KeyValue:
    """Open the KV bucket, creating it when absent; a changed TTL, size limit or largest value is applied to
    it in place. ``drop_oldest`` (a cache): a full bucket drops its oldest values to make room, instead of
    refusing new ones (KV's own way).

    Several services may race to create a bucket at start: losing the race is fine (the bucket is then
    opened). Values are never deleted here (but by ``drop_oldest`` once full).
    """
    js = nc.jetstream(timeout=5)
    try:
        kv = await js.key_value(config.bucket)
    except BucketNotFoundError:
        try:
            kv = await js.create_key_value(config)
        except BadRequestError:  # created meanwhile by another process
            kv = await js.key_value(config.bucket)
    stream = f"KV_{config.bucket}"
    info = await js.stream_info(stream)
    have = info.config
    want = {"max_age": config.ttl or 0.0, "max_bytes": config.max_bytes or have.max_bytes,
            "max_msg_size": config.max_value_size or have.max_msg_size,
            "discard": DiscardPolicy.OLD if drop_oldest else have.discard}
    if any(getattr(have, name) != value and not (name == "max_age" and not have.max_age and not value)
           for name, value in want.items()):
        for name, value in want.items():
            setattr(have, name, value)
        await js.update_stream(have)
        log.info("kv bucket limits updated", bucket=config.bucket, ttl_s=want["max_age"], max_bytes=want["max_bytes"],
                 max_value_bytes=want["max_msg_size"], drop_oldest=drop_oldest)
    return kv
