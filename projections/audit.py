"""The audit trail: every archived event about one entity, in event-time order, with its causation chain.

Read from the event archive (:mod:`projections.archive`, schema ``proj_archive``), so it reaches past
the log's retention. An entity is written ``<kind>:<value>`` or as a bare subject/key:

* ``run:<run_id>``, ``config:<key>``, ``agent:<name>``, ``service:<name>``: events whose record key or
  CloudEvents ``subject`` is the entity itself or its value (``run:django__django-11276`` matches the
  agent events keyed ``django__django-11276`` and the insight keyed ``run:django__django-11276``);
  for ``agent:`` and ``service:`` also events whose ``source`` is ``/agents/<name>`` or
  ``/services/<name>``;
* anything else: events whose key or subject is that text.

From those seed events the trail follows, across topics, (1) the events sharing their correlation
id and (2) the events they caused, transitively (an event whose ``causationid`` is the id of an event
already in the trail), e.g. the run-summary insight caused by a run's FINISHED event. Each entry says
which entry caused it (``caused_by``) and how deep in the chain it is (``depth``: 0 for an event whose
cause is not in the trail).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from projections.archive import ARCHIVE_TABLE
from streams.consumer import _jsonable
from streams.envelope import format_time
from streams.errors import DeserializationError
from streams.serde import AvroSerde

__all__ = ["AuditEntry", "audit_trail", "entity_candidates"]

_KINDS = ("run", "config", "agent", "service")
_MAX_HOPS = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One event of an audit trail.

    Attributes:
        event_id, type, source, subject, time, correlation_id, causation_id: CloudEvents attributes
            (``time`` aware UTC; None where an undecodable record lacks them).
        topic, partition, offset: where it is in the log.
        key: the record key as text.
        caused_by: ``causation_id`` when that event is in the trail too, else None.
        depth: hops from the first cause in the trail (0: none of its causes is in the trail).
        data: the decoded datum (JSON-ready), when a serde was given.
        decode_error: why the record could not be decoded, None otherwise.
    """

    event_id: str | None
    type: str | None
    source: str | None
    subject: str | None
    time: datetime
    correlation_id: str | None
    causation_id: str | None
    topic: str
    partition: int
    offset: int
    key: str | None
    caused_by: str | None = None
    depth: int = 0
    data: dict[str, Any] | None = None
    decode_error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """CloudEvents names (``id``, ``time`` RFC 3339, ``correlationid``, ``causationid``), position,
        and the chain (``caused_by``, ``depth``)."""
        return {
            "id": self.event_id,
            "type": self.type,
            "source": self.source,
            "subject": self.subject,
            "time": format_time(self.time),
            "correlationid": self.correlation_id,
            "causationid": self.causation_id,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "caused_by": self.caused_by,
            "depth": self.depth,
            "data": self.data,
            "decode_error": self.decode_error,
        }


def entity_candidates(entity: str) -> tuple[list[str], list[str]]:
    """The keys/subjects and the sources that identify ``entity``.

    Returns:
        ``(keys_or_subjects, sources)``.

    Raises:
        ValueError: an empty entity, or a known kind with an empty value (``run:``).
    """
    entity = entity.strip()
    if not entity:
        raise ValueError("an entity is required, e.g. run:<run_id>, config:<key>, agent:<name>")
    kind, sep, value = entity.partition(":")
    if sep and kind in _KINDS:
        if not value:
            raise ValueError(f"{entity!r}: the {kind} is missing after the colon")
        sources = (
            [f"/agents/{value}"] if kind == "agent" else [f"/services/{value}"] if kind == "service" else []
        )
        return [entity, value], sources
    return [entity], []


_SELECT = (
    'SELECT event_id, type, source, subject, event_time, correlation_id, causation_id, topic, partition, "offset", '
    "key, value, decode_error FROM {schema}.{table} WHERE "
)


def audit_trail(
    conn: psycopg.Connection,
    entity: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    serde: AvroSerde | None = None,
    schema: str = "proj_archive",
    limit: int = 100_000,
) -> list[AuditEntry]:
    """Every archived event about ``entity``, in event-time order, with its causation chain.

    Args:
        conn: PostgreSQL connection.
        entity: ``run:<id>``, ``config:<key>``, ``agent:<name>``, ``service:<name>`` or a bare key/subject.
        start: first event time (inclusive), aware; None = no bound.
        end: last event time (exclusive), aware; None = no bound.
        serde: decode each event's data into the entry (omitted without one).
        schema: the archive's PostgreSQL schema.
        limit: most entries returned.

    Returns:
        the entries ordered by event time, then topic, partition and offset.

    Raises:
        ValueError: an empty entity.
        psycopg.errors.UndefinedTable: there is no archive (the ``archive`` projection never ran).
    """
    keys, sources = entity_candidates(entity)
    base = _SELECT.format(schema=schema, table=ARCHIVE_TABLE)
    bounds, bparams = "", []
    if start is not None:
        bounds += " AND event_time >= %s"
        bparams.append(start)
    if end is not None:
        bounds += " AND event_time < %s"
        bparams.append(end)
    rows: dict[tuple[str, int, int], tuple[Any, ...]] = {}

    def fetch(where: str, params: list[Any]) -> list[tuple[Any, ...]]:
        got = conn.execute(
            base + "(" + where + ")" + bounds + " LIMIT %s", [*params, *bparams, limit]
        ).fetchall()
        new = [r for r in got if (r[7], r[8], r[9]) not in rows]
        for r in new:
            rows[(r[7], r[8], r[9])] = r
        return new

    fetch(
        "key = ANY(%s::bytea[]) OR subject = ANY(%s::text[]) OR source = ANY(%s::text[])",
        [[k.encode() for k in keys], keys, sources],
    )
    correlations = sorted({r[5] for r in rows.values() if r[5]})
    if correlations:
        fetch("correlation_id = ANY(%s::text[])", [correlations])
    frontier = {r[0] for r in rows.values() if r[0]}
    for _ in range(_MAX_HOPS):
        if not frontier:
            break
        new = fetch("causation_id = ANY(%s::text[])", [sorted(frontier)])
        frontier = {r[0] for r in new if r[0]}
    if not conn.autocommit:
        conn.rollback()
    ordered = sorted(rows.values(), key=lambda r: (r[4], r[7], r[8], r[9]))[:limit]
    ids = {r[0] for r in ordered if r[0]}
    cause = {r[0]: r[6] for r in ordered if r[0]}

    def depth(eid: str | None) -> int:
        d, seen = 0, set()
        while eid and cause.get(eid) in ids and eid not in seen:
            seen.add(eid)
            eid = cause[eid]
            d += 1
        return d

    out = []
    for eid, typ, src, subj, t, corr, caus, topic, part, off, key, value, err in ordered:
        data = None
        if serde is not None and err is None and value is not None:
            try:
                _, datum = serde.decode(bytes(value))
                data = _jsonable(datum)
            except DeserializationError as exc:
                err = str(exc)
        out.append(AuditEntry(
            event_id=eid, type=typ, source=src, subject=subj, time=t, correlation_id=corr, causation_id=caus,
            topic=topic, partition=part, offset=off, key=bytes(key).decode("utf-8", "replace") if key else None,
            caused_by=caus if caus in ids else None, depth=depth(eid), data=data, decode_error=err,
        ))  # fmt: skip
    return out
