"""Recently used cache entries in memory, in front of the ``cloud-cache`` KV bucket. No I/O.

An entry never changes under its key (the key hashes everything the answer depends on); it only expires.
So a copy in memory is safe to serve for a short while: a hit skips a JetStream round trip. The KV bucket
stays the store every adapter shares; the copy lives at most ``ttl_s`` (an entry purged from KV, or past
its KV TTL, can be served from memory for at most that long) and the copies together take at most
``max_bytes``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass
class NearCache(Generic[V]):
    """A least-recently-used map of cache entries, bounded in bytes and in age."""

    max_bytes: int
    ttl_s: float
    clock: Callable[[], float] = time.monotonic
    _entries: OrderedDict[str, tuple[float, int, V]] = field(default_factory=OrderedDict)
    _bytes: int = 0

    def get(self, key: str) -> V | None:
        """The entry under ``key`` if held and young enough."""
        held = self._entries.get(key)
        if held is None:
            return None
        expires, _, entry = held
        if self.clock() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: V, size: int, ttl_s: float | None = None) -> None:
        """Hold ``entry`` (``size``: its encoded bytes) for ``ttl_s`` at most (what is left of its life in the
        bucket, when known), evicting the least recently used past the bound."""
        life = self.ttl_s if ttl_s is None else min(self.ttl_s, ttl_s)
        if size > self.max_bytes or life <= 0:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self.clock() + life, size, entry)
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    @property
    def size_bytes(self) -> int:
        """Bytes held."""
        return self._bytes

    def _drop(self, key: str) -> None:
        _, size, _ = self._entries.pop(key)
        self._bytes -= size
