"""The API's token cache: a cached token costs no PostgreSQL query, a revocation reaches every cache by
``NOTIFY`` within moments, and a cache whose revocation listener lost its connection is not used."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from backbone.http.auth import TokenStore

pytestmark = [pytest.mark.integration]


@pytest.fixture
def pool(pg_url: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(pg_url, min_size=1, max_size=2, open=True) as p:
        TokenStore(p).ensure_schema()
        yield p


def _until(predicate: Callable[[], bool], seconds: float) -> float:
    """Seconds until ``predicate()`` held; fails after ``seconds``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.01)
    return time.monotonic() - start


def test_cached_tokens_are_served_from_memory_and_revoked_at_once(pool: ConnectionPool, pg_url: str) -> None:
    api = TokenStore(pool, cache_seconds=30)  # what an API process holds
    cli = TokenStore(pool)  # what `backbone api token revoke` uses, in another process
    api.start_listener()
    try:
        _until(lambda: api.listening, 10)
        token, info = cli.create("cached", ["produce:*"])
        assert api.authenticate(token) is not None
        # gone from the table without a notification: the cache answers (no query was made)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("delete from backbone_api.tokens where token_id = %s", (info.token_id,))
        assert api.authenticate(token) is not None

        other, other_info = cli.create("revoked", ["produce:*"])
        assert api.authenticate(other) is not None
        cli.revoke(other_info.token_id)
        assert _until(lambda: api.authenticate(other) is None, 2) < 2  # NOTIFY evicted it

        # the listener's connection dropped: the cache is emptied and not used until it is back
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity"
                " where datname = current_database() and query ilike 'listen%%'"
            )
        _until(lambda: api.authenticate(token) is None, 5)  # the deleted token is looked up again
        _until(lambda: api.listening, 10)  # reconnected
        third, third_info = cli.create("after reconnect", ["produce:*"])
        assert api.authenticate(third) is not None
        cli.revoke(third_info.token_id)
        _until(lambda: api.authenticate(third) is None, 2)
    finally:
        api.stop_listener()
    assert not api.listening


def test_without_a_listener_every_call_queries(pool: ConnectionPool, pg_url: str) -> None:
    """The cache is off until ``start_listener``: a revocation is seen by the very next call."""
    store = TokenStore(pool, cache_seconds=30)
    token, info = store.create("plain", ["produce:*"])
    assert store.authenticate(token) is not None
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "update backbone_api.tokens set revoked_at = now() where token_id = %s", (info.token_id,)
        )
    assert store.authenticate(token) is None


def test_api_processes_starting_together_create_the_schema_once(pg_url: str) -> None:
    # eight API processes starting at once on a fresh database: `create schema if not exists` run
    # concurrently raises a unique violation on pg_namespace (seen in a fresh-clone check: the API exited
    # at startup); ensure_schema takes turns on an advisory lock, so every one of them starts
    import threading

    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def start() -> None:
        with ConnectionPool(pg_url, min_size=1, max_size=1, open=True) as p:
            barrier.wait()
            try:
                TokenStore(p).ensure_schema()
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
