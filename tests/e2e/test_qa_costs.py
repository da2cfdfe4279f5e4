"""QA of cost accounting and budgets, end to end, as an operator or a tenant sees them over HTTP and the CLI.

test_cloud.py's stack (httpx -> gateway -> router -> the hub's cloud-adapter -> the fakes of tests/fakes.py) with
tenants and budgets of this module's own, and an Anthropic model priced for its prompt cache. Each test uses a
tenant of its own, so budgets spent by one test do not reach another. QA found three bugs, fixed since: with a
day and a month both spent, Retry-After said the next day; a jump from under 80% to over the limit published no
warning; a limit taken out by a reload left its ratio gauge (and an alert on it) behind.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.budgets import seconds_left
from tests.e2e import test_cloud
from tests.e2e.test_cloud import CloudStack, usage_event
from tests.fakes import FakeProvider, Fault
from tests.support import NatsServer, eventually, leafwire, metric, start_single, usage_events

pytestmark = pytest.mark.e2e
TENANTS = ("acme", "warn1", "mon", "rep", "lower", "free", "other", "cost", "both", "gauge", "jump")
API_KEYS = ",".join(f"key-{t}:{t}" for t in TENANTS)
BUDGETS: dict[str, Any] = {"tenants": {"warn1": {"daily_usd": 0.006}, "mon": {"monthly_usd": 0.004},
                                       "lower": {"daily_usd": 1}, "both": {"daily_usd": 0.004, "monthly_usd": 0.004},
                                       "gauge": {"daily_usd": 0.006}, "jump": {"daily_usd": 0.004}}}
# priced the way Anthropic prices its prompt cache: reads half, 5-minute writes 1.25x, 1-hour writes 2x the input
CACHE_PRICES = {"upstream": "claude-haiku-x", "max_tokens": 64, "input_per_mtok": 1, "output_per_mtok": 2,
                "cached_input_per_mtok": 0.5, "cache_write_input_per_mtok": 1.25,
                "cache_write_1h_input_per_mtok": 2}


def write_providers(path: Path, openai_fake: FakeProvider, claude_fake: FakeProvider,
                    budgets: dict[str, Any] | None = None) -> Path:
    """test_cloud.py's providers file, a priced Anthropic model ``claude/cache`` and ``budgets``."""
    test_cloud.providers_file(path, openai_fake, claude_fake)
    config = json.loads(path.read_text())
    claude = next(p for p in config["providers"] if p["name"] == "claude")
    claude["models"]["cache"] = CACHE_PRICES
    config["budgets"] = BUDGETS if budgets is None else budgets
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def qc(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudStack]:
    with test_cloud.cloud_stack(nats_server, tmp_path_factory.mktemp("qa10"), write_providers, API_KEYS,
                                LW_CLOUD_BUDGET_FLUSH_S="0.2", LW_CLOUD_PROVIDERS_CHECK_S="0") as stack:
        yield stack


@pytest.fixture(autouse=True)
def _fresh_fakes(qc: CloudStack) -> None:
    qc.openai_fake.reset()
    qc.claude_fake.reset()


def post(qc: CloudStack, body: dict[str, Any], key: str = "key-cost", path: str = "chat/completions") -> httpx.Response:
    return httpx.post(f"{qc.gateway.base}/v1/{path}", json=body, timeout=30, headers={"Authorization": f"Bearer {key}"})


def stream(qc: CloudStack, body: dict[str, Any], key: str = "key-cost") -> tuple[str, list[dict[str, Any]]]:
    """A streamed request's id and its data events."""
    with httpx.stream("POST", f"{qc.gateway.base}/v1/chat/completions", timeout=30,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200, r.read()
        data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        return r.headers["x-request-id"], data


def event_of(qc: CloudStack, request_id: str) -> Any:
    return eventually(lambda: usage_event(qc, request_id), 10, "the usage event")


def uid() -> str:
    """One word no other test sends (the exact cache outlives a test)."""
    return uuid.uuid4().hex


def ask(content: str | None = None) -> list[dict[str, str]]:
    return [{"role": "user", "content": content or f"hello {uid()}"}]  # 2 words in the prompt, 3 in the answer


def alerts(qc: CloudStack, scope: str) -> list[dict[str, Any]]:
    """Every BudgetStatus published for ``scope`` on the hub's ``usage.budget`` subject (kept by USAGE)."""
    return [e for s, e in asyncio.run(usage_events(qc.nats.url))
            if s == "lw.v1.hub.usage.budget" and e.get("scope") == scope]


def adapter_metric(qc: CloudStack, name: str, **labels: str) -> float:
    return metric(qc.adapter.metrics(), name, **labels)


def reload(qc: CloudStack, budgets: dict[str, Any]) -> None:
    before = adapter_metric(qc, "leafwire_cloud_providers_reloads_total", outcome="applied")
    write_providers(Path(qc.adapter.env["LW_PROVIDERS_FILE"]), qc.openai_fake, qc.claude_fake, budgets)
    assert qc.adapter.proc is not None
    qc.adapter.proc.send_signal(signal.SIGHUP)
    eventually(lambda: adapter_metric(qc, "leafwire_cloud_providers_reloads_total", outcome="applied") > before,
               10, "the reload applied")


class TestCost:
    def test_a_stream_costs_its_tokens_with_cached_ones_at_the_cached_price(self, qc: CloudStack) -> None:
        """A streamed answer whose provider read 2 prompt tokens from its cache costs what the whole answer
        would: 2 tokens at $0.5/M, 3 completion tokens at $2/M."""
        qc.openai_fake.script(Fault.ok(prompt_tokens_details={"cached_tokens": 2}))
        request_id, data = stream(qc, {"model": "fake/echo", "messages": ask()})
        assert data[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 2
        event = event_of(qc, request_id)
        assert (event["prompt_tokens"], event["completion_tokens"]) == (2, 3)
        assert event["cost_usd"] == pytest.approx((2 * 0.5 + 3 * 2) / 1e6)

    @pytest.mark.parametrize("streamed", [False, True])
    def test_n_choices_cost_the_prompt_once_and_every_completion(self, qc: CloudStack, streamed: bool) -> None:
        """n=2 in one call: the prompt (2 tokens, 1 of them cached) once, both answers' 3+3 completion tokens."""
        qc.openai_fake.script(Fault.ok(prompt_tokens_details={"cached_tokens": 1}), Fault.ok())
        body = {"model": "fake/echo", "messages": ask(), "n": 2, "temperature": 1}
        if streamed:
            request_id, _ = stream(qc, body)
        else:
            r = post(qc, body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 6
            request_id = r.headers["x-request-id"]
        assert len(qc.openai_fake.calls) == 1
        event = event_of(qc, request_id)
        assert (event["prompt_tokens"], event["completion_tokens"]) == (2, 6)
        assert event["cost_usd"] == pytest.approx((1 * 1 + 1 * 0.5 + 6 * 2) / 1e6)

    def test_embeddings_cost_their_input_tokens(self, qc: CloudStack) -> None:
        """Embeddings of 3 + 2 words: 5 input tokens at $2/M, no completion."""
        r = post(qc, {"model": "fake/embed", "input": [f"a b {uid()}", f"d {uid()}"]}, path="embeddings")
        assert r.status_code == 200, r.text
        event = event_of(qc, r.headers["x-request-id"])
        assert (event["prompt_tokens"], event["completion_tokens"]) == (5, 0)
        assert event["cost_usd"] == pytest.approx(5 * 2 / 1e6)


class TestBudgets:
    def test_a_warning_is_published_once_per_crossing(self, qc: CloudStack) -> None:
        """Tenant `warn1` ($0.006 a day) spends $0.005 (83%), then more small requests that stay under its
        limit: one `warning` is published, not one a flush, and the ratio gauge says 83%."""
        assert post(qc, {"model": "priced/echo", "messages": ask()}, key="key-warn1").status_code == 200
        eventually(lambda: alerts(qc, "tenant-warn1"), 10, "the warning")
        for _ in range(3):
            assert post(qc, {"model": "fake/echo", "messages": ask()}, key="key-warn1").status_code == 200
        time.sleep(1)  # several flushes
        assert [a["state"] for a in alerts(qc, "tenant-warn1")] == ["warning"]
        ratio = adapter_metric(qc, "leafwire_budget_used_ratio", scope="tenant-warn1", period="daily")
        assert ratio == pytest.approx(0.005 / 0.006, rel=0.01)

    def test_a_spent_monthly_budget_is_refused_until_the_month_ends(self, qc: CloudStack) -> None:
        """Tenant `mon` ($0.004 a month) spends $0.005: its next request is a 429 budget_exceeded naming the
        monthly budget, Retry-After until the first of next month (UTC), not the next day; so is the router's
        own refusal once it has read the bucket."""
        assert post(qc, {"model": "priced/echo", "messages": ask()}, key="key-mon").status_code == 200
        left = seconds_left("monthly", time.time())
        r = post(qc, {"model": "priced/echo", "messages": ask()}, key="key-mon")
        assert r.status_code == 429, r.text
        assert (r.json()["error"]["code"], r.headers["x-should-retry"]) == ("budget_exceeded", "false")
        assert "monthly cloud budget of tenant 'mon'" in r.json()["error"]["message"]
        assert abs(int(r.headers["retry-after"]) - left) < 60

        def refused_by_router() -> httpx.Response | None:
            r = post(qc, {"model": "priced/echo", "messages": ask()}, key="key-mon")
            return r if "no local model can serve this" in r.text else None

        r = eventually(refused_by_router, 10, "the router to refuse")
        assert r.status_code == 429
        assert abs(int(r.headers["retry-after"]) - left) < 60
        assert len(qc.openai_fake.calls) == 1

    def test_a_budget_lowered_by_a_reload_refuses_at_once(self, qc: CloudStack) -> None:
        """Tenant `lower` ($1 a day) spends $0.005; the operator lowers its limit to $0.004 (SIGHUP): it keeps what
        was spent, so the next request is refused and `leafwire budgets` shows it exhausted."""
        try:
            assert post(qc, {"model": "priced/echo", "messages": ask()}, key="key-lower").status_code == 200
            time.sleep(0.5)  # flushed
            reload(qc, {"tenants": {**BUDGETS["tenants"], "lower": {"daily_usd": 0.004}}})
            r = post(qc, {"model": "priced/echo", "messages": ask()}, key="key-lower")
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "budget_exceeded"

            def shown() -> str | None:
                out = leafwire("budgets", "--tenant", "lower", "--nats", qc.nats.url).stdout
                return out if "exhausted" in out else None

            table = eventually(shown, 10, "leafwire budgets to show the budget exhausted")
            daily = next(line for line in table.splitlines() if line.startswith("tenant-lower  daily"))
            assert "0.004" in daily, table
            assert "exhausted" in daily, table
        finally:
            reload(qc, BUDGETS)


    def test_retry_after_is_when_every_spent_budget_has_reset(self, qc: CloudStack) -> None:
        """Tenant `both` ($0.004 a day and a month) spends $0.005: both are spent. Retrying after Retry-After
        (the next UTC day) would be refused again by the monthly budget: Retry-After says the first of next
        month, from the adapter and from the router alike (QA found it said the next day)."""
        assert post(qc, {"model": "priced/echo", "messages": ask()}, key="key-both").status_code == 200
        month = seconds_left("monthly", time.time())  # (the last day of a month, the day's too: the test tells less)
        r = post(qc, {"model": "priced/echo", "messages": ask()}, key="key-both")
        assert r.status_code == 429, r.text
        by_adapter = int(r.headers["retry-after"])

        def refused_by_router() -> httpx.Response | None:
            r = post(qc, {"model": "priced/echo", "messages": ask()}, key="key-both")
            return r if "no local model can serve this" in r.text else None

        by_router = int(eventually(refused_by_router, 10, "the router to refuse").headers["retry-after"])
        assert (abs(by_adapter - month) < 60, abs(by_router - month) < 60) == (True, True), (by_adapter, by_router)

    def test_a_jump_past_the_limit_still_reports_the_warning_level(self, qc: CloudStack) -> None:
        """Tenant `jump` ($0.004 a day) spends $0.005 in one request: it crossed its warning level and its
        limit. Both crossings are published (QA found only `exhausted` was, so an operator who alerts on
        `warning` events was never warned of it)."""
        assert post(qc, {"model": "priced/echo", "messages": ask()}, key="key-jump").status_code == 200
        eventually(lambda: any(a["state"] == "exhausted" for a in alerts(qc, "tenant-jump")), 10, "exhausted")
        time.sleep(0.5)
        assert [a["state"] for a in alerts(qc, "tenant-jump")] == ["warning", "exhausted"]

    def test_the_ratio_gauge_follows_a_limit_taken_out_by_a_reload(self, qc: CloudStack) -> None:
        """Tenant `gauge` ($0.006 a day) spends $0.005: the gauge says 83%. The operator takes its limit out
        (SIGHUP): it is no longer limited (and no longer named in the file), and its gauge goes (QA found it kept
        saying 83%, so a `used_ratio > 0.8` alert kept firing for a tenant that has no budget)."""
        try:
            assert post(qc, {"model": "priced/echo", "messages": ask()}, key="key-gauge").status_code == 200
            eventually(lambda: adapter_metric(qc, "leafwire_budget_used_ratio", scope="tenant-gauge",
                                              period="daily") > 0.8, 5, "the gauge at 83%")
            reload(qc, {"tenants": {t: b for t, b in BUDGETS["tenants"].items() if t != "gauge"}})
            assert post(qc, {"model": "fake/echo", "messages": ask()}, key="key-gauge").status_code == 200
            time.sleep(1)  # several flushes, each setting the gauges
            assert adapter_metric(qc, "leafwire_budget_used_ratio", scope="tenant-gauge", period="daily") < 0.8
        finally:
            reload(qc, BUDGETS)


class TestUsageReport:
    def test_the_report_adds_up_the_usage_events(self, qc: CloudStack) -> None:
        """Tenant `rep` asks a whole answer, a stream, n=2, embeddings, and one the provider refuses: `leafwire
        usage --tenant rep` counts each request once, the error, and the tokens and cost of the events."""
        ids = []
        for body in ({"model": "fake/echo", "messages": ask()},
                     {"model": "fake/echo", "messages": ask(), "n": 2, "temperature": 1}):
            r = post(qc, body, key="key-rep")
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-request-id"])
        ids.append(stream(qc, {"model": "claude/cache", "messages": ask()}, key="key-rep")[0])
        r = post(qc, {"model": "fake/embed", "input": [f"a {uid()}"]}, key="key-rep", path="embeddings")
        ids.append(r.headers["x-request-id"])
        qc.openai_fake.script(Fault.error(400))
        r = post(qc, {"model": "fake/echo", "messages": ask()}, key="key-rep")
        assert r.status_code == 400
        ids.append(r.headers["x-request-id"])
        events = [event_of(qc, i) for i in ids]
        out = leafwire("usage", "--nats", qc.nats.url, "--tenant", "rep", "--since", "all", "--json")
        assert out.returncode == 0, out.stderr
        total = json.loads(out.stdout)["total"]
        assert total["requests"] == len(ids)
        assert total["errors"] == 1
        assert total["prompt_tokens"] == sum(e["prompt_tokens"] for e in events)
        assert total["completion_tokens"] == sum(e["completion_tokens"] for e in events)
        assert total["cost_usd"] == pytest.approx(sum(e["cost_usd"] for e in events))


def global_providers(path: Path, openai_fake: FakeProvider, claude_fake: FakeProvider) -> Path:
    return write_providers(path, openai_fake, claude_fake, {"global": {"daily_usd": 0.009}})


def test_a_spent_global_budget_refuses_every_tenant(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A global limit of $0.009 a day and no tenant limit: tenant `free` spends $0.010; every tenant, `other`
    too, is then refused with 429 budget_exceeded naming the global budget, and the global gauge says 111%.
    A server of its own: the module's ledger already counts what the other tests spent globally."""
    server = start_single(tmp_path_factory.mktemp("qa10-nats"))
    try:
        with test_cloud.cloud_stack(server, tmp_path_factory.mktemp("qa10-global"), global_providers, API_KEYS,
                                    LW_CLOUD_BUDGET_FLUSH_S="0.2") as qg:
            for _ in range(2):
                assert post(qg, {"model": "priced/echo", "messages": ask()}, key="key-free").status_code == 200
            for key in ("key-free", "key-other"):
                r = post(qg, {"model": "priced/echo", "messages": ask()}, key=key)
                assert r.status_code == 429, r.text
                assert r.json()["error"]["code"] == "budget_exceeded"
                assert "the global daily cloud budget ($0.009) is spent" in r.json()["error"]["message"]
            ratio = eventually(lambda: (r := adapter_metric(qg, "leafwire_budget_used_ratio", scope="global",
                                                            period="daily")) >= 1 and r,
                               5, "the global gauge over 100% (refreshed every second)")
            assert ratio == pytest.approx(0.010 / 0.009, rel=0.01)
    finally:
        server.stop()
