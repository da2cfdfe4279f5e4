"""A hot-path subscription with a concurrency bound, on a real nats-server: past its bound a message waits
for a slot for a while, then is refused with 429 and Retry-After, and past as many again it is refused at
once: overload is answered, never left silent (a caller would wait out its gateway's idle timeout)."""

from __future__ import annotations

import asyncio
import json

import nats
from pydantic import BaseModel

from shared.envelope import Envelope
from shared.intake import Intake
from tests.support import eventually_async


class Ask(BaseModel):
    n: int


async def test_overload_is_answered_with_429_not_left_waiting(nc: nats.NATS) -> None:
    release = asyncio.Event()
    handled: list[int] = []

    async def handler(body: Ask, msg: nats.aio.msg.Msg, env: Envelope) -> None:
        handled.append(body.n)
        await release.wait()
        await nc.publish(msg.reply, b"ok")

    intake = Intake(nc, subject="test.intake", queue="q", model=Ask, handler=handler, site="edge1",
                    service="router", concurrency=2, slot_wait_s=0.4)
    await intake.start()
    answers: dict[int, tuple[str, dict[str, str]]] = {}

    async def ask(n: int) -> None:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("test.intake", Ask(n=n).model_dump_json().encode(), reply=inbox)
        msg = await sub.next_msg(timeout=10)
        answers[n] = (msg.data.decode(), dict(msg.headers or {}))

    try:
        asking = [asyncio.create_task(ask(n)) for n in range(6)]
        await eventually_async(lambda: asyncio.sleep(0.02, len(answers)), lambda k: k == 2, 5)
        assert sorted(answers) == [4, 5]  # two in hand, two waiting: the last two are refused at once
        assert handled == [0, 1]
        for body, headers in answers.values():
            assert json.loads(body)["error"]["code"] == "overloaded"
            assert (headers["Lw-Status"], headers["Lw-Retry-After"]) == ("429", "1")
        await eventually_async(lambda: asyncio.sleep(0.02, len(answers)), lambda k: k == 4, 5)
        assert sorted(answers) == [2, 3, 4, 5]  # the waiting ones found no slot within 0.4 s
        release.set()
        await asyncio.gather(*asking)
        assert answers[0][0] == answers[1][0] == "ok"
        release.clear()
        later = [asyncio.create_task(ask(n)) for n in (6, 7, 8)]
        await asyncio.sleep(0.1)
        release.set()  # the one waiting gets a slot in time and is handled
        await asyncio.gather(*later)
        assert [answers[n][0] for n in (6, 7, 8)] == ["ok", "ok", "ok"]
    finally:
        release.set()
        await intake.stop()
