"""The header fast path sends and reads exactly what nats-py's own methods do."""

from __future__ import annotations

import random
from typing import Any

import nats
import pytest
from nats import errors

from shared import nats_headers
from tests.support import NatsServer

LEAFWIRE = {"Lw-Request-Id": "chatcmpl-3f9a1c2b", "Lw-Tenant": "acme", "Lw-Deadline": "1763740000.123456",
            "Lw-Reply": "_INBOX.abc.def", "Lw-Handoff": "1"}
EDGE_CASES: list[dict[str, Any]] = [
    {},
    LEAFWIRE,
    {"  Padded  ": "  both sides  ", "Tabbed": "\tvalue\t"},
    {"Multi": "line one\r\nline two\nthree\r"},
    {"": "blank name skipped", "   ": "so is this", "Kept": "yes"},
    {"Unicode": "Grüße, 東京 ✓", "Empty": ""},
    {"Nats-Msg-Id": "m-1", "Nats-Expected-Last-Subject-Sequence": "7"},
    {"Weird!#$%&'*+-.^_`|~09": "token characters"},
]


class Capture:
    """Stands in for a nats-py client: records the protocol command a publish would send."""

    def __init__(self) -> None:
        self.stats = {"out_msgs": 0, "out_bytes": 0}
        self._flush_queue = None
        self._max_payload = 1 << 20
        self.sent: list[bytes] = []

    async def _send_command(self, cmd: bytes) -> None:
        self.sent.append(cmd)


async def sent_by(method: Any, headers: dict[str, Any] | None) -> bytes:
    client = Capture()
    await method(client, "lw.v1.site.chat", "_INBOX.x", b'{"a": 1}', 8, headers)
    assert client.stats == {"out_msgs": 1, "out_bytes": 8}
    return client.sent[0]


def random_headers(rng: random.Random) -> dict[str, str]:
    alphabet = "abcXYZ-_09 :\t\r\né東"
    names = ["Lw-" + "".join(rng.choice("abcdefXYZ-") for _ in range(rng.randint(1, 12))) for _ in range(6)]
    return {n: "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20))) for n in names}


@pytest.mark.parametrize("headers", [None, *EDGE_CASES])
async def test_publish_sends_the_bytes_nats_py_sends(headers: dict[str, Any] | None) -> None:
    """The fast publish writes byte for byte the HPUB (or PUB) command nats-py would, edge cases included."""
    assert await sent_by(nats_headers._send_publish, headers) == \
        await sent_by(nats_headers.original("_send_publish"), headers)


async def test_publish_matches_on_random_headers() -> None:
    """Five hundred random header sets (whitespace, CR/LF, non-ASCII values) encode the same both ways."""
    rng = random.Random(4)
    for _ in range(500):
        headers = random_headers(rng)
        assert await sent_by(nats_headers._send_publish, headers) == \
            await sent_by(nats_headers.original("_send_publish"), headers)


@pytest.mark.parametrize("name", ["Has Space", "Colon:Name", "Ünï", "new\nline"])
async def test_a_name_that_is_not_a_token_is_refused_as_nats_py_refuses_it(name: str) -> None:
    """A header name outside HTTP's token characters raises nats-py's BadHeaderError; nothing is sent."""
    for method in (nats_headers._send_publish, nats_headers.original("_send_publish")):
        client = Capture()
        with pytest.raises(errors.BadHeaderError):
            await method(client, "s", "", b"", 0, {"Good": "1", name: "x"})
        assert client.sent == []


async def test_an_empty_subject_is_refused() -> None:
    """An empty subject raises BadSubjectError, as in nats-py."""
    with pytest.raises(errors.BadSubjectError):
        await nats_headers._send_publish(Capture(), "", "", b"", 0, {"A": "1"})


RAW_BLOCKS = [
    b"",
    b"Lw-Tenant: acme\r\nLw-Request-Id: r1\r\n\r\n",
    b"NoSpace:value\r\nTabbed:\tvalue\r\n  Padded  :  x  \r\n\r\n",
    b"no colon on this line\r\nKept: 1\r\n\r\n",
    b"Bad Name: skipped\r\n\xc3\xa9t\xc3\xa9: non-ascii name skipped\r\nOk: \xff\xfe bad utf-8\r\n\r\n",
    b"Repeated: first\r\nRepeated: second\r\n\r\n",
    b"Empty:\r\n: no name\r\n\r\n",
    "Unicode: Grüße 東京\r\n\r\n".encode(),
]


@pytest.mark.parametrize("raw", RAW_BLOCKS)
def test_parse_reads_what_nats_py_reads(raw: bytes) -> None:
    """Header lines parse to the same mapping as nats-py's parser, malformed lines included."""
    assert nats_headers.parse(raw) == nats_headers.original("_parse_header_lines")(raw)


def test_parse_matches_on_random_blocks() -> None:
    """Five hundred random header blocks parse the same both ways."""
    rng = random.Random(7)
    pieces = [b"Lw-A", b"Lw-B", b" ", b":", b"\t", b"\r\n", b"x", b"\xc3\xa9", b"\xff", b"Name", b"1"]
    for _ in range(500):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        assert nats_headers.parse(raw) == nats_headers.original("_parse_header_lines")(raw)


def test_the_name_caches_stay_bounded() -> None:
    """A flood of distinct header names is still encoded and parsed right, and not all remembered."""
    for i in range(nats_headers.CACHE_LIMIT + 100):
        headers = {f"X-Flood-{i}": str(i)}
        assert nats_headers.parse(nats_headers.encode(headers)[len("NATS/1.0\r\n"):]) == headers
    assert len(nats_headers._encoded_names) <= nats_headers.CACHE_LIMIT
    assert len(nats_headers._parsed_names) <= nats_headers.CACHE_LIMIT


async def test_installed_clients_round_trip_headers_and_statuses(nats_server: NatsServer) -> None:
    """With the fast path installed, a real server carries headers both ways, JetStream's headers work,
    and a request nobody listens to still fails as no-responders (a status-only message)."""
    assert nats_headers.install()
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("hdr.test")
        await nc.publish("hdr.test", b"x", headers={**LEAFWIRE, "Multi": "a\r\nb", " Padded ": " v "})
        msg = await sub.next_msg(timeout=5)
        assert msg.headers == {**LEAFWIRE, "Multi": "a  b", "Padded": "v"}
        js = nc.jetstream()
        await js.add_stream(name="HDRTEST", subjects=["hdrjs.>"])
        first = await js.publish("hdrjs.a", b"1", headers={"Nats-Msg-Id": "once"})
        again = await js.publish("hdrjs.a", b"1", headers={"Nats-Msg-Id": "once"})
        assert again.duplicate
        assert again.seq == first.seq
        with pytest.raises(errors.NoRespondersError):
            await nc.request("nobody.listens", b"", timeout=5)
    finally:
        await nc.drain()


async def test_a_message_over_max_payload_with_its_headers_is_refused_and_the_connection_lives(
        nats_server: NatsServer) -> None:
    """nats-py checks the payload alone; a server given more than max_payload with the headers closes the
    connection for good. The fast path refuses such a message before sending, and the client stays up."""
    assert nats_headers.install()
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("big.test")
        payload = b"x" * (nc.max_payload - 20)
        with pytest.raises(nats_headers.MessageTooLarge) as refused:
            await nc.publish("big.test", payload, headers=LEAFWIRE)
        assert refused.value.size > nc.max_payload
        assert isinstance(refused.value, errors.MaxPayloadError)
        await nc.publish("big.test", payload)  # without headers it fits
        await nc.publish("big.test", b"after", headers=LEAFWIRE)
        assert (await sub.next_msg(timeout=5)).data == payload
        assert (await sub.next_msg(timeout=5)).data == b"after"
        assert nc.is_connected
    finally:
        await nc.drain()
