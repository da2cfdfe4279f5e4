"""Connecting to NATS when it is not there: commands fail at once with a clear message, a service waits up to
its connect timeout, then exits with one log line that says why (nats-py alone retries such a connection
forever when asked for no reconnects)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from deploy.topology import free_port
from shared import metrics
from shared.nats import NoNatsServer, connect, connect_once, secrets_of, shown, wait_for_server
from shared.service import _serve
from shared.settings import ServiceSettings
from tests.support import ROOT, NatsServer, eventually, eventually_async, http_status, start_single


@pytest.fixture
def dead_url() -> str:
    """A loopback port nothing listens on."""
    return f"nats://127.0.0.1:{free_port()}"


async def test_connect_once_to_nobody_fails_with_the_address(dead_url: str) -> None:
    with pytest.raises(NoNatsServer, match=r"no NATS server at nats://127\.0\.0\.1:"):
        await asyncio.wait_for(connect_once(dead_url, 1.0), 30)  # a hang would end in TimeoutError instead


async def test_connect_once_to_a_server(nats_server: NatsServer) -> None:
    nc = await connect_once(nats_server.url, 2.0)
    try:
        assert nc.is_connected
        await nc.flush(timeout=2)
    finally:
        await nc.close()


async def test_wait_for_server_gives_up_after_the_connect_timeout(dead_url: str) -> None:
    settings = ServiceSettings(nats_url=dead_url, nats_connect_timeout_s=1)
    with pytest.raises(NoNatsServer, match="after 1 s"):
        await asyncio.wait_for(wait_for_server(settings), 30)


async def test_wait_for_server_returns_once_the_server_starts(tmp_path: Path) -> None:
    """A service started before NATS waits for it, then goes on."""
    server = start_single(tmp_path)
    server.stop()
    starting = threading.Timer(1.0, server.restart)
    starting.start()
    try:
        await asyncio.wait_for(wait_for_server(ServiceSettings(nats_url=server.url, nats_connect_timeout_s=30)), 40)
    finally:
        starting.join()
        server.stop()


def test_a_service_without_nats_exits_saying_why(dead_url: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "services.router"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LW_NATS_URL": dead_url,
                                         "LW_NATS_CONNECT_TIMEOUT_S": "1"})
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines() + done.stdout.splitlines() if line.startswith("{")]
    assert {"event": "cannot start", "error": f"no NATS server at {dead_url} after 1 s"}.items() <= lines[-1].items()
    assert "Traceback" not in done.stderr


def test_a_service_stopped_while_it_waits_for_nats_stops_at_once(dead_url: str, tmp_path: Path) -> None:
    """SIGTERM while a service still waits for its NATS server (up to a minute here) ends the wait: it stops
    within a second or two, exit status 0, instead of when its start-up would have finished."""
    ops = free_port()
    service = subprocess.Popen([sys.executable, "-m", "services.router"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LW_NATS_URL": dead_url,
                                    "LW_NATS_CONNECT_TIMEOUT_S": "60", "LW_OPS_PORT": str(ops)})
    try:
        eventually(lambda: http_status(f"http://127.0.0.1:{ops}/healthz") == 200, 30, "the ops server")
        service.terminate()
        out, _ = service.communicate(timeout=10)
    finally:
        service.kill()
    assert service.returncode == 0
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert events[-2:] == ["stopped while starting", "stopped"], out
    assert "Traceback" not in out


def test_policy_command_without_nats_writes_nothing_and_says_so(dead_url: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "services.router.policy_cli", "clear", "--nats", dead_url],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 3
    assert f"no NATS server at {dead_url}" in done.stderr
    assert "nothing was written" in done.stderr


def test_a_password_in_the_nats_url_is_never_logged(tmp_path: Path) -> None:
    """A service given ``nats://user:password@...`` that cannot connect says where it tried, with the password
    hidden; the password appears nowhere in its output."""
    port = free_port()
    url = f"nats://leaf:s3cret-Passw0rd@127.0.0.1:{port}"
    done = subprocess.run([sys.executable, "-m", "services.router"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LW_NATS_URL": url,
                                         "LW_NATS_CONNECT_TIMEOUT_S": "1"})
    assert done.returncode == 1
    assert "s3cret-Passw0rd" not in done.stdout + done.stderr
    assert f"no NATS server at nats://leaf:***@127.0.0.1:{port} after 1 s" in done.stdout + done.stderr


@pytest.mark.parametrize(("url", "hidden", "secrets"), [
    ("nats://u:pw@h:4222", "nats://u:***@h:4222", ["pw"]),
    ("nats://tok3n@h", "nats://***@h", ["tok3n"]),
    ("nats://h1:4222,tls://a:b@h2", "nats://h1:4222,tls://a:***@h2", ["b"]),
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222", []),
])
def test_credentials_in_urls_are_hidden(url: str, hidden: str, secrets: list[str]) -> None:
    assert shown(url) == hidden
    assert secrets_of(url) == secrets


async def test_the_connected_metric_follows_the_connection(tmp_path: Path) -> None:
    """``leafwire_nats_connected`` is 1 from the connection on, 0 while the server is gone, 1 again after it
    is back: without anyone asking /readyz."""
    server = start_single(tmp_path)
    gauge = metrics.NATS_CONNECTED.labels("metric-test")
    nc = await connect(ServiceSettings(nats_url=server.url), "metric-test")
    try:
        assert gauge._value.get() == 1
        server.stop()
        await eventually_async(lambda: asyncio.sleep(0.05, gauge._value.get()), lambda v: v == 0, 20)
        server.restart()
        await eventually_async(lambda: asyncio.sleep(0.05, gauge._value.get()), lambda v: v == 1, 30)
    finally:
        await nc.close()
        server.stop()
    assert gauge._value.get() == 0


@pytest.mark.parametrize("command", [["budgets"], ["usage"], ["sites"], ["policy", "clear"]])
def test_operator_commands_connect_where_the_services_do(command: list[str], tmp_path: Path) -> None:
    """Without --nats an operator command uses LW_NATS_URL (and LW_NATS_CREDS), like the services; a password
    in it is hidden in what the command prints."""
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LW_NATS_URL": f"nats://ops:s3cret-Passw0rd@127.0.0.1:{port}"}
    done = subprocess.run([sys.executable, "-m", "shared.cli", *command, "--wait", "1"] if command[0] != "policy"
                          else [sys.executable, "-m", "shared.cli", *command], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)
    assert done.returncode != 0
    assert f"nats://ops:***@127.0.0.1:{port}" in done.stderr
    assert "s3cret-Passw0rd" not in done.stdout + done.stderr


async def test_a_service_cut_off_from_nats_for_good_stops_with_status_1(nats_server: NatsServer) -> None:
    """nats-py does not reconnect a connection the server closed for a protocol error. A service whose
    connection is closed so, while it serves, stops with exit status 1 (a supervisor starts it again)
    instead of answering nothing forever."""
    settings = ServiceSettings(nats_url=nats_server.url)
    held: list[NATS] = []
    connected = asyncio.Event()

    async def main(s: ServiceSettings, _readiness: object, stack: AsyncExitStack) -> None:
        nc = await connect(s, "test-service")
        held.append(nc)
        stack.push_async_callback(nc.drain)
        connected.set()

    serving = asyncio.create_task(_serve("test-service", settings, main, ops_server=False))
    await asyncio.wait_for(connected.wait(), 10)
    await held[0]._send_command(f"PUB cut.off {held[0].max_payload + 1}\r\n".encode())  # what the guard prevents
    await held[0]._flush_pending()
    assert await asyncio.wait_for(serving, 20) == 1
    assert held[0].is_closed
