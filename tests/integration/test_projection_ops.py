"""Projection operations against real Tansu and PostgreSQL: status and lag, several projections in one
process, rebuild with --verify (while the live runner keeps running), an interrupted rebuild, the
archive backfill of a rebuild, and PostgreSQL stopped and started under load."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr

from connectors.agent_runs import ParsedRun, iter_runs
from core.settings import PostgresSettings, RedisSettings, Settings
from projections import queries
from projections.agent_runs import AgentRunsProjection
from projections.archive import ArchiveProjection
from projections.rebuild import RebuildVerifyError, rebuild, schema_exists
from projections.registry import projection_status
from projections.runner import ProjectionRunner, run_projections
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "datasets" / "agent_runs"


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde(EmbeddedRegistry())


@pytest.fixture(scope="module")
def demo_events() -> list:
    return [e for r in iter_runs(DEMO) if isinstance(r, ParsedRun) for e in r.events]


def _db(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(url))})


def _produce(settings: Settings, serde: AvroSerde, topic: str, events: list) -> None:
    with EventProducer(settings.kafka, serde) as p:
        p.produce_many(topic, events)


def _live(settings: Settings, serde: AvroSerde, topic: str, **kw) -> ProjectionRunner:
    return ProjectionRunner(settings, serde, AgentRunsProjection([topic]), group_id=f"live-{topic}", **kw)


def _dump(url: str, schema: str = "proj_agent_runs") -> tuple[list, list]:
    with psycopg.connect(url) as c:
        runs = c.execute(f"SELECT * FROM {schema}.agent_runs ORDER BY run_id").fetchall()
        models = c.execute(
            f"SELECT * FROM {schema}.agent_run_models ORDER BY run_id, model, provider"
        ).fetchall()
    return runs, models


def _assert_demo_totals(url: str) -> None:
    with psycopg.connect(url) as c:
        t = queries.totals(c)
    assert (t["runs"], t["resolved"], t["llm_calls"], t["tool_calls"]) == (25, 13, 856, 824)
    assert t["cost_usd"] == pytest.approx(7.799117, abs=1e-6)


def test_status_reports_lag_per_partition_from_the_fetch_high_watermark(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list,
) -> None:
    """After the runner caught up with the first half, producing the second half shows exactly that many
    events of lag, per partition and in total, and the checkpoints with when they advanced."""
    topic = create_topic(unique_name("lag"), 3)
    s = _db(settings, pg_url)
    half = len(demo_events) // 2
    _produce(s, serde, topic, demo_events[:half])
    _live(s, serde, topic).run(until_caught_up=True, max_wait_seconds=60)
    _produce(s, serde, topic, demo_events[half:])
    with psycopg.connect(pg_url) as c:
        st = projection_status(c, "agent_runs", kafka=s.kafka, projection=AgentRunsProjection([topic]))
    assert st.lag_events == len(demo_events) - half
    assert len(st.partitions) == 3 and sum(p.checkpoint for p in st.partitions) == half
    assert all(p.log_end is not None and p.lag_events == p.log_end - p.checkpoint for p in st.partitions)
    assert st.stored_version == st.version == 1 and st.last_advanced_at is not None


def test_rebuild_with_verify_matches_live_while_the_live_runner_keeps_running(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list,
) -> None:
    """A rebuild with verify, run while the live runner is consuming new events (and a re-sent copy of
    200 of them, which both skip), matches the live tables row for row, swaps in with the seen-id
    index rebuilt, and the live runner then goes on from the rebuilt checkpoint without loss."""
    topic = create_topic(unique_name("rb"), 6)
    s = _db(settings, pg_url)
    half = len(demo_events) // 2
    _produce(s, serde, topic, demo_events[:half])
    live = _live(s, serde, topic, batch_size=50)
    thread = threading.Thread(target=live.run, daemon=True)
    thread.start()
    feeder = threading.Thread(target=_produce, args=(s, serde, topic, demo_events[half:] + demo_events[:200]))
    feeder.start()
    report = rebuild(s, serde, "agent_runs", verify=True, projection=AgentRunsProjection([topic]), progress=False,
                     batch_size=200, max_wait_seconds=120)  # fmt: skip
    feeder.join()
    assert report.verified and report.checksums["agent_runs"][0] > 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with psycopg.connect(pg_url) as c:
            (n,) = c.execute(
                "SELECT coalesce(sum(next_offset), 0) FROM proj_agent_runs.projection_checkpoints"
            ).fetchone()
        if n == len(demo_events) + 200:
            break
        time.sleep(0.2)
    live.stop()
    thread.join(30)
    _assert_demo_totals(pg_url)
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT count(*) FROM proj_agent_runs.projection_seen").fetchone()[0] == len(
            demo_events
        )
        assert c.execute(
            "SELECT to_regclass('proj_agent_runs.projection_seen_event_id') IS NOT NULL"
        ).fetchone()[0]
        assert not schema_exists(c, "proj_agent_runs_rebuild")
        assert (
            c.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'proj_agent_runs_old_%'"
            ).fetchone()[0]
            == 0
        )


def test_verify_fails_loudly_and_swaps_nothing_when_tables_differ(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list,
) -> None:
    """A live table changed behind the projection's back makes verify fail naming the table, and the live
    tables stay as they were."""
    topic = create_topic(unique_name("bad"), 2)
    s = _db(settings, pg_url)
    _produce(s, serde, topic, demo_events)
    _live(s, serde, topic).run(until_caught_up=True, max_wait_seconds=60)
    with psycopg.connect(pg_url) as c:
        c.execute(
            "UPDATE proj_agent_runs.agent_runs SET steps = steps + 1 WHERE run_id = (SELECT min(run_id) FROM proj_agent_runs.agent_runs)"
        )
    before = _dump(pg_url)
    with pytest.raises(RebuildVerifyError, match="agent_runs") as info:
        rebuild(s, serde, "agent_runs", verify=True, projection=AgentRunsProjection([topic]), progress=False)
    assert set(info.value.differences) == {"agent_runs"}
    assert _dump(pg_url) == before


def test_interrupted_rebuild_leaves_the_live_projection_untouched(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list,
    stack,
) -> None:
    """A rebuild process killed with SIGKILL midway leaves the live tables and checkpoints as they were,
    and the next rebuild completes and verifies."""
    topic = create_topic(unique_name("kill"), 3)
    s = _db(settings, pg_url)
    _produce(s, serde, topic, demo_events)
    _live(s, serde, topic).run(until_caught_up=True, max_wait_seconds=60)
    before = _dump(pg_url)
    with psycopg.connect(pg_url) as c:
        cps = c.execute(
            "SELECT topic, partition, next_offset FROM proj_agent_runs.projection_checkpoints ORDER BY 1, 2"
        ).fetchall()
    code = (
        "import time\n"
        "from pydantic import SecretStr\n"
        "from core.settings import *\n"
        "from projections.agent_runs import AgentRunsProjection\n"
        "from projections.rebuild import rebuild\n"
        "from streams.registry import EmbeddedRegistry\nfrom streams.serde import AvroSerde\n"
        f"s = Settings(kafka=KafkaSettings(bootstrap_servers={stack.kafka_bootstrap!r}, session_timeout_ms=6000), "
        f"postgres=PostgresSettings(url=SecretStr({pg_url!r})))\n"
        f"rebuild(s, AvroSerde(EmbeddedRegistry()), 'agent_runs', projection=AgentRunsProjection([{topic!r}]), "
        "progress=False, batch_size=10, on_batch=lambda st: time.sleep(0.05))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "BACKBONE_LOG_LEVEL": "WARNING"}
    )
    deadline = time.monotonic() + 60
    progressed = 0
    with psycopg.connect(pg_url, autocommit=True) as c:
        while time.monotonic() < deadline and progressed < 300:
            with contextlib.suppress(psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
                (progressed,) = c.execute(
                    "SELECT coalesce(sum(next_offset), 0) FROM proj_agent_runs_rebuild.projection_checkpoints"
                ).fetchone()
            time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 300 <= progressed < len(demo_events), "the rebuild was not killed midway"
    assert _dump(pg_url) == before
    with psycopg.connect(pg_url) as c:
        assert (
            c.execute(
                "SELECT topic, partition, next_offset FROM proj_agent_runs.projection_checkpoints ORDER BY 1, 2"
            ).fetchall()
            == cps
        )
    report = rebuild(
        s, serde, "agent_runs", verify=True, projection=AgentRunsProjection([topic]), progress=False
    )
    assert report.verified and _dump(pg_url) == before


def test_rebuild_reads_the_archive_for_offsets_below_the_log_start(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list,
) -> None:
    """With the log said to start halfway (as after retention), a rebuild takes the first half from the
    archive and the rest from the log, and verifies equal to the live view; the archive and the views run
    as several projections in one process."""
    topic = create_topic(unique_name("arch"), 3)
    s = _db(settings, pg_url)
    _produce(s, serde, topic, demo_events)
    runners = [
        _live(s, serde, topic),
        ProjectionRunner(s, serde, ArchiveProjection([topic]), group_id=f"arch-{topic}"),
    ]
    stats = run_projections(runners, until_caught_up=True)
    assert [st.applied for st in stats] == [len(demo_events)] * 2
    with psycopg.connect(pg_url) as c:
        half = dict(c.execute(
            'SELECT partition, (max("offset") + 1) / 2 FROM proj_archive.archived_events WHERE topic = %s GROUP BY 1',
            (topic,),
        ).fetchall())  # fmt: skip
    report = rebuild(s, serde, "agent_runs", verify=True, projection=AgentRunsProjection([topic]), progress=False,
                     log_start=lambda t, p: half.get(p, 0))  # fmt: skip
    assert report.from_archive == sum(half.values()) > 0
    assert report.verified and report.events == len(demo_events)
    _assert_demo_totals(pg_url)


# -- PostgreSQL stopped and started under load ---------------------------------------------------------------------


@pytest.mark.slow
def test_postgres_stopped_and_started_under_load_loses_nothing(
    settings: Settings,
    serde: AvroSerde,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list,
    tmp_path: Path,
) -> None:
    """A runner applying a stream of events while its own PostgreSQL is stopped for seconds and started
    again retries with backoff and ends with exactly the dataset's totals (nothing lost, nothing twice)."""
    from backbone.devstack import DevStack
    from backbone.processes import pg_ctl_stop as _pg_ctl_stop
    from tests.support import start_postgres as _start_pg

    own = Settings(kafka=settings.kafka, postgres=PostgresSettings(), redis=RedisSettings(url=settings.redis.url),
                   state_dir=tmp_path)  # fmt: skip
    devstack = DevStack(own, state_dir=tmp_path, durable=False)
    info = devstack.start()
    try:
        s = _db(settings, info.postgres_url)
        port = int(info.postgres_url.rsplit(":", 1)[1].split("/")[0])
        topic = create_topic(unique_name("pgdown"), 3)
        runner = _live(s, serde, topic, batch_size=20)
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        chunks = [demo_events[i : i + 100] for i in range(0, len(demo_events), 100)]

        # the first chunk, and wait until it is applied (the group join takes seconds on a loaded machine),
        # so that PostgreSQL goes down while the rest is still arriving
        _produce(s, serde, topic, chunks[0])
        seen = time.monotonic() + 60
        while runner.stats.applied == 0 and time.monotonic() < seen:
            time.sleep(0.1)

        def feed() -> None:
            for ch in chunks[1:]:
                _produce(s, serde, topic, ch)
                time.sleep(0.3)

        feeder = threading.Thread(target=feed)
        feeder.start()
        time.sleep(0.5)
        _pg_ctl_stop(tmp_path / "postgres", 10)
        time.sleep(3)
        proc = _start_pg(tmp_path / "postgres", port)
        feeder.join()
        deadline = time.monotonic() + 90
        n = 0
        while time.monotonic() < deadline and n < len(demo_events):
            try:
                with psycopg.connect(info.postgres_url) as c:
                    (n,) = c.execute(
                        "SELECT coalesce(sum(next_offset), 0) FROM proj_agent_runs.projection_checkpoints"
                    ).fetchone()
            except psycopg.OperationalError:
                pass
            time.sleep(0.2)
        runner.stop()
        thread.join(30)
        assert runner.stats.db_retries > 0, "PostgreSQL was never seen down"
        assert n == len(demo_events)
        _assert_demo_totals(info.postgres_url)
        assert proc.poll() is None
    finally:
        devstack.stop()


def test_a_runner_started_while_postgres_is_down_waits_for_it(
    settings: Settings,
    serde: AvroSerde,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list,
    tmp_path: Path,
) -> None:
    """Found by the chaos harness: a runner that started during a PostgreSQL restart exited. It now
    retries its setup with backoff and then applies everything; an address where no PostgreSQL ever
    answers is still an error once ``startup_retry_seconds`` have passed."""
    from backbone.devstack import DevStack
    from backbone.processes import pg_ctl_stop as _pg_ctl_stop
    from tests.support import start_postgres as _start_pg

    own = Settings(kafka=settings.kafka, postgres=PostgresSettings(), redis=RedisSettings(url=settings.redis.url),
                   state_dir=tmp_path)  # fmt: skip
    devstack = DevStack(own, state_dir=tmp_path, durable=False)
    info = devstack.start()
    try:
        s = _db(settings, info.postgres_url)
        port = int(info.postgres_url.rsplit(":", 1)[1].split("/")[0])
        topic = create_topic(unique_name("pgstart"), 3)
        _produce(s, serde, topic, demo_events)
        _pg_ctl_stop(tmp_path / "postgres", 10)
        runner = _live(s, serde, topic)
        result: dict = {}
        thread = threading.Thread(
            target=lambda: result.update(stats=runner.run(until_caught_up=True, max_wait_seconds=120)),
            daemon=True,
        )
        thread.start()
        time.sleep(3)
        assert thread.is_alive(), "the runner gave up while PostgreSQL was down"
        proc = _start_pg(tmp_path / "postgres", port)
        thread.join(120)
        assert result["stats"].applied == len(demo_events) and result["stats"].db_retries > 0
        _assert_demo_totals(info.postgres_url)
        assert proc.poll() is None
    finally:
        devstack.stop()
    nowhere = _db(settings, "postgresql://postgres@127.0.0.1:1/nowhere")
    runner = _live(nowhere, serde, topic)
    runner.startup_retry_seconds = 1.0
    with pytest.raises(psycopg.OperationalError):
        runner.run(until_caught_up=True)
