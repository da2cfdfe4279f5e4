"""Server-sent events, parsed incrementally from whatever byte chunks the network delivers. No I/O.

Lines end with LF or CRLF; ``event:`` names the event, ``data:`` lines (joined with newlines) carry it, a
blank line ends it, ``:`` lines are comments (keep-alives). An event larger than the limit is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.errors import UpstreamError


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One server-sent event."""

    event: str
    data: str


def _bad(message: str) -> UpstreamError:
    return UpstreamError(message, code="upstream_bad_response", retryable=True)


@dataclass
class SSEParser:
    """Feed bytes in; get complete events out."""

    max_event_bytes: int = 1024 * 1024
    _buf: bytearray = field(default_factory=bytearray)
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _size: int = 0

    def feed(self, chunk: bytes) -> list[ServerEvent]:
        """Events completed by ``chunk``."""
        self._buf += chunk
        out: list[ServerEvent] = []
        start = 0
        while (end := self._buf.find(b"\n", start)) >= 0:
            line = bytes(self._buf[start:end])
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            event = self._line(line)
            if event is not None:
                out.append(event)
        del self._buf[:start]
        if len(self._buf) + self._size > self.max_event_bytes:
            raise _bad(f"a stream event is larger than {self.max_event_bytes} bytes")
        return out

    def close(self) -> list[ServerEvent]:
        """The end of the body: a last event without its closing blank line still counts."""
        tail = self.feed(b"\n") if self._buf else []
        if self._data:
            tail.append(self._dispatch())
        return tail

    def _line(self, line: bytes) -> ServerEvent | None:
        if not line:
            return self._dispatch() if self._data else None
        if line.startswith(b":"):
            return None
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        try:
            text = value.decode()
        except UnicodeDecodeError as exc:
            raise _bad("a stream event is not UTF-8") from exc
        if name == b"data":
            self._data.append(text)
            self._size += len(value)
        elif name == b"event":
            self._event = text
        return None

    def _dispatch(self) -> ServerEvent:
        event = ServerEvent(self._event or "message", "\n".join(self._data))
        self._event, self._data, self._size = "", [], 0
        return event
