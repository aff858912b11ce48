"""The Debezium file importer: recorded change events (one JSON value per line) replayed onto the raw CDC
topics as Kafka Connect's ``JsonConverter`` writes them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from connectors.cdc.mapping import (
    CDC_TOPICS,
    CHANGES_TOPIC,
    DEFAULT_TOPIC_PREFIX,
    _compact,
)
from connectors.debezium import ChangeEventError, ChangeOp
from connectors.errors import SourceDataError
from connectors.problems import ImportProblem
from core.settings import Settings
from streams.catalogue import create_missing_topics
from streams.producer import EventProducer

__all__ = [
    "ConnectRecord",
    "ImportProblem",
    "ImportReport",
    "connect_records",
    "ensure_changes_topic",
    "import_debezium_file",
]

log = structlog.get_logger(__name__)


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
    producer = producer or EventProducer(settings.kafka, None, extra={"partitioner": "murmur2_random"})
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
    return bool(
        create_missing_topics(
            AdminClient(settings.kafka.librdkafka()), [new], timeout_seconds=timeout_seconds
        )
    )
