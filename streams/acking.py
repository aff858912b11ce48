"""Producing where each caller awaits the broker's acknowledgement of its own records, and a cached
directory of the broker's topics: the log side of HTTP ingest (:mod:`backbone.http.ingest`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from core import tracing
from core.settings import KafkaSettings
from streams.catalogue import TopicSpec, create_missing_topics
from streams.envelope import Event
from streams.errors import BrokerUnavailableError, DeliveryError, UnacknowledgedError
from streams.producer import epoch_ms
from streams.serde import AvroSerde

__all__ = ["AckingProducer", "TopicDirectory"]

_log = structlog.get_logger(__name__)


class AckingProducer:
    """A Kafka producer whose callers await the acknowledgement of their own records.

    One librdkafka producer (``acks=all``, idempotence) is shared by all requests; a background thread
    serves delivery reports, and each :meth:`produce` call awaits exactly the reports of its records,
    so one request's failure never surfaces in another's answer (unlike a shared ``flush``).

    Args:
        kafka: broker settings.
        serde: the serde whose registry encodes the records (data must already be checked).
        ack_timeout_seconds: ``message.timeout.ms``: how long a record may wait for its acknowledgement
            before it fails.
        linger_ms: librdkafka ``linger.ms``.
    """

    def __init__(
        self, kafka: KafkaSettings, serde: AvroSerde, *, ack_timeout_seconds: float = 10.0, linger_ms: int = 2
    ) -> None:
        self.ack_timeout_seconds = ack_timeout_seconds
        self.serde = AvroSerde(serde.registry, validate_on_encode=False)
        self.bootstrap_servers = kafka.bootstrap_servers
        self._producer = Producer(
            kafka.librdkafka(
                extra={
                    "acks": "all",
                    "enable.idempotence": True,
                    "linger.ms": linger_ms,
                    "compression.type": "lz4",
                    "message.timeout.ms": int(ack_timeout_seconds * 1000),
                }
            ),
            error_cb=self._on_error,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ingest-delivery-reports", daemon=True)
        self._thread.start()
        self.brokers_down = False

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.brokers_down = True
        _log.warning("ingest.producer_error", error=str(err))

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    async def produce(self, topic: str, events: Sequence[Event]) -> None:
        """Produce ``events`` to ``topic`` and wait until the broker has acknowledged every one.

        With tracing on each record gets a ``send <topic>`` span (child of the current span, the HTTP
        request's, else of the event's ``traceparent``) that ends when the batch is acknowledged, failed
        if it is not; the record's ``ce_traceparent`` is that span's context.

        Raises:
            UnacknowledgedError: the local queue is full, or not every record was acknowledged
                within the timeout (the broker is down or slow).
            DeliveryError: the broker refused a record.
        """
        if not events:
            return
        if not tracing.is_enabled():
            await self._produce(topic, events)
            return
        spans = []
        traced = []
        for e in events:
            span, traceparent = tracing.start_send(
                topic, message_id=e.attributes.id, key=e.key, traceparent=e.attributes.traceparent
            )
            spans.append(span)
            traced.append(e.with_traceparent(traceparent))
        try:
            await self._produce(topic, traced)
        except BaseException as exc:
            for span in spans:
                tracing.end_send(span, exc)
            raise
        for span in spans:
            tracing.end_send(span)

    async def _produce(self, topic: str, events: Sequence[Event]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[str]] = loop.create_future()
        lock = threading.Lock()
        pending = [len(events)]
        errors: list[tuple[str, bytes | None, str]] = []

        def _resolve() -> None:  # on the loop
            if not done.done():
                done.set_result([])

        def on_delivery(err: KafkaError | None, msg: Any) -> None:  # delivery-report thread
            with lock:
                if err is not None:
                    errors.append((msg.topic(), msg.key(), str(err)))
                pending[0] -= 1
                finished = pending[0] == 0
            if finished:
                loop.call_soon_threadsafe(_resolve)

        encode = self.serde.encode
        # headers are list[tuple[str, bytes]]; Any because the stub types them wider (invariant list)
        records: list[tuple[bytes, bytes, Any, int]] = [
            (e.key.encode(), encode(e.schema, e.data), e.attributes.to_headers(), epoch_ms(e.attributes.time))
            for e in events
        ]
        for i, (key, value, headers, ts) in enumerate(records):
            try:
                self._producer.produce(
                    topic,
                    key=key,
                    value=value,
                    headers=headers,
                    timestamp=ts,
                    on_delivery=on_delivery,
                )
            except (BufferError, KafkaException) as exc:
                with lock:
                    pending[0] -= len(records) - i
                    errors.append((topic, key, f"not enqueued: {exc}"))
                    finished = pending[0] == 0
                if finished and not done.done():
                    done.set_result([])
                break
        if not done.done():
            # the timeout is a timer that fails the future: cheaper per request than wait_for(shield(...)),
            # which wraps the wait in a task; the delivery reports normally come well before it
            timer = loop.call_later(self.ack_timeout_seconds + 5, _expire, done)
            try:
                await done
            finally:
                timer.cancel()
        if done.exception() is not None:
            raise UnacknowledgedError(
                f"Kafka at {self.bootstrap_servers} did not acknowledge within {self.ack_timeout_seconds:g} s"
            ) from done.exception()
        if errors:
            timed_out = any("timed out" in e[2].lower() or "not enqueued" in e[2] for e in errors)
            if timed_out or self.brokers_down:
                raise UnacknowledgedError(
                    f"Kafka at {self.bootstrap_servers} did not acknowledge {len(errors)} record(s): {errors[0][2]}"
                )
            raise DeliveryError(errors)

    def close(self, timeout_seconds: float = 5.0) -> None:
        """Flush what is queued (up to ``timeout_seconds``) and stop the delivery-report thread."""
        self._producer.flush(timeout_seconds)
        self._stop.set()
        self._thread.join(timeout_seconds)


def _expire(done: asyncio.Future[list[str]]) -> None:
    if not done.done():
        done.set_exception(TimeoutError())


class TopicDirectory:
    """Which topics exist on the broker, cached for ``ttl_seconds`` and refreshed on a miss.

    Args:
        admin: an AdminClient on the broker.
        ttl_seconds: how long a listing is trusted.
    """

    def __init__(self, admin: AdminClient, ttl_seconds: float = 30.0) -> None:
        self.admin = admin
        self.ttl_seconds = ttl_seconds
        self._topics: dict[str, int] = {}
        self._at = 0.0
        self._lock = threading.Lock()

    def cached_partitions(self, topic: str) -> int | None:
        """The partition count of ``topic`` from a fresh listing, else ``None`` (not listed, or the listing
        is stale): no I/O, for callers on an event loop; :meth:`partitions` asks the broker."""
        if time.monotonic() - self._at < self.ttl_seconds:
            return self._topics.get(topic)
        return None

    def partitions(self, topic: str, *, timeout_seconds: float = 5.0) -> int | None:
        """The partition count of ``topic``, or ``None`` when the broker does not have it.

        Raises:
            BrokerUnavailableError: the broker did not answer within ``timeout_seconds``.
        """
        with self._lock:
            fresh = time.monotonic() - self._at < self.ttl_seconds
            if topic in self._topics and fresh:
                return self._topics[topic]
        try:
            md = self.admin.list_topics(timeout=timeout_seconds)
        except KafkaException as exc:
            raise BrokerUnavailableError(f"Kafka did not answer a metadata request: {exc}") from exc
        with self._lock:
            self._topics = {n: len(t.partitions) for n, t in md.topics.items() if t.error is None}
            self._at = time.monotonic()
            return self._topics.get(topic)

    def ensure(self, specs: Sequence[TopicSpec], *, timeout_seconds: float = 15.0) -> list[str]:
        """Create the topics of ``specs`` that the broker lacks; return the names created."""
        created = create_missing_topics(self.admin, specs, timeout_seconds=timeout_seconds)
        self._at = 0.0
        return created
