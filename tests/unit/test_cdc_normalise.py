"""The CDC importer's Connect records and the normaliser's RowChanged events, on the real Debezium
tutorial fixture (no Kafka)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.cdc import (
    ConnectRecord,
    ImportProblem,
    change_event_id,
    connect_records,
    from_avro,
    normalise_record,
    raw_topic_pattern,
    row_key,
    to_avro,
)
from connectors.debezium import ChangeEventError, ChangeOp, parse_change_event, parse_change_events
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde

FIXTURE = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "data"
    / "cdc"
    / "debezium"
    / "postgres_inventory_products.jsonl"
)
WRAPPER_SCHEMA = {
    "type": "struct",
    "optional": False,
    "name": "fullfillment.inventory.products.Envelope",
    "fields": [
        {"type": "struct", "optional": True, "name": "fullfillment.inventory.products.Value", "field": field,
         "fields": [{"type": "int32", "optional": False, "field": "id"},
                    {"type": "string", "optional": False, "field": "name"}]}
        for field in ("before", "after")
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def lines() -> list[str]:
    if not FIXTURE.exists():
        pytest.skip(f"real Debezium fixture absent: {FIXTURE}")
    return [line for line in FIXTURE.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_records_are_the_lines_unchanged_with_keys_and_a_tombstone(lines: list[str]) -> None:
    """Each line becomes one record on cdc.inventory.products with its bytes unchanged and a {"id":N} key; the delete is followed by a tombstone."""
    records = list(connect_records(lines))
    assert all(isinstance(r, ConnectRecord) for r in records)
    assert len(records) == 17
    assert {r.topic for r in records} == {"cdc.inventory.products"}  # type: ignore[union-attr]
    assert [r.value for r in records[:16]] == [line.encode() for line in lines]  # type: ignore[union-attr]
    assert records[0].key == b'{"id":101}'  # type: ignore[union-attr]
    assert (records[15].key, records[16].key, records[16].value) == (b'{"id":111}', b'{"id":111}', None)  # type: ignore[union-attr]
    assert records[9].timestamp_ms == 1596010890411  # type: ignore[union-attr]  # the envelope ts_ms


def test_wrapped_values_get_wrapped_keys(lines: list[str]) -> None:
    """A value with the Connect schema wrapper gets a key with a schema too, typed from the row struct."""
    wrapped = json.dumps({"schema": WRAPPER_SCHEMA, "payload": json.loads(lines[0])})
    (record,) = connect_records([wrapped], topic_prefix="dbz")
    assert isinstance(record, ConnectRecord) and record.topic == "dbz.inventory.products"
    key = json.loads(record.key or b"")
    assert key == {
        "schema": {"type": "struct", "fields": [{"type": "int32", "optional": False, "field": "id"}],
                   "optional": False, "name": "fullfillment.inventory.products.Key"},
        "payload": {"id": 101},
    }  # fmt: skip
    assert parse_change_event(record.value, key=record.key) == parse_change_event(lines[0])


def test_unroutable_lines_are_problems_or_sent_as_is() -> None:
    """A non-JSON line is reported and skipped, or with an explicit topic sent unchanged without a key."""
    assert list(connect_records(["{oops"])) == [
        ImportProblem(
            line=1,
            reason="not JSON: Expecting property name enclosed in double quotes at position 1",
            sent=False,
        )
    ]
    problem, record = connect_records(["", "{oops"], topic="raw")
    assert isinstance(problem, ImportProblem) and problem.line == 2 and problem.sent
    assert record == ConnectRecord(topic="raw", key=None, value=b"{oops", timestamp_ms=0, line=2)


def test_row_changed_event_of_the_update_of_106(lines: list[str]) -> None:
    """The update of 106 becomes a RowChanged keyed inventory.products:106 at its source time, which round-trips through Avro."""
    event = normalise_record("cdc.inventory.products", b'{"id":106}', lines[9].encode())
    assert event is not None
    assert event.key == event.attributes.subject == "inventory.products:106"
    assert event.attributes.time == datetime(2020, 7, 29, 8, 21, 29, 629000, tzinfo=UTC)
    assert event.attributes.type == "sophia.cdc.RowChanged"
    assert (
        event.data["op"] == "UPDATE"
        and json.loads(event.data["after"])["description"] == "18oz carpenter hammer"
    )
    serde = AvroSerde(EmbeddedRegistry())
    name, datum = serde.decode(serde.encode(event.schema, event.data))
    assert name == "sophia.cdc.RowChanged"
    assert from_avro(datum) == parse_change_event(lines[9])


def test_ids_are_deterministic_and_distinct(lines: list[str]) -> None:
    """Every change of the fixture gets its own id, and parsing it again gives the same id (snapshot rows share an LSN)."""
    events = parse_change_events(lines)
    ids = [change_event_id(e) for e in events]
    assert len(set(ids)) == 16
    assert ids == [change_event_id(e) for e in parse_change_events(lines)]
    assert len({e.lsn for e in events if e.op is ChangeOp.READ}) == 1


def test_tombstone_gives_no_event_and_bad_records_raise() -> None:
    """A tombstone normalises to None; a change without a table or an unknown op raises ChangeEventError."""
    assert normalise_record("cdc.a.b", b'{"id":1}', None) is None
    with pytest.raises(ChangeEventError, match="source.table"):
        normalise_record("t", None, json.dumps({"op": "c", "after": {"id": 1}, "source": {"ts_ms": 1}}))
    with pytest.raises(ChangeEventError, match="'op' is 'x'"):
        normalise_record("t", None, json.dumps({"op": "x", "after": {"id": 1}, "source": {}}))


def test_row_key_of_composite_and_truncate() -> None:
    """Composite keys join their values in key order; a truncate is keyed by its table."""
    change = parse_change_event(
        {
            "op": "c",
            "after": {"order_id": 7, "line": 2},
            "source": {"schema": "sales", "table": "order_lines"},
        },
        key={"order_id": 7, "line": 2},
    )
    assert change is not None and row_key(change) == "sales.order_lines:7,2"
    truncate = parse_change_event({"op": "t", "source": {"schema": "sales", "table": "orders", "lsn": 5}})
    assert truncate is not None and row_key(truncate) == "sales.orders"
    assert to_avro(truncate, source_topic="cdc.sales.orders")["key"] == "{}"


def test_raw_topic_pattern_leaves_out_the_typed_topic() -> None:
    """The default subscription matches <prefix>.<schema>.<table> topics, not cdc.changes nor cdc.transaction."""
    import re

    pattern = re.compile(raw_topic_pattern())
    assert pattern.match("cdc.inventory.products")
    assert not pattern.match("cdc.changes") and not pattern.match("cdc") and not pattern.match("cdcx.a.b")
    assert raw_topic_pattern("my.app") == r"^my\.app\.[^.]+\.[^.]+$"
