"""Chat completions end to end: the official openai client -> gateway -> router -> local-inference.

The fixture model is a tiny random Llama decoded greedily: its text is gibberish but deterministic, so
these tests check mechanics a user notices (shape, streaming, limits, stops, errors, cancellation).
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Stack
from tests.support import eventually, metric

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "Why did line 3 stop on the 3rd?"}]


def complete(stack: Stack, **kwargs: object) -> openai.types.chat.ChatCompletion:
    return stack.client().chat.completions.create(model="tiny", messages=MESSAGES, **kwargs)  # type: ignore[call-overload,no-any-return]


class TestNonStreaming:
    def test_answer_has_openai_shape_and_usage(self, stack: Stack) -> None:
        """A plain request gets a chat.completion with text, a finish reason and token usage."""
        r = complete(stack, max_tokens=8)
        assert r.object == "chat.completion"
        assert r.id.startswith("chatcmpl-")
        assert r.model == "tiny"
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content
        assert r.choices[0].finish_reason == "length"
        assert r.usage is not None
        assert r.usage.completion_tokens == 8
        assert r.usage.prompt_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + 8

    def test_max_tokens_bounds_the_answer(self, stack: Stack) -> None:
        """A longer max_tokens gives a longer answer that starts with the shorter one (greedy decoding)."""
        short = complete(stack, max_tokens=4).choices[0].message.content or ""
        long = complete(stack, max_tokens=12)
        assert long.usage is not None
        assert long.usage.completion_tokens == 12
        assert (long.choices[0].message.content or "").startswith(short)
        assert len(long.choices[0].message.content or "") > len(short)

    def test_stop_sequence_cuts_the_answer(self, stack: Stack) -> None:
        """The answer ends right before the first stop sequence, which is not included."""
        full = complete(stack, max_tokens=24).choices[0].message.content or ""
        stop = full[len(full) // 2: len(full) // 2 + 3]
        r = complete(stack, max_tokens=24, stop=[stop, "never-appears"])
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == full[: full.index(stop)]

    def test_response_headers_name_request_route_and_worker(self, stack: Stack) -> None:
        """Each answer carries its request id, the routing decision and the worker that served it."""
        raw = stack.client().chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES,
                                                                         max_tokens=2)
        assert len(raw.headers["x-request-id"]) == 32
        assert raw.headers["x-leafwire-route"].startswith("target=local/tiny")
        assert raw.headers["x-leafwire-served-by"].startswith("edge1/li-")
        assert raw.parse().id == f"chatcmpl-{raw.headers['x-request-id']}"


class TestStreaming:
    def test_stream_matches_the_non_streamed_answer(self, stack: Stack) -> None:
        """Streamed deltas add up to the same text; the role comes first, the finish reason last."""
        whole = complete(stack, max_tokens=10).choices[0].message.content
        chunks = list(stack.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10,
                                                              stream=True))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
        assert chunks[-1].choices[0].finish_reason == "length"
        assert all(c.usage is None for c in chunks)
        assert len({c.id for c in chunks}) == 1

    def test_include_usage_adds_a_final_usage_chunk(self, stack: Stack) -> None:
        """With stream_options.include_usage the last chunk has no choices and the usage."""
        chunks = list(stack.client().chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 6
        assert chunks[-2].choices[0].finish_reason == "length"

    def test_stop_sequence_in_a_stream(self, stack: Stack) -> None:
        """A streamed answer never shows any part of the stop sequence."""
        full = complete(stack, max_tokens=30).choices[0].message.content or ""
        stop = full[10:14]
        chunks = list(stack.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30,
                                                              stop=stop, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[: full.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"

    def test_sse_wire_format_ends_with_done(self, stack: Stack) -> None:
        """The raw stream is server-sent events, one JSON chunk per `data:` line, ending `data: [DONE]`."""
        with httpx.stream("POST", f"{stack.base_url}/chat/completions", timeout=30,
                          json={"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line for line in r.iter_lines() if line]
        assert all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]"
        assert len(events) == 1 + 3 + 1 + 1  # role chunk, 3 tokens, finish chunk, [DONE]


class TestDisconnect:
    def test_client_going_away_frees_the_worker(self, stack: Stack) -> None:
        """Closing a stream mid-answer stops its generation; the worker goes back to idle at once."""
        before = metric(stack.worker.metrics(), "leafwire_generations_total", model="tiny",
                        finish_reason="cancelled")
        tokens_before = metric(stack.worker.metrics(), "leafwire_completion_tokens_total", model="tiny")
        with httpx.stream("POST", f"{stack.base_url}/chat/completions", timeout=30,
                          json={"model": "tiny", "messages": MESSAGES, "max_tokens": 15000, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
        eventually(lambda: metric(stack.worker.metrics(), "leafwire_generations_total", model="tiny",
                                  finish_reason="cancelled") == before + 1, 10, "the row to be cancelled")
        eventually(lambda: metric(stack.worker.metrics(), "leafwire_active_rows", model="tiny") == 0, 10,
                   "no active rows")
        generated = metric(stack.worker.metrics(), "leafwire_completion_tokens_total", model="tiny") - tokens_before
        assert generated < 15000
        assert complete(stack, max_tokens=3).usage.completion_tokens == 3  # type: ignore[union-attr]


class TestSampling:
    def test_same_seed_same_answer(self, stack: Stack) -> None:
        """Sampling with a seed is reproducible; another seed gives another answer."""
        def sample(seed: int) -> str:
            r = complete(stack, max_tokens=24, temperature=1.0, top_p=0.95, seed=seed)
            return r.choices[0].message.content or ""

        assert sample(7) == sample(7)
        assert sample(7) != sample(8)

    def test_temperature_zero_is_greedy(self, stack: Stack) -> None:
        """temperature 0 gives the model's single most likely answer, every time."""
        answers = {complete(stack, max_tokens=16, temperature=0).choices[0].message.content for _ in range(3)}
        assert len(answers) == 1


def refusal(stack: Stack, **body: object) -> dict[str, object]:
    """The error body of a request the local model must refuse (and the status must be 400)."""
    with pytest.raises(openai.BadRequestError) as exc:
        stack.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, extra_body=body)
    assert exc.value.status_code == 400
    return dict(exc.value.body)  # type: ignore[arg-type]


class TestPenalties:
    def test_frequency_penalty_changes_the_greedy_answer(self, stack: Stack) -> None:
        """A strong frequency_penalty steers the greedy answer elsewhere, the same way every time."""
        plain = complete(stack, max_tokens=24, temperature=0).choices[0].message.content
        penalised = {complete(stack, max_tokens=24, temperature=0, frequency_penalty=2.0).choices[0].message.content
                     for _ in range(2)}
        assert len(penalised) == 1
        assert penalised != {plain}

    def test_presence_penalty_changes_the_greedy_answer(self, stack: Stack) -> None:
        """A strong presence_penalty steers the greedy answer elsewhere too."""
        plain = complete(stack, max_tokens=24, temperature=0).choices[0].message.content
        assert complete(stack, max_tokens=24, temperature=0, presence_penalty=2.0).choices[0].message.content != plain

    def test_logit_bias_forces_a_token(self, stack: Stack) -> None:
        """A +100 logit_bias on one token makes the answer that token, over and over."""
        text = complete(stack, max_tokens=8, temperature=0, logit_bias={"5": 100}).choices[0].message.content or ""
        assert len(text) == 8
        assert len(set(text)) == 1

    @pytest.mark.parametrize("bias", [{"10000": 1}, {"-1": 1}, {"five": 1}, {"5": 101}, {"5": "up"}])
    def test_a_bad_logit_bias_is_a_400(self, stack: Stack, bias: object) -> None:
        """A token the model lacks, a key that is no token id, or a bias outside -100..100 is a 400 naming it."""
        assert refusal(stack, logit_bias=bias)["param"] == "logit_bias"


class TestUnhonouredParameters:
    @pytest.mark.parametrize(("field", "value"), [
        ("logprobs", True),
        ("top_logprobs", 2),
        ("response_format", {"type": "json_object"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
        ("tool_choice", "required"),
        ("tool_choice", {"type": "function", "function": {"name": "f"}}),
        ("functions", [{"name": "f", "parameters": {"type": "object", "properties": {}}}]),
        ("function_call", {"name": "f"}),
        ("modalities", ["text", "audio"]),
        ("reasoning_effort", "low"),
        ("web_search_options", {}),
        ("top_k", 5),  # not OpenAI's: refused as OpenAI refuses it, not ignored
    ])
    def test_a_parameter_the_local_model_ignores_is_a_400(self, stack: Stack, field: str, value: object) -> None:
        """A parameter the local model cannot honour is refused, naming it, instead of answered as if absent."""
        err = refusal(stack, **{field: value})
        assert (err["param"], err["type"], err["code"]) == (field, "invalid_request_error", "unsupported_parameter")
        assert "local model tiny" in str(err["message"])

    def test_a_refused_stream_is_a_400_before_any_chunk(self, stack: Stack) -> None:
        """Asking for JSON mode in a stream is refused with a 400 too, not a stream of free text."""
        r = httpx.post(f"{stack.base_url}/chat/completions", timeout=30, json={
            "model": "tiny", "messages": MESSAGES, "max_tokens": 4, "stream": True,
            "response_format": {"type": "json_object"}})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "response_format"

    def test_default_values_are_accepted(self, stack: Stack) -> None:
        """The defaults many clients send anyway ask for nothing and get the plain answer."""
        plain = complete(stack, max_tokens=12, temperature=0).choices[0].message.content
        r = complete(stack, max_tokens=12, temperature=0, logprobs=False, top_logprobs=0,
                     response_format={"type": "text"}, tool_choice="none", tools=[], presence_penalty=0,
                     frequency_penalty=0, logit_bias={}, parallel_tool_calls=False, user="bob", store=False,
                     metadata={"a": "b"}, service_tier="auto", modalities=["text"],
                     extra_body={"functions": [], "function_call": "none", "audio": None})
        assert r.choices[0].message.content == plain
        assert complete(stack, max_tokens=12, temperature=0, tool_choice="auto").choices[0].message.content == plain
