"""A big embeddings request in parts: how it is cut and merged (pure functions), and the gateway's bridge on a
real nats-server against a fake site: parts go out a few at a time, answers come back merged in input order,
and a failing part or a caller leaving cancels the parts still out."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import nats
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from nats.aio.msg import Msg
from pydantic import ValidationError

from schemas.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from schemas.errors import ErrorBody, ErrorResponse
from services.gateway.embeddings import EmbeddingsBridge, in_cache, in_whole, merge, reindexed, split
from services.gateway.settings import GatewaySettings
from shared import subjects
from shared.errors import InvalidRequest, RemoteError, UpstreamError
from shared.replies import ReplyReader
from tests.services.gateway.fake_site import SiteSubjects, reading, request_id

SITE = "splits"


def request(inputs: list[str] | list[list[int]], **fields: object) -> EmbeddingRequest:
    return EmbeddingRequest.model_validate({"model": "m", "input": inputs, **fields})


def answer(part_inputs: list[str], tokens_each: int = 3) -> bytes:
    """What a site answers for inputs named by numbers: each vector is ``[that number]``."""
    return EmbeddingResponse(
        data=[Embedding(index=i, embedding=[float(text)]) for i, text in enumerate(part_inputs)], model="m",
        usage=EmbeddingUsage(prompt_tokens=tokens_each * len(part_inputs),
                             total_tokens=tokens_each * len(part_inputs))).model_dump_json().encode()


class TestSplit:
    def test_parts_keep_input_order_and_every_other_field(self) -> None:
        """Ten inputs by four: parts of 4, 4, 2 in order; format, dimensions, user and unknown fields carry over."""
        whole = request([str(i) for i in range(10)], encoding_format="base64", dimensions=32, user="u7", extra=1)
        parts = split(whole, 4)
        assert [(p.offset, p.size) for p in parts] == [(0, 4), (4, 4), (8, 2)]
        assert [text for p in parts for text in p.request.input] == whole.input
        for part in parts:
            sent = json.loads(part.request.model_dump_json(exclude_unset=True))
            assert {k: v for k, v in sent.items() if k != "input"} == {
                "model": "m", "encoding_format": "base64", "dimensions": 32, "user": "u7", "extra": 1}

    def test_float_vectors_go_in_smaller_parts(self) -> None:
        """Float vectors take ~4x the bytes of base64 ones: parts of float requests hold at most
        LW_GATEWAY_EMBEDDINGS_SPLIT_FLOAT inputs (64), so that 64 vectors of 4,096 dimensions (~5 MB) fit one NATS
        message; base64 requests keep LW_GATEWAY_EMBEDDINGS_SPLIT (256); the lower of the two applies."""
        def size(encoding: str, **settings: int) -> int:
            bridge = EmbeddingsBridge(None, None, GatewaySettings(site=SITE, **settings))  # type: ignore[arg-type]
            return bridge.part_size(request(["a"], encoding_format=encoding))

        assert (size("float"), size("base64")) == (64, 256)
        assert (size("float", embeddings_split=16), size("base64", embeddings_split=16)) == (16, 16)
        vectors = EmbeddingResponse(data=[Embedding(index=i, embedding=[-0.0123456789012345678] * 4096)
                                          for i in range(64)], model="m",
                                    usage=EmbeddingUsage(prompt_tokens=1, total_tokens=1)).model_dump_json()
        assert len(vectors) < 8 * 2**20  # the part's answer fits NATS's max_payload (8 MB)

    def test_token_arrays_are_split_like_strings(self) -> None:
        """Inputs given as token arrays are cut between arrays, never inside one."""
        parts = split(request([[1, 2], [3], [4, 5, 6]]), 2)
        assert [p.request.input for p in parts] == [[[1, 2], [3]], [[4, 5, 6]]]


class TestMerge:
    def test_vectors_are_indexed_across_the_request_and_usage_summed(self) -> None:
        """Three parts' answers become one list: indices 0..6 in input order, tokens added up."""
        parts = split(request([str(i) for i in range(7)]), 3)
        merged = EmbeddingResponse.model_validate_json(
            merge([reindexed(answer(p.request.input), p) for p in parts]))
        assert [(d.index, d.embedding) for d in merged.data] == [(i, [float(i)]) for i in range(7)]
        assert merged.usage == EmbeddingUsage(prompt_tokens=21, total_tokens=21)
        assert merged.model == "m"

    def test_the_merged_answer_is_the_one_a_single_request_gets(self) -> None:
        """Byte for byte what the site answers one request of all the inputs (a model name that looks like
        JSON included)."""
        inputs = [str(i) for i in range(5)]
        parts = split(request(inputs), 2)
        model = 'odd "data":[] name'

        def answered_by(model_name: str, texts: list[str]) -> bytes:
            return answer(texts).replace(b'"model":"m"', f'"model":{json.dumps(model_name)}'.encode())

        merged = merge([reindexed(answered_by(model, p.request.input), p) for p in parts])
        assert merged == answered_by(model, inputs)

    def test_an_answer_short_of_a_vector_is_a_502(self) -> None:
        """A part answered with fewer vectors than it has inputs fails the request rather than shift the rest."""
        parts = split(request(["0", "1", "2", "3"]), 2)
        with pytest.raises(UpstreamError, match="1 vectors for 2 inputs"):
            reindexed(answer(["2"]), parts[1])


class TestPartErrors:
    def test_an_input_named_by_a_part_is_named_in_the_whole_request(self) -> None:
        """input[1] of the part starting at input 8 is input[9] of the caller's request."""
        err = RemoteError(400, ErrorResponse(error=ErrorBody(
            message="input[1] has 100 tokens", type="invalid_request_error", param="input",
            code="context_length_exceeded")))
        whole = in_whole(err, 8)
        assert (whole.message, whole.status, whole.code) == ("input[9] has 100 tokens", 400, "context_length_exceeded")
        assert in_whole(err, 0) is err
        other = InvalidRequest("model m makes 32-dimensional vectors", param="dimensions")
        assert in_whole(other, 8) is other


class TestSettings:
    @pytest.mark.parametrize("value", ["0", "2049"])
    def test_a_split_outside_1_to_2048_is_refused_at_start(self, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """LW_GATEWAY_EMBEDDINGS_SPLIT must be a part size a request can have: 1 to 2048 (never split)."""
        monkeypatch.setenv("LW_GATEWAY_EMBEDDINGS_SPLIT", value)
        with pytest.raises(ValidationError, match="LW_GATEWAY_EMBEDDINGS_SPLIT"):
            GatewaySettings()


class FakeSite(SiteSubjects):
    """The site's embeddings subject and its cancel subject, read by the test."""

    async def next_part(self) -> tuple[Msg, EmbeddingRequest]:
        msg = await self.asked.next_msg(timeout=5)
        return msg, EmbeddingRequest.model_validate_json(msg.data)

    async def nothing_more_asked(self) -> bool:
        await self.nc.flush()
        return self.asked.pending_msgs == 0

    async def answer(self, msg: Msg, part: EmbeddingRequest) -> None:
        await self.nc.publish(msg.reply, answer(part.input), headers={"Lw-Event": "result"})

    async def fail(self, msg: Msg, message: str) -> None:
        body = ErrorResponse(error=ErrorBody(message=message, type="invalid_request_error", param="input",
                                             code="context_length_exceeded"))
        await self.nc.publish(msg.reply, body.model_dump_json().encode(),
                              headers={"Lw-Event": "error", "Lw-Status": "400"})


@pytest.fixture
async def site(nc: nats.NATS) -> AsyncIterator[FakeSite]:
    async with reading(nc, subjects.embeddings(SITE), SITE, FakeSite) as fake:
        yield fake


@pytest.fixture
async def bridge(nc: nats.NATS) -> AsyncIterator[EmbeddingsBridge]:
    """A gateway's embeddings bridge that splits past 2 inputs and keeps 2 parts out at once."""
    reader = ReplyReader(nc, subjects.reply_prefix("test-split"))
    await reader.start()
    try:
        yield EmbeddingsBridge(nc, reader, GatewaySettings(site=SITE, embeddings_split=2, embeddings_parallel=2))
    finally:
        await reader.stop()


async def answered(reply: asyncio.Task[web.StreamResponse]) -> tuple[web.Response, bytes]:
    """The HTTP response the bridge made, and its body."""
    resp = await reply
    assert isinstance(resp, web.Response)
    assert isinstance(resp.body, bytes)
    return resp, resp.body


def ask(bridge: EmbeddingsBridge, inputs: list[str]) -> asyncio.Task[web.StreamResponse]:
    body = request(inputs, encoding_format="float")
    raw = body.model_dump_json(exclude_unset=True).encode()
    return asyncio.create_task(bridge.create(make_mocked_request("POST", "/v1/embeddings"), body, raw, "t1"))


class TestBridge:
    async def test_a_request_within_the_limit_is_sent_as_it_came(self, bridge: EmbeddingsBridge,
                                                                site: FakeSite) -> None:
        """Two inputs with a limit of two: one NATS request carrying the caller's body, answered as is."""
        reply = ask(bridge, ["0", "1"])
        msg, part = await site.next_part()
        assert part.input == ["0", "1"]
        await site.answer(msg, part)
        resp, body = await answered(reply)
        assert body == answer(["0", "1"])
        assert request_id(msg) == resp.headers["x-request-id"]

    async def test_parts_go_out_two_at_a_time_and_merge_in_input_order(self, bridge: EmbeddingsBridge,
                                                                       site: FakeSite) -> None:
        """Seven inputs by two: four parts, never more than two out at once, each with its own request id;
        answered out of order, they come back as one list in input order with usage summed."""
        reply = ask(bridge, [str(i) for i in range(7)])
        ids = []
        for _ in range(2):
            first, second = await site.next_part(), await site.next_part()
            assert await site.nothing_more_asked()
            for msg, part in (second, first):
                await site.answer(msg, part)
                ids.append(request_id(msg))
        resp, body = await answered(reply)
        assert resp.status == 200
        merged = EmbeddingResponse.model_validate_json(body)
        assert [(d.index, d.embedding) for d in merged.data] == [(i, [float(i)]) for i in range(7)]
        assert merged.usage.prompt_tokens == 21
        whole_id = resp.headers["x-request-id"]
        assert sorted(ids) == [f"{whole_id}-{n}" for n in range(4)]

    async def test_a_failing_part_fails_the_request_and_the_parts_out_are_cancelled(
            self, bridge: EmbeddingsBridge, site: FakeSite) -> None:
        """The second part's 400 is the caller's answer, naming the input in the whole request; the first
        part, still out, is cancelled at the site; the parts not yet sent never are."""
        reply = ask(bridge, [str(i) for i in range(7)])
        (first, _), (second, _) = await site.next_part(), await site.next_part()
        await site.fail(second, "input[1] has 100 tokens; the model reads 64")
        resp, body = await answered(reply)
        assert resp.status == 400
        error = json.loads(body)["error"]
        assert (error["code"], error["message"]) == ("context_length_exceeded",
                                                     "input[3] has 100 tokens; the model reads 64")
        assert await site.cancelled(1) == {request_id(first)}
        assert await site.nothing_more_asked()

    async def test_a_caller_leaving_cancels_every_part_out(self, bridge: EmbeddingsBridge, site: FakeSite) -> None:
        """The HTTP client goes away while two parts are out: both are cancelled at the site."""
        reply = ask(bridge, [str(i) for i in range(7)])
        (first, _), (second, _) = await site.next_part(), await site.next_part()
        reply.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reply
        assert await site.cancelled(2) == {request_id(first), request_id(second)}
        assert await site.nothing_more_asked()


@pytest.mark.parametrize(("parts", "said"), [
    (["hit", "hit"], "hit"),
    (["miss", "miss", "miss"], "miss"),
    (["hit", "miss"], "partial"),
    (["miss", "partial"], "partial"),
    (["partial"], "partial"),
    ([None, None], None),  # a local model: no cache, no header
])
def test_the_cache_header_of_a_request_in_parts(parts: list[str | None], said: str | None) -> None:
    assert in_cache(parts) == said
