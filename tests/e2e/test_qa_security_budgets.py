"""QA of the cloud adapter's security and budget/cost behaviour, end to end.

The stack is test_cloud.py's (its fakes and providers), started for this module with tenants of its own and
budgets of its own: httpx or the ``leafwire`` command -> gateway -> router -> the hub's cloud-adapter -> the
fake providers of tests/fakes.py. QA found five bugs, fixed since (a key written into the providers file was
printed by ``leafwire providers validate`` and logged by a refused reload; IPv4 literals in numeric forms such as
https://2130706433 passed the start-up check; a budget raised by a reload kept refusing the tenant; a tool
call's arguments were not counted when a provider reported no usage); the others check behaviour no other test
covers.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e import test_cloud
from tests.e2e.test_cloud import KEY, CloudStack, usage_event
from tests.fakes import FakeProvider, Fault
from tests.support import NatsServer, eventually, leafwire, metric, tag

pytestmark = pytest.mark.e2e
API_KEYS = "key-acme:acme,key-lifted:lifted,key-warned:warned"
SECRET = "sk-live-qa3-0123456789abcdef"  # an operator's key, written where the file has no place for it
BUDGETS: dict[str, Any] = {"tenants": {"lifted": {"daily_usd": 0.004}, "warned": {"daily_usd": 0.006}}}


def write_providers(path: Path, openai_fake: FakeProvider, claude_fake: FakeProvider,
                    budgets: dict[str, Any] | None = None, **extra: Any) -> Path:
    """test_cloud.py's providers file with this module's budgets (``extra``: more fields of the file's first
    provider)."""
    test_cloud.providers_file(path, openai_fake, claude_fake)
    config = json.loads(path.read_text())
    config["budgets"] = budgets or BUDGETS
    config["providers"][0].update(extra)
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def qa(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudStack]:
    # test_cloud's stack with this module's tenants and budgets, budgets written often, the file checked often
    with test_cloud.cloud_stack(nats_server, tmp_path_factory.mktemp("qa3"), write_providers, API_KEYS,
                                LW_CLOUD_BUDGET_FLUSH_S="0.2", LW_CLOUD_PROVIDERS_CHECK_S="0.3") as stack:
        yield stack


@pytest.fixture(autouse=True)
def _fresh_fakes(qa: CloudStack) -> None:
    qa.openai_fake.reset()
    qa.claude_fake.reset()


def post(qa: CloudStack, body: dict[str, Any], key: str = "key-acme", **headers: str) -> httpx.Response:
    return httpx.post(f"{qa.gateway.base}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}", **headers})



def providers_path(qa: CloudStack) -> Path:
    return Path(qa.adapter.env["LW_PROVIDERS_FILE"])


def reloads(qa: CloudStack, outcome: str) -> float:
    return metric(qa.adapter.metrics(), "leafwire_cloud_providers_reloads_total", outcome=outcome)


def reload(qa: CloudStack, outcome: str, **changes: Any) -> None:
    """Write the providers file with ``changes`` (``budgets``, or fields of its first provider) and wait for the
    adapter to have read it (``applied`` or ``refused``)."""
    before = reloads(qa, outcome)
    budgets = changes.pop("budgets", None)
    write_providers(providers_path(qa), qa.openai_fake, qa.claude_fake, budgets, **changes)
    assert qa.adapter.proc is not None
    qa.adapter.proc.send_signal(signal.SIGHUP)
    eventually(lambda: reloads(qa, outcome) > before, 10, f"the providers file {outcome}")


class TestSecurity:
    def test_a_redirect_to_the_metadata_address_is_not_followed(self, qa: CloudStack) -> None:
        """A provider answering 307 to a link-local address (cloud metadata): the adapter does not follow it nor
        retry, and the caller gets 502 upstream_bad_response."""
        qa.openai_fake.script(Fault.error(307, {"error": {"message": "moved"}},
                                          Location="http://169.254.169.254/latest/meta-data/iam/"))
        r = post(qa, {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}]})
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "upstream_bad_response"
        assert "redirect" in r.json()["error"]["message"]
        assert len(qa.openai_fake.calls) == 1

    def test_callers_headers_never_reach_the_provider(self, qa: CloudStack) -> None:
        """What a caller sends in headers (its own key, cookies, forwarding headers) stays at leafwire: the
        provider gets the provider's key and nothing of the caller's."""
        r = post(qa, {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}]},
                 Cookie="session=caller-cookie", **{"X-Forwarded-For": "10.1.2.3", "X-Api-Key": "caller-x-api-key",
                                                     "OpenAI-Organization": "org-caller"})
        assert r.status_code == 200, r.text
        (call,) = qa.openai_fake.calls
        sent = {k.lower(): v for k, v in call.headers.items()}
        assert sent["authorization"] == f"Bearer {KEY}"
        for name in ("cookie", "x-forwarded-for", "x-api-key", "openai-organization"):
            assert name not in sent
        assert "key-acme" not in json.dumps(call.headers)

    def test_validate_never_prints_a_key_written_in_the_file(self, tmp_path: Path) -> None:
        """An operator coming from LiteLLM writes the key inline (`api_key: sk-...`): the file is refused, and
        the reason must not print the key (it ends up in terminals, CI logs and tickets)."""
        file = tmp_path / "providers.yaml"
        file.write_text(json.dumps({"providers": [{"name": "corp", "kind": "openai-compatible",
                                                   "base_url": "https://api.openai.com/v1", "api_key": SECRET,
                                                   "models": ["gpt-4o-mini"]}]}))
        out = leafwire("providers", "validate", str(file))
        assert out.returncode == 1
        assert "api_key" in out.stdout + out.stderr  # says what is wrong
        assert SECRET not in out.stdout + out.stderr
        assert SECRET[-16:] not in out.stdout + out.stderr

    def test_a_refused_reload_never_logs_a_key_written_in_the_file(self, qa: CloudStack) -> None:
        """The same mistake made in the running adapter's file: the reload is refused, the running providers
        stay, and the adapter's log must not hold the key."""
        try:
            reload(qa, "refused", api_key=SECRET)
            assert post(qa, {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}]}).status_code == 200
            log = qa.adapter.log_path.read_text()  # type: ignore[union-attr]
            assert "providers file not applied" in log
            assert SECRET[-16:] not in log
        finally:
            reload(qa, "applied")


    @pytest.mark.parametrize("base_url", ["https://2130706433/v1", "https://127.1/v1", "https://2852039166/v1"])
    def test_a_numeric_loopback_or_metadata_address_is_refused_at_start(self, tmp_path: Path, base_url: str) -> None:
        """2130706433 and 127.1 are 127.0.0.1, 2852039166 is 169.254.169.254 (cloud metadata), as the system's
        resolver reads them. "IP literals and localhost are refused at start": these are accepted, and only
        aiohttp 3.13+ (pyproject allows >=3.10) keeps the calls off loopback, where the resolver that refuses
        private addresses is never asked (aiohttp takes an all-digit host for an IP address)."""
        file = tmp_path / "providers.yaml"
        file.write_text(json.dumps({"providers": [{"name": "corp", "kind": "openai-compatible",
                                                   "base_url": base_url, "models": ["gpt-4o-mini"]}]}))
        out = leafwire("providers", "validate", str(file))
        assert out.returncode == 1, out.stdout
        assert "private, loopback or link-local" in out.stderr


class TestBudgets:
    def test_a_warning_is_counted_in_the_metric_and_published_once(self, qa: CloudStack) -> None:
        """Tenant `warned` ($0.006 a day) spends $0.005 (83%): the adapter counts one warning in
        leafwire_budget_warnings_total and publishes one `warning` BudgetStatus; the tenant is still answered."""
        alerts = test_cloud.subscribe(qa, "lw.v1.hub.usage.budget")
        assert post(qa, {"model": "priced/echo", "messages": test_cloud.MESSAGES}, key="key-warned").status_code == 200
        eventually(lambda: metric(qa.adapter.metrics(), "leafwire_budget_warnings_total", scope_kind="tenant",
                                  period="daily", level="warning") == 1, 10, "the warning counted")
        (alert,) = [a for a in alerts.wait(1) if a["scope"] == "tenant-warned"]
        assert (alert["state"], alert["period"], alert["limit_usd"]) == ("warning", "daily", 0.006)
        assert alert["spent_usd"] == pytest.approx(0.005)
        assert post(qa, {"model": "priced/echo", "messages": test_cloud.MESSAGES}, key="key-warned").status_code == 200

    def test_a_budget_raised_by_a_reload_lets_the_tenant_in_again(self, qa: CloudStack) -> None:
        """Tenant `lifted` ($0.004 a day) spends $0.005 and is refused; the operator raises its budget to $1 in
        the providers file (applied: "budgets take their new limits and keep what was spent"). Its next requests
        must be answered, and `leafwire budgets` must show the new limit."""
        body = {"model": "priced/echo", "messages": test_cloud.MESSAGES}
        assert post(qa, body, key="key-lifted").status_code == 200  # $0.005

        def refused_by_router() -> httpx.Response | None:  # the spending is in the bucket, as the router reads it
            r = post(qa, body, key="key-lifted")
            return r if "no local model can serve this" in r.text else None

        assert eventually(refused_by_router, 10, "the router to refuse").json()["error"]["code"] == "budget_exceeded"
        reload(qa, "applied", budgets={"tenants": {**BUDGETS["tenants"], "lifted": {"daily_usd": 1}}})
        time.sleep(1.5)  # several budget flushes and router updates later
        r = post(qa, body, key="key-lifted")
        shown = leafwire("budgets", "--tenant", "lifted", "--nats", qa.nats.url).stdout
        assert r.status_code == 200, r.text
        daily = next(line for line in shown.splitlines() if line.startswith("tenant-lifted  daily"))
        assert "exhausted" not in daily, shown


class TestCost:
    def test_a_tool_call_without_usage_is_charged_an_estimate(self, qa: CloudStack) -> None:
        """An OpenAI-compatible server that reports no usage answers a tool call of 400 characters of arguments:
        the caller's usage and the usage event count its completion (about 100 tokens at 4 characters a token),
        as they would count 400 characters of text."""
        arguments = json.dumps({"query": "x" * 380})
        qa.openai_fake.script(Fault.raw(200, {
            "id": "chatcmpl-raw", "object": "chat.completion", "created": int(time.time()), "model": "echo-1",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None,
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "search", "arguments": arguments}}]}}]}))
        tool = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
        r = post(qa, {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}], "tools": [tool]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == arguments
        event = eventually(lambda: usage_event(qa, r.headers["x-request-id"]), 10, "the usage event")
        assert r.json()["usage"]["completion_tokens"] >= len(arguments) // 4 - 5
        assert event["completion_tokens"] >= len(arguments) // 4 - 5
        assert event["cost_usd"] >= (len(arguments) // 4 - 5) * 2 / 1e6
