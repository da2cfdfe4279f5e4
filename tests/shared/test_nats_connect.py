"""Connecting to NATS when it is not there: commands fail at once with a clear message, a service waits up to
its connect timeout, then exits with one log line that says why (nats-py alone retries such a connection
forever when asked for no reconnects)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from deploy.topology import free_port
from shared.nats import NoNatsServer, connect_once, wait_for_server
from shared.settings import ServiceSettings
from tests.support import ROOT, NatsServer, start_single


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


def test_policy_command_without_nats_writes_nothing_and_says_so(dead_url: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "services.router.policy_cli", "clear", "--nats", dead_url],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 3
    assert f"no NATS server at {dead_url}" in done.stderr
    assert "nothing was written" in done.stderr
