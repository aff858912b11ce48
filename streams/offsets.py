"""Where to start reading: consumers that never commit on their own, and the offset of an event time.

The bottom of the consuming side of :mod:`streams`: :mod:`streams.consumer` and :mod:`streams.replay`
build on it.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from core.settings import KafkaSettings
from streams.producer import epoch_ms

__all__ = ["consume_ready", "end_offsets", "make_consumer", "offset_for_time", "private_consumer"]


def consume_ready(consumer: Consumer, max_messages: int, timeout_seconds: float) -> list[Message]:
    """Up to ``max_messages`` records (or events) as soon as at least one is there, else ``[]`` after
    ``timeout_seconds``.

    librdkafka's ``consume(n, timeout)`` returns when ``n`` messages arrived *or* the timeout passed, so
    at low rates every record waits out the timeout. This returns what the client has already fetched,
    or waits (``poll``) for the first message and then takes what came with it, so a record's wait is the
    fetch's, not the batch's. Under a backlog the client's prefetch still fills large batches.

    Raises:
        ValueError: ``max_messages`` < 1.
    """
    if max_messages < 1:
        raise ValueError(f"max_messages must be at least 1, got {max_messages}")
    msgs = consumer.consume(max_messages, 0)
    if msgs:
        return msgs
    first = consumer.poll(timeout_seconds)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, 0)] if max_messages > 1 else [first]


def make_consumer(kafka: KafkaSettings, group_id: str, **extra: Any) -> Consumer:
    """A confluent-kafka consumer that never commits on its own.

    ``enable.auto.offset.store`` and ``enable.auto.commit`` are off: the caller stores or commits an
    offset only after the work for that message is durable.
    """
    conf = kafka.librdkafka(
        extra={
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": kafka.session_timeout_ms,
            "heartbeat.interval.ms": max(500, kafka.session_timeout_ms // 6),
            "isolation.level": "read_committed",
            **extra,
        }
    )
    return Consumer(conf)


def private_consumer(kafka: KafkaSettings) -> Consumer:
    """A throw-away group that commits nothing and reports the end of each partition."""
    return make_consumer(
        kafka, f"backbone-replay-{uuid.uuid4()}", **{"enable.partition.eof": True, "fetch.wait.max.ms": 50}
    )


def end_offsets(
    kafka: KafkaSettings, topic: str, partitions: list[int] | None = None, *, timeout_seconds: float = 30.0
) -> dict[int, int]:
    """The end offset (high watermark: the next offset to be written) of each partition of ``topic``, as
    the end-of-partition event reports it.

    ``ListOffsets(latest)`` (``get_watermark_offsets(cached=False)``) is only a lower bound here: Tansu
    answers the base offset of the last record batch plus one, so a batch of 8 records at offsets 4..11
    reads as 5. The answer is taken as a starting point and the partition read from there (at most one
    batch) to its end-of-partition event, which is exact on Tansu and on Apache Kafka.

    Args:
        kafka: broker settings.
        topic: topic name.
        partitions: the partitions; None: all of the topic's.

    Returns:
        ``{partition: end offset}`` (0 for an empty partition).

    Raises:
        KeyError: the topic does not exist.
        TimeoutError: a partition's end was not reached within ``timeout_seconds``.
    """
    c = private_consumer(kafka)
    try:
        if partitions is None:
            meta = c.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise KeyError(f"topic {topic!r} does not exist")
            partitions = sorted(meta.partitions)
        starts = {}
        for p in partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            starts[p] = max(low, high - 1, 0)
        c.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
        out: dict[int, int] = {}
        deadline = time.monotonic() + timeout_seconds
        while len(out) < len(starts):
            if time.monotonic() > deadline:
                missing = sorted(set(starts) - set(out))
                raise TimeoutError(f"{topic}: no end of partition {missing} within {timeout_seconds} s")
            for m in c.consume(1000, 0.1):
                err = m.error()
                if err is not None and err.code() == KafkaError._PARTITION_EOF:
                    out[cast(int, m.partition())] = cast(int, m.offset())
        return out
    finally:
        c.close()


def _timestamp_at(c: Consumer, topic: str, partition: int, offset: int) -> int | None:
    c.assign([TopicPartition(topic, partition, offset)])
    for _ in range(100):
        m = c.poll(0.1)
        if m is None:
            continue
        if m.error() is None:
            return m.timestamp()[1] if m.offset() == offset else None
        return None
    return None


def _scan_for_time(c: Consumer, topic: str, partition: int, low: int, t_ms: int) -> int:
    c.assign([TopicPartition(topic, partition, low)])
    idle = 0
    while idle < 100:
        msgs = c.consume(1000, 0.1)
        idle = 0 if msgs else idle + 1
        for m in msgs:
            if m.error() is not None:  # partition EOF: nothing at or after t
                return cast(int, m.offset())  # the end offset
            if m.timestamp()[1] >= t_ms:
                return cast(int, m.offset())
    raise TimeoutError(f"{topic}[{partition}]: no end of partition seen within 10 s")


def offset_for_time(
    kafka: KafkaSettings, topic: str, partition: int, t: datetime, *, consumer: Consumer | None = None
) -> int:
    """The first offset of ``topic``/``partition`` before which no record has a timestamp >= ``t``.

    Args:
        kafka: broker settings.
        topic: topic name.
        partition: partition number.
        t: aware datetime (event time).
        consumer: an unsubscribed consumer with ``enable.partition.eof`` to reuse (else one is made).

    Returns:
        that offset, or the end of the partition when no record is at or after ``t``.

    Raises:
        TimeoutError: the partition's end was not reached while scanning.
    """
    own = consumer is None
    c = consumer or private_consumer(kafka)
    try:
        t_ms = epoch_ms(t)
        low, _ = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        answer = c.offsets_for_times([TopicPartition(topic, partition, t_ms)], timeout=10)[0].offset
        if answer > low:
            ts = _timestamp_at(c, topic, partition, answer)
            before = _timestamp_at(c, topic, partition, answer - 1)
            if ts is not None and ts >= t_ms and before is not None and before < t_ms:
                return answer
        elif answer == low:
            ts = _timestamp_at(c, topic, partition, answer)
            if ts is not None and ts >= t_ms:
                return answer
        # the broker's answer did not check out (or it said "none"): scan from the start
        return _scan_for_time(c, topic, partition, low, t_ms)
    finally:
        if own:
            c.close()
