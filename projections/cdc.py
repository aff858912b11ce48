"""The CDC table-state view: the current row per (schema, table, primary key) of every captured table.

Built from ``cdc.changes`` (``sophia.cdc.RowChanged``, produced by :class:`connectors.cdc.CdcNormaliser`
from Debezium change events). Tables, in the projection's schema (``proj_cdc``):

* ``cdc_rows``: one row per primary key ever seen; ``row`` is the current row as ``jsonb`` (the
  source's columns), ``deleted`` marks a deleted row, kept with its LSN so that an older change
  arriving later cannot resurrect it.
* ``cdc_tables``: per captured table, the LSN of its last truncate and its columns in first-seen
  order (``jsonb`` does not keep key order; the query prints columns in this order).

Order: a change is applied to a key only if its LSN is at least the key's stored LSN and not below
the table's last truncate (the rule of :class:`connectors.debezium.TableState`), so duplicates and
out-of-order deliveries leave the newest state. Changes without an LSN (connectors other than
PostgreSQL) are applied in arrival order, which Kafka keeps per key.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from projections.errors import ProjectionApplyError, ProjectionError
from streams.consumer import ConsumedEvent

__all__ = ["CdcProjection", "TableNotFoundError", "table_rows", "tables"]

ROW_CHANGED = "sophia.cdc.RowChanged"
SCHEMA = "proj_cdc"

DDL = """
CREATE TABLE IF NOT EXISTS cdc_rows (
    table_schema text        NOT NULL,
    table_name   text        NOT NULL,
    pk           jsonb       NOT NULL,
    row          jsonb,
    deleted      boolean     NOT NULL DEFAULT false,
    op           text        NOT NULL,
    lsn          bigint,
    tx_id        bigint,
    source_time  timestamptz,
    event_id     text        NOT NULL,
    PRIMARY KEY (table_schema, table_name, pk)
);
CREATE TABLE IF NOT EXISTS cdc_tables (
    table_schema  text   NOT NULL,
    table_name    text   NOT NULL,
    columns       text[] NOT NULL DEFAULT '{}',
    truncated_lsn bigint,
    PRIMARY KEY (table_schema, table_name)
);
"""

_UPSERT_ROW = """
INSERT INTO cdc_rows AS r (table_schema, table_name, pk, row, deleted, op, lsn, tx_id, source_time, event_id)
SELECT %(schema)s, %(table)s, %(pk)s, %(row)s, %(deleted)s, %(op)s, %(lsn)s, %(tx_id)s, %(source_time)s, %(event_id)s
WHERE %(lsn)s::bigint IS NULL OR NOT EXISTS (
    SELECT 1 FROM cdc_tables t
    WHERE t.table_schema = %(schema)s AND t.table_name = %(table)s AND t.truncated_lsn > %(lsn)s::bigint
)
ON CONFLICT (table_schema, table_name, pk) DO UPDATE SET
    row = excluded.row, deleted = excluded.deleted, op = excluded.op, lsn = excluded.lsn,
    tx_id = excluded.tx_id, source_time = excluded.source_time, event_id = excluded.event_id
WHERE excluded.lsn IS NULL OR r.lsn IS NULL OR excluded.lsn >= r.lsn
"""

_TABLE_COLUMNS = """
INSERT INTO cdc_tables AS t (table_schema, table_name, columns) VALUES (%s, %s, %s)
ON CONFLICT (table_schema, table_name) DO UPDATE SET columns = t.columns || ARRAY(
    SELECT c FROM unnest(excluded.columns) WITH ORDINALITY AS u(c, n) WHERE c <> ALL(t.columns) ORDER BY n
)
"""

_TRUNCATE = """
INSERT INTO cdc_tables AS t (table_schema, table_name, truncated_lsn) VALUES (%(schema)s, %(table)s, %(lsn)s)
ON CONFLICT (table_schema, table_name) DO UPDATE SET truncated_lsn = greatest(t.truncated_lsn, excluded.truncated_lsn)
"""


def _table_schema(data: dict[str, Any]) -> str:
    return data.get("schema") or data.get("db") or ""


def _object(event: ConsumedEvent, name: str) -> dict[str, Any] | None:
    text = event.data.get(name)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProjectionApplyError(
            f"RowChanged.{name} of event {event.attributes.id} is not JSON: {exc.msg}"
        ) from exc
    if not isinstance(value, dict):
        raise ProjectionApplyError(f"RowChanged.{name} of event {event.attributes.id} is not a JSON object")
    return value


class CdcProjection:
    """The current rows of every table captured by Debezium, deletes and truncates applied.

    Refuses (dead-letters) a ``RowChanged`` whose key is empty for a row operation, or whose key or
    rows are not JSON objects; events of other schemas on its topics are ignored.

    Args:
        topics: the topics of ``sophia.cdc.RowChanged`` events.
    """

    name = "cdc"
    version = 1

    def __init__(self, topics: Sequence[str] = ("cdc.changes",)) -> None:
        self.topics = tuple(topics)

    def create(self, conn: psycopg.Connection) -> None:
        """Create ``cdc_rows`` and ``cdc_tables`` if absent."""
        conn.execute(DDL)

    def apply(self, cur: psycopg.Cursor, events: Sequence[ConsumedEvent]) -> None:
        """Apply a batch in log order: rows upserted or marked deleted by LSN, truncates clear a table.

        Raises:
            ProjectionApplyError: an event whose key or rows are not JSON objects, or a row operation
                without a key.
        """
        rows: list[dict[str, Any]] = []
        columns: dict[tuple[str, str], list[str]] = {}
        for e in events:
            if e.schema != ROW_CHANGED:
                continue
            d = e.data
            schema, table = _table_schema(d), d["table"]
            if d["op"] == "TRUNCATE":
                self._flush(cur, rows, columns)
                params = {"schema": schema, "table": table, "lsn": d.get("lsn")}
                cur.execute(_TRUNCATE, params)
                cur.execute(
                    "DELETE FROM cdc_rows WHERE table_schema = %(schema)s AND table_name = %(table)s "
                    "AND (%(lsn)s::bigint IS NULL OR lsn IS NULL OR lsn < %(lsn)s::bigint)",
                    params,
                )
                continue
            pk = _object(e, "key")
            if not pk:
                raise ProjectionApplyError(f"RowChanged {e.attributes.id} ({d['op']}) has no primary key")
            after = _object(e, "after")
            deleted = d["op"] == "DELETE"
            if not deleted and after is None:
                raise ProjectionApplyError(f"RowChanged {e.attributes.id} ({d['op']}) has no 'after' row")
            if after is not None:
                seen = columns.setdefault((schema, table), [])
                seen.extend(c for c in after if c not in seen)
            rows.append(
                {
                    "schema": schema,
                    "table": table,
                    "pk": Jsonb(pk),
                    "row": None if deleted else Jsonb(after),
                    "deleted": deleted,
                    "op": d["op"],
                    "lsn": d.get("lsn"),
                    "tx_id": d.get("tx_id"),
                    "source_time": d.get("source_time"),
                    "event_id": e.attributes.id,
                }
            )
        self._flush(cur, rows, columns)

    @staticmethod
    def _flush(
        cur: psycopg.Cursor, rows: list[dict[str, Any]], columns: dict[tuple[str, str], list[str]]
    ) -> None:
        if columns:
            cur.executemany(_TABLE_COLUMNS, [(s, t, cols) for (s, t), cols in sorted(columns.items())])
            columns.clear()
        if rows:
            cur.executemany(_UPSERT_ROW, rows)
            rows.clear()


class TableNotFoundError(ProjectionError, LookupError):
    """``SCHEMA.TABLE`` names no table the CDC view has seen (the message lists the known ones).

    Belongs under ``ProjectionError`` in the tree of :mod:`projections.errors`.
    """


def tables(conn: psycopg.Connection, *, schema: str = SCHEMA) -> list[dict[str, Any]]:
    """The captured tables: ``table`` (``schema.table``), ``rows`` (current, not deleted), ``columns``.

    Args:
        conn: a connection to the projection's database.
        schema: the projection's PostgreSQL schema.
    """
    sql = f"""
        SELECT t.table_schema || '.' || t.table_name AS table, t.columns,
               (SELECT count(*) FROM {schema}.cdc_rows r
                WHERE r.table_schema = t.table_schema AND r.table_name = t.table_name AND NOT r.deleted) AS rows
        FROM {schema}.cdc_tables t ORDER BY 1
    """
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql).fetchall()


def table_rows(
    conn: psycopg.Connection, table: str, *, schema: str = SCHEMA
) -> tuple[list[str], list[dict[str, Any]]]:
    """The current rows of one captured table, ordered by primary key.

    Args:
        conn: a connection to the projection's database.
        table: ``schema.table`` as captured (``inventory.products``); the part before the last dot is
            the source's schema (or database, for MySQL).
        schema: the projection's PostgreSQL schema.

    Returns:
        (columns in first-seen order, rows as column → value dicts).

    Raises:
        ValueError: ``table`` is not ``SCHEMA.TABLE``.
        TableNotFoundError: the view has never seen that table.
    """
    source_schema, dot, name = table.rpartition(".")
    if not dot or not source_schema or not name:
        raise ValueError(f"{table!r} is not SCHEMA.TABLE (e.g. inventory.products)")
    with conn.cursor() as cur:
        found = cur.execute(
            f"SELECT columns FROM {schema}.cdc_tables WHERE table_schema = %s AND table_name = %s",
            (source_schema, name),
        ).fetchone()
        if found is None:
            known = [t["table"] for t in tables(conn, schema=schema)]
            raise TableNotFoundError(
                f"no captured table {table!r}; known: {', '.join(known) or 'none (has the normaliser run?)'}"
            )
        rows = cur.execute(
            f"SELECT row FROM {schema}.cdc_rows WHERE table_schema = %s AND table_name = %s AND NOT deleted "
            "ORDER BY pk",
            (source_schema, name),
        ).fetchall()
    columns: list[str] = list(found[0])
    out = [r[0] for r in rows]
    for r in out:
        columns.extend(c for c in r if c not in columns)
    return columns, out
