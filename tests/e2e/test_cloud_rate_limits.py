"""A provider's ``rpm`` and ``tpm``: the adapter keeps under its account's limits, refusing at once with a
429 ``provider_rate_limit`` and a Retry-After (the provider is not called), and a route with a fallback goes
on to its next target.

The stack is test_cloud.py's, with five more providers of its fake OpenAI-compatible server: ``minute`` (2
requests a minute; its model ``spare`` routed ``[requested, spare/echo]``), ``tokens`` (20 tokens a minute),
``spare``, ``shared`` (3 requests a minute, which a second adapter of the site shares) and ``permodel`` (its
model ``big`` 1 request a minute, ``small`` none).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_cloud import CloudStack, cloud_stack
from tests.e2e.test_cloud import providers_file as base_providers
from tests.fakes import FakeProvider
from tests.support import NatsServer, Service, running

pytestmark = pytest.mark.e2e
HEADERS = {"Authorization": "Bearer key-acme"}
SYNC_S = 0.1
POLICY = """
last_resort: none
rules:
  - {name: spare, when: {model: [minute/spare]}, route: [requested, spare/echo]}
  - {name: default, route: [requested]}
"""


def limited_providers(path: Path, openai_fake: FakeProvider, claude_fake: FakeProvider) -> Path:
    base_providers(path, openai_fake, claude_fake)
    config = json.loads(path.read_text())
    entry = {"kind": "openai-compatible", "base_url": openai_fake.url, "local": True,
             "api_key_env": "LW_TEST_FAKE_KEY", "models": {"echo": {}}}
    minute = {**entry, "name": "minute", "rpm": 2, "models": {"echo": {}, "spare": {"upstream": "echo"}}}
    config["providers"] += [minute, {**entry, "name": "tokens", "tpm": 20}, {**entry, "name": "spare"},
                            {**entry, "name": "shared", "rpm": 3},
                            {**entry, "name": "permodel", "models": {"big": {"upstream": "echo", "rpm": 1},
                                                                      "small": {"upstream": "echo"}}}]
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def cloud(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudStack]:
    with cloud_stack(nats_server, tmp_path_factory.mktemp("rate-limits"), write=limited_providers,
                     policy=POLICY, LW_CLOUD_RATE_SYNC_S=str(SYNC_S)) as stack:
        yield stack


def ask(cloud: CloudStack, model: str, **more: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": f"hello {uuid.uuid4().hex[:8]}"}], **more}
    return httpx.post(f"{cloud.gateway.base}/v1/chat/completions", json=body, headers=HEADERS, timeout=30)


def test_requests_past_rpm_are_refused_without_a_call(cloud: CloudStack) -> None:
    """rpm 2: two requests are answered, the third within the minute is a 429 ``provider_rate_limit`` whose
    Retry-After says when the first leaves the minute; the provider got two calls."""
    cloud.openai_fake.reset()
    assert [ask(cloud, "minute/echo").status_code for _ in range(2)] == [200, 200]
    r = ask(cloud, "minute/echo")
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "provider_rate_limit"
    assert "rpm" in r.json()["error"]["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert len(cloud.openai_fake.calls) == 2


def test_a_route_falls_back_past_a_provider_at_its_rpm(cloud: CloudStack) -> None:
    """minute/spare routes [minute/spare, spare/echo]: with minute at its rpm (the test above, or requests
    now), the request is answered by spare/echo."""
    while ask(cloud, "minute/echo").status_code == 200:  # up to its rpm, whatever the order of the tests
        pass
    r = ask(cloud, "minute/spare")
    assert r.status_code == 200, r.text
    route = r.headers["x-leafwire-route"]
    assert route.startswith("target=spare/echo;"), route
    assert "fell back from minute/spare (429 provider_rate_limit)" in route


def test_a_models_own_rpm(cloud: CloudStack) -> None:
    """``permodel/big`` has an rpm of 1 of its own, as OpenAI limits each model: its second request in the
    minute is a 429 naming the model, while ``small`` of the same provider is answered."""
    assert ask(cloud, "permodel/big").status_code == 200
    r = ask(cloud, "permodel/big")
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "provider_rate_limit"
    assert "model big of provider permodel" in r.json()["error"]["message"]
    assert [ask(cloud, "permodel/small").status_code for _ in range(3)] == [200, 200, 200]


def test_a_provider_past_its_tpm_is_refused(cloud: CloudStack) -> None:
    """tpm 20: the answers' tokens (as the provider reports them) count; once the minute's reach 20, calls
    are refused with a 429 ``provider_rate_limit`` naming tpm, until they leave the minute."""
    cloud.openai_fake.reset()
    used = 0
    while used < 20:
        r = ask(cloud, "tokens/echo")
        assert r.status_code == 200, r.text
        used += r.json()["usage"]["total_tokens"]
    r = ask(cloud, "tokens/echo")
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "provider_rate_limit"
    assert "tpm" in r.json()["error"]["message"]


def taken(adapter: Service, provider: str) -> float:
    """The requests ``adapter`` took for ``provider``, answered or refused (``leafwire_cloud_requests_total``)."""
    lines = adapter.metrics().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("leafwire_cloud_requests_total{") and f'provider="{provider}"' in line)


def test_the_sites_adapters_keep_rpm_together(cloud: CloudStack) -> None:
    """rpm 3 and two adapters of the site (a queue group: each request goes to either): the provider gets 3
    calls in the minute in all, not 3 from each. Every request after the third is a 429 naming rpm, once
    both adapters have taken requests, whichever takes it. (Requests are sent further apart than the
    adapters write their counts for each other, ``LW_CLOUD_RATE_SYNC_S``.)"""
    second = Service("cloud_adapter", dict(cloud.adapter.env))
    with running(second):
        cloud.openai_fake.reset()
        answers: list[httpx.Response] = []
        while len(answers) < 40:
            answers.append(ask(cloud, "shared/echo"))
            time.sleep(5 * SYNC_S)
            if len(answers) >= 6 and taken(cloud.adapter, "shared") and taken(second, "shared"):
                break
        assert [r.status_code for r in answers[:3]] == [200, 200, 200], [r.text for r in answers[:3]]
        for r in answers[3:]:
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "provider_rate_limit"
            assert "rpm (3)" in r.json()["error"]["message"]
        assert len(cloud.openai_fake.calls) == 3
        assert taken(cloud.adapter, "shared") + taken(second, "shared") == len(answers)
