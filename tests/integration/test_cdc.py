"""CDC normalisation against real Tansu and PostgreSQL, on the real Debezium tutorial fixture: import as
Kafka Connect would, normalise to RowChanged, project the table state, idempotent re-import, dead
letters, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from core.settings import PostgresSettings, Settings
from connectors.cdc import CdcNormaliser, import_debezium_file, raw_topic_pattern
from connectors.debezium import TableState, parse_change_events
from projections.cdc import CdcProjection, table_rows
from projections.runner import ProjectionRunner
from streams.registry import EmbeddedRegistry
from streams.replay import read_range
from streams.serde import AvroSerde

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT.parent / "shared" / "data" / "cdc" / "debezium" / "postgres_inventory_products.jsonl"
COLUMNS = ["id", "name", "description", "weight"]
# The ten rows of inventory.products after the 16 events (as in tests/unit/test_debezium.py).
EXPECTED = [
    {"id": 101, "name": "scooter", "description": "Small 2-wheel scooter", "weight": 3.14},
    {"id": 102, "name": "car battery", "description": "12V car battery", "weight": 8.1},
    {"id": 103, "name": "12-pack drill bits", "description": "12-pack of drill bits with sizes ranging from #40 to #3",
     "weight": 0.8},
    {"id": 104, "name": "hammer", "description": "12oz carpenter's hammer", "weight": 0.75},
    {"id": 105, "name": "hammer", "description": "14oz carpenter's hammer", "weight": 0.875},
    {"id": 106, "name": "hammer", "description": "18oz carpenter hammer", "weight": 1.0},
    {"id": 107, "name": "rocks", "description": "box of assorted rocks", "weight": 5.1},
    {"id": 108, "name": "jacket", "description": "water resistent black wind breaker", "weight": 0.1},
    {"id": 109, "name": "spare tire", "description": "24 inch spare tire", "weight": 22.2},
    {"id": 110, "name": "jacket", "description": "new water resistent white wind breaker", "weight": 0.5},
]  # fmt: skip


@pytest.fixture(scope="module")
def lines() -> list[str]:
    if not FIXTURE.exists():
        pytest.skip(f"real Debezium fixture absent: {FIXTURE}")
    return [line for line in FIXTURE.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde(EmbeddedRegistry())


def _db(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"postgres": PostgresSettings(url=url)})


def _read_raw(settings: Settings, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    """Every (key, value) of a one-partition topic, from the beginning to the end."""
    consumer = Consumer(settings.kafka.librdkafka(extra={
        "group.id": f"raw-{uuid.uuid4()}", "enable.partition.eof": True, "enable.auto.commit": False,
    }))  # fmt: skip
    consumer.assign([TopicPartition(topic, 0, 0)])
    records: list[tuple[bytes | None, bytes | None]] = []
    try:
        while True:
            msgs = consumer.consume(100, 10.0)
            assert msgs, f"no end of {topic} reached"
            for m in msgs:
                if m.error() is not None:
                    assert m.error().code() == KafkaError._PARTITION_EOF, m.error()
                    return records
                records.append((m.key(), m.value()))
    finally:
        consumer.close()


def _rows(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT * FROM proj_cdc.cdc_rows ORDER BY table_schema, table_name, pk"
        ).fetchall()


def _table(url: str, table: str = "inventory.products") -> tuple[list[str], list[dict[str, Any]]]:
    with psycopg.connect(url) as conn:
        return table_rows(conn, table)


def test_fixture_imported_normalised_and_projected_row_by_row(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    lines: list[str],
) -> None:
    """The 16 real change events end as the ten expected rows; importing them again changes nothing."""
    prefix = unique_name("cdc")
    changes = create_topic(unique_name("changes"), 3)
    dlq = create_topic(unique_name("dlq"), 1)
    s = _db(settings, pg_url)

    report = import_debezium_file(s, FIXTURE, topic_prefix=prefix)
    raw_topic = f"{prefix}.inventory.products"
    assert (report.records, report.tombstones, report.problems) == (17, 1, [])
    assert report.topics == {raw_topic: 17}
    raw = _read_raw(s, raw_topic)
    assert [v for _, v in raw] == [line.encode() for line in lines[:16]] + [None]
    keys = [{"id": (v["before"] if v["op"] == "d" else v["after"])["id"]} for v in map(json.loads, lines)]
    assert [json.loads(k) for k, _ in raw] == [*keys, {"id": 111}]

    normaliser = CdcNormaliser(s, serde, pattern=raw_topic_pattern(prefix), output_topic=changes,
                               group_id=unique_name("norm"), dlq_topic=dlq)  # fmt: skip
    stats = normaliser.run(until_caught_up=True, max_wait_seconds=60)
    assert (stats.produced, stats.tombstones, stats.dead_lettered) == (16, 1, 0)
    typed = list(read_range(s.kafka, serde, changes))
    assert len(typed) == 16
    update_106 = next(e for e in typed if e.key == "inventory.products:106" and e.data["op"] == "UPDATE")
    assert update_106.attributes.subject == "inventory.products:106"
    assert (update_106.data["lsn"], update_106.data["tx_id"]) == (34131104, 602)
    assert update_106.attributes.source == "/connectors/debezium/postgresql/fullfillment"

    projection_group = unique_name("proj")
    run = ProjectionRunner(s, serde, CdcProjection([changes]), group_id=projection_group, dlq_topic=dlq)
    pstats = run.run(until_caught_up=True, max_wait_seconds=60)
    assert (pstats.applied, pstats.dead_lettered) == (16, 0)
    assert _table(pg_url) == (COLUMNS, EXPECTED)
    state = TableState()
    state.apply_all(parse_change_events(lines))
    assert list(state.rows.values()) == EXPECTED  # the pure reducer agrees with the view
    before = _rows(pg_url)

    again = import_debezium_file(s, FIXTURE, topic_prefix=prefix)
    assert again.records == 17
    n2 = CdcNormaliser(s, serde, topics=[raw_topic], output_topic=changes, group_id=normaliser.group_id,
                       dlq_topic=dlq).run(until_caught_up=True, max_wait_seconds=60)  # fmt: skip
    assert n2.produced == 16  # the same group reads only the second copy
    ids = [e.attributes.id for e in read_range(s.kafka, serde, changes)]
    assert len(ids) == 32 and len(set(ids)) == 16  # a re-import yields the same event ids
    p2 = ProjectionRunner(s, serde, CdcProjection([changes]), group_id=projection_group, dlq_topic=dlq).run(
        until_caught_up=True, max_wait_seconds=60
    )
    assert (p2.applied, p2.duplicates) == (0, 16)
    assert _rows(pg_url) == before


def test_malformed_records_are_dead_lettered_and_the_rest_processed(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    lines: list[str],
    tmp_path: Path,
) -> None:
    """A non-JSON line and an unknown op go to the dead-letter topic with raw bytes and reason; the table is still right."""
    raw_topic = create_topic(f"{unique_name('cdc')}.inventory.products", 1)
    changes = create_topic(unique_name("changes"), 3)
    dlq = create_topic(unique_name("dlq"), 1)
    s = _db(settings, pg_url)
    bad_json = '{"before": null, "after": {"id": 999'
    bad_op = json.dumps({"before": None, "after": {"id": 998}, "op": "x",
                         "source": {"connector": "postgresql", "schema": "inventory", "table": "products"}})  # fmt: skip
    path = tmp_path / "changes.jsonl"
    path.write_text(
        "\n".join([*lines[:5], bad_json, *lines[5:10], bad_op, *lines[10:]]) + "\n", encoding="utf-8"
    )

    report = import_debezium_file(s, path, topic=raw_topic)
    assert report.records == 19
    assert [(p.line, p.sent) for p in report.problems] == [(6, True)]
    assert "not JSON" in report.problems[0].reason

    stats = CdcNormaliser(s, serde, topics=[raw_topic], output_topic=changes, group_id=unique_name("norm"),
                          dlq_topic=dlq).run(until_caught_up=True, max_wait_seconds=60)  # fmt: skip
    assert (stats.produced, stats.dead_lettered) == (16, 2)
    letters = list(read_range(s.kafka, serde, dlq))
    assert [letter.data["value"] for letter in letters] == [bad_json.encode(), bad_op.encode()]
    assert "not JSON" in letters[0].data["reason"]
    assert "'op' is 'x'" in letters[1].data["reason"]
    assert {letter.data["source_topic"] for letter in letters} == {raw_topic}
    assert {letter.data["processor"] for letter in letters} == {"cdc-normaliser"}

    pstats = ProjectionRunner(
        s, serde, CdcProjection([changes]), group_id=unique_name("proj"), dlq_topic=dlq
    ).run(until_caught_up=True, max_wait_seconds=60)
    assert pstats.applied == 16
    assert _table(pg_url) == (COLUMNS, EXPECTED)


def test_stale_change_does_not_overwrite_a_newer_row(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    lines: list[str],
    tmp_path: Path,
) -> None:
    """History delivered newest-first (and 111's create after its delete) still projects to the expected rows."""
    raw_topic = create_topic(f"{unique_name('cdc')}.inventory.products", 1)
    changes = create_topic(unique_name("changes"), 3)
    s = _db(settings, pg_url)
    path = tmp_path / "reversed.jsonl"
    path.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    import_debezium_file(s, path, topic=raw_topic)
    CdcNormaliser(s, serde, topics=[raw_topic], output_topic=changes, group_id=unique_name("norm"),
                  dlq_topic=create_topic(unique_name("dlq"), 1)).run(until_caught_up=True, max_wait_seconds=60)  # fmt: skip
    ProjectionRunner(s, serde, CdcProjection([changes]), group_id=unique_name("proj")).run(
        until_caught_up=True, max_wait_seconds=60
    )
    assert _table(pg_url) == (COLUMNS, EXPECTED)


def test_truncate_clears_the_table_whatever_the_partition_order(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    lines: list[str],
    tmp_path: Path,
) -> None:
    """A truncate removes the rows older than it, a later create survives, and an older change arriving after it is ignored."""
    raw_topic = create_topic(f"{unique_name('cdc')}.inventory.products", 1)
    changes = create_topic(unique_name("changes"), 3)
    s = _db(settings, pg_url)
    source = {"connector": "postgresql", "name": "fullfillment", "db": "postgres", "schema": "inventory",
              "table": "products", "ts_ms": 1596011000000}  # fmt: skip
    truncate = {
        "before": None,
        "after": None,
        "op": "t",
        "ts_ms": 1596011000001,
        "source": {**source, "lsn": 34200000},
    }
    created = {"before": None, "after": {"id": 200, "name": "kite", "description": None, "weight": 0.3}, "op": "c",
               "ts_ms": 1596011000002, "source": {**source, "lsn": 34200100}}  # fmt: skip
    stale = {"before": None, "after": {**EXPECTED[0], "weight": 9.9}, "op": "u", "ts_ms": 1596011000003,
             "source": {**source, "lsn": 34100000}}  # fmt: skip
    path = tmp_path / "truncate.jsonl"
    path.write_text(
        "\n".join([*lines, *(json.dumps(v) for v in (truncate, created, stale))]) + "\n", encoding="utf-8"
    )
    import_debezium_file(s, path, topic=raw_topic)
    CdcNormaliser(s, serde, topics=[raw_topic], output_topic=changes, group_id=unique_name("norm"),
                  dlq_topic=create_topic(unique_name("dlq"), 1)).run(until_caught_up=True, max_wait_seconds=60)  # fmt: skip
    ProjectionRunner(s, serde, CdcProjection([changes]), group_id=unique_name("proj")).run(
        until_caught_up=True, max_wait_seconds=60
    )
    assert _table(pg_url) == (COLUMNS, [created["after"]])


_CLI = """
import sys, typer
from backbone.cli.cdc import import_debezium, query_cdc, run_cdc
app = typer.Typer()
app.command("import-debezium")(import_debezium)
app.command("query-cdc")(query_cdc)
app.command("run-cdc")(run_cdc)
app()
"""


def test_cli_import_run_and_query(
    settings: Settings, pg_url: str, create_topic: Callable, unique_name: Callable, tmp_path: Path
) -> None:
    """`import debezium`, the CDC runner and `query cdc --json` give the expected table; the table view prints it."""
    prefix = unique_name("cdc")
    changes = create_topic(unique_name("changes"), 3)
    env = {
        **os.environ,
        "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BACKBONE_POSTGRES__URL": pg_url,
        "BACKBONE_STATE_DIR": str(tmp_path),
        "BACKBONE_LOG_LEVEL": "WARNING",
        "BACKBONE_CDC_TOPIC_PREFIX": prefix,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-c", _CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True, check=False,
                              timeout=180)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done

    if not FIXTURE.exists():
        pytest.skip(f"real Debezium fixture absent: {FIXTURE}")
    imported = json.loads(cli("import-debezium", str(FIXTURE), "--json").stdout)
    assert imported["records"] == 17 and imported["topics"] == {f"{prefix}.inventory.products": 17}
    cli("run-cdc", "--until-caught-up", "--changes-topic", changes, "--group", unique_name("norm"),
        "--projection-group", unique_name("proj"), "--dlq-topic", create_topic(unique_name("dlq"), 1))  # fmt: skip
    assert json.loads(cli("query-cdc", "inventory.products", "--json").stdout) == EXPECTED
    table = cli("query-cdc", "inventory.products").stdout
    assert "18oz carpenter hammer" in table and "10 row(s)" in table
    listing = json.loads(cli("query-cdc", "--json").stdout)
    assert listing == [{"table": "inventory.products", "columns": COLUMNS, "rows": 10}]
    missing = subprocess.run([sys.executable, "-c", _CLI, "query-cdc", "inventory.orders"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert missing.returncode == 2 and "inventory.products" in missing.stderr
