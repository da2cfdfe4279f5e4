"""Text completions at the gateway: how a request becomes chat requests, one per choice (pure functions), how
chat answers become a text completion, and the bridge on a real nats-server against a fake site: choices go out
a few at a time and come back in index order, streamed choices interleave, and a failing choice or a caller
leaving cancels the choices still out."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from typing import Any

import pytest

from schemas.chat import ChatCompletionChunk, Usage, choice_seed
from services.gateway.choices import Choice, total_usage
from services.gateway.completion_answer import TextAnswers, answered, for_prompt, whole
from services.gateway.completion_request import CompletionRequest, plan
from shared.envelope import Envelope
from shared.errors import ContextLengthExceeded, InvalidRequest, UpstreamError
from tests.services.gateway.fake_site import FakeSite, HttpClient, chat_chunk, chat_result, events, request_id, sent

ENV = Envelope("r1", "t1", "", 2e9)


def request(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


class TestPlan:
    def test_a_prompt_is_the_user_message_of_a_chat_request(self) -> None:
        """One prompt: one chat request under the caller's own id, the prompt its one user message, 16 tokens
        at most, every shared parameter kept and no completions-only one sent."""
        (choice,) = plan(request(temperature=0.5, stop="x", logit_bias={"5": 1}, user="u", echo=True, best_of=1,
                                 stream=True, stream_options={"include_usage": True}), ENV)
        assert (choice.index, choice.env) == (0, ENV)
        assert sent(choice.body) == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
                                     "temperature": 0.5, "stop": "x", "logit_bias": {"5": 1}, "user": "u",
                                     "stream": True, "stream_options": {"include_usage": True}}

    def test_max_completion_tokens_is_the_limit_not_a_second_one(self) -> None:
        """Chat's newer name for the limit, sent here, becomes max_tokens: never both (OpenAI refuses both)."""
        (choice,) = plan(request(max_completion_tokens=40), ENV)
        assert sent(choice.body)["max_tokens"] == 40
        assert "max_completion_tokens" not in sent(choice.body)

    def test_choices_are_numbered_prompt_by_prompt_with_their_own_ids_and_seeds(self) -> None:
        """Two prompts, n=3: choice i*3+j is prompt i's j-th, id <id>-<index>, seed 40+j."""
        choices = plan(request(prompt=["a", "b"], n=3, seed=40, max_tokens=5), ENV)
        assert [(c.index, sent(c.body)["messages"][0]["content"], c.env.request_id) for c in choices] == [
            (i * 3 + j, p, f"r1-{i * 3 + j}") for i, p in enumerate("ab") for j in range(3)]
        assert [sent(c.body)["seed"] for c in choices] == [40, 41, 42] * 2
        assert {sent(c.body)["max_tokens"] for c in choices} == {5}
        assert all("n" not in sent(c.body) for c in choices)

    def test_a_big_prompt_is_not_held_once_per_choice(self) -> None:
        """n=128 of a 1 MiB prompt: planning holds it about once, not 128 times (as chat's n)."""
        tracemalloc.start()
        try:
            choices = plan(request(prompt="x" * 2**20, n=128, seed=1), ENV)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(choices) == 128
        assert peak < 8 * 2**20
        assert sent(choices[127].body)["seed"] == 128

    def test_a_seed_stays_a_64_bit_integer(self) -> None:
        """The largest seed's next choice wraps round to the smallest, not past what providers take."""
        assert choice_seed(2**63 - 1, 1) == -(2**63)
        assert choice_seed(None, 3) is None

    @pytest.mark.parametrize("fields", [{"suffix": ""}, {"suffix": None}, {"logprobs": None}, {"best_of": 2, "n": 2},
                                        {"echo": False}, {"prompt": ""}])
    def test_values_that_ask_for_nothing_are_accepted(self, fields: dict[str, Any]) -> None:
        """An empty suffix, null logprobs and best_of equal to n are what many clients send: accepted."""
        assert plan(request(**fields), ENV)

    def test_a_chat_parameter_out_of_range_is_named(self) -> None:
        """Parameters shared with chat are checked as chat checks them."""
        with pytest.raises(InvalidRequest) as exc:
            plan(request(top_p=0), ENV)
        assert exc.value.param == "top_p"


class TestErrors:
    def test_the_messages_of_an_error_are_the_prompt(self) -> None:
        """A chat error about the messages names the prompt, its message too when it is about its length."""
        long = for_prompt(ContextLengthExceeded(model="m", context_length=10, prompt_tokens=8, max_tokens=16))
        assert (long.status, long.param, long.code) == (400, "prompt", "context_length_exceeded")
        assert "(8 in the prompt, 16 in the completion)" in long.message
        assert for_prompt(InvalidRequest("bad", param="messages.0.content")).param == "prompt"
        other = InvalidRequest("bad", param="temperature")
        assert for_prompt(other) is other


class TestAnswers:
    def test_choices_are_ordered_and_usage_added_up(self) -> None:
        """Answers arriving in any order make one text_completion in index order, usage summed with details."""
        a = answered(chat_result("one", usage=Usage.of(3, 2, cached=1)), 0, prefix="p:")
        b = answered(chat_result("two", usage=Usage.of(4, 5)), 1)
        body = json.loads(whole("r1", 7, [b, a]))
        assert (body["id"], body["object"], body["created"], body["model"]) == ("cmpl-r1", "text_completion", 7, "m")
        assert body["choices"] == [{"text": "p:one", "index": 0, "logprobs": None, "finish_reason": "stop"},
                                   {"text": "two", "index": 1, "logprobs": None, "finish_reason": "stop"}]
        assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14,
                                 "prompt_tokens_details": {"cached_tokens": 1}}

    def test_chunks_without_text_are_dropped(self) -> None:
        """The role chunk and a usage chunk make no text chunk; the echo prefix goes on the first one."""
        chunks = TextAnswers("r1", 7, ["say: "], n=3, echo=True)
        assert chunks.relay(chat_chunk(role=True), 0) == (b"", "m")
        usage = ChatCompletionChunk(id="x", created=1, model="m", choices=[], usage=Usage.of(1, 1))
        assert json.loads(chunks.chunk(Choice(2, b"", ENV), chat_chunk(role=True))[6:])["choices"] == [
            {"text": "say: ", "index": 2, "logprobs": None, "finish_reason": None}]
        assert json.loads(chunks.chunk(Choice(2, b"", ENV), chat_chunk("x"))[6:])["choices"][0]["text"] == "x"
        assert chunks.chunk(Choice(2, b"", ENV), usage.model_dump_json().encode()) == b""
        data, _ = chunks.relay(chat_chunk(finish="length"), 1)
        assert json.loads(data[6:])["choices"][0] == {"text": "", "index": 1, "logprobs": None,
                                                      "finish_reason": "length"}

    def test_a_malformed_answer_is_a_502(self) -> None:
        """What is no chat answer fails the request as the site's fault."""
        with pytest.raises(UpstreamError):
            answered(b'{"id": "x"}', 0)

    def test_total_usage_of_nothing_is_zero(self) -> None:
        """No usage is no tokens."""
        assert total_usage([]) == Usage.of(0, 0)


class TestBridge:
    async def test_choices_go_out_two_at_a_time_and_come_back_in_order(
            self, client: HttpClient, site: FakeSite) -> None:
        """Three prompts, two out at once, answered out of order: one text completion in prompt order."""
        reply = asyncio.create_task(client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b", "c"]}))
        first, second = await site.next_choice(), await site.next_choice()
        assert await site.nothing_more_asked()
        for msg, body in (second, first):
            await site.send(msg, "result", chat_result(body["messages"][0]["content"].upper()))
        third, body = await site.next_choice()
        await site.send(third, "result", chat_result(body["messages"][0]["content"].upper()))
        resp = await reply
        assert resp.status == 200
        answer = await resp.json()
        assert [(c["index"], c["text"]) for c in answer["choices"]] == [(0, "A"), (1, "B"), (2, "C")]
        assert answer["usage"]["total_tokens"] == 15
        assert answer["id"] == f"cmpl-{resp.headers['x-request-id']}"
        assert request_id(third) == f"{resp.headers['x-request-id']}-2"

    async def test_a_failing_choice_fails_the_request_and_cancels_the_choice_out(
            self, client: HttpClient, site: FakeSite) -> None:
        """The second choice's 400 is the caller's answer, naming the prompt; the first, still out, is
        cancelled at the site; the third is never asked."""
        reply = asyncio.create_task(client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b", "c"]}))
        (first, _), (second, _) = await site.next_choice(), await site.next_choice()
        await site.fail(second)
        resp = await reply
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "prompt"
        assert await site.cancelled(1) == {request_id(first)}
        assert await site.nothing_more_asked()

    async def test_streamed_choices_interleave_and_end_with_the_usage_of_all(
            self, client: HttpClient, site: FakeSite) -> None:
        """n=2 streamed: each choice's text comes as it is made, with its index; then one usage chunk, [DONE]."""
        reply = asyncio.create_task(client.post("/v1/completions", json={
            "model": "m", "prompt": "p", "n": 2, "echo": True, "stream": True,
            "stream_options": {"include_usage": True}}))
        (first, _), (second, _) = await site.next_choice(), await site.next_choice()
        await site.stream(second, "x")
        await asyncio.sleep(0.1)
        assert not reply.done()  # the headers are choice 0's: they wait for its first reply
        await site.stream(first, "y")
        resp = await reply
        assert resp.headers["x-leafwire-route"] == "target=local/m"

        async def chunk() -> list[tuple[int, str]]:
            return [(c["index"], c["text"]) for c in json.loads((await resp.content.readuntil(b"\n\n"))[6:])["choices"]]

        assert [await chunk(), await chunk()] == [[(1, "p")], [(1, "x")]]  # choice 1 first: it came first
        await site.end(first)
        assert [await chunk(), await chunk(), await chunk()] == [[(0, "p")], [(0, "y")], [(0, "")]]
        await site.end(second)
        *chunks, done = events(await resp.text())
        assert done == "[DONE]"
        parsed = [json.loads(c) for c in chunks]
        assert parsed[0]["choices"] == [{"text": "", "index": 1, "logprobs": None, "finish_reason": "stop"}]
        assert parsed[1]["choices"] == []
        assert parsed[1]["usage"]["total_tokens"] == 10

    async def test_an_error_mid_stream_ends_it_and_cancels_the_rest(
            self, client: HttpClient, site: FakeSite) -> None:
        """A choice failing after the stream began ends it with the error as an event; the other is cancelled."""
        reply = asyncio.create_task(client.post("/v1/completions", json={
            "model": "m", "prompt": ["a", "b"], "stream": True}))
        (first, _), (second, _) = await site.next_choice(), await site.next_choice()
        await site.stream(first, "y")
        await site.fail(second, 502, param=None)
        resp = await reply
        assert resp.status == 200
        *chunks, last = events(await resp.text())
        assert [json.loads(c)["choices"][0]["text"] for c in chunks] == ["y"]
        assert json.loads(last)["error"]["message"] == "no"
        assert await site.cancelled(1) == {request_id(first)}

    async def test_an_error_before_any_chunk_is_the_status(
            self, client: HttpClient, site: FakeSite) -> None:
        """A streamed request refused before it began gets the refusal's status and Retry-After, not a stream."""
        reply = asyncio.create_task(client.post("/v1/completions", json={"model": "m", "prompt": "a",
                                                                           "stream": True}))
        msg, _ = await site.next_choice()
        await site.fail(msg, 429, param=None, **{"Lw-Retry-After": "2"})
        resp = await reply
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "2"
        assert resp.headers["content-type"].startswith("application/json")
