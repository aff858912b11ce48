"""The API's rate limiter on its asyncio path against real Redis: leases spare Redis calls, never the limit."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio

from backbone.http.auth import RateLimiter

pytestmark = pytest.mark.integration


def _limiter(redis_url: str, lease_seconds: float) -> tuple[RateLimiter, redis.asyncio.Redis]:
    aclient = redis.asyncio.Redis.from_url(redis_url)
    return RateLimiter(redis.Redis.from_url(redis_url), aclient=aclient, lease_seconds=lease_seconds), aclient


def _stored_tokens(redis_url: str, key: str) -> float:
    raw = redis.Redis.from_url(redis_url).hget(f"backbone:api:rate:{key}", "tokens")
    assert raw is not None
    return float(raw)


def test_a_lease_takes_tokens_once_and_spends_them_without_redis(redis_url: str) -> None:
    """rate 100/s, lease 0.5 s: one Redis call takes 50 tokens; the next 49 requests leave the bucket as it is."""

    async def run() -> list[float]:
        limiter, aclient = _limiter(redis_url, lease_seconds=0.5)
        assert limiter.lease_size(100, 100_000) == 50
        first = await limiter.take_async("k", rate_per_second=100, burst=100_000)
        after_first = _stored_tokens(redis_url, "k")
        rest = [await limiter.take_async("k", rate_per_second=100, burst=100_000) for _ in range(49)]
        after_rest = _stored_tokens(redis_url, "k")
        await limiter.take_async("k", rate_per_second=100, burst=100_000)  # lease spent: a new one
        after_new = _stored_tokens(redis_url, "k")
        await aclient.aclose()
        return [first, *rest, after_first, after_rest, after_new]

    *waits, after_first, after_rest, after_new = asyncio.run(run())
    assert waits == [0.0] * 50
    assert after_first == after_rest == 100_000 - 50  # the bucket was full: no refill to add
    assert 100_000 - 100 <= after_new < 100_000 - 50


def test_leases_never_admit_more_than_the_shared_bucket_holds(redis_url: str) -> None:
    """Two API processes (two limiters) on one bucket of 20 that hardly refills admit 20 requests of 40,
    with leases of 2 tokens; the refused get the wait until the next token."""

    async def run() -> list[float]:
        a, ca = _limiter(redis_url, lease_seconds=1000)
        b, cb = _limiter(redis_url, lease_seconds=1000)
        assert a.lease_size(0.01, 20) == 2
        waits = []
        for i in range(40):
            limiter = a if i % 2 == 0 else b
            waits.append(await limiter.take_async("shared", rate_per_second=0.01, burst=20))
        await ca.aclose()
        await cb.aclose()
        return waits

    waits = asyncio.run(run())
    assert sum(w == 0.0 for w in waits) == 20
    assert waits[:20] == [0.0] * 20
    assert all(90 <= w <= 100 for w in waits[20:])  # one token at 0.01/s: up to 100 s


def test_slow_buckets_and_leases_off_ask_redis_every_time(redis_url: str) -> None:
    """Without leases, and for a bucket under 2 tokens per lease, the third quick request of a bucket of
    2 is refused, as with the blocking take()."""

    async def run(lease_seconds: float) -> list[float]:
        limiter, aclient = _limiter(redis_url, lease_seconds=lease_seconds)
        key = f"slow-{lease_seconds}"
        waits = [await limiter.take_async(key, rate_per_second=0.5, burst=2) for _ in range(3)]
        await aclient.aclose()
        return waits

    for lease_seconds in (0.0, 0.05):
        waits = asyncio.run(run(lease_seconds))
        assert waits[:2] == [0.0, 0.0] and 1.0 <= waits[2] <= 2.0


def test_concurrent_requests_share_one_lease_and_an_expired_lease_is_given_back(redis_url: str) -> None:
    """30 requests of one key at once make one Redis call (the bucket loses one lease, not 30); an
    expired lease's unspent tokens go back to the bucket with the next call (checked against the
    bucket's own clock)."""

    def bucket(key: str) -> tuple[float, int]:
        raw = redis.Redis.from_url(redis_url).hmget(f"backbone:api:rate:{key}", "tokens", "ts")
        assert raw[0] is not None and raw[1] is not None
        return float(raw[0]), int(raw[1])

    async def run() -> None:
        limiter, aclient = _limiter(redis_url, lease_seconds=0.5)
        waits = await asyncio.gather(
            *(limiter.take_async("burst", rate_per_second=100, burst=100_000) for _ in range(30))
        )
        assert list(waits) == [0.0] * 30
        assert bucket("burst")[0] == 100_000 - 50  # one lease of 50: 30 spent, 20 held

        limiter.lease_seconds = 0.2  # rate 10/s: leases of 2
        assert limiter.take("slow", rate_per_second=10, burst=1000, cost=500) == 0.0  # half empty: no cap
        assert await limiter.take_async("slow", rate_per_second=10, burst=1000) == 0.0  # lease of 2, 1 held
        before, ts_before = bucket("slow")
        await asyncio.sleep(0.3)  # the lease expires with 1 token unspent
        assert await limiter.take_async("slow", rate_per_second=10, burst=1000) == 0.0
        after, ts_after = bucket("slow")
        assert after == pytest.approx(before + 1 + (ts_after - ts_before) * 10 / 1000 - 2)
        await aclient.aclose()

    asyncio.run(run())
