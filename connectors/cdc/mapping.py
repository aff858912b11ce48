"""The CDC mapping: a Debezium change event (:mod:`connectors.debezium`) as a typed
``sophia.cdc.RowChanged`` record, its key and its deterministic id, and the normalisation of one raw record."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from connectors.debezium import ChangeEvent, ChangeEventError, ChangeOp, parse_change_event
from streams.catalogue import CATALOGUE, TopicSpec
from streams.envelope import Event, deterministic_id

__all__ = [
    "CDC_TOPICS",
    "CHANGES_TOPIC",
    "DEFAULT_TOPIC_PREFIX",
    "RAW_TOPIC_PATTERN",
    "ROW_CHANGED",
    "change_event_id",
    "from_avro",
    "normalise_record",
    "raw_topic_pattern",
    "row_key",
    "to_avro",
]

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
