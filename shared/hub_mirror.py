"""An edge's mirror of a hub stream (``config``, ``budgets``), made anew when it no longer copies the hub's.

nats-server keeps a mirror attached on its own terms, and two cases leave an edge reading stale entries:

- Stuck: it has heard nothing from the hub for ``stuck_s``. After an outage nats-server retries a mirror on
  its own back-off (a lost request waits 30 s, then up to two minutes more), and no API call shortens that
  on a one-node server.
- Created anew: the hub's stream was deleted and made again (a bucket deleted to reset it, a hub that lost
  its storage). The mirror resumes after the sequence it copied last: it skips the new stream's messages up
  to there, and keeps the old entries. Seen as a hub stream holding fewer messages than the mirror copied,
  or, for a keeper that saw the hub's stream before, as one created at another time, or, for one that did not
  (a service started after the reset), as a hub stream whose message at the mirror's last sequence is
  another.

A mirror made anew copies the hub's stream from its start (~0.2 s, the hub's sequence numbers), and its
readers (``shared.kv_follow``) open their watch again on it. Only right after the hub has answered: an edge
left with an empty mirror offline would forget what the hub holds.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, ExternalStream, StorageType, StreamConfig, StreamInfo, StreamSource
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError
from nats.js.kv import KeyValue

from shared import subjects
from shared.config_bucket import HUB_TIMEOUT_S, is_hub_mirror

STREAM_NOT_FOUND = 10059  # JetStream's err_code
STUCK_S = 5.0  # an attached mirror hears from the hub every second
ATTACH_WAIT_MAX_S = 300.0  # the longest a mirror made anew is given to attach (slow links), see HubMirror
NEVER_HEARD = "it had not heard from the hub since it was made"
Ensure = Callable[[JetStreamContext], Awaitable[None]]
"""Creates the edge's mirror when it is absent."""


def kv_mirror_config(name: str, source: str, description: str) -> StreamConfig:
    """An edge's copy ``name`` of the hub's bucket stream ``source`` (``KV_<bucket>``), a key's last value each.
    Not ``mirror_direct``: direct gets of ``source`` in the edge's domain must keep reaching the site's own
    bucket of that name."""
    return StreamConfig(name=name, description=description,
                        mirror=StreamSource(name=source, external=ExternalStream(api=subjects.HUB_JS_API)),
                        max_msgs_per_subject=1, discard=DiscardPolicy.OLD, deny_delete=True,
                        storage=StorageType.FILE)


async def ensure_kv_mirror(js: JetStreamContext, name: str, source: str, description: str) -> None:
    """Create the edge's mirror (``kv_mirror_config``) when absent; needs no uplink (it fills in once the hub is
    reachable). A stream of that name that is no such mirror is an error."""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        info = None
    if info is not None:
        if not is_hub_mirror(info.config, source):
            raise RuntimeError(f"stream {name} exists and is not a mirror of the hub's {source}")
        return
    try:
        await js.add_stream(kv_mirror_config(name, source, description))
    except APIError:  # another service of the site created it first
        if not is_hub_mirror((await js.stream_info(name)).config, source):
            raise


def kv_mirror_bucket(js: JetStreamContext, bucket: str, stream: str) -> KeyValue:
    """The mirror ``stream`` of the hub's bucket ``bucket`` as a read-only bucket (nats-py's ``KeyValue`` reads
    any stream whose messages carry ``$KV.<bucket>.<key>`` subjects), once it is known to be there (no I/O)."""
    return KeyValue(name=bucket, stream=stream, pre=f"$KV.{bucket}.", js=js, direct=False)


def _source_missing(info: StreamInfo) -> bool:
    """Whether the mirror's last try to copy found no such stream at the hub (made before the hub's owner made
    its stream: nats-server tries again only after a back-off of 30 s or more)."""
    error = None if info.mirror is None else info.mirror.error
    return isinstance(error, dict) and error.get("err_code") == STREAM_NOT_FOUND


def silence_s(info: StreamInfo) -> float | None:
    """Seconds since the mirror ``info`` describes last heard from its source; ``None``: not since it was made
    (or since its server started)."""
    active = None if info.mirror is None else info.mirror.active
    return None if active is None or active < 0 else active / 1e9


@dataclass
class HubMirror:
    """The edge's stream ``name``, a mirror of the hub's stream ``source``, made by ``ensure``.

    One kept for a service's lifetime also remembers when the hub's stream and the mirror were created, and
    so notices a hub stream created anew under the same mirror that already holds as many messages as the
    old one did (a mirror another service made anew meanwhile is taken as it is).
    """

    name: str
    source: str
    ensure: Ensure
    stuck_s: float = STUCK_S
    seen: tuple[str, datetime | None] | None = None  # (the hub's stream, the mirror) last seen, by creation time
    unattached: int = 0  # mirrors made in a row that never heard from the hub: each is given twice as long

    def attach_wait_s(self) -> float:
        """How long a mirror that has not heard from the hub since it was made is left to attach: ``stuck_s``,
        doubled for each one made in a row that never did, up to ``ATTACH_WAIT_MAX_S``. Over a slow link (a
        ship's satellite uplink) attaching can take longer than ``stuck_s``; a mirror remade every check
        would never get there."""
        return min(self.stuck_s * 2.0 ** min(self.unattached, 32), max(ATTACH_WAIT_MAX_S, self.stuck_s))

    async def resync(self, nc: NATS, js: JetStreamContext) -> str | None:
        """Make the mirror anew, while the hub answers, when it is stuck or copies a stream that is gone; why,
        or ``None`` when it was left as it is (also when ``name`` is no mirror of the hub's ``source``)."""
        info = await js.stream_info(self.name)
        if not is_hub_mirror(info.config, self.source):
            return None
        hub = await self._hub_stream(nc)
        if hub is None:  # the hub does not answer, or has no such stream yet: the mirror waits as it is
            return None
        hub_created = str(hub.get("created"))
        why = self._why(info, int(hub["state"]["last_seq"]), hub_created)
        if why is None and self.seen is None:
            why = await self._other_last_message(nc, js, info.state.last_seq)
        heard = silence_s(info)
        if heard is not None and heard < self.stuck_s:
            self.unattached = 0
        elif why is not None and why.startswith(NEVER_HEARD):
            self.unattached += 1
        if why is not None:
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(self.name)
            await self.ensure(js)
            info = await js.stream_info(self.name)
        self.seen = (hub_created, info.created)
        return why

    async def _hub_stream(self, nc: NATS) -> dict[str, Any] | None:
        try:
            answer: dict[str, Any] = json.loads((await nc.request(
                f"{subjects.HUB_JS_API}.STREAM.INFO.{self.source}", b"", timeout=HUB_TIMEOUT_S)).data)
        except Exception:
            return None
        return None if "error" in answer else answer

    async def _other_last_message(self, nc: NATS, js: JetStreamContext, copied: int) -> str | None:
        """For a keeper that has not seen the hub's stream before (a service started after a reset): whether the
        hub holds, at the sequence the mirror copied last, another message than the mirror does (a mirror keeps
        its source's sequences). ``None`` also when either side no longer holds that message (a key written
        again since): then nothing can be told."""
        if copied <= 0:
            return None
        try:
            mine = await js.get_msg(self.name, seq=copied)
            answer = json.loads((await nc.request(f"{subjects.HUB_JS_API}.STREAM.MSG.GET.{self.source}",
                                                  json.dumps({"seq": copied}).encode(), timeout=HUB_TIMEOUT_S)).data)
        except Exception:
            return None
        theirs = answer.get("message")
        if not isinstance(theirs, dict):
            return None
        if theirs.get("subject") == mine.subject and base64.b64decode(theirs.get("data") or "") == (mine.data or b""):
            return None
        return f"the hub's stream was created anew (its message {copied} is not the one the mirror copied)"

    def _why(self, info: StreamInfo, hub_last: int, hub_created: str) -> str | None:
        copied = info.state.last_seq
        if hub_last < copied:
            return f"the hub's stream was created anew ({hub_last} messages; the mirror had copied {copied})"
        if self.seen is not None and self.seen[1] == info.created and self.seen[0] != hub_created:
            return f"the hub's stream was created anew (at {hub_created}; the mirror copied one of {self.seen[0]})"
        silence = silence_s(info)
        if (silence is None or silence >= 1.0) and _source_missing(info):  # the hub's stream exists now (it answered)
            return "the hub's stream did not exist when the mirror last tried to copy it"
        if silence is None:  # given time from when it was made to attach (another service may just have made it)
            made = info.created.timestamp() if info.created is not None else 0.0
            wait = self.attach_wait_s()
            return f"{NEVER_HEARD}, {time.time() - made:.0f} s ago" if time.time() - made >= wait else None
        return f"it had not heard from the hub for {silence:.0f} s" if silence >= self.stuck_s else None
