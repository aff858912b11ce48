"""The consume → batch → model → produce → commit loop of one actor (plain Python; Ray-free).

One :class:`InferenceWorker` owns one confluent-kafka consumer in the pool's consumer group (auto
commit and auto offset store off), so Kafka's rebalancing spreads the request partitions over the
actors. For each batch it:

1. decodes the requests; an undecodable record, a record of another schema, a request for another
   model or without text goes to the dead-letter topic with the reason;
2. runs the model once on the batch (if the batch call fails, each request is retried alone, and the
   ones that still fail are dead-lettered);
3. produces one ``sophia.inference.EmbeddingResult`` per answered request with the idempotent producer;
4. settles: ``flush()`` — every result and dead letter is acknowledged by the broker — and only then
   commits the offsets after the batch, synchronously. Under a backlog two batches are produced per
   settle, so the broker acknowledges batch N while the model runs batch N+1; when no further batch
   is ready, the batch in hand is settled at once.

A crash anywhere before step 4 leaves the batch uncommitted: the next owner of the partition answers
it again, with the same result id and vector (de-duplicate on ``request_id``). When partitions are
revoked the requests already fetched from them are answered and committed first.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from core.settings import KafkaSettings, SchemaRegistrySettings
from inference.batching import BatchAccumulator, offsets_to_commit
from inference.config import InferenceSettings
from inference.errors import RequestError
from inference.metrics import InferenceMetrics
from inference.model import EmbeddingModel, load_model
from inference.records import (
    REQUEST_SCHEMA,
    RESULT_SCHEMA,
    EmbeddingRequest,
    EmbeddingResult,
    EventTextRef,
    result_event_id,
)
from streams.consumer import ConsumedEvent, DeadLetterPublisher, DecodeFailure, decode_message, make_consumer
from streams.envelope import Event
from streams.errors import StreamsError
from streams.producer import EventProducer
from streams.serde import AvroSerde, serde_from_settings

__all__ = ["CrashPoint", "EventTextResolver", "InferenceWorker", "WorkerStats"]

log = structlog.get_logger(__name__)

_IDLE_POLL_SECONDS = 0.5
_MAX_UNSETTLED_BATCHES = 2
"""Batches produced before a flush and commit: the model runs on batch N+1 while batch N is delivered."""
MAX_TEXT_CHARS = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class CrashPoint:
    """Fault injection for crash tests: exit the process in the middle of a batch, once.

    After the results of batch number ``after_batches`` (1-based, counted per process) are handed to
    the producer and before they are flushed or committed, the process ends with ``os._exit(1)`` —
    as a ``kill -9`` would — unless ``marker_path`` exists; the file is created first, so the restarted
    process runs through.
    """

    after_batches: int
    marker_path: str

    def maybe_crash(self, batches_done: int) -> None:
        """Exit the process when this is the batch and the marker does not exist yet."""
        if batches_done != self.after_batches:
            return
        marker = Path(self.marker_path)
        if marker.exists():
            return
        marker.write_text(f"crashed pid={os.getpid()} at={time.time()}\n")
        log.warning("crash_point_reached", batches=batches_done, pid=os.getpid())
        os._exit(1)


@dataclass(slots=True)
class WorkerStats:
    """A snapshot of one worker, as the scaler and ``stats()`` see it.

    Attributes:
        worker_id: the worker's id (also in batch ids).
        model_name, model_version, device: what it runs.
        assignment: ``[(topic, partition), ...]`` it owns now.
        lag_messages: requests of its partitions not committed yet (fetched high watermark minus
            committed offset); None before the first fetch reported a watermark.
        answered, dead_lettered, batches: totals since the process started.
        batch_sizes: sizes of the batches since the previous :meth:`InferenceWorker.drain_stats`.
        last_batch_at: monotonic time of the last batch, None before the first.
    """

    worker_id: str
    model_name: str
    model_version: str
    device: str
    assignment: list[tuple[str, int]] = field(default_factory=list)
    lag_messages: int | None = None
    answered: int = 0
    dead_lettered: int = 0
    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    last_batch_at: float | None = None


class EventTextResolver:
    """Read the text a request references: one string field of an Avro event at a log position.

    Args:
        kafka: broker settings.
        serde: decodes the referenced event.
        timeout_seconds: how long to wait for the record.
    """

    def __init__(self, kafka: KafkaSettings, serde: AvroSerde, *, timeout_seconds: float = 5.0) -> None:
        self.kafka = kafka
        self.serde = serde
        self.timeout_seconds = timeout_seconds
        self._consumer: Consumer | None = None
        self._cache: dict[EventTextRef, str] = {}

    def resolve(self, ref: EventTextRef) -> str:
        """The text at ``ref``.

        Raises:
            RequestError: no record at that position in time, it does not decode, or the field is
                missing or not a string.
        """
        if ref in self._cache:
            return self._cache[ref]
        if self._consumer is None:
            self._consumer = make_consumer(self.kafka, f"inference-resolver-{uuid.uuid4()}")
        c = self._consumer
        c.assign([TopicPartition(ref.topic, ref.partition, ref.offset)])
        deadline = time.monotonic() + self.timeout_seconds
        try:
            while time.monotonic() < deadline:
                for m in c.consume(1, 0.5):
                    if m.error() is not None or m.offset() != ref.offset:
                        continue
                    decoded = decode_message(self.serde, m)
                    if isinstance(decoded, DecodeFailure):
                        raise RequestError(
                            f"referenced event {_where(ref)} does not decode: {decoded.reason}"
                        )
                    value = decoded.data.get(ref.field)
                    if not isinstance(value, str):
                        raise RequestError(
                            f"referenced event {_where(ref)} ({decoded.schema}) has no string field {ref.field!r}"
                        )
                    self._cache[ref] = value
                    return value
        finally:
            c.unassign()
        raise RequestError(f"no record at {_where(ref)} within {self.timeout_seconds}s")

    def prefetch(self, refs: Iterable[EventTextRef]) -> int:
        """Read the texts of many references with one sequential read per partition (a batch's
        references are mostly close together: a per-reference seek costs a fetch round trip each).

        The cache then holds just these texts (it is cleared first, so it never grows past a batch).
        A reference not found, not decodable or without the field is left out: :meth:`resolve` then
        raises its precise error. A partition whose references are sparse (more than 1,000 records
        between them per reference) is left to :meth:`resolve`.

        Returns:
            the number of references cached.
        """
        self._cache.clear()
        wanted: dict[tuple[str, int], dict[int, list[EventTextRef]]] = {}
        for ref in refs:
            wanted.setdefault((ref.topic, ref.partition), {}).setdefault(ref.offset, []).append(ref)
        if self._consumer is None and wanted:
            self._consumer = make_consumer(self.kafka, f"inference-resolver-{uuid.uuid4()}")
        for (topic, partition), by_offset in wanted.items():
            lo, hi = min(by_offset), max(by_offset)
            if hi - lo > 1000 * len(by_offset):
                continue
            c = self._consumer
            assert c is not None
            c.assign([TopicPartition(topic, partition, lo)])
            remaining = set(by_offset)
            deadline = time.monotonic() + self.timeout_seconds
            try:
                read_to = lo - 1
                while remaining and read_to < hi and time.monotonic() < deadline:
                    for m in c.consume(min(500, hi - lo + 1), 0.5):
                        if m.error() is not None:
                            continue
                        read_to = max(read_to, m.offset())
                        if m.offset() not in remaining:
                            continue
                        remaining.discard(m.offset())
                        decoded = decode_message(self.serde, m)
                        if isinstance(decoded, DecodeFailure):
                            continue
                        for ref in by_offset[m.offset()]:
                            value = decoded.data.get(ref.field)
                            if isinstance(value, str):
                                self._cache[ref] = value
            finally:
                c.unassign()
        return len(self._cache)

    def close(self) -> None:
        """Close the reader's consumer."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def _text_refs(batch: Sequence[ConsumedEvent | DecodeFailure]) -> list[EventTextRef]:
    """The text references of the decoded embedding requests of ``batch``."""
    refs = []
    for decoded in batch:
        if isinstance(decoded, ConsumedEvent) and decoded.schema == REQUEST_SCHEMA:
            ref = decoded.data.get("text_ref")
            if ref is not None and decoded.data.get("text") is None:
                try:
                    refs.append(EventTextRef(**ref))
                except TypeError:
                    continue
    return refs


def _where(ref: EventTextRef) -> str:
    return f"{ref.topic}/{ref.partition}/{ref.offset}"


@dataclass(slots=True)
class _Unsettled:
    batch: Sequence[Message]
    answered: int
    dead: int
    model_seconds: float


@dataclass(slots=True)
class _Answer:
    msg: Message
    event: ConsumedEvent
    request: EmbeddingRequest
    text: str


class InferenceWorker:
    """Consume embedding requests, answer them in batches, commit only what was answered.

    Args:
        kafka: broker settings.
        settings: topics, group, batching.
        model: the loaded model; None loads ``settings.model`` (device chosen by
            :func:`inference.model.choose_device`).
        serde: Avro serde; None builds one on the embedded registry.
        worker_id: id used in batch ids and logs; None makes a random one.
        metrics: where to count; None makes a private registry.
        crash_point: fault injection for crash tests (see :class:`CrashPoint`).
        device: torch device when the model is loaded here.

    Raises:
        inference.errors.ModelLoadError: the model does not load.
        ValueError: no bootstrap servers configured.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: InferenceSettings,
        *,
        model: EmbeddingModel | None = None,
        serde: AvroSerde | None = None,
        registry: SchemaRegistrySettings | None = None,
        worker_id: str | None = None,
        metrics: InferenceMetrics | None = None,
        crash_point: CrashPoint | None = None,
        device: str | None = None,
    ) -> None:
        self.settings = settings
        self.model = model or load_model(settings.model, device=device, torch_threads=settings.torch_threads)
        self.serde = serde or serde_from_settings(registry or SchemaRegistrySettings())
        self.worker_id = worker_id or uuid.uuid4().hex[:8]
        self.metrics = metrics or InferenceMetrics()
        self.crash_point = crash_point
        self.producer = EventProducer(kafka, self.serde)
        self.dlq = DeadLetterPublisher(self.producer, f"inference-{settings.model}", topic=settings.dlq_topic)
        self.resolver = EventTextResolver(kafka, self.serde)
        self.consumer = make_consumer(
            kafka,
            settings.consumer_group,
            **{"client.id": f"inference-{self.worker_id}", "fetch.wait.max.ms": 50},
        )
        self._pending: BatchAccumulator[Message] = BatchAccumulator(
            settings.max_batch_size, settings.max_wait_ms / 1000.0
        )
        self._committed: dict[tuple[str, int], int] = {}
        self._unsettled: list[_Unsettled] = []
        self._lock = threading.Lock()
        self._stats = WorkerStats(
            worker_id=self.worker_id,
            model_name=self.model.name,
            model_version=self.model.version,
            device=self.model.device,
        )
        self.consumer.subscribe(
            [settings.requests_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._log = log.bind(worker_id=self.worker_id, model=self.model.name, topic=settings.requests_topic)

    # -- rebalancing -------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            added = {(tp.topic, tp.partition) for tp in partitions}
            self._stats.assignment = sorted(set(self._stats.assignment) | added)
        self._log.info("partitions_assigned", partitions=[tp.partition for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        mine = self._pending.drop(lambda m: (m.topic(), m.partition()) not in revoked)
        if mine:
            self._log.info("answering_before_revoke", requests=len(mine))
            self._answer(mine)
        self._settle()  # deliver and commit everything answered before the partitions go
        for key in revoked:
            self._committed.pop(key, None)
        with self._lock:
            self._stats.assignment = sorted(set(self._stats.assignment) - revoked)
        self._log.info("partitions_revoked", partitions=sorted(p for _, p in revoked))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {(tp.topic, tp.partition) for tp in partitions}
        dropped = self._pending.drop(lambda m: (m.topic(), m.partition()) not in lost)
        self._settle()  # results already produced are delivered; their commit may fail, which is harmless
        for key in lost:
            self._committed.pop(key, None)
        with self._lock:
            self._stats.assignment = sorted(set(self._stats.assignment) - lost)
        self._log.warning("partitions_lost", partitions=sorted(p for _, p in lost), dropped=len(dropped))

    # -- the loop ----------------------------------------------------------------------------------

    def poll_once(self) -> int:
        """Fetch what is there (waiting at most until the open batch is due) and run due batches.

        Returns:
            how many requests were finished (answered or dead-lettered) by this call.

        Raises:
            confluent_kafka.KafkaException: a fatal consumer error.
            streams.errors.DeliveryError: a result or dead letter was not acknowledged (nothing committed).
        """
        if self._unsettled:
            timeout = 0.0  # something to deliver: do not wait for more
        elif len(self._pending):
            timeout = self._pending.remaining_wait_seconds()
        else:
            timeout = _IDLE_POLL_SECONDS
        for m in self.consumer.consume(max(1, self._pending.room), timeout):
            err = m.error()
            if err is None:
                self._pending.add([m])
            elif err.code() != KafkaError._PARTITION_EOF:
                if err.fatal():
                    raise KafkaException(err)
                self._log.warning("consumer_error", error=str(err))
        done = 0
        if self._pending.ready():
            self._answer(self._pending.take())
            if len(self._unsettled) >= _MAX_UNSETTLED_BATCHES:
                done += self._settle()
        elif self._unsettled:
            done += self._settle()
        self._refresh_lag()
        return done

    def run(self, stop: threading.Event) -> None:
        """Loop :meth:`poll_once` until ``stop`` is set, answer what is pending, then leave the group."""
        self._log.info("worker_started", device=self.model.device, version=self.model.version)
        try:
            while not stop.is_set():
                self.poll_once()
            while len(self._pending):
                self._answer(self._pending.take())
            self._settle()
        finally:
            self.close()

    def close(self) -> None:
        """Leave the consumer group and release the clients (results already flushed stay committed)."""
        try:
            self.consumer.close()
        except RuntimeError:
            pass  # already closed
        self.resolver.close()
        try:
            self.producer.flush(timeout_seconds=5.0)
        except StreamsError as exc:
            self._log.warning("producer_close_failed", error=str(exc))

    # -- one batch ---------------------------------------------------------------------------------

    def _answer(self, batch: Sequence[Message]) -> None:
        """Run one batch and hand its results and dead letters to the producer (not yet flushed)."""
        if not batch:
            return
        self._stats.batches += 1
        batch_no = self._stats.batches
        batch_id = f"{self.worker_id}-{batch_no}"
        answers: list[_Answer] = []
        dead = 0
        decoded = [decode_message(self.serde, m) for m in batch]
        self.resolver.prefetch(_text_refs(decoded))
        for m, d in zip(batch, decoded, strict=True):
            outcome = self._prepare(m, d)
            if isinstance(outcome, _Answer):
                answers.append(outcome)
            else:
                dead += 1
        ok, model_seconds = self._embed(answers)
        dead += len(answers) - len(ok)
        finished_at = datetime.now(UTC)
        for a, vector in ok:
            latency_ms = max(0.0, finished_at.timestamp() * 1000 - a.event.timestamp_ms)
            result = EmbeddingResult(
                request_id=a.request.request_id,
                model_name=self.model.name,
                model_version=self.model.version,
                vector=vector,
                normalized=self.model.normalized,
                batch_id=batch_id,
                batch_size=len(batch),
                latency_ms=latency_ms,
                model_latency_ms=model_seconds * 1000,
                source_partition=a.event.partition,
                source_offset=a.event.offset,
                answered_at=finished_at,
            )
            self.producer.produce(
                self.settings.results_topic,
                Event.create(
                    RESULT_SCHEMA,
                    a.request.request_id,
                    result.to_avro(),
                    source=f"/inference/{self.model.name}",
                    time=a.request.requested_at,
                    id=result_event_id(self.model.name, self.model.version, a.request.request_id),
                    correlation_id=a.event.attributes.correlation_id,
                    causation_id=a.event.attributes.id,
                ),
            )
        if self.crash_point is not None:
            self.crash_point.maybe_crash(batch_no)
        self._unsettled.append(
            _Unsettled(batch=batch, answered=len(ok), dead=dead, model_seconds=model_seconds)
        )

    def _settle(self) -> int:
        """Wait until every produced result and dead letter is acknowledged, then commit their batches.

        Returns:
            requests finished (answered or dead-lettered) by the batches settled.

        Raises:
            streams.errors.DeliveryError: a record was not acknowledged (nothing is committed; the
                batches are answered again after the restart that follows).
        """
        if not self._unsettled:
            return 0
        batches, self._unsettled = self._unsettled, []
        self.producer.flush()
        self._commit([m for u in batches for m in u.batch])
        model = self.model.name
        for u in batches:
            self.metrics.requests.labels(model, "answered").inc(u.answered)
            self.metrics.requests.labels(model, "dead_lettered").inc(u.dead)
            self.metrics.batch_size.labels(model).observe(len(u.batch))
            self.metrics.batch_duration.labels(model).observe(u.model_seconds)
        with self._lock:
            for u in batches:
                self._stats.answered += u.answered
                self._stats.dead_lettered += u.dead
                self._stats.batch_sizes.append(len(u.batch))
            self._stats.last_batch_at = time.monotonic()
        return sum(len(u.batch) for u in batches)

    def _dead_letter(self, m: Message, reason: str, error_type: str) -> None:
        self.dlq.publish(
            source_topic=m.topic(),
            partition=m.partition(),
            offset=m.offset(),
            key=m.key(),
            value=m.value(),
            headers=tuple(m.headers() or ()),
            reason=reason,
            error_type=error_type,
        )
        self._log.warning("request_dead_lettered", partition=m.partition(), offset=m.offset(), reason=reason)

    def _prepare(self, m: Message, decoded: ConsumedEvent | DecodeFailure) -> _Answer | None:
        if isinstance(decoded, DecodeFailure):
            self.dlq.publish_failure(decoded)
            self._log.warning(
                "request_dead_lettered", partition=m.partition(), offset=m.offset(), reason=decoded.reason
            )
            return None
        try:
            if decoded.schema != REQUEST_SCHEMA:
                raise RequestError(f"expected {REQUEST_SCHEMA}, got {decoded.schema}")
            request = EmbeddingRequest.from_avro(decoded.data)
            if request.model != self.model.name:
                raise RequestError(
                    f"model {request.model!r} is not served here (this pool runs {self.model.name})"
                )
            text = request.text if request.text is not None else self.resolver.resolve(request.text_ref)  # type: ignore[arg-type]
            if not text.strip():
                raise RequestError("empty text: nothing to embed")
            if len(text) > MAX_TEXT_CHARS:
                raise RequestError(f"text of {len(text)} characters exceeds {MAX_TEXT_CHARS}")
        except RequestError as exc:
            self._dead_letter(m, f"request {decoded.key!r}: {exc}", type(exc).__name__)
            return None
        return _Answer(msg=m, event=decoded, request=request, text=text)

    def _embed(self, answers: list[_Answer]) -> tuple[list[tuple[_Answer, np.ndarray]], float]:
        """Run the model once on the batch; if that fails, per request, dead-lettering the failures.

        Returns:
            ``([(answer, vector of shape (dimension,)), ...] for the answered, model seconds)``.
        """
        texts = [a.text for a in answers]
        started = time.perf_counter()
        if not texts:
            return [], 0.0
        try:
            return list(zip(answers, self.model.embed(texts), strict=True)), time.perf_counter() - started
        except Exception as batch_exc:  # noqa: BLE001 - isolate the request that breaks the model
            self._log.warning("batch_failed_retrying_alone", error=repr(batch_exc), size=len(texts))
        ok: list[tuple[_Answer, np.ndarray]] = []
        for a in answers:
            try:
                ok.append((a, self.model.embed([a.text])[0]))
            except Exception as exc:  # noqa: BLE001 - poison request: dead-letter it, go on
                self._dead_letter(a.msg, f"model failed: {exc!r}", type(exc).__name__)
        return ok, time.perf_counter() - started

    def _commit(self, batch: Sequence[Message]) -> None:
        offsets = offsets_to_commit((m.topic(), m.partition(), m.offset()) for m in batch)
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for t, p, o in offsets], asynchronous=False)
        except KafkaException as exc:
            # The partition moved to another member meanwhile: it will answer these requests again
            # (same result ids), which readers de-duplicate. Nothing is lost.
            self._log.warning("commit_failed", error=str(exc), offsets=offsets)
            return
        for t, p, o in offsets:
            self._committed[(t, p)] = o

    def _refresh_lag(self) -> None:
        total = 0
        known = False
        try:
            assignment = self.consumer.assignment()
            positions = {(tp.topic, tp.partition): tp.offset for tp in self.consumer.position(assignment)}
            for tp in assignment:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    continue
                key = (tp.topic, tp.partition)
                base = self._committed.get(key)
                if base is None:  # nothing committed by this member yet: what it has not fetched
                    position = positions.get(key, -1)
                    base = position if position >= 0 else high
                    base -= sum(1 for m in self._pending.items if (m.topic(), m.partition()) == key)
                total += max(0, high - base)
                known = True
        except KafkaException:
            return
        with self._lock:
            self._stats.lag_messages = total if known else None

    def stats(self) -> WorkerStats:
        """A copy of the current :class:`WorkerStats` (thread-safe)."""
        with self._lock:
            s = self._stats
            return WorkerStats(
                worker_id=s.worker_id,
                model_name=s.model_name,
                model_version=s.model_version,
                device=s.device,
                assignment=list(s.assignment),
                lag_messages=s.lag_messages,
                answered=s.answered,
                dead_lettered=s.dead_lettered,
                batches=s.batches,
                batch_sizes=list(s.batch_sizes),
                last_batch_at=s.last_batch_at,
            )

    def drain_stats(self) -> WorkerStats:
        """Like :meth:`stats`, and clear ``batch_sizes`` (each size is reported once)."""
        s = self.stats()
        with self._lock:
            del self._stats.batch_sizes[: len(s.batch_sizes)]
        return s
