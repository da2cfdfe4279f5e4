"""JetStream streams the services declare for themselves at start (idempotent, never destructive)."""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from shared import subjects
from shared.logging import get_logger

log = get_logger("leafwire.streams")

WEEK_S = 7 * 24 * 3600


async def ensure_stream(nc: NATS, config: StreamConfig) -> None:
    """Create the stream, or add our subjects to an existing one; never drop data or other subjects."""
    js = nc.jetstream(timeout=5)
    try:
        info = await js.stream_info(str(config.name))
    except NotFoundError:
        await js.add_stream(config)
        return
    have = set(info.config.subjects or [])
    want = set(config.subjects or [])
    if not want <= have:
        info.config.subjects = sorted(have | want)
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
