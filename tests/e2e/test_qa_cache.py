"""QA of the cloud adapter's exact-match answer cache (KV bucket ``cloud-cache`` and the in-memory near cache),
as a caller over HTTP notices it: what a hit gives back, what is stored and for how long, the header.

Most tests run on tests/e2e/test_cloud.py's stack (``fake/echo``: an OpenAI-compatible fake, ``claude/haiku``:
an Anthropic fake). Tests of cache settings (TTL, sizes) start a stack of their own on a nats-server of their
own, so that the bucket they shape is theirs alone. QA found six bugs, fixed since: a hit lost the answer's
``system_fingerprint``; a stream asked choice by choice said ``hit`` when only its first choice was one; the
near cache outlived LW_CLOUD_CACHE_TTL_S; a raised LW_CLOUD_CACHE_MAX_ENTRY_BYTES was not applied to the
bucket; a full bucket refused new answers instead of dropping the oldest; a model pointed at another upstream
model was answered from the old one's entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from tests.e2e.test_cloud import API_KEYS, CloudStack, cloud_stack, providers_file
from tests.fakes import Fault
from tests.support import NatsServer, eventually, start_single, tag

pytestmark = pytest.mark.e2e
HEADERS = {"Authorization": "Bearer key-acme"}


@pytest.fixture(scope="module")
def cloud(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudStack]:
    with cloud_stack(nats_server, tmp_path_factory.mktemp("qa-cache"), LW_CLOUD_N_RECHECK_S="0") as stack:
        yield stack


@pytest.fixture(autouse=True)
def _fresh_fakes(request: pytest.FixtureRequest) -> None:
    if "cloud" in request.fixturenames:
        stack: CloudStack = request.getfixturevalue("cloud")
        stack.openai_fake.reset()
        stack.claude_fake.reset()


@contextlib.contextmanager
def own_stack(tmp: Path, **adapter_env: str) -> Iterator[CloudStack]:
    """A cloud stack on a nats-server of its own (its own ``cloud-cache`` bucket), stopped on leaving."""
    (tmp / "nats").mkdir(exist_ok=True)
    (tmp / "stack").mkdir(exist_ok=True)
    server = start_single(tmp / "nats")
    try:
        with cloud_stack(server, tmp / "stack", providers_file, API_KEYS, LW_CLOUD_N_RECHECK_S="0",
                         **adapter_env) as stack:
            yield stack
    finally:
        server.stop()


def post(stack: CloudStack, body: dict[str, Any], path: str = "chat/completions") -> httpx.Response:
    return httpx.post(f"{stack.gateway.base}/v1/{path}", json=body, headers=HEADERS, timeout=20)


def streamed(stack: CloudStack, body: dict[str, Any], path: str = "chat/completions") -> tuple[str | None, list[Any]]:
    """A streamed request's ``x-leafwire-cache`` header and its events (without ``[DONE]``)."""
    with httpx.stream("POST", f"{stack.gateway.base}/v1/{path}", json={**body, "stream": True}, headers=HEADERS,
                      timeout=20) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        return r.headers.get("x-leafwire-cache"), events


def deterministic() -> dict[str, Any]:
    """A temperature-0 request of ``fake/echo`` no other test sends (the cache outlives a test)."""
    return {"model": "fake/echo", "messages": [{"role": "user", "content": tag()}], "temperature": 0}


def cache_of(r: httpx.Response) -> str | None:
    assert r.status_code == 200, r.text
    said: str | None = r.headers.get("x-leafwire-cache")
    return said


def sse(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
    data: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "echo-1",
                            "choices": choices}
    if usage:
        data["usage"] = usage
    return f"data: {json.dumps(data)}\n\n"


def whole_answer(reason: str, content: str | None = "stored text", **more: Any) -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "created": 1, "model": "echo-1", **more,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}


# -- what a hit gives back


def test_a_streamed_tool_call_answer_is_replayed_whole_as_it_was_streamed(cloud: CloudStack) -> None:
    """Two tool calls streamed in pieces (arguments split over chunks) are stored; the same request whole is a
    hit with both calls, ids and arguments joined, finish reason tool_calls and the streamed call's usage."""
    tools = [{"type": "function", "function": {"name": "get_w", "parameters": {"type": "object"}}}]
    body = {**deterministic(), "tools": tools}
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    cloud.openai_fake.script(Fault.raw(200, events=[
        sse([{"index": 0, "delta": {"role": "assistant", "content": None}}]),
        sse([{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                    "function": {"name": "get_w", "arguments": ""}}]}}]),
        sse([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"c":'}}]}}]),
        sse([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]),
        sse([{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                                    "function": {"name": "other", "arguments": "{}"}}]}}]),
        sse([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
        sse([], usage), "data: [DONE]\n\n"]))
    said, _ = streamed(cloud, {**body, "stream_options": {"include_usage": True}})
    assert said == "miss"
    hit = post(cloud, body)
    assert cache_of(hit) == "hit"
    choice = hit.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_w", "arguments": '{"c":1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "other", "arguments": "{}"}}]
    assert hit.json()["usage"] == usage
    assert len(cloud.openai_fake.calls) == 1


def test_a_hit_keeps_the_system_fingerprint_of_the_answer_it_replays(cloud: CloudStack) -> None:
    """The miss relays the provider's system_fingerprint; the hit replaying that answer should say the same."""
    body = deterministic()
    cloud.openai_fake.script(Fault.raw(200, body=whole_answer("stop", system_fingerprint="fp_qa7")))
    miss, hit = post(cloud, body), post(cloud, body)
    assert (cache_of(miss), cache_of(hit)) == ("miss", "hit")
    assert miss.json()["system_fingerprint"] == "fp_qa7"
    assert hit.json()["system_fingerprint"] == "fp_qa7"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_content_filter_answers_are_not_stored_length_ones_are(cloud: CloudStack, stream: bool) -> None:
    """An answer cut by the provider's content filter is not stored (the same request calls again); one cut at
    max_tokens (``length``) is, and its hit says ``length`` too."""
    for reason, stored in (("content_filter", False), ("length", True)):
        body = deterministic()
        if stream:
            cloud.openai_fake.script(Fault.raw(200, events=[
                sse([{"index": 0, "delta": {"role": "assistant", "content": "stored text"}}]),
                sse([{"index": 0, "delta": {}, "finish_reason": reason}]),
                sse([], {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}), "data: [DONE]\n\n"]))
            said, events = streamed(cloud, body)
            assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == [reason]
        else:
            cloud.openai_fake.script(Fault.raw(200, body=whole_answer(reason)))
            first = post(cloud, body)
            said = cache_of(first)
            assert first.json()["choices"][0]["finish_reason"] == reason
        assert said == "miss"
        again = post(cloud, body)
        assert cache_of(again) == ("hit" if stored else "miss"), reason
        if stored:
            assert again.json()["choices"][0] == {"index": 0, "finish_reason": "length", "logprobs": None,
                                                  "message": {"role": "assistant", "content": "stored text"}}
    assert len(cloud.openai_fake.calls) == 3  # content_filter twice, length once


# -- the header


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_a_stream_partly_from_the_cache_is_not_marked_hit(cloud: CloudStack, kind: str) -> None:
    """Choice 0 is stored, choice 1 is not: the streamed answer of both calls the provider for choice 1, so
    its header must say ``partial`` (as the whole answer's and the one-call stream's do), never ``hit``."""
    text = tag()
    if kind == "chat":
        single: dict[str, Any] = {"model": "claude/haiku", "messages": [{"role": "user", "content": text}],
                                  "temperature": 0}
        both, path = {**single, "n": 2}, "chat/completions"
    else:
        single = {"model": "claude/haiku", "prompt": text, "temperature": 0, "max_tokens": 10}
        both, path = {**single, "prompt": [text, tag()]}, "completions"
    assert cache_of(post(cloud, single, path)) == "miss"
    said, _ = streamed(cloud, both, path)
    assert len(cloud.claude_fake.calls) == 2  # the second choice was not in the cache
    assert said == "partial"


# -- what is stored, and for how long


@pytest.mark.parametrize("near", [
    pytest.param("0", id="near-cache-off"),
    pytest.param(str(32 * 1024 * 1024), id="near-cache-on"),
])
def test_an_entry_expires_after_the_cache_ttl(tmp_path: Path, near: str) -> None:
    """LW_CLOUD_CACHE_TTL_S=2: the same request is a hit at once and a miss (the provider called again) once
    the entry's two seconds are over, with or without the in-memory near cache."""
    with own_stack(tmp_path, LW_CLOUD_CACHE_TTL_S="2", LW_CLOUD_NEAR_CACHE_BYTES=near) as stack:
        body = deterministic()
        assert [cache_of(post(stack, body)) for _ in range(2)] == ["miss", "hit"]
        eventually(lambda: cache_of(post(stack, body)) == "miss", 6, "the entry to expire")
        # kept off the loop above: each of its misses stores the entry again
        assert len(stack.openai_fake.calls) == 2


def test_an_answer_over_the_entry_limit_is_answered_and_not_stored(tmp_path: Path) -> None:
    """LW_CLOUD_CACHE_MAX_ENTRY_BYTES=1024 and a 2 KB answer: answered whole each time, never stored; a small
    answer of the same stack is."""
    with own_stack(tmp_path, LW_CLOUD_CACHE_MAX_ENTRY_BYTES="1024") as stack:
        big = deterministic()
        long_text = " ".join(["word"] * 400)
        stack.openai_fake.script(Fault.ok(long_text), Fault.ok(long_text))
        answers = [post(stack, big) for _ in range(2)]
        assert [cache_of(r) for r in answers] == ["miss", "miss"]
        assert all(r.json()["choices"][0]["message"]["content"] == long_text for r in answers)
        small = deterministic()
        assert [cache_of(post(stack, small)) for _ in range(2)] == ["miss", "hit"]
        assert len(stack.openai_fake.calls) == 3


def test_a_raised_entry_limit_applies_to_the_existing_bucket(tmp_path: Path) -> None:
    """The bucket was made by an adapter with a 1 KiB entry limit; the adapter restarted with 8 KiB stores a
    2 KB answer, which the next request (the near cache off: from KV) gets as a hit."""
    (tmp_path / "nats").mkdir()
    server = start_single(tmp_path / "nats")
    try:
        (tmp_path / "before").mkdir()
        with cloud_stack(server, tmp_path / "before", LW_CLOUD_CACHE_MAX_ENTRY_BYTES="1024") as before:
            assert cache_of(post(before, deterministic())) == "miss"
        (tmp_path / "after").mkdir()
        with cloud_stack(server, tmp_path / "after", LW_CLOUD_CACHE_MAX_ENTRY_BYTES="8192",
                         LW_CLOUD_NEAR_CACHE_BYTES="0") as after:
            body = deterministic()
            after.openai_fake.script(Fault.ok("word " * 400))
            assert cache_of(post(after, body)) == "miss"
            time.sleep(1)  # the entry is written in the background
            assert cache_of(post(after, body)) == "hit"
    finally:
        server.stop()


def test_a_full_cache_drops_its_oldest_entries_not_the_new_ones(tmp_path: Path) -> None:
    """LW_CLOUD_CACHE_MAX_BYTES=1 MiB, answers of ~180 KB: after eight of them the docs' "oldest dropped
    first" means the latest answer is stored (a hit) and the first is gone (a miss)."""
    with own_stack(tmp_path, LW_CLOUD_CACHE_MAX_BYTES=str(1024 * 1024), LW_CLOUD_NEAR_CACHE_BYTES="0") as stack:
        bodies = [deterministic() for _ in range(8)]
        stack.openai_fake.script(*[Fault.ok(f"w{i} " * 60000) for i in range(8)])
        for body in bodies:
            assert cache_of(post(stack, body)) == "miss"
        time.sleep(1)  # the entries are written in the background
        assert cache_of(post(stack, bodies[-1])) == "hit"
        assert cache_of(post(stack, bodies[0])) == "miss"


def test_a_deleted_bucket_degrades_to_the_provider_and_is_made_again(tmp_path: Path) -> None:
    """The ``cloud-cache`` bucket deleted under a running adapter: requests are still answered (by the
    provider), and once the adapter made the bucket again answers are stored and found again."""
    with own_stack(tmp_path, LW_CLOUD_NEAR_CACHE_BYTES="0", LW_CLOUD_STATE_CHECK_S="1") as stack:
        async def delete() -> None:
            nc = await nats.connect(stack.nats.url)
            try:
                await nc.jetstream().delete_key_value("cloud-cache")
            finally:
                await nc.drain()
        asyncio.run(delete())
        body = deterministic()
        for _ in range(2):  # a miss, or a hit once the bucket is back: answered either way
            r = post(stack, body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "pong " + body["messages"][0]["content"]

        def stored_again() -> bool:
            fresh = deterministic()
            return [cache_of(post(stack, fresh)) for _ in range(2)] == ["miss", "hit"]
        eventually(stored_again, 10, "the cache to work again")


def test_a_model_pointed_at_another_upstream_model_does_not_get_the_old_ones_answers(tmp_path: Path) -> None:
    """``fake/echo`` is ``echo-1`` at the provider; the providers file is changed to ``echo-2`` and reloaded
    (SIGHUP). The same temperature-0 request must be asked of ``echo-2``, not answered with ``echo-1``'s."""
    with own_stack(tmp_path) as stack:
        body = deterministic()
        assert cache_of(post(stack, body)) == "miss"
        assert stack.openai_fake.calls[-1].body["model"] == "echo-1"
        file = Path(stack.adapter.env["LW_PROVIDERS_FILE"])
        config = json.loads(file.read_text())
        config["providers"][0]["models"]["echo"]["upstream"] = "echo-2"
        file.write_text(json.dumps(config))
        assert stack.adapter.proc is not None
        stack.adapter.proc.send_signal(signal.SIGHUP)

        def reloaded() -> bool:
            post(stack, deterministic())
            return bool(stack.openai_fake.calls[-1].body["model"] == "echo-2")
        eventually(reloaded, 10, "the reload")
        calls = len(stack.openai_fake.calls)
        assert cache_of(post(stack, body)) == "miss"
        assert len(stack.openai_fake.calls) == calls + 1
        assert stack.openai_fake.calls[-1].body["model"] == "echo-2"
