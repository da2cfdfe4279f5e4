"""What an OpenAI-compatible provider is sent where servers differ: the field of the completion limit, and the
usage chunk a stream asks for; and what a whole answer says it cost (``x-leafwire-cost-usd``).

The stack: the openai client -> gateway -> router -> cloud-adapter -> a fake OpenAI-compatible provider, whose
``calls`` show the body each call carried. OpenAI's reasoning models (o1, o3, o4-mini, gpt-5...) refuse
``max_tokens`` and take ``max_completion_tokens``; servers that predate it take ``max_tokens`` only; some servers
(Azure before api-version 2024-07, older OpenAI-compatible servers) refuse ``stream_options`` with a 400.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fakes import FakeProvider, Fault
from tests.support import NatsServer, Service, cloud_router_env, running

pytestmark = pytest.mark.e2e
STREAM_OPTIONS_REFUSED = {"error": {"message": "Unrecognized request argument supplied: stream_options",
                                    "type": "invalid_request_error", "param": None, "code": None}}


@dataclass
class Stack:
    gateway: Service
    fake: FakeProvider  # providers "oai" (models o3, gpt5, gpt, old...) and "lenient" (drop_params: true)
    plain: FakeProvider  # provider "plain": stream_usage: false

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key="key-acme", max_retries=0, timeout=20)


def write_providers(path: Path, fake: FakeProvider, plain: FakeProvider) -> Path:
    def entry(name: str, provider: FakeProvider, models: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"name": name, "kind": "openai-compatible", "base_url": provider.url, "local": True,
                "models": models, "timeouts": {"connect_s": 2, "first_byte_s": 2, "total_s": 10}, **more}
    path.write_text(json.dumps({"providers": [
        entry("oai", fake, {"o3": {"upstream": "o3-mini-2025-01-31"}, "gpt5": {"upstream": "gpt-5.1-mini"},
                            "gpt": {"upstream": "gpt-4o-mini"},
                            "old": {"upstream": "legacy-13b", "token_limit_field": "max_tokens"},
                            "priced": {"upstream": "gpt-4o", "input_per_mtok": 2.5, "output_per_mtok": 10},
                            "embed": {"kind": "embeddings", "input_per_mtok": 0.13}}),
        entry("plain", plain, {"m": {}, "priced": {"input_per_mtok": 3, "output_per_mtok": 15}}, stream_usage=False,
              n=False),
        entry("lenient", fake, {"o3": {"upstream": "o3-mini-2025-01-31"}, "gpt": {"upstream": "gpt-4o-mini"},
                                "deployment": {"upstream": "plant-brain", "reasoning": True}}, drop_params=True),
    ]}))
    return path


@pytest.fixture(scope="module")
def stack(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    fake, plain = FakeProvider("openai").start(), FakeProvider("openai").start()
    file = write_providers(tmp_path_factory.mktemp("params") / "providers.yaml", fake, plain)
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": "params"}
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(file), "LW_CLOUD_BACKOFF_BASE_S": "0.01"})
    router = Service("router", {**env, **cloud_router_env(file.parent)})
    gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": "key-acme:acme"})
    try:
        with running(adapter, router, gateway):
            yield Stack(gateway, fake, plain)
    finally:
        fake.stop()
        plain.stop()


@pytest.fixture(autouse=True)
def _fresh(stack: Stack) -> None:
    stack.fake.reset()
    stack.plain.reset()


def limits_sent(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in ("max_tokens", "max_completion_tokens") if k in body}


@pytest.mark.parametrize(("model", "given", "sent"), [
    # OpenAI's reasoning models refuse max_tokens: the caller's limit goes as max_completion_tokens
    ("oai/o3", {"max_tokens": 50}, {"max_completion_tokens": 50}),
    ("oai/gpt5", {"max_tokens": 50}, {"max_completion_tokens": 50}),
    ("oai/o3", {"max_completion_tokens": 40}, {"max_completion_tokens": 40}),
    # both given: max_completion_tokens wins, as OpenAI reads them, and max_tokens is not sent alongside
    ("oai/o3", {"max_tokens": 50, "max_completion_tokens": 40}, {"max_completion_tokens": 40}),
    # other models get what the caller sent
    ("oai/gpt", {"max_tokens": 50}, {"max_tokens": 50}),
    ("oai/gpt", {"max_completion_tokens": 40}, {"max_completion_tokens": 40}),
    # a server configured with token_limit_field: max_tokens gets max_tokens, whichever the caller sent
    ("oai/old", {"max_completion_tokens": 40}, {"max_tokens": 40}),
    # no limit given: none is sent
    ("oai/o3", {}, {}),
])
def test_the_completion_limit_goes_in_the_field_the_model_takes(stack: Stack, model: str, given: dict[str, int],
                                                                sent: dict[str, int]) -> None:
    answer = stack.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                    **given)  # type: ignore[call-overload]
    assert answer.choices[0].message.content
    assert limits_sent(stack.fake.calls[-1].body) == sent


SAMPLING = {"temperature": 0.3, "top_p": 0.5, "presence_penalty": 0.4, "frequency_penalty": 0.2, "logprobs": True,
            "top_logprobs": 2, "logit_bias": {"1734": -5}}
TEMPERATURE_REFUSED = {"error": {"message": "Unsupported value: 'temperature' does not support 0.3 with this model. "
                                            "Only the default (1) value is supported.",
                                 "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value"}}


@pytest.mark.parametrize("model", ["lenient/o3", "lenient/deployment"])
def test_drop_params_leaves_out_what_a_reasoning_model_refuses(stack: Stack, model: str) -> None:
    """A provider set ``drop_params: true`` (LiteLLM's): a reasoning model (by its name, or a deployment set
    ``reasoning: true``) answers a request with sampling parameters, which its call does not carry."""
    answer = stack.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                    seed=5, **SAMPLING)  # type: ignore[call-overload]
    assert answer.choices[0].message.content
    sent = stack.fake.calls[-1].body
    assert not set(SAMPLING) & set(sent), sent
    assert sent["seed"] == 5
    stack.client().chat.completions.create(model="lenient/gpt", messages=[{"role": "user", "content": "hi"}],
                                           **SAMPLING)  # type: ignore[call-overload]
    assert {k: stack.fake.calls[-1].body[k] for k in SAMPLING} == SAMPLING  # a model that takes them gets them


@pytest.mark.parametrize(("model", "asked", "dropped"), [
    ("oai/o3", True, True),  # the provider does not drop; the request asks to
    ("lenient/o3", False, False),  # the provider drops; the request asks not to
])
def test_a_request_says_drop_params_itself(stack: Stack, model: str, asked: bool, dropped: bool) -> None:
    """LiteLLM's ``drop_params`` in the request body wins over the providers file's, and is never sent on."""
    stack.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"drop_params": asked}, **SAMPLING)  # type: ignore[arg-type]
    sent = stack.fake.calls[-1].body
    assert "drop_params" not in sent
    if dropped:
        assert not set(SAMPLING) & set(sent), sent
    else:
        assert {k: sent[k] for k in SAMPLING} == SAMPLING


def test_without_drop_params_the_models_own_400_reaches_the_caller(stack: Stack) -> None:
    """Not set to drop: the parameters go as given, and the provider's refusal is the caller's 400, after
    one call (as LiteLLM without drop_params, and OpenAI itself)."""
    stack.fake.script(Fault.error(400, TEMPERATURE_REFUSED))
    with pytest.raises(openai.BadRequestError, match="Only the default") as exc:
        stack.client().chat.completions.create(model="oai/o3", messages=[{"role": "user", "content": "hi"}],
                                               temperature=0.3)
    assert exc.value.param == "temperature"  # type: ignore[attr-defined]
    assert stack.fake.calls[-1].body["temperature"] == 0.3
    assert len(stack.fake.calls) == 1


def test_a_stream_refused_for_stream_options_is_asked_again_without_it(stack: Stack) -> None:
    """The caller gets its stream, and its usage (estimated); the next stream is asked without it at once."""
    stack.fake.script(Fault.error(400, STREAM_OPTIONS_REFUSED))
    client = stack.client()
    chunks = list(client.chat.completions.create(model="oai/gpt", messages=[{"role": "user", "content": "hi there"}],
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens > 0
    assert usage.prompt_tokens > 0
    first, second = stack.fake.calls
    assert first.body["stream_options"] == {"include_usage": True}
    assert "stream_options" not in second.body
    list(client.chat.completions.create(model="oai/gpt", messages=[{"role": "user", "content": "again"}],
                                        stream=True))
    assert len(stack.fake.calls) == 3
    assert "stream_options" not in stack.fake.calls[2].body
    # a whole answer is unaffected (it has no stream_options to refuse)
    client.chat.completions.create(model="oai/gpt", messages=[{"role": "user", "content": "whole"}])
    assert len(stack.fake.calls) == 4


def test_another_400_is_the_callers_and_not_asked_again(stack: Stack) -> None:
    """A 400 that does not name stream_options reaches the caller as it is, after one call."""
    refusal = {"error": {"message": "messages[0].content is too long", "type": "invalid_request_error",
                         "param": "messages", "code": None}}
    stack.fake.script(Fault.error(400, refusal))
    with pytest.raises(openai.BadRequestError, match="too long"):
        list(stack.client().chat.completions.create(model="oai/o3", messages=[{"role": "user", "content": "x"}],
                                                    stream=True))
    assert len(stack.fake.calls) == 1


def test_stream_usage_false_never_sends_stream_options(stack: Stack) -> None:
    """A provider set ``stream_usage: false`` is asked without it from the first call; usage is estimated."""
    chunks = list(stack.client().chat.completions.create(
        model="plain/m", messages=[{"role": "user", "content": "hello"}], stream=True,
        stream_options={"include_usage": True}))
    assert len(stack.plain.calls) == 1
    assert "stream_options" not in stack.plain.calls[0].body
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens > 0


# -- what a whole answer cost


def cost_of(usage: Any, input_per_mtok: float, output_per_mtok: float) -> float:
    return (usage.prompt_tokens * input_per_mtok + usage.completion_tokens * output_per_mtok) / 1e6


def test_a_whole_answer_says_what_it_cost(stack: Stack) -> None:
    """As LiteLLM's x-litellm-response-cost: the usage at the model's prices, in US dollars."""
    raw = stack.client().chat.completions.with_raw_response.create(
        model="oai/priced", messages=[{"role": "user", "content": "what does this cost"}])
    answer = raw.parse()
    assert answer.usage is not None
    assert float(raw.headers["x-leafwire-cost-usd"]) == pytest.approx(cost_of(answer.usage, 2.5, 10), abs=1e-9)
    assert float(raw.headers["x-leafwire-cost-usd"]) > 0


def test_a_cache_hit_costs_nothing_and_a_stream_does_not_say(stack: Stack) -> None:
    """A cache hit made no call: 0. A stream's headers go before its cost is known: no header (its usage
    chunk, the usage event and ``leafwire usage`` have it); an unpriced model costs 0."""
    client = stack.client()
    ask = {"model": "oai/priced", "messages": [{"role": "user", "content": "cache me"}], "temperature": 0}
    first = client.chat.completions.with_raw_response.create(**ask)  # type: ignore[call-overload]
    assert float(first.headers["x-leafwire-cost-usd"]) > 0
    again = client.chat.completions.with_raw_response.create(**ask)  # type: ignore[call-overload]
    assert again.headers["x-leafwire-cache"] == "hit"
    assert again.headers["x-leafwire-cost-usd"] == "0"
    with client.chat.completions.with_streaming_response.create(
            model="oai/priced", messages=[{"role": "user", "content": "stream"}], stream=True) as streamed:
        assert "x-leafwire-cost-usd" not in streamed.headers
        list(streamed.iter_lines())
    free = client.chat.completions.with_raw_response.create(model="oai/gpt",
                                                            messages=[{"role": "user", "content": "free"}])
    assert free.headers["x-leafwire-cost-usd"] == "0"


@pytest.mark.parametrize(("model", "prices"), [
    ("oai/priced", (2.5, 10)),  # n in one call
    ("plain/priced", (3, 15)),  # a provider without n: a call a choice, their costs added up
])
def test_choices_say_what_they_cost_together(stack: Stack, model: str, prices: tuple[float, float]) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "two of them"}], n=2)
    answer = raw.parse()
    assert len(answer.choices) == 2
    assert answer.usage is not None
    assert float(raw.headers["x-leafwire-cost-usd"]) == pytest.approx(cost_of(answer.usage, *prices), abs=1e-9)


def test_embeddings_say_what_they_cost(stack: Stack) -> None:
    """At the input price; several parts (more inputs than one part holds) added up; only the inputs not
    cached are paid for."""
    client = stack.client()
    inputs = [f"line {i} of the manual" for i in range(300)]  # two parts of base64 vectors (256 + 44)
    raw = client.embeddings.with_raw_response.create(model="oai/embed", input=inputs)
    answer = raw.parse()
    assert float(raw.headers["x-leafwire-cost-usd"]) == pytest.approx(answer.usage.prompt_tokens * 0.13 / 1e6,
                                                                      abs=1e-9)
    again = client.embeddings.with_raw_response.create(model="oai/embed", input=inputs[:10])
    assert again.headers["x-leafwire-cache"] == "hit"
    assert again.headers["x-leafwire-cost-usd"] == "0"
