"""Shared pytest fixtures: one dev stack per session, and per-test databases, Redis and names.

By default the session starts an embedded :class:`backbone.devstack.DevStack` (Tansu, PostgreSQL,
Redis on free ports) in a temporary directory and stops it at the end. With
``BACKBONE_TEST_EXTERNAL=1`` it uses the servers named by ``BACKBONE_KAFKA__BOOTSTRAP_SERVERS``,
``BACKBONE_POSTGRES__URL`` and ``BACKBONE_REDIS__URL`` (after checking that they answer); a
component whose variable is unset is still started embedded.

Fixtures:
    stack (session): the :class:`~backbone.devstack.StackInfo` of the servers.
    settings (session): :class:`~core.settings.Settings` pointing at them.
    pg_url: URL of a fresh, empty PostgreSQL database for this test, dropped afterwards.
    redis_url: URL of the stack's Redis database, flushed before the test.
    unique_name: ``unique_name(prefix) -> str``, unique topic / consumer-group names per test.
    kafka_admin (session): a confluent-kafka ``AdminClient`` on the stack.
    create_topic: ``create_topic(name, partitions=3) -> name``, returns once metadata shows it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql
from pydantic import SecretStr

from backbone.devstack import DevStack, StackInfo
from core.settings import KafkaSettings, PostgresSettings, RedisSettings, Settings

EXTERNAL_ENV = "BACKBONE_TEST_EXTERNAL"
_TOPIC_TIMEOUT_SECONDS = 30.0


def _external() -> bool:
    return os.environ.get(EXTERNAL_ENV, "") == "1"


def _base_settings(state_dir: Path) -> Settings:
    """Settings whose servers come from the environment in external mode, and are empty otherwise."""
    if _external():
        return Settings(state_dir=state_dir)
    return Settings(
        kafka=KafkaSettings(), postgres=PostgresSettings(), redis=RedisSettings(), state_dir=state_dir
    )


@pytest.fixture(scope="session")
def stack() -> Iterator[StackInfo]:
    """The session's Kafka, PostgreSQL and Redis: embedded, or from the environment in external mode.

    The state dir is a plain temp dir, not under pytest's basetemp: another pytest session on the
    machine prunes old basetemps (and resets their mode to 0700), which would pull the data dir from
    under a running PostgreSQL.
    """
    state_dir = Path(tempfile.mkdtemp(prefix="backbone-test-stack-"))
    state_dir.chmod(0o711)  # the embedded PostgreSQL runs as its own system user when we are root
    devstack = DevStack(
        _base_settings(state_dir), state_dir=state_dir, durable=False
    )  # tests: speed over crash safety
    info = devstack.start()
    try:
        yield info
    finally:
        devstack.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(stack: StackInfo) -> Settings:
    """Settings pointing at the session's stack (built explicitly, not read from the environment)."""
    kafka = _base_settings(stack.state_dir).kafka
    return Settings(
        kafka=kafka.model_copy(update={"bootstrap_servers": stack.kafka_bootstrap}),
        postgres=PostgresSettings(url=SecretStr(stack.postgres_url)),
        redis=RedisSettings(url=SecretStr(stack.redis_url)),
        state_dir=stack.state_dir,
    )


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture
def pg_url(stack: StackInfo) -> Iterator[str]:
    """URL of a fresh, empty database (random name) on the stack's PostgreSQL, dropped after the test."""
    database = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(stack.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(database)))
    try:
        yield _with_database(stack.postgres_url, database)
    finally:
        with psycopg.connect(stack.postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(database)))


@pytest.fixture
def redis_url(stack: StackInfo) -> str:
    """URL of the stack's Redis (db 0 unless the configured URL names another), flushed before the test."""
    client = redis.Redis.from_url(stack.redis_url)
    try:
        client.flushdb()
    finally:
        client.close()
    return stack.redis_url


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """A factory of names unique to this test and call: ``unique_name("orders") -> "orders-test-x-1a2b3c4d"``."""
    test = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:40]

    def make(prefix: str) -> str:
        return f"{prefix}-{test}-{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture(scope="session")
def kafka_admin(settings: Settings) -> AdminClient:
    """A confluent-kafka AdminClient on the session's broker."""
    return AdminClient(settings.kafka.librdkafka())


@pytest.fixture
def create_topic(kafka_admin: AdminClient) -> Callable[..., str]:
    """``create_topic(name, partitions=3) -> name``: create a topic and wait until metadata shows it."""

    def create(name: str, partitions: int = 3) -> str:
        futures = kafka_admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        futures[name].result(timeout=_TOPIC_TIMEOUT_SECONDS)
        deadline = time.monotonic() + _TOPIC_TIMEOUT_SECONDS
        while True:
            topic = kafka_admin.list_topics(topic=name, timeout=5).topics.get(name)
            if topic is not None and topic.error is None and len(topic.partitions) == partitions:
                return name
            if time.monotonic() >= deadline:
                raise TimeoutError(f"topic {name!r} not in metadata after {_TOPIC_TIMEOUT_SECONDS} s")
            time.sleep(0.1)

    return create
