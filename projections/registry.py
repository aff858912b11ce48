"""The known projections by name, and their status: version, checkpoints, lag per partition.

The lag of a partition is the log end minus the stored checkpoint. The log end is the high watermark
a *fetch* reports, not ``ListOffsets(latest)``, which Tansu answers with the last batch's base offset
+ 1: :func:`log_end_offsets` assigns a private consumer at each checkpoint and reads the high
watermark of the fetch response (``get_watermark_offsets(cached=True)``) or the offset of the
end-of-partition event. This works unchanged on Apache Kafka.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from core.settings import KafkaSettings
from projections.agent_runs import AgentRunsProjection, InsightsProjection
from projections.archive import ArchiveProjection
from projections.base import Projection
from projections.incidents import IncidentsProjection
from projections.routing import RoutingProjection
from projections.runner import schema_name
from streams.envelope import format_time

__all__ = [
    "PROJECTIONS",
    "PartitionStatus",
    "ProjectionStatus",
    "get_projection",
    "log_end_offsets",
    "projection_status",
]

PROJECTIONS: dict[str, Callable[[], Projection]] = {
    "agent_runs": AgentRunsProjection,
    "insights": InsightsProjection,
    "archive": ArchiveProjection,
    "routing": RoutingProjection,
    "incidents": IncidentsProjection,
}
"""Name -> factory of each projection the backbone runs (``backbone projections list``)."""


def get_projection(name: str) -> Projection:
    """A new instance of the projection called ``name``.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    try:
        return PROJECTIONS[name]()
    except KeyError:
        raise KeyError(f"unknown projection {name!r}; known: {', '.join(sorted(PROJECTIONS))}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionStatus:
    """Where a projection stands on one partition.

    Attributes:
        topic, partition: the partition.
        checkpoint: next offset to apply (0 when nothing was applied).
        log_end: the high watermark (next offset to be written), None when the broker did not answer.
        lag_events: ``log_end - checkpoint`` (None without a log end).
        advanced_at: when the checkpoint last moved (None if never).
    """

    topic: str
    partition: int
    checkpoint: int
    log_end: int | None
    lag_events: int | None
    advanced_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict (time as RFC 3339)."""
        return {
            "topic": self.topic,
            "partition": self.partition,
            "checkpoint": self.checkpoint,
            "log_end": self.log_end,
            "lag_events": self.lag_events,
            "advanced_at": format_time(self.advanced_at) if self.advanced_at else None,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ProjectionStatus:
    """The status of one projection.

    Attributes:
        name: projection name.
        version: the version of the code.
        stored_version: the version its tables were built with (None: never run).
        schema: its PostgreSQL schema.
        topics: the topics it reads.
        partitions: one entry per partition of its topics.
        lag_events: total lag (None when a log end is unknown).
        last_advanced_at: the latest ``advanced_at``.
    """

    name: str
    version: int
    stored_version: int | None
    schema: str
    topics: tuple[str, ...]
    partitions: tuple[PartitionStatus, ...] = field(default=())
    lag_events: int | None = None
    last_advanced_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "name": self.name,
            "version": self.version,
            "stored_version": self.stored_version,
            "schema": self.schema,
            "topics": list(self.topics),
            "lag_events": self.lag_events,
            "last_advanced_at": format_time(self.last_advanced_at) if self.last_advanced_at else None,
            "rebuild_due": self.stored_version is not None and self.stored_version != self.version,
            "partitions": [p.as_json() for p in self.partitions],
        }


def log_end_offsets(
    kafka: KafkaSettings, starts: Mapping[tuple[str, int], int], *, timeout_seconds: float = 10.0
) -> dict[tuple[str, int], int]:
    """The log end (high watermark) of each partition, as a fetch reports it.

    Args:
        kafka: broker settings.
        starts: ``(topic, partition) -> offset`` to fetch from (a checkpoint; a small fetch).
        timeout_seconds: give up on partitions that neither deliver nor report their end by then.

    Returns:
        ``(topic, partition) -> high watermark`` for every partition that answered.
    """
    if not starts:
        return {}
    c = Consumer(
        kafka.librdkafka(
            extra={
                "group.id": f"backbone-status-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 50,
                "queued.max.messages.kbytes": 1024,
                "max.partition.fetch.bytes": 65536,
            }
        )
    )
    ends: dict[tuple[str, int], int] = {}
    try:
        c.assign([TopicPartition(t, p, o if o > 0 else OFFSET_BEGINNING) for (t, p), o in starts.items()])
        deadline = time.monotonic() + timeout_seconds
        while len(ends) < len(starts) and time.monotonic() < deadline:
            for m in c.consume(1000, 0.1):
                tp = (m.topic(), m.partition())
                err = m.error()
                if tp not in ends and err is not None and err.code() == KafkaError._PARTITION_EOF:
                    ends[tp] = m.offset()
            # the high watermark of the last fetch response of each partition (every partition of a
            # broker is in the same fetch request, so one round answers them all)
            for tp in starts:
                if tp not in ends:
                    _, high = c.get_watermark_offsets(TopicPartition(*tp), cached=True)
                    if high >= 0:
                        ends[tp] = high
    finally:
        c.close()
    return ends


def _partitions(kafka: KafkaSettings, topics: tuple[str, ...]) -> list[tuple[str, int]]:
    from confluent_kafka.admin import AdminClient

    meta = AdminClient(kafka.librdkafka()).list_topics(timeout=10)
    out = []
    for t in topics:
        tm = meta.topics.get(t)
        if tm is not None and tm.error is None:
            out += [(t, p) for p in sorted(tm.partitions)]
    return out


def projection_status(
    conn: psycopg.Connection,
    name: str,
    *,
    kafka: KafkaSettings | None = None,
    projection: Projection | None = None,
) -> ProjectionStatus:
    """The status of projection ``name``: version, checkpoints and (with ``kafka``) lag per partition.

    Args:
        conn: PostgreSQL connection (any search path).
        name: a name of :data:`PROJECTIONS`.
        kafka: broker settings; without them the lag is not computed (PostgreSQL only).
        projection: the instance (default: the registry's), e.g. one reading other topics.

    Raises:
        KeyError: an unknown projection.
    """
    projection = projection or get_projection(name)
    schema = schema_name(name)
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.projection_checkpoints",)
    ).fetchone()[0]
    cps: dict[tuple[str, int], tuple[int, datetime]] = {}
    stored_version = None
    if exists:
        for t, p, o, at in conn.execute(
            f"SELECT topic, partition, next_offset, updated_at FROM {schema}.projection_checkpoints "
            "WHERE projection = %s",
            (name,),
        ).fetchall():
            cps[(t, p)] = (o, at)
        row = conn.execute(
            f"SELECT version FROM {schema}.projection_registry WHERE projection = %s", (name,)
        ).fetchone()
        stored_version = row[0] if row else None
    if not conn.autocommit:
        conn.rollback()
    tps = sorted(set(cps) | set(_partitions(kafka, projection.topics) if kafka else ()))
    ends = log_end_offsets(kafka, {tp: cps.get(tp, (0, None))[0] for tp in tps}) if kafka else {}
    parts = []
    for tp in tps:
        cp, at = cps.get(tp, (0, None))
        end = ends.get(tp)
        parts.append(PartitionStatus(
            topic=tp[0], partition=tp[1], checkpoint=cp, log_end=end,
            lag_events=None if end is None else max(0, end - cp), advanced_at=at,
        ))  # fmt: skip
    lags = [p.lag_events for p in parts]
    advanced = [p.advanced_at for p in parts if p.advanced_at is not None]
    return ProjectionStatus(
        name=name,
        version=projection.version,
        stored_version=stored_version,
        schema=schema,
        topics=projection.topics,
        partitions=tuple(parts),
        lag_events=sum(x for x in lags if x is not None) if kafka and None not in lags else None,
        last_advanced_at=max(advanced) if advanced else None,
    )
