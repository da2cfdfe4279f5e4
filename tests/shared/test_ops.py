"""A service's ops endpoints while it starts: alive at once, ready only once it serves."""

from __future__ import annotations

from tests.support import NatsServer, Service, eventually, free_port, http_status


def test_not_ready_until_connected(nats_server: NatsServer) -> None:
    """A router whose NATS server is not there yet answers /healthz but not /readyz (a load balancer or
    launcher must not send it work); once it is connected and subscribed it is ready."""
    router = Service("router", {"LW_NATS_URL": f"nats://127.0.0.1:{free_port()}", "LW_SITE": "ops1",
                                "LW_NATS_CONNECT_TIMEOUT_S": "60", "LW_ROUTER_UPLINK": "up"}).start()
    try:
        eventually(lambda: http_status(f"{router.base}/healthz") == 200, 30, "the ops port")
        status, body = router.readyz()
        assert status == 503
        assert "startup" in body["problems"]
    finally:
        router.stop()
    ready = Service("router", {"LW_NATS_URL": nats_server.url, "LW_SITE": "ops1", "LW_ROUTER_UPLINK": "up"}).start()
    try:
        ready.wait_ready(60)
        assert ready.readyz() == (200, {"status": "ready", "service": "router"})
    finally:
        ready.stop()
