"""Configuration store benchmark: writes/s, and reads/s of the current value from Redis and from PostgreSQL.

Run: ``python bench/bench_config.py [--writes N] [--reads N]``. It uses the servers of the settings
(``BACKBONE_*``), starting the embedded dev stack for those not configured, creates a scratch
database (dropped at the end), writes N versions of one key through :class:`ConfigStore`, relays
them to a scratch topic, projects them into Redis, then times ``Config.current`` on Redis and
``ConfigStore.get`` on PostgreSQL. Prints a table with, for each path, the bare operation it is
built on, timed in the same run: a raw ``INSERT`` per transaction, a raw ``HMGET``, a raw ``SELECT``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from backbone.devstack import DevStack
from configuration.aggregate import aggregate_id_for
from configuration.projection import Config, ConfigProjection
from configuration.relay import OutboxRelay
from configuration.store import ConfigStore
from core.settings import PostgresSettings, RedisSettings, Settings

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--reads", type=int, default=2000)
    args = parser.parse_args(argv)
    state_dir = Path(tempfile.mkdtemp(prefix="bench-config-"))
    with DevStack(Settings(state_dir=state_dir), state_dir=state_dir, durable=False) as info:
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

            # baselines, same servers, same run: the bare operation each path is built on
            raw_redis = redis.Redis.from_url(info.redis_url)
            hkey = f"{prefix}current:bench.key"
            t0 = time.perf_counter()
            for _ in range(args.reads):
                raw_redis.hmget(hkey, "version", "value", "change")
            raw_redis_seconds = time.perf_counter() - t0
            raw_redis.close()
            with psycopg.connect(pg_url, autocommit=True) as conn:
                table = conn.execute(
                    "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) FROM information_schema.tables "
                    "WHERE table_name LIKE '%events' AND table_schema NOT IN ('pg_catalog', 'information_schema') "
                    "ORDER BY table_name LIMIT 1"
                ).fetchone()[0]
                aggregate = str(aggregate_id_for("bench.key"))
                query = f"SELECT originator_version, state FROM {table} WHERE originator_id = %s "
                query += "ORDER BY originator_version DESC LIMIT 1"
                t0 = time.perf_counter()
                for _ in range(args.reads):
                    conn.execute(query, (aggregate,)).fetchone()
                raw_pg_seconds = time.perf_counter() - t0
                conn.execute("CREATE TABLE bench_raw_writes (i int, value jsonb)")
                t0 = time.perf_counter()
                for i in range(args.writes):
                    with conn.transaction():
                        conn.execute("INSERT INTO bench_raw_writes VALUES (%s, %s)",
                                     (i, json.dumps({"i": i, "pad": "x" * 64})))  # fmt: skip
                raw_write_seconds = time.perf_counter() - t0
        finally:
            store.close()
            with psycopg.connect(info.postgres_url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(database))
                )

    table = Table(title=f"configuration store ({args.writes:,} writes, {args.reads:,} reads)")
    for c in ("path", "ops/s", "baseline (same run)", "baseline ops/s", "ratio"):
        table.add_column(c, justify="left" if "path" in c or "(" in c else "right")
    rows = [
        ("writes (ConfigStore.set, PostgreSQL)", args.writes / write_seconds,
         "raw INSERT of the same JSON, one transaction each", args.writes / raw_write_seconds),
        ("relay to Kafka (acked, position recorded)", args.writes / relay_seconds, "", None),
        ("current value from Redis (Config.current)", args.reads / redis_seconds,
         "raw HMGET of the same hash", args.reads / raw_redis_seconds),
        ("current value from PostgreSQL (ConfigStore.get)", args.reads / pg_seconds,
         "raw SELECT of the newest stored event", args.reads / raw_pg_seconds),
    ]  # fmt: skip
    for name, rate, base_name, base in rows:
        table.add_row(name, f"{rate:,.0f}", base_name, f"{base:,.0f}" if base else "",
                      f"{rate / base:.2f}" if base else "")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
