"""The current-value read model of configuration in Redis, and ``Config.current(KEY)`` for services.

:class:`ConfigProjection` consumes ``config.changes`` and keeps one Redis hash per key
(``backbone:config:current:<key>``: ``version``, ``value`` (JSON text), ``change``, ``event_id``,
``author``, ``reason``, ``changed_at_ms``). A Lua script writes a change only when its version is
above the stored one, so re-published (duplicate) and out-of-date events are no-ops: the model is
idempotent, and de-duplicates by (key, version), which identifies the event id one-to-one.

The projection's position lives with the read model: each batch's values and the next offset of each
partition (hash ``<prefix>__position__:<topic>``, field = partition) are written in one ``MULTI``/``EXEC``,
so Redis never holds values without the position that produced them. On assignment a partition starts
at the position Redis holds (the beginning when it holds none), not at the group's committed offset
(committed too, for lag monitoring only). Before every batch (and every second when idle) the stored
positions are compared with what this process applied; when Redis is behind (flushed, restarted
empty, or restored from an older snapshot) every assigned partition is sought back to Redis's position
and the model rebuilt from the log. A Redis error is logged and the batch read again from that position
once Redis answers: nothing is lost and nothing stale stays.

:class:`Config` is the fast path services use: one Redis round-trip, falling back to PostgreSQL
(:class:`~configuration.store.ConfigStore`) when Redis has no entry for the key or cannot be reached.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from configuration.aggregate import ChangeKind
from configuration.errors import ConfigNotFoundError
from configuration.relay import CONFIG_CHANGE_SCHEMA, CONFIG_TOPIC
from configuration.schemas import check_key
from configuration.store import ConfigStore
from core.settings import Settings, get_settings
from streams.consumer import ConsumedEvent, decode_message, make_consumer
from streams.producer import epoch_ms
from streams.serde import serde_from_settings

__all__ = ["REDIS_PREFIX", "Config", "ConfigProjection", "CurrentValue"]

log = structlog.get_logger(__name__)

REDIS_PREFIX = "backbone:config:"

_APPLY = """
local cur = redis.call('HGET', KEYS[1], 'version')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'value', ARGV[2], 'change', ARGV[3], 'event_id', ARGV[4],
           'author', ARGV[5], 'reason', ARGV[6], 'changed_at_ms', ARGV[7])
redis.call('SADD', KEYS[2], ARGV[8])
return 1
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class CurrentValue:
    """The current value of a key and where it was read.

    Attributes:
        key: the key.
        version: its version.
        value: its value (a JSON object).
        source: ``redis`` (the read model) or ``postgres`` (the event store).
    """

    key: str
    version: int
    value: dict[str, Any]
    source: Literal["redis", "postgres"]


class ConfigProjection:
    """Keep Redis current with ``config.changes``.

    Args:
        settings: Kafka, Redis and schema registry settings.
        topic: the config topic.
        group_id: the consumer group (its committed offsets are the projection's position).
        prefix: Redis key prefix.
        batch_size: records per ``consume`` call.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        topic: str = CONFIG_TOPIC,
        group_id: str = "config-projection",
        prefix: str = REDIS_PREFIX,
        batch_size: int = 500,
    ) -> None:
        self.settings = settings or get_settings()
        self.topic = topic
        self.prefix = prefix
        self.batch_size = batch_size
        self.redis = redis.Redis.from_url(self.settings.redis.dsn(), socket_timeout=5.0)
        self._apply = self.redis.register_script(_APPLY)
        self.position_key = f"{prefix}__position__:{topic}"
        self.serde = serde_from_settings(self.settings)
        self.consumer = make_consumer(self.settings.kafka, group_id)
        self._next: dict[int, int] = {}  # partition -> next offset this process applied (or started at)
        self._resync = False
        self._checked_at = 0.0
        self.consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self.applied = 0
        self.skipped = 0
        self.resyncs = 0
        """Times Redis was found behind this process (or failed) and the partitions were sought back."""

    def _stored_positions(self) -> dict[int, int]:
        """``partition -> next offset`` as Redis holds them (empty when Redis lost them).

        Raises:
            redis.RedisError: Redis did not answer.
        """
        return {int(p): int(o) for p, o in self.redis.hgetall(self.position_key).items()}

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            stored = self._stored_positions()
        except redis.RedisError as exc:
            log.warning("config_projection.redis_unavailable", error=str(exc), at="assign")
            stored, self._resync = {}, True
        for tp in partitions:
            tp.offset = stored.get(tp.partition, OFFSET_BEGINNING)
            self._next[tp.partition] = stored.get(tp.partition, 0)
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._next.pop(tp.partition, None)

    def _seek_to_stored(self, *, force: bool) -> None:
        """Seek every assigned partition that Redis holds behind this process (or all, ``force``) back to
        Redis's position (the beginning when none).

        Raises:
            redis.RedisError: Redis did not answer.
        """
        stored = self._stored_positions()
        moved = []
        for tp in self.consumer.assignment():
            at = stored.get(tp.partition, 0)
            if force or at < self._next.get(tp.partition, 0):
                self.consumer.seek(
                    TopicPartition(self.topic, tp.partition, at if at > 0 else OFFSET_BEGINNING)
                )
                moved.append((tp.partition, self._next.get(tp.partition), at))
                self._next[tp.partition] = at
        if moved:
            self.resyncs += 1
            log.warning(
                "config_projection.resync", partitions=moved, reason="forced" if force else "redis behind"
            )

    def apply(self, events: list[ConsumedEvent], positions: dict[int, int] | None = None) -> int:
        """Apply decoded config changes to Redis, with ``positions`` (``partition -> next offset``), in one
        ``MULTI``/``EXEC``; return how many changed the model.

        Raises:
            redis.RedisError: Redis failed (nothing of the batch is applied).
        """
        pipe = self.redis.pipeline(transaction=True)
        n = 0
        for e in events:
            if e.schema != CONFIG_CHANGE_SCHEMA:
                continue
            d = e.data
            self._apply(
                keys=[f"{self.prefix}current:{d['key']}", f"{self.prefix}keys"],
                args=[
                    d["version"],
                    d["value_json"] or "",
                    d["change"],
                    e.attributes.id,
                    d["author"],
                    d["reason"],
                    epoch_ms(d["changed_at"]),
                    d["key"],
                ],
                client=pipe,
            )
            n += 1
        if positions:
            pipe.hset(self.position_key, mapping={str(p): o for p, o in positions.items()})
        results = pipe.execute() if n or positions else []
        changed = sum(int(r) for r in results[:n])
        self.applied += changed
        self.skipped += n - changed
        return changed

    def run_once(self, timeout_seconds: float = 1.0) -> int:
        """Consume one batch, apply it with its positions, then commit its offsets; return the records consumed.

        Undecodable records are logged and skipped (the relay is the only producer of the topic).

        Raises:
            redis.RedisError: Redis failed; the next call seeks back to Redis's positions first.
        """
        now = time.monotonic()
        if self._resync or now - self._checked_at >= 1.0:
            self._seek_to_stored(force=self._resync)
            self._resync, self._checked_at = False, now
        msgs = self.consumer.consume(self.batch_size, timeout_seconds)
        good: list[ConsumedEvent] = []
        for m in msgs:
            if m.error() is not None:
                if m.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("config_projection.consume_error", error=str(m.error()))
                continue
            decoded = decode_message(self.serde, m)
            if isinstance(decoded, ConsumedEvent):
                good.append(decoded)
            else:
                log.warning("config_projection.undecodable", reason=decoded.reason, offset=decoded.offset)
        positioned = [m for m in msgs if m.error() is None]
        positions = {m.partition(): m.offset() + 1 for m in positioned}
        try:
            self.apply(good, positions)
        except redis.RedisError:
            self._resync = True
            raise
        self._next.update(positions)
        if positions:
            self._checked_at = time.monotonic()  # the positions were just written with the batch
        for m in positioned:  # applied to Redis: now the offsets may move (for lag monitoring)
            self.consumer.store_offsets(message=m)
        if positioned:
            try:
                self.consumer.commit(asynchronous=False)
            except KafkaException as exc:
                # records read again after a resync lie below the committed offset: nothing new to commit
                if exc.args[0].code() != KafkaError._NO_OFFSET:
                    raise
        return len(msgs)

    def run(self, stop: threading.Event | None = None) -> None:
        """Project until ``stop`` is set; a Redis failure is logged and retried every 0.5 s."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.run_once()
            except redis.RedisError as exc:
                log.warning("config_projection.redis_unavailable", error=str(exc))
                self._resync = True
                stop.wait(0.5)

    def close(self) -> None:
        """Leave the group and close the Redis client."""
        self.consumer.close()
        self.redis.close()


class Config:
    """Read current configuration values fast: Redis first, PostgreSQL when Redis has nothing.

    Args:
        settings: Redis and PostgreSQL settings.
        store: a store to fall back to (opened on first fallback when ``None``).
        prefix: Redis key prefix of the read model.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: ConfigStore | None = None,
        prefix: str = REDIS_PREFIX,
    ) -> None:
        self.settings = settings or get_settings()
        self.prefix = prefix
        self.redis = redis.Redis.from_url(self.settings.redis.dsn(), socket_timeout=1.0)
        self._store = store
        self._owns_store = store is None

    @property
    def store(self) -> ConfigStore:
        """The PostgreSQL fallback."""
        if self._store is None:
            self._store = ConfigStore(self.settings)
        return self._store

    def current_entry(self, key: str) -> CurrentValue:
        """The current value of ``key`` with its version and where it came from.

        Raises:
            ConfigKeyError: malformed key.
            ConfigNotFoundError: the key does not exist or is retired.
            ConfigStoreUnavailableError: Redis has no entry and PostgreSQL cannot be reached.
        """
        check_key(key)
        try:
            version, value, change = self.redis.hmget(
                f"{self.prefix}current:{key}", "version", "value", "change"
            )
        except redis.RedisError as exc:
            log.warning("config.redis_unavailable", key=key, error=str(exc))
            version = None
        if version is not None:
            if change == ChangeKind.RETIRED.encode():
                raise ConfigNotFoundError(key, f"configuration key {key!r} is retired")
            return CurrentValue(key=key, version=int(version), value=json.loads(value), source="redis")
        current = self.store.get(key)
        if current.retired:
            raise ConfigNotFoundError(key, f"configuration key {key!r} is retired")
        return CurrentValue(key=key, version=current.version, value=current.value, source="postgres")

    def current(self, key: str) -> dict[str, Any]:
        """The current value of ``key`` (a JSON object).

        Raises:
            ConfigKeyError, ConfigNotFoundError, ConfigStoreUnavailableError: as for :meth:`current_entry`.
        """
        return self.current_entry(key).value

    def close(self) -> None:
        """Close the Redis client (and the fallback store when this object opened it)."""
        self.redis.close()
        if self._owns_store and self._store is not None:
            self._store.close()
