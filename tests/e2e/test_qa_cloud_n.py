"""QA of chat ``n`` in one cloud call, the cloud embeddings cache and strict float parameters, end to end.

The stack is test_cloud.py's (its fixture, started again for this module): the official openai client or
httpx -> gateway -> router -> the hub's cloud-adapter -> the fake providers of tests/fakes.py. Tests marked
what an OpenAI or LiteLLM user expects of them, found wrong by QA and fixed, and behaviour checked correct that
no other test covers.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import nats
import pytest

from tests.e2e import test_cloud
from tests.e2e.test_cloud import CloudStack, usage_event
from tests.fakes import Fault, vector
from tests.support import eventually, tag

pytestmark = pytest.mark.e2e
cloud = test_cloud.cloud  # the same stack as test_cloud.py's, for this module
fresh_fakes = test_cloud._fresh_fakes
HEADERS = {"Authorization": "Bearer key-acme"}



def post(cloud: CloudStack, path: str, body: dict[str, Any], key: str = "key-acme") -> httpx.Response:
    return httpx.post(f"{cloud.gateway.base}/v1/{path}", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"})


def completion(choices: list[dict[str, Any]], prompt: int = 2, completion_tokens: int = 4) -> dict[str, Any]:
    """A provider's whole ``chat.completion`` holding ``choices`` as given."""
    return {"id": "chatcmpl-raw", "object": "chat.completion", "created": int(time.time()), "model": "echo-1",
            "choices": choices, "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt + completion_tokens}}


def text_choice(index: int, text: str) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}


class TestChoicesInOneCall:
    def test_usage_keeps_cached_and_reasoning_token_details(self, cloud: CloudStack) -> None:
        """A whole n: 2 answer reports the provider's cached prompt tokens and reasoning tokens, as n: 1 does."""
        cloud.openai_fake.script(Fault.ok(prompt_tokens_details={"cached_tokens": 2},
                                          completion_tokens_details={"reasoning_tokens": 1}), Fault.ok("second"))
        r = post(cloud, "chat/completions", {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}],
                                             "n": 2})
        assert r.status_code == 200, r.text
        assert [c.body["n"] for c in cloud.openai_fake.calls] == [2]
        usage = r.json()["usage"]
        assert (usage.get("prompt_tokens_details") or {}).get("cached_tokens") == 2
        assert (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") == 1

    def test_a_partial_hit_with_a_seed_does_not_ask_choice_0s_seed_again(self, cloud: CloudStack) -> None:
        """Choice 0 stored (n: 1, seed 7); n: 3 asks the provider for choices 1 and 2 only, and not with seed 7,
        whose first sample is the stored choice 0 (choice j is seed + j, as the fan-out asks it)."""
        body = {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}], "cache": True,
                "temperature": 1, "seed": 7}
        assert post(cloud, "chat/completions", body).status_code == 200
        r = post(cloud, "chat/completions", {**body, "n": 3})
        assert r.status_code == 200, r.text
        assert r.headers["x-leafwire-cache"] == "partial"
        _, call = cloud.openai_fake.calls
        assert call.body["n"] == 2
        assert call.body.get("seed") != 7

    @pytest.mark.parametrize("answer", ["one choice", "400 on n"])
    def test_a_provider_without_n_still_answers_every_choice(self, cloud: CloudStack, answer: str) -> None:
        """Many OpenAI-compatible servers have no n: one answers a single choice, another refuses n with a
        400 naming it. The caller still gets its two choices (one call a choice), as before one call with n."""
        fault = (Fault.raw(200, completion([text_choice(0, "only one")])) if answer == "one choice" else
                 Fault.error(400, {"error": {"message": "'n' : number must be at most 1", "type":
                                             "invalid_request_error", "param": "n", "code": None}}))
        cloud.openai_fake.script(fault)  # the call with n; the calls without it are answered
        r = post(cloud, "chat/completions", {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}],
                                             "n": 2})
        assert r.status_code == 200, r.text
        assert [c["index"] for c in r.json()["choices"]] == [0, 1]
        assert [c.body.get("n") for c in cloud.openai_fake.calls] == [2, None, None]  # not retried with n

    def test_tokens_billed_for_one_choice_of_n_are_accounted(self, cloud: CloudStack) -> None:
        """A provider answering 1 choice for n: 2 (and billing it): not retried, the choices are then asked a
        call each, and the usage event of the call with n counts what the provider billed, as the budgets do."""
        wrong = Fault.raw(200, completion([text_choice(0, "only one")], prompt=2, completion_tokens=2))
        cloud.openai_fake.script(wrong)
        r = post(cloud, "chat/completions", {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}],
                                             "n": 2})
        assert r.status_code == 200, r.text
        assert [c.body.get("n") for c in cloud.openai_fake.calls] == [2, None, None]
        event = eventually(lambda: usage_event(cloud, r.headers["x-request-id"]), 10, "the usage event")
        assert (event["prompt_tokens"], event["completion_tokens"]) == (2, 2)
        assert event["cost_usd"] > 0

    @pytest.mark.parametrize("seed", [
        5,
        2**63 - 1,  # seed + j wraps to a signed 64-bit integer on both paths alike
    ])
    def test_a_streamed_request_reads_the_choices_one_call_stored(self, cloud: CloudStack, seed: int) -> None:
        """n: 2 whole (one call) stores choice j as the request of its own for it (seed + j); the same request
        streamed, asked choice by choice, finds both entries: no provider call."""
        body = {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}], "cache": True,
                "temperature": 1, "seed": seed, "n": 2}
        cloud.openai_fake.script(Fault.ok("one"), Fault.ok("two"))
        assert post(cloud, "chat/completions", body).status_code == 200
        with httpx.stream("POST", f"{cloud.gateway.base}/v1/chat/completions", json={**body, "stream": True},
                          headers=HEADERS, timeout=30) as r:
            text = "".join(r.iter_text())
        assert "[DONE]" in text
        assert len(cloud.openai_fake.calls) == 1

    def test_tool_calls_finish_reasons_and_logprobs_stay_with_their_choice(self, cloud: CloudStack) -> None:
        """Each choice of one call keeps its own message fields, finish reason and logprobs, put at its index
        whatever order the provider listed them in."""
        call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": 1}"}}
        logprobs = {"content": [{"token": "x", "logprob": -0.5, "bytes": [120], "top_logprobs": []}]}
        raw = [{"index": 2, "message": {"role": "assistant", "content": "cut"}, "finish_reason": "length",
                "logprobs": logprobs},
               {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls", "logprobs": None},
               {"index": 1, "message": {"role": "assistant", "content": None, "refusal": "no"},
                "finish_reason": "content_filter", "logprobs": None}]
        cloud.openai_fake.script(Fault.raw(200, completion(raw)))
        r = post(cloud, "chat/completions", {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}],
                                             "n": 3, "logprobs": True, "tools": [{"type": "function", "function": {
                                                 "name": "lookup", "parameters": {"type": "object"}}}]})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["finish_reason"] for c in choices] == ["tool_calls", "content_filter", "length"]
        assert choices[0]["message"]["tool_calls"] == [call]
        assert choices[0]["message"]["content"] is None
        assert choices[1]["message"]["refusal"] == "no"
        assert choices[2]["logprobs"] == logprobs
        (sent,) = cloud.openai_fake.calls
        assert (sent.body["n"], sent.body["logprobs"], sent.body["tools"][0]["function"]["name"]) == (3, True,
                                                                                                     "lookup")

    def test_n_128_is_one_call_and_usage_counts_the_prompt_once(self, cloud: CloudStack) -> None:
        """The most choices, 128, are one provider call; the usage and the usage event count the prompt once and
        every choice's completion; 129 is a 400 naming n, before any call."""
        r = post(cloud, "chat/completions", {"model": "fake/echo", "messages": [{"role": "user", "content": "hi"}],
                                             "n": 128})
        assert r.status_code == 200, r.text
        assert [c["index"] for c in r.json()["choices"]] == list(range(128))
        assert [c.body["n"] for c in cloud.openai_fake.calls] == [128]
        assert (r.json()["usage"]["prompt_tokens"], r.json()["usage"]["completion_tokens"]) == (1, 2 * 128)
        event = eventually(lambda: usage_event(cloud, r.headers["x-request-id"]), 10, "the usage event")
        assert (event["prompt_tokens"], event["completion_tokens"]) == (1, 256)
        too_many = post(cloud, "chat/completions", {"model": "fake/echo", "messages": [{"role": "user",
                                                                                       "content": "hi"}], "n": 129})
        assert too_many.status_code == 400
        assert too_many.json()["error"]["param"] == "n"
        assert len(cloud.openai_fake.calls) == 1

    def test_a_provider_answering_more_choices_is_502_after_its_retries(self, cloud: CloudStack) -> None:
        """Three choices for n: 2, or indexes that are not 0..n-1: a bad response, retried, then a 502."""
        more = Fault.raw(200, completion([text_choice(j, f"c{j}") for j in range(3)]))
        bad_index = Fault.raw(200, completion([text_choice(0, "a"), text_choice(5, "b")]))
        cloud.openai_fake.script(more, bad_index, more)
        r = post(cloud, "chat/completions", {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}],
                                             "n": 2})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_bad_response"
        assert len(cloud.openai_fake.calls) == 3

    async def test_a_nats_client_over_128_or_to_anthropic_is_refused(self, cloud: CloudStack) -> None:
        """Over NATS, n: 129 is a 400 naming n, and n: 2 to an Anthropic model `n_unsupported`: no call."""
        nc = await nats.connect(cloud.nats.url)
        try:
            answers = [await nc.request("lw.v1.plant.chat", json.dumps(body).encode(), timeout=10,
                                        headers={"Lw-Tenant": "acme"})
                       for body in ({"model": "fake/echo", "messages": [{"role": "user", "content": "x"}], "n": 129},
                                    {"model": "claude/haiku", "messages": [{"role": "user", "content": "x"}], "n": 2})]
        finally:
            await nc.drain()
        errors = [json.loads(a.data)["error"] for a in answers]
        assert errors[0]["param"] == "n"
        assert errors[1]["code"] == "n_unsupported"
        assert cloud.openai_fake.calls == cloud.claude_fake.calls == []


class TestEmbeddingsCache:
    def test_other_provider_parameters_are_another_vector(self, cloud: CloudStack) -> None:
        """Fields the provider gets (``input_type``, as LiteLLM sends for Cohere-style and NVIDIA models) change
        the vector: another value is asked of the provider, not taken from the cache."""
        text = tag()
        for kind in ("query", "passage"):
            r = post(cloud, "embeddings", {"model": "fake/embed", "input": [text], "input_type": kind,
                                           "encoding_format": "float"})
            assert r.status_code == 200, r.text
        assert [c.body.get("input_type") for c in cloud.openai_fake.calls] == ["query", "passage"]

    def test_an_input_repeated_in_one_request_is_asked_once(self, cloud: CloudStack) -> None:
        """[a, b, a]: the provider gets a and b once each; the answer has a's vector at 0 and 2."""
        a, b = tag(), tag()
        r = post(cloud, "embeddings", {"model": "fake/embed", "input": [a, b, a], "encoding_format": "float"})
        assert r.status_code == 200, r.text
        assert [d["embedding"] for d in r.json()["data"]] == [vector(a), vector(b), vector(a)]
        assert [c.body["input"] for c in cloud.openai_fake.calls] == [[a, b]]

    def test_inputs_masked_alike_share_the_vector_of_what_was_sent(self, cloud: CloudStack) -> None:
        """Two inputs differing only in an e-mail address are masked to the same text before the provider: the
        second is a hit on the masked text's vector, and no address reaches the provider or the answer."""
        words = tag()
        first = post(cloud, "embeddings", {"model": "fake/embed", "input": [f"{words} mail ann@example.com"],
                                           "encoding_format": "float"})
        again = post(cloud, "embeddings", {"model": "fake/embed", "input": [f"{words} mail bob@example.org"],
                                           "encoding_format": "float"})
        (call,) = cloud.openai_fake.calls
        assert call.body["input"] == [f"{words} mail [EMAIL]"]
        assert (first.headers["x-leafwire-cache"], again.headers["x-leafwire-cache"]) == ("miss", "hit")
        assert again.json()["data"][0]["embedding"] == vector(f"{words} mail [EMAIL]")
        assert "example" not in again.text

    def test_a_hit_is_the_same_bytes_in_base64_and_keeps_input_order(self, cloud: CloudStack) -> None:
        """A base64 hit gives back the very strings the provider first sent, each at its input's index, also
        when the stored inputs come in another order; its usage is the miss's."""
        texts = [tag() for _ in range(3)]
        first = post(cloud, "embeddings", {"model": "fake/embed", "input": texts, "encoding_format": "base64"})
        again = post(cloud, "embeddings", {"model": "fake/embed", "input": texts[::-1], "encoding_format": "base64"})
        assert again.headers["x-leafwire-cache"] == "hit"
        assert [d["embedding"] for d in again.json()["data"]] == [d["embedding"] for d in first.json()["data"]][::-1]
        assert [d["index"] for d in again.json()["data"]] == [0, 1, 2]
        assert again.json()["usage"] == first.json()["usage"]
        assert len(cloud.openai_fake.calls) == 1


class TestStrictParameters:
    def test_a_string_temperature_is_400_on_every_chat_path(self, cloud: CloudStack) -> None:
        """"0.5" as temperature is a 400 naming it for chat with n (before anything is asked) and for text
        completions; an integer temperature (1) passes, as OpenAI takes it."""
        chat = {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}], "n": 2}
        bad_chat = post(cloud, "chat/completions", {**chat, "temperature": "0.5"})
        bad_text = post(cloud, "completions", {"model": "fake/echo", "prompt": "x", "temperature": "0.5"})
        for r in (bad_chat, bad_text):
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "temperature"
        assert cloud.openai_fake.calls == []
        assert post(cloud, "chat/completions", {**chat, "temperature": 1}).status_code == 200
