"""Configuration store benchmark: writes/s, and reads/s of the current value from Redis and from PostgreSQL.

Run: ``python bench/bench_config.py [--writes N] [--reads N]``. It uses the servers of the settings
(``BACKBONE_*``), starting the embedded dev stack for those not configured, creates a scratch
database (dropped at the end), writes N versions of one key through :class:`ConfigStore`, relays
them to a scratch topic, projects them into Redis, then times ``Config.current`` on Redis and
``ConfigStore.get`` on PostgreSQL. Prints a table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql
from pydantic import SecretStr

from backbone.devstack import DevStack
from backbone.settings import PostgresSettings, RedisSettings, Settings
from configuration.projection import Config, ConfigProjection
from configuration.relay import OutboxRelay
from configuration.store import ConfigStore

__all__ = ["main"]


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--reads", type=int, default=2000)
    args = parser.parse_args(argv)
    state_dir = Path(tempfile.mkdtemp(prefix="bench-config-"))
    with DevStack(Settings(state_dir=state_dir), state_dir=state_dir) as info:
        database = f"bench_config_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(info.postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(database)))
        pg_url = urlunsplit(urlsplit(info.postgres_url)._replace(path=f"/{database}"))
        settings = Settings(
            state_dir=state_dir,
            postgres=PostgresSettings(url=SecretStr(pg_url)),
            redis=RedisSettings(url=SecretStr(info.redis_url)),
        )
        settings = settings.model_copy(
            update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": info.kafka_bootstrap})}
        )
        topic = f"bench-config-{uuid.uuid4().hex[:8]}"
        admin = AdminClient(settings.kafka.librdkafka())
        admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)
        prefix = f"bench:{uuid.uuid4().hex[:8]}:"
        store = ConfigStore(settings)
        try:
            t0 = time.perf_counter()
            for i in range(args.writes):
                store.set("bench.key", {"i": i, "pad": "x" * 64}, author="bench", reason=f"write {i}")
            write_seconds = time.perf_counter() - t0

            relay = OutboxRelay(settings, topic=topic, name="bench", batch_size=500)
            t0 = time.perf_counter()
            while relay.run_once():
                pass
            relay_seconds = time.perf_counter() - t0
            relay.close()

            projection = ConfigProjection(settings, topic=topic, group_id=f"bench-{topic}", prefix=prefix)
            deadline = time.monotonic() + 60
            while projection.applied + projection.skipped < args.writes and time.monotonic() < deadline:
                projection.run_once(0.5)
            projection.close()

            config = Config(settings, store=store, prefix=prefix)
            assert config.current_entry("bench.key").source == "redis"
            t0 = time.perf_counter()
            for _ in range(args.reads):
                config.current("bench.key")
            redis_seconds = time.perf_counter() - t0
            config.redis.close()

            t0 = time.perf_counter()
            for _ in range(args.reads):
                store.get("bench.key")
            pg_seconds = time.perf_counter() - t0
        finally:
            store.close()
            with psycopg.connect(info.postgres_url, autocommit=True) as conn:
                conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(database)))

    print(f"{'config benchmark':<44}{'ops':>8}{'ops/s':>12}")
    print(f"{'writes (ConfigStore.set, PostgreSQL)':<44}{args.writes:>8}{_rate(args.writes, write_seconds):>12}")
    print(f"{'relay to Kafka (acked, position recorded)':<44}{args.writes:>8}{_rate(args.writes, relay_seconds):>12}")
    print(f"{'reads of the current value from Redis':<44}{args.reads:>8}{_rate(args.reads, redis_seconds):>12}")
    print(f"{'reads of the current value from PostgreSQL':<44}{args.reads:>8}{_rate(args.reads, pg_seconds):>12}")


if __name__ == "__main__":
    main()
