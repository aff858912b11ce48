"""Consuming: decode a Kafka message into a typed event or a failure, dead-letter the failures, and a
typed subscriber for the CLI, the API and tests.

Poison messages are data, not crashes: :func:`decode_message` returns either a
:class:`ConsumedEvent` or a :class:`DecodeFailure`, and :class:`DeadLetterPublisher` sends the
failure, raw bytes and headers unchanged, to ``backbone.dlq``.

Topics that carry plain JSON without CloudEvents headers (the policy router's decisions and outcomes)
are decoded by their reader from a :class:`RawRecord` (the record as read: position, key, value,
headers); :func:`json_event` then builds the :class:`ConsumedEvent` with the attributes the reader
derives from the datum (a deterministic id, the event time), and :meth:`RawRecord.failure` the
:class:`DecodeFailure` of a record of the wrong shape.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, Message, TopicPartition

from core.settings import KafkaSettings
from streams.catalogue import DLQ_TOPIC
from streams.envelope import CloudEvent, format_time
from streams.errors import DeserializationError, EnvelopeError
from streams.offsets import make_consumer, offset_for_time
from streams.producer import EventProducer
from streams.serde import AvroSerde

__all__ = [
    "DLQ_TOPIC",
    "ConsumedEvent",
    "DeadLetterPublisher",
    "DecodeFailure",
    "RawRecord",
    "Subscriber",
    "decode_message",
    "json_event",
    "make_consumer",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumedEvent:
    """A decoded record with where it was read.

    Attributes:
        topic, partition, offset: its position in the log.
        timestamp_ms: the record timestamp (the producer sets it to the event time).
        key: the key as text (UTF-8), None for a null key.
        attributes: CloudEvents attributes from the headers.
        schema: Avro full name of the writer's schema.
        data: the decoded datum.
        value: the raw value bytes (kept for archives and dead letters).
        headers: the raw headers.
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: str | None
    attributes: CloudEvent
    schema: str
    data: dict[str, Any]
    value: bytes
    headers: tuple[tuple[str, bytes | None], ...]

    def as_json(self) -> dict[str, Any]:
        """JSON-ready view: CloudEvents attributes, position and data (datetimes as RFC 3339)."""
        return {
            **self.attributes.as_dict(),
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "data": _jsonable(self.data),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeFailure:
    """A record that could not be decoded, with its raw bytes and the reason."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    reason: str
    error_type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RawRecord:
    """A record as read from the log, not decoded: the input of a reader's own decoder.

    Attributes:
        topic, partition, offset: its position in the log.
        timestamp_ms: the record timestamp (ms since the epoch).
        key, value: the raw bytes (None for a null key or a tombstone).
        headers: the raw headers.
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]

    @classmethod
    def from_message(cls, msg: Message) -> RawRecord:
        """The record of a confluent-kafka message (a record, not an error event)."""
        return cls(
            topic=cast(str, msg.topic()), partition=cast(int, msg.partition()), offset=cast(int, msg.offset()),
            timestamp_ms=msg.timestamp()[1], key=msg.key(), value=msg.value(),
            headers=cast("tuple[tuple[str, bytes | None], ...]", tuple(msg.headers() or ())),
        )  # fmt: skip

    @classmethod
    def of(cls, record: ConsumedEvent | DecodeFailure) -> RawRecord:
        """The raw record behind an already decoded (or failed) one, to decode it another way."""
        key = record.key.encode() if isinstance(record.key, str) else record.key
        return cls(
            topic=record.topic, partition=record.partition, offset=record.offset,
            timestamp_ms=record.timestamp_ms, key=key, value=record.value, headers=record.headers,
        )  # fmt: skip

    def failure(self, reason: str, error_type: str = "DeserializationError") -> DecodeFailure:
        """The :class:`DecodeFailure` of this record (raw bytes and headers kept for the dead letter)."""
        return DecodeFailure(
            topic=self.topic, partition=self.partition, offset=self.offset, timestamp_ms=self.timestamp_ms,
            key=self.key, value=self.value, headers=self.headers, reason=reason, error_type=error_type,
        )  # fmt: skip


JSON_CONTENT_TYPE = "application/json"


def json_event(
    raw: RawRecord,
    data: dict[str, Any],
    *,
    event_id: str,
    event_type: str,
    source: str,
    time: datetime,
    subject: str | None = None,
) -> ConsumedEvent:
    """A :class:`ConsumedEvent` for a JSON record without CloudEvents headers.

    The attributes are the reader's: ``event_id`` (deterministic, so a re-read record de-duplicates),
    ``event_type`` (also the event's ``schema``), ``source``, ``time`` (aware event time) and
    ``subject``; ``datacontenttype`` is ``application/json``.
    """
    return ConsumedEvent(
        topic=raw.topic,
        partition=raw.partition,
        offset=raw.offset,
        timestamp_ms=raw.timestamp_ms,
        key=raw.key.decode("utf-8", "replace") if raw.key is not None else None,
        attributes=CloudEvent(
            id=event_id,
            source=source,
            type=event_type,
            time=time,
            subject=subject,
            datacontenttype=JSON_CONTENT_TYPE,
            dataschema=event_type,
        ),
        schema=event_type,
        data=data,
        value=raw.value or b"",
        headers=raw.headers,
    )


def _jsonable(v: Any) -> Any:
    if isinstance(v, datetime):
        return format_time(v)
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def decode_message(serde: AvroSerde, msg: Message) -> ConsumedEvent | DecodeFailure:
    """Decode one confluent-kafka message.

    Returns:
        a :class:`ConsumedEvent`, or a :class:`DecodeFailure` for missing/malformed CloudEvents
        headers or bytes that are not a Confluent-framed Avro record of a known schema.
    """
    # a record, not an error event: librdkafka sets its topic, partition and offset
    headers = cast("tuple[tuple[str, bytes | None], ...]", tuple(msg.headers() or ()))
    topic, partition, offset = cast(str, msg.topic()), cast(int, msg.partition()), cast(int, msg.offset())
    key = msg.key()
    value = msg.value()
    ts = msg.timestamp()[1]
    try:
        attributes = CloudEvent.from_headers(headers)
        schema, data = serde.decode(value)
    except (EnvelopeError, DeserializationError) as exc:
        return DecodeFailure(
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp_ms=ts,
            key=key,
            value=value,
            headers=headers,
            reason=str(exc),
            error_type=type(exc).__name__,
        )
    return ConsumedEvent(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=ts,
        key=key.decode("utf-8", "replace") if key is not None else None,
        attributes=attributes,
        schema=schema,
        data=data,
        value=cast(bytes, value),  # decoded, so not a tombstone
        headers=headers,
    )


class DeadLetterPublisher:
    """Send records that a consumer gave up on to the dead-letter topic.

    Args:
        producer: the producer to use (its serde must know ``sophia.dlq.DeadLetter``).
        processor: the name of the consumer, recorded in each dead letter.
        topic: the dead-letter topic.
    """

    def __init__(self, producer: EventProducer, processor: str, topic: str = DLQ_TOPIC) -> None:
        self.producer = producer
        self.processor = processor
        self.topic = topic
        self.count = 0

    def publish(
        self,
        *,
        source_topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
        reason: str,
        error_type: str,
    ) -> None:
        """Enqueue one dead letter (delivery confirmed by the producer's ``flush``)."""
        now = datetime.now(UTC)
        record = {
            "source_topic": source_topic,
            "source_partition": partition,
            "source_offset": offset,
            "key": key,
            "value": value,
            "headers": [{"key": k, "value": v} for k, v in headers],
            "reason": reason,
            "error_type": error_type,
            "processor": self.processor,
            "failed_at": now,
        }
        if self.producer.serde is None:
            raise TypeError("the dead-letter producer needs a serde (it encodes sophia.dlq.DeadLetter)")
        body = self.producer.serde.encode("sophia.dlq.DeadLetter", record)
        attrs = CloudEvent(
            id=str(
                uuid.uuid5(uuid.NAMESPACE_URL, f"dlq/{self.processor}/{source_topic}/{partition}/{offset}")
            ),
            source=f"/processors/{self.processor}",
            type="sophia.dlq.DeadLetter",
            time=now,
            subject=f"{source_topic}/{partition}/{offset}",
            dataschema="sophia.dlq.DeadLetter",
        )
        self.producer.produce_raw(self.topic, key=key, value=body, headers=attrs.to_headers())
        self.count += 1

    def publish_failure(self, failure: DecodeFailure) -> None:
        """Dead-letter a :class:`DecodeFailure` as it is."""
        self.publish(
            source_topic=failure.topic,
            partition=failure.partition,
            offset=failure.offset,
            key=failure.key,
            value=failure.value,
            headers=failure.headers,
            reason=failure.reason,
            error_type=failure.error_type,
        )


StartAt = Literal["beginning", "latest", "committed"] | datetime


class Subscriber:
    """A typed subscriber to one or more topics.

    Args:
        kafka: broker settings.
        serde: the Avro serde.
        topics: topic names.
        group_id: consumer group; ``None`` means a private, throw-away group that commits nothing.
        start: ``beginning``, ``latest``, ``committed`` (the group's committed offsets, else the
            beginning) or an aware datetime (the first record at or after that event time, found
            with :func:`streams.offsets.offset_for_time`, which checks the broker's answer).
        commit: commit offsets after each batch has been yielded (only with a ``group_id``).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        serde: AvroSerde,
        topics: Sequence[str],
        *,
        group_id: str | None = None,
        start: StartAt = "committed",
        commit: bool = True,
    ) -> None:
        self.serde = serde
        self.topics = list(topics)
        self.private = group_id is None
        self.commit = commit and not self.private
        self.start = start
        self.kafka = kafka
        self.assigned: set[tuple[str, int]] = set()
        self.at_end: set[tuple[str, int]] = set()
        self.consumer = make_consumer(
            kafka, group_id or f"backbone-subscribe-{uuid.uuid4()}", **{"enable.partition.eof": True}
        )
        self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned.discard((tp.topic, tp.partition))
            self.at_end.discard((tp.topic, tp.partition))

    def caught_up(self) -> bool:
        """True once partitions are assigned and each has reached the end of the log."""
        return bool(self.assigned) and self.assigned <= self.at_end

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:

        self.assigned.update((tp.topic, tp.partition) for tp in partitions)
        if self.start == "committed" and not self.private:
            return
        for tp in partitions:
            if self.start in ("beginning", "committed"):
                tp.offset = OFFSET_BEGINNING
            elif self.start == "latest":
                tp.offset = OFFSET_END
            else:
                assert isinstance(self.start, datetime)
                tp.offset = offset_for_time(self.kafka, tp.topic, tp.partition, self.start)
        consumer.assign(partitions)

    def poll_batch(
        self, max_messages: int = 500, timeout_seconds: float = 1.0
    ) -> list[ConsumedEvent | DecodeFailure]:
        """Consume up to ``max_messages`` and decode them (failures included, in log order).

        Raises:
            confluent_kafka.KafkaException: a consumer error other than reaching a partition's end.
        """
        from confluent_kafka import KafkaException

        out: list[ConsumedEvent | DecodeFailure] = []
        for m in self.consumer.consume(max_messages, timeout_seconds):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.at_end.add((cast(str, m.topic()), cast(int, m.partition())))
                    continue
                raise KafkaException(err)
            self.at_end.discard((m.topic(), m.partition()))
            out.append(decode_message(self.serde, m))
        return out

    def commit_batch(self, batch: Sequence[ConsumedEvent | DecodeFailure]) -> None:
        """Commit the offsets after ``batch`` (synchronously)."""
        if not batch or not self.commit:
            return
        last: dict[tuple[str, int], int] = {}
        for r in batch:
            last[(r.topic, r.partition)] = max(last.get((r.topic, r.partition), -1), r.offset)
        self.consumer.commit(
            offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()], asynchronous=False
        )

    async def __aiter__(self) -> AsyncIterator[ConsumedEvent | DecodeFailure]:
        while True:
            batch = await asyncio.to_thread(self.poll_batch)
            for r in batch:
                yield r
            if batch:
                await asyncio.to_thread(self.commit_batch, batch)

    def close(self) -> None:
        """Leave the group and close the consumer."""
        self.consumer.close()
