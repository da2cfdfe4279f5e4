"""A server found to have no ``n`` is remembered (``LW_CLOUD_N_RECHECK_S``): its model's next requests with
``n`` are asked a call a choice at once, without a call with ``n`` wasted (and maybe billed) each time; after
that time ``n`` is tried again, so a server upgraded since gets one call again.

The stack is test_cloud.py's (started again here, remembering for 3 s): httpx -> gateway -> router -> the hub's
cloud-adapter -> the fake OpenAI-compatible provider of tests/fakes.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.test_cloud import CloudStack, cloud_stack
from tests.e2e.test_qa_cloud_n import completion, text_choice
from tests.fakes import Fault
from tests.support import NatsServer

pytestmark = pytest.mark.e2e
RECHECK_S = 3.0
HEADERS = {"Authorization": "Bearer key-acme"}
NO_N = Fault.error(400, {"error": {"message": "n must be 1", "type": "invalid_request_error", "param": "n",
                                   "code": None}})


@pytest.fixture(scope="module")
def cloud(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudStack]:
    with cloud_stack(nats_server, tmp_path_factory.mktemp("n-memory"), LW_CLOUD_N_RECHECK_S=str(RECHECK_S)) as stack:
        yield stack


def ask(cloud: CloudStack, model: str, **more: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": f"n {uuid.uuid4().hex[:8]}"}], "n": 2, **more}
    if body.get("stream"):
        with httpx.stream("POST", f"{cloud.gateway.base}/v1/chat/completions", json=body, headers=HEADERS,
                          timeout=30) as r:
            r.read()
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
        assert '"index":1' in r.text.replace(" ", "")
        return r
    r = httpx.post(f"{cloud.gateway.base}/v1/chat/completions", json=body, headers=HEADERS, timeout=30)
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    return r


def calls_n(cloud: CloudStack) -> list[Any]:
    """The ``n`` of each call the fake got since the last look, then forgets them."""
    seen = [c.body.get("n") for c in cloud.openai_fake.calls]
    cloud.openai_fake.reset()
    return seen


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_server_without_n_is_remembered_per_model_then_asked_again(cloud: CloudStack, stream: bool) -> None:
    """The first request finds out (a call with n, refused); the next ones of that model ask a call a choice at
    once; another provider's model still gets n; after LW_CLOUD_N_RECHECK_S, n is tried again."""
    cloud.openai_fake.reset()
    cloud.openai_fake.script(NO_N)
    ask(cloud, "fake/echo", stream=stream)
    assert calls_n(cloud) == [2, None, None]
    found_out = time.monotonic()
    ask(cloud, "fake/echo", stream=stream)
    assert calls_n(cloud) == [None, None]  # no call with n wasted again
    ask(cloud, "flaky/echo", stream=stream)  # the same server under another provider's name: not found out
    assert calls_n(cloud) == [2]
    time.sleep(max(0.0, found_out + RECHECK_S + 0.2 - time.monotonic()))
    ask(cloud, "fake/echo", stream=stream)  # the server has n now (the fake answers it): one call again
    assert calls_n(cloud) == [2]


def test_one_choice_answered_to_n_is_remembered_too(cloud: CloudStack) -> None:
    """A server that answers n with a single choice (and bills it) is found out once, not at every request."""
    cloud.openai_fake.reset()
    cloud.openai_fake.script(Fault.raw(200, completion([text_choice(0, "only one")])))
    ask(cloud, "priced/echo")
    assert calls_n(cloud) == [2, None, None]
    ask(cloud, "priced/echo")
    assert calls_n(cloud) == [None, None]
