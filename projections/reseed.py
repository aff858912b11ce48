"""Re-seed an empty broker from the event archive, so a restarted embedded log keeps its history.

The embedded Tansu keeps its log in memory: after a restart every topic is gone, while PostgreSQL
(durable) still holds the archive (:mod:`projections.archive`, every record of every catalogue topic)
and each projection's checkpoints. :func:`reseed_log` writes the archive back, partition by partition
in offset order, with each record's original key, value, headers and timestamp, to the same partition,
through an idempotent producer (``acks=all``, ``enable.idempotence``: order kept within a partition).

Offsets: a partition archived without gaps from offset 0 gets its records back at the same offsets, so
every stored checkpoint stays valid. Where the archive has gaps (records that left the log before they
were archived), the records are renumbered densely; the archive's own rows and every projection
checkpoint on that partition are translated to the new offsets in one transaction, and the report says
so. A delivered offset that differs from the one expected is an error (:class:`ReseedError`), never
ignored.

The window of loss: records that were on the log but not yet archived when the broker went down are
gone. A projection whose checkpoint lies beyond the restored end of a partition had applied some of
them: its checkpoint is moved back to the restored end (otherwise it would skip the next records
written there) and the report names it, with the count, so that ``backbone projections rebuild NAME``
can drop those events from its view. Topics the archive does not read (Faust changelogs, consumer
group offsets) are not restored: a Faust processor then starts over from the earliest offset, and the
insights it re-emits carry the same deterministic ids, which the projections de-duplicate.

Only partitions the broker does not have (a topic absent from it) are written; a topic that exists is
left as it is and reported as present, so running this against a live broker changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from core.settings import KafkaSettings
from projections.archive import ARCHIVE_TABLE, read_archive
from projections.errors import ProjectionError
from streams.catalogue import CATALOGUE, create_missing_topics
from streams.producer import epoch_ms

__all__ = ["CheckpointMoved", "PartitionRestored", "ReseedError", "ReseedReport", "reseed_log"]

ARCHIVE_SCHEMA = "proj_archive"


class ReseedError(ProjectionError):
    """The broker refused a record, or gave one an offset other than the one expected."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionRestored:
    """One partition written back.

    Attributes:
        topic, partition: the partition.
        records: records written.
        archived_end: offset after the last archived record (the old log's offsets).
        restored_end: the restored log's end offset (equals ``archived_end`` without gaps).
        gaps: offsets missing from the archive below ``archived_end`` (renumbered when > 0).
    """

    topic: str
    partition: int
    records: int
    archived_end: int
    restored_end: int
    gaps: int

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "topic": self.topic, "partition": self.partition, "records": self.records,
            "archived_end": self.archived_end, "restored_end": self.restored_end, "gaps": self.gaps,
        }  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointMoved:
    """A projection checkpoint changed by the re-seed.

    Attributes:
        schema, projection, topic, partition: whose checkpoint.
        before, after: next offset before and after.
        lost_events: events the projection had applied that are no longer on the log (0 for a mere
            renumbering across gaps).
    """

    schema: str
    projection: str
    topic: str
    partition: int
    before: int
    after: int
    lost_events: int

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "schema": self.schema, "projection": self.projection, "topic": self.topic, "partition": self.partition,
            "before": self.before, "after": self.after, "lost_events": self.lost_events,
        }  # fmt: skip


@dataclass(slots=True, kw_only=True)
class ReseedReport:
    """What :func:`reseed_log` did.

    Attributes:
        archive_found: the archive table exists.
        partitions: the partitions written back.
        present_topics: archived topics the broker already had (left alone).
        checkpoints_moved: projection checkpoints translated or moved back.
        seconds: wall time.
    """

    archive_found: bool = False
    partitions: list[PartitionRestored] = field(default_factory=list)
    present_topics: list[str] = field(default_factory=list)
    checkpoints_moved: list[CheckpointMoved] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def records(self) -> int:
        """Records written back."""
        return sum(p.records for p in self.partitions)

    @property
    def lost_events(self) -> int:
        """Largest count, over projections, of events applied but no longer on the log (window of loss)."""
        per: dict[str, int] = {}
        for c in self.checkpoints_moved:
            per[c.schema] = per.get(c.schema, 0) + c.lost_events
        return max(per.values(), default=0)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "archive_found": self.archive_found, "records": self.records,
            "topics": sorted({p.topic for p in self.partitions}), "lost_events": self.lost_events,
            "partitions": [p.as_json() for p in self.partitions], "present_topics": self.present_topics,
            "checkpoints_moved": [c.as_json() for c in self.checkpoints_moved], "seconds": round(self.seconds, 3),
        }  # fmt: skip


def _archived_partitions(conn: psycopg.Connection, schema: str) -> dict[tuple[str, int], tuple[int, int]]:
    """``(topic, partition) -> (records, archived end)``."""
    rows = conn.execute(
        f'SELECT topic, partition, count(*), max("offset") + 1 FROM {schema}.{ARCHIVE_TABLE} GROUP BY 1, 2'
    ).fetchall()
    conn.rollback()
    return {(t, int(p)): (int(n), int(end)) for t, p, n, end in rows}


def _checkpoint_schemas(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT table_schema FROM information_schema.tables WHERE table_name = 'projection_checkpoints' "
        "AND table_schema LIKE 'proj\\_%' ORDER BY 1"
    ).fetchall()
    conn.rollback()
    return [r[0] for r in rows]


def reseed_log(
    conn: psycopg.Connection,
    kafka: KafkaSettings,
    *,
    schema: str = ARCHIVE_SCHEMA,
    timeout_seconds: float = 60.0,
    progress: Callable[[str, int, int], None] | None = None,
    partitions: Mapping[str, int] | None = None,
) -> ReseedReport:
    """Write the archive back to the topics the broker lacks; translate checkpoints; report.

    Args:
        conn: a PostgreSQL connection (not in autocommit; each step commits or rolls back its own work).
        kafka: where the broker is.
        schema: the archive projection's schema.
        timeout_seconds: how long the broker may take to create topics and acknowledge a partition.
        progress: called as ``progress(topic, records_done, records_total)`` after each partition.
        partitions: partition counts of topics outside the catalogue (the archive does not keep a topic's
            partition count; without one a topic gets its highest archived partition + 1, and a partition
            that held nothing archived at the end would be missing, moving keys to other partitions).

    Returns:
        The report (``archive_found`` False when there is no archive: nothing was done).

    Raises:
        ReseedError: a record not acknowledged, or acknowledged at an unexpected offset.
        streams.errors.BrokerUnavailableError: the broker did not answer.
    """
    t0 = time.monotonic()
    report = ReseedReport()
    found = conn.execute("SELECT to_regclass(%s)", [f"{schema}.{ARCHIVE_TABLE}"]).fetchone()
    conn.rollback()
    if found is None or found[0] is None:
        return report
    report.archive_found = True
    archived = _archived_partitions(conn, schema)
    if not archived:
        report.seconds = time.monotonic() - t0
        return report
    admin = AdminClient(kafka.librdkafka())
    existing = set(admin.list_topics(timeout=timeout_seconds).topics)
    topics = sorted({t for t, _ in archived})
    report.present_topics = [t for t in topics if t in existing]
    todo = [t for t in topics if t not in existing]
    new: list[Any] = []
    for t in todo:
        needed = max(p for tt, p in archived if tt == t) + 1
        spec = CATALOGUE.get(t)
        if spec is not None and spec.partitions >= needed:
            new.append(spec)
        else:
            new.append(
                NewTopic(t, num_partitions=max(needed, (partitions or {}).get(t, 0)), replication_factor=1)
            )
    create_missing_topics(admin, new, timeout_seconds=timeout_seconds)
    total = sum(archived[k][0] for k in archived if k[0] in todo)
    done = 0
    producer = Producer(kafka.librdkafka(extra={
        "enable.idempotence": True, "acks": "all", "linger.ms": 20, "compression.type": "lz4",
        "message.timeout.ms": int(timeout_seconds * 1000),
    }))  # fmt: skip
    renumbered: dict[tuple[str, int], list[int]] = {}
    try:
        for topic, partition in sorted(k for k in archived if k[0] in todo):
            end = archived[(topic, partition)][1]
            old_offsets = _write_partition(producer, conn, topic, partition, schema, timeout_seconds)
            gaps = end - len(old_offsets)
            if gaps:
                renumbered[(topic, partition)] = old_offsets
            report.partitions.append(PartitionRestored(
                topic=topic, partition=partition, records=len(old_offsets), archived_end=end,
                restored_end=len(old_offsets), gaps=gaps,
            ))  # fmt: skip
            done += len(old_offsets)
            if progress is not None:
                progress(topic, done, total)
    finally:
        producer.flush(5)
    report.checkpoints_moved = _translate(conn, schema, renumbered, report.partitions)
    report.seconds = time.monotonic() - t0
    return report


def _write_partition(
    producer: Producer,
    conn: psycopg.Connection,
    topic: str,
    partition: int,
    schema: str,
    timeout_seconds: float,
) -> list[int]:
    """Produce one partition's archive in offset order; return the archived offsets, in order.

    Raises:
        ReseedError: a record refused or unacknowledged, or acknowledged at an offset other than its index.
    """
    old_offsets: list[int] = []
    delivered: dict[int, int] = {}
    errors: list[str] = []

    def on_delivery(i: int) -> Callable[[KafkaError | None, Any], None]:
        def done(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                delivered[i] = msg.offset()

        return done

    for i, rec in enumerate(read_archive(conn, topic, partition, schema=schema)):
        old_offsets.append(rec.offset)
        kwargs: dict[str, Any] = {
            "key": rec.key, "value": rec.value, "headers": list(rec.headers), "partition": partition,
            "timestamp": epoch_ms(rec.record_timestamp), "on_delivery": on_delivery(i),
        }  # fmt: skip
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.05)
    conn.rollback()
    remaining = producer.flush(timeout_seconds)
    if errors or remaining:
        raise ReseedError(
            f"{topic}[{partition}]: {len(errors)} record(s) refused, {remaining} unacknowledged"
            + (f" ({errors[0]})" if errors else "")
        )
    wrong = [i for i in range(len(old_offsets)) if delivered.get(i) != i]
    if wrong:
        raise ReseedError(
            f"{topic}[{partition}]: record {wrong[0]} of the archive got offset {delivered.get(wrong[0])}; "
            "the partition was not empty"
        )
    return old_offsets


def _new_offset(old_offsets: list[int], checkpoint: int) -> int:
    """Records archived below ``checkpoint`` (their count is the next offset on the restored log)."""
    lo, hi = 0, len(old_offsets)
    while lo < hi:
        mid = (lo + hi) // 2
        if old_offsets[mid] < checkpoint:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _translate(
    conn: psycopg.Connection,
    archive_schema: str,
    renumbered: dict[tuple[str, int], list[int]],
    partitions: list[PartitionRestored],
) -> list[CheckpointMoved]:
    """Renumber gap partitions in the archive and move every checkpoint onto the restored log, in one
    transaction."""
    restored = {(p.topic, p.partition): p for p in partitions}
    moved: list[CheckpointMoved] = []
    schemas = _checkpoint_schemas(conn)
    with conn.transaction():
        for (topic, partition), olds in renumbered.items():
            # two steps through negative offsets, so no intermediate row collides on the primary key
            conn.execute(
                f'UPDATE {archive_schema}.{ARCHIVE_TABLE} a SET "offset" = -1 - m.new '
                f"FROM unnest(%s::bigint[], %s::bigint[]) AS m(old, new) "
                f'WHERE a.topic = %s AND a.partition = %s AND a."offset" = m.old',
                [olds, list(range(len(olds))), topic, partition],
            )
            conn.execute(
                f'UPDATE {archive_schema}.{ARCHIVE_TABLE} SET "offset" = -1 - "offset" '
                f'WHERE topic = %s AND partition = %s AND "offset" < 0',
                [topic, partition],
            )
        for s in schemas:
            rows = conn.execute(
                f"SELECT projection, topic, partition, next_offset FROM {s}.projection_checkpoints"
            )
            for projection, topic, partition, cp in rows.fetchall():
                p = restored.get((topic, int(partition)))
                if p is None:
                    continue
                cp = int(cp)
                gap_olds = renumbered.get((topic, int(partition)))
                lost = max(0, cp - p.archived_end)
                after = (
                    p.restored_end if lost else (_new_offset(gap_olds, cp) if gap_olds is not None else cp)
                )
                if after == cp:
                    continue
                conn.execute(
                    f"UPDATE {s}.projection_checkpoints SET next_offset = %s, updated_at = now() "
                    "WHERE projection = %s AND topic = %s AND partition = %s",
                    [after, projection, topic, partition],
                )
                moved.append(CheckpointMoved(
                    schema=s, projection=projection, topic=topic, partition=int(partition), before=cp, after=after,
                    lost_events=lost,
                ))  # fmt: skip
    return moved
