"""The in-memory copies of cache entries in front of the KV bucket."""

from __future__ import annotations

from schemas.chat import Usage
from services.cloud_adapter.cache import Entry
from services.cloud_adapter.near_cache import NearCache


def entry(text: str) -> Entry:
    return Entry({"role": "assistant", "content": text}, "stop", Usage.of(1, 1))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TestNearCache:
    def test_hit_then_expiry(self) -> None:
        """A held entry is served until its time in memory is up, then the KV bucket decides again."""
        clock = Clock()
        near = NearCache(max_bytes=1000, ttl_s=30, clock=clock)
        near.put("k", entry("a"), 100)
        clock.now = 29.9
        assert near.get("k") == entry("a")
        clock.now = 30.0
        assert near.get("k") is None
        assert near.size_bytes == 0

    def test_a_copy_lives_no_longer_than_its_entry_in_the_bucket(self) -> None:
        """An entry read from the bucket with 5 s of its TTL left is held 5 s, not the near cache's 30; one
        with none left is not held."""
        clock = Clock()
        near = NearCache(max_bytes=1000, ttl_s=30, clock=clock)
        near.put("k", entry("a"), 100, ttl_s=5)
        near.put("gone", entry("b"), 100, ttl_s=0)
        assert near.get("gone") is None
        clock.now = 4.9
        assert near.get("k") == entry("a")
        clock.now = 5.0
        assert near.get("k") is None

    def test_entries_keep_their_fingerprint_and_time(self) -> None:
        """What a hit gives back: the provider's system_fingerprint, and when the answer was stored."""
        stored = Entry({"role": "assistant", "content": "a"}, "stop", Usage.of(1, 1), "fp_1", 1_700_000_000.5)
        back = Entry.decode(stored.encode())
        assert back is not None
        assert (back, back.fingerprint, back.stored_at) == (stored, "fp_1", 1_700_000_000.5)

    def test_bounded_in_bytes_least_recently_used_goes(self) -> None:
        """Past the byte bound the least recently used entries are dropped; a recent read keeps one."""
        near = NearCache(max_bytes=300, ttl_s=60)
        for key in ("a", "b", "c"):
            near.put(key, entry(key), 100)
        assert near.get("a") is not None
        near.put("d", entry("d"), 100)
        assert near.get("b") is None
        assert [near.get(k) is not None for k in ("a", "c", "d")] == [True, True, True]
        assert near.size_bytes == 300

    def test_too_large_or_disabled(self) -> None:
        """An entry larger than the bound is not held; a bound of 0 holds nothing."""
        assert NearCache(max_bytes=50, ttl_s=60).get("x") is None
        near = NearCache(max_bytes=50, ttl_s=60)
        near.put("x", entry("x"), 51)
        assert near.get("x") is None
        off = NearCache(max_bytes=0, ttl_s=60)
        off.put("x", entry("x"), 1)
        assert off.get("x") is None
