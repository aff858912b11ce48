"""The projection runner against real Tansu and PostgreSQL: totals, idempotent re-import,
dead letters, and exactly-once in effect across SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from connectors.agent_runs import ParsedRun, iter_runs
from core.settings import PostgresSettings, Settings
from projections import queries
from projections.agent_runs import AgentRunsProjection
from projections.runner import ProjectionRunner
from streams.consumer import ConsumedEvent
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.replay import read_range
from streams.serde import AvroSerde

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "datasets" / "agent_runs"
FULL = ROOT.parent / "shared" / "data" / "agent_runs"


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde(EmbeddedRegistry())


@pytest.fixture(scope="module")
def demo_events() -> list:
    return [e for r in iter_runs(DEMO) if isinstance(r, ParsedRun) for e in r.events]


def _produce(settings: Settings, serde: AvroSerde, topic: str, events: list) -> None:
    with EventProducer(settings.kafka, serde) as p:
        p.produce_many(topic, events)


def _db(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"postgres": PostgresSettings(url=url)})


def _runner(
    settings: Settings, serde: AvroSerde, topic: str, dlq: str = "backbone.dlq", **kw
) -> ProjectionRunner:
    return ProjectionRunner(
        settings, serde, AgentRunsProjection([topic]), group_id=f"g-{topic}", dlq_topic=dlq, **kw
    )


def _dump(url: str) -> tuple[list, list]:
    with psycopg.connect(url) as c:
        runs = c.execute("SELECT * FROM proj_agent_runs.agent_runs ORDER BY run_id").fetchall()
        models = c.execute(
            "SELECT * FROM proj_agent_runs.agent_run_models ORDER BY run_id, model, provider"
        ).fetchall()
    return runs, models


def test_produce_to_projection_and_reimport_changes_nothing(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list,
) -> None:
    """The demo runs projected give the dataset's totals; importing them again applies nothing new."""
    topic = create_topic(unique_name("ae"), 6)
    s = _db(settings, pg_url)
    _produce(s, serde, topic, demo_events)
    stats = _runner(s, serde, topic).run(until_caught_up=True, max_wait_seconds=120)
    assert stats.applied == len(demo_events) == 1730 and stats.dead_lettered == 0
    with psycopg.connect(pg_url) as c:
        t = queries.totals(c)
    assert (t["runs"], t["resolved"], t["llm_calls"], t["tool_calls"]) == (25, 13, 856, 824)
    assert t["cost_usd"] == pytest.approx(7.799117, abs=1e-6)
    before = _dump(pg_url)
    _produce(s, serde, topic, demo_events)
    again = _runner(s, serde, topic).run(until_caught_up=True, max_wait_seconds=120)
    assert again.applied == 0 and again.duplicates == len(demo_events)
    assert _dump(pg_url) == before


@pytest.mark.skipif(
    not FULL.exists(), reason="../shared/data/agent_runs is absent; the full-data facts need it"
)
def test_full_data_facts(
    settings: Settings, serde: AvroSerde, pg_url: str, create_topic: Callable, unique_name: Callable
) -> None:
    """All 120 real runs projected reproduce the data README's facts: 120 runs, 89 resolved, 4,623 calls, 51.433 USD."""
    topic = create_topic(unique_name("full"), 6)
    s = _db(settings, pg_url)
    _produce(s, serde, topic, [e for r in iter_runs(FULL) if isinstance(r, ParsedRun) for e in r.events])
    _runner(s, serde, topic).run(until_caught_up=True, max_wait_seconds=180)
    with psycopg.connect(pg_url) as c:
        t = queries.totals(c)
        models = queries.model_usage(c)
    assert (t["runs"], t["resolved"], t["llm_calls"]) == (120, 89, 4623)
    assert round(t["cost_usd"], 3) == 51.433
    assert sum(m["resolved_runs"] for m in models) == 89


def test_undecodable_record_goes_to_dead_letter_topic_and_processing_goes_on(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list,
) -> None:
    """Garbage bytes and an event whose run id is not its key land in the dead-letter topic with raw
    bytes and reason, and every following record is applied."""
    topic = create_topic(unique_name("poison"), 1)
    dlq = create_topic(unique_name("dlq"), 1)
    s = _db(settings, pg_url)
    run = [e for e in demo_events if e.key == demo_events[0].key]
    p = EventProducer(s.kafka, serde)
    p.produce(topic, run[0])
    p.produce_raw(
        topic, key=run[0].key.encode(), value=b"not avro at all", headers=run[1].attributes.to_headers()
    )
    mismatched = run[2].__class__(
        schema=run[2].schema, key="someone-else", data=run[2].data, attributes=run[2].attributes
    )
    p.produce(topic, mismatched)
    for e in run[3:]:
        p.produce(topic, e)
    p.flush()
    stats = _runner(s, serde, topic, dlq=dlq).run(until_caught_up=True, max_wait_seconds=60)
    assert stats.dead_lettered == 2 and stats.applied == len(run) - 2
    letters = [r for r in read_range(s.kafka, serde, dlq) if isinstance(r, ConsumedEvent)]
    assert len(letters) == 2
    garbage, refused = sorted(letters, key=lambda r: r.data["source_offset"])
    assert garbage.data["value"] == b"not avro at all" and garbage.data["source_offset"] == 1
    assert "magic byte" in garbage.data["reason"] and garbage.data["processor"] == "agent_runs"
    assert (
        "does not match key" in refused.data["reason"]
        and refused.data["error_type"] == "ProjectionApplyError"
    )
    assert {h["key"] for h in garbage.data["headers"]} >= {"ce_id", "ce_type"}
    with psycopg.connect(pg_url) as c:
        (steps,) = c.execute(
            "SELECT steps FROM proj_agent_runs.agent_runs WHERE run_id = %s", (run[0].key,)
        ).fetchone()
    assert steps == max(e.data.get("step", 0) for e in run)


def test_sigkill_at_random_points_loses_nothing_and_counts_nothing_twice(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list,
    stack,
) -> None:
    """A runner process killed with SIGKILL at random points, then restarted, ends with views equal
    row for row to a from-scratch build, across 20 restarts."""
    topic = create_topic(unique_name("crash"), 6)
    s = _db(settings, pg_url)
    _produce(s, serde, topic, demo_events)
    _produce(s, serde, topic, demo_events)  # the same history again: duplicates the views must skip
    total = 2 * len(demo_events)
    env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": stack.kafka_bootstrap, "BACKBONE_POSTGRES__URL": pg_url,
           "BACKBONE_STATE_DIR": "/nonexistent", "BACKBONE_LOG_LEVEL": "WARNING",
           "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": "2000"}  # fmt: skip
    # A new consumer group per restart: the checkpoint in PostgreSQL, not the group's committed
    # offsets, decides where a restarted runner resumes (and no restart waits for a dead member).
    cmd = lambda: [sys.executable, "-m", "backbone", "project", "--topic", topic, "--group",
                   f"crash-{topic}-{kills}", "--batch-size", "5"]  # fmt: skip
    rng = random.Random(20261122)
    kills = 0
    with psycopg.connect(pg_url, autocommit=True) as c:

        def applied() -> int:
            try:
                return c.execute(
                    "SELECT coalesce(sum(next_offset), 0) FROM proj_agent_runs.projection_checkpoints"
                ).fetchone()[0]
            except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
                return 0

        while kills < 20 and applied() < total:
            proc = subprocess.Popen(cmd(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            start = applied()
            deadline = time.monotonic() + 30
            target = rng.randint(1, 80)  # kill after this many more records are checkpointed
            while applied() < min(start + target, total) and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.random() * 0.05)  # ... plus a random slice of the next batch
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    assert kills == 20
    final = subprocess.run(
        [*cmd(), "--until-caught-up"], env=env, capture_output=True, text=True, timeout=120
    )
    assert final.returncode == 0, final.stderr
    live = _dump(pg_url)
    # from scratch, in one go, into a second database
    ref_db = f"ref_{abs(hash(topic)) % 10**8}"
    admin_url = pg_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {ref_db}")
    ref_url = pg_url.rsplit("/", 1)[0] + f"/{ref_db}"
    try:
        _runner(_db(settings, ref_url), serde, topic).run(until_caught_up=True, max_wait_seconds=120)
        assert live == _dump(ref_url)
        assert sum(r[9] for r in live[0]) == 856  # llm_calls column: nothing lost, nothing twice
    finally:
        with psycopg.connect(admin_url, autocommit=True) as c:
            c.execute(f"DROP DATABASE {ref_db} WITH (FORCE)")


def test_until_caught_up_returns_on_an_empty_topic_and_names_an_absent_one(
    settings: Settings, serde: AvroSerde, pg_url: str, create_topic: Callable, unique_name: Callable
) -> None:
    """An empty partition is caught up; a topic that is not on the broker is reported, not waited on.

    (Found as a new user: ``projections run --until-caught-up`` never returned after ``dev up`` and an
    import, because the ``insights`` projection's topic was empty or absent.)"""
    s = _db(settings, pg_url)
    empty = create_topic(unique_name("empty"), 3)
    started = time.monotonic()
    stats = _runner(s, serde, empty).run(until_caught_up=True, max_wait_seconds=30)
    assert stats.applied == 0 and stats.absent_topics == []
    assert time.monotonic() - started < 20
    absent = unique_name("absent")
    runner = ProjectionRunner(
        s, serde, AgentRunsProjection([empty, absent]), group_id=f"g-{absent}", dlq_topic="backbone.dlq"
    )
    stats = runner.run(until_caught_up=True, max_wait_seconds=30)
    assert stats.absent_topics == [absent] and stats.applied == 0


def test_lag_gauge_counts_events_behind_and_reads_zero_when_caught_up(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list,
) -> None:
    """``backbone_projection_lag_events`` is the events between the next offset to apply and the high
    watermark over the runner's partitions: above 0 while it works through a backlog, 0 once caught up,
    and exactly the new records when more arrive after its checkpoint."""
    from core.observability import REGISTRY

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("backbone_projection_lag_events", {"projection": "agent_runs"})

    topic = create_topic(unique_name("lag"), 3)
    s = _db(settings, pg_url)
    _produce(s, serde, topic, demo_events)
    seen: list[float | None] = []
    # the gauge set before each batch committed (lag_interval_seconds=0: after every consume call)
    runner = _runner(
        s, serde, topic, batch_size=100, lag_interval_seconds=0, on_batch=lambda _: seen.append(gauge())
    )
    runner.run(until_caught_up=True, max_wait_seconds=120)
    assert len(seen) > 3 and max(v or 0 for v in seen) > 0 and max(v or 0 for v in seen) <= len(demo_events)
    assert gauge() == 0

    more = demo_events[:40]  # duplicates by id, but 40 more records of the log to read past
    _produce(s, serde, topic, more)
    # batches of at most 10 committed one at a time: before each, the gauge holds what the earlier left
    steps: list[tuple[float | None, int]] = []  # (gauge when the batch committed, records applied after it)
    again = _runner(s, serde, topic, batch_size=10, pipeline=False, lag_interval_seconds=0,
                    on_batch=lambda st: steps.append((gauge(), sum(st.positions.values()))))  # fmt: skip
    stats = again.run(until_caught_up=True, max_wait_seconds=120)
    assert stats.duplicates == len(more) and stats.batches >= 4
    end = steps[-1][1]
    behind = [end - done for _, done in steps[:-1]]  # records not yet applied after each batch
    assert [g for g, _ in steps[1:]] == behind and behind[0] >= 30  # exactly the records left to apply
    assert gauge() == 0


def test_lag_is_zero_past_a_transactional_producers_commit_marker(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list,
) -> None:
    """A transactional producer ends each transaction with a commit marker, which the high watermark
    counts and no consumer gets: once the runner has read its partitions to their end and applied every
    record, the markers are no lag (before, the gauge stayed at one per partition written)."""
    from confluent_kafka import Producer

    from core.observability import REGISTRY

    topic = create_topic(unique_name("txlag"), 3)
    s = _db(settings, pg_url)
    producer = Producer(
        {"bootstrap.servers": settings.kafka.bootstrap_servers, "transactional.id": unique_name("tx")}
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for e in demo_events[:60]:
        producer.produce(
            topic, key=e.key.encode(), value=serde.encode(e.schema, e.data), headers=e.attributes.to_headers()
        )
    producer.commit_transaction(30)
    stats = _runner(s, serde, topic, lag_interval_seconds=0).run(until_caught_up=True, max_wait_seconds=60)
    assert stats.applied == 60
    assert REGISTRY.get_sample_value("backbone_projection_lag_events", {"projection": "agent_runs"}) == 0
