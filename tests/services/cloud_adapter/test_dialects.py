"""Translation to and from providers: OpenAI-compatible bodies, Anthropic both ways, server-sent events."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest

from schemas.chat import ChatCompletionRequest
from services.cloud_adapter.anthropic import Anthropic
from services.cloud_adapter.config import ModelSpec
from services.cloud_adapter.dialect import Delta, ErrorInfo, Fingerprint, Finish, Tokens, classify
from services.cloud_adapter.openai_compat import OpenAICompatible
from services.cloud_adapter.sse import ServerEvent, SSEParser
from shared.answer import merge_delta
from shared.errors import InvalidRequest, ModelNotFound, UpstreamError, UpstreamRateLimited, UpstreamTimeout

SPEC = ModelSpec(max_tokens=1000)


def req(**kw: Any) -> ChatCompletionRequest:
    body = {"model": "p/m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return ChatCompletionRequest.model_validate(body)


class TestServerSentEvents:
    def test_events_split_across_reads(self) -> None:
        """Events arrive whole however the bytes are cut, with CRLF or LF, comments skipped."""
        p = SSEParser()
        raw = b": keep-alive\r\nevent: a\r\ndata: {\"x\":\r\ndata: 1}\r\n\r\ndata: [DONE]\n\n"
        events = [e for i in range(len(raw)) for e in p.feed(raw[i:i + 1])]
        assert events == [ServerEvent("a", '{"x":\n1}'), ServerEvent("message", "[DONE]")]

    def test_last_event_without_blank_line(self) -> None:
        """A body ending right after its last data line still yields that event."""
        p = SSEParser()
        assert p.feed(b"data: 1\n\ndata: 2") == [ServerEvent("message", "1")]
        assert p.close() == [ServerEvent("message", "2")]

    def test_oversized_event_is_refused(self) -> None:
        """An event larger than the limit is an upstream_bad_response instead of unbounded memory."""
        with pytest.raises(UpstreamError) as exc:
            SSEParser(max_event_bytes=100).feed(b"data: " + b"x" * 200)
        assert exc.value.code == "upstream_bad_response"


class TestOpenAICompatible:
    def test_body_keeps_the_callers_fields(self) -> None:
        """Tools and other fields pass through; the model is the provider's; leafwire's own fields do not."""
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        body = json.loads(OpenAICompatible("p").body(req(tools=tools, temperature=0, cache=True, seed=3), SPEC,
                                                    "gpt-x", stream=False))
        assert body["model"] == "gpt-x"
        assert body["tools"] == tools
        assert body["seed"] == 3
        assert "cache" not in body
        assert "stream" not in body

    def test_streamed_body_asks_for_usage(self) -> None:
        """A streamed call asks for the closing usage chunk, so every call's cost is known (unless the provider
        refuses stream_options)."""
        body = json.loads(OpenAICompatible("p").body(req(stream=True), SPEC, "m", stream=True))
        assert body["stream_options"] == {"include_usage": True}
        body = json.loads(OpenAICompatible("p").body(req(stream=True, stream_options={"include_usage": True}), SPEC,
                                                    "m", stream=True, usage=False))
        assert "stream_options" not in body
        assert body["stream"] is True

    @pytest.mark.parametrize(("upstream", "reasoning"), [
        ("o1", True), ("o3-mini-2025-01-31", True), ("O4-mini", True), ("openai/o3", True), ("gpt-5", True),
        ("gpt-5.1-mini", True), ("gpt-5-nano", True), ("ft:o4-mini-2025-04-16:acme:qa:AbC123", True),
        ("ft:gpt-4o-mini-2024-07-18:acme::x1", False),
        ("gpt-4o", False), ("gpt-4o-mini", False), ("o1x", False), ("gpt-50", False), ("llama-3-o1", False),
        ("omni-moderation-latest", False), ("deepseek-reasoner", False),
    ])
    def test_reasoning_models_take_max_completion_tokens(self, upstream: str, reasoning: bool) -> None:
        """OpenAI's reasoning models refuse max_tokens: the caller's limit is sent as max_completion_tokens;
        other models get the field the caller used."""
        body = json.loads(OpenAICompatible("p").body(req(max_tokens=30), SPEC, upstream, stream=False))
        assert body == {**body, **({"max_completion_tokens": 30} if reasoning else {"max_tokens": 30})}
        assert ("max_tokens" in body) is not reasoning
        forced = ModelSpec(token_limit_field="max_tokens")
        body = json.loads(OpenAICompatible("p").body(req(max_completion_tokens=30), forced, upstream, stream=False))
        assert body["max_tokens"] == 30
        assert "max_completion_tokens" not in body

    SAMPLING: ClassVar[dict[str, Any]] = {"temperature": 0.2, "top_p": 0.9, "presence_penalty": 0.5,
                                          "frequency_penalty": 0.3, "logprobs": True, "top_logprobs": 2,
                                          "logit_bias": {"50256": -100}}

    def test_a_reasoning_model_that_drops_params_is_not_sent_what_it_refuses(self) -> None:
        """drop_params (the provider's, or the model's own): an o-series model's call has none of the sampling
        parameters it answers a 400 for; the rest of the request goes as given."""
        for dialect, spec in ((OpenAICompatible("p", drop_params=True), SPEC),
                              (OpenAICompatible("p"), ModelSpec(drop_params=True))):
            body = json.loads(dialect.body(req(seed=7, max_tokens=30, **self.SAMPLING), spec, "o3-mini", stream=False))
            assert not set(self.SAMPLING) & set(body), body
            assert (body["seed"], body["max_completion_tokens"]) == (7, 30)

    @pytest.mark.parametrize(("dialect", "spec", "upstream"), [
        (OpenAICompatible("p"), SPEC, "o3-mini"),  # not set to drop: o3's own 400 names what it refuses
        (OpenAICompatible("p", drop_params=True), ModelSpec(drop_params=False), "o3-mini"),  # the model says no
        (OpenAICompatible("p", drop_params=True), SPEC, "gpt-4o-mini"),  # takes them all
        (OpenAICompatible("p", drop_params=True), ModelSpec(reasoning=False), "o3-mini"),  # told it is not
    ])
    def test_otherwise_the_sampling_parameters_go_as_given(self, dialect: OpenAICompatible, spec: ModelSpec,
                                                           upstream: str) -> None:
        body = json.loads(dialect.body(req(**self.SAMPLING), spec, upstream, stream=False))
        assert {k: body[k] for k in self.SAMPLING} == self.SAMPLING

    def test_a_deployment_told_it_is_a_reasoning_model(self) -> None:
        """An Azure deployment is named by its owner: ``reasoning: true`` gives it max_completion_tokens and,
        with drop_params, no sampling parameters."""
        spec = ModelSpec(reasoning=True, drop_params=True)
        body = json.loads(OpenAICompatible("p").body(req(max_tokens=30, temperature=0.5), spec, "plant-brain",
                                                     stream=False))
        assert body["max_completion_tokens"] == 30
        assert "max_tokens" not in body
        assert "temperature" not in body

    def test_stream_pieces(self) -> None:
        """Chunks become deltas (role chunks and empty text dropped), a finish, and usage; [DONE] ends."""
        s = OpenAICompatible("p").stream_parser()
        assert s.feed("message", json.dumps({"choices": [{"delta": {"role": "assistant", "content": ""}}]})) == []
        assert s.feed("message", json.dumps({"choices": [{"delta": {"content": "Hi", "refusal": None}}]})) == [
            Delta({"content": "Hi"})]
        assert s.feed("message", json.dumps({"choices": [{"delta": {}, "finish_reason": "length"}]})) == [
            Finish("length")]
        assert s.feed("message", json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}})) \
            == [Tokens(4, 1)]
        assert s.feed("message", "[DONE]") == []
        assert s.done

    def test_stream_of_n_choices(self) -> None:
        """A stream of n choices: every choice of a chunk, each piece with its index; a role chunk is an empty
        delta (the choice has begun); an index outside 0..n-1, or missing, cannot be read."""
        s = OpenAICompatible("p").stream_parser(3)
        role = {"role": "assistant", "content": ""}
        assert s.feed("message", json.dumps({"choices": [{"index": 0, "delta": role}, {"index": 2, "delta": role}]})) \
            == [Delta({}, None, 0), Delta({}, None, 2)]
        assert s.feed("message", json.dumps({"choices": [{"index": 1, "delta": {"content": "b"}},
                                                         {"index": 2, "delta": {}, "finish_reason": "length"}]})) \
            == [Delta({"content": "b"}, None, 1), Delta({}, None, 2), Finish("length", 2)]
        for index in (3, -1, None, "1"):
            with pytest.raises(UpstreamError) as exc:
                s.feed("message", json.dumps({"choices": [{"index": index, "delta": {"content": "x"}}]}))
            assert exc.value.code == "upstream_bad_response"

    def test_stream_logprobs_and_fingerprint(self) -> None:
        """A chunk's logprobs go with its delta (also a chunk of logprobs alone); the system fingerprint is
        one piece, again only when it changes."""
        s = OpenAICompatible("p").stream_parser()
        logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]}
        role = {"system_fingerprint": "fp_1", "choices": [{"delta": {"role": "assistant"}, "logprobs": None}]}
        assert s.feed("message", json.dumps(role)) == [Fingerprint("fp_1")]
        text = {"system_fingerprint": "fp_1", "choices": [{"delta": {"content": "Hi"}, "logprobs": logprobs}]}
        assert s.feed("message", json.dumps(text)) == [Delta({"content": "Hi"}, logprobs)]
        bare = {"system_fingerprint": "fp_2", "choices": [{"delta": {}, "logprobs": logprobs}]}
        assert s.feed("message", json.dumps(bare)) == [Fingerprint("fp_2"), Delta({}, logprobs)]

    def test_stream_malformed_and_error_objects(self) -> None:
        """An event that is not JSON, or carries an error object, raises instead of being relayed."""
        with pytest.raises(UpstreamError) as exc:
            OpenAICompatible("p").stream_parser().feed("message", "{nope")
        assert exc.value.code == "upstream_bad_response"
        with pytest.raises(UpstreamError):
            OpenAICompatible("p").stream_parser().feed("message", '{"error": {"message": "boom"}}')

    def test_whole_answer_keeps_message_fields(self) -> None:
        """tool_calls and other message fields of a whole answer are kept."""
        calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": calls},
                                        "finish_reason": "tool_calls"}],
                           "usage": {"prompt_tokens": 9, "completion_tokens": 2}}).encode()
        c = OpenAICompatible("p").completion(data)
        assert c.message == {"content": None, "tool_calls": calls}
        assert (c.finish, c.prompt_tokens, c.completion_tokens) == ("tool_calls", 9, 2)
        assert (c.logprobs, c.fingerprint) == (None, None)

    def test_whole_answer_keeps_logprobs_and_fingerprint(self) -> None:
        """A whole answer's logprobs and system fingerprint are kept for the caller; malformed ones are not."""
        logprobs = {"content": [{"token": "ok", "logprob": -0.25, "bytes": [111, 107], "top_logprobs": []}]}
        answer = {"choices": [{"message": {"role": "assistant", "content": "ok"}, "logprobs": logprobs,
                               "finish_reason": "stop"}], "system_fingerprint": "fp_44709d6fcb"}
        c = OpenAICompatible("p").completion(json.dumps(answer).encode())
        assert (c.logprobs, c.fingerprint) == (logprobs, "fp_44709d6fcb")
        odd = {**answer, "system_fingerprint": 7, "choices": [{**answer["choices"][0], "logprobs": "yes"}]}
        c = OpenAICompatible("p").completion(json.dumps(odd).encode())
        assert (c.logprobs, c.fingerprint) == (None, None)

    @pytest.mark.parametrize(("usage", "counted"), [
        ({"prompt_tokens": 100.0, "completion_tokens": 7.0}, (100, 7)),  # some servers write floats: still counted
        ({"prompt_tokens": 10.5, "completion_tokens": -1}, (None, None)),  # not a token count: estimated instead
        ({"prompt_tokens": True, "completion_tokens": "3"}, (None, None)),
    ])
    def test_usage_counts(self, usage: dict[str, Any], counted: tuple[int | None, int | None]) -> None:
        """Whole-number counts are taken as the provider's, whatever their JSON type; anything else is not."""
        data = json.dumps({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
                           "usage": usage}).encode()
        c = OpenAICompatible("p").completion(data)
        assert (c.prompt_tokens, c.completion_tokens) == counted

    @pytest.mark.parametrize(("usage", "cached"), [
        ({"prompt_tokens_details": {"cached_tokens": 64}}, 64),  # OpenAI's
        ({"prompt_cache_hit_tokens": 96, "prompt_cache_miss_tokens": 32}, 96),  # DeepSeek's
        ({"prompt_tokens_details": {"cached_tokens": 64}, "prompt_cache_hit_tokens": 96}, 64),  # both: OpenAI's
        ({}, None),
    ])
    def test_cached_prompt_tokens(self, usage: dict[str, Any], cached: int | None) -> None:
        """The prompt's tokens read from the provider's cache (billed at its cache price), in either field."""
        data = json.dumps({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 128, "completion_tokens": 2, **usage}}).encode()
        assert OpenAICompatible("p").completion(data).cached_tokens == cached


class TestAnthropicRequest:
    def body(self, request: ChatCompletionRequest, stream: bool = False) -> dict[str, Any]:
        return json.loads(Anthropic("anthropic").body(request, SPEC, "claude-x", stream))  # type: ignore[no-any-return]

    def test_system_and_alternating_turns(self) -> None:
        """System and developer messages become `system`; consecutive user messages merge into one turn."""
        body = self.body(req(messages=[{"role": "system", "content": "Be brief."},
                                       {"role": "developer", "content": "Use metric."},
                                       {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                       {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
                             max_tokens=50, stop="END", temperature=0.2, top_p=0.9, top_k=40, user="u7"))
        assert body["system"] == "Be brief.\n\nUse metric."
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assert body["messages"][0]["content"] == [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
        assert (body["max_tokens"], body["stop_sequences"], body["temperature"]) == (50, ["END"], 0.2)
        assert body["metadata"] == {"user_id": "u7"}
        assert (body["top_p"], body["top_k"]) == (0.9, 40)
        assert body["model"] == "claude-x"

    def test_text_parts_of_system_and_tool_messages_stay_apart(self) -> None:
        """A system message of text parts becomes text blocks (joined, its parts' words would run together);
        a tool message of parts becomes a result of text blocks; an image in a system message is a 400."""
        parts = [{"type": "text", "text": "Be helpful."}, {"type": "text", "text": ""},
                 {"type": "text", "text": "Be brief."}]
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        body = self.body(req(messages=[
            {"role": "system", "content": parts}, {"role": "developer", "content": "Use metric."},
            {"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "12"},
                                                               {"type": "text", "text": "bar"}]}]))
        assert body["system"] == [{"type": "text", "text": "Be helpful."}, {"type": "text", "text": "Be brief."},
                                  {"type": "text", "text": "Use metric."}]
        assert body["messages"][-1]["content"] == [{"type": "tool_result", "tool_use_id": "c1", "content": [
            {"type": "text", "text": "12"}, {"type": "text", "text": "bar"}]}]
        refused = self.body(req(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": [
            {"type": "refusal", "refusal": "I can't help with that."}]}, {"role": "user", "content": "b"}]))
        assert refused["messages"][1] == {"role": "assistant", "content": [  # an earlier refusal is what it said
            {"type": "text", "text": "I can't help with that."}]}
        image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        with pytest.raises(InvalidRequest, match="text only"):
            self.body(req(messages=[{"role": "system", "content": [image]}, {"role": "user", "content": "a"}]))

    def test_default_max_tokens(self) -> None:
        """Anthropic requires max_tokens: the model's default from the providers file is sent."""
        assert self.body(req())["max_tokens"] == 1000

    def test_images(self) -> None:
        """A data: URL becomes a base64 image block; another URL a url image block."""
        content = [{"type": "text", "text": "what"},
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
                   {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]
        blocks = self.body(req(messages=[{"role": "user", "content": content}]))["messages"][0]["content"]
        assert blocks[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"}}
        assert blocks[2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}

    def test_tools_round_trip(self) -> None:
        """Tools, tool_choice, assistant tool calls and tool results are translated to Anthropic's blocks."""
        tools = [{"type": "function", "function": {"name": "weather", "description": "d",
                                                   "parameters": {"type": "object", "properties": {"c": {}}}}}]
        messages = [{"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "t1", "type": "function",
                         "function": {"name": "weather", "arguments": '{"c":"Oslo"}'}}]},
                    {"role": "tool", "tool_call_id": "t1", "content": "rain"}]
        body = self.body(req(messages=messages, tools=tools, tool_choice="required", parallel_tool_calls=False))
        assert body["tools"] == [{"name": "weather", "description": "d",
                                  "input_schema": {"type": "object", "properties": {"c": {}}}}]
        assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
        assert body["messages"][1]["content"] == [{"type": "tool_use", "id": "t1", "name": "weather",
                                                   "input": {"c": "Oslo"}}]
        assert body["messages"][2] == {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "rain"}]}

    @pytest.mark.parametrize(("choice", "sent"), [
        ("none", {"type": "none"}),  # Anthropic's "none" takes no parallel flag
        ("auto", {"type": "auto", "disable_parallel_tool_use": True}),
        ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f",
                                                           "disable_parallel_tool_use": True}),
        (None, {"type": "auto", "disable_parallel_tool_use": True}),
    ])
    def test_parallel_tool_calls_off(self, choice: Any, sent: dict[str, Any]) -> None:
        """``parallel_tool_calls: false`` goes with every tool choice that can call a tool."""
        tools = [{"type": "function", "function": {"name": "f"}}]
        kw = {} if choice is None else {"tool_choice": choice}
        assert self.body(req(tools=tools, parallel_tool_calls=False, **kw))["tool_choice"] == sent

    def test_a_pdf_file_part_is_a_document(self) -> None:
        """The openai client's file part with a PDF inline (``file_data``) is Anthropic's document block."""
        body = self.body(req(messages=[{"role": "user", "content": [
            {"type": "file", "file": {"filename": "line3-manual.pdf",
                                      "file_data": "data:application/pdf;base64,JVBERi0x"}},
            {"type": "text", "text": "Why did line 3 stop?"}]}]))
        assert body["messages"][0]["content"][0] == {
            "type": "document", "title": "line3-manual.pdf",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}

    @pytest.mark.parametrize(("kw", "param"), [
        ({"temperature": 1.5}, "temperature"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"tools": "weather"}, "tools"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}]}]},
         "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {
            "file_data": "data:text/csv;base64,YSxi"}}]}]}, "messages"),
        ({"messages": [{"role": "system", "content": "only system"}]}, "messages"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]}, "messages"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "l", "schema": {"type": "array"}}}},
         "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"top_k": "5"}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"response_format": {"type": "json_object"}, "tools": [{"type": "function",  # the answer tool's name
                                                                  "function": {"name": "json_answer"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],  # a restriction it cannot say
          "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}}, "tool_choice"),
    ])
    def test_what_anthropic_cannot_take_is_a_400(self, kw: dict[str, Any], param: str) -> None:
        """Temperature over 1, nameless or malformed tools, audio parts, no user turn, tool arguments that
        are not JSON, and what Anthropic has no counterpart for (JSON mode, logprobs, logit_bias, penalties,
        audio, legacy functions): 400 naming the parameter, never an answer as if it were absent."""
        with pytest.raises(InvalidRequest) as exc:
            self.body(req(**kw))
        assert exc.value.param == param

    def test_values_that_ask_for_nothing_pass(self) -> None:
        """Defaults many clients send anyway pass and are not sent; seed (best effort at OpenAI too) and
        unknown fields are not sent either."""
        body = self.body(req(response_format={"type": "text"}, logprobs=False, top_logprobs=0, logit_bias={},
                             presence_penalty=0, frequency_penalty=0, seed=3, store=False, some_vendor_flag=1))
        assert not {"response_format", "logprobs", "top_logprobs", "logit_bias", "presence_penalty",
                    "frequency_penalty", "seed", "store", "some_vendor_flag"} & set(body)


class TestAnthropicDropParams:
    """drop_params: what Anthropic has no counterpart for, or refuses, is left out instead of refused."""

    def body(self, request: ChatCompletionRequest, spec: ModelSpec = SPEC) -> dict[str, Any]:
        return json.loads(Anthropic("anthropic", drop_params=True).body(  # type: ignore[no-any-return]
            request, spec, "claude-x", False))

    def test_what_anthropic_has_no_counterpart_for_is_left_out(self) -> None:
        body = self.body(req(temperature=1.5, presence_penalty=0.5, frequency_penalty=0.2, logprobs=True,
                             top_logprobs=2, logit_bias={"50256": -100}, top_p=0.8, max_tokens=40))
        assert not {"temperature", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs",
                    "logit_bias"} & set(body)
        assert (body["top_p"], body["max_tokens"]) == (0.8, 40)

    def test_with_thinking_what_anthropic_refuses_with_it_is_left_out(self) -> None:
        """Thinking takes no temperature but 1, no top_p below 0.95, and no top_k."""
        thinking = {"type": "enabled", "budget_tokens": 1024}
        body = self.body(req(thinking=thinking, temperature=0.2, top_p=0.5, top_k=5, max_tokens=2000))
        assert not {"temperature", "top_p", "top_k"} & set(body)
        body = self.body(req(thinking=thinking, temperature=1, top_p=0.97, max_tokens=2000))
        assert (body["temperature"], body["top_p"]) == (1, 0.97)
        body = self.body(req(temperature=0.2, top_p=0.5, top_k=5))  # without thinking, all are taken
        assert (body["temperature"], body["top_p"], body["top_k"]) == (0.2, 0.5, 5)

    def test_the_request_says_last(self) -> None:
        """A request's own ``drop_params`` wins over the provider's and the model's, either way."""
        body = json.loads(Anthropic("anthropic").body(req(logprobs=True, drop_params=True), SPEC, "claude-x", False))
        assert "logprobs" not in body
        assert "drop_params" not in body
        with pytest.raises(InvalidRequest):
            self.body(req(logprobs=True, drop_params=False))

    def test_a_model_that_says_no_is_refused_as_before(self) -> None:
        with pytest.raises(InvalidRequest) as exc:
            self.body(req(logprobs=True), ModelSpec(drop_params=False))
        assert exc.value.param == "logprobs"
        with pytest.raises(InvalidRequest) as exc:
            self.body(req(temperature=1.5), ModelSpec(drop_params=False))
        assert exc.value.param == "temperature"


class TestAnthropicAnswer:
    def test_only_web_results_are_url_citations(self) -> None:
        """A document's citation (a PDF's page) is no URL: the text is the content, with no annotation; the
        search and its results are not tool calls; the searches are counted (and none is ``None``)."""
        data = json.dumps({"type": "message", "stop_reason": "end_turn", "content": [
            {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {"query": "q"}},
            {"type": "web_search_tool_result", "tool_use_id": "s1", "content": []},
            {"type": "text", "text": "Page 4 says so.", "citations": [
                {"type": "page_location", "cited_text": "so", "document_index": 0, "start_page_number": 4}]}],
            "usage": {"input_tokens": 10, "output_tokens": 7, "server_tool_use": {"web_search_requests": 1}}})
        c = Anthropic("a").completion(data.encode())
        assert c.message == {"content": "Page 4 says so."}
        assert c.searches == 1
        plain = json.dumps({"type": "message", "stop_reason": "end_turn", "content": [{"type": "text", "text": "x"}],
                            "usage": {"input_tokens": 1, "output_tokens": 1}})
        assert Anthropic("a").completion(plain.encode()).searches is None

    def test_a_json_answer_has_no_citations_of_the_words_around_it(self) -> None:
        """With a JSON response_format the content is the answer tool's input: the cited words are not in it."""
        data = json.dumps({"type": "message", "stop_reason": "tool_use", "content": [
            {"type": "text", "text": "Found it.", "citations": [
                {"type": "web_search_result_location", "url": "https://example.com", "title": "t"}]},
            {"type": "tool_use", "id": "t1", "name": "json_answer", "input": {"year": 2026}}],
            "usage": {"input_tokens": 10, "output_tokens": 7}})
        request = req(response_format={"type": "json_object"})
        c = Anthropic("a").completion(data.encode(), request)
        assert c.message == {"content": '{"year": 2026}'}

    def test_whole_answer(self) -> None:
        """Text and tool_use blocks become content and tool_calls; usage includes cached prompt tokens."""
        data = json.dumps({"type": "message", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "t1", "name": "weather", "input": {"c": "Oslo"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 7}}).encode()
        c = Anthropic("a").completion(data)
        assert c.message["content"] == "Checking."
        assert c.message["tool_calls"] == [{"id": "t1", "type": "function",
                                            "function": {"name": "weather", "arguments": '{"c": "Oslo"}'}}]
        assert (c.finish, c.prompt_tokens, c.completion_tokens) == ("tool_calls", 15, 7)

    @pytest.mark.parametrize(("reason", "finish"), [("end_turn", "stop"), ("max_tokens", "length"),
                                                    ("stop_sequence", "stop"), ("refusal", "content_filter"),
                                                    ("model_context_window_exceeded", "length")])
    def test_stop_reasons(self, reason: str, finish: str) -> None:
        """Anthropic's stop reasons map to OpenAI's finish reasons."""
        data = json.dumps({"content": [], "stop_reason": reason, "usage": {"input_tokens": 1, "output_tokens": 0}})
        assert Anthropic("a").completion(data.encode()).finish == finish

    def test_stream_with_text_and_a_tool_call(self) -> None:
        """A Messages stream becomes text deltas, tool-call deltas with indexes, a finish and usage."""
        s = Anthropic("a").stream_parser()
        events = [
            {"type": "message_start", "message": {"usage": {"input_tokens": 12, "output_tokens": 1}}},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "ping"},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me"}},
            {"type": "content_block_stop", "index": 0},
            {"type": "content_block_start", "index": 1,
             "content_block": {"type": "tool_use", "id": "t9", "name": "weather", "input": {}}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"c":'}},
            {"type": "content_block_delta", "index": 1,
             "delta": {"type": "input_json_delta", "partial_json": '"Oslo"}'}},
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 20}},
            {"type": "message_stop"},
        ]
        pieces = [p for e in events for p in s.feed(e["type"], json.dumps(e))]
        message: dict[str, Any] = {}
        for p in pieces:
            if isinstance(p, Delta):
                merge_delta(message, p.fields)
        assert message == {"content": "Let me", "tool_calls": [
            {"id": "t9", "type": "function", "function": {"name": "weather", "arguments": '{"c":"Oslo"}'}}]}
        assert Finish("tool_calls") in pieces
        assert Tokens(prompt=12) in pieces
        assert Tokens(prompt=None, completion=20) in pieces
        assert s.done

    def test_streamed_tool_call_without_arguments_has_an_empty_object(self) -> None:
        """A tool_use block that ends with no argument text (Anthropic sends one empty input_json_delta) ends
        as ``{}``, as the whole answer's does; one that had arguments gets nothing more."""
        s = Anthropic("a").stream_parser()
        events = [
            {"type": "content_block_start", "index": 0,
             "content_block": {"type": "tool_use", "id": "t1", "name": "now", "input": {}}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}},
            {"type": "content_block_stop", "index": 0},
            {"type": "content_block_start", "index": 1,
             "content_block": {"type": "tool_use", "id": "t2", "name": "f", "input": {}}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
            {"type": "content_block_stop", "index": 1},
            {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_stop", "index": 2},
        ]
        message: dict[str, Any] = {}
        for p in (p for e in events for p in s.feed(e["type"], json.dumps(e))):
            assert isinstance(p, Delta)
            merge_delta(message, p.fields)
        assert [c["function"]["arguments"] for c in message["tool_calls"]] == ["{}", "{}"]

    def test_error_event(self) -> None:
        """An `error` event (overloaded) raises a retryable error; a rate limit one a 429."""
        with pytest.raises(UpstreamError) as exc:
            Anthropic("a").stream_parser().feed("error", '{"type":"error","error":{"type":"overloaded_error",'
                                                         '"message":"Overloaded"}}')
        assert exc.value.retryable
        with pytest.raises(UpstreamRateLimited):
            Anthropic("a").stream_parser().feed("error", '{"type":"error","error":{"type":"rate_limit_error"}}')


CACHED = {"type": "ephemeral"}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


class TestAnthropicPromptCaching:
    """``cache_control`` as LiteLLM users send it (on a part, a message or a tool) marks that block for
    Anthropic's prompt cache; cache writes are priced apart."""

    body = TestAnthropicRequest.body

    def test_parts_messages_system_and_tools_keep_their_marks(self) -> None:
        body = self.body(req(messages=[
            {"role": "system", "content": "A long manual.", "cache_control": CACHED},
            {"role": "user", "content": [{"type": "text", "text": "Context", "cache_control": {**CACHED, "ttl": "1h"}},
                                         {"type": "text", "text": "Question"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}],
             "cache_control": CACHED},
            {"role": "tool", "tool_call_id": "t1", "content": "found", "cache_control": CACHED},
            {"role": "user", "content": "and?", "cache_control": CACHED}],
            tools=[{**TOOL, "cache_control": CACHED}]))
        assert body["system"] == [{"type": "text", "text": "A long manual.", "cache_control": CACHED}]
        first, calls, results = body["messages"][:3]
        assert first["content"] == [{"type": "text", "text": "Context", "cache_control": {**CACHED, "ttl": "1h"}},
                                    {"type": "text", "text": "Question"}]
        assert calls["content"][-1] == {"type": "tool_use", "id": "t1", "name": "lookup", "input": {},
                                        "cache_control": CACHED}
        assert results["content"][0] == {"type": "tool_result", "tool_use_id": "t1", "content": "found",
                                         "cache_control": CACHED}
        assert results["content"][1] == {"type": "text", "text": "and?", "cache_control": CACHED}
        assert body["tools"][0]["cache_control"] == CACHED

    def test_unmarked_system_strings_stay_one_string(self) -> None:
        body = self.body(req(messages=[{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]))
        assert body["system"] == "a"
        assert "cache_control" not in body["messages"][0]["content"][0]

    @pytest.mark.parametrize(("kw", "param"), [
        ({"messages": [{"role": "user", "content": "x", "cache_control": {"type": "persistent"}}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": "yes"}]}]},
         "messages"),
        ({"messages": [{"role": "user", "content": "x", "cache_control": {**CACHED, "ttl": "1d"}}]}, "messages"),
        ({"tools": [{**TOOL, "cache_control": {"type": "ephemeral", "size": 3}}]}, "tools"),
    ])
    def test_a_cache_control_anthropic_would_refuse_is_a_400(self, kw: dict[str, Any], param: str) -> None:
        with pytest.raises(InvalidRequest) as exc:
            self.body(req(**kw))
        assert exc.value.param == param
        assert "ephemeral" in exc.value.message

    def test_cache_writes_are_priced_apart(self) -> None:
        """Anthropic's usage: input 10 + written 100 + read 50 = 160 prompt tokens; the written ones at the
        cache-write price, the read ones at the cached price, the rest at the input price."""
        usage = {"input_tokens": 10, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 50,
                 "output_tokens": 4}
        c = Anthropic("a").completion(json.dumps({"content": [], "stop_reason": "end_turn", "usage": usage}).encode())
        assert (c.prompt_tokens, c.cached_tokens, c.written_tokens) == (160, 50, 100)
        spec = ModelSpec(input_per_mtok=3, output_per_mtok=15, cached_input_per_mtok=0.3,
                         cache_write_input_per_mtok=3.75)
        assert spec.cost(160, 4, 50, 100) == pytest.approx((10 * 3 + 50 * 0.3 + 100 * 3.75 + 4 * 15) / 1e6)
        assert ModelSpec(input_per_mtok=3).cost(160, 0, 50, 100) == pytest.approx(160 * 3 / 1e6)  # no prices: input
        s = Anthropic("a").stream_parser()
        start = {"type": "message_start", "message": {"usage": usage}}
        assert s.feed("message_start", json.dumps(start)) == [Tokens(prompt=160, cached=50, written=100)]

    def test_an_hours_cache_writes_have_their_own_price(self) -> None:
        """Anthropic says how many of the writes are for an hour (``cache_creation``): they cost the one-hour
        price (2x input at Anthropic), the others the five-minute one; without a one-hour price, the same."""
        usage = {"input_tokens": 10, "cache_creation_input_tokens": 100, "output_tokens": 4,
                 "cache_creation": {"ephemeral_5m_input_tokens": 60, "ephemeral_1h_input_tokens": 40}}
        c = Anthropic("a").completion(json.dumps({"content": [], "stop_reason": "end_turn", "usage": usage}).encode())
        assert (c.prompt_tokens, c.written_tokens, c.written_1h_tokens) == (110, 100, 40)
        spec = ModelSpec(input_per_mtok=3, output_per_mtok=15, cache_write_input_per_mtok=3.75,
                         cache_write_1h_input_per_mtok=6)
        assert spec.cost(110, 4, 0, 100, 40) == pytest.approx((10 * 3 + 60 * 3.75 + 40 * 6 + 4 * 15) / 1e6)
        five = ModelSpec(input_per_mtok=3, output_per_mtok=15, cache_write_input_per_mtok=3.75)
        assert five.cost(110, 4, 0, 100, 40) == pytest.approx((10 * 3 + 100 * 3.75 + 4 * 15) / 1e6)
        start = {"type": "message_start", "message": {"usage": usage}}
        (tokens,) = Anthropic("a").stream_parser().feed("message_start", json.dumps(start))
        assert tokens == Tokens(prompt=110, written=100, written_1h=40)


class TestAnthropicThinking:
    """Extended thinking, as LiteLLM maps it: ``reasoning_effort`` or ``thinking`` in; ``reasoning_content``
    and ``thinking_blocks`` out; the blocks sent back on the next turn."""

    body = TestAnthropicRequest.body

    @pytest.mark.parametrize(("effort", "budget"), [("minimal", 1024), ("low", 1024), ("medium", 2048),
                                                    ("high", 4096)])
    def test_reasoning_effort_is_a_thinking_budget_on_top_of_the_answers_tokens(self, effort: str,
                                                                                budget: int) -> None:
        body = self.body(req(reasoning_effort=effort))
        assert body["thinking"] == {"type": "enabled", "budget_tokens": budget}
        assert body["max_tokens"] == SPEC.max_tokens + budget

    def test_the_callers_limit_counts_the_thinking(self) -> None:
        assert self.body(req(reasoning_effort="low", max_tokens=3000))["max_tokens"] == 3000
        for field in ("max_tokens", "max_completion_tokens"):
            with pytest.raises(InvalidRequest) as exc:
                self.body(req(reasoning_effort="medium", **{field: 2048}))
            assert exc.value.param == field
            assert "thinking budget (2048 tokens)" in exc.value.message

    def test_thinking_as_anthropic_takes_it_and_none(self) -> None:
        body = self.body(req(thinking={"type": "enabled", "budget_tokens": 1500}, max_tokens=4000))
        assert (body["thinking"], body["max_tokens"]) == ({"type": "enabled", "budget_tokens": 1500}, 4000)
        assert self.body(req(thinking={"type": "disabled"}))["thinking"] == {"type": "disabled"}
        assert "thinking" not in self.body(req(reasoning_effort="none"))
        assert "thinking" not in self.body(req())

    @pytest.mark.parametrize(("kw", "param"), [
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"thinking": True}, "thinking"),
        ({"thinking": {"type": "enabled"}}, "thinking"),
        ({"thinking": {"type": "enabled", "budget_tokens": "2k"}}, "thinking"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                                         "thinking_blocks": [{"type": "thinking", "thinking": "t"}]},
                       {"role": "user", "content": "c"}]}, "messages"),
    ])
    def test_what_anthropic_would_refuse_is_a_400(self, kw: dict[str, Any], param: str) -> None:
        with pytest.raises(InvalidRequest) as exc:
            self.body(req(**kw))
        assert exc.value.param == param

    def test_thinking_blocks_go_back_first_in_their_turn(self) -> None:
        blocks = [{"type": "thinking", "thinking": "Look it up.", "signature": "sig=="},
                  {"type": "redacted_thinking", "data": "opaque"}]
        body = self.body(req(reasoning_effort="low", messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "reasoning_content": "Look it up.", "thinking_blocks": blocks,
             "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "sunny"}]))
        assert body["messages"][1]["content"] == [*blocks, {"type": "tool_use", "id": "t1", "name": "w", "input": {}}]

    def test_whole_answer_has_reasoning_content_and_the_blocks(self) -> None:
        data = json.dumps({"content": [
            {"type": "thinking", "thinking": "Two plus two.", "signature": "abc"},
            {"type": "redacted_thinking", "data": "xyz"},
            {"type": "text", "text": "4"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 5, "output_tokens": 30}}).encode()
        c = Anthropic("a").completion(data)
        assert c.message == {"content": "4", "reasoning_content": "Two plus two.", "thinking_blocks": [
            {"type": "thinking", "thinking": "Two plus two.", "signature": "abc"},
            {"type": "redacted_thinking", "data": "xyz"}]}

    def test_stream_relays_thinking_then_each_block_whole(self) -> None:
        s = Anthropic("a").stream_parser()
        events = [
            {"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Two "}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "plus two."}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "abc"}},
            {"type": "content_block_stop", "index": 0},
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "4"}},
            {"type": "content_block_stop", "index": 1},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 30}},
            {"type": "message_stop"},
        ]
        deltas = [p.fields for e in events for p in s.feed(e["type"], json.dumps(e)) if isinstance(p, Delta)]
        assert deltas[:3] == [{"reasoning_content": "Two "}, {"reasoning_content": "plus two."},
                              {"thinking_blocks": [{"type": "thinking", "thinking": "Two plus two.",
                                                    "signature": "abc"}]}]
        message: dict[str, Any] = {}
        for fields in deltas:
            merge_delta(message, fields)
        assert message == {"reasoning_content": "Two plus two.", "content": "4", "thinking_blocks": [
            {"type": "thinking", "thinking": "Two plus two.", "signature": "abc"}]}


PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}


class TestAnthropicJsonAnswers:
    """``response_format`` JSON, as LiteLLM answers it with Claude: a tool whose input is the answer, which the
    model is made to call; its input comes back as the content, with finish reason ``stop``."""

    body = TestAnthropicRequest.body

    def test_a_schema_is_the_input_of_a_tool_the_model_must_call(self) -> None:
        body = self.body(req(response_format=JSON_SCHEMA))
        assert body["tools"] == [{"name": "json_answer", "description": "Give your answer, as the input of this tool.",
                                  "input_schema": PERSON}]
        assert body["tool_choice"] == {"type": "tool", "name": "json_answer"}
        assert self.body(req(response_format={"type": "json_object"}))["tools"][0]["input_schema"] == {
            "type": "object"}
        assert "tools" not in self.body(req(response_format={"type": "text"}))

    def test_with_the_callers_tools_the_model_calls_one_of_them_or_answers(self) -> None:
        body = self.body(req(response_format=JSON_SCHEMA, tools=[TOOL]))
        assert [t["name"] for t in body["tools"]] == ["lookup", "json_answer"]
        assert body["tool_choice"] == {"type": "any"}
        named = self.body(req(response_format=JSON_SCHEMA, tools=[TOOL],
                              tool_choice={"type": "function", "function": {"name": "lookup"}}))
        assert named["tool_choice"] == {"type": "tool", "name": "lookup"}
        none = self.body(req(response_format=JSON_SCHEMA, tools=[TOOL], tool_choice="none"))
        assert [t["name"] for t in none["tools"]] == ["json_answer"]
        assert none["tool_choice"] == {"type": "tool", "name": "json_answer"}

    def test_with_thinking_the_tool_is_offered_not_forced(self) -> None:
        """Anthropic refuses a forced tool call after thinking: the answer tool is then only offered."""
        body = self.body(req(response_format=JSON_SCHEMA, reasoning_effort="low"))
        assert [t["name"] for t in body["tools"]] == ["json_answer"]
        assert body["tool_choice"] == {"type": "auto"}
        mine = self.body(req(response_format=JSON_SCHEMA, reasoning_effort="low", tools=[TOOL]))
        assert [t["name"] for t in mine["tools"]] == ["lookup", "json_answer"]
        assert "tool_choice" not in mine  # auto, Anthropic's default
        assert self.body(req(response_format=JSON_SCHEMA, thinking={"type": "disabled"}))["tool_choice"] == {
            "type": "tool", "name": "json_answer"}

    def test_the_answer_tools_input_is_the_content(self) -> None:
        data = json.dumps({"content": [{"type": "tool_use", "id": "t", "name": "json_answer",
                                        "input": {"name": "Åsa"}}], "stop_reason": "tool_use",
                           "usage": {"input_tokens": 5, "output_tokens": 9}}).encode()
        c = Anthropic("a").completion(data, req(response_format=JSON_SCHEMA))
        assert (c.message, c.finish) == ({"content": '{"name": "Åsa"}'}, "stop")
        plain = Anthropic("a").completion(data, req())  # no JSON asked: a tool call like any other
        assert (plain.finish, plain.message["tool_calls"][0]["function"]["name"]) == ("tool_calls", "json_answer")

    def test_a_call_of_the_callers_tool_stays_a_tool_call(self) -> None:
        data = json.dumps({"content": [{"type": "tool_use", "id": "t", "name": "lookup", "input": {}}],
                           "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 9}}).encode()
        c = Anthropic("a").completion(data, req(response_format=JSON_SCHEMA, tools=[TOOL]))
        assert c.finish == "tool_calls"
        assert c.message["tool_calls"][0]["function"]["name"] == "lookup"

    @pytest.mark.parametrize("pieces", [['{"name":', ' "Åsa"}'], []])
    def test_streamed_the_answer_tools_input_is_the_contents_deltas(self, pieces: list[str]) -> None:
        s = Anthropic("a").stream_parser(1, req(response_format=JSON_SCHEMA, stream=True))
        events = [
            {"type": "content_block_start", "index": 0,
             "content_block": {"type": "tool_use", "id": "t", "name": "json_answer", "input": {}}},
            *({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": p}}
              for p in pieces),
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
        ]
        out = [p for e in events for p in s.feed(e["type"], json.dumps(e))]
        message: dict[str, Any] = {}
        for p in out:
            if isinstance(p, Delta):
                merge_delta(message, p.fields)
        assert message == {"content": "".join(pieces) or "{}"}
        assert Finish("stop") in out


class TestClassify:
    @pytest.mark.parametrize(("status", "info", "error", "retry"), [
        (400, ErrorInfo("too long", code="context_length_exceeded", param="messages"), InvalidRequest, False),
        (404, ErrorInfo("no such model"), ModelNotFound, False),
        (401, ErrorInfo("Incorrect API key provided: sk-abc"), UpstreamError, False),
        (429, ErrorInfo("quota", type="insufficient_quota"), UpstreamError, False),
        (429, ErrorInfo("slow down"), UpstreamRateLimited, True),
        (500, ErrorInfo("boom"), UpstreamError, True),
        (529, ErrorInfo("overloaded"), UpstreamError, True),
        (504, ErrorInfo("gateway timeout"), UpstreamTimeout, True),
        (302, ErrorInfo("moved"), UpstreamError, False),
        (418, ErrorInfo("teapot"), UpstreamError, False),
    ])
    def test_statuses(self, status: int, info: ErrorInfo, error: type[Exception], retry: bool) -> None:
        """Each provider status maps to one leafwire error, retried only when another try can help."""
        err = classify("p", "p/m", status, info, None)
        assert type(err) is error
        assert getattr(err, "retryable", False) is retry

    def test_client_error_keeps_the_providers_message_and_param(self) -> None:
        """A 400 tells the caller what the provider said, and which parameter."""
        err = classify("p", "p/m", 400, ErrorInfo("too long", code="context_length_exceeded", param="messages"), None)
        assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "messages")
        assert "too long" in err.message

    def test_refused_key_is_not_relayed(self) -> None:
        """The provider's 401 text (which may echo the key) is replaced by leafwire's own message."""
        err = classify("p", "p/m", 401, ErrorInfo("Incorrect API key provided: sk-abc"), None)
        assert "sk-abc" not in err.message
        assert err.code == "upstream_auth_failed"
