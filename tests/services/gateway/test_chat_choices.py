"""Chat completions with n > 1 at the gateway: the caller's request becomes one chat request per choice (pure
functions), the choices' answers one chat completion, and the bridge on a real nats-server against the fake
site: choices go out a few at a time, come back as one answer, stream interleaved, and fail or leave together."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from typing import Any

import pytest
from pydantic_core import to_json

from schemas.chat import HttpChatRequest, Usage
from services.gateway.chat_choices import ChatAnswers, plan
from services.gateway.choices import Choice
from shared.envelope import Envelope
from shared.errors import UpstreamError
from tests.services.gateway.fake_site import FakeSite, HttpClient, chat_chunk, chat_result, events, request_id, sent

ENV = Envelope("r1", "t1", "", 2e9)
BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 3}


def planned(**fields: Any) -> list[Choice]:
    body = {**BODY, **fields}
    return plan(HttpChatRequest.model_validate(body), to_json(body), ENV)


class TestPlan:
    def test_each_choice_is_the_request_without_n_with_its_own_id_and_seed(self) -> None:
        """n=3 with seed 40: three requests as sent but for n, ids r1-0..2, seeds 40, 41, 42."""
        choices = planned(seed=40, temperature=1.0, tools=[{"type": "function"}])
        assert [(c.index, c.env.request_id) for c in choices] == [(0, "r1-0"), (1, "r1-1"), (2, "r1-2")]
        assert [sent(c.body) for c in choices] == [
            {"model": "m", "messages": BODY["messages"], "seed": 40 + j, "temperature": 1.0,
             "tools": [{"type": "function"}]} for j in range(3)]

    def test_without_a_seed_none_is_added(self) -> None:
        """No seed: the choices are the same request, sampled apart by the model."""
        assert {c.body for c in planned()} == {to_json({"model": "m", "messages": BODY["messages"]})}

    def test_a_big_request_is_not_held_once_per_choice(self) -> None:
        """n=128 of a 1 MiB conversation: planning holds it about once, not 128 times (a few such requests took the
        gateway gigabytes, and building the copies stalled every other caller for seconds)."""
        body = {**BODY, "n": 128, "seed": 1, "messages": [{"role": "user", "content": "x" * 2**20}]}
        raw = to_json(body)
        request = HttpChatRequest.model_validate_json(raw)
        tracemalloc.start()
        try:
            choices = plan(request, raw, ENV)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(choices) == 128
        assert peak < 8 * 2**20
        assert sent(choices[127].body)["seed"] == 128


def with_fields(data: bytes, **fields: Any) -> bytes:
    return to_json({**json.loads(data), **fields})


class TestAnswers:
    def test_choices_are_ordered_usage_added_up_and_provider_fields_kept(self) -> None:
        """Answers in any order make one chat.completion with choices 0..n-1; what a provider adds stays."""
        merge = ChatAnswers("r1", 7)
        calls = json.loads(chat_result("two", usage=Usage.of(4, 5)))
        calls["choices"][0]["message"]["tool_calls"] = [{"id": "c1"}]
        answers = [merge.answered(Choice(1, b"", ENV), to_json(calls)),
                   merge.answered(Choice(0, b"", ENV), with_fields(chat_result("one"), service_tier="x"))]
        body = json.loads(merge.whole(answers))
        assert (body["id"], body["object"], body["created"], body["service_tier"]) == (
            "chatcmpl-r1", "chat.completion", 7, "x")
        assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [(0, "one"), (1, "two")]
        assert body["choices"][1]["message"]["tool_calls"] == [{"id": "c1"}]
        assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}

    def test_chunks_take_the_requests_id_and_their_choices_index(self) -> None:
        """Each chunk, the role chunk too, is the request's with its choice's index; a usage chunk is dropped."""
        merge = ChatAnswers("r1", 7)
        role = json.loads(merge.chunk(Choice(2, b"", ENV), chat_chunk(role=True))[6:])
        assert (role["id"], role["created"], role["choices"][0]["index"]) == ("chatcmpl-r1", 7, 2)
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        usage = with_fields(chat_chunk(), choices=[], usage=Usage.of(1, 1).model_dump())
        assert merge.chunk(Choice(1, b"", ENV), usage) == b""
        last = json.loads(merge.usage(Usage.of(1, 2))[6:])
        assert (last["choices"], last["usage"]["total_tokens"], last["model"]) == ([], 3, "m")

    def test_a_malformed_answer_is_a_502(self) -> None:
        """What is no chat answer, or one without a choice, fails the request as the site's fault."""
        for data in (b'{"id": "x"}', with_fields(chat_result("x"), choices=[])):
            with pytest.raises(UpstreamError):
                ChatAnswers("r1", 7).answered(Choice(0, b"", ENV), data)


def chat(client: HttpClient, **fields: Any) -> asyncio.Task[Any]:
    return asyncio.create_task(client.post("/v1/chat/completions", json={**BODY, **fields}))


class TestBridge:
    async def test_a_site_that_answers_every_choice_at_once_is_asked_once(self, client: HttpClient,
                                                                       site: FakeSite) -> None:
        """A whole request of n=3 goes out once, as sent; a site answering all three (an OpenAI-compatible
        cloud model) is relayed as it answered, cache header and all, and nothing more is asked."""
        reply = chat(client, seed=5)
        msg = await site.asked.next_msg(timeout=5)
        assert sent(msg.data) == {**BODY, "seed": 5}
        three = with_fields(chat_result("A"), choices=[
            {"index": j, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
            for j, t in enumerate("ABC")])
        await site.send(msg, "result", three, **{"Lw-Cache": "miss", "Lw-Route": "target=openai/m"})
        resp = await reply
        assert resp.status == 200
        assert [c["message"]["content"] for c in (await resp.json())["choices"]] == ["A", "B", "C"]
        assert (resp.headers["x-leafwire-cache"], resp.headers["x-leafwire-route"]) == ("miss", "target=openai/m")
        assert await site.nothing_more_asked()

    async def test_another_refusal_of_the_request_at_once_is_the_callers(self, client: HttpClient,
                                                                      site: FakeSite) -> None:
        """Refused for anything but answering one choice a request (a spent budget, say): the caller's error,
        not the choices asked one by one."""
        reply = chat(client)
        msg = await site.asked.next_msg(timeout=5)
        await site.fail(msg, status=429, param=None)
        resp = await reply
        assert resp.status == 429
        assert await site.nothing_more_asked()

    async def test_choices_go_out_two_at_a_time_and_make_one_answer(self, client: HttpClient,
                                                                    site: FakeSite) -> None:
        """n=3, two out at once, answered out of order: one chat.completion, choices 0..2, usage summed."""
        reply = chat(client, seed=5)
        (first, a), (second, b) = await site.next_choice(), await site.next_choice()
        assert await site.nothing_more_asked()
        assert ("n" in a, a["seed"], b["seed"]) == (False, 5, 6)
        await site.send(second, "result", chat_result("B"), **{"Lw-Route": "target=local/m"})
        await site.send(first, "result", chat_result("A"), **{"Lw-Route": "target=local/m", "Lw-Cache": "miss"})
        third, _ = await site.next_choice()
        await site.send(third, "result", chat_result("C"))
        resp = await reply
        assert resp.status == 200
        answer = await resp.json()
        assert [(c["index"], c["message"]["content"]) for c in answer["choices"]] == [(0, "A"), (1, "B"), (2, "C")]
        assert answer["usage"]["total_tokens"] == 15
        assert answer["id"] == f"chatcmpl-{resp.headers['x-request-id']}"
        assert resp.headers["x-leafwire-cache"] == "miss"  # the headers are choice 0's
        assert request_id(third) == f"{resp.headers['x-request-id']}-2"

    @pytest.mark.parametrize(("caches", "said"), [(("hit", "hit"), "hit"), (("hit", "miss"), "partial"),
                                                  (("miss", "hit"), "partial"), (("miss", "miss"), "miss")])
    async def test_a_whole_answer_partly_from_the_cache_says_partial(
            self, client: HttpClient, site: FakeSite, caches: tuple[str, str], said: str) -> None:
        """x-leafwire-cache of a whole answer of n choices: hit only when every choice was a hit, partial when
        some were (a cached answer is free: "hit" beside a paid choice would mislead), else choice 0's."""
        reply = chat(client, n=2)
        for cache, (msg, _) in zip(caches, [await site.next_choice(), await site.next_choice()], strict=True):
            await site.send(msg, "result", chat_result("A"), **{"Lw-Cache": cache})
        assert (await reply).headers["x-leafwire-cache"] == said

    async def test_n_1_is_one_request_as_sent(self, client: HttpClient, site: FakeSite) -> None:
        """n=1 goes down chat's own path: the caller's body as sent, under the request's own id."""
        reply = chat(client, n=1)
        msg, body = await site.next_choice()
        assert body == {**BODY, "n": 1}
        await site.send(msg, "result", chat_result("A"))
        resp = await reply
        assert request_id(msg) == resp.headers["x-request-id"]

    async def test_a_failing_choice_fails_the_request_and_cancels_the_choice_out(self, client: HttpClient,
                                                                                  site: FakeSite) -> None:
        """The second choice's 400 is the caller's answer, as chat's; the first is cancelled, the third never
        asked."""
        reply = chat(client)
        (first, _), (second, _) = await site.next_choice(), await site.next_choice()
        await site.fail(second)
        resp = await reply
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "messages"
        assert await site.cancelled(1) == {request_id(first)}
        assert await site.nothing_more_asked()

    async def test_streamed_choices_interleave_and_end_with_the_usage_of_all(self, client: HttpClient,
                                                                           site: FakeSite) -> None:
        """n=2 streamed: each choice's chunks as they come, role chunk first, with its index; then the usage.
        The headers are choice 0's: choice 1's chunks that come before its first reply wait for it."""
        reply = chat(client, n=2, stream=True, stream_options={"include_usage": True})
        (first, _), (second, _) = await site.next_choice(), await site.next_choice()
        await site.stream(second, "x")
        await asyncio.sleep(0.1)
        assert not reply.done()  # no headers before choice 0's first reply
        await site.send(first, "chunk", chat_chunk(role=True), **{"Lw-Route": "target=local/first"})
        await site.send(first, "chunk", chat_chunk("y"))
        resp = await reply
        assert resp.headers["x-leafwire-route"] == "target=local/first"
        await site.end(first)
        await site.end(second)
        *chunks, done = events(await resp.text())
        assert done == "[DONE]"
        parsed = [json.loads(c) for c in chunks]
        assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in parsed[:-1]] == [
            (1, {"role": "assistant", "content": ""}), (1, {"content": "x"}),
            (0, {"role": "assistant", "content": ""}), (0, {"content": "y"}), (0, {}), (1, {})]
        assert {c["id"] for c in parsed} == {f"chatcmpl-{resp.headers['x-request-id']}"}
        assert (parsed[-1]["choices"], parsed[-1]["usage"]["total_tokens"]) == ([], 10)

    async def test_a_caller_leaving_cancels_every_choice(self, client: HttpClient, site: FakeSite) -> None:
        """The caller gone mid-stream: every choice still out is cancelled at the site."""
        reply = chat(client, n=2, stream=True)
        (first, _), (second, _) = await site.next_choice(), await site.next_choice()
        await site.stream(first, "y")
        resp = await reply
        await resp.content.readuntil(b"\n\n")
        resp.close()
        assert await site.cancelled(2) == {request_id(first), request_id(second)}
