"""Requests near the size NATS can carry, on the real stack: each gets its own clear answer, and the site keeps
serving. (A body the gateway accepts can be over NATS's max_payload once leafwire's headers are added, and a
batch of big requests can be over it together: a server given such a message closes the connection for good,
and a batcher's dispatching for the model died with it.)"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import Stack

LIMIT = 8 * 1024 * 1024  # the gateway's LW_GATEWAY_MAX_BODY_BYTES and the test server's max_payload


def body_of(size: int) -> bytes:
    """A chat request of exactly ``size`` bytes."""
    frame = {"model": "tiny", "messages": [{"role": "user", "content": ""}], "max_tokens": 2}
    pad = size - len(json.dumps(frame).encode())
    frame["messages"][0]["content"] = "a " * (pad // 2) + "a" * (pad % 2)
    raw = json.dumps(frame).encode()
    assert len(raw) == size
    return raw


def post(stack: Stack, raw: bytes) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/chat/completions", content=raw, timeout=60,
                      headers={"Content-Type": "application/json"})


def still_serves(stack: Stack) -> None:
    r = stack.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2, timeout=30)
    assert r.usage is not None
    assert r.usage.completion_tokens == 2


def test_a_body_at_the_limit_is_413_and_the_gateway_keeps_serving(stack: Stack) -> None:
    """A body of exactly the gateway's limit is accepted over HTTP but cannot travel with its headers: a 413
    that says so, at once; the next requests are answered (the gateway was cut off from NATS for good)."""
    r = post(stack, body_of(LIMIT))
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["code"] == "request_too_large"
    assert "max_payload" in error["message"]
    still_serves(stack)
    assert httpx.get(f"{stack.base_url.removesuffix('/v1')}/readyz", timeout=10).status_code == 200


def test_big_requests_together_each_get_their_answer_and_the_queue_goes_on(stack: Stack) -> None:
    """Three requests of half the limit at once fit NATS one by one, not as one batch: each is answered on
    its own (here: too long for the tiny model's context), and the model's queue keeps serving."""
    raw = body_of(LIMIT // 2 + 100_000)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: post(stack, raw), range(3)))
    assert [a.status_code for a in answers] == [400] * 3
    assert {a.json()["error"]["code"] for a in answers} == {"context_length_exceeded"}
    still_serves(stack)
