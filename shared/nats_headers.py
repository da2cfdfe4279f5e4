"""Faster NATS header encoding and parsing for nats-py, byte for byte what nats-py does.

Every leafwire message carries five to eight ``Lw-*`` headers, and nats-py 2.16 builds each header block in a
loop of ``bytearray.extend`` calls with a regex check per name, and parses each one with a generator over
every character of every name (``any(c.isspace() for c in key)``). That was the first entry of every
service's CPU profile at 1,000 requests/s: ~17 µs to build and ~15 µs to parse a six-header block, twice per
message, three messages a request. The same work done with per-name caches takes ~2.5 µs to build and ~4.7 µs
to parse.

``install()`` swaps nats-py's two methods (``Client._send_publish`` and ``Client._parse_header_lines``) for the
ones below, once per process, at start-up (``shared.nats`` calls it before connecting). They keep nats-py's
rules exactly — names stripped, empty names skipped, names that are not tokens refused with
``BadHeaderError``, values stripped with CR and LF turned into spaces; when parsing, lines without a colon
and names with whitespace or non-ASCII bytes skipped, values decoded as UTF-8 with replacement — and
``tests/shared/test_nats_headers.py`` holds them to nats-py's own methods on the same inputs. A nats-py
other than the version they were written against is left alone (the lock file pins it).

One rule is added: a message whose headers and payload together exceed the server's ``max_payload`` is
refused with :class:`MessageTooLarge` (a ``MaxPayloadError``) before anything is sent. nats-py checks the
payload alone; the server counts both, and answers a message over the limit by closing the connection, for
good: one oversized request would cut a service off from NATS.
"""

from __future__ import annotations

from typing import Any

from nats import errors
from nats.aio import client as nats_client
from nats.protocol import command as prot_command

from shared.errors import TooLarge
from shared.logging import get_logger

log = get_logger("leafwire.nats")
WRITTEN_FOR = "2.16.0"
HEADERS_ROOM = 4096  # what to leave of max_payload for a message's headers when sizing its payload beforehand
CACHE_LIMIT = 4096  # header names are few (leafwire's, JetStream's); a flood of distinct ones is not cached

_HEAD = (nats_client.NATS_HDR_LINE + nats_client._CRLF_).decode()
_NEWLINES = nats_client._HEADER_VALUE_NEWLINES
_KEY_RE = nats_client._HEADER_KEY_RE
_ORIGINAL = {"_send_publish": nats_client.Client._send_publish,
             "_parse_header_lines": nats_client.Client._parse_header_lines}

_SKIP = ""  # a blank (after strip) name: skipped when encoding
_encoded_names: dict[str, str] = {}
_parsed_names: dict[bytes, str | None] = {}  # None: a name nats-py skips


def _encoded_name(key: str) -> str:
    """``"Name: "`` for a header name as nats-py writes it; ``""`` for a blank name (skipped)."""
    found = _encoded_names.get(key)
    if found is not None:
        return found
    name = key.strip()
    if not name:
        found = _SKIP
    elif not _KEY_RE.fullmatch(name):
        raise errors.BadHeaderError(name)
    else:
        found = name + ": "
    if len(_encoded_names) < CACHE_LIMIT:
        _encoded_names[key] = found
    return found


def encode(headers: dict[str, Any]) -> bytes:
    """The header block nats-py sends for ``headers`` (``NATS/1.0`` line, one line each, blank line).

    One string encoded once; ``str.translate`` (2 µs a call) only for a value that holds CR or LF."""
    parts = [_HEAD]
    for key, value in headers.items():
        name = _encoded_name(key)
        if name:
            value = value.strip()
            if "\r" in value or "\n" in value:
                value = value.translate(_NEWLINES)
            parts += (name, value, "\r\n")
    parts.append("\r\n")
    return "".join(parts).encode()


def _parsed_name(raw: bytes) -> str | None:
    """The name of a header line as nats-py reads it (``""`` included); ``None`` for one it skips
    (non-ASCII bytes, whitespace inside)."""
    if raw in _parsed_names:
        return _parsed_names[raw]
    try:
        found: str | None = raw.strip().decode("ascii")
    except UnicodeDecodeError:
        found = None
    if found is not None and any(c.isspace() for c in found):
        found = None
    if len(_parsed_names) < CACHE_LIMIT:
        _parsed_names[raw] = found
    return found


def parse(raw: bytes) -> dict[str, str]:
    """The headers of a header block's lines (after the ``NATS/1.0`` line), as nats-py parses them."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and (key := _parsed_name(name)) is not None:
            out[key] = value.strip().decode("utf-8", "replace")
    return out


class MessageTooLarge(errors.MaxPayloadError):
    """Headers and payload together are over the server's ``max_payload``; nothing was sent."""

    def __init__(self, size: int, max_payload: int) -> None:
        super().__init__()
        self.size = size
        self.max_payload = max_payload

    def __str__(self) -> str:
        return f"nats: message of {self.size} bytes (headers included) exceeds max_payload {self.max_payload}"


def too_large(exc: errors.MaxPayloadError, payload: bytes, max_payload: int) -> TooLarge:
    """The caller's 413 for a message NATS cannot carry (nats-py refuses a payload over the limit by itself,
    :class:`MessageTooLarge` one that its headers push over it)."""
    return TooLarge(exc.size if isinstance(exc, MessageTooLarge) else len(payload), max_payload)


async def _send_publish(self: nats_client.Client, subject: str, reply: str, payload: bytes, payload_size: int,
                        headers: dict[str, Any] | None) -> None:
    """nats-py's ``Client._send_publish`` with :func:`encode` building the header block, refusing a message
    the server would close the connection for."""
    if subject == "":
        raise errors.BadSubjectError
    if headers is None:
        pub_cmd = prot_command.pub_cmd(subject, reply, payload)
    else:
        block = encode(headers)
        if len(block) + payload_size > self._max_payload:
            raise MessageTooLarge(len(block) + payload_size, self._max_payload)
        pub_cmd = prot_command.hpub_cmd(subject, reply, block, payload)
    self.stats["out_msgs"] += 1
    self.stats["out_bytes"] += payload_size
    await self._send_command(pub_cmd)
    if self._flush_queue is not None and self._flush_queue.empty():
        await self._flush_pending()


def install() -> bool:
    """Use the functions above in every nats-py client of this process; False (and a warning) when the
    installed nats-py is not the version they copy."""
    if nats_client.Client._send_publish is _send_publish:
        return True
    version = nats_client.__version__
    if version != WRITTEN_FOR:
        log.warning("nats-py header fast path not installed: written for another version",
                    installed=version, written_for=WRITTEN_FOR)
        return False
    nats_client.Client._send_publish = _send_publish  # type: ignore[method-assign]  # the point of this module
    nats_client.Client._parse_header_lines = staticmethod(parse)  # type: ignore[method-assign]
    return True


def original(name: str) -> Any:
    """nats-py's own method ``name`` (``_send_publish`` or ``_parse_header_lines``), for comparisons."""
    return _ORIGINAL[name]
