"""NATS connections: wait for the server at start, reconnect forever, drain on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Callable
from typing import Any

import nats
from faststream.nats import NatsBroker
from nats.aio.client import Client as NATS

from shared import metrics, nats_headers
from shared.logging import get_logger
from shared.settings import ServiceSettings

log = get_logger("leafwire.nats")


_PASSWORD = re.compile(r"(://[^:/@,\s]*):[^@/,\s]*@")
_TOKEN = re.compile(r"(://)[^:/@,\s]+@")


def shown(servers: str | list[str]) -> str:
    """NATS server URLs as they may be logged or printed: a password (``user:***@``) or a token (``***@``) in
    them is hidden."""
    text = servers if isinstance(servers, str) else ", ".join(servers)
    return _TOKEN.sub(r"\1***@", _PASSWORD.sub(r"\1:***@", text))


def secrets_of(servers: str) -> list[str]:
    """The passwords and tokens in NATS server URLs (for the log scrubber)."""
    found = []
    for url in servers.split(","):
        userinfo, at, _ = url.strip().partition("://")[2].partition("@")
        if at:
            user, colon, password = userinfo.partition(":")
            found.append(password if colon else user)
    return [s for s in found if s]


_WHEN_CLOSED: list[Callable[[str], None]] = []


def when_closed(hook: Callable[[str], None]) -> None:
    """Call ``hook(name)`` whenever a connection made with :func:`connect_options` closes: at shutdown, or
    for good while serving (nats-py gives up on a connection the server refused with a protocol error; it
    does not reconnect)."""
    _WHEN_CLOSED.append(hook)


def connect_options(settings: ServiceSettings, name: str) -> dict[str, Any]:
    """Options for nats-py and FastStream alike: reconnect forever, ping often, log state changes (and keep
    ``leafwire_nats_connected`` up to date)."""
    connected = metrics.NATS_CONNECTED.labels(name)

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", error=shown(repr(exc)))

    async def on_disconnect() -> None:
        connected.set(0)
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        connected.set(1)
        log.info("nats reconnected")

    async def on_closed() -> None:
        connected.set(0)
        for hook in _WHEN_CLOSED:
            hook(name)

    opts: dict[str, Any] = {
        "servers": settings.nats_servers,
        "name": f"{name}@{settings.site}",
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 1,
        "connect_timeout": 2,
        "ping_interval": 10,
        "max_outstanding_pings": 3,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
        "closed_cb": on_closed,
    }
    if settings.nats_creds is not None:
        opts["user_credentials"] = str(settings.nats_creds)
    return opts


class NoNatsServer(ConnectionError):
    """No NATS server accepted a connection in the time given."""


async def connect_once(servers: str | list[str], wait_s: float, **options: Any) -> NATS:
    """A client connected to one of ``servers``, each tried without waiting between tries; ``NoNatsServer``
    when none accepts within ``wait_s``. No reconnecting afterwards: for commands and probes.

    Why not plain ``nats.connect(..., allow_reconnect=False, max_reconnect_attempts=0)``: nats-py reads 0 as
    "no limit", so a refused first connection is retried forever, each failure logged with a traceback.
    """

    async def quiet(_: Exception) -> None:
        pass

    nc = NATS()
    try:
        async with asyncio.timeout(wait_s):
            await nc.connect(servers, connect_timeout=math.ceil(wait_s), allow_reconnect=False,
                             max_reconnect_attempts=1, reconnect_time_wait=0, error_cb=quiet, **options)
    except (Exception, TimeoutError) as exc:  # nats-py raises several unrelated types for "nobody there"
        with contextlib.suppress(Exception):
            await nc.close()
        raise NoNatsServer(f"no NATS server at {shown(servers)} accepts a connection ({shown(repr(exc))})") from exc
    return nc


async def wait_for_server(settings: ServiceSettings) -> None:
    """Return once a NATS server of ``settings`` accepts a connection; raise after the connect timeout.

    Services start in any order; this lets them wait for NATS instead of failing.
    """
    deadline = time.monotonic() + settings.nats_connect_timeout_s
    creds = {"user_credentials": str(settings.nats_creds)} if settings.nats_creds else {}
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            nc = await connect_once(settings.nats_servers, min(1.0, max(deadline - time.monotonic(), 0.1)), **creds)
        except NoNatsServer as exc:
            last = exc
            await asyncio.sleep(0.2)
            continue
        await nc.close()
        return
    raise NoNatsServer(f"no NATS server at {shown(settings.nats_url)} after "
                          f"{settings.nats_connect_timeout_s:g} s") from last


async def connect(settings: ServiceSettings, name: str) -> NATS:
    """A nats-py client that reconnects forever; waits for the server first."""
    nats_headers.install()
    await wait_for_server(settings)
    nc = await nats.connect(**connect_options(settings, name))
    metrics.NATS_CONNECTED.labels(name).set(1)
    return nc


def broker(settings: ServiceSettings, name: str, **kwargs: Any) -> NatsBroker:
    """A FastStream NATS broker with leafwire's connection options (not connected yet)."""
    nats_headers.install()
    opts = connect_options(settings, name)
    return NatsBroker(
        opts.pop("servers"),
        graceful_timeout=settings.nats_drain_timeout_s,
        drain_timeout=int(settings.nats_drain_timeout_s),
        logger=get_logger(f"faststream.{name}"),
        **opts,
        **kwargs,
    )


async def start_broker(b: NatsBroker, settings: ServiceSettings, name: str) -> NATS:
    """Wait for NATS, start the broker and flush so its subscriptions are live before returning."""
    await wait_for_server(settings)
    await b.start()
    nc = b.connection
    await nc.flush(timeout=5)
    metrics.NATS_CONNECTED.labels(name).set(1)  # from here on its callbacks keep it (connect_options)
    return nc
