"""Running a service: signal -> ``asyncio.Event`` -> orderly shutdown, with an ``AsyncExitStack``.

A service's ``main(settings, stop, stack)`` builds what it needs, registers clean-up on ``stack``, and
returns once serving; ``run`` then waits for SIGTERM or SIGINT and unwinds the stack (drain NATS, stop
HTTP, stop worker processes) in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import NoReturn, TypeVar

from faststream.nats import NatsBroker
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from shared import logging as lw_logging
from shared import metrics
from shared.errors import BadConfiguration
from shared.nats import NoNatsServer, secrets_of, shown, start_broker, when_closed
from shared.ops import OpsServer, Readiness
from shared.settings import ServiceSettings
from shared.streams import ensure_dead_letters

S = TypeVar("S", bound=ServiceSettings)
Main = Callable[[S, Readiness, AsyncExitStack], Awaitable[None]]
EX_CONFIG = os.EX_CONFIG  # 78 (sysexits.h): a configuration error. Supervisors are told not to restart it (deploy/).


def run(service: str, settings_factory: Callable[[], S], main: Main[S], *, ops_server: bool = True) -> None:
    """Validate settings, configure logging, start the ops server and ``main``, then serve until signalled.

    ``ops_server=False`` is for a service that serves the ops endpoints on its own HTTP port. A configuration
    it cannot start with (an invalid ``LW_*`` setting, a malformed file: ``BadConfiguration``) is one error
    line saying what and where, and exit status ``EX_CONFIG``.
    """
    try:
        settings = settings_factory()
    except ValidationError as exc:
        lw_logging.configure(service)
        _refuse(service, "; ".join(_setting_error(e) for e in exc.errors()))
    lw_logging.configure(service, settings.log_level)
    for secret in secrets_of(settings.nats_url):  # whatever logs the URL (a library's error, say) hides them
        lw_logging.register_secret(secret)
    serving = _serve(service, settings, main, ops_server)
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
            code = asyncio.run(serving)
        else:
            code = uvloop.run(serving)
    except NoNatsServer as exc:  # no NATS server within LW_NATS_CONNECT_TIMEOUT_S: say so, no traceback
        lw_logging.get_logger(service).error("cannot start", error=str(exc))
        sys.exit(1)
    except BadConfiguration as exc:
        _refuse(service, str(exc))
    if code:
        sys.exit(code)


def _refuse(service: str, problem: str) -> NoReturn:
    """Log why the configuration does not let the service start, and exit with ``EX_CONFIG``."""
    lw_logging.get_logger(service).error("cannot start: bad configuration (starting again will not help)",
                                         error=problem)
    sys.exit(EX_CONFIG)


def _setting_error(error: ErrorDetails) -> str:
    """One error of the settings, naming the environment variable (``LW_SITE: ...``) but not echoing its
    value: it may be a secret (an API key, a NATS password), and no secret is registered for scrubbing yet."""
    field = ".".join(str(p) for p in error["loc"])
    if not field:  # a check across settings: its message names them
        return str(error["msg"])
    return f"{field if field.startswith('LW_') else f'LW_{field.upper()}'}: {error['msg']}"


async def _serve(service: str, settings: S, main: Main[S], ops_server: bool) -> int:
    """Serve until signalled (exit status 0), or until a NATS connection is closed for good (1: a service cut
    off from NATS stops, so that its supervisor starts it again, rather than answer nothing forever)."""
    log = lw_logging.get_logger(service)
    stop = asyncio.Event()
    lost: list[str] = []

    def closed(connection: str) -> None:
        if not stop.is_set():
            log.error("NATS connection closed for good: stopping, for a supervisor to start the service again",
                      connection=connection)
            lost.append(connection)
            stop.set()

    when_closed(closed)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1 and task is not None:  # a second signal: stop waiting for the drain
            task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    readiness = Readiness()
    stack = AsyncExitStack()
    try:
        if ops_server:
            ops = OpsServer(service, readiness, settings.ops_host, settings.ops_port)
            await ops.start()
            stack.push_async_callback(ops.stop)
        if not await _started(main(settings, readiness, stack), stop):
            log.info("stopped while starting")  # a signal (or a lost connection) during start-up
            return 1 if lost else 0
        readiness.starting = False
        settle_garbage_collector()
        metrics.UP.labels(service).set(1)
        log.info("service started", site=settings.site, nats=shown(settings.nats_url),
                 ops_port=ops.port if ops_server else None)
        await stop.wait()
        metrics.UP.labels(service).set(0)
        readiness.stopping = True
        log.info("shutting down: draining")
    finally:
        try:
            async with asyncio.timeout(settings.stop_within_s):
                await stack.aclose()
            log.info("stopped")
        except (TimeoutError, asyncio.CancelledError):
            log.error("shutdown did not finish in time; exiting anyway")
        except Exception as exc:  # every clean-up has run (an exit stack runs them all), some needed NATS
            if not lost:
                raise
            log.warning("some clean-up needed the lost NATS connection", error=repr(exc))
    return 1 if lost else 0


async def _started(starting: Awaitable[None], stop: asyncio.Event) -> bool:
    """Run a service's start-up until it is done (True) or ``stop`` is set first (False: the start-up is
    cancelled, so a signal while it waits on NATS, a model or a peer is honoured at once, not after it)."""
    start = asyncio.ensure_future(starting)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # a second signal: stop waiting for anything
        start.cancel()
        raise
    finally:
        stopped.cancel()
    if start.done():
        start.result()  # its error, if it failed
        return True
    start.cancel()
    while not start.done():  # until it has ended: a cancel can be lost, so it is asked again
        await asyncio.wait({start}, timeout=CANCEL_AGAIN_S)
        if not start.done():  # Python 3.11's asyncio.wait_for (nats-py's connect uses it) drops a cancel that
            start.cancel()    # comes as what it waits for ends, e.g. a refused connection to a NATS server
    with contextlib.suppress(asyncio.CancelledError):
        await start
    return False


CANCEL_AGAIN_S = 0.2


def settle_garbage_collector() -> None:
    """Keep the collector off what start-up built and make young collections rarer.

    The modules, settings and connections a service builds at start-up (a few hundred thousand objects)
    live until it stops; a full collection scanning them all took tens of milliseconds every few hundred
    requests. ``gc.freeze`` moves them out of the collector's sight; a larger first generation means fewer
    collections of the short-lived objects each request makes. Cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


GC_YOUNG_THRESHOLD = 20_000


async def attach_broker(broker: NatsBroker, settings: ServiceSettings, service: str, readiness: Readiness,
                        stack: AsyncExitStack) -> None:
    """Start a FastStream broker, make readiness follow its connection, drain it on shutdown."""
    nc = await start_broker(broker, settings, service)
    stack.push_async_callback(broker.stop)
    await ensure_dead_letters(nc, settings.site)

    def connected() -> str | None:
        return None if nc.is_connected else "not connected to NATS"

    readiness.add("nats", connected)
