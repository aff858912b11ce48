"""The typed producer: CloudEvents headers + Confluent-framed Avro, ``acks=all``, idempotence.

Delivery failures are collected from librdkafka's delivery reports and raised by :meth:`flush`
as :class:`~streams.errors.DeliveryError`; nothing is swallowed. librdkafka reports failed records only
(``delivery.report.only.error``, set last so that no ``extra`` overrides it): a record it does not report
as failed by the end of a flush that left nothing queued was acknowledged, so no Python callback runs for
each record that succeeds. A producer that never reaches its broker raises
:class:`~streams.errors.BrokerUnavailableError` naming the bootstrap servers.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from core import tracing
from core.settings import KafkaSettings
from streams.envelope import Event
from streams.errors import BrokerUnavailableError, DeliveryError
from streams.serde import AvroSerde

__all__ = ["EventProducer", "epoch_ms"]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_ms(t: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime, truncated, in integer arithmetic (as Avro's
    ``timestamp-millis`` in fastavro): ``int(t.timestamp() * 1000)`` lands 1 ms short for about 1 % of the
    whole-ms times of 2004 and of those after 2038.

    Raises:
        TypeError: ``t`` is naive.
    """
    d = t - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1000 + d.microseconds // 1000


class EventProducer:
    """Produce :class:`~streams.envelope.Event` objects to Kafka.

    The record timestamp is the event time (``CreateTime``), so time-based reads and retention follow
    event time. The key is the UTF-8 of ``Event.key``.

    Attributes:
        delivered: records acknowledged by the broker, counted at each :meth:`flush` (records enqueued
            since, less those it reported failed or left queued).

    Args:
        kafka: broker settings.
        serde: the Avro serde (and through it the registry); ``None`` for a producer that only sends
            pre-encoded bytes with :meth:`produce_raw` (a Kafka Connect record, say).
        linger_ms: librdkafka ``linger.ms``; batching window.
        **librdkafka: extra librdkafka keys (``extra={"compression.type": "lz4"}``).

    Raises:
        ValueError: no bootstrap servers configured.
    """

    def __init__(
        self, kafka: KafkaSettings, serde: AvroSerde | None, *, linger_ms: int = 5, **librdkafka: Any
    ) -> None:
        conf = kafka.librdkafka(
            extra={
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": linger_ms,
                "compression.type": "lz4",
                "message.timeout.ms": 30_000,
                **librdkafka.pop("extra", {}),
                # reports of failures only; ours is the default callback, so produce() passes none
                "delivery.report.only.error": True,
            },
            **librdkafka,
        )
        self.bootstrap_servers = kafka.bootstrap_servers
        self.serde = serde
        self._producer = Producer(conf, error_cb=self._on_error, on_delivery=self._on_delivery)
        self._closed = False
        self._failures: list[tuple[str, bytes | None, str]] = []
        self._failed = 0  # failure reports since the last flush
        self._enqueued = 0  # records enqueued since the last flush (plus those it left queued)
        self._fatal: KafkaError | None = None
        self._all_brokers_down = False
        self.delivered = 0

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._all_brokers_down = True
        if err.fatal():
            self._fatal = err

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:  # always set: librdkafka reports failures only
            self._failures.append((msg.topic(), msg.key(), str(err)))
            self._failed += 1

    def produce(self, topic: str, event: Event) -> None:
        """Encode and enqueue one event; delivery is confirmed by :meth:`flush`.

        With tracing on (:func:`core.tracing.configure_tracing`) each record gets a ``send <topic>``
        span, child of the current span (else of the event's ``traceparent``), and the record's
        ``ce_traceparent`` is that span's context; with tracing off the event's attributes go out as
        they are.

        Raises:
            streams.errors.SchemaValidationError: the data does not match its schema (nothing sent).
            DeliveryError: an earlier record failed, or the producer hit a fatal error.
            TypeError: the producer was made without a serde (raw bytes only).
        """
        if self.serde is None:
            raise TypeError(
                "this producer sends pre-encoded bytes only (made without a serde): use produce_raw"
            )
        if tracing.is_enabled():
            with tracing.send_span(
                topic, message_id=event.attributes.id, key=event.key, traceparent=event.attributes.traceparent
            ) as traceparent:
                self._produce_event(topic, event.with_traceparent(traceparent))
            return
        self._produce_event(topic, event)

    def _produce_event(self, topic: str, event: Event) -> None:
        assert self.serde is not None
        value = self.serde.encode(event.schema, event.data)
        self.produce_raw(
            topic,
            key=event.key.encode(),
            value=value,
            headers=event.attributes.to_headers(),
            timestamp_ms=epoch_ms(event.attributes.time),
        )

    def produce_raw(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp_ms: int = 0,
        partition: int | None = None,
    ) -> None:
        """Enqueue pre-encoded bytes (used by the dead-letter publisher and replays).

        Raises:
            DeliveryError: the producer hit a fatal error.
        """
        if self._fatal is not None:
            raise DeliveryError([(topic, key, f"fatal producer error: {self._fatal}")])
        self._enqueue(topic, key, value, headers, timestamp_ms, partition)
        self._enqueued += 1
        self._producer.poll(0)

    def _enqueue(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        timestamp_ms: int,
        partition: int | None,
    ) -> None:
        """Hand one record to librdkafka, serving reports while its local queue is full."""
        producer = self._producer
        hdrs: Any = headers  # a list is invariant: ours holds bytes only, the stub's str | bytes | None
        while True:
            try:
                if partition is None:  # the common path, without building keyword arguments
                    producer.produce(topic, value, key, headers=hdrs, timestamp=timestamp_ms)
                else:
                    producer.produce(topic, value, key, partition, headers=hdrs, timestamp=timestamp_ms)
                return
            except BufferError:
                producer.poll(0.05)  # local queue full: serve delivery reports, then retry
            except KafkaException as exc:
                raise DeliveryError([(topic, key, str(exc))]) from exc

    def produce_many(self, topic: str, events: Iterable[Event]) -> int:
        """Produce every event then :meth:`flush`; return how many were acknowledged.

        The same records, headers, timestamps and checks as :meth:`produce` once per event, in one loop
        without a method call per record; librdkafka's reports (failures, errors) are served every
        256 records and by the flush, and a fatal producer error stops the loop there.

        Raises:
            streams.errors.SchemaValidationError: an event does not match its schema (those before it
                are enqueued, not flushed; nothing of it is sent).
            DeliveryError: any record was not acknowledged, or the producer hit a fatal error.
            TypeError: the producer was made without a serde (raw bytes only).
        """
        if self.serde is None or tracing.is_enabled():  # errors, and a span per record, as produce() does
            n = 0
            for e in events:
                self.produce(topic, e)
                n += 1
            self.flush()
            return n
        if self._fatal is not None:
            raise DeliveryError([(topic, None, f"fatal producer error: {self._fatal}")])
        encode = self.serde.encode
        producer = self._producer
        produce = producer.produce
        n = 0
        try:
            for e in events:
                value = encode(e.schema, e.data)
                a = e.attributes
                key = e.key.encode()
                headers: Any = a.to_headers()
                timestamp_ms = epoch_ms(a.time)
                try:
                    produce(topic, value, key, headers=headers, timestamp=timestamp_ms)
                except BufferError:  # local queue full: serve reports until there is room
                    self._enqueue(topic, key, value, headers, timestamp_ms, None)
                except KafkaException as exc:
                    raise DeliveryError([(topic, key, str(exc))]) from exc
                n += 1
                if not n & 255:
                    producer.poll(0)
                    if self._fatal is not None:
                        raise DeliveryError([(topic, key, f"fatal producer error: {self._fatal}")])
        finally:
            self._enqueued += n
        self.flush()
        return n

    def flush(self, timeout_seconds: float = 60.0) -> None:
        """Wait until every enqueued record is acknowledged.

        Raises:
            BrokerUnavailableError: records failed or are still queued while no broker is reachable
                (the message names the bootstrap servers).
            DeliveryError: any record failed (all failures since the last flush are carried).
        """
        remaining = self._producer.flush(timeout_seconds)
        self.delivered += max(0, self._enqueued - remaining - self._failed)
        self._enqueued, self._failed = remaining, 0
        if remaining and self._all_brokers_down:
            raise BrokerUnavailableError(
                f"Kafka at {self.bootstrap_servers} is unreachable: {remaining} record(s) not delivered"
            )
        if remaining:
            self._failures.append(("?", None, f"{remaining} record(s) still queued after {timeout_seconds}s"))
        if self._failures and self._all_brokers_down:
            failures, self._failures = self._failures, []
            raise BrokerUnavailableError(
                f"Kafka at {self.bootstrap_servers} is unreachable: {len(failures)} record(s) not delivered "
                f"({failures[0][2]})"
            )
        if self._failures:
            failures, self._failures = self._failures, []
            raise DeliveryError(failures)

    def close(self) -> None:
        """Flush and release the producer: its librdkafka instance and broker connections go now, not
        when the object is collected (a producer that outlives its broker logs connection errors).
        Closing twice is harmless; producing after ``close`` is an error of the caller.

        Raises:
            DeliveryError: records were not delivered.
        """
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._producer.flush(5)
