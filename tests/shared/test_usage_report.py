"""The usage report (``leafwire usage``) against a real USAGE stream: totals per group, counted by when each
request was answered, and a clear refusal for what it cannot do."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from schemas.cloud import UsageEvent
from shared import subjects
from shared.usage import usage_stream
from shared.usage_report import Report, Totals, report
from tests.support import NatsServer, connected, leafwire, start_single

DAY = 86400.0
NOW = time.time()
EVENTS = [
    # site, tenant, target, prompt, completion, cost, outcome, cached, answered (seconds ago)
    ("plant1", "acme", "openai/gpt-4o-mini", 100, 20, 0.002, "ok", False, 60),
    ("plant1", "acme", "openai/gpt-4o-mini", 100, 0, 0.0, "ok", True, 120),
    ("plant1", "acme", "local/tiny", 50, 10, 0.0, "ok", False, 180),
    ("plant1", "globex", "openai/gpt-4o-mini", 10, 0, 0.0001, "error", False, 240),
    ("plant2", "acme", "anthropic/claude-haiku", 300, 100, 0.01, "ok", False, 300),
    ("plant2", "acme", "anthropic/claude-haiku", 300, 100, 0.01, "ok", False, 3 * DAY),  # stored now, answered earlier
]


@pytest.fixture(scope="module")
def url(nats_server: NatsServer) -> str:
    """The module's server with a USAGE stream holding ``EVENTS`` and one message that is no event."""

    async def fill() -> None:
        async with connected(nats_server.url) as nc:
            js = nc.jetstream()
            config = usage_stream("plant1")
            config.subjects = [subjects.usage_filter("plant1"), subjects.usage_filter("plant2")]
            await js.add_stream(config)
            for n, (site, tenant, target, prompt, completion, cost, outcome, cached, ago) in enumerate(EVENTS):
                event = UsageEvent(request_id=f"r{n}", tenant=tenant, site=site, target=target,
                                   prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost,
                                   outcome=outcome, cached=cached, at=NOW - ago)
                await js.publish(subjects.usage(site), event.model_dump_json().encode())
            await js.publish(subjects.usage("plant1"), b"not an event")

    asyncio.run(fill())
    return nats_server.url


async def run(url: str, **kwargs: object) -> Report:
    async with connected(url) as nc:
        return await report(nc, **kwargs)  # type: ignore[arg-type]


async def test_totals_by_site_over_the_last_day(url: str) -> None:
    """The event answered three days ago (though stored now) is left out; the unreadable one is counted."""
    result = await run(url, by=("site",), since=NOW - DAY)
    assert result.groups == {
        ("plant1",): Totals(requests=4, errors=1, cached_requests=1, prompt_tokens=260, completion_tokens=30,
                            cost_usd=pytest.approx(0.0021)),
        ("plant2",): Totals(requests=1, prompt_tokens=300, completion_tokens=100, cost_usd=pytest.approx(0.01)),
    }
    assert result.unreadable == 1


async def test_everything_by_tenant_and_target_for_one_site(url: str) -> None:
    result = await run(url, by=("tenant", "target"), site="plant2")
    assert result.groups == {("acme", "anthropic/claude-haiku"): Totals(
        requests=2, prompt_tokens=600, completion_tokens=200, cost_usd=pytest.approx(0.02))}
    assert result.unreadable == 0  # the unreadable message is plant1's


async def test_one_tenant_before_a_time_by_day(url: str) -> None:
    result = await run(url, by=("day",), tenant="acme", until=NOW - DAY)
    day = time.strftime("%Y-%m-%d", time.gmtime(NOW - 3 * DAY))
    assert list(result.groups) == [(day,)]
    assert result.groups[(day,)].requests == 1


def test_the_command_prints_a_table_most_expensive_first(url: str) -> None:
    done = leafwire("usage", "--nats", url, "--by", "site,tenant")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["site", "tenant", "requests", "errors", "cache", "hits", "prompt", "tokens",
                                "completion", "tokens", "cost", "USD"]
    assert lines[2].split() == ["plant2", "acme", "1", "0", "0", "300", "100", "0.0100"]
    assert lines[3].split() == ["plant1", "acme", "3", "0", "1", "250", "30", "0.0020"]
    assert lines[4].split() == ["plant1", "globex", "1", "1", "0", "10", "0", "0.0001"]
    assert lines[5].split() == ["total", "5", "1", "1", "560", "130", "0.0121"]
    assert lines[6] == "(1 messages were not usage events and are left out)"


def test_the_command_as_json(url: str) -> None:
    done = leafwire("usage", "--nats", url, "--since", "all", "--by", "target", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["total"]["requests"] == 6
    assert {g["target"]: g["requests"] for g in out["groups"]} == {
        "openai/gpt-4o-mini": 3, "local/tiny": 1, "anthropic/claude-haiku": 2}


@pytest.mark.parametrize(("args", "said"), [
    (["--by", "colour"], "cannot group by colour: choose from site, tenant, target"),
    (["--since", "yesterday"], "'yesterday' is not a time"),
    (["--site", "Plant 1"], "must match [a-z0-9_-]"),
    (["--domain", "nowhere", "--wait", "1"], "JetStream in domain 'nowhere' does not answer"),
    (["--domain", "bad domain"], "argument --domain: site id 'bad domain' must match [a-z0-9_-]"),
    (["--since", "7d", "--until", "8d"], "--since (7d) must come before --until (8d)"),
    (["--wait", "-1"], "'-1': the wait must be more than 0 seconds"),
    (["--wait", "soon"], "'soon' is not a number of seconds"),
])
def test_what_the_command_refuses(url: str, args: list[str], said: str) -> None:
    done = leafwire("usage", "--nats", url, *args)
    assert done.returncode == 2
    assert said in done.stderr
    assert done.stdout == ""


def test_a_span_back_past_1970_reads_everything(url: str) -> None:
    """``--since 99999999d`` is every event there is, not a date error."""
    done = leafwire("usage", "--nats", url, "--since", "99999999d", "--by", "target", "--json")
    assert done.returncode == 0, done.stderr
    assert sum(g["requests"] for g in json.loads(done.stdout)["groups"]) == 6


def test_a_field_named_twice_is_one_column(url: str) -> None:
    done = leafwire("usage", "--nats", url, "--since", "all", "--by", "target,target", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["by"] == ["target"]


def test_no_stream_yet(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_single(tmp_path_factory.mktemp("empty"))
    try:
        done = leafwire("usage", "--nats", server.url)
    finally:
        server.stop()
    assert done.returncode == 2
    assert "no USAGE stream in this server's domain" in done.stderr


def test_unknown_command() -> None:
    done = leafwire("spend")
    assert done.returncode == 2
    assert "unknown command 'spend'" in done.stderr
    assert "usage" in done.stderr
    assert leafwire("--help").returncode == 0
