"""Routing end to end: decisions a user sees in headers, fallbacks, guards, hot reload, dry runs.

The router runs with the uplink forced up and no cloud adapter: a cloud target is offered and refuses
(nobody takes it), which is exactly a failure before the first byte.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nats
import pytest
from nats.js.errors import BucketNotFoundError

from schemas.cloud import BreakerState, BudgetStatus, ProviderHealth, budget_window
from tests.conftest import stack_services
from tests.support import (
    ROOT,
    NatsServer,
    Service,
    eventually,
    last_usage,
    metric,
    running,
    write_policy,
    write_registry,
)

pytestmark = pytest.mark.e2e
SITE = "routing"
ASK = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def services(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, ...]]:
    registry = write_registry(tmp_path_factory.mktemp("routing") / "models.yaml")
    worker, router, gateway = stack_services(nats_server.url, registry, site=SITE,
                                             router_env={"LW_ROUTER_UPLINK": "up"})
    with running(worker, router, gateway):
        yield worker, router, gateway


def chat(gateway: Service, model: str, headers: dict[str, str] | None = None, **body: object) -> httpx.Response:
    return httpx.post(f"{gateway.base}/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": model, "messages": ASK, "max_tokens": 2, **body})


def dry_run(gateway: Service, model: str, content: str = "hello", **headers: str) -> dict[str, object]:
    r = httpx.post(f"{gateway.base}/v1/route/dry-run", headers=headers, timeout=10,
                   json={"model": model, "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def nats_dry_run(url: str, body: dict[str, object]) -> dict[str, object]:
    nc = await nats.connect(url)
    try:
        msg = await nc.request(f"lw.v1.{SITE}.route.dry_run", json.dumps(body).encode(), timeout=5)
    finally:
        await nc.drain()
    return dict(json.loads(msg.data))


async def kv_put(url: str, bucket: str, key: str, value: bytes | None) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            kv = await js.key_value(bucket)
        except BucketNotFoundError:
            kv = await js.create_key_value(bucket=bucket)
        if value is None:
            await kv.delete(key)
        else:
            await kv.put(key, value)
    finally:
        await nc.drain()


class TestDecisions:
    def test_dry_run_over_http_and_nats(self, services: tuple[Service, ...], nats_server: NatsServer) -> None:
        """A dry run returns the decision, the prompt's signals and what masking would do, and runs nothing."""
        worker, _, gateway = services
        before = metric(worker.metrics(), "leafwire_generations_total", model="tiny", finish_reason="length")
        result = dry_run(gateway, "tiny", "mail me at jane@plant.example")
        assert result["decision"]["target"] == "local/tiny"  # type: ignore[index]
        assert result["decision"]["rule"] == "default"  # type: ignore[index]
        assert result["chain"] == ["tiny"]
        assert result["masked_for_cloud"] == {"email": 1}
        assert int(result["prompt_tokens"]) > 0  # type: ignore[call-overload]
        over_nats = asyncio.run(nats_dry_run(nats_server.url, {"model": "tiny", "messages": ASK}))
        assert over_nats["chain"] == ["tiny"]
        after = metric(worker.metrics(), "leafwire_generations_total", model="tiny", finish_reason="length")
        assert after == before

    def test_fallback_before_the_first_byte(self, services: tuple[Service, ...]) -> None:
        """A cloud target that does not take the request falls back to the local model, and says so."""
        _, router, gateway = services
        before = metric(router.metrics(), "leafwire_route_fallbacks_total", kind="cloud", status="503")
        r = chat(gateway, "openai/gpt-4o-mini")
        assert r.status_code == 200
        route = r.headers["x-leafwire-route"]
        assert route.startswith("target=local/tiny; rule=default")
        assert "fell back from openai/gpt-4o-mini (503 unavailable)" in route
        assert r.json()["model"] == "tiny"
        assert metric(router.metrics(), "leafwire_route_fallbacks_total", kind="cloud", status="503") == before + 1

    def test_onsite_requests_never_leave(self, services: tuple[Service, ...]) -> None:
        """`x-leafwire-residency: onsite` skips every cloud target, whatever the model asked for."""
        _, _, gateway = services
        r = chat(gateway, "openai/gpt-4o-mini", headers={"x-leafwire-residency": "onsite"})
        assert r.status_code == 200
        assert "skipped openai/gpt-4o-mini (data must stay on site)" in r.headers["x-leafwire-route"]
        assert "fell back" not in r.headers["x-leafwire-route"]

    def test_unknown_local_model_is_404(self, services: tuple[Service, ...]) -> None:
        """A plain model name nobody serves is still a 404."""
        assert chat(services[2], "no-such-model").status_code == 404


class TestLiveState:
    def test_open_breaker_skips_the_provider(self, services: tuple[Service, ...], nats_server: NatsServer) -> None:
        """When a provider's breaker opens (provider-health KV), its models are skipped, not tried."""
        _, router, gateway = services
        health = ProviderHealth(provider="openai", state=BreakerState.OPEN, since=time.time())
        asyncio.run(kv_put(nats_server.url, "provider-health", "openai", health.model_dump_json().encode()))
        try:
            eventually(lambda: any(s["reason"] == "openai circuit open"  # type: ignore[index]
                                   for s in dry_run(gateway, "openai/gpt-4o-mini")["skipped"]),  # type: ignore[attr-defined]
                       15, "the router to see the open breaker")
            before = metric(router.metrics(), "leafwire_route_fallbacks_total", kind="cloud", status="503")
            r = chat(gateway, "openai/gpt-4o-mini")
            assert r.status_code == 200
            assert "skipped openai/gpt-4o-mini (openai circuit open)" in r.headers["x-leafwire-route"]
            assert metric(router.metrics(), "leafwire_route_fallbacks_total", kind="cloud", status="503") == before
        finally:
            asyncio.run(kv_put(nats_server.url, "provider-health", "openai", None))

    def test_exhausted_budget_runs_locally(self, services: tuple[Service, ...], nats_server: NatsServer) -> None:
        """With the tenant's budget exhausted (budgets KV), cloud models are skipped for the local one."""
        _, _, gateway = services
        status = BudgetStatus(scope="tenant-default", period="daily", window=budget_window("daily", time.time()),
                              spent_usd=10.5, limit_usd=10.0, state="exhausted")
        asyncio.run(kv_put(nats_server.url, "budgets", "tenant-default.daily", status.model_dump_json().encode()))
        try:
            eventually(lambda: any(s["reason"] == "budget exhausted"  # type: ignore[index]
                                   for s in dry_run(gateway, "anthropic/claude")["skipped"]),  # type: ignore[attr-defined]
                       15, "the router to see the exhausted budget")
            r = chat(gateway, "anthropic/claude")
            assert r.status_code == 200
            assert "skipped anthropic/claude (budget exhausted)" in r.headers["x-leafwire-route"]
        finally:
            asyncio.run(kv_put(nats_server.url, "budgets", "tenant-default.daily", None))


def policy_cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.router.policy_cli", *args, "--nats", url,
                           "--site", SITE], capture_output=True, text=True, timeout=60, cwd=ROOT)


class TestPolicyReload:
    def test_hot_reload_rejection_and_revert(self, services: tuple[Service, ...], nats_server: NatsServer,
                                             tmp_path: Path) -> None:
        """A pushed policy applies without restart; an invalid one is rejected and the old one stays."""
        _, _, gateway = services
        assert chat(gateway, "speedy").status_code == 404
        good = tmp_path / "good.yaml"
        good.write_text("local_model: tiny\naliases: {speedy: tiny}\nrules: [{name: everything, route: [requested]}]\n")
        pushed = policy_cli("push", str(good), url=nats_server.url)
        assert pushed.returncode == 0, pushed.stderr
        assert json.loads(pushed.stdout.splitlines()[-1])["outcome"] == "applied"
        r = chat(gateway, "speedy")
        assert r.status_code == 200
        assert "rule=everything" in r.headers["x-leafwire-route"]

        bad = tmp_path / "bad.yaml"
        bad.write_text("rules: [{name: x, route: []}]\n")
        refused = policy_cli("push", str(bad), url=nats_server.url)
        assert refused.returncode == 1
        assert "rules.0.route" in refused.stderr
        asyncio.run(kv_put(nats_server.url, "config", "router.policy", b"rules: not-a-list\n"))
        eventually(lambda: metric(services[1].metrics(), "leafwire_policy_reloads_total", outcome="rejected") >= 1,
                   10, "the router to reject the policy")
        assert chat(gateway, "speedy").status_code == 200  # the good policy is still in force

        cleared = policy_cli("clear", url=nats_server.url)
        assert json.loads(cleared.stdout.splitlines()[-1])["outcome"] == "reverted"
        assert chat(gateway, "speedy").status_code == 404

    def test_ab_variant_in_headers_and_sticky(self, services: tuple[Service, ...], nats_server: NatsServer,
                                              tmp_path: Path) -> None:
        """An A/B alias names the variant in x-leafwire-route and the usage event; a user keeps it."""
        _, _, gateway = services
        policy = tmp_path / "ab.yaml"
        policy.write_text("local_model: tiny\naliases:\n  assistant:\n    sticky: user\n    variants:\n"
                          "      - {name: blue, target: tiny, weight: 1}\n"
                          "      - {name: green, target: tiny, weight: 1}\n")
        assert policy_cli("push", str(policy), url=nats_server.url).returncode == 0
        try:
            def variant(user: str) -> str:
                route = chat(gateway, "assistant", user=user).headers["x-leafwire-route"]
                return route.split("variant=")[1].split(";")[0]

            assert len({variant("operator-7") for _ in range(5)}) == 1
            assert {variant(f"user-{i}") for i in range(30)} == {"blue", "green"}
            r = chat(gateway, "assistant", user="operator-7")
            event = eventually(lambda: (e := asyncio.run(last_usage(nats_server.url, SITE)))["request_id"]
                               == r.headers["x-request-id"] and e, 10, "the usage event")
            assert event["target"] == "local/tiny"
            assert event["variant"] == variant("operator-7")
        finally:
            policy_cli("clear", url=nats_server.url)


def test_busy_target_sheds_to_the_next(nats_server: NatsServer, tmp_path: Path) -> None:
    """When the first target is saturated the request goes to the next one in the chain."""
    busy_registry = write_registry(tmp_path / "busy.yaml")
    spare_registry = write_registry(tmp_path / "spare.yaml", name="tiny-spare")
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": "shed"}
    policy = write_policy(tmp_path / "policy.yaml", "local_model: tiny-spare\naliases: {chat: tiny}\n")
    busy = Service("local_inference", {**env, "LW_MODELS_FILE": str(busy_registry), "LW_INFERENCE_MAX_INFLIGHT": "1"})
    spare = Service("local_inference", {**env, "LW_MODELS_FILE": str(spare_registry)})
    router = Service("router", {**env, "LW_ROUTER_POLICY_FILE": str(policy)})
    with running(busy, spare, router, Service("gateway", env)) as (_, _, _, gateway), ThreadPoolExecutor(1) as pool:
        url = f"{gateway.base}/v1/chat/completions"
        long = pool.submit(httpx.post, url, timeout=60,
                           json={"model": "tiny", "messages": ASK, "max_tokens": 3000})
        eventually(lambda: metric(busy.metrics(), "leafwire_active_rows", model="tiny") == 1, 10, "tiny busy")
        r = httpx.post(url, timeout=30, json={"model": "chat", "messages": ASK, "max_tokens": 2})
        assert r.status_code == 200
        assert r.json()["model"] == "tiny-spare"
        route = r.headers["x-leafwire-route"]
        assert "fell back from tiny (429 overloaded)" in route or "skipped tiny (all workers busy)" in route
        assert long.result().status_code == 200
