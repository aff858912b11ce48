"""The incidents projection on real Tansu and PostgreSQL: incident insights made by the incident engine on
the Nezha slice (sent the way the incident processor sends them), anomaly alerts made by the anomaly
processor's logic, correlation links made by the correlator; rows, arrival-order independence, a
verified rebuild, the audit chain, the CLI's --json, the HTTP reads and dead letters."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr

from connectors.chat_code import commit_event, slack_event
from connectors.nezha import iter_day
from core.settings import PostgresSettings, Settings
from processors.correlation.logic import Correlator, observe
from processors.incidents.anomaly import AnomalyProcessor, DetectorConfig
from processors.incidents.eval_nezha import TELEMETRY_KINDS
from processors.incidents.incident import EngineConfig, run
from projections.incidents import IncidentsProjection
from projections.rebuild import rebuild
from projections.runner import ProjectionRunner
from streams.consumer import ConsumedEvent
from streams.envelope import Event
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.replay import read_range
from streams.serde import AvroSerde

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SLICE = ROOT / "datasets" / "nezha"
BAD_VALUE = b"\x00\x00\x00\x00\x07 not an avro record"
_KINDS = TELEMETRY_KINDS
T0 = datetime(2030, 5, 4, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde(EmbeddedRegistry())


def _incident_insights() -> list[Event]:
    """The engine's insights on the Nezha slice, as events built exactly as ``processors.incidents.app`` does."""
    records = sorted(iter_day(SLICE), key=lambda te: te[1].attributes.time)
    # every latency percentile scored (min_tail_requests 0): three incidents, eleven insights, as the checks
    # below expect; the projection, not detection quality, is under test here
    insights, _ = run(((_KINDS[t], e.data) for t, e in records), EngineConfig(min_tail_requests=0.0))
    out = []
    for insight in insights:
        when = datetime.fromtimestamp(insight["event_time"] / 1000, UTC)
        out.append(Event.create("sophia.insight.Insight", insight["entity"], {**insight, "event_time": when},
                                source="/processors/incidents", time=when, id=insight["insight_id"]))  # fmt: skip
    return out


def _anomaly_insights(pod: str, first: datetime) -> list[Event]:
    """The anomaly processor's alerts on two series with one spike 25 s after ``first``: one series of
    ``pod`` (in the incident's chain), one NAB-like series (not)."""
    proc, out = AnomalyProcessor(DetectorConfig(detector="seasonal-likelihood")), []
    for series in (f"pod:{pod}/CpuUsageRate(%)", "nab:test/spiky"):
        for i in range(150):
            t = first - timedelta(minutes=10) + timedelta(seconds=5 * i)
            value = 10 + math.sin(i * 0.7) + (80 if i == 125 else 0)
            out += proc.process({"series": series, "observed_at": t, "value": value}, f"sample-{series}-{i}")
    return out


def _correlation_insights() -> list[Event]:
    """Two reference links (a SHA, a squash-merged PR) between Slack messages and commits."""
    sha_a, sha_b = "0123456789abcdef0123456789abcdef01234567", "fedcba9876543210fedcba9876543210fedcba98"
    events = [
        slack_event(workspace="acme", channel="dev", ts=(T0 - timedelta(hours=2)).replace(tzinfo=None).isoformat(),
                    user="Bo", text="did <https://github.com/acme/widget/commit/0123456789ab|this> land?", repo="acme/widget"),
        slack_event(workspace="acme", channel="dev", ts=(T0 + timedelta(days=3)).replace(tzinfo=None).isoformat(),
                    user="Bo", text="thanks for merging #42!", repo="acme/widget"),
        commit_event(repo="acme/widget", sha=sha_a, commit_time=T0.isoformat(), author="Ann", subject="count frobs"),
        commit_event(repo="acme/widget", sha=sha_b, commit_time=(T0 + timedelta(days=1)).isoformat(), author="Ann",
                     subject="speed up widget rendering (#42)"),
    ]  # fmt: skip
    corr, links = Correlator(), []
    for e in events:
        obs = observe(e.data, e.attributes.id)
        assert obs is not None
        links += corr.add(obs)
    return [link.to_insight() for link in links]


def _broken_candidates(good: Event) -> Event:
    """A valid Avro insight whose ``candidates`` label is not JSON (the view must refuse it)."""
    data = {
        **good.data,
        "insight_id": "broken-1",
        "labels": {**good.data["labels"], "candidates": "{not json"},
    }
    return Event.create("sophia.insight.Insight", good.key, data, source="/processors/incidents",
                        time=good.attributes.time, id="broken-1")  # fmt: skip


def _db(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(url))})


def _dump(url: str, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    keys = {"incidents": "incident_id", "incident_insights": "insight_id", "anomalies": "insight_id",
            "correlations": "insight_id", "incident_anomalies": "incident_id, window_start, pod, signal, detail"}  # fmt: skip
    with psycopg.connect(url) as c:
        return {t: c.execute(f"SELECT * FROM {schema}.{t} ORDER BY {k}").fetchall() for t, k in keys.items()}


def _cli(
    settings: Settings, pg_url: str, tmp_path: Path, *args: str, columns: int = 200
) -> subprocess.CompletedProcess:
    env = {**os.environ, "BACKBONE_POSTGRES__URL": pg_url, "BACKBONE_STATE_DIR": str(tmp_path),
           "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers, "BACKBONE_LOG_FORMAT": "json",
           "COLUMNS": str(columns)}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "backbone", *args], env=env, check=False, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_incidents_projection_end_to_end(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable[..., str],
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Insights on three topics (with a re-sent copy, an undecodable record and an insight the view refuses)
    give one row per incident in its closed state, the alerts and the links; the reverse order gives the
    same tables; a verified rebuild swaps in equal tables; audit, CLI and HTTP read them."""
    incidents = _incident_insights()
    closed = {e.key: e for e in incidents if e.data["kind"] == "incident.closed"}
    opened = {e.key: e for e in incidents if e.data["kind"] == "incident.opened"}
    assert len(incidents) == 11 and len(closed) == len(opened) == 3
    first_closed = min(closed.values(), key=lambda e: e.attributes.time)
    first_at = datetime.fromtimestamp(first_closed.data["metrics"]["first_anomaly_window_ms"] / 1000, UTC)
    top1 = first_closed.data["labels"]["top1_pod"]
    anomalies = _anomaly_insights(top1, first_at)
    links = _correlation_insights()
    assert len(anomalies) == 2 and len(links) == 2

    s = _db(settings, pg_url)
    topics = [create_topic(unique_name(n), p) for n, p in (("inc", 1), ("ano", 3), ("cor", 3))]
    dlq = create_topic(unique_name("dlq"), 1)
    with EventProducer(s.kafka, serde) as p:
        p.produce_many(topics[0], incidents)
        p.produce(topics[0], _broken_candidates(first_closed))
        p.produce_raw(topics[0], key=b"broken", value=BAD_VALUE, headers=[("ce_id", b"x")])
        p.produce_many(topics[1], anomalies)
        p.produce_many(topics[2], links)
        p.produce_many(topics[0], incidents[:4])  # a re-sent copy: de-duplicated by CloudEvents id
    live = ProjectionRunner(s, serde, IncidentsProjection(topics), group_id=f"g-{topics[0]}", dlq_topic=dlq,
                            batch_size=3)  # fmt: skip
    stats = live.run(until_caught_up=True, max_wait_seconds=120)
    live.close()
    assert (stats.applied, stats.duplicates, stats.dead_lettered) == (15, 4, 2)

    # dead letters: the undecodable record and the insight the view refuses, each with its reason
    letters = [r for r in read_range(s.kafka, serde, dlq) if isinstance(r, ConsumedEvent)]
    assert len(letters) == 2 and {lt.data["processor"] for lt in letters} == {"incidents"}
    reasons = sorted(lt.data["reason"] for lt in letters)
    assert any("candidates" in r and "not JSON" in r for r in reasons), reasons
    assert any(lt.data["value"] == BAD_VALUE for lt in letters)

    # rows: one per incident, the latest state (the closed insight), opened/closed at their event times
    with psycopg.connect(pg_url) as c:
        rows = {r[0]: r for r in c.execute(
            "SELECT entity, status, opened_at, closed_at, first_anomaly_at, anomalies_count, candidates, pods, "
            "priority, latest_kind FROM proj_incidents.incidents").fetchall()}  # fmt: skip
        listed = dict(c.execute(
            "SELECT 'incident:' || incident_id, count(*) FROM proj_incidents.incident_anomalies GROUP BY 1").fetchall())  # fmt: skip
        n_insights = c.execute("SELECT count(*) FROM proj_incidents.incident_insights").fetchone()[0]
        an = c.execute("SELECT series, score, value, window_seconds, detector_version, event_time "
                       "FROM proj_incidents.anomalies ORDER BY series").fetchall()  # fmt: skip
        co = c.execute("SELECT entity, method, message_entity, source_a, source_b, lag_seconds, reference "
                       "FROM proj_incidents.correlations ORDER BY entity").fetchall()  # fmt: skip
    assert set(rows) == set(closed) and n_insights == 11
    for key, e in closed.items():
        _entity, status, o_at, c_at, f_at, count, cands, pods, prio, latest = rows[key]
        assert (status, latest, prio) == ("closed", "incident.closed", e.data["labels"]["priority"])
        assert o_at == opened[key].attributes.time and c_at == e.attributes.time
        assert f_at == datetime.fromtimestamp(e.data["metrics"]["first_anomaly_window_ms"] / 1000, UTC)
        assert count == int(e.data["metrics"]["anomalies_count"]) == listed[key]
        assert cands == json.loads(e.data["labels"]["candidates"]) and cands[0]["pod"] in pods
    assert [(r[0].split("/")[0], r[1], r[3], r[4]) for r in an] == [
        ("nab:test", 1.0, 3600.0, "seasonal-likelihood/1"), (f"pod:{top1}", 1.0, 3600.0, "seasonal-likelihood/1")
    ]  # fmt: skip
    assert an[1][5] == first_at + timedelta(seconds=25)
    by_commit = {lk.key: lk for lk in links}
    assert [r[0] for r in co] == sorted(by_commit)
    for r in co:
        assert (r[3], r[4]) == ("slack", "git") and r[5] == by_commit[r[0]].data["metrics"]["lag_seconds"]
        assert r[6] == by_commit[r[0]].data["labels"]["reference"]

    # arrival order: the same insights in reverse order, one per batch, give the same tables
    rev = [create_topic(unique_name(n), 1) for n in ("rinc", "rano", "rcor")]
    with EventProducer(s.kafka, serde) as p:
        p.produce_many(rev[0], incidents[::-1])
        p.produce_many(rev[1], anomalies[::-1])
        p.produce_many(rev[2], links[::-1])
    other = ProjectionRunner(s, serde, IncidentsProjection(rev), group_id=f"g-{rev[0]}", dlq_topic=dlq, batch_size=1,
                             schema="proj_incidents_reversed")  # fmt: skip
    other.run(until_caught_up=True, max_wait_seconds=120)
    other.close()
    assert _dump(pg_url, "proj_incidents_reversed") == _dump(pg_url, "proj_incidents")

    # a rebuild from the log in large batches equals the live view (verified before the swap)
    before = _dump(pg_url, "proj_incidents")
    report = rebuild(s, serde, "incidents", verify=True, projection=IncidentsProjection(topics), progress=False,
                     batch_size=1000, max_wait_seconds=120)  # fmt: skip
    assert report.verified and report.checksums["incidents"][0] == 3
    assert _dump(pg_url, "proj_incidents") == before

    # the audit chain: anomalies in event time, the alert on the top pod, the ranked candidates
    iid = first_closed.key.partition(":")[2]
    audit = _cli(s, pg_url, tmp_path, "audit", f"incident:{iid}", "--json")
    assert audit.returncode == 0, audit.stderr[-2000:]
    chain = json.loads(audit.stdout)
    steps = [st["step"] for st in chain["chain"]]
    n_anom = len(json.loads(first_closed.data["labels"]["anomalies"]))
    n_cand = len(json.loads(first_closed.data["labels"]["candidates"]))
    assert steps == ["anomaly"] * n_anom + ["alert"] + ["candidate"] * n_cand
    times = [st["window_start"] for st in chain["chain"][:n_anom]]
    assert times == sorted(times) and times[0] == first_at.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert chain["chain"][n_anom]["series"] == f"pod:{top1}/CpuUsageRate(%)"
    ranked = chain["chain"][n_anom + 1 :]
    assert [c["rank"] for c in ranked] == list(range(1, n_cand + 1)) and ranked[0]["pod"] == top1
    assert all(c["evidence"] for c in ranked)
    assert [i["kind"] for i in chain["insights"]] == [
        "incident.opened",
        "incident.updated",
        "incident.closed",
    ]
    text = _cli(s, pg_url, tmp_path, "audit", f"incident:{iid}")
    assert text.returncode == 0 and "ranked root-cause candidates" in text.stdout and top1 in text.stdout
    assert (
        "o.a.c.c.C.[.[.[.[dispatcherServlet]#175" in text.stdout
    )  # data printed as text, not as rich markup
    assert _cli(s, pg_url, tmp_path, "audit", "incident:no-such").returncode == 1

    # the CLI's queries read the projection
    q = _cli(s, pg_url, tmp_path, "query", "incidents", "--json")
    assert q.returncode == 0, q.stderr[-2000:]
    assert sorted(r["entity"] for r in json.loads(q.stdout)) == sorted(closed)
    # the text, in a terminal of 80 columns: every incident's whole id (what `audit incident:<id>` takes)
    # and its top candidate's whole pod name, one incident a block
    rows = json.loads(q.stdout)
    q = _cli(s, pg_url, tmp_path, "query", "incidents", columns=80)
    assert q.returncode == 0, q.stderr[-2000:]
    lines = q.stdout.splitlines()
    for r in rows:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{r['incident_id']}  closed"))
        assert lines[at + 2] == (
            f"  1. {r['candidates'][0]['pod']} ({r['candidates'][0]['service']}), score {r['candidates'][0]['score']}"
        )
    q = _cli(s, pg_url, tmp_path, "query", "anomalies", "--series", "nab:test/spiky", "--json")
    assert [r["series"] for r in json.loads(q.stdout)] == ["nab:test/spiky"]
    q = _cli(s, pg_url, tmp_path, "query", "correlations", "--json")
    assert sorted(r["entity"] for r in json.loads(q.stdout)) == sorted(by_commit)

    # the HTTP reads
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from psycopg_pool import ConnectionPool

    from backbone.http.read import router

    app = FastAPI()
    app.include_router(router)
    with ConnectionPool(pg_url, min_size=1, max_size=2, open=True) as pool:
        app.state.pg_pool, app.state.redis = pool, None
        client = TestClient(app)
        assert len(client.get("/incidents", params={"status": "closed"}).json()) == 3
        assert client.get("/incidents", params={"status": "open"}).json() == []
        assert client.get("/incidents", params={"status": "maybe"}).status_code == 422
        one = client.get(f"/incidents/{iid}").json()
        assert one["chain"] == chain["chain"] and one["incident"]["incident_id"] == iid
        assert client.get("/incidents/no-such").status_code == 404
        assert len(client.get("/anomalies").json()) == 2
        got = client.get("/correlations", params={"entity": co[0][2]}).json()
        assert [r["message_entity"] for r in got] == [co[0][2]]


def test_query_before_the_projection_ran_is_one_clear_line(
    settings: Settings, pg_url: str, tmp_path: Path
) -> None:
    done = _cli(settings, pg_url, tmp_path, "query", "incidents", "--json")
    assert done.returncode == 2 and "backbone projections run incidents" in " ".join(done.stderr.split())
