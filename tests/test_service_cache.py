"""Cache keys, the in-process LRU, and Redis (a private real redis-server) going away and coming back."""
from __future__ import annotations

import asyncio
import time

from conceptlens.service.cache import MemoryCache, RedisCache, TieredCache, cache_key, make_cache
from conceptlens.service.serve_process import free_port


class Counts:
    def __init__(self):
        self.hits = self.misses = self.errors = 0
        self.log: list[tuple[str, str]] = []  # (event, backend)

    def cache_hit(self, backend):
        self.hits += 1
        self.log.append(("hit", backend))

    def cache_miss(self, backend):
        self.misses += 1
        self.log.append(("miss", backend))

    def cache_error(self, backend, operation):
        self.errors += 1
        self.log.append(("error", backend))


def test_key_depends_on_every_part():
    base = cache_key("ns", "bundle1", b"opts", b"image")
    assert base == cache_key("ns", "bundle1", b"opts", b"image")
    assert base.startswith("ns:") and len(base) == 3 + 64
    others = {cache_key("ns2", "bundle1", b"opts", b"image"), cache_key("ns", "bundle2", b"opts", b"image"),
              cache_key("ns", "bundle1", b"opts2", b"image"), cache_key("ns", "bundle1", b"opts", b"image2"),
              cache_key("ns", "bundle1", b"optsi", b"mage")}  # no ambiguity at part boundaries
    assert base not in others and len(others) == 5


async def test_memory_cache_lru_ttl_and_counts():
    now = [0.0]
    counts = Counts()
    c = MemoryCache(max_entries=2, max_bytes=10, ttl_s=5, metrics=counts, clock=lambda: now[0])
    c.put("a", b"1234")
    c.put("b", b"5678")
    assert await c.get("a") == b"1234"  # a is now the most recent
    c.put("c", b"90")  # evicts b (least recently used)
    assert await c.get("b") is None and await c.get("c") == b"90"
    c.put("d", b"123456")  # 4 + 2 + 6 > 10 bytes: evicts until it fits
    assert len(c) <= 2 and await c.get("d") == b"123456"
    now[0] = 6.0
    assert await c.get("d") is None  # expired
    c.put("big", b"x" * 11)  # larger than the cache: not stored
    assert await c.get("big") is None
    assert counts.hits == 3 and counts.misses == 3 and counts.errors == 0


def test_make_cache_picks_backend():
    assert make_cache(None, 0, 60) is None
    assert isinstance(make_cache(None, 10, 60), MemoryCache)
    assert isinstance(make_cache("redis://127.0.0.1:1/0", 0, 60), RedisCache)
    tiered = make_cache("redis://127.0.0.1:1/0", 10, 60)
    assert isinstance(tiered, TieredCache) and tiered.near.max_entries == 10


async def test_redis_roundtrip_with_ttl(redis_server):
    counts = Counts()
    c = RedisCache(redis_server.url, ttl_s=30, metrics=counts)
    assert await c.get("k1") is None
    c.put("k1", b"\x00value")
    await c.flush_writes()
    assert await c.get("k1") == b"\x00value"
    ttl = await c._client.pttl("k1")
    assert 0 < ttl <= 30_000
    assert (counts.hits, counts.misses, counts.errors) == (1, 1, 0)
    await c.close()


async def test_redis_unreachable_is_a_miss_not_an_error():
    counts = Counts()
    c = RedisCache(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.05, retry_after_s=60, metrics=counts)
    assert await c.get("k") is None
    c.put("k", b"v")  # skipped while Redis is considered down
    await c.flush_writes()
    assert await c.get("k") is None  # not even tried again within retry_after_s
    assert counts.errors == 1 and counts.misses == 2 and not c.available
    await c.close()


async def test_redis_stop_and_restart_recovers_by_itself(redis_server):
    counts = Counts()
    c = RedisCache(redis_server.url, timeout_s=0.1, retry_after_s=0.2, metrics=counts)
    c.put("k", b"v")
    await c.flush_writes()
    assert await c.get("k") == b"v"
    redis_server.stop()
    assert await c.get("k") is None  # error -> miss
    assert counts.errors == 1
    redis_server.start()  # same port, empty (no persistence)
    deadline = time.monotonic() + 10
    while True:  # after retry_after_s the next lookups reconnect by themselves: polled until they have
        c.put("k2", b"v2")
        await c.flush_writes()
        if await c.get("k2") == b"v2":
            break
        assert time.monotonic() < deadline, "the cache never reconnected to the restarted Redis"
        await asyncio.sleep(0.05)
    assert await c.get("k2") == b"v2" and counts.errors == 1  # reconnected without another error
    await c.close()


async def test_tiered_cache_near_first_then_redis_shared_by_replicas(redis_server):
    """Two replicas on one Redis: a replica's own answers come from its memory; another replica's
    come from Redis once, then from memory; with Redis gone, memory still answers what it holds."""
    ca, cb = Counts(), Counts()
    a = make_cache(redis_server.url, 8, 30, timeout_s=0.1, retry_after_s=60, metrics=ca)
    b = make_cache(redis_server.url, 8, 30, timeout_s=0.1, retry_after_s=60, metrics=cb)
    a.put("k", b"answer")
    await a.flush_writes()
    assert await a.get("k") == b"answer" and ca.log == [("hit", "memory")]  # Redis not asked
    assert await b.get("k") == b"answer" and cb.log == [("miss", "memory"), ("hit", "redis")]
    assert await b.get("k") == b"answer" and cb.log[-1] == ("hit", "memory")  # copied near
    assert await a.get("absent") is None and ca.log[-2:] == [("miss", "memory"), ("miss", "redis")]
    redis_server.stop()
    try:
        assert await b.get("k") == b"answer"  # memory still answers
        assert await b.get("other") is None and cb.errors == 1  # Redis down: a miss, never an error
    finally:
        redis_server.start()
        await a.close()
        await b.close()
