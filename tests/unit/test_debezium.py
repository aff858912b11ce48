"""The Debezium change-event normaliser and table-state reducer, on the real Debezium tutorial events."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.debezium import (
    ChangeEventError,
    ChangeOp,
    TableState,
    parse_change_event,
    parse_change_events,
)

FIXTURE = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "data"
    / "cdc"
    / "debezium"
    / "postgres_inventory_products.jsonl"
)

# The final inventory.products table after the 16 events, worked out by reading them: 9 snapshot
# reads (101-109); 106's description becomes "18oz carpenter hammer"; 107 weighs 5.1; 110 and 111 are
# created; 110 becomes "new water resistent white wind breaker" of 0.5; 111 is updated to 5.17 and
# then deleted.
EXPECTED_ROWS: dict[tuple[int], dict[str, Any]] = {
    (101,): {"id": 101, "name": "scooter", "description": "Small 2-wheel scooter", "weight": 3.14},
    (102,): {"id": 102, "name": "car battery", "description": "12V car battery", "weight": 8.1},
    (103,): {
        "id": 103,
        "name": "12-pack drill bits",
        "description": "12-pack of drill bits with sizes ranging from #40 to #3",
        "weight": 0.8,
    },
    (104,): {"id": 104, "name": "hammer", "description": "12oz carpenter's hammer", "weight": 0.75},
    (105,): {"id": 105, "name": "hammer", "description": "14oz carpenter's hammer", "weight": 0.875},
    (106,): {"id": 106, "name": "hammer", "description": "18oz carpenter hammer", "weight": 1.0},
    (107,): {"id": 107, "name": "rocks", "description": "box of assorted rocks", "weight": 5.1},
    (108,): {"id": 108, "name": "jacket", "description": "water resistent black wind breaker", "weight": 0.1},
    (109,): {"id": 109, "name": "spare tire", "description": "24 inch spare tire", "weight": 22.2},
    (110,): {
        "id": 110,
        "name": "jacket",
        "description": "new water resistent white wind breaker",
        "weight": 0.5,
    },
}

# A Kafka Connect JSON-converter schema for the products envelope (schemas.enable=true), abridged
# to what the converter writes at the top level.
_ROW_SCHEMA = {
    "type": "struct",
    "optional": True,
    "name": "fullfillment.inventory.products.Value",
    "fields": [
        {"type": "int32", "optional": False, "field": "id"},
        {"type": "string", "optional": False, "field": "name"},
        {"type": "string", "optional": True, "field": "description"},
        {"type": "double", "optional": True, "field": "weight"},
    ],
}
WRAPPER_SCHEMA = {
    "type": "struct",
    "optional": False,
    "name": "fullfillment.inventory.products.Envelope",
    "fields": [
        {**_ROW_SCHEMA, "field": "before"},
        {**_ROW_SCHEMA, "field": "after"},
        {
            "type": "struct",
            "optional": False,
            "name": "io.debezium.connector.postgresql.Source",
            "field": "source",
            "fields": [],
        },
        {"type": "string", "optional": False, "field": "op"},
        {"type": "int64", "optional": True, "field": "ts_ms"},
    ],
}


@pytest.fixture(scope="module")
def lines() -> list[str]:
    if not FIXTURE.exists():
        pytest.skip(f"real Debezium fixture absent: {FIXTURE} (../shared/data is not in a fresh clone)")
    return [line for line in FIXTURE.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_fixture_has_16_events_with_expected_ops(lines: list[str]) -> None:
    """The fixture parses into 9 reads, 4 updates, 2 creates and 1 delete, in that file order."""
    events = parse_change_events(lines)
    assert "".join(e.op.value for e in events) == "rrrrrrrrruuccuud"


def test_final_table_state_row_by_row(lines: list[str]) -> None:
    """Folding the 16 events gives exactly the ten expected rows of inventory.products."""
    state = TableState(schema="inventory", table="products")
    assert state.apply_all(parse_change_events(lines)) == 16
    assert state.rows == EXPECTED_ROWS
    assert (111,) not in state
    assert state.get({"id": 106}) == EXPECTED_ROWS[(106,)]


def test_schema_wrapped_events_give_the_same_state(lines: list[str]) -> None:
    """Values wrapped as {"schema", "payload"} by the JSON converter normalise to the same events and rows."""
    wrapped = [json.dumps({"schema": WRAPPER_SCHEMA, "payload": json.loads(line)}) for line in lines]
    bare = parse_change_events(lines)
    assert parse_change_events(wrapped) == bare
    state = TableState()
    state.apply_all(parse_change_events(wrapped))
    assert state.rows == EXPECTED_ROWS


def test_event_fields_of_the_update_of_106(lines: list[str]) -> None:
    """The update of 106 carries its key, before/after, LSN, transaction id and aware source time."""
    event = parse_change_event(lines[9])
    assert event is not None
    assert event.op is ChangeOp.UPDATE
    assert event.key == {"id": 106}
    assert event.before == {
        "id": 106,
        "name": "hammer",
        "description": "16oz carpenter's hammer",
        "weight": 1.0,
    }
    assert event.after == {"id": 106, "name": "hammer", "description": "18oz carpenter hammer", "weight": 1.0}
    assert (event.lsn, event.tx_id) == (34131104, 602)
    assert event.source_ts == datetime(2020, 7, 29, 8, 21, 29, 629000, tzinfo=UTC)  # source.ts_ms
    assert event.processed_ts == datetime(2020, 7, 29, 8, 21, 30, 411000, tzinfo=UTC)  # envelope ts_ms
    assert (event.connector, event.topic_prefix, event.db, event.table_id) == (
        "postgresql",
        "fullfillment",
        "postgres",
        "inventory.products",
    )
    assert event.snapshot is False
    assert parse_change_event(lines[0]).snapshot is True  # type: ignore[union-attr]


def test_tombstones_are_ignored(lines: list[str]) -> None:
    """A tombstone (None value) after the delete parses to None and leaves the state unchanged."""
    values: list[str | None] = list(lines)
    values.append(None)
    assert parse_change_event(None) is None
    assert parse_change_event(json.dumps({"schema": None, "payload": None})) is None
    state = TableState()
    for value in values:
        state.apply(parse_change_event(value, key=json.dumps({"id": 111}) if value is None else None))
    assert state.rows == EXPECTED_ROWS


def test_applying_twice_is_idempotent(lines: list[str]) -> None:
    """Applying every event twice, or the whole history twice, gives the same rows as once."""
    events = parse_change_events(lines)
    doubled = TableState()
    for event in events:
        doubled.apply(event)
        doubled.apply(event)
    assert doubled.rows == EXPECTED_ROWS
    replayed = TableState()
    replayed.apply_all(events)
    applied_again = replayed.apply_all(events)
    assert replayed.rows == EXPECTED_ROWS
    assert applied_again < len(events)  # the older events are recognised as stale by LSN


def test_stale_event_does_not_resurrect_a_deleted_row(lines: list[str]) -> None:
    """After the delete of 111, its earlier create (lower LSN) arriving again is ignored."""
    events = parse_change_events(lines)
    state = TableState()
    state.apply_all(events)
    create_111 = next(e for e in events if e.op is ChangeOp.CREATE and e.key == {"id": 111})
    assert state.apply(create_111) is False
    assert (111,) not in state


def test_record_key_wins_over_key_columns(lines: list[str]) -> None:
    """The Kafka record key, wrapped or not, is the primary key; without it the configured columns are."""
    wrapped_key = {"schema": {"type": "struct", "fields": []}, "payload": {"id": 101}}
    assert parse_change_event(lines[0], key=wrapped_key).key == {"id": 101}  # type: ignore[union-attr]
    by_name = parse_change_event(lines[0], key_columns=("name", "id"))
    assert by_name is not None and by_name.key == {"name": "scooter", "id": 101}


def test_truncate_clears_the_table(lines: list[str]) -> None:
    """A truncate event (op 't', no rows) removes every row."""
    state = TableState()
    state.apply_all(parse_change_events(lines))
    truncate = {
        "before": None,
        "after": None,
        "op": "t",
        "ts_ms": 1596010999000,
        "source": {"connector": "postgresql", "schema": "inventory", "table": "products", "lsn": 34200000},
    }
    assert state.apply(parse_change_event(truncate)) is True
    assert len(state) == 0


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"before": None, "after": {"id": 1}, "source": {}}, "no 'op' field"),
        ({"op": "x", "after": {"id": 1}, "source": {}}, "'op' is 'x'"),
        ({"op": "c", "after": None, "source": {}}, "requires 'after'"),
        ({"op": "c", "after": {"id": 1}, "source": "pg"}, "'source' must be an object"),
        ({"op": "c", "after": {"sku": 1}, "source": {}}, "key column(s) id not in the row"),
        ({"op": "c", "after": {"id": 1}, "source": {"lsn": "abc"}}, "source.lsn must be an integer"),
        ({"op": "d", "before": None, "after": None, "source": {}}, "deleted row is unknown"),
    ],
)
def test_malformed_event_names_what_is_wrong(value: Any, fragment: str) -> None:
    """A malformed value raises ChangeEventError whose message names the offending field."""
    with pytest.raises(ChangeEventError, match="not a Debezium change event") as info:
        parse_change_event(value)
    assert fragment in str(info.value)


def test_state_refuses_an_event_of_another_table(lines: list[str]) -> None:
    """A TableState made for inventory.orders refuses an inventory.products event."""
    with pytest.raises(ChangeEventError, match="inventory.products"):
        TableState(schema="inventory", table="orders").apply(parse_change_event(lines[0]))
