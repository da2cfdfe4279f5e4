"""QA: the NATS direct API with cloud models (``<provider>/<model>``), as a nats-py client sees it, on
tests/e2e/test_cloud.py's stack. QA found two bugs, fixed since: a cancel once a stream's chunks flowed ended
it with no event (the client hung), and a cancel by a request id over 128 characters stopped nothing (the
request's id was cut, the cancel's was not)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from tests.e2e.test_cloud import MESSAGES, SITE, CloudStack, cloud_stack
from tests.fakes import Fault
from tests.support import NatsServer, connected

pytestmark = pytest.mark.e2e
CHAT = f"lw.v1.{SITE}.chat"
EMBEDDINGS = f"lw.v1.{SITE}.embeddings"
CANCEL = f"lw.v1.{SITE}.cancel"
Event = tuple[str, dict[str, str], Any]


@pytest.fixture(scope="module")
def cloud(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudStack]:
    with cloud_stack(nats_server, tmp_path_factory.mktemp("qa9"), LW_CLOUD_N_RECHECK_S="0") as stack:
        yield stack


@pytest.fixture(autouse=True)
def _fresh_fakes(cloud: CloudStack) -> None:
    cloud.openai_fake.reset()
    cloud.claude_fake.reset()


async def events_of(nc: NATS, body: dict[str, Any], headers: dict[str, str] | None = None,
                    subject: str = CHAT, wait_s: float = 8.0) -> list[Event]:
    """Publish to ``subject`` with an inbox of one's own; every event until the final one (or silence)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.flush()
    await nc.publish(subject, json.dumps(body).encode(), reply=inbox, headers=headers)
    events: list[Event] = []
    try:
        while not events or events[-1][0] not in ("done", "error", "result"):
            msg = await sub.next_msg(timeout=wait_s)
            h = dict(msg.headers or {})
            events.append((h.get("Lw-Event", ""), h, json.loads(msg.data) if msg.data else None))
    except (nats.errors.TimeoutError, TimeoutError):
        events.append(("silence", {}, None))
    finally:
        await sub.unsubscribe()
    return events


def body(model: str = "fake/echo", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **kw}


async def cancel_after(nc: NATS, request_id: str, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    await nc.publish(CANCEL, json.dumps({"request_id": request_id}).encode())


async def test_a_cancel_mid_stream_ends_it_with_a_499_error_event(cloud: CloudStack) -> None:
    """docs/nats-api.md: an ``error`` event closes the stream, 499 ``cancelled`` after a cancel. A streamed cloud
    answer cancelled once its chunks flow stops (the provider call is closed) and ends with that event (QA found
    it ended with nothing: the client waited for a ``done``/``error`` that never came)."""
    cloud.openai_fake.script(Fault.drip(0.4, "a b c d e f g h i j"))
    async with connected(cloud.nats.url) as nc:
        canceller = asyncio.create_task(cancel_after(nc, "qa9-mid", 1.0))
        events = await events_of(nc, body(stream=True), {"Lw-Request-Id": "qa9-mid"}, wait_s=4)
        await canceller
    assert events[0][0] == "chunk"
    assert events[-1][0] == "error", [kind for kind, _, _ in events]  # got: chunk, chunk, ..., silence
    assert events[-1][1]["Lw-Status"] == "499"


async def test_a_long_request_id_is_cut_and_cancels_by_it(cloud: CloudStack) -> None:
    """The request id is "your id; also the completion id chatcmpl-<id> and what you cancel by". One of 200
    characters is cut to its first 128, as docs/nats-api.md says, and a cancel naming the id the client set
    (cut the same way) stops the cloud call: the stream does not run to its ``done`` (it did)."""
    request_id = "r" * 200
    cloud.openai_fake.script(Fault.drip(0.3, "a b c d e f g h i j"))
    async with connected(cloud.nats.url) as nc:
        canceller = asyncio.create_task(cancel_after(nc, request_id, 0.8))
        events = await events_of(nc, body(stream=True), {"Lw-Request-Id": request_id}, wait_s=4)
        await canceller
    assert [kind for kind, _, _ in events][-1] != "done"  # the cancel stopped it
    assert events[0][1]["Lw-Request-Id"] == request_id[:128]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cancel_before_the_first_byte_is_a_499(cloud: CloudStack, stream: bool) -> None:
    """A cloud call still waiting for its provider's first byte is stopped by a cancel on the cancel subject,
    and the caller gets one 499 ``cancelled`` error event at once."""
    cloud.openai_fake.script(Fault.slow(3))
    async with connected(cloud.nats.url) as nc:
        canceller = asyncio.create_task(cancel_after(nc, f"qa9-early-{stream}", 0.5))
        started = time.monotonic()
        events = await events_of(nc, body(stream=stream), {"Lw-Request-Id": f"qa9-early-{stream}"})
        await canceller
    assert time.monotonic() - started < 2
    assert [(kind, h["Lw-Status"], data["error"]["code"]) for kind, h, data in events] == [
        ("error", "499", "cancelled")]


async def test_cloud_errors_are_error_events_with_their_status(cloud: CloudStack) -> None:
    """Unknown model (404), a deadline already past (504), a provider failing after the retries (502 with
    ``Lw-Final``), a spent budget (429 with ``Lw-Retry-After``): each one error event, at once, on the inbox."""
    cloud.openai_fake.script(*[Fault.error(500)] * 5)
    async with connected(cloud.nats.url) as nc:
        failing = await events_of(nc, body(stream=True))
        unknown = await events_of(nc, body("fake/nope", stream=True))
        past = await events_of(nc, body(), {"Lw-Deadline": f"{time.time() - 5:.3f}"})
        spent = await events_of(nc, body("priced/echo"), {"Lw-Tenant": "broke"})  # $0.005 of $0.001
        refused = await events_of(nc, body("priced/echo", stream=True), {"Lw-Tenant": "broke"})
    assert [(k, h["Lw-Status"], h.get("Lw-Final")) for k, h, _ in failing] == [("error", "502", "1")]
    assert [(k, h["Lw-Status"], d["error"]["code"]) for k, h, d in unknown] == [("error", "404", "model_not_found")]
    assert [(k, h["Lw-Status"], d["error"]["code"]) for k, h, d in past] == [("error", "504", "deadline_exceeded")]
    assert spent[0][0] == "result"
    assert [(k, h["Lw-Status"], d["error"]["code"]) for k, h, d in refused] == [("error", "429", "budget_exceeded")]
    assert float(refused[0][1]["Lw-Retry-After"]) >= 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_short_deadline_ends_a_slow_cloud_call_on_time(cloud: CloudStack, stream: bool) -> None:
    """``Lw-Deadline`` one second ahead and a provider silent for 4 s: a 504 error event when the deadline
    passes, not the answer late nor silence."""
    cloud.openai_fake.script(Fault.slow(4))
    async with connected(cloud.nats.url) as nc:
        started = time.monotonic()
        events = await events_of(nc, body(stream=stream), {"Lw-Deadline": f"{time.time() + 1:.3f}"})
    assert time.monotonic() - started < 2.5
    assert [(kind, h["Lw-Status"]) for kind, h, _ in events] == [("error", "504")]


async def test_odd_header_values_are_answered(cloud: CloudStack) -> None:
    """No tenant, a tenant with spaces and NATS wildcards, a request id with them, a far deadline: all
    answered; the request id comes back as given."""
    async with connected(cloud.nats.url) as nc:
        answers = [await events_of(nc, body(), h) for h in (
            None, {"Lw-Tenant": "acme corp.*>"}, {"Lw-Request-Id": "a b.c*>"}, {"Lw-Deadline": "1e30"})]
    assert [[kind for kind, _, _ in events] for events in answers] == [["result"]] * 4
    assert answers[2][0][1]["Lw-Request-Id"] == "a b.c*>"
    assert answers[2][0][2]["id"] == "chatcmpl-a b.c*>"


async def test_cloud_requests_without_a_reply_subject_are_dead_lettered(cloud: CloudStack) -> None:
    """A cloud chat or embeddings request with no reply subject: kept in DEAD_LETTERS saying why, and the
    provider is never called (nobody could read what it is paid for)."""
    async with connected(cloud.nats.url) as nc:
        dlq = await nc.subscribe(f"lw.v1.{SITE}.dlq.>")
        await nc.flush()
        await nc.publish(CHAT, json.dumps(body()).encode())
        await nc.publish(EMBEDDINGS, json.dumps({"model": "fake/embed", "input": "q"}).encode())
        kept = [await dlq.next_msg(timeout=5) for _ in range(2)]
    assert sorted((m.headers or {})["Lw-Dlq-Subject"] for m in kept) == [CHAT, EMBEDDINGS]
    assert all((m.headers or {})["Lw-Dlq-Reason"].startswith("unanswered: no reply subject") for m in kept)
    assert cloud.openai_fake.calls == []


async def test_a_cancelled_cloud_embeddings_request_is_a_499(cloud: CloudStack) -> None:
    """A cancel reaches a cloud embeddings call waiting on its provider: one 499 error event."""
    cloud.openai_fake.script(Fault.slow(3))
    async with connected(cloud.nats.url) as nc:
        canceller = asyncio.create_task(cancel_after(nc, "qa9-embed", 0.5))
        events = await events_of(nc, {"model": "fake/embed", "input": "x"}, {"Lw-Request-Id": "qa9-embed"},
                                 EMBEDDINGS)
        await canceller
    assert [(kind, h["Lw-Status"]) for kind, h, _ in events] == [("error", "499")]
