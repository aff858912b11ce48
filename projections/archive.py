"""The event archive: every record of every catalogue topic kept in PostgreSQL, so audits and
rebuilds reach past the log's retention.

It is a projection like the others (same runner, same transaction as its checkpoint, schema
``proj_archive``), with two differences the runner honours:

* **Keyed by position, not by event id** (``dedupe_by_id = False``): the archive is a copy of the log,
  so a record that repeats an event id at another offset (a re-import, a redelivery) is archived too.
  Its primary key is ``(topic, partition, offset, event_time)``; ``ON CONFLICT DO NOTHING`` makes a
  re-applied batch a no-op.
* **Undecodable records are archived too** (``apply_failures``): raw key, value and headers, with
  ``decode_error`` set and the CloudEvents columns empty; the event time is then the record
  timestamp. The archive does not dead-letter them itself: every other projection reading the topic
  does, and ``backbone.dlq`` is itself a catalogue topic, so the dead letters are archived as well.

Table ``archived_events`` is partitioned by day on ``event_time`` (UTC). A day's partition is created
inside the batch transaction the first time the batch holds an event of that day; a default partition
takes anything else (it stays empty in practice, since partitions are made before the insert).
Rows are written with ``COPY`` into a temporary table, then ``INSERT ... SELECT ... ON CONFLICT``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from streams.catalogue import CATALOGUE
from streams.consumer import ConsumedEvent, DecodeFailure, RawRecord
from streams.envelope import CloudEvent
from streams.errors import DeserializationError, EnvelopeError
from streams.producer import epoch_ms
from streams.serde import AvroSerde

__all__ = ["ARCHIVE_TABLE", "ArchiveProjection", "ArchivedRecord", "headers_from_json", "read_archive"]

ARCHIVE_TABLE = "archived_events"

DDL = f"""
CREATE TABLE IF NOT EXISTS {ARCHIVE_TABLE} (
    topic            text        NOT NULL,
    partition        integer     NOT NULL,
    "offset"         bigint      NOT NULL,
    event_time       timestamptz NOT NULL,
    record_timestamp timestamptz NOT NULL,
    key              bytea,
    value            bytea,
    headers          jsonb       NOT NULL,
    event_id         text,
    type             text,
    source           text,
    subject          text,
    correlation_id   text,
    causation_id     text,
    decode_error     text,
    PRIMARY KEY (topic, partition, "offset", event_time)
) PARTITION BY RANGE (event_time);
CREATE TABLE IF NOT EXISTS {ARCHIVE_TABLE}_default PARTITION OF {ARCHIVE_TABLE} DEFAULT;
CREATE INDEX IF NOT EXISTS {ARCHIVE_TABLE}_key ON {ARCHIVE_TABLE} (key);
CREATE INDEX IF NOT EXISTS {ARCHIVE_TABLE}_subject ON {ARCHIVE_TABLE} (subject);
CREATE INDEX IF NOT EXISTS {ARCHIVE_TABLE}_correlation ON {ARCHIVE_TABLE} (correlation_id);
CREATE INDEX IF NOT EXISTS {ARCHIVE_TABLE}_causation ON {ARCHIVE_TABLE} (causation_id);
CREATE INDEX IF NOT EXISTS {ARCHIVE_TABLE}_event_id ON {ARCHIVE_TABLE} (event_id);
"""

_COLS = (
    "topic", "partition", "offset", "event_time", "record_timestamp", "key", "value", "headers", "event_id",
    "type", "source", "subject", "correlation_id", "causation_id", "decode_error",
)  # fmt: skip
_QCOLS = ", ".join(f'"{c}"' for c in _COLS)


def _headers_json(headers: Sequence[tuple[str, bytes | None]]) -> str:
    """Headers as a JSON array of ``[name, base64 value or null]`` (order and repeats kept)."""
    return json.dumps([[k, None if v is None else base64.b64encode(v).decode("ascii")] for k, v in headers])


def headers_from_json(doc: Any) -> tuple[tuple[str, bytes | None], ...]:
    """The raw headers back from the archive's ``headers`` column (see ``_headers_json``)."""
    items = json.loads(doc) if isinstance(doc, str) else doc
    return tuple((k, None if v is None else base64.b64decode(v)) for k, v in items)


def _ms(ts_ms: int) -> datetime:
    return datetime.fromtimestamp(ts_ms / 1000, UTC)


def _day(t: datetime) -> datetime:
    t = t.astimezone(UTC)
    return datetime(t.year, t.month, t.day, tzinfo=UTC)


class ArchiveProjection:
    """Keep every record of ``topics`` (default: the whole catalogue) in ``archived_events``."""

    name = "archive"
    version = 1
    topics: tuple[str, ...] = tuple(CATALOGUE)
    dedupe_by_id = False

    def __init__(self, topics: Sequence[str] | None = None) -> None:
        if topics is not None:
            self.topics = tuple(topics)
        self._days: set[tuple[str, datetime]] = set()

    def create(self, conn: psycopg.Connection) -> None:
        """Create the partitioned table, its default partition and its indexes."""
        conn.execute(DDL)

    def _ensure_partitions(self, cur: psycopg.Cursor, times: Sequence[datetime]) -> None:
        schema = cur.execute("SELECT current_schema()").fetchone()[0] if times else None
        for day in sorted({_day(t) for t in times}):
            if (schema, day) in self._days:
                continue
            part = f"{ARCHIVE_TABLE}_{day:%Y%m%d}"
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {part} PARTITION OF {ARCHIVE_TABLE} "
                f"FOR VALUES FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')"
            )
            self._days.add((schema, day))

    def _write(self, cur: psycopg.Cursor, rows: list[tuple[Any, ...]]) -> None:
        self._ensure_partitions(cur, [r[3] for r in rows])
        cur.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS _archive_in (LIKE {ARCHIVE_TABLE} INCLUDING DEFAULTS) "
            "ON COMMIT DELETE ROWS"
        )
        with cur.copy(f"COPY _archive_in ({_QCOLS}) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)
        cur.execute(
            f"INSERT INTO {ARCHIVE_TABLE} ({_QCOLS}) SELECT {_QCOLS} FROM _archive_in ON CONFLICT DO NOTHING"
        )
        cur.execute("TRUNCATE _archive_in")

    def apply(self, cur: psycopg.Cursor, events: Sequence[ConsumedEvent]) -> None:
        """Archive decoded events (raw bytes, headers, position and CloudEvents attributes)."""
        rows = []
        for e in events:
            a = e.attributes
            rows.append((
                e.topic, e.partition, e.offset, a.time, _ms(e.timestamp_ms),
                e.key.encode() if e.key is not None else None, e.value, _headers_json(e.headers), a.id, a.type,
                a.source, a.subject, a.correlation_id, a.causation_id, None,
            ))  # fmt: skip
        if rows:
            self._write(cur, rows)

    def apply_failures(self, cur: psycopg.Cursor, failures: Sequence[DecodeFailure]) -> None:
        """Archive undecodable records as they are, with the reason in ``decode_error``."""
        rows = [
            (f.topic, f.partition, f.offset, _ms(f.timestamp_ms), _ms(f.timestamp_ms), f.key, f.value,
             _headers_json(f.headers), None, None, None, None, None, None, f"{f.error_type}: {f.reason}")
            for f in failures
        ]  # fmt: skip
        if rows:
            self._write(cur, rows)


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchivedRecord:
    """One row of the archive.

    Attributes:
        topic, partition, offset: its position in the log.
        event_time: CloudEvents ``time`` (record timestamp for an undecodable record), aware UTC.
        key, value: raw bytes as produced.
        headers: raw headers as produced.
        decode_error: why it could not be decoded, None for a decoded event.
    """

    topic: str
    partition: int
    offset: int
    event_time: datetime
    record_timestamp: datetime
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    decode_error: str | None = None

    def raw(self) -> RawRecord:
        """The record as read from the log (for a reader with its own decoder)."""
        return RawRecord(
            topic=self.topic, partition=self.partition, offset=self.offset,
            timestamp_ms=epoch_ms(self.record_timestamp), key=self.key, value=self.value,
            headers=self.headers,
        )  # fmt: skip

    def decode(
        self, serde: AvroSerde, decoder: Callable[[RawRecord], ConsumedEvent | DecodeFailure] | None = None
    ) -> ConsumedEvent | DecodeFailure:
        """Decode it as the consumer would have (the same :class:`ConsumedEvent` or failure); with
        ``decoder`` (a projection's own ``decode``), as that reader would have."""
        if decoder is not None:
            return decoder(self.raw())
        ts_ms = epoch_ms(self.record_timestamp)
        try:
            attributes = CloudEvent.from_headers(self.headers)
            schema, data = serde.decode(self.value or b"")
        except (EnvelopeError, DeserializationError) as exc:
            return DecodeFailure(
                topic=self.topic, partition=self.partition, offset=self.offset, timestamp_ms=ts_ms, key=self.key,
                value=self.value, headers=self.headers, reason=str(exc), error_type=type(exc).__name__,
            )  # fmt: skip
        return ConsumedEvent(
            topic=self.topic, partition=self.partition, offset=self.offset, timestamp_ms=ts_ms,
            key=self.key.decode("utf-8", "replace") if self.key is not None else None, attributes=attributes,
            schema=schema, data=data, value=self.value or b"", headers=self.headers,
        )  # fmt: skip


def read_archive(
    conn: psycopg.Connection,
    topic: str,
    partition: int,
    *,
    start_offset: int = 0,
    end_offset: int | None = None,
    schema: str = "proj_archive",
    chunk_size: int = 5000,
) -> Iterator[ArchivedRecord]:
    """Yield the archived records of one partition in offset order, ``start_offset <= offset < end_offset``.

    Args:
        conn: a connection (used inside its own transaction per chunk).
        topic: the topic.
        partition: the partition.
        start_offset: first offset (inclusive).
        end_offset: last offset (exclusive); None reads to the end of what is archived.
        schema: the archive's PostgreSQL schema.
        chunk_size: rows per query (keyset paging on the offset).

    Raises:
        psycopg.errors.UndefinedTable: there is no archive in ``schema``.
    """
    nxt = start_offset
    while True:
        sql = (
            f'SELECT topic, partition, "offset", event_time, record_timestamp, key, value, headers, decode_error '
            f'FROM {schema}.{ARCHIVE_TABLE} WHERE topic = %s AND partition = %s AND "offset" >= %s'
        )
        params: list[Any] = [topic, partition, nxt]
        if end_offset is not None:
            sql += ' AND "offset" < %s'
            params.append(end_offset)
        sql += ' ORDER BY "offset" LIMIT %s'
        params.append(chunk_size)
        rows = conn.execute(sql, params).fetchall()
        for t, p, o, et, rt, k, v, h, err in rows:
            yield ArchivedRecord(
                topic=t, partition=p, offset=o, event_time=et, record_timestamp=rt, key=bytes(k) if k else k,
                value=bytes(v) if v is not None else None, headers=headers_from_json(h), decode_error=err,
            )  # fmt: skip
        if len(rows) < chunk_size:
            return
        nxt = rows[-1][2] + 1
