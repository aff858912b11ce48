"""The CDC normaliser: raw Debezium records in, typed ``sophia.cdc.RowChanged`` events out, dead letters
for what is not a change event, offsets committed after the outputs are acknowledged."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Counter

from connectors.cdc.mapping import CHANGES_TOPIC, RAW_TOPIC_PATTERN, normalise_record
from connectors.debezium import ChangeEventError
from core.observability import REGISTRY
from core.settings import Settings
from streams.consumer import DLQ_TOPIC, DeadLetterPublisher, make_consumer
from streams.errors import SchemaValidationError
from streams.producer import EventProducer
from streams.serde import AvroSerde

__all__ = ["CdcNormaliser", "NormaliserStats"]

log = structlog.get_logger(__name__)

_normalised = Counter(
    "backbone_cdc_changes_normalised", "Debezium change events produced as RowChanged", registry=REGISTRY
)
_tombstones = Counter("backbone_cdc_tombstones_skipped", "Tombstones read and skipped", registry=REGISTRY)
_dead = Counter(
    "backbone_cdc_records_dead_lettered", "Raw CDC records sent to the dead-letter topic", registry=REGISTRY
)


@dataclass(slots=True)
class NormaliserStats:
    """Counters of one normaliser since it started."""

    batches: int = 0
    read: int = 0
    produced: int = 0
    tombstones: int = 0
    dead_lettered: int = 0
    positions: dict[tuple[str, int], int] = field(default_factory=dict)


class CdcNormaliser:
    """Consume raw Debezium topics and produce ``sophia.cdc.RowChanged`` events.

    Each batch (``consume(batch_size, timeout)``) is normalised, produced, flushed (outputs and dead
    letters acknowledged), and only then are its offsets committed, synchronously. A crash between the
    flush and the commit re-produces the batch with the same event ids.

    Args:
        settings: Kafka settings.
        serde: the Avro serde (must know ``sophia.cdc.RowChanged`` and ``sophia.dlq.DeadLetter``).
        topics: raw topics to read; ``None`` subscribes to ``pattern``.
        pattern: a librdkafka regex subscription (starts with ``^``) used when ``topics`` is ``None``.
        output_topic: where the typed events go.
        group_id: consumer group.
        dlq_topic: the dead-letter topic.
        key_columns: primary-key columns read from the row when a record has no key.
        batch_size: most records per batch.
        batch_timeout_seconds: longest wait to fill a batch.
        producer: the producer (one is made from ``settings`` otherwise).

    Raises:
        ValueError: ``pattern`` is not a regex (does not start with ``^``).
    """

    def __init__(
        self,
        settings: Settings,
        serde: AvroSerde,
        *,
        topics: Sequence[str] | None = None,
        pattern: str = RAW_TOPIC_PATTERN,
        output_topic: str = CHANGES_TOPIC,
        group_id: str = "cdc-normaliser",
        dlq_topic: str = DLQ_TOPIC,
        key_columns: Sequence[str] = ("id",),
        batch_size: int = 500,
        batch_timeout_seconds: float = 0.2,
        producer: EventProducer | None = None,
    ) -> None:
        if topics is None and not pattern.startswith("^"):
            raise ValueError(f"pattern {pattern!r} is not a regex subscription: it must start with '^'")
        self.settings = settings
        self.serde = serde
        self.subscription = list(topics) if topics is not None else [pattern]
        self.output_topic = output_topic
        self.group_id = group_id
        self.key_columns = tuple(key_columns)
        self.batch_size = batch_size
        self.batch_timeout_seconds = batch_timeout_seconds
        self.producer = producer or EventProducer(settings.kafka, serde)
        self.dlq = DeadLetterPublisher(self.producer, "cdc-normaliser", topic=dlq_topic)
        self._skip_topics = {output_topic, dlq_topic}
        self.stats = NormaliserStats()
        self._assigned: set[tuple[str, int]] = set()
        self._at_end: set[tuple[str, int]] = set()
        self.stop_event = threading.Event()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._assigned.add((tp.topic, tp.partition))
            self._at_end.discard((tp.topic, tp.partition))
        log.info("cdc partitions assigned", partitions=len(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._assigned.discard((tp.topic, tp.partition))
            self._at_end.discard((tp.topic, tp.partition))

    def caught_up(self) -> bool:
        """True when partitions are assigned and every one has reached the end of the log."""
        return bool(self._assigned) and self._assigned <= self._at_end

    def _handle(self, msg: Message) -> None:
        topic = msg.topic()
        value = msg.value()
        if value is None:
            self.stats.tombstones += 1
            _tombstones.inc()
            return
        try:
            event = normalise_record(
                topic, msg.key(), value, timestamp_ms=msg.timestamp()[1], key_columns=self.key_columns
            )
            if event is None:  # a schema-wrapped null payload
                self.stats.tombstones += 1
                _tombstones.inc()
                return
            self.producer.produce(self.output_topic, event)
        except (ChangeEventError, SchemaValidationError) as exc:
            log.warning("cdc record dead-lettered", topic=topic, partition=msg.partition(), offset=msg.offset(),
                        reason=str(exc))  # fmt: skip
            self.dlq.publish(
                source_topic=topic,
                partition=msg.partition(),
                offset=msg.offset(),
                key=msg.key(),
                value=value,
                headers=tuple(msg.headers() or ()),
                reason=str(exc),
                error_type=type(exc).__name__,
            )
            self.stats.dead_lettered += 1
            _dead.inc()
            return
        self.stats.produced += 1
        _normalised.inc()

    def step(self, consumer: Consumer) -> int:
        """Consume, normalise, produce and commit one batch; return the number of records read.

        Raises:
            confluent_kafka.KafkaException: a consumer error other than reaching a partition's end.
            streams.errors.DeliveryError: outputs were not acknowledged (nothing is committed; the
                batch is read again by the next run).
        """
        msgs = consumer.consume(self.batch_size, self.batch_timeout_seconds)
        last: dict[tuple[str, int], int] = {}
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._at_end.add((m.topic(), m.partition()))
                    continue
                if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    # no raw topic matches the pattern yet (Debezium creates them with its first change):
                    # keep waiting for one, as a pattern subscription does
                    log.debug("cdc raw topics not there yet", reason=err.str())
                    continue
                raise KafkaException(err)
            tp = (m.topic(), m.partition())
            self._at_end.discard(tp)
            last[tp] = m.offset()
            self.stats.read += 1
            if m.topic() not in self._skip_topics:
                self._handle(m)
        if not last:
            return 0
        self.producer.flush()
        consumer.commit(
            offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()], asynchronous=False
        )
        self.stats.batches += 1
        self.stats.positions.update({k: v + 1 for k, v in last.items()})
        return len(msgs)

    def run(self, *, until_caught_up: bool = False, max_wait_seconds: float | None = None) -> NormaliserStats:
        """Run until :meth:`stop`, or until caught up when ``until_caught_up``.

        Args:
            until_caught_up: return once every assigned partition reached its end.
            max_wait_seconds: give up (TimeoutError) if not caught up by then.

        Raises:
            TimeoutError: not caught up within ``max_wait_seconds`` (e.g. no topic matches).
            streams.errors.DeliveryError: outputs were not acknowledged.
        """
        consumer = make_consumer(
            self.settings.kafka,
            self.group_id,
            **{
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 100,
                "topic.metadata.refresh.interval.ms": 10_000,
            },
        )
        consumer.subscribe(self.subscription, on_assign=self._on_assign, on_revoke=self._on_revoke)
        deadline = time.monotonic() + max_wait_seconds if max_wait_seconds else None
        try:
            while not self.stop_event.is_set():
                self.step(consumer)
                if until_caught_up and self.caught_up():
                    break
                if deadline and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"CDC normaliser not caught up with {self.subscription} in {max_wait_seconds}s"
                    )
        finally:
            consumer.close()
            self.producer.flush()
        log.info(
            "cdc normaliser stopped", produced=self.stats.produced, dead_lettered=self.stats.dead_lettered
        )
        return self.stats

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch."""
        self.stop_event.set()
