"""QA of provider dialect fidelity, end to end, as a user of LiteLLM or of the official openai client meets it.

The stack is test_cloud_fidelity.py's (its fixture, started again for this module): the openai client or httpx
-> gateway -> router -> cloud-adapter -> fake OpenAI-compatible and Anthropic providers answering exactly what
each test scripts (``Fault.raw``), their ``calls`` showing the exact request each provider received. A second,
smaller stack puts an Azure OpenAI deployment behind the adapter (the deployment in the path, ``api-version``
in the query, the key in ``api-key``). Covered: Azure's URL shape, key header, content-filter finish and error
bodies; DeepSeek's ``reasoning_content`` (whole and streamed) and reasoning usage; vLLM's extra body
parameters; ``stream_options.include_usage`` (the usage chunk last, its choices empty, and none when not
asked); OpenAI parameters sent as given (seed, json_schema, stop as a string, max_completion_tokens, user,
parallel_tool_calls, top_logprobs); Anthropic's translation of system messages, stop sequences and their
finish reason, the max_tokens default, images, tool_choice, temperature, and its error bodies. QA found four
bugs, fixed since: a finish reason meaning a cut answer (Mistral's model_length) became "stop"; a vLLM/SGLang
error body reached the caller as raw JSON cut short; a prefill ending in whitespace was sent to Anthropic
(which refuses it); Anthropic's "prompt is too long" was not context_length_exceeded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.e2e import test_cloud_fidelity
from tests.e2e.test_cloud_fidelity import (
    TOOLS,
    USER,
    QAStack,
    anthropic_events,
    anthropic_message,
    openai_chunk,
    openai_completion,
    openai_events,
)
from tests.fakes import FakeProvider, Fault
from tests.support import NatsServer, Service, cloud_router_env, running

pytestmark = pytest.mark.e2e
qa = test_cloud_fidelity.qa  # the same stack as test_cloud_fidelity.py's, for this module
_fresh = test_cloud_fidelity._fresh
ASSISTANT_OK = {"role": "assistant", "content": "ok"}


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finishes(chunks: list[Any]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


# -- Azure OpenAI: a deployment in the path, api-version in the query, the key in api-key

AZURE_KEY = "azure-secret-key-0123456789"
API_VERSION = "2024-10-21"


class AzureFake(FakeProvider):
    """An OpenAI-compatible fake served as an Azure OpenAI resource: ``/openai/deployments/<dep>/chat/completions``,
    the key in ``api-key``; the query string of each call is kept in ``queries``."""

    def __init__(self) -> None:
        super().__init__("openai", key=AZURE_KEY)
        self.queries: list[dict[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("api-key") == AZURE_KEY

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._azure)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _azure(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(dict(request.query))
        return await self._handle(request)


@dataclass
class AzureStack:
    gateway: Service
    fake: AzureFake

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key="key-acme", max_retries=0, timeout=20)


@pytest.fixture(scope="module")
def azure(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureStack]:
    fake = AzureFake().start()
    tmp = tmp_path_factory.mktemp("azure")
    file: Path = tmp / "providers.yaml"
    file.write_text(json.dumps({"providers": [{
        "name": "azure", "kind": "openai-compatible", "base_url": fake.url, "local": True,
        "path": f"/openai/deployments/{{model}}/chat/completions?api-version={API_VERSION}",
        "api_key_env": "LW_QA_AZURE_KEY", "api_key_header": "api-key",
        "models": {"gpt4o": {"upstream": "gpt4o-prod", "input_per_mtok": 1, "output_per_mtok": 1}},
        "timeouts": {"connect_s": 2, "first_byte_s": 2, "total_s": 10}}]}))
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": "qa-azure"}
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(file), "LW_QA_AZURE_KEY": AZURE_KEY,
                                        "LW_CLOUD_BACKOFF_BASE_S": "0.01", "LW_CLOUD_BACKOFF_CAP_S": "0.05",
                                        "LW_CLOUD_BREAKER_FAILURES": "1000"})
    router = Service("router", {**env, **cloud_router_env(tmp)})
    gateway = Service("gateway", {**env, "LW_GATEWAY_API_KEYS": test_cloud_fidelity.API_KEYS})
    try:
        with running(adapter, router, gateway):
            yield AzureStack(gateway, fake)
    finally:
        fake.stop()


def test_azure_deployment_url_api_version_and_api_key_header(azure: AzureStack) -> None:
    """The call goes to the deployment's URL with the api-version, the key in `api-key` and nowhere else."""
    azure.fake.reset()
    azure.fake.queries.clear()
    r = azure.client().chat.completions.create(model="azure/gpt4o", messages=USER)
    assert r.choices[0].message.content == "pong hello there"
    (call,) = azure.fake.calls
    assert call.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert azure.fake.queries == [{"api-version": API_VERSION}]
    headers = {k.lower(): v for k, v in call.headers.items()}
    assert headers["api-key"] == AZURE_KEY
    assert "authorization" not in headers


def test_azure_content_filter_finish_passes_through_whole_and_streamed(azure: AzureStack) -> None:
    """Azure cuts an answer its filter flags with finish_reason "content_filter" (content null, or what was
    streamed so far); its streams begin with a chunk of no choices holding prompt_filter_results."""
    azure.fake.reset()
    filtered = openai_completion({"role": "assistant", "content": None}, "content_filter",
                                 content_filter_results={"hate": {"filtered": True, "severity": "high"}})
    prompt_filter = 'data: {"id":"","object":"","created":0,"model":"","choices":[],"prompt_filter_results":' \
                    '[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}\n\n'
    azure.fake.script(Fault.raw(body=filtered),
                      Fault.raw(events=[prompt_filter, *openai_events([{"role": "assistant", "content": "Some"}],
                                                                      "content_filter")]))
    r = azure.client().chat.completions.create(model="azure/gpt4o", messages=USER)
    assert r.choices[0].finish_reason == "content_filter"
    assert not r.choices[0].message.content  # no text (null as Azure sent it, or "")
    chunks = list(azure.client().chat.completions.create(model="azure/gpt4o", messages=USER, stream=True))
    assert text_of(chunks) == "Some"
    assert finishes(chunks) == ["content_filter"]


def test_azure_content_filter_error_is_a_400_naming_the_filter(azure: AzureStack) -> None:
    """Azure refuses a prompt its filter flags with a 400 whose code is content_filter: the caller gets a 400
    with that code and Azure's message, and it is not retried."""
    azure.fake.reset()
    body = {"error": {"message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
                                 "management policy.", "type": None, "param": "prompt", "code": "content_filter",
                      "status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation",
                                                    "content_filter_result": {"hate": {"filtered": True,
                                                                                       "severity": "high"}}}}}
    azure.fake.script(Fault.raw(400, body))
    with pytest.raises(openai.BadRequestError) as exc:
        azure.client().chat.completions.create(model="azure/gpt4o", messages=USER)
    assert exc.value.code == "content_filter"
    assert "content management policy" in exc.value.message
    assert len(azure.fake.calls) == 1


# -- OpenAI-compatible providers: DeepSeek, vLLM, OpenAI's own parameters

def test_deepseek_reasoning_content_whole_and_streamed(qa: QAStack) -> None:
    """deepseek-reasoner answers its chain of thought as reasoning_content beside content, and counts its
    reasoning tokens in completion_tokens_details; streamed, reasoning_content deltas come first."""
    whole = openai_completion({"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4."}, "stop")
    whole["usage"]["completion_tokens_details"] = {"reasoning_tokens": 3}
    qa.oai.script(Fault.raw(body=whole),
                  Fault.raw(events=openai_events([{"role": "assistant", "content": None, "reasoning_content": ""},
                                                  {"content": None, "reasoning_content": "2+2 "},
                                                  {"content": None, "reasoning_content": "is 4."},
                                                  {"content": "4", "reasoning_content": None}], "stop")))
    r = qa.client().chat.completions.create(model="oai/gpt", messages=USER)
    assert r.choices[0].message.content == "4"
    assert (r.choices[0].message.model_extra or {})["reasoning_content"] == "2+2 is 4."
    assert r.usage is not None
    assert r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    chunks = list(qa.client().chat.completions.create(model="oai/gpt", messages=USER, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == "2+2 is 4."
    assert text_of(chunks) == "4"


def test_vllm_extra_body_parameters_reach_the_provider(qa: QAStack) -> None:
    """vLLM's own sampling and guided-decoding parameters, sent with the openai client's extra_body, reach an
    OpenAI-compatible provider unchanged (LiteLLM passes them on)."""
    extra = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "guided_json": {"type": "object"},
             "chat_template_kwargs": {"enable_thinking": False}}
    qa.client().chat.completions.create(model="oai/gpt", messages=USER, extra_body=extra)
    sent = qa.oai.calls[-1].body
    assert {k: sent.get(k) for k in extra} == extra


def test_openai_parameters_reach_the_provider_as_given(qa: QAStack) -> None:
    """seed, a strict json_schema, stop as a string, max_completion_tokens (not turned into max_tokens), user,
    parallel_tool_calls, logprobs with top_logprobs and logit_bias: sent as the caller gave them."""
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}}}
    qa.oai.script(Fault.raw(body=openai_completion({"role": "assistant", "content": '{"a": "x"}'}, "stop")))
    r = qa.client().chat.completions.create(
        model="oai/gpt", messages=USER, seed=42, response_format=fmt, stop="END",  # type: ignore[arg-type]
        max_completion_tokens=77, user="u-1", tools=TOOLS, parallel_tool_calls=False, logprobs=True,
        top_logprobs=3, logit_bias={"50256": -100})
    assert r.choices[0].message.content == '{"a": "x"}'
    sent = qa.oai.calls[-1].body
    assert sent["model"] == "gpt-x"
    assert (sent["seed"], sent["response_format"], sent["stop"], sent["max_completion_tokens"], sent["user"]) == (
        42, fmt, "END", 77, "u-1")
    assert "max_tokens" not in sent
    assert (sent["parallel_tool_calls"], sent["logprobs"], sent["top_logprobs"]) == (False, True, 3)
    assert sent["logit_bias"] == {"50256": -100}
    assert "stream" not in sent
    assert "stream_options" not in sent


def test_stream_usage_chunk_comes_last_with_no_choices(qa: QAStack) -> None:
    """stream_options.include_usage: as OpenAI does, the finish chunk, then one chunk with `choices: []` and the
    usage, then nothing."""
    qa.oai.script(Fault.raw(events=openai_events([{"role": "assistant", "content": "o"}, {"content": "k"}], "stop")))
    chunks = list(qa.client().chat.completions.create(model="oai/gpt", messages=USER, stream=True,
                                                      stream_options={"include_usage": True}))
    assert qa.oai.calls[-1].body["stream_options"] == {"include_usage": True}
    assert text_of(chunks) == "ok"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (10, 5, 15)
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_no_usage_chunk_when_the_caller_did_not_ask(qa: QAStack) -> None:
    """The adapter asks the provider for usage (to price the call), but a caller who did not ask gets no
    chunk without choices (code reading chunk.choices[0] would break on it) and no usage."""
    qa.oai.script(Fault.raw(events=openai_events([{"role": "assistant", "content": "ok"}], "stop")))
    chunks = list(qa.client().chat.completions.create(model="oai/gpt", messages=USER, stream=True))
    assert qa.oai.calls[-1].body["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert finishes(chunks) == ["stop"]


def test_usage_sent_with_the_finish_chunk_is_not_lost(qa: QAStack) -> None:
    """Some OpenAI-compatible servers put the usage on the finish chunk itself (choices not empty): the caller
    asking for usage still gets it, in a last chunk of no choices."""
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    qa.oai.script(Fault.raw(events=[openai_chunk({"role": "assistant", "content": "ok"}),
                                    openai_chunk({}, "stop", usage=usage), "data: [DONE]\n\n"]))
    chunks = list(qa.client().chat.completions.create(model="oai/gpt", messages=USER, stream=True,
                                                      stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (7, 2)


@pytest.mark.parametrize("stream", [False, True])
def test_a_cut_answers_model_length_finish_is_length(qa: QAStack, stream: bool) -> None:
    """Mistral's API ends an answer cut by the context window with finish_reason "model_length" (its documented
    enum: stop, length, model_length, error, tool_calls): a caller checking for "length" must see the answer
    was cut, as leafwire already does for Anthropic's model_context_window_exceeded."""
    if stream:
        qa.oai.script(Fault.raw(events=openai_events([{"role": "assistant", "content": "cut sh"}], "model_length")))
        chunks = list(qa.client().chat.completions.create(model="oai/gpt", messages=USER, stream=True))
        assert finishes(chunks) == ["length"]
    else:
        qa.oai.script(Fault.raw(body=openai_completion({"role": "assistant", "content": "cut sh"}, "model_length")))
        r = qa.client().chat.completions.create(model="oai/gpt", messages=USER)
        assert r.choices[0].finish_reason == "length"


def test_a_vllm_error_bodys_message_reaches_the_caller(qa: QAStack) -> None:
    """vLLM (before 0.10) and SGLang answer errors as {"object": "error", "message", "type", "param", "code"}: the
    caller should get that message, whole, not the body's JSON text cut short."""
    message = ("This model's maximum context length is 4096 tokens. However, you requested 5210 tokens (5000 in "
               "the messages, 210 in the completion). Please reduce the length of the messages or completion.")
    qa.oai.script(Fault.raw(400, {"object": "error", "message": message, "type": "BadRequestError", "param": None,
                                  "code": 400}))
    r = qa.post({"model": "oai/gpt", "messages": USER})
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]
    assert '"object"' not in r.json()["error"]["message"]


# -- Anthropic: the request translated

def test_anthropic_prefill_is_sent_without_trailing_whitespace(qa: QAStack) -> None:
    """A last assistant message continues the answer (prefill); Anthropic refuses one ending in whitespace
    ("final assistant content cannot end with trailing whitespace"), so it is sent stripped on the right, as
    other gateways to Anthropic do."""
    qa.client().chat.completions.create(model="claude/sonnet", messages=[
        *USER, {"role": "assistant", "content": "The answer is "}])
    last = qa.claude.calls[-1].body["messages"][-1]
    assert last["role"] == "assistant"
    assert last["content"][-1]["text"] == "The answer is"


def test_anthropic_several_system_and_developer_messages_join(qa: QAStack) -> None:
    """Several system messages (and a developer one, and one after the first user turn) become one system
    text, in order, parted by blank lines; none is sent as a user turn."""
    qa.client().chat.completions.create(model="claude/sonnet", messages=[
        {"role": "system", "content": "You are terse."}, {"role": "developer", "content": "Answer in English."},
        *USER, {"role": "system", "content": "Never guess."}])
    sent = qa.claude.calls[-1].body
    assert sent["system"] == "You are terse.\n\nAnswer in English.\n\nNever guess."
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]


def test_anthropic_stop_string_and_stop_sequence_finish(qa: QAStack) -> None:
    """stop as a string becomes stop_sequences (a list); an answer ended by one (stop_reason stop_sequence) has
    finish_reason "stop", whole and streamed."""
    hit = anthropic_message([{"type": "text", "text": "one two"}], "stop_sequence")
    hit["stop_sequence"] = "END"
    events = anthropic_events([{"type": "text", "text": "one two"}], "stop_sequence")
    qa.claude.script(Fault.raw(body=hit), Fault.raw(events=events))
    r = qa.client().chat.completions.create(model="claude/sonnet", messages=USER, stop="END")
    assert qa.claude.calls[0].body["stop_sequences"] == ["END"]
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("one two", "stop")
    chunks = list(qa.client().chat.completions.create(model="claude/sonnet", messages=USER, stream=True,
                                                      stop=["END", "STOP"]))
    assert qa.claude.calls[1].body["stop_sequences"] == ["END", "STOP"]
    assert text_of(chunks) == "one two"
    assert finishes(chunks) == ["stop"]


def test_anthropic_max_tokens_default_and_max_completion_tokens(qa: QAStack) -> None:
    """Anthropic requires max_tokens: without one the model's (256 in the providers file) is sent; the
    caller's max_completion_tokens or max_tokens is sent as max_tokens."""
    qa.client().chat.completions.create(model="claude/sonnet", messages=USER)
    qa.client().chat.completions.create(model="claude/sonnet", messages=USER, max_completion_tokens=33)
    qa.client().chat.completions.create(model="claude/sonnet", messages=USER, max_tokens=44)
    assert [c.body["max_tokens"] for c in qa.claude.calls] == [256, 33, 44]
    assert all("max_completion_tokens" not in c.body for c in qa.claude.calls)


def test_anthropic_a_length_stop_is_length(qa: QAStack) -> None:
    qa.claude.script(Fault.raw(body=anthropic_message([{"type": "text", "text": "cut"}], "max_tokens")))
    r = qa.client().chat.completions.create(model="claude/sonnet", messages=USER, max_tokens=1)
    assert r.choices[0].finish_reason == "length"


def test_anthropic_images_as_data_urls_and_https_urls(qa: QAStack) -> None:
    """A data: URL becomes a base64 image block (its media type from the URL), an https URL a url image block."""
    qa.client().chat.completions.create(model="claude/sonnet", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/line3.png"}}]}])
    assert qa.claude.calls[-1].body["messages"][0]["content"] == [
        {"type": "text", "text": "Compare these."},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/line3.png"}}]


@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    ("none", None, {"type": "none"}),
    ("auto", None, {"type": "auto"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "lookup"}}, None, {"type": "tool", "name": "lookup"}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
])
def test_anthropic_tool_choice(qa: QAStack, choice: Any, parallel: bool | None, expected: dict[str, Any]) -> None:
    extra: dict[str, Any] = {} if parallel is None else {"parallel_tool_calls": parallel}
    qa.client().chat.completions.create(model="claude/sonnet", messages=USER, tools=TOOLS, tool_choice=choice,
                                        **extra)
    sent = qa.claude.calls[-1].body
    assert sent["tool_choice"] == expected
    assert [t["name"] for t in sent["tools"]] == ["lookup"]


def test_anthropic_temperature_above_one_is_a_400_before_any_call(qa: QAStack) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        qa.client().chat.completions.create(model="claude/sonnet", messages=USER, temperature=1.5)
    assert exc.value.body["param"] == "temperature"  # type: ignore[index]
    assert qa.claude.calls == []
    qa.client().chat.completions.create(model="claude/sonnet", messages=USER, temperature=1.0)
    assert qa.claude.calls[-1].body["temperature"] == 1.0


# -- Anthropic: its errors in OpenAI's shape

def test_anthropic_invalid_request_error_in_openais_shape(qa: QAStack) -> None:
    """Anthropic's 400 {"type": "error", "error": {"type": "invalid_request_error", "message": ...}} reaches the
    caller as OpenAI's {"error": {"message", "type": "invalid_request_error", ...}} with Anthropic's message,
    and is not retried."""
    message = "messages.0.content.1.image.source.base64: image exceeds 5 MB maximum"
    qa.claude.script(Fault.raw(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                                "message": message}}))
    r = qa.post({"model": "claude/sonnet", "messages": USER})
    assert r.status_code == 400
    error = r.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert len(qa.claude.calls) == 1


def test_anthropic_prompt_too_long_is_context_length_exceeded(qa: QAStack) -> None:
    """Anthropic refuses a prompt over the model's context with 400 invalid_request_error "prompt is too long:
    N tokens > M maximum"; OpenAI says the same with code context_length_exceeded, which callers (and LiteLLM's
    ContextWindowExceededError, and leafwire's own router fallback) key on."""
    qa.claude.script(Fault.raw(400, {"type": "error", "error": {
        "type": "invalid_request_error", "message": "prompt is too long: 210345 tokens > 200000 maximum"}}))
    with pytest.raises(openai.BadRequestError) as exc:
        qa.client().chat.completions.create(model="claude/sonnet", messages=USER)
    assert "prompt is too long" in exc.value.message
    assert exc.value.code == "context_length_exceeded"


def test_anthropic_request_too_large_is_a_client_error_not_retried(qa: QAStack) -> None:
    """Anthropic's 413 request_too_large (the request is over 32 MB): the caller's request is wrong, so a 4xx
    with Anthropic's message, once."""
    qa.claude.script(Fault.raw(413, {"type": "error", "error": {"type": "request_too_large",
                                                                "message": "Request exceeds the maximum size"}}))
    r = qa.post({"model": "claude/sonnet", "messages": USER})
    assert r.status_code in (400, 413)
    assert "Request exceeds the maximum size" in r.json()["error"]["message"]
    assert len(qa.claude.calls) == 1


def test_anthropic_overloaded_on_every_try_is_retried_then_a_502(qa: QAStack) -> None:
    """529 overloaded_error on every try: retried like a 503 by the adapter, then a 502 upstream_error naming
    the 529 (marked x-should-retry: false, as documented: the adapter already retried)."""
    qa.claude.script(*[Fault.error(529)] * 10)
    r = qa.post({"model": "claude/sonnet", "messages": USER})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_error"
    assert "529" in r.json()["error"]["message"]
    assert len(qa.claude.calls) > 1


def test_anthropic_streamed_overloaded_error_event_before_any_text_is_retried(qa: QAStack) -> None:
    """An `error` event (overloaded_error) as a stream's first event, before any text reached the caller: as a
    529, the adapter tries again and the caller gets the answer."""
    qa.claude.script(Fault.stream_error(0))
    chunks = list(qa.client().chat.completions.create(model="claude/sonnet", messages=USER, stream=True))
    assert text_of(chunks) == "pong hello there"
    assert len(qa.claude.calls) == 2
