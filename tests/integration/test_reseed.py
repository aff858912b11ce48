"""A durable dev stack restarted: the embedded broker (memory only) comes back empty and ``DevStack.start``
re-seeds it from the event archive in PostgreSQL, record for record at the same offsets, so the projections'
checkpoints stay valid and they go on with the next records; events a projection applied but the archive had
not yet taken are the window of loss, counted and the checkpoint moved back; a gap in the archive is
renumbered, with the archive rows and the checkpoints translated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer
from pydantic import SecretStr

from backbone.devstack import DevStack
from connectors.agent_runs import ParsedRun, iter_runs
from core.settings import KafkaSettings, PostgresSettings, RedisSettings, Settings
from projections.agent_runs import AgentRunsProjection
from projections.archive import ArchiveProjection
from projections.runner import ProjectionRunner
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.replay import read_range
from streams.serde import AvroSerde

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOPIC = "agent.events"


def _settings(state_dir: Path, kafka: str = "", pg: str | None = None) -> Settings:
    return Settings(
        state_dir=state_dir,
        kafka=KafkaSettings(bootstrap_servers=kafka),
        postgres=PostgresSettings(url=SecretStr(pg)) if pg else PostgresSettings(),
        redis=RedisSettings(),
    )


def _log(settings: Settings, serde: AvroSerde) -> list[tuple[int, int, Any, bytes, Any, int]]:
    """Every record of the topic: (partition, offset, key, value, headers, timestamp ms)."""
    out = []
    for r in read_range(settings.kafka, serde, TOPIC):
        out.append((r.partition, r.offset, r.key, r.value, tuple(r.headers), r.timestamp_ms))
    return sorted(out, key=lambda x: (x[0], x[1]))


def _runner(settings: Settings, serde: AvroSerde, projection: Any) -> ProjectionRunner:
    return ProjectionRunner(settings, serde, projection, group_id=f"reseed-{projection.name}")


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "durable-stack"


def test_restart_reseeds_the_log_from_the_archive(state_dir: Path) -> None:
    serde = AvroSerde(EmbeddedRegistry())
    runs = [r for r in iter_runs(ROOT / "datasets" / "agent_runs") if isinstance(r, ParsedRun)]
    first = [e for r in runs[:4] for e in r.events]
    later = [e for r in runs[4:6] for e in r.events]
    after = [e for r in runs[6:8] for e in r.events]
    assert first and later and after

    stack = DevStack(_settings(state_dir), durable=True)
    info = stack.start()
    try:
        assert stack.reseed_report is None  # a first start: nothing kept, nothing to restore
        s = _settings(state_dir, info.kafka_bootstrap, info.postgres_url)
        with EventProducer(s.kafka, serde) as p:
            p.produce_many(TOPIC, first)
        raw = Producer(s.kafka.librdkafka())
        raw.produce(TOPIC, key=b"junk", value=b"\x00not avro", partition=2)  # undecodable: archived raw
        raw.flush(10)
        for proj in (ArchiveProjection([TOPIC]), AgentRunsProjection([TOPIC])):
            _runner(s, serde, proj).run(until_caught_up=True, max_wait_seconds=60)
        archived_log = _log(s, serde)
        # more events, applied by agent_runs only: the archive has not taken them when the broker goes
        with EventProducer(s.kafka, serde) as p:
            p.produce_many(TOPIC, later)
        _runner(s, serde, AgentRunsProjection([TOPIC])).run(until_caught_up=True, max_wait_seconds=60)
        with psycopg.connect(info.postgres_url) as c:
            before = dict(c.execute(
                "SELECT partition, next_offset FROM proj_agent_runs.projection_checkpoints WHERE topic = %s", [TOPIC]
            ).fetchall())  # fmt: skip
    finally:
        stack.stop()

    stack = DevStack(_settings(state_dir), durable=True)
    info = stack.start()
    try:
        report = stack.reseed_report
        assert report is not None and report.archive_found
        s = _settings(state_dir, info.kafka_bootstrap, info.postgres_url)
        # the same records, bytes, headers and timestamps, at the same offsets
        assert _log(s, serde) == archived_log
        assert report.records == len(first) + 1
        assert all(p.gaps == 0 and p.restored_end == p.archived_end for p in report.partitions)
        # the window of loss: what agent_runs applied beyond the archive, counted; its checkpoints moved back
        assert report.lost_events == len(later)
        moved = {c.partition: c for c in report.checkpoints_moved if c.projection == "agent_runs"}
        ends = {p.partition: p.restored_end for p in report.partitions}
        for part, c in moved.items():
            assert c.before == before[part] and c.after == ends[part]
        assert sum(c.lost_events for c in moved.values()) == len(later)
        assert not [c for c in report.checkpoints_moved if c.projection == "archive"]
        # the projections go on with the next records from the restored offsets
        with EventProducer(s.kafka, serde) as p:
            p.produce_many(TOPIC, after)
        stats = _runner(s, serde, ArchiveProjection([TOPIC])).run(until_caught_up=True, max_wait_seconds=60)
        assert stats.applied == len(after)
        stats = _runner(s, serde, AgentRunsProjection([TOPIC])).run(until_caught_up=True, max_wait_seconds=60)
        assert stats.applied == len(after)
        with psycopg.connect(info.postgres_url) as c:
            run_ids = {r[0] for r in c.execute("SELECT run_id FROM proj_agent_runs.agent_runs").fetchall()}
            assert {r.run_id for r in runs[6:8]} <= run_ids
            # a gap in the archive (a record that left the log before it was archived)
            part, end = c.execute(
                'SELECT partition, max("offset") + 1 FROM proj_archive.archived_events WHERE topic = %s '
                "GROUP BY 1 HAVING count(*) >= 3 ORDER BY 1 LIMIT 1", [TOPIC]
            ).fetchone()  # fmt: skip
            c.execute(
                'DELETE FROM proj_archive.archived_events WHERE topic = %s AND partition = %s AND "offset" = 1',
                [TOPIC, part],
            )
        full_log = [r for r in _log(s, serde) if r[0] == part]
    finally:
        stack.stop()

    stack = DevStack(_settings(state_dir), durable=True)
    info = stack.start()
    try:
        report = stack.reseed_report
        assert report is not None
        p = next(x for x in report.partitions if x.partition == part)
        assert (p.gaps, p.archived_end, p.restored_end, p.records) == (1, end, end - 1, end - 1)
        s = _settings(state_dir, info.kafka_bootstrap, info.postgres_url)
        restored = [r for r in _log(s, serde) if r[0] == part]
        # the record at offset 1 is gone; the rest follow densely, bytes unchanged
        assert [r[3] for r in restored] == [r[3] for i, r in enumerate(full_log) if i != 1]
        assert [r[1] for r in restored] == list(range(end - 1))
        with psycopg.connect(info.postgres_url) as c:
            offs = [r[0] for r in c.execute(
                'SELECT "offset" FROM proj_archive.archived_events WHERE topic = %s AND partition = %s ORDER BY 1',
                [TOPIC, part]).fetchall()]  # fmt: skip
            assert offs == list(range(end - 1))
            cps = dict(c.execute(
                "SELECT projection, next_offset FROM proj_archive.projection_checkpoints WHERE topic = %s "
                "AND partition = %s", [TOPIC, part]).fetchall())  # fmt: skip
            assert cps["archive"] == end - 1
    finally:
        stack.stop()
