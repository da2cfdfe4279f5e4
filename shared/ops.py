"""Health, readiness and Prometheus metrics over HTTP: ``/healthz``, ``/readyz``, ``/metrics``.

Every service serves these on its ops port; the gateway mounts the same handlers on its own port.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

Check = Callable[[], str | None]
"""A readiness check: ``None`` when fine, else what is wrong."""


@dataclass
class Readiness:
    """Named checks that must all pass for the service to take traffic."""

    checks: dict[str, Check] = field(default_factory=dict)
    starting: bool = True  # until the service's main() returned: connected, subscribed, serving
    stopping: bool = False

    def add(self, name: str, check: Check) -> None:
        """Register a check."""
        self.checks[name] = check

    def problems(self) -> dict[str, str]:
        """What is wrong, by check name (empty when ready)."""
        found = {name: msg for name, check in self.checks.items() if (msg := check()) is not None}
        if self.starting:
            found["startup"] = "starting: not connected and subscribed yet"
        if self.stopping:
            found["shutdown"] = "shutting down"
        return found


def add_routes(app: web.Application, service: str, readiness: Readiness,
               metrics_guard: Callable[[web.Request], object] | None = None) -> None:
    """Add ``/healthz``, ``/readyz`` and ``/metrics`` to ``app``; ``metrics_guard`` (which raises to refuse)
    is asked before ``/metrics`` answers."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": service})

    async def readyz(_: web.Request) -> web.Response:
        problems = readiness.problems()
        if problems:
            return web.json_response({"status": "unavailable", "service": service, "problems": problems},
                                     status=503)
        return web.json_response({"status": "ready", "service": service})

    async def metrics(request: web.Request) -> web.Response:
        if metrics_guard is not None:
            metrics_guard(request)
        resp = web.Response(body=generate_latest())
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


def bound_port(site: web.TCPSite, default: int) -> int:
    """The port a started site listens on (the real one when it was asked for port 0)."""
    sockets = getattr(site._server, "sockets", None)
    return int(sockets[0].getsockname()[1]) if sockets else default


class OpsServer:
    """A small aiohttp server for the ops endpoints of a service without an HTTP API of its own."""

    def __init__(self, service: str, readiness: Readiness, host: str, port: int) -> None:
        self._app = web.Application()
        add_routes(self._app, service, readiness)
        self._runner = web.AppRunner(self._app, access_log=None)
        self._host = host
        self._port = port
        self.port = port

    async def start(self) -> None:
        """Listen; ``port`` holds the bound port afterwards (useful with port 0)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = bound_port(site, self._port)

    async def stop(self) -> None:
        """Stop listening."""
        await self._runner.cleanup()
