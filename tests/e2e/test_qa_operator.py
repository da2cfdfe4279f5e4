"""QA of the cloud adapter as an operator sees it (one used to LiteLLM's proxy): its /metrics, its log, and the
operator commands ``leafwire providers validate``, ``leafwire usage`` and ``leafwire budgets``.

Covers what no other test does: every metric of docs/cloud.md's table is on the adapter's /metrics with exactly
its documented labels and bounded label values; a stream, a stream retried once, a provider's 400, a budget
refusal and a breaker-open refusal move each series as documented (the histograms once a request, not once a
try); no provider key reaches the caller, the debug log, NATS, usage events or /metrics around a provider that
cannot be reached, nor ``providers validate``'s output; ``providers validate`` on broken files; the usage report's
totals and options against the USAGE stream; ``leafwire budgets`` against the ``budgets`` bucket. QA found four
bugs, fixed since: a key under 8 characters (a local server's) was never redacted, so a provider's error echoing
it reached the caller and the log; a key written twice in the providers file was taken silently, the last one
winning (a price, a budget); ``leafwire usage --by cached --json`` put the cached count where the group's name
belongs; a try the breaker refused was counted (and logged) as a retry.

The stack is test_cloud.py's (httpx -> gateway -> router -> the hub's cloud-adapter, at debug level -> fakes of
tests/fakes.py) with a providers file of this module: a priced ``fake/echo`` ($0.005 a request), three
providers with a breaker of 2 failures (``fragile``, ``brittle``, ``shaky``), one whose key is short (``short``,
its own fake) and one that nothing listens for (``down``). Each test uses tenants of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.topology import free_port
from tests.e2e import test_cloud
from tests.e2e.test_cloud import KEY, Capture, CloudStack
from tests.fakes import FakeProvider, Fault
from tests.support import ROOT, NatsServer, eventually, kv_json, leafwire, metric, tag, usage_events

pytestmark = pytest.mark.e2e
SHORT_KEY = "sk-7abc"  # a local server's key, as short as some are (vLLM --api-key): 7 characters
TENANTS = ("acme12", "rep12", "lim12", "lab12", "poor12", "keys12")
LIMITED = ("lim12", "lab12", "poor12")  # $0.006 a day: warned at the first $0.005, spent at the second
API_KEYS = ",".join(f"key-{t}:{t}" for t in TENANTS)
PRICED = {"input_per_mtok": 1000, "output_per_mtok": 1000}  # "qa xxxxxxxx": 2 + 3 tokens, $0.005
BREAKER = {"failures": 2, "open_s": 60}
PROVIDERS = ("fake", "fragile", "brittle", "shaky", "short", "down")
OUTCOMES = {"ok", "cache_hit", "error", "cancelled", "refused"}

# docs/cloud.md, "## Metrics": name -> (type, labels)
DOCUMENTED: dict[str, tuple[str, set[str]]] = {
    "leafwire_cloud_requests_total": ("counter", {"provider", "model", "outcome"}),
    "leafwire_cloud_time_to_first_byte_seconds": ("histogram", {"provider", "model"}),
    "leafwire_cloud_request_duration_seconds": ("histogram", {"provider", "model"}),
    "leafwire_cloud_retries_total": ("counter", {"provider", "reason"}),
    "leafwire_cloud_attempt_failures_total": ("counter", {"provider", "code"}),
    "leafwire_cloud_tokens_total": ("counter", {"provider", "model", "kind"}),
    "leafwire_cloud_cost_usd_total": ("counter", {"provider", "model"}),
    "leafwire_cloud_inflight_requests": ("gauge", {"provider"}),
    "leafwire_cloud_breaker_state": ("gauge", {"provider"}),
    "leafwire_cloud_breaker_transitions_total": ("counter", {"provider", "state"}),
    "leafwire_cloud_cache_lookups_total": ("counter", {"result"}),
    "leafwire_budget_used_ratio": ("gauge", {"scope", "period"}),
    "leafwire_budget_spent_usd": ("gauge", {"scope", "period"}),
    "leafwire_budget_warnings_total": ("counter", {"scope_kind", "period", "level"}),
    "leafwire_usage_events_dropped_total": ("counter", set()),
    "leafwire_cloud_providers_reloads_total": ("counter", {"outcome"}),
    "leafwire_usage_hub_lag_events": ("gauge", set()),
}


def write_providers(short: FakeProvider, down_port: int) -> Any:
    def write(path: Path, openai_fake: FakeProvider, claude_fake: FakeProvider) -> Path:
        def entry(name: str, url: str, key_env: str, **more: Any) -> dict[str, Any]:
            return {"name": name, "kind": "openai-compatible", "base_url": url, "local": True,
                    "api_key_env": key_env, "models": {"echo": PRICED},
                    "timeouts": {"connect_s": 2, "first_byte_s": 2, "total_s": 10}, **more}
        config = {
            "providers": [entry("fake", openai_fake.url, "LW_TEST_FAKE_KEY"),
                          entry("fragile", openai_fake.url, "LW_TEST_FAKE_KEY", breaker=BREAKER),
                          entry("brittle", openai_fake.url, "LW_TEST_FAKE_KEY", breaker=BREAKER),
                          entry("shaky", openai_fake.url, "LW_TEST_FAKE_KEY", breaker=BREAKER),
                          entry("short", short.url, "LW_QA12_SHORT_KEY"),
                          entry("down", f"http://127.0.0.1:{down_port}/v1", "LW_TEST_FAKE_KEY")],
            "budgets": {"tenants": {t: {"daily_usd": 0.006} for t in LIMITED}},
        }
        path.write_text(json.dumps(config))
        return path
    return write


@pytest.fixture(scope="module")
def qo(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudStack]:
    short = FakeProvider("openai", key=SHORT_KEY).start()
    try:
        with test_cloud.cloud_stack(nats_server, tmp_path_factory.mktemp("qa12"), write_providers(short, free_port()),
                                    API_KEYS, LW_QA12_SHORT_KEY=SHORT_KEY, LW_CLOUD_BUDGET_FLUSH_S="0.2") as stack:
            stack.short = short  # type: ignore[attr-defined]
            yield stack
    finally:
        short.stop()


@pytest.fixture(autouse=True)
def _fresh_fakes(qo: CloudStack) -> None:
    qo.openai_fake.reset()
    qo.short.reset()  # type: ignore[attr-defined]


def post(qo: CloudStack, tenant: str, model: str = "fake/echo", **more: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": tag()}], **more}
    return httpx.post(f"{qo.gateway.base}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer key-{tenant}"})


def stream(qo: CloudStack, tenant: str, model: str = "fake/echo") -> tuple[int, str, list[str]]:
    """A streamed request: its status, request id and ``data:`` lines."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": tag()}]}
    with httpx.stream("POST", f"{qo.gateway.base}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer key-{tenant}"}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        return r.status_code, r.headers.get("x-request-id", ""), lines


def events_of(qo: CloudStack, tenant: str) -> list[dict[str, Any]]:
    return [e for s, e in asyncio.run(usage_events(qo.nats.url)) if s.endswith(".usage.events")
            and e.get("tenant") == tenant]


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    found = []
    for line in text.splitlines():
        if line.startswith("#") or not (m := SAMPLE.match(line)):
            continue
        found.append((m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return found


def series_of(text: str, name: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of documented metric ``name`` (for a histogram its buckets, count and sum; never _created)."""
    kind = DOCUMENTED[name][0]
    names = {f"{name}_bucket", f"{name}_count", f"{name}_sum"} if kind == "histogram" else {name}
    return [s for s in samples(text) if s[0] in names]


def total(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    return sum(v for n, lab, v in samples(text) if n == name and all(lab.get(k) == x for k, x in labels.items()))


# -- metrics


def test_the_docs_table_lists_the_metrics_this_file_checks() -> None:
    """The metrics table of docs/cloud.md says exactly the names, types and label names checked below."""
    text = (ROOT / "docs" / "cloud.md").read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| `leafwire_")]
    listed: dict[str, str] = {}
    for row in rows:
        names_cell, kind = row.split("|")[1:3]
        for name in re.findall(r"`(leafwire_[a-z_]+)`", names_cell):
            listed[name] = kind.strip()
    assert listed == {name: kind for name, (kind, _) in DOCUMENTED.items()}


def test_every_documented_metric_has_exactly_its_documented_labels(qo: CloudStack) -> None:
    """After an answer, a cache hit, a retry, a tenant warned, spent and refused, a breaker opened and a providers
    file read again (SIGHUP): every metric of the docs' table is on /metrics, of its type, each series with exactly
    the documented labels, and label values bounded: documented values, configured providers and models, and
    budget scopes only of tenants the file names (never an unnamed tenant, a request id or request text)."""
    adapter = qo.adapter
    applied = metric(adapter.metrics(), "leafwire_cloud_providers_reloads_total", outcome="applied")
    assert post(qo, "acme12").status_code == 200
    cached = {"temperature": 0, "messages": [{"role": "user", "content": tag()}]}
    for _ in range(2):
        assert post(qo, "acme12", **cached).status_code == 200
    qo.openai_fake.script(Fault.error(500))
    assert post(qo, "acme12").status_code == 200
    assert [post(qo, "lab12").status_code for _ in range(3)] == [200, 200, 429]
    qo.openai_fake.script(Fault.error(503), Fault.error(503))
    assert post(qo, "acme12", "brittle/echo").status_code == 502
    assert adapter.proc is not None
    adapter.proc.send_signal(signal.SIGHUP)
    eventually(lambda: metric(adapter.metrics(), "leafwire_cloud_providers_reloads_total", outcome="applied")
               > applied, 10, "the providers file read again")
    eventually(lambda: metric(adapter.metrics(), "leafwire_budget_spent_usd", scope="tenant-lab12",
                              period="daily") > 0, 5, "the budget gauges")
    text = adapter.metrics()
    for name, (kind, labels) in DOCUMENTED.items():
        base = name.removesuffix("_total")
        assert f"# TYPE {name} {kind}" in text or f"# TYPE {base} {kind}" in text, name
        found = series_of(text, name)
        assert found, f"{name} is not on /metrics"
        for sample, lab, _ in found:
            want = labels | {"le"} if sample.endswith("_bucket") else labels
            assert set(lab) == want, f"{sample} has labels {sorted(lab)}, documented {sorted(want)}"
    values: dict[str, set[str]] = {}
    for name in DOCUMENTED:
        for _, lab, _ in series_of(text, name):
            for k, v in lab.items():
                values.setdefault(k, set()).add(v)
    assert values["outcome"] - {"applied", "refused"} <= OUTCOMES
    assert values["kind"] == {"prompt", "completion"}
    assert values["result"] == {"hit", "miss"}
    assert values["level"] <= {"warning", "exhausted"}
    assert values["period"] <= {"daily", "monthly"}
    assert values["provider"] <= set(PROVIDERS)
    assert values["model"] == {"echo"}
    assert values["scope"] <= {"global", *(f"tenant-{t}" for t in LIMITED)}
    assert {v for _, _, v in series_of(text, "leafwire_cloud_breaker_state")} <= {0, 1, 2}
    everything = " ".join(v for vs in values.values() for v in vs)
    assert "qa " not in everything
    assert "acme12" not in everything


def test_a_stream_a_retry_and_refusals_move_each_series_as_documented(qo: CloudStack) -> None:
    """A stream; a stream whose first try fails (500) and second answers; a provider's 400; a budget refusal;
    a breaker-open refusal. Each request is counted once under one outcome; time to first byte is observed once
    per answer that had a first byte (not per try) and duration once per request the adapter took on; a
    refusal for a budget (the router's or the adapter's) observes neither, costs no tokens and publishes no
    usage event; a retry is one retry and one failed try; the breaker opening is one transition and its gauge
    says open; a refusal while it is open makes no try; the in-flight gauge is back to 0."""
    adapter = qo.adapter
    fake = {"provider": "fake", "model": "echo"}

    def values() -> dict[str, float]:
        text = adapter.metrics()
        return {
            **{o: total(text, "leafwire_cloud_requests_total", **fake, outcome=o) for o in OUTCOMES},
            "fragile": total(text, "leafwire_cloud_requests_total", provider="fragile"),
            "ttfb": total(text, "leafwire_cloud_time_to_first_byte_seconds_count", **fake),
            "duration": total(text, "leafwire_cloud_request_duration_seconds_count", **fake),
            "fragile_ttfb": total(text, "leafwire_cloud_time_to_first_byte_seconds_count", provider="fragile"),
            "retries": total(text, "leafwire_cloud_retries_total", provider="fake"),
            "failures": total(text, "leafwire_cloud_attempt_failures_total", provider="fake"),
            "fragile_retries": total(text, "leafwire_cloud_retries_total", provider="fragile"),
            "fragile_failures": total(text, "leafwire_cloud_attempt_failures_total", provider="fragile"),
            "opened": total(text, "leafwire_cloud_breaker_transitions_total", provider="fragile", state="open"),
            "prompt": total(text, "leafwire_cloud_tokens_total", **fake, kind="prompt"),
            "completion": total(text, "leafwire_cloud_tokens_total", **fake, kind="completion"),
            "rejected": total(text, "leafwire_rejected_requests_total", reason="budget_exceeded"),
            "rejected_open": total(text, "leafwire_rejected_requests_total", reason="provider_unavailable"),
        }

    # lim12 spends its day first ($0.010 of $0.006), so that its next request is refused
    assert [post(qo, "lim12").status_code for _ in range(2)] == [200, 200]
    was = values()
    status, _, lines = stream(qo, "acme12")
    assert status == 200
    assert lines[-1] == "data: [DONE]"
    qo.openai_fake.script(Fault.error(500))
    status, _, lines = stream(qo, "acme12")
    assert status == 200
    assert lines[-1] == "data: [DONE]"
    qo.openai_fake.script(Fault.error(400))
    assert post(qo, "acme12").status_code == 400
    refused = post(qo, "lim12")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "budget_exceeded"
    qo.openai_fake.script(Fault.error(503), Fault.error(503))
    assert post(qo, "acme12", "fragile/echo").status_code == 502
    open_refusal = post(qo, "acme12", "fragile/echo")
    assert open_refusal.status_code == 503, open_refusal.text
    assert open_refusal.json()["error"]["code"] == "provider_unavailable"
    now = values()
    moved = {k: round(now[k] - was[k], 9) for k in now}
    # the refusals may be the router's (it reads the budgets and provider-health buckets) or the adapter's
    refused_here, open_here = moved.pop("refused"), moved.pop("fragile") - 1
    assert refused_here in (0, 1)
    assert moved.pop("rejected") == refused_here
    assert open_here in (0, 1)
    assert moved.pop("rejected_open") == open_here  # the adapter's breaker refusing counts, once
    moved.pop("fragile_retries")  # test_a_retry_the_breaker_stopped_is_not_counted_as_a_retry
    assert moved == {"ok": 2, "cache_hit": 0, "error": 1, "cancelled": 0, "ttfb": 2, "duration": 3,
                     "fragile_ttfb": 0, "retries": 1, "failures": 2, "fragile_failures": 2, "opened": 1,
                     "prompt": 4, "completion": 6}, moved
    text = adapter.metrics()
    assert metric(text, "leafwire_cloud_breaker_state", provider="fragile") == 2
    assert all(v == 0 for n, _, v in samples(text) if n == "leafwire_cloud_inflight_requests")
    # lim12's two, the stream, the retried stream's two tries, the 400, fragile's two; no refusal made a call
    assert len(qo.openai_fake.calls) == 2 + 1 + 2 + 1 + 2
    lim = events_of(qo, "lim12")
    assert len(lim) == 2, "a request refused for its budget publishes no usage event"


# -- keys


def test_a_provider_that_cannot_be_reached_leaks_no_key_anywhere(qo: CloudStack) -> None:
    """``down`` has nothing listening: each try fails to connect, is retried, logged and counted. The key sent
    to every provider (fake's) is in no log line at debug level, no answer, no NATS message, no usage event, and
    not on /metrics; ``leafwire providers validate`` of the same file, run with the key in its environment,
    says where the key is read and never prints it."""
    capture = Capture(qo.nats.url, ">")
    r = post(qo, "keys12", "down/echo")
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_error"
    s_status, _, s_lines = stream(qo, "keys12", "down/echo")
    assert s_status == 502
    ok = post(qo, "keys12")
    assert ok.status_code == 200
    seen = capture.raw(1).decode(errors="replace")
    assert "down/echo" in seen  # the capture saw the traffic
    eventually(lambda: len(events_of(qo, "keys12")) == 3, 5, "the three usage events")
    log = qo.adapter.log_path.read_text() if qo.adapter.log_path else ""
    assert '"level": "debug"' in log
    assert "provider call failed; retrying" in log
    assert '"provider": "down"' in log
    validated = leafwire("providers", "validate", qo.adapter.env["LW_PROVIDERS_FILE"])
    assert validated.returncode == 0, validated.stderr
    assert "environment variable LW_TEST_FAKE_KEY" in validated.stdout
    exposed = {"answer": r.text, "stream": "\n".join(s_lines), "nats": seen, "log": log,
               "metrics": qo.adapter.metrics(), "usage": json.dumps(events_of(qo, "keys12")),
               "validate": validated.stdout + validated.stderr}
    assert [where for where, text in exposed.items() if KEY in text] == []


def test_validate_run_with_the_keys_set_prints_none_of_them(qo: CloudStack, tmp_path: Path) -> None:
    """``leafwire providers validate`` where the keys can be read (the adapter's environment): each provider
    says ``(read)``; no key value, short or long, is printed."""
    env = {**os.environ, "LW_TEST_FAKE_KEY": KEY, "LW_QA12_SHORT_KEY": SHORT_KEY}
    done = subprocess.run([sys.executable, "-m", "shared.cli", "providers", "validate",
                           qo.adapter.env["LW_PROVIDERS_FILE"], "--production"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(read)") == len(PROVIDERS)
    assert KEY not in done.stdout + done.stderr
    assert SHORT_KEY not in done.stdout + done.stderr


def test_a_short_key_echoed_in_a_providers_error_never_reaches_the_caller(qo: CloudStack) -> None:
    """``short``'s key is 7 characters (a local server's ``--api-key``). Its provider answers a 400 whose
    message echoes the key: docs/cloud.md says each loaded key is replaced by ``[redacted]`` in any error's
    message before it leaves the process, and never logged."""
    short: FakeProvider = qo.short  # type: ignore[attr-defined]
    short.script(Fault.error(400, body={"error": {"message": f"model echo is not served for key {SHORT_KEY}",
                                                  "type": "invalid_request_error", "param": None, "code": None}}))
    r = post(qo, "keys12", "short/echo")
    assert r.status_code == 400, r.text
    assert "is not served for key" in r.json()["error"]["message"]
    log = qo.adapter.log_path.read_text() if qo.adapter.log_path else ""
    assert SHORT_KEY not in r.text
    assert SHORT_KEY not in log


# -- leafwire providers validate


def validate(tmp_path: Path, text: str, *args: str) -> Any:
    path = tmp_path / "providers.yaml"
    path.write_text(text)
    return leafwire("providers", "validate", str(path), *args)


OPENAI = "  - name: openai\n    kind: openai-compatible\n    base_url: https://api.openai.com/v1\n"


@pytest.mark.parametrize(("text", "names"), [
    (OPENAI + "    modles: {}\n    models: {gpt-4o-mini: {}}\n", "providers.0.modles: Extra inputs are not permitted"),
    (OPENAI + "    models:\n      gpt-4o-mini: {input_per_mtok: 0.15, ouput_per_mtok: 0.6}\n",
     "providers.0.models.gpt-4o-mini.ouput_per_mtok: Extra inputs"),
    (OPENAI + "    models: {gpt-4o-mini: {input_per_mtok: -0.15}}\n",
     "providers.0.models.gpt-4o-mini.input_per_mtok: Input should be greater than or equal to 0"),
    (OPENAI + "    models: {gpt-4o-mini: {}}\n" + OPENAI + "    models: {gpt-4o: {}}\n",
     "a provider name is used twice"),
    ("  - name: lan\n    kind: openai-compatible\n    base_url: https://10.0.0.20/v1\n    models: [small]\n",
     "mark the provider `local: true`"),
    ("  - name: lan\n    kind: openai-compatible\n    base_url: https://localhost:8443/v1\n    models: [small]\n",
     "mark the provider `local: true`"),
    (OPENAI + "    api_key: sk-inline-QA12-secret-000\n    models: {gpt-4o-mini: {}}\n",
     "providers.0.api_key: Extra inputs"),
    (OPENAI + "    models: {gpt-4o-mini: {}}\nbudget: {global: {daily_usd: 5}}\n", "budget: Extra inputs"),
    (OPENAI + "    models: {gpt-4o-mini: {}}\nbudgets: {tenants: {acme: {daily_usd: -1}}}\n",
     "budgets.tenants.acme.daily_usd: Input should be greater than or equal to 0"),
    (OPENAI + "    models: {gpt-4o-mini: {}\n", "line 5, column"),
], ids=["unknown-field", "unknown-model-field", "negative-price", "provider-twice", "private-ip", "localhost",
        "inline-key", "top-level-typo", "negative-budget", "yaml-syntax"])
def test_validate_refuses_a_broken_file_naming_the_field(tmp_path: Path, text: str, names: str) -> None:
    """Each mistake: exit 1, one message on stderr naming the field (or line) and what is wrong, nothing on
    stdout, and never the value of a key written into the file."""
    done = validate(tmp_path, "providers:\n" + text)
    assert done.returncode == 1, done.stdout
    assert done.stdout == ""
    assert names in done.stderr, done.stderr
    assert "sk-inline" not in done.stderr


def test_validate_a_key_file_that_cannot_be_read(tmp_path: Path) -> None:
    """A key file that is not there: development says the provider answers 503 until it is (exit 0);
    ``--production`` fails naming the file (exit 1)."""
    text = ("providers:\n" + OPENAI + f"    api_key_file: {tmp_path}/nowhere/openai.key\n"
            "    models: {gpt-4o-mini: {}}\n")
    dev = validate(tmp_path, text)
    assert dev.returncode == 0
    assert f"file {tmp_path}/nowhere/openai.key (NOT readable here)" in dev.stdout
    prod = validate(tmp_path, text, "--production")
    assert prod.returncode == 1
    assert f"{tmp_path}/nowhere/openai.key" in prod.stderr


def test_validate_a_valid_file(tmp_path: Path) -> None:
    """The same model name under two providers is two models (``openai/gpt-4o``, ``azure/gpt-4o``): valid."""
    text = ("providers:\n" + OPENAI + "    models: {gpt-4o: {}}\n"
            "  - name: azure\n    kind: openai-compatible\n    base_url: https://x.openai.azure.com\n"
            "    path: /openai/deployments/{model}/chat/completions?api-version=2024-10-21\n    models: {gpt-4o: {}}\n")
    done = validate(tmp_path, text)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("valid: 2 provider(s), 2 model(s)")


@pytest.mark.parametrize("text", [
    OPENAI + "    models:\n      gpt-4o-mini: {input_per_mtok: 0.15, output_per_mtok: 0.6}\n"
             "      gpt-4o: {input_per_mtok: 2.5}\n      gpt-4o-mini: {}\n",
    OPENAI + "    models: {gpt-4o-mini: {}}\nbudgets:\n  tenants:\n    acme: {daily_usd: 20}\n"
             "    acme: {daily_usd: 2000}\n",
], ids=["model-twice", "tenant-twice"])
def test_validate_refuses_a_key_given_twice(tmp_path: Path, text: str) -> None:
    """An operator pastes a model (or a tenant's budget) a second time further down: one of the two entries is
    silently dropped (here gpt-4o-mini's price becomes $0, acme's limit $2000). Like a provider named twice, it
    must be refused, naming the key and its line."""
    done = validate(tmp_path, "providers:\n" + text)
    assert done.returncode == 1, done.stdout
    assert "twice" in done.stderr or "duplicate" in done.stderr, done.stderr


# -- leafwire usage and leafwire budgets


def test_the_usage_report_adds_up_the_usage_events_under_every_option(qo: CloudStack) -> None:
    """Tenant rep12: an answer, a stream, a cached request asked twice (a miss, a hit), a provider's 400. For each
    ``--by`` field, the groups add up to the total, and the total is what the tenant's usage events say; the
    table's total line says the same as --json; --site filters; --since/--until bound by time; a bad --by is
    exit 2 with one line."""
    assert post(qo, "rep12").status_code == 200
    assert stream(qo, "rep12")[0] == 200
    cached = {"temperature": 0, "messages": [{"role": "user", "content": tag()}]}
    assert [post(qo, "rep12", **cached).headers.get("x-leafwire-cache") for _ in range(2)] == ["miss", "hit"]
    qo.openai_fake.script(Fault.error(400))
    assert post(qo, "rep12").status_code == 400
    events = eventually(lambda: (e := events_of(qo, "rep12")) and len(e) == 5 and e, 5, "rep12's five events")
    expected = {"requests": 5, "errors": sum(e["outcome"] == "error" for e in events),
                "cached_requests": sum(e["cached"] for e in events),
                "prompt_tokens": sum(e["prompt_tokens"] for e in events),
                "completion_tokens": sum(e["completion_tokens"] for e in events)}
    assert expected["errors"] == 1
    assert expected["cached_requests"] == 1
    cost = sum(e["cost_usd"] for e in events)

    def report(*args: str) -> dict[str, Any]:
        done = leafwire("usage", "--nats", qo.nats.url, "--tenant", "rep12", "--since", "all", "--json", *args)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    for by in ("site", "tenant", "target", "outcome", "variant", "cached", "day"):
        got = report("--by", by)
        assert {k: got["total"][k] for k in expected} == expected, by
        assert got["total"]["cost_usd"] == pytest.approx(cost), by
        assert sum(g["requests"] for g in got["groups"]) == 5, by
        assert sum(g["cost_usd"] for g in got["groups"]) == pytest.approx(cost), by
    by_outcome = {g["outcome"]: g["requests"] for g in report("--by", "outcome")["groups"]}
    assert by_outcome == {"ok": 4, "error": 1}
    assert report("--site", "hub")["total"]["requests"] == 5
    assert report("--site", "elsewhere")["total"]["requests"] == 0
    assert report("--since", "2099-01-01")["total"]["requests"] == 0
    assert report("--until", "2000-01-01")["total"]["requests"] == 0
    table = leafwire("usage", "--nats", qo.nats.url, "--tenant", "rep12", "--since", "all", "--by", "tenant")
    assert table.returncode == 0, table.stderr
    last = table.stdout.strip().splitlines()[-1].split()
    assert last == ["total", "5", "1", "1", str(expected["prompt_tokens"]), str(expected["completion_tokens"]),
                    f"{cost:.4f}"]
    bad = leafwire("usage", "--nats", qo.nats.url, "--by", "model")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "model" in bad.stderr
    helped = leafwire("usage", "--help")
    assert helped.returncode == 0
    for option in ("--nats", "--creds", "--domain", "--since", "--until", "--by", "--site", "--tenant", "--json",
                   "--wait"):
        assert option in helped.stdout


def test_the_budgets_command_shows_what_the_bucket_holds(qo: CloudStack) -> None:
    """Tenant poor12 spends $0.010 of its $0.006 a day: ``leafwire budgets --tenant poor12`` shows the spending
    the ``budgets`` bucket holds for it and for the global scope, its limit, the state ``exhausted`` and the
    site that spent it; the table says the same."""
    assert [post(qo, "poor12").status_code for _ in range(3)] == [200, 200, 429]
    entry = eventually(lambda: (e := kv_json(qo.nats.url, "budgets", "tenant-poor12.daily.hub"))
                       and e.get("state") == "exhausted" and e, 10, "poor12's spending written")

    def shown_with_global() -> dict[tuple[str, str], Any] | None:
        """What the command shows, once its global spending is what the bucket holds (the global scope is
        written on its own flush, maybe a moment after the tenant's)."""
        overall = kv_json(qo.nats.url, "budgets", "global.daily.hub")
        done = leafwire("budgets", "--nats", qo.nats.url, "--tenant", "poor12", "--json")
        assert done.returncode == 0, done.stderr
        rows = {(row["scope"], row["period"]): row for row in json.loads(done.stdout)}
        return rows if rows[("global", "daily")]["spent_usd"] == pytest.approx(overall["spent_usd"]) else None

    shown = eventually(shown_with_global, 10, "the command's global spending as the bucket holds it")
    daily = shown[("tenant-poor12", "daily")]
    assert daily["spent_usd"] == pytest.approx(entry["spent_usd"]) == pytest.approx(0.010)
    assert daily["limit_usd"] == pytest.approx(0.006)
    assert daily["state"] == "exhausted"
    assert daily["sites"] == {"hub": pytest.approx(entry["spent_usd"])}
    assert {scope for scope, _ in shown} == {"global", "tenant-poor12"}
    table = leafwire("budgets", "--nats", qo.nats.url, "--tenant", "poor12")
    row = next(line for line in table.stdout.splitlines() if line.startswith("tenant-poor12") and "daily" in line)
    assert row.split()[3:7] == ["0.0100", "0.006", "167%", "exhausted"]


def test_the_usage_report_by_cached_names_each_group_in_json(qo: CloudStack) -> None:
    """``leafwire usage --by cached --json``: as with every other --by field, each group carries its value of the
    field (``cached`` or ``-``, as the table shows), beside its counts."""
    cached = {"temperature": 0, "messages": [{"role": "user", "content": tag()}]}
    assert [post(qo, "acme12", **cached).headers.get("x-leafwire-cache") for _ in range(2)] == ["miss", "hit"]
    table = leafwire("usage", "--nats", qo.nats.url, "--tenant", "acme12", "--since", "all", "--by", "cached")
    assert table.returncode == 0, table.stderr
    assert {line.split()[0] for line in table.stdout.splitlines()[2:-1]} == {"cached", "-"}
    done = leafwire("usage", "--nats", qo.nats.url, "--tenant", "acme12", "--since", "all", "--by", "cached",
                    "--json")
    assert done.returncode == 0, done.stderr
    assert {g["cached"] for g in json.loads(done.stdout)["groups"]} == {"cached", "-"}


def test_a_retry_the_breaker_stopped_is_not_counted_as_a_retry(qo: CloudStack) -> None:
    """``shaky`` opens its breaker after 2 failed tries; LW_CLOUD_MAX_ATTEMPTS is 3. Two 503s: the provider got
    two calls, so one retry happened (the second call); the third try is refused by the open breaker. An
    operator comparing ``leafwire_cloud_retries_total`` with ``..._attempt_failures_total`` must read one retry
    for two failed tries, as for any request retried once."""
    before = qo.adapter.metrics()
    qo.openai_fake.script(Fault.error(503), Fault.error(503))
    assert post(qo, "acme12", "shaky/echo").status_code == 502
    assert len(qo.openai_fake.calls) == 2
    after = qo.adapter.metrics()
    failures = [total(t, "leafwire_cloud_attempt_failures_total", provider="shaky") for t in (before, after)]
    retries = [total(t, "leafwire_cloud_retries_total", provider="shaky") for t in (before, after)]
    assert failures[1] - failures[0] == 2
    assert retries[1] - retries[0] == 1
