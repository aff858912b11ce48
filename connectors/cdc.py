"""CDC normalisation on the log: raw Debezium records in, typed ``sophia.cdc.RowChanged`` events out.

Two halves:

* **The importer** (:func:`connect_records`, :func:`import_debezium_file`) replays a file of recorded
  Debezium change events (one JSON value per line, with or without the Connect JSON schema wrapper,
  e.g. ``../shared/data/cdc/debezium/postgres_inventory_products.jsonl``) onto the raw CDC topics as
  Kafka Connect's ``JsonConverter`` writes them: topic ``<topic.prefix>.<schema>.<table>``, value =
  the line's JSON bytes unchanged, key = the primary-key struct as JSON (``{"id":101}``, wrapped in
  ``{"schema", "payload"}`` when the value is), a tombstone (same key, ``null`` value) after each
  delete (``tombstones.on.delete=true``), keyed records partitioned with murmur2 as the Java
  producer does.
* **The normaliser** (:class:`CdcNormaliser`) consumes raw CDC topics (a regex subscription,
  :data:`RAW_TOPIC_PATTERN`, or a list), parses each value with :func:`connectors.debezium.parse_change_event`
  and produces a ``sophia.cdc.RowChanged`` event to ``cdc.changes`` with CloudEvents headers. Its id is
  derived from (connector, lsn, table, key, op), so replaying the same history yields the same ids and
  the projections de-duplicate. Records that are not change events go to the dead-letter topic with
  their raw bytes and the reason; processing goes on. Offsets are committed only after the batch's
  outputs and dead letters are acknowledged (at least once; duplicates carry the same id).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Counter

from core.observability import REGISTRY
from core.settings import Settings
from connectors.debezium import ChangeEvent, ChangeEventError, ChangeOp, parse_change_event
from connectors.errors import SourceDataError
from streams.catalogue import CATALOGUE, TopicSpec, create_missing_topics
from streams.consumer import DLQ_TOPIC, DeadLetterPublisher, make_consumer
from streams.envelope import Event, deterministic_id
from streams.errors import SchemaValidationError
from streams.producer import EventProducer
from streams.serde import AvroSerde

__all__ = [
    "CDC_TOPICS",
    "CHANGES_TOPIC",
    "DEFAULT_TOPIC_PREFIX",
    "RAW_TOPIC_PATTERN",
    "ROW_CHANGED",
    "CdcNormaliser",
    "ConnectRecord",
    "ImportProblem",
    "ImportReport",
    "NormaliserStats",
    "change_event_id",
    "connect_records",
    "ensure_changes_topic",
    "from_avro",
    "import_debezium_file",
    "normalise_record",
    "raw_topic_pattern",
    "row_key",
    "to_avro",
]

log = structlog.get_logger(__name__)

ROW_CHANGED = "sophia.cdc.RowChanged"
CHANGES_TOPIC = "cdc.changes"
DEFAULT_TOPIC_PREFIX = "cdc"
# Debezium data topics are <topic.prefix>.<schema|db>.<table>: three dot-separated parts. The pattern
# leaves out cdc.changes (two parts), the connector's schema-change topic <prefix> and
# <prefix>.transaction.
RAW_TOPIC_PATTERN = r"^cdc\.[^.]+\.[^.]+$"


def raw_topic_pattern(topic_prefix: str = DEFAULT_TOPIC_PREFIX) -> str:
    """The regex subscription of the raw data topics of ``topic_prefix``: ``^<prefix>\\.[^.]+\\.[^.]+$``."""
    escaped = "".join(f"\\{c}" if c in ".^$*+?()[]{}|\\" else c for c in topic_prefix)
    return f"^{escaped}\\.[^.]+\\.[^.]+$"


CDC_TOPICS: tuple[TopicSpec, ...] = (CATALOGUE[CHANGES_TOPIC],)

_normalised = Counter(
    "backbone_cdc_changes_normalised", "Debezium change events produced as RowChanged", registry=REGISTRY
)
_tombstones = Counter("backbone_cdc_tombstones_skipped", "Tombstones read and skipped", registry=REGISTRY)
_dead = Counter(
    "backbone_cdc_records_dead_lettered", "Raw CDC records sent to the dead-letter topic", registry=REGISTRY
)


def _compact(value: Any) -> str:
    """JSON as Kafka Connect's JsonConverter writes it: compact, key order kept, UTF-8 unescaped."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# -- the typed record -----------------------------------------------------------------------------------------


def row_key(change: ChangeEvent) -> str:
    """The Kafka key and CloudEvents subject of a change: ``schema.table:pk``.

    A single-column key gives its value (``inventory.products:101``); a composite key its values
    joined by ``,`` in key order (``sales.order_lines:7,2``); a truncate (no key) ``schema.table``.
    """
    if not change.key:
        return change.table_id
    return f"{change.table_id}:{','.join(str(v) for v in change.key.values())}"


def change_event_id(change: ChangeEvent) -> str:
    """The CloudEvents id of a change: the same captured change always gets the same id.

    Derived from the connector (``source.name``, ``source.connector``), the table, the primary key,
    the op and the LSN. Snapshot reads share one LSN but differ by key. Without an LSN (connectors other
    than PostgreSQL) the source time, transaction id and a SHA-256 of the rows stand in for it.
    """
    parts: list[object] = [
        "debezium",
        change.topic_prefix or "",
        change.connector or "",
        change.db or "",
        change.schema or "",
        change.table or "",
        _compact(change.key),
        change.op.value,
    ]
    if change.lsn is not None:
        parts.append(change.lsn)
    else:
        rows = _compact([change.before, change.after]).encode()
        parts += [
            change.source_ts.isoformat() if change.source_ts else "",
            change.tx_id if change.tx_id is not None else "",
            hashlib.sha256(rows).hexdigest(),
        ]
    return deterministic_id(*parts)


def to_avro(change: ChangeEvent, *, source_topic: str) -> dict[str, Any]:
    """The ``sophia.cdc.RowChanged`` datum of a change (rows and key as compact JSON text).

    Raises:
        ChangeEventError: the change names no table (``source.table`` missing).
    """
    if not change.table:
        raise ChangeEventError("'source.table' is missing, so the changed table is unknown")
    return {
        "op": change.op.name,
        "connector": change.connector,
        "topic_prefix": change.topic_prefix,
        "db": change.db,
        "schema": change.schema,
        "table": change.table,
        "key": _compact(change.key),
        "before": _compact(change.before) if change.before is not None else None,
        "after": _compact(change.after) if change.after is not None else None,
        "lsn": change.lsn,
        "tx_id": change.tx_id,
        "source_time": change.source_ts,
        "processed_time": change.processed_ts,
        "snapshot": change.snapshot,
        "source_topic": source_topic,
    }


def from_avro(datum: Mapping[str, Any]) -> ChangeEvent:
    """The :class:`~connectors.debezium.ChangeEvent` of a decoded ``sophia.cdc.RowChanged`` datum.

    Raises:
        ChangeEventError: ``key``, ``before`` or ``after`` is not a JSON object.
    """

    def obj(name: str) -> dict[str, Any] | None:
        text = datum.get(name)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ChangeEventError(f"RowChanged.{name} is not JSON: {exc.msg}") from exc
        if not isinstance(value, dict):
            raise ChangeEventError(f"RowChanged.{name} must be a JSON object, got {type(value).__name__}")
        return value

    def aware(t: datetime | None) -> datetime | None:
        return t.astimezone(UTC) if t is not None else None

    return ChangeEvent(
        op=ChangeOp[datum["op"]],
        connector=datum.get("connector"),
        topic_prefix=datum.get("topic_prefix"),
        db=datum.get("db"),
        schema=datum.get("schema"),
        table=datum["table"],
        key=obj("key") or {},
        before=obj("before"),
        after=obj("after"),
        lsn=datum.get("lsn"),
        tx_id=datum.get("tx_id"),
        source_ts=aware(datum.get("source_time")),
        processed_ts=aware(datum.get("processed_time")),
        snapshot=bool(datum.get("snapshot")),
    )


def normalise_record(
    topic: str,
    key: bytes | str | None,
    value: bytes | str | None,
    *,
    timestamp_ms: int = 0,
    key_columns: Sequence[str] = ("id",),
) -> Event | None:
    """Turn one raw CDC record into a ``sophia.cdc.RowChanged`` event (pure; no Kafka).

    Args:
        topic: the raw topic it was read from (recorded as ``source_topic``).
        key: the record key (Connect JSON key struct, wrapped or not), or ``None``.
        value: the record value (Debezium envelope JSON), or ``None`` for a tombstone.
        timestamp_ms: the record timestamp, epoch milliseconds; the event time when the change carries
            neither ``source.ts_ms`` nor ``ts_ms``.
        key_columns: primary-key columns read from the row when the record has no key.

    Returns:
        The event (key and subject ``schema.table:pk``, time = source time, deterministic id), or
        ``None`` for a tombstone.

    Raises:
        ChangeEventError: the record is not a Debezium change event (the message says why), or it has
            no table or no time.
    """
    change = parse_change_event(value, key=key if key else None, key_columns=key_columns)
    if change is None:
        return None
    event_time = change.source_ts or change.processed_ts
    if event_time is None:
        if timestamp_ms <= 0:
            raise ChangeEventError(
                "no 'source.ts_ms', no 'ts_ms' and no record timestamp: the event time is unknown"
            )
        event_time = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    datum = to_avro(change, source_topic=topic)
    subject = row_key(change)
    return Event.create(
        ROW_CHANGED,
        subject,
        datum,
        source=f"/connectors/debezium/{change.connector or 'unknown'}/{change.topic_prefix or change.db or 'unknown'}",
        time=event_time,
        id=change_event_id(change),
        subject=subject,
    )


# -- the importer ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectRecord:
    """One record as Kafka Connect would write it to a raw CDC topic.

    Attributes:
        topic: ``<topic.prefix>.<schema>.<table>``.
        key: the JSON key bytes (``None`` for truncates and unroutable lines).
        value: the JSON value bytes, unchanged from the file; ``None`` for a tombstone.
        timestamp_ms: the record timestamp, epoch milliseconds (the envelope's ``ts_ms``; 0 when absent,
            leaving it to the producer).
        line: the 1-based line of the file it came from.
    """

    topic: str
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    line: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportProblem:
    """A line the importer could not route as a change event.

    Attributes:
        line: 1-based line number.
        reason: what is wrong.
        sent: True when the line was still put on the explicit ``--topic`` (the normaliser then
            dead-letters it).
    """

    line: int
    reason: str
    sent: bool


@dataclass(slots=True)
class ImportReport:
    """What :func:`import_debezium_file` did."""

    lines: int = 0
    records: int = 0
    tombstones: int = 0
    topics: dict[str, int] = field(default_factory=dict)
    problems: list[ImportProblem] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready report."""
        return {
            "lines": self.lines,
            "records": self.records,
            "tombstones": self.tombstones,
            "topics": dict(self.topics),
            "problems": [{"line": p.line, "reason": p.reason, "sent": p.sent} for p in self.problems],
            "seconds": self.seconds,
        }


def _key_schema(value: Mapping[str, Any], columns: Sequence[str], name: str) -> dict[str, Any] | None:
    """The Connect key schema for ``columns``, taken from the row struct of the value's schema."""
    schema = value.get("schema")
    if not isinstance(schema, Mapping):
        return None
    by_name: dict[str, Any] = {}
    for envelope_field in schema.get("fields") or ():
        if isinstance(envelope_field, Mapping) and envelope_field.get("field") in ("before", "after"):
            for f in envelope_field.get("fields") or ():
                if isinstance(f, Mapping) and "field" in f:
                    by_name.setdefault(f["field"], f)
    fields = [{**by_name[c], "optional": False} if c in by_name else {"type": "string", "optional": False, "field": c}
              for c in columns]  # fmt: skip
    return {"type": "struct", "fields": fields, "optional": False, "name": name}


def _route(
    payload: Mapping[str, Any], value: Mapping[str, Any], topic_prefix: str, key_columns: Sequence[str]
) -> tuple[str, bytes | None, bool]:
    """(topic, key bytes, is a delete) of one parsed line.

    Raises:
        ChangeEventError: no ``source.table``, or a key column missing from the row.
    """
    source = payload.get("source")
    if not isinstance(source, Mapping) or not source.get("table"):
        raise ChangeEventError("no 'source.table', so the topic is unknown")
    middle = source.get("schema") or source.get("db")
    if not middle:
        raise ChangeEventError("no 'source.schema' nor 'source.db', so the topic is unknown")
    topic = f"{topic_prefix}.{middle}.{source['table']}"
    op = payload.get("op")
    if op == ChangeOp.TRUNCATE.value:
        return topic, None, False  # Debezium writes truncates without a key
    row = payload.get("before") if op == ChangeOp.DELETE.value else payload.get("after")
    if not isinstance(row, Mapping):
        raise ChangeEventError(f"op {op!r} has no row to take the key from")
    missing = [c for c in key_columns if c not in row]
    if missing:
        raise ChangeEventError(f"key column(s) {', '.join(missing)} not in the row")
    key_payload = {c: row[c] for c in key_columns}
    wrapped = "payload" in value and "schema" in value
    if wrapped:
        name = f"{source.get('name') or topic_prefix}.{middle}.{source['table']}.Key"
        key: Any = {"schema": _key_schema(value, key_columns, name), "payload": key_payload}
    else:
        key = key_payload
    return topic, _compact(key).encode(), op == ChangeOp.DELETE.value


def connect_records(
    lines: Iterable[str],
    *,
    topic_prefix: str = DEFAULT_TOPIC_PREFIX,
    topic: str | None = None,
    key_columns: Sequence[str] = ("id",),
) -> Iterator[ConnectRecord | ImportProblem]:
    """The records Kafka Connect would write for recorded Debezium values, in order (pure; no Kafka).

    Args:
        lines: one JSON change event value per line (blank lines are skipped).
        topic_prefix: Debezium's ``topic.prefix`` for the topic names.
        topic: put every record on this topic instead of ``<topic_prefix>.<schema>.<table>``; lines
            that cannot be routed are then still sent, unchanged and without a key.
        key_columns: the table's primary-key columns, in key order.

    Yields:
        A :class:`ConnectRecord` per change event (and a tombstone after each delete), or an
        :class:`ImportProblem` for a line that is not a routable change event.
    """
    for lineno, line in enumerate(lines, 1):
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        raw = text.encode("utf-8")
        try:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ChangeEventError(f"not JSON: {exc.msg} at position {exc.pos}") from exc
            if not isinstance(value, dict):
                raise ChangeEventError(f"a JSON object is expected, got {type(value).__name__}")
            payload = value["payload"] if "payload" in value and "schema" in value else value
            if not isinstance(payload, dict):
                raise ChangeEventError("'payload' must be a JSON object")
            routed_topic, key, is_delete = _route(payload, value, topic_prefix, key_columns)
        except ChangeEventError as exc:
            yield ImportProblem(line=lineno, reason=exc.reason, sent=topic is not None)
            if topic is not None:
                yield ConnectRecord(topic=topic, key=None, value=raw, timestamp_ms=0, line=lineno)
            continue
        ts = payload.get("ts_ms")
        timestamp_ms = ts if isinstance(ts, int) and not isinstance(ts, bool) and ts > 0 else 0
        target = topic or routed_topic
        yield ConnectRecord(topic=target, key=key, value=raw, timestamp_ms=timestamp_ms, line=lineno)
        if is_delete:
            yield ConnectRecord(topic=target, key=key, value=None, timestamp_ms=timestamp_ms, line=lineno)


def _ensure_raw_topics(
    settings: Settings, topics: Iterable[str], partitions: int, timeout_seconds: float
) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(settings.kafka.librdkafka())
    create_missing_topics(
        admin,
        [NewTopic(t, num_partitions=partitions, replication_factor=-1) for t in sorted(set(topics))],
        timeout_seconds=timeout_seconds,
    )


def import_debezium_file(
    settings: Settings,
    path: Path,
    *,
    topic_prefix: str = DEFAULT_TOPIC_PREFIX,
    topic: str | None = None,
    key_columns: Sequence[str] = ("id",),
    partitions: int = 1,
    producer: EventProducer | None = None,
) -> ImportReport:
    """Put a file of recorded Debezium change events on the raw CDC topics, as Kafka Connect would.

    Missing topics are created with ``partitions`` partitions (Debezium's usual
    ``topic.creation.default.partitions=1`` keeps one table's changes in one order).

    Args:
        settings: Kafka settings.
        path: a JSON-lines file of Debezium change event values.
        topic_prefix: Debezium's ``topic.prefix``.
        topic: one topic for every record instead of the derived ones.
        key_columns: the primary-key columns, in key order.
        partitions: partitions of topics this creates.
        producer: the producer to use (one with murmur2 partitioning is made otherwise).

    Returns:
        The report; lines that are not change events are in ``problems``.

    Raises:
        SourceDataError: the file cannot be read as UTF-8 text.
        streams.errors.BrokerUnavailableError, streams.errors.DeliveryError: the records were not all
            acknowledged.
    """
    start = time.perf_counter()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceDataError(path, f"cannot read the file: {exc}") from exc
    items = list(connect_records(lines, topic_prefix=topic_prefix, topic=topic, key_columns=key_columns))
    report = ImportReport(lines=sum(1 for line in lines if line.strip()))
    records = [i for i in items if isinstance(i, ConnectRecord)]
    report.problems = [i for i in items if isinstance(i, ImportProblem)]
    _ensure_raw_topics(settings, {r.topic for r in records}, partitions, 15.0)
    # Java's default partitioner hashes keys with murmur2; librdkafka's default is CRC32.
    own = producer is None
    producer = producer or EventProducer(settings.kafka, _NO_SERDE, extra={"partitioner": "murmur2_random"})
    for r in records:
        producer.produce_raw(r.topic, key=r.key, value=r.value, timestamp_ms=r.timestamp_ms)
        report.records += 1
        report.tombstones += r.value is None
        report.topics[r.topic] = report.topics.get(r.topic, 0) + 1
    producer.flush()
    if own:
        producer.close()
    report.seconds = round(time.perf_counter() - start, 3)
    log.info("debezium file imported", path=str(path), records=report.records, problems=len(report.problems))
    return report


def ensure_changes_topic(
    settings: Settings, name: str = CHANGES_TOPIC, *, timeout_seconds: float = 15.0
) -> bool:
    """Create the typed CDC topic with the partitions and configs of :data:`CDC_TOPICS` if absent.

    Returns:
        True when it was created.

    Raises:
        streams.errors.BrokerUnavailableError: the broker did not answer.
        streams.errors.StreamsError: the broker refused the topic.
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    spec = CDC_TOPICS[0]
    new = NewTopic(name, num_partitions=spec.partitions, replication_factor=-1, config=spec.config())
    return bool(create_missing_topics(AdminClient(settings.kafka.librdkafka()), [new], timeout_seconds=timeout_seconds))


class _NoSerde:
    """Stands in for the serde of a producer that only sends raw JSON bytes."""

    def encode(self, *_: Any) -> bytes:
        raise TypeError("the raw CDC producer sends JSON bytes, not Avro")


_NO_SERDE: Any = _NoSerde()


# -- the normaliser -------------------------------------------------------------------------------------------


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
