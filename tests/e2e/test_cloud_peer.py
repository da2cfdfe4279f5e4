"""Another leafwire as the cloud provider: a real OpenAI-compatible peer, not a fake.

Site ``edge1`` runs the walking skeleton (gateway, router, local-inference with the tiny fixture model).
Site ``cloudy`` runs a gateway, a router and its own cloud-adapter whose providers file names edge1's
gateway as provider ``peer`` (``local: true``: it is on this machine). Asking cloudy for ``peer/tiny``
goes gateway → router → cloud-adapter → HTTP → edge1's gateway → router → local-inference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import Stack
from tests.support import Service, cloud_router_env, metric, running

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "Why did line 3 stop on the 3rd?"}]


@pytest.fixture(scope="module")
def cloudy_site(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    """The gateway of site `cloudy` and its cloud-adapter, which calls edge1's gateway."""
    file = tmp_path_factory.mktemp("peer") / "providers.yaml"
    file.write_text(json.dumps({"providers": [{
        "name": "peer", "kind": "openai-compatible", "base_url": stack.base_url, "local": True,
        "models": {"tiny": {"input_per_mtok": 1, "output_per_mtok": 1}},
        "timeouts": {"connect_s": 5, "first_byte_s": 30, "total_s": 60}}]}))
    env = {"LW_NATS_URL": stack.nats.url, "LW_SITE": "cloudy"}
    gateway = Service("gateway", env)
    router = Service("router", {**env, **cloud_router_env(file.parent)})
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(file)})
    with running(adapter, router, gateway):
        yield gateway, adapter


@pytest.fixture(scope="module")
def cloudy(cloudy_site: tuple[Service, Service]) -> Service:
    """The gateway of site `cloudy`."""
    return cloudy_site[0]


def client(gateway: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(c: openai.OpenAI, model: str, **kw: Any) -> Any:
    return c.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=8,
                                                       temperature=0, **kw)


def test_peer_answers_as_it_does_directly(stack: Stack, cloudy: Service) -> None:
    """Through the peer, a greedy answer is the same text and usage as asking edge1 directly."""
    direct = ask(stack.client(), "tiny").parse()
    raw = ask(client(cloudy), "peer/tiny", extra_body={"cache": False})
    via = raw.parse()
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage == direct.usage
    assert via.model == "peer/tiny"
    assert raw.headers["x-leafwire-served-by"].startswith("cloudy/ca-")
    assert raw.headers["x-leafwire-route"].startswith("target=peer/tiny")


def test_peer_streams_with_usage(stack: Stack, cloudy: Service) -> None:
    """A streamed answer from the peer arrives chunk by chunk, with the finish reason and usage."""
    direct = ask(stack.client(), "tiny").parse()
    chunks = list(client(cloudy).chat.completions.create(
        model="peer/tiny", messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"cache": False}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        direct.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage == direct.usage


def test_peer_errors_come_back_as_errors(stack: Stack, cloudy: Service) -> None:
    """The peer's own 400 (context too long for its model) reaches the caller as a 400 with its message."""
    with pytest.raises(openai.BadRequestError) as exc:
        client(cloudy).chat.completions.create(model="peer/tiny", messages=MESSAGES, max_tokens=100_000)
    assert exc.value.code == "context_length_exceeded"
    assert "maximum context length" in exc.value.message


def test_peer_streams_several_choices_in_one_call(stack: Stack, cloudy_site: tuple[Service, Service]) -> None:
    """n=2 streamed through the peer is one call with n (the peer asks its local model a request per choice
    and streams both, interleaved): each choice arrives whole at its index, the same samples as asking
    edge1 directly with the same seed."""
    def texts(c: openai.OpenAI, model: str) -> dict[int, str]:
        out: dict[int, str] = {}
        for chunk in c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=1.0,
                                               seed=11, n=2, stream=True):
            for choice in chunk.choices:
                out[choice.index] = out.get(choice.index, "") + (choice.delta.content or "")
        return out

    gateway, adapter = cloudy_site
    direct = texts(stack.client(), "tiny")
    assert set(direct) == {0, 1}
    before = metric(adapter.metrics(), "leafwire_cloud_requests_total", provider="peer", model="tiny", outcome="ok")
    assert texts(client(gateway), "peer/tiny") == direct
    assert metric(adapter.metrics(), "leafwire_cloud_requests_total", provider="peer", model="tiny",
                  outcome="ok") == before + 1
