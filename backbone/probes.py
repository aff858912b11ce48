"""Probes of the servers a dev stack uses: does Kafka, PostgreSQL or Redis answer, and the checks that
turn a configured server that does not answer into a :class:`~backbone.errors.StackError` naming it."""

from __future__ import annotations

from typing import Any

from backbone.errors import StackError
from backbone.processes import redact
from core.settings import Settings

__all__ = [
    "check_kafka",
    "check_postgres",
    "check_redis",
    "create_database",
    "kafka_answers",
    "postgres_answers",
    "redis_answers",
]


def kafka_answers(bootstrap: str, timeout_seconds: float = 2.0, **conf: Any) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, **conf})
    metadata = admin.list_topics(timeout=timeout_seconds)
    return bool(metadata.brokers)


def postgres_answers(url: str, timeout_seconds: int = 2) -> bool:
    import psycopg

    with psycopg.connect(url, connect_timeout=timeout_seconds, autocommit=True) as conn:
        return conn.execute("select 1").fetchone() == (1,)


def redis_answers(url: str, timeout_seconds: float = 2.0) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_seconds, socket_timeout=timeout_seconds)
    try:
        return bool(client.ping())
    finally:
        client.close()


def check_kafka(settings: Settings, timeout_seconds: float) -> None:
    from confluent_kafka import KafkaException

    bootstrap = settings.kafka.bootstrap_servers
    try:
        conf = settings.kafka.librdkafka()
        conf.pop("bootstrap.servers")
        ok = kafka_answers(bootstrap, timeout_seconds=timeout_seconds, **conf)
    except KafkaException as exc:
        raise StackError(
            f"Kafka at {bootstrap} (BACKBONE_KAFKA__BOOTSTRAP_SERVERS) is not reachable: {exc}"
        ) from exc
    if not ok:
        raise StackError(f"Kafka at {bootstrap} (BACKBONE_KAFKA__BOOTSTRAP_SERVERS) lists no broker")


def check_postgres(url: str, timeout_seconds: float) -> None:
    import psycopg

    try:
        postgres_answers(url, timeout_seconds=max(1, round(timeout_seconds)))
    except psycopg.Error as exc:
        raise StackError(
            f"PostgreSQL at {redact(url)} (BACKBONE_POSTGRES__URL) is not reachable: {exc}"
        ) from exc


def check_redis(url: str, timeout_seconds: float) -> None:
    import redis

    try:
        redis_answers(url, timeout_seconds=timeout_seconds)
    except (redis.RedisError, ValueError) as exc:
        raise StackError(f"Redis at {redact(url)} (BACKBONE_REDIS__URL) is not reachable: {exc}") from exc


def create_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
            if exists is None:
                conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise StackError(f"could not create database {name!r} on the embedded PostgreSQL: {exc}") from exc
