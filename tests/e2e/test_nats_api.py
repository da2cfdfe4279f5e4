"""NATS as an API: a NATS client asks for a chat answer without HTTP and reads the token stream."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import nats
import pytest

from deploy.topology import free_port
from tests.conftest import Stack
from tests.support import ROOT

pytestmark = pytest.mark.e2e
REQUEST = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}


async def test_plain_request_gets_the_whole_answer(stack: Stack) -> None:
    """`nc.request` on lw.v1.<site>.chat returns one `result`: an OpenAI chat.completion."""
    nc = await nats.connect(stack.nats.url)
    try:
        msg = await nc.request(f"lw.v1.{stack.site}.chat", json.dumps(REQUEST).encode(), timeout=20)
    finally:
        await nc.drain()
    assert msg.headers is not None
    assert msg.headers["Lw-Event"] == "result"
    body = json.loads(msg.data)
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == 5


async def test_streamed_request_gets_chunks_then_done(stack: Stack) -> None:
    """With stream=true the reply subject receives chunk events and one closing `done` with usage."""
    nc = await nats.connect(stack.nats.url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.flush()
        await nc.publish(f"lw.v1.{stack.site}.chat", json.dumps({**REQUEST, "stream": True}).encode(),
                         reply=inbox, headers={"Lw-Request-Id": "nats-client-1"})
        events = []
        while not events or events[-1][0] not in ("done", "error"):
            msg = await sub.next_msg(timeout=20)
            events.append((msg.headers["Lw-Event"], json.loads(msg.data)))  # type: ignore[index]
    finally:
        await nc.drain()
    kinds = [k for k, _ in events]
    assert kinds == ["chunk"] * 7 + ["done"]  # role, 5 tokens, finish
    assert events[0][1]["id"] == "chatcmpl-nats-client-1"
    assert events[-1][1] == {"request_id": "nats-client-1", "finish_reason": "length",
                             "usage": events[-1][1]["usage"]}
    assert events[-1][1]["usage"]["completion_tokens"] == 5


async def test_choices_of_a_local_model_are_asked_one_by_one(stack: Stack) -> None:
    """`n: 2` to a local model over NATS: an error `n_unsupported` naming `n` and saying to send two requests
    (the HTTP gateway does); nothing is generated."""
    nc = await nats.connect(stack.nats.url)
    try:
        msg = await nc.request(f"lw.v1.{stack.site}.chat", json.dumps({**REQUEST, "n": 2}).encode(), timeout=10)
    finally:
        await nc.drain()
    assert (msg.headers or {})["Lw-Status"] == "400"
    error = json.loads(msg.data)["error"]
    assert (error["code"], error["param"]) == ("n_unsupported", "n")
    assert "send 2 requests instead" in error["message"]


async def test_bad_request_over_nats_gets_an_error_event(stack: Stack) -> None:
    """Invalid JSON on the chat subject is answered with an error event, status 400."""
    nc = await nats.connect(stack.nats.url)
    try:
        msg = await nc.request(f"lw.v1.{stack.site}.chat", b'{"model": "tiny", "messages": "hi"}', timeout=10)
        not_json = await nc.request(f"lw.v1.{stack.site}.chat", b"\x00\x01 not json", timeout=10)
        others = [await nc.request(f"lw.v1.{stack.site}.{subject}", b"garbage", timeout=10)
                  for subject in ("embeddings", "route.dry_run")]
    finally:
        await nc.drain()
    for answer in (not_json, *others):  # not JSON at all: said as such on every subject
        assert answer.headers["Lw-Status"] == "400"  # type: ignore[index]
        assert json.loads(answer.data)["error"]["message"].startswith("Invalid JSON: ")
    assert msg.headers == {"Lw-Event": "error", "Lw-Status": "400", "Lw-Request-Id": msg.headers["Lw-Request-Id"]}  # type: ignore[index]
    assert json.loads(msg.data)["error"]["param"] == "messages"
    assert not_json.headers["Lw-Status"] == "400"  # type: ignore[index]


async def test_a_deadline_that_is_no_unix_time_gets_an_error_event(stack: Stack) -> None:
    """``Lw-Deadline: 30`` (a duration where a unix time belongs) or ``soon``: a 400 error event naming the
    header, not a request that expired in 1970 or a deadline silently ignored."""
    nc = await nats.connect(stack.nats.url)
    try:
        answers = [await nc.request(f"lw.v1.{stack.site}.chat", json.dumps(REQUEST).encode(), timeout=10,
                                    headers={"Lw-Deadline": deadline}) for deadline in ("30", "soon")]
    finally:
        await nc.drain()
    for msg in answers:
        assert msg.headers["Lw-Event"] == "error"  # type: ignore[index]
        assert msg.headers["Lw-Status"] == "400"  # type: ignore[index]
        error = json.loads(msg.data)["error"]
        assert error["param"] == "Lw-Deadline"
        assert "must be a unix time in seconds" in error["message"]


async def test_a_deadline_already_passed_is_a_504_not_a_503_to_retry(stack: Stack) -> None:
    """``Lw-Deadline`` ten seconds ago: 504 ``deadline_exceeded``, as one passing on the way gets, not a 503
    "nobody took the request within 0.0 s" with a Retry-After that a retry with the same deadline never passes."""
    nc = await nats.connect(stack.nats.url)
    try:
        msg = await nc.request(f"lw.v1.{stack.site}.chat", json.dumps(REQUEST).encode(), timeout=10,
                               headers={"Lw-Deadline": f"{time.time() - 10:.3f}"})
    finally:
        await nc.drain()
    assert msg.headers is not None
    assert (msg.headers["Lw-Status"], json.loads(msg.data)["error"]["code"]) == ("504", "deadline_exceeded")


async def test_poisoned_message_is_dead_lettered(stack: Stack) -> None:
    """A message the router cannot parse is kept in the DEAD_LETTERS stream with the reason."""
    nc = await nats.connect(stack.nats.url)
    try:
        dlq = await nc.subscribe(f"lw.v1.{stack.site}.dlq.>")
        await nc.flush()
        await nc.request(f"lw.v1.{stack.site}.chat", b"garbage", timeout=10)
        kept = await dlq.next_msg(timeout=10)
    finally:
        await nc.drain()
    assert kept.data == b"garbage"
    assert kept.headers["Lw-Dlq-Service"] == "router"  # type: ignore[index]
    assert kept.headers["Lw-Dlq-Reason"].startswith("invalid")  # type: ignore[index]
    nc = await nats.connect(stack.nats.url)
    try:
        stored = await nc.jetstream().get_last_msg("DEAD_LETTERS", f"lw.v1.{stack.site}.dlq.router")
    finally:
        await nc.drain()
    assert stored.data == b"garbage"


async def test_a_request_without_a_reply_subject_is_dead_lettered(stack: Stack) -> None:
    """A chat request published with no reply subject cannot be answered: it is kept in DEAD_LETTERS, saying
    why, rather than dropped in silence."""
    nc = await nats.connect(stack.nats.url)
    try:
        dlq = await nc.subscribe(f"lw.v1.{stack.site}.dlq.>")
        await nc.flush()
        await nc.publish(f"lw.v1.{stack.site}.chat", json.dumps(REQUEST).encode())
        kept = await dlq.next_msg(timeout=10)
    finally:
        await nc.close()
    assert json.loads(kept.data) == REQUEST
    assert kept.headers["Lw-Dlq-Service"] == "router"  # type: ignore[index]
    assert kept.headers["Lw-Dlq-Reason"].startswith("unanswered: no reply subject")  # type: ignore[index]


def test_runnable_example(stack: Stack) -> None:
    """examples/nats_chat.py streams an answer from the stack and exits 0."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "nats_chat.py"), "--nats", stack.nats.url,
                          "--model", "tiny", "hello"], capture_output=True, text=True, timeout=60, check=True)
    assert "completion tokens" in out.stdout


def test_example_without_nats_says_so() -> None:
    """With no NATS server there, the example exits 2 at once with a line saying so (not two minutes of
    nats-py retrying)."""
    url = f"nats://127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "nats_chat.py"), "--nats", url, "hello"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == f"no NATS server at {url} (is `just up` running?)"


@pytest.mark.parametrize("args", [["--site", "nosuch", "--no-stream"], ["--site", "nosuch"],
                                  ["--timeout", "0.001", "--no-stream"]])
def test_example_that_gets_no_answer_says_so(stack: Stack, args: list[str]) -> None:
    """A site nobody serves, or no answer in time: one line and exit 1, not a traceback."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "nats_chat.py"), "--nats", stack.nats.url,
                          "--model", "tiny", *args, "hello"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() in ("no router is serving site 'nosuch'", "no answer within 0.001 s")
