"""The Debezium change-event normaliser and a table-state reducer (pure logic, no Kafka).

A Debezium change event value (JSON converter) is either the bare envelope
``{"before", "after", "source", "op", "ts_ms", "transaction"}`` or the same wrapped by Kafka Connect's
JSON converter with ``schemas.enable=true``: ``{"schema": {...}, "payload": {<envelope>}}``. A deleted
row is followed by a tombstone: a record with the same key and a ``null`` value (with
``tombstones.on.delete=true``, the default), which log compaction uses and which carries no change.

:func:`parse_change_event` turns one value (and optionally its Kafka key) into a frozen
:class:`ChangeEvent`; :class:`TableState` folds change events into the current row per primary key.

Operations (``op``): ``r`` snapshot read, ``c`` create, ``u`` update, ``d`` delete, ``t`` truncate
(Postgres and MySQL connectors, ``before``/``after`` both null).

Column values are passed through as the converter wrote them (Connect logical types such as
``org.apache.kafka.connect.data.Decimal`` stay encoded); decode them downstream where the type is known.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from connectors.errors import ConnectorError

__all__ = [
    "ChangeEvent",
    "ChangeEventError",
    "ChangeOp",
    "TableState",
    "parse_change_event",
    "parse_change_events",
]

KeyTuple = tuple[Any, ...]


class ChangeEventError(ConnectorError, ValueError):
    """A record that is not a Debezium change event; the message names the field and what is wrong.

    Attributes:
        reason: what is wrong, in one line.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"not a Debezium change event: {reason}")


class ChangeOp(StrEnum):
    """Debezium's ``op`` codes."""

    READ = "r"
    CREATE = "c"
    UPDATE = "u"
    DELETE = "d"
    TRUNCATE = "t"


@dataclass(frozen=True, slots=True, kw_only=True)
class ChangeEvent:
    """One row change captured by Debezium.

    Attributes:
        op: the operation.
        connector: ``source.connector`` (``postgresql``, ``mysql``, ...).
        topic_prefix: ``source.name`` (the connector's ``topic.prefix``; ``database.server.name`` before 2.0).
        db: ``source.db``, the database name.
        schema: ``source.schema`` (Postgres schema; ``None`` for MySQL).
        table: ``source.table``.
        key: the primary key, column name → value (empty for a truncate).
        before: the row before the change (``u`` and ``d``, when the table's replica identity gives it).
        after: the row after the change (``r``, ``c``, ``u``).
        lsn: ``source.lsn``, the Postgres log sequence number of the change (``None`` for other
            connectors); the order of changes to one row.
        tx_id: ``source.txId``, the transaction id, when given.
        source_ts: ``source.ts_ms`` as an aware UTC datetime: when the change was made in the database
            (for snapshot reads, when the row was read).
        processed_ts: the envelope's ``ts_ms``: when Debezium processed the change.
        snapshot: true for rows read by a snapshot (``source.snapshot`` is ``true``, ``last``, ``first``,
            ``incremental``, ...; ``false`` or absent otherwise).
    """

    op: ChangeOp
    connector: str | None
    topic_prefix: str | None
    db: str | None
    schema: str | None
    table: str | None
    key: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    lsn: int | None
    tx_id: int | None
    source_ts: datetime | None
    processed_ts: datetime | None
    snapshot: bool

    @property
    def table_id(self) -> str:
        """``schema.table`` (or ``db.table`` when there is no schema), e.g. ``inventory.products``."""
        return f"{self.schema or self.db}.{self.table}"

    @property
    def key_tuple(self) -> KeyTuple:
        """The key's values in key column order, e.g. ``(101,)``: the :class:`TableState` row key."""
        return tuple(self.key.values())


def _decode(value: Any, what: str) -> Any:
    if isinstance(value, bytes | bytearray):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ChangeEventError(f"{what} is not UTF-8 JSON: {exc}") from exc
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ChangeEventError(f"{what} is not JSON: {exc.msg} at position {exc.pos}") from exc
    return value


def _unwrap(value: Any, what: str) -> Any:
    """Strip Kafka Connect's JSON converter wrapper ``{"schema": ..., "payload": ...}`` when present."""
    if isinstance(value, Mapping) and "schema" in value and "payload" in value and len(value) == 2:
        return value["payload"]
    if isinstance(value, Mapping) and set(value) == {"schema"}:
        raise ChangeEventError(f"{what} has a schema wrapper without 'payload'")
    return value


def _opt_int(source: Mapping[str, Any], name: str) -> int | None:
    value = source.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChangeEventError(f"source.{name} must be an integer, got {value!r}")
    return int(value)


def _opt_str(source: Mapping[str, Any], name: str) -> str | None:
    value = source.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ChangeEventError(f"source.{name} must be a string, got {value!r}")
    return value


def _time(container: Mapping[str, Any], prefix: str) -> datetime | None:
    """Read ``ts_us`` (Debezium 2.6+) or else ``ts_ms`` as an aware UTC datetime."""
    for name, per_second in (("ts_us", 1_000_000), ("ts_ms", 1000)):
        value = container.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ChangeEventError(f"{prefix}{name} must be epoch {name[3:]} as an integer, got {value!r}")
        seconds, rest = divmod(value, per_second)
        return datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=rest * (1_000_000 // per_second))
    return None


def _row(payload: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    row = payload.get(name)
    if row is None:
        return None
    if not isinstance(row, Mapping):
        raise ChangeEventError(f"'{name}' must be an object or null, got {type(row).__name__}")
    return dict(row)


def _key_from_record(key: Any) -> dict[str, Any]:
    decoded = _unwrap(_decode(key, "record key"), "record key")
    if not isinstance(decoded, Mapping) or not decoded:
        raise ChangeEventError(f"record key must be a non-empty JSON object of key columns, got {decoded!r}")
    return dict(decoded)


def parse_change_event(
    value: Mapping[str, Any] | str | bytes | None,
    *,
    key: Mapping[str, Any] | str | bytes | None = None,
    key_columns: Sequence[str] = ("id",),
) -> ChangeEvent | None:
    """Normalise one Debezium change event value.

    Args:
        value: the Kafka record value: decoded JSON, or JSON text/bytes; with or without the Connect
            JSON schema wrapper. ``None`` is a tombstone.
        key: the Kafka record key (Debezium's key struct, e.g. ``{"id": 101}``, optionally wrapped);
            when given it is the primary key.
        key_columns: the primary key columns read from the row (``after``, or ``before`` for a delete)
            when ``key`` is not given.

    Returns:
        The change event, or ``None`` for a tombstone.

    Raises:
        ChangeEventError: the value is not JSON, not an object, lacks ``op``/``source`` or has an unknown
            ``op``; ``after`` is null for ``r``/``c``/``u``; ``before`` and ``key`` both give no key for a
            ``d``; a key column is missing from the row; a ``source`` field has the wrong type.
    """
    if value is None:
        return None
    decoded = _decode(value, "value")
    payload = _unwrap(decoded, "value")
    if payload is None:
        return None
    if not isinstance(payload, Mapping):
        raise ChangeEventError(f"value must be a JSON object, got {type(payload).__name__}")
    if "op" not in payload:
        raise ChangeEventError(f"no 'op' field (fields: {', '.join(sorted(payload)) or 'none'})")
    try:
        op = ChangeOp(payload["op"])
    except ValueError as exc:
        allowed = ", ".join(o.value for o in ChangeOp)
        raise ChangeEventError(f"'op' is {payload['op']!r}; expected one of {allowed}") from exc
    source = payload.get("source")
    if not isinstance(source, Mapping):
        raise ChangeEventError(f"'source' must be an object, got {type(source).__name__}")
    before = _row(payload, "before")
    after = _row(payload, "after")
    if op in (ChangeOp.READ, ChangeOp.CREATE, ChangeOp.UPDATE) and after is None:
        raise ChangeEventError(f"op {op.value!r} requires 'after' to be an object, got null")

    if op is ChangeOp.TRUNCATE:
        row_key: dict[str, Any] = {}
    elif key is not None:
        row_key = _key_from_record(key)
    else:
        row = after if op is not ChangeOp.DELETE else before
        if row is None:
            raise ChangeEventError(
                "op 'd' has a null 'before' and no record key was given, so the deleted row is unknown "
                "(set REPLICA IDENTITY or pass the Kafka key)"
            )
        missing = [c for c in key_columns if c not in row]
        if missing:
            raise ChangeEventError(
                f"key column(s) {', '.join(missing)} not in the row (columns: {', '.join(row)})"
            )
        row_key = {c: row[c] for c in key_columns}

    snapshot_marker = source.get("snapshot")
    return ChangeEvent(
        op=op,
        connector=_opt_str(source, "connector"),
        topic_prefix=_opt_str(source, "name"),
        db=_opt_str(source, "db"),
        schema=_opt_str(source, "schema"),
        table=_opt_str(source, "table"),
        key=row_key,
        before=before,
        after=after,
        lsn=_opt_int(source, "lsn"),
        tx_id=_opt_int(source, "txId"),
        source_ts=_time(source, "source."),
        processed_ts=_time(payload, ""),
        snapshot=snapshot_marker not in (None, False, "false"),
    )


def parse_change_events(
    values: Iterable[Mapping[str, Any] | str | bytes | None],
    *,
    key_columns: Sequence[str] = ("id",),
) -> list[ChangeEvent]:
    """Normalise a sequence of values (no keys), dropping tombstones.

    Raises:
        ChangeEventError: on the first malformed value; the message starts with its 0-based position.
    """
    events: list[ChangeEvent] = []
    for position, value in enumerate(values):
        try:
            event = parse_change_event(value, key_columns=key_columns)
        except ChangeEventError as exc:
            raise ChangeEventError(f"record {position}: {exc.reason}") from exc
        if event is not None:
            events.append(event)
    return events


class TableState:
    """The current rows of one table, folded from its change events.

    Rules:
        * ``r``/``c``/``u`` put ``after`` as the row for its key; ``d`` removes the row; ``t`` removes
          every row; tombstones (``None``) change nothing.
        * When both the stored row and the event carry an LSN, an event older than the last one applied
          to its key (or than the last truncate) is ignored, so a replay or a duplicate cannot move a
          row back in time or resurrect a deleted one. Applying the same event twice gives the same state.
        * Events without LSN (non-Postgres connectors) are applied in arrival order, which Kafka keeps
          per key.

    Args:
        schema: when given with ``table``, events of another table are refused.
        table: see ``schema``.
    """

    def __init__(self, *, schema: str | None = None, table: str | None = None) -> None:
        self.schema = schema
        self.table = table
        self._rows: dict[KeyTuple, dict[str, Any]] = {}
        self._key_lsn: dict[KeyTuple, int] = {}
        self._truncated_lsn: int | None = None
        self.applied = 0
        self.skipped = 0

    def _check_table(self, event: ChangeEvent) -> None:
        if self.table is None:
            return
        if event.table != self.table or (self.schema is not None and event.schema != self.schema):
            raise ChangeEventError(
                f"event of {event.table_id} applied to the state of {self.schema}.{self.table}"
            )

    def _stale(self, event: ChangeEvent, row_key: KeyTuple) -> bool:
        if event.lsn is None:
            return False
        if self._truncated_lsn is not None and event.lsn < self._truncated_lsn:
            return True
        last = self._key_lsn.get(row_key)
        return last is not None and event.lsn < last

    def apply(self, event: ChangeEvent | None) -> bool:
        """Fold one change event into the state.

        Args:
            event: a parsed change event, or ``None`` (a tombstone).

        Returns:
            ``True`` when the event was applied, ``False`` when it was a tombstone or stale.

        Raises:
            ChangeEventError: the event belongs to another table than the one this state was made for.
        """
        if event is None:
            return False
        self._check_table(event)
        if event.op is ChangeOp.TRUNCATE:
            if event.lsn is not None and self._truncated_lsn is not None and event.lsn < self._truncated_lsn:
                self.skipped += 1
                return False
            self._rows.clear()
            self._key_lsn.clear()
            self._truncated_lsn = event.lsn
            self.applied += 1
            return True
        row_key = event.key_tuple
        if self._stale(event, row_key):
            self.skipped += 1
            return False
        if event.op is ChangeOp.DELETE:
            self._rows.pop(row_key, None)
        else:
            assert event.after is not None  # guaranteed by parse_change_event
            self._rows[row_key] = dict(event.after)
        if event.lsn is not None:
            self._key_lsn[row_key] = event.lsn
        self.applied += 1
        return True

    def apply_all(self, events: Iterable[ChangeEvent | None]) -> int:
        """Apply events in order; returns how many were applied (not tombstones, not stale)."""
        return sum(1 for event in events if self.apply(event))

    @property
    def rows(self) -> dict[KeyTuple, dict[str, Any]]:
        """A copy of the current rows by key tuple (e.g. ``(101,)``), in key order."""
        try:
            keys = sorted(self._rows)
        except TypeError:  # keys of mixed types: keep arrival order
            keys = list(self._rows)
        return {k: dict(self._rows[k]) for k in keys}

    def get(self, key: Mapping[str, Any] | KeyTuple) -> dict[str, Any] | None:
        """The current row for a key given as ``{"id": 101}`` or ``(101,)``, or ``None``."""
        row_key = tuple(key.values()) if isinstance(key, Mapping) else tuple(key)
        row = self._rows.get(row_key)
        return dict(row) if row is not None else None

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, Mapping):
            return tuple(key.values()) in self._rows
        return key in self._rows
