"""The event archive, the audit trail, the HTTP read endpoints and the Redis read model, against real
Tansu, PostgreSQL and Redis."""

from __future__ import annotations

import itertools
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import redis
from pydantic import SecretStr

from connectors.agent_runs import ParsedRun, iter_runs
from core.settings import PostgresSettings, Settings
from processors import run_summary
from projections.agent_runs import AgentRunsProjection, InsightsProjection
from projections.archive import ArchiveProjection
from projections.audit import audit_trail
from projections.read_models import RunReadModel, read_run
from projections.runner import ProjectionRunner, run_projections
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.replay import read_range
from streams.serde import AvroSerde

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "datasets" / "agent_runs"


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde(EmbeddedRegistry())


@pytest.fixture(scope="module")
def runs() -> list[ParsedRun]:
    return [r for r in iter_runs(DEMO) if isinstance(r, ParsedRun)]


def _db(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(url))})


def _insights(run: ParsedRun) -> list:
    state, out = None, []
    for e in run.events:
        state, insight = run_summary.apply(state, e)
        if insight is not None:
            out.append(insight)
    return out


def _build(settings: Settings, serde: AvroSerde, agent_topic: str, insight_topic: str, hook=None) -> None:
    run_projections([
        ProjectionRunner(settings, serde, AgentRunsProjection([agent_topic]), group_id=f"a-{agent_topic}", after_commit=hook),
        ProjectionRunner(settings, serde, InsightsProjection([insight_topic]), group_id=f"i-{agent_topic}"),
        ProjectionRunner(settings, serde, ArchiveProjection([agent_topic, insight_topic]), group_id=f"r-{agent_topic}"),
    ], until_caught_up=True)  # fmt: skip


@pytest.fixture
def world(settings: Settings, serde: AvroSerde, pg_url: str, create_topic: Callable, unique_name: Callable,
          runs: list[ParsedRun]) -> tuple[Settings, str, str]:  # fmt: skip
    """The demo runs and their run-summary insights produced and projected (views, insights, archive)."""
    agent_topic, insight_topic = create_topic(unique_name("ev"), 6), create_topic(unique_name("in"), 3)
    s = _db(settings, pg_url)
    with EventProducer(s.kafka, serde) as p:
        p.produce_many(agent_topic, [e for r in runs for e in r.events])
        p.produce_many(insight_topic, [i for r in runs for i in _insights(r)])
    _build(s, serde, agent_topic, insight_topic)
    return s, agent_topic, insight_topic


def test_replaying_a_time_range_returns_exactly_the_archived_events_in_it(
    world: tuple[Settings, str, str], serde: AvroSerde, pg_url: str
) -> None:
    """read_range over an event-time window (on Tansu, whose offsets_for_times answers 0) returns the
    same (partition, offset) set as the archive's rows in that window, neither more nor fewer."""
    s, topic, _ = world
    with psycopg.connect(pg_url) as c:
        lo, hi = c.execute("SELECT min(event_time), max(event_time) FROM proj_archive.archived_events WHERE topic = %s",
                           (topic,)).fetchone()  # fmt: skip
        t1, t2 = lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3
        archived = set(c.execute(
            'SELECT partition, "offset" FROM proj_archive.archived_events WHERE topic = %s AND event_time >= %s AND event_time < %s',
            (topic, t1, t2),
        ).fetchall())  # fmt: skip
    replayed = {(r.partition, r.offset) for r in read_range(s.kafka, serde, topic, start=t1, end=t2)}
    assert 0 < len(archived) < 1730
    assert replayed == archived


def test_audit_of_a_real_run_shows_its_events_in_order_with_the_insight_last(
    world: tuple[Settings, str, str], serde: AvroSerde, pg_url: str, runs: list[ParsedRun]
) -> None:
    """The audit of run:<id> lists every event of that run in event-time order across both topics, the
    run-summary insight last, caused by the FINISHED event."""
    _, agent_topic, insight_topic = world
    run = runs[3]
    with psycopg.connect(pg_url) as c:
        trail = audit_trail(c, f"run:{run.run_id}", serde=serde)
    finished = next(
        e for e in run.events if e.schema == run_summary.RUN_LIFECYCLE and e.data["phase"] == "FINISHED"
    )
    assert [e.event_id for e in trail[:-1]] and {e.event_id for e in trail[:-1]} == {
        e.attributes.id for e in run.events
    }
    assert all(a.time <= b.time for a, b in itertools.pairwise(trail))
    last = trail[-1]
    assert last.topic == insight_topic and last.type == "sophia.insight.Insight"
    assert last.caused_by == finished.attributes.id and last.depth >= 1
    assert last.data["entity"] == f"run:{run.run_id}"
    assert {e.topic for e in trail[:-1]} == {agent_topic}
    tool = next(e for e in trail if e.type == "sophia.agent.ToolCall")
    assert tool.caused_by is not None and tool.as_json()["causationid"] == tool.caused_by
    with psycopg.connect(pg_url) as c:
        window = audit_trail(
            c,
            f"run:{run.run_id}",
            start=finished.attributes.time,
            end=finished.attributes.time + timedelta(seconds=1),
        )
    t = finished.attributes.time
    assert [e.event_id for e in window][-2:] == [finished.attributes.id, last.event_id]
    assert all(t <= e.time < t + timedelta(seconds=1) for e in window) and len(window) < len(trail)


def test_archive_keeps_undecodable_records_and_repeated_event_ids(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    runs: list[ParsedRun],
) -> None:
    """Garbage bytes are archived with their raw value and the decode error, and an event produced twice
    is archived at both offsets; re-running the archive changes nothing."""
    topic = create_topic(unique_name("raw"), 1)
    s = _db(settings, pg_url)
    e = runs[0].events[0]
    with EventProducer(s.kafka, serde) as p:
        p.produce(topic, e)
        p.produce_raw(topic, key=b"k", value=b"\x00garbage", headers=[("x", b"1")])
        p.produce(topic, e)
    for _ in range(2):
        ProjectionRunner(s, serde, ArchiveProjection([topic]), group_id=f"x-{topic}-{_}").run(
            until_caught_up=True, max_wait_seconds=60
        )
    with psycopg.connect(pg_url) as c:
        rows = c.execute(
            'SELECT "offset", event_id, value, decode_error, headers FROM proj_archive.archived_events ORDER BY 1'
        ).fetchall()
    assert [r[0] for r in rows] == [0, 1, 2]
    assert rows[0][1] == rows[2][1] == e.attributes.id
    assert bytes(rows[1][2]) == b"\x00garbage" and rows[1][3] and rows[1][4] == [["x", "MQ=="]]


def test_http_read_endpoints(
    world: tuple[Settings, str, str], serde: AvroSerde, pg_url: str, redis_url: str, runs: list
) -> None:
    """The router answers runs (filter, cursor paging), one run, models, insights, projections and audit
    from PostgreSQL, with 404 for an unknown run and 422 for a bad filter."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from psycopg_pool import ConnectionPool

    from backbone.http.read import router

    app = FastAPI()
    app.include_router(router)
    with ConnectionPool(pg_url, min_size=1, max_size=2, open=True) as pool:
        app.state.pg_pool, app.state.redis, app.state.serde = pool, redis.Redis.from_url(redis_url), serde
        client = TestClient(app)
        page1 = client.get("/runs", params={"limit": 10}).json()
        page2 = client.get("/runs", params={"limit": 10, "cursor": page1["next_cursor"]}).json()
        page3 = client.get("/runs", params={"limit": 10, "cursor": page2["next_cursor"]}).json()
        ids = [r["run_id"] for r in page1["items"] + page2["items"] + page3["items"]]
        assert ids == sorted(r.run_id for r in runs) and page3["next_cursor"] is None
        resolved = client.get("/runs", params={"outcome": "resolved", "limit": 100}).json()["items"]
        assert len(resolved) == 13
        assert client.get("/runs", params={"outcome": "maybe"}).status_code == 422
        one = client.get(f"/runs/{runs[0].run_id}").json()
        assert one["run_id"] == runs[0].run_id and one["models"] and one["source"] == "postgres"
        missing = client.get("/runs/no-such-run")
        assert missing.status_code == 404 and "no-such-run" in missing.json()["detail"]
        assert sum(m["llm_calls"] for m in client.get("/models").json()) == 856
        insights = client.get("/insights", params={"kind": "run.summary"}).json()
        assert (
            len(insights) == 25
            and client.get("/insights", params={"entity": f"run:{runs[0].run_id}"}).json()[0]["summary"]
        )
        status = {p["name"]: p for p in client.get("/projections").json()}
        assert status["archive"]["stored_version"] == 1
        trail = client.get(f"/audit/run:{runs[0].run_id}").json()
        assert trail[-1]["type"] == "sophia.insight.Insight"
        assert client.get("/audit/run:nothing-here").status_code == 404
        assert client.get("/audit/x", params={"from": "2025-01-01T00:00:00"}).status_code == 422


# -- Redis read model through an outage ------------------------------------------------------------------------------


def _redis_server(port: int, workdir: Path) -> subprocess.Popen:
    from backbone.processes import redis_server_binary as _redis_server_binary

    proc = subprocess.Popen([_redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            if redis.Redis(port=port).ping():
                return proc
        except redis.RedisError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_redis_outage_degrades_reads_and_loses_no_write(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    runs: list[ParsedRun],
    tmp_path: Path,
) -> None:
    """With Redis killed mid-stream the runner goes on, reads come from PostgreSQL, and once a fresh
    (empty) Redis is back the next batch refills every run so Redis equals PostgreSQL."""
    from backbone.processes import free_port as _free_port

    topic = create_topic(unique_name("rm"), 3)
    s = _db(settings, pg_url)
    port = _free_port()
    server = _redis_server(port, tmp_path)
    client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    model = RunReadModel(client, pg_url, prefix="t:run:")
    events = [e for r in runs for e in r.events]
    parts = [events[:600], events[600:1200], events[1200:]]

    def project(part: list) -> None:
        with EventProducer(s.kafka, serde) as p:
            p.produce_many(topic, part)
        ProjectionRunner(
            s, serde, AgentRunsProjection([topic]), group_id=f"rm-{topic}", after_commit=model
        ).run(until_caught_up=True, max_wait_seconds=60)

    try:
        project(parts[0])
        with psycopg.connect(pg_url) as c:
            first = read_run(client, c, events[0].key, prefix="t:run:")
        assert first[1] == "redis" and first[0]["run_id"] == events[0].key
        server.kill()
        server.wait()
        project(parts[1])
        assert model.stale and model.failures >= 1
        with psycopg.connect(pg_url) as c:
            row, source = read_run(client, c, events[700].key, prefix="t:run:")
        assert source == "postgres" and row is not None
        server = _redis_server(port, tmp_path)
        project(parts[2])
        assert not model.stale and model.refills >= 2
        with psycopg.connect(pg_url) as c:
            ids = [r[0] for r in c.execute("SELECT run_id FROM proj_agent_runs.agent_runs").fetchall()]
            for run_id in ids:
                cached, src = read_run(client, c, run_id, prefix="t:run:")
                assert src == "redis"
                assert cached == read_run(None, c, run_id)[0]
        assert len(ids) == 25
    finally:
        model.close()
        server.kill()
        server.wait()
