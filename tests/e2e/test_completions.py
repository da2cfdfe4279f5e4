"""Text completions (``POST /v1/completions``) end to end: the official openai client -> gateway -> router ->
batcher -> local-inference, and -> cloud-adapter -> a fake OpenAI-compatible provider.

Each prompt is answered as a chat request whose one user message holds it, so the greedy fixture model's
text for a prompt is its chat answer to that message; these tests check what a caller of
``client.completions.create`` notices: the ``text_completion`` shape, streaming, list prompts, ``n``, echo,
the default of 16 tokens, and the 400s of what the chat path cannot honour.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import FakeProvider, Fault, providers_file
from tests.support import NatsServer, Service, eventually, metric, write_policy, write_registry

pytestmark = pytest.mark.e2e
SITE = "cmpl"
KEY = "sk-completions-test-1a2b3c"
API_KEY = "key-cmpl"
PROMPT = "Why did line 3 stop on the 3rd?"
POLICY = """
local_model: tiny
aliases:
  helper: fake/echo
rules: [{name: default, route: [requested, local]}]
"""


@dataclass
class Site:
    worker: Service
    batcher: Service
    gateway: Service
    provider: FakeProvider

    def client(self, key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key=key, max_retries=0, timeout=30)

    def post(self, body: bytes | dict[str, Any]) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{self.gateway.base}/v1/completions", content=content, timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})


@pytest.fixture(scope="module")
def site(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One site serving the tiny local model (whose own default is 40 tokens) and, through a cloud-adapter,
    the fake provider's ``fake/echo``; ``helper`` is an alias of it."""
    tmp = tmp_path_factory.mktemp("completions")
    provider = FakeProvider("openai", key=KEY).start()
    providers = providers_file(tmp / "providers.yaml", provider)
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE}
    worker = Service("local_inference", {**env, "LW_MODELS_FILE": str(write_registry(tmp / "models.yaml",
                                                                                     max_tokens=40))})
    batcher = Service("batcher", env)
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(providers), "LW_TEST_KEY": KEY})
    router = Service("router", {**env, "LW_ROUTER_UPLINK": "up",
                                "LW_ROUTER_POLICY_FILE": str(write_policy(tmp / "policy.yaml", POLICY))})
    gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": f"{API_KEY}:acme"})
    services = (worker, batcher, adapter, router, gateway)
    try:
        for s in services:  # all at once: each waits for NATS only, and their start-ups overlap
            s.start()
        for s in services:
            s.wait_ready()
        yield Site(worker, batcher, gateway, provider)
    finally:
        for s in reversed(services):
            s.stop()
        provider.stop()


@pytest.fixture(autouse=True)
def _fresh_provider(site: Site) -> None:
    site.provider.reset()


def complete(site: Site, prompt: str | list[str] = PROMPT, **kwargs: Any) -> openai.types.Completion:
    return site.client().completions.create(model="tiny", prompt=prompt, **kwargs)  # type: ignore[no-any-return]


def chat(site: Site, content: str = PROMPT, **kwargs: Any) -> str:
    r = site.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                              **kwargs)
    return r.choices[0].message.content or ""


def streamed(site: Site, prompt: str | list[str] = PROMPT, model: str = "tiny",
             **kwargs: Any) -> list[openai.types.Completion]:
    return list(site.client().completions.create(model=model, prompt=prompt, stream=True, **kwargs))


def texts(chunks: list[openai.types.Completion]) -> dict[int, str]:
    """Each choice's text, its chunks joined in order."""
    joined: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            joined[c.index] = joined.get(c.index, "") + c.text
    return joined


class TestLocal:
    def test_answer_has_text_completion_shape(self, site: Site) -> None:
        """A prompt gets a text_completion with the text, its finish reason, null logprobs and usage; its id
        is the request id, and the headers say where it ran."""
        raw = site.client().completions.with_raw_response.create(model="tiny", prompt=PROMPT, max_tokens=8)
        r = raw.parse()
        assert r.object == "text_completion"
        assert r.id == f"cmpl-{raw.headers['x-request-id']}"
        assert r.model == "tiny"
        (choice,) = r.choices
        assert (choice.index, choice.logprobs, choice.finish_reason) == (0, None, "length")
        assert choice.text == chat(site, max_tokens=8)  # the prompt is the user's message
        assert r.usage is not None
        assert r.usage.completion_tokens == 8
        assert r.usage.total_tokens == r.usage.prompt_tokens + 8 > 8
        assert raw.headers["x-leafwire-route"].startswith("target=local/tiny")
        assert raw.headers["x-leafwire-served-by"].startswith(f"{SITE}/li-")

    def test_default_is_16_tokens(self, site: Site) -> None:
        """Without max_tokens an answer has at most 16 tokens, OpenAI's default here (chat's is the model's)."""
        r = complete(site)
        assert r.usage is not None
        assert r.usage.completion_tokens == 16
        assert r.choices[0].finish_reason == "length"
        assert len(chat(site)) > len(r.choices[0].text)  # the model's own default, 40

    def test_stop_and_auto(self, site: Site) -> None:
        """stop cuts the text before it, as in chat; `auto` is routed as chat routes it (here: locally)."""
        full = complete(site, max_tokens=24).choices[0].text
        stop = full[len(full) // 2: len(full) // 2 + 3]
        raw = site.client().completions.with_raw_response.create(model="auto", prompt=PROMPT, max_tokens=24,
                                                                 stop=[stop])
        assert raw.parse().choices[0].text == full[: full.index(stop)]
        assert raw.parse().choices[0].finish_reason == "stop"
        assert raw.headers["x-leafwire-route"].startswith("target=local/tiny")

    def test_list_of_prompts_gets_a_choice_each_in_order(self, site: Site) -> None:
        """A list of prompts gets one choice per prompt, indexed in order, each the prompt's own answer."""
        prompts = ["first prompt", "a second, longer prompt", "3"]
        alone = [complete(site, p, max_tokens=6) for p in prompts]
        r = complete(site, prompts, max_tokens=6)
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert [c.text for c in r.choices] == [a.choices[0].text for a in alone]
        assert r.usage is not None
        assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone if a.usage)
        assert r.usage.completion_tokens == 18

    def test_n_samples_differ_and_are_reproducible(self, site: Site) -> None:
        """n choices with a seed are n different samples; the first is the answer of n=1 with that seed."""
        kw: dict[str, Any] = {"max_tokens": 24, "temperature": 1.0, "seed": 7}
        r = complete(site, ["one", "two"], n=2, **kw)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        one = [c.text for c in r.choices[:2]]
        assert one[0] != one[1]
        assert one[0] == complete(site, "one", **kw).choices[0].text
        assert [c.text for c in complete(site, ["one", "two"], n=2, **kw).choices] == [c.text for c in r.choices]

    def test_echo_puts_the_prompt_first(self, site: Site) -> None:
        """echo: the text is the prompt followed by the answer, whole and streamed."""
        plain = complete(site, max_tokens=5).choices[0].text
        assert complete(site, max_tokens=5, echo=True).choices[0].text == PROMPT + plain
        assert texts(streamed(site, max_tokens=5, echo=True)) == {0: PROMPT + plain}

    def test_a_prompt_over_the_context_names_the_prompt(self, site: Site) -> None:
        """A prompt and max_tokens over the model's context is chat's 400, its param the prompt."""
        with pytest.raises(openai.BadRequestError) as exc:
            complete(site, max_tokens=20000)
        err = exc.value.body
        assert isinstance(err, dict)
        assert (err["code"], err["param"]) == ("context_length_exceeded", "prompt")
        assert "in the prompt" in err["message"]


class TestLocalStream:
    def test_stream_adds_up_to_the_whole_answer(self, site: Site) -> None:
        """Streamed text_completion chunks add up to the non-streamed text; the last has the finish reason."""
        whole = complete(site, max_tokens=10).choices[0].text
        chunks = streamed(site, max_tokens=10)
        assert all(c.object == "text_completion" for c in chunks)
        assert len({c.id for c in chunks}) == 1
        assert chunks[0].id.startswith("cmpl-")
        assert texts(chunks) == {0: whole}
        assert [c.choices[0].finish_reason for c in chunks[-1:]] == ["length"]
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
        assert all(c.usage is None for c in chunks)

    def test_include_usage_ends_with_the_usage_of_every_choice(self, site: Site) -> None:
        """With include_usage the last chunk has no choices and the usage of all the choices."""
        chunks = streamed(site, ["one", "two"], max_tokens=6, stream_options={"include_usage": True})
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 12
        assert texts(chunks[:-1]) == {i: c.text for i, c in enumerate(complete(site, ["one", "two"],
                                                                               max_tokens=6).choices)}

    def test_wire_format_is_sse_ending_with_done(self, site: Site) -> None:
        """The raw stream is `data:` lines of text_completion JSON, ending `data: [DONE]`."""
        with httpx.stream("POST", f"{site.gateway.base}/v1/completions", timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-leafwire-route"].startswith("target=local/tiny")
            events = [line for line in r.iter_lines() if line]
        assert all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]"
        assert {json.loads(e[6:])["object"] for e in events[:-1]} == {"text_completion"}

    def test_a_caller_leaving_cancels_every_choice(self, site: Site) -> None:
        """Closing a stream of three long choices midway stops them all: none is left decoding or queued, and
        the next request is answered with nothing decoded beside it."""
        def worker(name: str, **labels: str) -> float:
            return metric(site.worker.metrics(), name, model="tiny", **labels)

        cancelled = worker("leafwire_generations_total", finish_reason="cancelled")
        with httpx.stream("POST", f"{site.gateway.base}/v1/completions", timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "tiny", "prompt": PROMPT, "n": 3, "max_tokens": 15000,
                                "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        eventually(lambda: worker("leafwire_active_rows") == 0 and metric(
            site.batcher.metrics(), "leafwire_queue_depth_requests", model="tiny") == 0, 10, "nothing left")
        assert worker("leafwire_generations_total", finish_reason="cancelled") > cancelled
        tokens = worker("leafwire_completion_tokens_total")
        assert complete(site, max_tokens=2).choices[0].finish_reason == "length"
        assert worker("leafwire_completion_tokens_total") == tokens + 2


class TestCloud:
    def test_cloud_model_answers_the_prompt_as_a_user_message(self, site: Site) -> None:
        """A cloud model gets the prompt as one user message and max_tokens 16; no completions-only field."""
        raw = site.client().completions.with_raw_response.create(model="fake/echo", prompt="hello there",
                                                                 echo=True, best_of=1, temperature=0.5)
        r = raw.parse()
        assert r.object == "text_completion"
        assert r.model == "fake/echo"
        assert r.choices[0].text == "hello therepong hello there"
        assert r.usage is not None
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (2, 3)
        assert raw.headers["x-leafwire-route"].startswith("target=fake/echo")
        (call,) = site.provider.calls
        assert call.body["messages"] == [{"role": "user", "content": "hello there"}]
        assert (call.body["max_tokens"], call.body["temperature"]) == (16, 0.5)
        assert not {"prompt", "echo", "best_of", "n", "suffix", "logprobs"} & set(call.body)

    def test_cloud_stream_through_an_alias(self, site: Site) -> None:
        """An alias of a cloud model streams its answer as text_completion chunks, then the usage."""
        chunks = streamed(site, "hello there", model="helper", stream_options={"include_usage": True})
        assert texts(chunks) == {0: "pong hello there"}
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 3

    def test_list_of_prompts_to_a_cloud_model(self, site: Site) -> None:
        """Each prompt of a list is its own call to the provider; the choices come back in prompt order."""
        r = site.client().completions.create(model="fake/echo", prompt=["a b", "c", "d e f"])
        assert [c.text for c in r.choices] == ["pong a b", "pong c", "pong d e f"]
        assert len(site.provider.calls) == 3

    def test_n_choices_of_one_prompt_are_one_call(self, site: Site) -> None:
        """n=3 of one prompt to an OpenAI-compatible model, whole: one call with n (the prompt paid and counted
        once), three choices in order, each echoing the prompt; a list of prompts stays a call a choice."""
        site.provider.script(Fault.ok("a b"), Fault.ok("c d"), Fault.ok("e f"))
        r = site.client().completions.create(model="fake/echo", prompt="hello there", n=3, echo=True)
        assert [(c.index, c.text) for c in r.choices] == [(0, "hello therea b"), (1, "hello therec d"),
                                                           (2, "hello theree f")]
        (call,) = site.provider.calls
        assert call.body["n"] == 3
        assert r.usage is not None
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (2, 6)
        site.provider.reset()
        assert len(site.client().completions.create(model="fake/echo", prompt=["a", "b"], n=2).choices) == 4
        assert [c.body.get("n") for c in site.provider.calls] == [None] * 4


    def test_streamed_n_choices_of_one_prompt_are_one_call(self, site: Site) -> None:
        """n=2 of one prompt, streamed: one call with n; text_completion chunks of both choices, each at its
        index with the prompt echoed on its first, and a usage chunk counting the prompt once."""
        site.provider.script(Fault.ok("a b"), Fault.ok("c"))
        chunks = streamed(site, "hello there", model="fake/echo", n=2, echo=True,
                          stream_options={"include_usage": True})
        assert texts(chunks) == {0: "hello therea b", 1: "hello therec"}
        assert {c.object for c in chunks} == {"text_completion"}
        assert {c.index: c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason} == {
            0: "stop", 1: "stop"}
        (call,) = site.provider.calls
        assert (call.body["n"], call.body["stream"]) == (2, True)
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (2, 3)

def refused(site: Site, status: int = 400, **body: Any) -> dict[str, Any]:
    """The error body of a completions request the gateway refuses (and the status must be ``status``)."""
    with pytest.raises(openai.APIStatusError) as exc:
        site.client().completions.create(**{"model": "tiny", "prompt": PROMPT, **body})
    assert exc.value.status_code == status
    assert isinstance(exc.value.body, dict)
    assert set(exc.value.body) == {"message", "type", "param", "code"}
    return exc.value.body


class TestRefused:
    @pytest.mark.parametrize(("param", "body"), [
        ("suffix", {"suffix": "and so on"}),
        ("logprobs", {"logprobs": 0}),
        ("logprobs", {"logprobs": 5}),
        ("best_of", {"best_of": 2}),
        ("best_of", {"best_of": 3, "n": 2, "stream": True}),
        ("prompt", {"prompt": [1, 2, 3]}),
        ("prompt", {"prompt": [[1, 2], [3]]}),
    ])
    def test_what_the_chat_path_cannot_honour(self, site: Site, param: str, body: dict[str, Any]) -> None:
        """A parameter no answer here can honour is a 400 naming it, never an answer without it."""
        err = refused(site, **body)
        assert (err["param"], err["type"], err["code"]) == (param, "invalid_request_error", "unsupported_parameter")
        assert not site.provider.calls

    @pytest.mark.parametrize(("param", "body"), [
        ("prompt", {"prompt": []}),
        ("prompt", {"prompt": 5}),
        ("prompt", {"prompt": None}),
        ("best_of", {"best_of": 1, "n": 2}),
        ("n", {"n": 129}),
        ("n", {"prompt": ["a"] * 50, "n": 3}),
        ("prompt", {"prompt": ["a"] * 129}),
        ("max_tokens", {"max_tokens": 0}),
        ("temperature", {"temperature": 3}),
        ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
        ("stream_options", {"stream_options": {"include_usage": True}}),
        ("echo", {"echo": "yes"}),
    ])
    def test_bad_values(self, site: Site, param: str, body: dict[str, Any]) -> None:
        """A missing, empty or wrongly typed prompt, and values out of range, are 400s naming the parameter."""
        err = refused(site, **body)
        assert (err["param"], err["type"]) == (param, "invalid_request_error")

    def test_unknown_model_is_404(self, site: Site) -> None:
        """A model nobody serves is chat's 404 model_not_found."""
        err = refused(site, 404, model="no-such-model")
        assert (err["code"], err["param"]) == ("model_not_found", "model")

    def test_wrong_api_key_is_401(self, site: Site) -> None:
        """The endpoint needs the API key chat needs."""
        with pytest.raises(openai.AuthenticationError):
            site.client("wrong").completions.create(model="tiny", prompt=PROMPT)

    @pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"model": "tiny"}'])
    def test_a_body_that_is_no_request(self, site: Site, body: bytes) -> None:
        """Invalid JSON, a non-object and a body without a prompt are 400s in OpenAI's shape, with a request id."""
        r = site.post(body)
        assert r.status_code == 400
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert len(r.headers["x-request-id"]) == 32
        if body == b'{"model": "tiny"}':
            assert r.json()["error"]["param"] == "prompt"


def peak_rss_mb(service: Service) -> int:
    """The most memory the service's process has held so far (Linux: VmHWM), in MB."""
    assert service.proc is not None
    status = Path(f"/proc/{service.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) // 1024


def chat_n(site: Site, model: str = "tiny", **kwargs: Any) -> Any:
    return site.client().chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                 **kwargs)


class TestChatChoices:
    """Chat completions with ``n`` > 1, asked down the same fan-out as text completions' choices."""

    def test_n_choices_differ_and_the_first_is_the_n_1_answer(self, site: Site) -> None:
        """n=3 with a seed: three different samples, indexes 0..2, the first what n=1 answers; usage summed."""
        kw: dict[str, Any] = {"max_tokens": 12, "temperature": 1.0, "seed": 7}
        raw = site.client().chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": PROMPT}], n=3, **kw)
        r, one = raw.parse(), chat_n(site, **kw)
        assert r.id == f"chatcmpl-{raw.headers['x-request-id']}"
        assert raw.headers["x-leafwire-route"].startswith("target=local/tiny")
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert len({c.message.content for c in r.choices}) == 3
        assert r.choices[0].message.content == one.choices[0].message.content
        assert r.usage is not None
        assert one.usage is not None
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3 * one.usage.prompt_tokens, 36)

    def test_streamed_choices_interleave_and_end_with_the_usage(self, site: Site) -> None:
        """Streamed n=3: each choice's role chunk then its text, with its index; the last chunk the usage."""
        kw: dict[str, Any] = {"max_tokens": 8, "temperature": 1.0, "seed": 3}
        whole = chat_n(site, n=3, **kw)
        chunks = list(chat_n(site, n=3, stream=True, stream_options={"include_usage": True}, **kw))
        *parts, last = chunks
        joined: dict[int, str] = {}
        for chunk in parts:
            (c,) = chunk.choices
            if c.index not in joined:
                assert c.delta.role == "assistant"
            joined[c.index] = joined.get(c.index, "") + (c.delta.content or "")
        assert joined == {c.index: c.message.content for c in whole.choices}
        assert len({c.id for c in chunks}) == 1
        assert last.choices == []
        assert last.usage is not None
        assert whole.usage is not None
        assert last.usage.total_tokens == whole.usage.total_tokens

    def test_an_openai_compatible_model_gets_one_call_of_n(self, site: Site) -> None:
        """n=2 to an OpenAI-compatible cloud model, whole: one call with n (the prompt paid once, as the
        provider's usage says); one answer of both, the choices in index order."""
        r = chat_n(site, "fake/echo", n=2)
        assert [(c.index, c.message.content) for c in r.choices] == [(0, f"pong {PROMPT}"), (1, f"pong {PROMPT}")]
        (call,) = site.provider.calls
        assert call.body["n"] == 2
        assert r.usage is not None
        assert r.usage.prompt_tokens == len(PROMPT.split())  # once, as OpenAI counts it
        assert r.usage.completion_tokens == 2 * len(f"pong {PROMPT}".split())

    def test_streamed_choices_of_a_cloud_model_are_one_call(self, site: Site) -> None:
        """Streamed n=2 to an OpenAI-compatible cloud model: one call with n, its chunks relayed as they come,
        each choice's role chunk first and its own finish reason; the usage chunk counts the prompt once."""
        site.provider.script(Fault.ok("first sample here"), Fault.ok("second one"))
        chunks = list(chat_n(site, "fake/echo", n=2, stream=True, stream_options={"include_usage": True}))
        (call,) = site.provider.calls
        assert (call.body["n"], call.body["stream"]) == (2, True)
        *parts, last = chunks
        texts: dict[int, str] = {}
        finished: dict[int, str | None] = {}
        for chunk in parts:
            (c,) = chunk.choices
            if c.index not in texts:
                assert c.delta.role == "assistant"
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished[c.index] = c.finish_reason
        assert texts == {0: "first sample here", 1: "second one"}
        assert finished == {0: "stop", 1: "stop"}
        assert len({c.id for c in chunks}) == 1
        assert last.choices == []
        assert last.usage is not None
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT.split()), 5)

    def test_a_caller_leaving_cancels_every_choice(self, site: Site) -> None:
        """Closing a stream of three long choices midway stops them all: none left decoding or queued."""
        cancelled = metric(site.worker.metrics(), "leafwire_generations_total", model="tiny",
                           finish_reason="cancelled")
        with httpx.stream("POST", f"{site.gateway.base}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "n": 3,
                                "max_tokens": 15000, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        eventually(lambda: metric(site.worker.metrics(), "leafwire_active_rows", model="tiny") == 0 and metric(
            site.batcher.metrics(), "leafwire_queue_depth_requests", model="tiny") == 0, 10, "nothing left")
        assert metric(site.worker.metrics(), "leafwire_generations_total", model="tiny",
                      finish_reason="cancelled") > cancelled

    def test_streamed_headers_are_choice_0s(self, site: Site) -> None:
        """Streamed n=2 at temperature 0 whose choice 1 (seed 501) is cached and choice 0 (seed 500) is not:
        x-leafwire-cache is choice 0's miss, as README says and the whole answer has it."""
        chat_n(site, "fake/echo", temperature=0, seed=501)
        site.provider.script(Fault.slow(0.5))  # choice 0's call: the cached choice 1 answers first
        raw = site.client().chat.completions.with_raw_response.create(
            model="fake/echo", messages=[{"role": "user", "content": PROMPT}], n=2, temperature=0, seed=500,
            stream=True)
        assert {c.index for chunk in raw.parse() for c in chunk.choices} == {0, 1}
        assert raw.headers["x-leafwire-cache"] == "miss"

    def test_a_big_request_of_many_choices_is_not_held_once_per_choice(self, site: Site) -> None:
        """A 3 MB conversation with n=128 (over the context: a 400): the gateway holds it about once, not 128
        times; it took 400 MB more, a few such requests gigabytes, and building the copies stalled every caller."""
        before = peak_rss_mb(site.gateway)
        r = httpx.post(f"{site.gateway.base}/v1/chat/completions", timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": "tiny", "messages": [{"role": "user", "content": "word " * 600_000}], "n": 128,
                             "max_tokens": 1})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "context_length_exceeded")
        assert peak_rss_mb(site.gateway) - before < 150

    @pytest.mark.parametrize("n", [0, 129, 1.5, "2", None])
    def test_bad_n_is_a_400_naming_it(self, site: Site, n: Any) -> None:
        """n below 1, over 128 or not an integer is OpenAI's 400 naming n (null is no n)."""
        r = httpx.post(f"{site.gateway.base}/v1/chat/completions", timeout=30,
                       headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "n": n,
                             "max_tokens": 1})
        if n is None:
            assert r.status_code == 200
            return
        assert r.status_code == 400
        assert (r.json()["error"]["param"], r.json()["error"]["type"]) == ("n", "invalid_request_error")
