"""QA of operating the cloud adapter: restarts (a crash, a SIGTERM, nats-server restarted under it), provider
keys read from files, and its metrics.

Its own stack: a nats-server, router and gateway of site ``plant`` for the whole module, and a hub
cloud-adapter started by each test (some kill it, stop it or restart it). The providers are two fakes of
tests/fakes.py: ``fake`` (providers ``fake``, ``fragile`` and ``gone``, the last two with a breaker of 2
failures open 30 s) and ``filed`` (its key in a file). QA found five bugs, fixed since (an answer or stream
cut by the adapter's shutdown was a 499 or left hanging; a restart forgot an open breaker; a removed
provider's breaker gauge stayed; a key file of two lines was a 500 on every call); the other tests check
behaviour no other test covers (a crash and restart keeps spending and cache, a nats-server restart loses no
request nor usage event, the cloud metrics count exactly what happened, keys read from files never leak).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_cloud import Capture
from tests.fakes import FakeProvider, Fault
from tests.support import (
    NatsServer,
    Service,
    cloud_router_env,
    eventually,
    kv_json,
    metric,
    running,
    tag,
    usage_events,
)

pytestmark = pytest.mark.e2e
SITE = "plant"
KEY = "sk-qa6-ops-7c1d2e3f4a5b6c7d8e"
FILE_KEY = "sk-qa6-file-first-0a0a0a0a0a0a"
FILE_KEY2 = "sk-qa6-file-second-1b1b1b1b1b"
PRICED = {"input_per_mtok": 1000, "output_per_mtok": 1000}  # "qa xxxxxxxx", 2 + 3 tokens: $0.005
FRAGILE = {"failures": 2, "open_s": 30}
POOR_LIMIT = 0.02
KEEPALIVE = {"LW_KEEPALIVE_S": "1"}


@dataclass
class Ops:
    nats: NatsServer
    router: Service
    gateway: Service
    fake: FakeProvider
    filed: FakeProvider
    file: Path
    key_file: Path

    def adapter(self, **env: str) -> Service:
        """A hub cloud-adapter of the module's providers file (not started)."""
        return Service("cloud_adapter", {
            "LW_NATS_URL": self.nats.url, "LW_SITE": "hub", "LW_PROVIDERS_FILE": str(self.file), "LW_QA6_KEY": KEY,
            "LW_CLOUD_BACKOFF_BASE_S": "0.01", "LW_CLOUD_BACKOFF_CAP_S": "0.02", "LW_CLOUD_BREAKER_FAILURES": "1000",
            "LW_CLOUD_HEALTH_INTERVAL_S": "1", "LW_CLOUD_PROVIDERS_CHECK_S": "0.2", "LW_LOG_LEVEL": "debug",
            **KEEPALIVE, **env})

    def post(self, body: dict[str, Any], key: str = "key-acme", timeout: float = 20) -> httpx.Response:
        return httpx.post(f"{self.gateway.base}/v1/chat/completions", json=body, timeout=timeout,
                          headers={"Authorization": f"Bearer {key}"})

    def ask(self, model: str = "fake/echo", key: str = "key-acme", **more: Any) -> httpx.Response:
        """A request no other one sends (the cache outlives a test)."""
        return self.post({"model": model, "messages": [{"role": "user", "content": tag()}], **more}, key=key)

    def write(self, *, without: str | None = None) -> None:
        """The providers file (``without``: that provider taken out)."""
        def entry(name: str, fake: FakeProvider, **more: Any) -> dict[str, Any]:
            return {"name": name, "kind": "openai-compatible", "base_url": fake.url, "local": True,
                    "models": {"echo": PRICED}, "timeouts": {"connect_s": 2, "first_byte_s": 3, "total_s": 10},
                    **more}
        providers = [entry("fake", self.fake, api_key_env="LW_QA6_KEY"),
                     entry("fragile", self.fake, api_key_env="LW_QA6_KEY", breaker=FRAGILE),
                     entry("gone", self.fake, api_key_env="LW_QA6_KEY", breaker=FRAGILE),
                     entry("filed", self.filed, api_key_file=str(self.key_file))]
        self.file.write_text(json.dumps({
            "providers": [p for p in providers if p["name"] != without],
            "budgets": {"tenants": {"acme": {"daily_usd": 100}, "poor": {"daily_usd": POOR_LIMIT}}}}))


@pytest.fixture(scope="module")
def ops(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    tmp = tmp_path_factory.mktemp("qa-ops-cloud")
    fake = FakeProvider("openai", key=KEY).start()
    filed = FakeProvider("openai", key=FILE_KEY).start()
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE, **KEEPALIVE}
    router = Service("router", {**env, **cloud_router_env(tmp)})
    gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": "key-acme:acme,key-poor:poor",
                                  "LW_GATEWAY_IDLE_TIMEOUT_S": "6"})
    stack = Ops(nats_server, router, gateway, fake, filed, tmp / "providers.yaml", tmp / "filed.key")
    stack.key_file.write_text(FILE_KEY + "\n")
    stack.write()
    try:
        with running(router, gateway):
            yield stack
    finally:
        fake.stop()
        filed.stop()


@contextlib.contextmanager
def serving(ops: Ops, **env: str) -> Iterator[Service]:
    """A fresh cloud-adapter, answering through the gateway; stopped (by its PID) at the end."""
    with running(ops.adapter(**env)) as (adapter,):
        wait_answered(ops)
        ops.fake.reset()
        ops.filed.reset()
        yield adapter


def wait_answered(ops: Ops) -> None:
    eventually(lambda: ops.ask().status_code == 200, 20, "the cloud adapter to answer through the gateway")


def kv(ops: Ops, bucket: str, key: str) -> Any:
    return kv_json(ops.nats.url, bucket, key)


def adapter_metric(adapter: Service, name: str, **labels: str) -> float:
    return metric(adapter.metrics(), name, **labels)


def in_background(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``call`` in a thread; its result (or exception) lands in the dict under ``"r"``."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["r"] = call()
        except Exception as exc:
            out["r"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def open_breaker(ops: Ops, provider: str) -> None:
    """Two failed tries open a FRAGILE breaker; wait until the provider-health bucket says so."""
    ops.fake.script(Fault.error(503), Fault.error(503))
    assert ops.ask(f"{provider}/echo").status_code == 502
    eventually(lambda: (kv(ops, "provider-health", provider) or {}).get("state") == "open", 10,
               f"{provider}'s breaker open in KV")


# -- restarts


def test_spending_cache_and_refusals_survive_a_crash_and_restart(ops: Ops) -> None:
    """An adapter killed (SIGKILL) after it wrote its spending: the one started in its place refuses the tenant
    whose budget is spent, answers the cached request from the cache without calling the provider, shows the
    same spending on /metrics, and the ledger in KV is neither reset nor counted twice."""
    cached = {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}], "temperature": 0}
    with running(ops.adapter()) as (first,):
        wait_answered(ops)
        assert ops.post(cached).headers["x-leafwire-cache"] == "miss"
        codes = [ops.ask(key="key-poor").status_code for _ in range(5)]  # $0.005 each: spent at the fourth
        assert codes == [200, 200, 200, 200, 429], codes
        spent = eventually(lambda: (e := kv(ops, "budgets", "tenant-poor.daily.hub")) and e["state"] == "exhausted"
                           and e["spent_usd"], 10, "the spending written")
        overall = kv(ops, "budgets", "global.daily.hub")["spent_usd"]
        first.kill()
        with running(ops.adapter()) as (second,):
            refused = ops.ask(key="key-poor")
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "budget_exceeded"
            ops.fake.reset()
            again = ops.post(cached)
            assert again.status_code == 200
            assert again.headers["x-leafwire-cache"] == "hit"
            assert ops.fake.calls == []
            eventually(lambda: adapter_metric(second, "leafwire_budget_spent_usd", scope="tenant-poor",
                                              period="daily") == pytest.approx(spent), 5, "the spending on /metrics")
            time.sleep(1.5)  # a flush of the new adapter
            assert kv(ops, "budgets", "tenant-poor.daily.hub")["spent_usd"] == pytest.approx(spent)
            assert kv(ops, "budgets", "global.daily.hub")["spent_usd"] == pytest.approx(overall)


def test_an_open_breaker_stays_open_across_a_restart(ops: Ops) -> None:
    """fragile's breaker opened (30 s): the adapter crashes and is restarted by its supervisor a few seconds
    later. The provider is still failing; it must not get calls again before the breaker's open_s is over,
    and the routers must keep reading ``open`` from the provider-health bucket."""
    with serving(ops) as first:
        open_breaker(ops, "fragile")
        first.kill()
    with serving(ops):
        time.sleep(1.5)  # the new adapter's first health publications
        assert (kv(ops, "provider-health", "fragile") or {}).get("state") == "open"
        ops.fake.script(Fault.error(503), Fault.error(503), Fault.error(503))
        r = ops.ask("fragile/echo")
        assert r.status_code == 503, r.text
        assert ops.fake.calls == []


def test_a_removed_providers_breaker_is_not_left_open(ops: Ops) -> None:
    """``gone``'s breaker is open, then the operator takes ``gone`` out of the providers file (applied without a
    restart). Its breaker is no more: an alert on ``leafwire_cloud_breaker_state == 2`` must stop firing."""
    try:
        with serving(ops) as adapter:
            open_breaker(ops, "gone")
            assert adapter_metric(adapter, "leafwire_cloud_breaker_state", provider="gone") == 2
            applied = adapter_metric(adapter, "leafwire_cloud_providers_reloads_total", outcome="applied")
            ops.write(without="gone")
            eventually(lambda: adapter_metric(adapter, "leafwire_cloud_providers_reloads_total",
                                              outcome="applied") > applied, 10, "the file applied")
            # Taken out (once the routers no longer hear of it: an adapter killed by an earlier test may still
            # be in their catalog for a few seconds).
            eventually(lambda: ops.ask("gone/echo").status_code == 404, 15, "gone/echo taken out")
            states = [line for line in adapter.metrics().splitlines()
                      if line.startswith("leafwire_cloud_breaker_state{") and 'provider="gone"' in line]
            assert states == []
    finally:
        ops.write()


def test_a_whole_answer_cut_by_the_adapters_shutdown_is_a_503(ops: Ops) -> None:
    """The adapter gets SIGTERM (a deploy, ``systemctl restart``) while a provider takes longer than its drain
    grace (LW_NATS_DRAIN_TIMEOUT_S, 1 s here) to answer: the caller cancelled nothing, so it must get a 503 in
    OpenAI's shape (the adapter shutting down; worth a retry), not a 499 ``cancelled``, which OpenAI clients
    do not retry."""
    with serving(ops, LW_NATS_DRAIN_TIMEOUT_S="1") as adapter:
        ops.fake.script(Fault.ok(delay_s=5))
        thread, out = in_background(ops.ask)
        eventually(lambda: len(ops.fake.calls) == 1, 10, "the call to reach the provider")
        adapter.stop()
        thread.join(20)
    r = out["r"]
    assert isinstance(r, httpx.Response)
    assert r.json()["error"]["code"] != "cancelled", r.text
    assert r.status_code == 503, r.text


def test_a_stream_cut_by_the_adapters_shutdown_ends_at_once(ops: Ops) -> None:
    """The same with a stream under way: the adapter knows it is ending it, so the caller's stream must end
    with an error event at once, not after the gateway's idle timeout (6 s here, 20 s by default) of
    silence."""
    events: list[str] = []

    def stream() -> float:
        with httpx.stream("POST", f"{ops.gateway.base}/v1/chat/completions", timeout=20,
                          headers={"Authorization": "Bearer key-acme"},
                          json={"model": "fake/echo", "stream": True,
                                "messages": [{"role": "user", "content": tag()}]}) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))
        return time.monotonic()

    with serving(ops, LW_NATS_DRAIN_TIMEOUT_S="1") as adapter:
        ops.fake.script(Fault.drip(0.5, text=" ".join(["word"] * 30)))
        thread, out = in_background(stream)
        eventually(lambda: len(events) >= 2, 10, "the stream to begin")
        adapter.stop()
        stopped = time.monotonic()
        thread.join(20)
    assert isinstance(out["r"], float)
    assert '"error"' in events[-1]
    assert out["r"] - stopped < 3, f"the stream ended {out['r'] - stopped:.1f} s after the adapter stopped"


def test_no_request_nor_usage_event_is_lost_across_a_nats_server_restart(ops: Ops) -> None:
    """nats-server restarted under the services (same port, its JetStream store kept) while a provider is
    answering: that answer still reaches its caller, the adapter serves again at once, and every request's
    usage event (before, across and after the restart) is in the USAGE stream, none dropped."""
    with serving(ops) as adapter:
        before = [ops.ask() for _ in range(2)]
        ops.fake.script(Fault.ok(delay_s=2.5))
        thread, out = in_background(ops.ask)
        eventually(lambda: len(ops.fake.calls) == 3, 10, "the slow call to reach the provider")
        ops.nats.restart()
        thread.join(20)
        across = out["r"]
        assert isinstance(across, httpx.Response)
        assert across.status_code == 200, across.text
        wait_answered(ops)
        after = [ops.ask() for _ in range(2)]
        answered = [*before, across, *after]
        assert all(r.status_code == 200 for r in answered)
        ids = {r.headers["x-request-id"] for r in answered}

        def stored() -> set[str]:
            return ids & {e["request_id"] for s, e in asyncio.run(usage_events(ops.nats.url))
                          if s.endswith(".usage.events")}  # USAGE keeps budget alerts too
        eventually(lambda: stored() == ids, 10, "every usage event stored")
        assert adapter_metric(adapter, "leafwire_usage_events_dropped_total") == 0
        assert adapter_metric(adapter, "leafwire_nats_connected", service="cloud-adapter") == 1


# -- metrics


def test_cloud_metrics_count_exactly_what_happened(ops: Ops) -> None:
    """After three requests retried once each (a 500, then the answer), one failing all three tries, and a
    cached request asked twice: each documented series moved by exactly that much, the in-flight gauge is
    back to 0 and the budget gauge has the cost."""
    names = ["leafwire_cloud_requests_total", "leafwire_cloud_time_to_first_byte_seconds_count",
             "leafwire_cloud_request_duration_seconds_count", "leafwire_cloud_retries_total",
             "leafwire_cloud_attempt_failures_total", "leafwire_cloud_tokens_total", "leafwire_cloud_cost_usd_total",
             "leafwire_cloud_cache_lookups_total"]
    with serving(ops) as adapter:
        def values() -> dict[str, float]:
            text = adapter.metrics()
            fake = {"provider": "fake"}
            return {
                "ok": metric(text, names[0], **fake, model="echo", outcome="ok"),
                "error": metric(text, names[0], **fake, model="echo", outcome="error"),
                "cache_hit": metric(text, names[0], **fake, model="echo", outcome="cache_hit"),
                "ttfb": metric(text, names[1], **fake, model="echo"),
                "duration": metric(text, names[2], **fake, model="echo"),
                "retries": metric(text, names[3], **fake, reason="upstream_error"),
                "failures": metric(text, names[4], **fake, code="upstream_error"),
                "prompt": metric(text, names[5], **fake, model="echo", kind="prompt"),
                "completion": metric(text, names[5], **fake, model="echo", kind="completion"),
                "cost": metric(text, names[6], **fake, model="echo"),
                "hit": metric(text, names[7], result="hit"),
                "miss": metric(text, names[7], result="miss"),
            }
        spent = eventually(lambda: adapter_metric(adapter, "leafwire_budget_spent_usd", scope="tenant-acme",
                                                  period="daily"), 5, "the budget gauge set (after a flush)")
        was = values()
        for _ in range(3):
            ops.fake.script(Fault.error(500))
            assert ops.ask().status_code == 200  # "qa xxxxxxxx": 2 prompt tokens, "pong qa xxxxxxxx": 3
        ops.fake.script(*[Fault.error(500)] * 3)
        assert ops.ask().status_code == 502
        cached = {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}], "temperature": 0}
        assert [ops.post(cached).headers["x-leafwire-cache"] for _ in range(2)] == ["miss", "hit"]
        now = values()
        moved = {name: round(now[name] - was[name], 9) for name in now}
        assert moved == {"ok": 4, "error": 1, "cache_hit": 1, "ttfb": 4, "duration": 6, "retries": 5,
                         "failures": 6, "prompt": 8, "completion": 12, "cost": 0.02, "hit": 1, "miss": 1}
        assert adapter_metric(adapter, "leafwire_cloud_inflight_requests", provider="fake") == 0
        eventually(lambda: adapter_metric(adapter, "leafwire_budget_spent_usd", scope="tenant-acme", period="daily")
                   == pytest.approx(spent + 0.02), 5, "the budget gauge to count the cost")


# -- keys read from files


def test_a_key_file_missing_written_rotated_and_emptied_never_leaks(ops: Ops) -> None:
    """``filed`` reads its key from a file. Absent: 503 provider_key_missing naming the file (not the key), not
    worth retrying; written: answered; rotated: the next calls send the new key; emptied: 503 again. No key
    ever crosses NATS, or reaches a log or /metrics."""
    ops.key_file.unlink()
    try:
        with serving(ops) as adapter:
            traffic = Capture(ops.nats.url, ">")
            missing = ops.ask("filed/echo")
            assert missing.status_code == 503
            assert missing.json()["error"]["code"] == "provider_key_missing"
            assert str(ops.key_file) in missing.json()["error"]["message"]
            assert missing.headers["x-should-retry"] == "false"
            ops.key_file.write_text(FILE_KEY + "\n")
            eventually(lambda: ops.ask("filed/echo").status_code == 200, 10, "the key file read")
            ops.filed.key = FILE_KEY2
            ops.key_file.write_text(FILE_KEY2 + "\n")
            eventually(lambda: ops.ask("filed/echo").status_code == 200, 10, "the rotated key used")
            assert ops.filed.calls[-1].headers["Authorization"] == f"Bearer {FILE_KEY2}"
            ops.key_file.write_text("")

            def refused() -> httpx.Response | None:
                r = ops.ask("filed/echo")
                return r if r.status_code != 200 else None
            emptied = eventually(refused, 10, "the emptied key file applied")
            assert emptied.status_code == 503
            assert emptied.json()["error"]["code"] == "provider_key_missing"
            seen = traffic.raw(1)
            exposed = {"nats": seen.decode(errors="replace"), "metrics": adapter.metrics(),
                       **{s.module: s.log_path.read_text() for s in (adapter, ops.router, ops.gateway) if s.log_path}}
            for key in (FILE_KEY, FILE_KEY2):
                assert [where for where, text in exposed.items() if key in text] == []
            assert b"provider_key_missing" in seen  # the capture saw the traffic
    finally:
        ops.filed.key = FILE_KEY
        ops.key_file.write_text(FILE_KEY + "\n")


def test_a_key_file_with_a_second_line_is_a_clear_refusal(ops: Ops) -> None:
    """An operator leaves a note under the key (``# rotated 2026-11-22``): the key cannot be sent as a header.
    The caller must get a clear error in OpenAI's shape with a code (the key file is unusable: only an operator
    can mend it), not a 500 without a code, naming a Python exception, that the openai client retries."""
    try:
        with serving(ops):
            ops.key_file.write_text(FILE_KEY + "\n# rotated 2026-11-22\n")
            time.sleep(1)  # applied (checked every 0.2 s)
            r = ops.ask("filed/echo")
            assert r.status_code != 500, r.text
            assert r.json()["error"]["code"], r.text
            assert "ValueError" not in r.text
    finally:
        ops.key_file.write_text(FILE_KEY + "\n")
