"""Integration tests of the outbox relay (real PostgreSQL and Tansu) and the Redis current-value model."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import KafkaError
from pydantic import SecretStr

from configuration.aggregate import aggregate_id_for
from configuration.projection import Config, ConfigProjection
from configuration.relay import CONFIG_CHANGE_SCHEMA, OutboxRelay
from configuration.store import ConfigStore, event_id_for
from core.settings import PostgresSettings, RedisSettings, Settings
from streams.consumer import ConsumedEvent, decode_message, make_consumer
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _with(settings: Settings, pg_url: str, redis_url: str | None = None) -> Settings:
    update: dict[str, object] = {"postgres": PostgresSettings(url=SecretStr(pg_url))}
    if redis_url:
        update["redis"] = RedisSettings(url=SecretStr(redis_url))
    return settings.model_copy(update=update)


def _read_topic(
    settings: Settings, topic: str, group: str, want_ids: set[str], timeout_seconds: float = 60.0
) -> list[ConsumedEvent]:
    """Every record of ``topic`` until all ``want_ids`` were seen (partition EOF reached) or the timeout."""
    serde = AvroSerde(EmbeddedRegistry())
    consumer = make_consumer(settings.kafka, group, **{"enable.partition.eof": True})
    consumer.subscribe([topic])
    out: list[ConsumedEvent] = []
    deadline = time.monotonic() + timeout_seconds
    try:
        while time.monotonic() < deadline:
            for m in consumer.consume(500, 0.5):
                if m.error() is not None:
                    assert m.error().code() == KafkaError._PARTITION_EOF, m.error()
                    continue
                e = decode_message(serde, m)
                assert isinstance(e, ConsumedEvent), e
                out.append(e)
            if want_ids <= {e.attributes.id for e in out}:
                break
    finally:
        consumer.close()
    return out


def _expected_ids(store: ConfigStore, keys: list[str]) -> set[str]:
    ids = set()
    for key in keys:
        for v in range(1, store.get(key).version + 1):
            ids.add(event_id_for(aggregate_id_for(key), v))
    return ids


@pytest.mark.slow
def test_every_event_reaches_the_topic_once_after_dedup_across_sigkills(
    settings: Settings,
    pg_url: str,
    create_topic: Callable[..., str],
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """A relay subprocess killed with SIGKILL at random points while writers write still publishes every stored event, in order per key."""
    topic = create_topic(unique_name("config.changes"), partitions=3)
    cfg = _with(settings, pg_url)
    store = ConfigStore(cfg)
    keys = [f"misc.key{i}" for i in range(6)]
    env = {
        **os.environ,
        "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BACKBONE_POSTGRES__URL": pg_url,
        "BACKBONE_STATE_DIR": str(tmp_path),
        "BACKBONE_LOG_FORMAT": "json",
    }
    argv = [
        sys.executable,
        "-m",
        "configuration.relay",
        "--topic",
        topic,
        "--name",
        "kill-test",
        "--batch-size",
        "15",
    ]
    log_file = (tmp_path / "relay.log").open("ab")

    started_at = [0]  # where the newest relay's lines begin in relay.log

    def start() -> subprocess.Popen[bytes]:
        log_file.flush()
        started_at[0] = (tmp_path / "relay.log").stat().st_size
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)

    rng = random.Random(4)
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(240):
                key = keys[i % len(keys)]
                store.set(key, {"i": i}, author="writer", reason=f"change {i}")
                time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    kills = 0
    proc = start()
    try:
        while not done.is_set() or kills < 4:
            time.sleep(rng.uniform(0.8, 2.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            proc = start()
        thread.join()
        assert errors == []
        last = store.app.recorder.max_notification_id()
        with psycopg.connect(pg_url) as conn:
            deadline = time.monotonic() + 60
            while True:
                row = conn.execute(
                    "select notification_id from config_relay_position where relay_name = 'kill-test'"
                ).fetchone()
                conn.commit()
                if row and row[0] == last:
                    break
                assert time.monotonic() < deadline, f"relay stuck at {row} of {last}"
                time.sleep(0.2)
        # the last relay may still be starting (its SIGTERM handler not installed yet): wait for it (a
        # count over the whole log would not do: a relay killed while importing never logged its start)
        deadline = time.monotonic() + 60
        while "config_relay.started" not in (tmp_path / "relay.log").read_bytes()[started_at[0] :].decode(
            errors="replace"
        ):
            assert time.monotonic() < deadline, "the last relay never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
    want = _expected_ids(store, keys)
    assert len(want) == 240
    records = _read_topic(cfg, topic, unique_name("check"), want)
    seen: dict[str, ConsumedEvent] = {}
    for r in records:
        seen.setdefault(r.attributes.id, r)
    assert set(seen) == want  # every stored event, nothing else
    by_key: dict[str, list[int]] = {}
    first_seen: set[str] = set()
    for r in records:  # order per key (within its partition) after de-duplication by event id
        if r.attributes.id in first_seen:
            continue
        first_seen.add(r.attributes.id)
        by_key.setdefault(r.key or "", []).append(r.data["version"])
    for key in keys:
        assert by_key[key] == sorted(by_key[key]) and len(by_key[key]) == 40
    assert all(r.schema == CONFIG_CHANGE_SCHEMA and r.key == r.data["key"] for r in records)
    print(
        f"\n{kills} SIGKILLs, {len(records)} records for {len(want)} events ({len(records) - len(want)} duplicates)"
    )
    store.close()


def test_projection_keeps_redis_current_and_config_reads_it(
    settings: Settings,
    pg_url: str,
    redis_url: str,
    create_topic: Callable[..., str],
    unique_name: Callable[[str], str],
) -> None:
    """After relay and projection run, Config.current reads Redis; a duplicate is a no-op; an unprojected key falls back to PostgreSQL."""
    topic = create_topic(unique_name("config.changes"), partitions=3)
    cfg = _with(settings, pg_url, redis_url)
    prefix = f"{unique_name('cfg')}:"
    store = ConfigStore(cfg)
    relay = OutboxRelay(cfg, topic=topic, name=unique_name("relay"), batch_size=50)
    projection = ConfigProjection(cfg, topic=topic, group_id=unique_name("proj"), prefix=prefix)
    config = Config(cfg, store=store, prefix=prefix)
    try:
        store.set("healing.thresholds", {"error_rate": 0.2}, author="t", reason="init")
        store.set("healing.thresholds", {"error_rate": 0.1}, author="t", reason="tighter")
        store.rollback("healing.thresholds", to_version=1, author="t", reason="undo")
        store.set("misc.gone", {"x": 1}, author="t", reason="init")
        store.retire("misc.gone", author="t", reason="bye")
        assert relay.lag() == 5
        while relay.run_once():
            pass
        assert relay.lag() == 0
        assert relay.metrics.registry.get_sample_value("backbone_config_relay_published_events_total") == 5
        deadline = time.monotonic() + 30
        while projection.applied < 5 and time.monotonic() < deadline:
            projection.run_once(0.5)
        entry = config.current_entry("healing.thresholds")
        assert (entry.source, entry.version, entry.value["error_rate"]) == ("redis", 3, 0.2)
        with pytest.raises(LookupError):
            config.current("misc.gone")
        # a re-published (duplicate) older event does not move the model back
        relay._record_position(0)
        while relay.run_once():
            pass
        deadline = time.monotonic() + 20
        while projection.skipped < 5 and time.monotonic() < deadline:
            projection.run_once(0.5)
        assert projection.skipped == 5 and config.current_entry("healing.thresholds").version == 3
        store.set("misc.unprojected", {"y": 2}, author="t", reason="not relayed yet")
        fallback = config.current_entry("misc.unprojected")
        assert (fallback.source, fallback.value) == ("postgres", {"y": 2})
    finally:
        projection.close()
        relay.close()
        config.close()
        store.close()


def test_projection_rebuilds_redis_after_a_flush_or_an_older_snapshot(
    settings: Settings,
    pg_url: str,
    redis_url: str,
    create_topic: Callable[..., str],
    unique_name: Callable[[str], str],
) -> None:
    """The read model's position lives in Redis with its values: when Redis loses both (a flush) or goes back
    to an older state (a snapshot restored), the running projection seeks back and rebuilds from the log, and
    Config.current never keeps serving the stale value."""
    import redis

    topic = create_topic(unique_name("config.changes"), partitions=2)
    cfg = _with(settings, pg_url, redis_url)
    prefix = f"{unique_name('cfg')}:"
    store = ConfigStore(cfg)
    relay = OutboxRelay(cfg, topic=topic, name=unique_name("relay"), batch_size=50)
    projection = ConfigProjection(cfg, topic=topic, group_id=unique_name("proj"), prefix=prefix)
    config = Config(cfg, store=store, prefix=prefix)
    r = redis.Redis.from_url(redis_url)
    key = f"misc.flush-{unique_name('k').replace('_', '-')}"

    def project_until(pred: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not pred():
            assert time.monotonic() < deadline, what
            projection.run_once(0.2)

    try:
        for i in range(1, 4):
            store.set(key, {"i": i}, author="t", reason=f"v{i}")
        store.set("misc.other", {"x": 1}, author="t", reason="init")
        while relay.run_once():
            pass
        in_redis = lambda v: (
            (config.current_entry(key).source, config.current_entry(key).version) == ("redis", v)
        )
        project_until(lambda: in_redis(3), "projected")
        stored = {int(p): int(o) for p, o in r.hgetall(f"{prefix}__position__:{topic}").items()}
        assert sum(stored.values()) >= 4  # the positions were written with the values

        # a flush of the read model (the session's Redis is shared: only this prefix is deleted)
        r.delete(*r.keys(f"{prefix}*"))
        assert config.current_entry(key).source == "postgres"  # correct meanwhile, from the store
        time.sleep(1.0)
        project_until(lambda: in_redis(3), "rebuilt after the flush")
        assert projection.resyncs >= 1

        # an older snapshot: the entry and the position go back to version 1
        first = projection.resyncs
        (p,) = [p for p, o in stored.items() if o >= 3] or [max(stored, key=lambda q: stored[q])]
        r.hset(f"{prefix}current:{key}", mapping={"version": 1, "value": '{"i": 1}'})
        r.hset(f"{prefix}__position__:{topic}", str(p), 1)
        time.sleep(1.0)
        project_until(
            lambda: projection.resyncs > first and config.current_entry(key).version == 3, "caught up"
        )
        assert config.current(key) == {"i": 3}
    finally:
        projection.close()
        relay.close()
        config.close()
        store.close()
        r.close()
