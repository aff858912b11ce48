"""The ``routing`` projection against real Tansu and PostgreSQL: the policy router's JSON decisions and
outcomes (made by the router's own state machine, :class:`processors.routing.policy.RoutingState`, with a
fallback after a failed outcome, an open circuit and an unservable request) projected into rows and
per-model statistics; a rebuild and a shuffled order give the same tables; malformed records are
dead-lettered with raw bytes and reason; ``backbone query routing``, ``backbone audit request:ID`` and
the HTTP read endpoints answer from the view."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import psycopg
import pytest
from confluent_kafka import Producer

from core.settings import PostgresSettings, Settings
from processors.routing.policy import (
    Outcome,
    PolicyDecision,
    PolicyRequest,
    RoutingState,
    next_fallback,
)
from projections import routing
from projections.rebuild import rebuild
from projections.routing import RoutingProjection
from projections.runner import ProjectionRunner, schema_name
from streams.consumer import ConsumedEvent
from streams.registry import EmbeddedRegistry
from streams.replay import read_range
from streams.serde import AvroSerde

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CONFIG = {
    "providers": {"openai": {"requests_per_minute": 500}, "mistral": {"requests_per_minute": 500}},
    "models": {
        "big": {"provider": "openai", "capabilities": ["chat", "code"], "context_window_tokens": 128000,
                "usd_per_million_input_tokens": 10.0, "usd_per_million_output_tokens": 30.0},
        "small": {"provider": "mistral", "capabilities": ["chat"], "context_window_tokens": 32000,
                  "usd_per_million_input_tokens": 0.6, "usd_per_million_output_tokens": 0.6},
        "tiny": {"provider": "mistral", "capabilities": ["chat"], "context_window_tokens": 8000,
                 "usd_per_million_input_tokens": 0.1, "usd_per_million_output_tokens": 0.1},
    },
    "policies": {"cheap": {"kind": "cheapest", "models": ["small", "tiny", "big"], "quality_target": 0.4},
                 "best": {"kind": "best_quality", "models": ["big", "small", "tiny"], "budget_usd": 0.5}},
    "default_policy": "cheap",
    "ab": {"policy_a": "cheap", "policy_b": "best", "weight_a": 0.5},
}  # fmt: skip
TABLES = ("routing_decisions", "routing_outcomes")


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde(EmbeddedRegistry())


def _history() -> tuple[list[PolicyDecision], list[Outcome]]:
    """Ten requests through the router's state: every third needs ``code`` (only ``big`` has it), ``big``'s
    circuit opens before q6 (so q6 and q9 are unservable), q1 and q4 fail on their first model and get a
    fallback decision, which then succeeds."""
    state = RoutingState()
    state.on_config(CONFIG, 3)
    decisions, outcomes = [], []
    for i in range(10):
        if i == 5:
            state.on_circuit("big", "open")
        req = PolicyRequest(request_id=f"q{i}", requested_at=T0 + timedelta(seconds=i), prompt=f"Say hello {i}.",
                            required_capabilities=("code",) if i % 3 == 0 else ())  # fmt: skip
        d = state.on_request(req)
        decisions.append(d)
        if d.model is None:
            continue
        ok = i not in (1, 4)
        o = Outcome(request_id=req.request_id, model=d.model, success=ok, correct=ok if i % 2 else None,
                    occurred_at=T0 + timedelta(seconds=i, milliseconds=400), latency_ms=100.0 + 37 * i,
                    cost_usd=0.0001 * (i + 1))  # fmt: skip
        state.on_outcome(o)
        outcomes.append(o)
        if not ok:
            assert state.setup is not None
            fb = next_fallback(d, state.setup, req, state.health(), state.learner)
            decisions.append(fb)
            assert fb.model is not None
            o2 = Outcome(request_id=req.request_id, model=fb.model, success=True,
                         occurred_at=T0 + timedelta(seconds=i, milliseconds=900), latency_ms=250.0 + i,
                         cost_usd=0.002)  # fmt: skip
            state.on_outcome(o2)
            outcomes.append(o2)
    return decisions, outcomes


def _records(decisions: list[PolicyDecision], outcomes: list[Outcome]) -> tuple[list, list]:
    return (
        [(d.request_id.encode(), json.dumps(d.to_json()).encode()) for d in decisions],
        [(o.request_id.encode(), json.dumps(o.to_json()).encode()) for o in outcomes],
    )


def _produce(settings: Settings, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    p = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})
    for key, value in items:
        p.produce(topic, key=key, value=value)
    assert p.flush(30) == 0


def _db(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"postgres": PostgresSettings(url=url)})


def _dump(url: str, schema: str = "proj_routing") -> dict[str, list]:
    with psycopg.connect(url) as c:
        return {t: c.execute(f"SELECT * FROM {schema}.{t} ORDER BY 1").fetchall() for t in TABLES}


def _expected_stats(decisions: list[PolicyDecision], outcomes: list[Outcome]) -> dict[str, dict]:
    """Per-model statistics computed here, in Python, from what was produced."""
    out: dict[str, dict] = {}
    models = {d.model for d in decisions if d.model} | {o.model for o in outcomes}
    for m in sorted(models):
        mine = [o for o in outcomes if o.model == m]
        lat = [o.latency_ms for o in mine if o.latency_ms is not None]
        out[m] = {
            "decisions": sum(d.model == m for d in decisions),
            "fallbacks_taken": sum(d.model == m and bool(d.fallback_from) for d in decisions),
            "fell_back_from": sum(bool(d.fallback_from) and d.fallback_from[-1] == m for d in decisions),
            "outcomes": len(mine),
            "successes": sum(o.success for o in mine),
            "success_rate": sum(o.success for o in mine) / len(mine) if mine else None,
            "latency_p50_ms": float(np.percentile(lat, 50)) if lat else None,
            "latency_p95_ms": float(np.percentile(lat, 95)) if lat else None,
            "cost_usd": float(sum((Decimal(repr(o.cost_usd)) for o in mine if o.cost_usd is not None), Decimal(0))),
        }  # fmt: skip
    return out


def test_decisions_and_outcomes_projected_rebuilt_audited_and_queried(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows, per-model statistics, a re-sent copy skipped, malformed records dead-lettered, a rebuild with
    verify equal to the live view, the audit of a request with a fallback, ``query routing --json`` and
    the HTTP read endpoints."""
    decisions, outcomes = _history()
    assert sum(bool(d.fallback_from) for d in decisions) == 2 and sum(d.model is None for d in decisions) == 2
    dec_topic = create_topic(unique_name("decisions"), 3)
    out_topic = create_topic(unique_name("outcomes"), 3)
    dlq = create_topic(unique_name("dlq"), 1)
    s = _db(settings, pg_url)
    drecs, orecs = _records(decisions, outcomes)
    bad = [
        (b"q-bad", b"not json {"),
        (b"q-other", drecs[0][1]),  # a decision of q0 keyed by another request
        (b"q-bad", json.dumps({**decisions[0].to_json(), "config_version": "three"}).encode()),
    ]
    _produce(s, dec_topic, drecs + bad + drecs[:3])  # and a re-sent copy of three decisions
    _produce(s, out_topic, [*orecs, (b"q1", json.dumps({"request_id": "q1", "model": "tiny"}).encode())])
    projection = RoutingProjection(decisions_topic=dec_topic, outcomes_topic=out_topic)
    stats = ProjectionRunner(s, serde, projection, group_id=unique_name("g"), dlq_topic=dlq).run(
        until_caught_up=True, max_wait_seconds=120
    )
    assert (stats.applied, stats.duplicates, stats.dead_lettered) == (len(decisions) + len(outcomes), 3, 4)

    # rows: one per decision, every field as the router sent it
    with psycopg.connect(pg_url) as c:
        rows = {r[0]: r for r in c.execute(
            "SELECT decision_id, request_id, policy, ab_arm, model, provider, fallbacks, fallback_from, candidates, "
            "reason, config_version, learner_version, decided_at FROM proj_routing.routing_decisions").fetchall()}  # fmt: skip
        n_out = c.execute("SELECT count(*) FROM proj_routing.routing_outcomes").fetchone()[0]
        joined = c.execute(
            "SELECT request_id, model, decision_id, after_fallback FROM proj_routing.routing_outcomes_joined"
        ).fetchall()
    assert len(rows) == len(decisions) and n_out == len(outcomes)
    for d in decisions:
        r = rows[d.decision_id]
        j = d.to_json()
        assert r[1:8] == (
            d.request_id,
            d.policy,
            d.ab_arm,
            d.model,
            d.provider,
            j["fallbacks"],
            j["fallback_from"],
        )
        assert r[8] == j["candidates"] and r[9:12] == (d.reason, 3, "none") and r[12] == d.decided_at
    by_model = {(d.request_id, d.model): d for d in decisions if d.model}
    assert sorted(joined) == sorted(
        (o.request_id, o.model, by_model[(o.request_id, o.model)].decision_id,
         bool(by_model[(o.request_id, o.model)].fallback_from)) for o in outcomes
    )  # fmt: skip

    # per-model statistics
    with psycopg.connect(pg_url) as c:
        got = {r["model"]: r for r in routing.model_stats(c)}
    want = _expected_stats(decisions, outcomes)
    assert set(got) == set(want)
    for m, w in want.items():
        for k, v in w.items():
            assert got[m][k] == (pytest.approx(v) if isinstance(v, float) else v), (m, k)
    assert sum(g["fallbacks_taken"] for g in got.values()) == 2

    # dead letters: raw bytes and reason
    letters = sorted(
        (r for r in read_range(s.kafka, serde, dlq) if isinstance(r, ConsumedEvent)),
        key=lambda r: (r.data["source_topic"], r.data["source_offset"]),
    )
    assert len(letters) == 4 and all(r.data["processor"] == "routing" for r in letters)
    reasons = [r.data["reason"] for r in letters]
    values = [r.data["value"] for r in letters]
    assert b"not json {" in values and drecs[0][1] in values
    assert any(x.startswith("not JSON") for x in reasons)
    assert any("is not its request id 'q0'" in x for x in reasons)
    assert any("'config_version' is str, not int" in x for x in reasons)
    assert any("not a routing outcome: missing 'success'" in x for x in reasons)

    # a rebuild (with verify) equals the live view
    before = _dump(pg_url)
    report = rebuild(s, serde, "routing", verify=True, projection=RoutingProjection(
        decisions_topic=dec_topic, outcomes_topic=out_topic), progress=False, max_wait_seconds=120)  # fmt: skip
    assert report.verified and report.checksums["routing_decisions"][0] == len(decisions)
    assert _dump(pg_url) == before

    # the audit of a request that fell back
    q1 = [d for d in decisions if d.request_id == "q1"]
    with psycopg.connect(pg_url) as c:
        audit = routing.request_audit(c, "q1")
    assert [d["decision_id"] for d in audit.decisions] == [d.decision_id for d in q1]
    assert [d["fallback"] for d in audit.decisions] == [False, True]
    assert audit.decisions[1]["fallback_from"] == [q1[0].model]
    failed = next(c for c in audit.decisions[1]["candidates"] if c["model"] == q1[0].model)
    assert not failed["eligible"] and "already tried and failed" in failed["reasons"]
    assert [(o["model"], o["success"], o["after_fallback"]) for o in audit.outcomes] == [
        (q1[0].model, False, False), (q1[1].model, True, True)
    ]  # fmt: skip

    # the CLI
    from typer.testing import CliRunner

    from backbone.cli import mounted_app
    from core.settings import get_settings

    app = mounted_app()  # the whole command tree, as the console script mounts it

    monkeypatch.setenv("BACKBONE_POSTGRES__URL", pg_url)
    monkeypatch.setenv("BACKBONE_KAFKA__BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers)
    get_settings.cache_clear()
    try:
        cli = CliRunner()
        res = cli.invoke(app, ["audit", "request:q1", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output) == json.loads(json.dumps(audit.as_json()))
        text = cli.invoke(app, ["audit", "request:q1"])
        assert text.exit_code == 0, text.output
        assert "already tried and failed" in text.output and f"fallback after {q1[0].model}" in text.output
        assert cli.invoke(app, ["audit", "request:nope"]).exit_code == 1
        res = cli.invoke(app, ["query", "routing", "--json", "--limit", "3"])
        assert res.exit_code == 0, res.output
        body = json.loads(res.output)
        latest = sorted(decisions, key=lambda d: (d.decided_at, len(d.fallback_from)), reverse=True)[:3]
        assert [d["decision_id"] for d in body["decisions"]] == [d.decision_id for d in latest]
        assert {m["model"]: m["decisions"] for m in body["models"]} == {
            m: w["decisions"] for m, w in want.items()
        }
        res = cli.invoke(app, ["query", "routing", "--json", "--model", "big", "--policy", "cheap"])
        picked = json.loads(res.output)["decisions"]
        assert {d["decision_id"] for d in picked} == {
            d.decision_id for d in decisions if d.model == "big" and d.policy == "cheap"
        }
        assert cli.invoke(app, ["query", "routing"]).exit_code == 0
    finally:
        get_settings.cache_clear()
        import structlog

        structlog.reset_defaults()  # the CLI pointed logging at CliRunner's stream, closed by now

    # the Python client
    from backbone.client import Client

    with Client(s, serde) as bb:
        assert [d["decision_id"] for d in bb.query("routing", limit=3)] == [d.decision_id for d in latest]
        assert {m["model"] for m in bb.query("routing_models")} == set(want)
        assert bb.query("routing_request", request_id="q1") == json.loads(json.dumps(audit.as_json()))

    # the HTTP read endpoints
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from psycopg_pool import ConnectionPool

    from backbone.http.read import router

    api = FastAPI()
    api.include_router(router)
    with ConnectionPool(pg_url, min_size=1, max_size=2, open=True) as pool:
        api.state.pg_pool = pool
        client = TestClient(api)
        page = client.get("/routing/decisions", params={"limit": 3}).json()
        assert [d["decision_id"] for d in page] == [d.decision_id for d in latest]
        assert len(client.get("/routing/decisions", params={"request_id": "q4"}).json()) == 2
        assert {m["model"] for m in client.get("/routing/models").json()} == set(want)
        assert client.get("/routing/requests/q1").json()["decisions"] == audit.decisions
        assert client.get("/routing/requests/nope").status_code == 404
        assert client.get("/routing/requests/q%00x").status_code == 422  # PostgreSQL text cannot hold NUL
        assert client.get("/routing/decisions", params={"model": "a\x00"}).status_code == 422


def test_projection_does_not_depend_on_the_order_records_arrive_in(
    settings: Settings, serde: AvroSerde, pg_url: str, create_topic: Callable, unique_name: Callable
) -> None:
    """The same decisions and outcomes produced in another order (outcomes before their decisions,
    shuffled across partitions) give the same tables, row for row."""
    decisions, outcomes = _history()
    drecs, orecs = _records(decisions, outcomes)
    s = _db(settings, pg_url)
    schemas = []
    for n, shuffle in enumerate((False, True)):
        dec_topic = create_topic(unique_name("decisions"), 3)
        out_topic = create_topic(unique_name("outcomes"), 1 if shuffle else 3)
        d, o = list(drecs), list(orecs)
        if shuffle:
            random.Random(7).shuffle(d)
            random.Random(8).shuffle(o)
            _produce(s, out_topic, o)
            _produce(s, dec_topic, d)
        else:
            _produce(s, dec_topic, d)
            _produce(s, out_topic, o)
        schema = schema_name("routing", f"order{n}")
        projection = RoutingProjection(decisions_topic=dec_topic, outcomes_topic=out_topic)
        ProjectionRunner(s, serde, projection, group_id=unique_name("g"), schema=schema, batch_size=4).run(
            until_caught_up=True, max_wait_seconds=120
        )
        schemas.append(schema)
    first, second = (_dump(pg_url, sc) for sc in schemas)
    assert len(first["routing_decisions"]) == len(decisions) and first == second
    with psycopg.connect(pg_url) as c:
        assert routing.model_stats(c, schema=schemas[0]) == routing.model_stats(c, schema=schemas[1])


def _project_until(s: Settings, serde: AvroSerde, projection: RoutingProjection, group: str, dlq: str,
                   check: Callable[[psycopg.Connection], bool], proc: subprocess.Popen, timeout: float = 90) -> None:  # fmt: skip
    """Run the projection until caught up, again and again, until ``check`` holds on the database."""
    deadline = time.monotonic() + timeout
    while True:
        with ProjectionRunner(s, serde, projection, group_id=group, dlq_topic=dlq) as runner:
            runner.run(until_caught_up=True, max_wait_seconds=60)
        with psycopg.connect(s.postgres.dsn()) as c:
            if check(c):
                return
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"not projected in time; worker log: {proc.communicate()[1][-3000:]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_the_policy_workers_own_decisions_projected_and_audited(
    settings: Settings,
    serde: AvroSerde,
    pg_url: str,
    create_topic: Callable,
    unique_name: Callable,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The policy worker (``backbone routing policy-worker``, a subprocess) decides three requests, takes a
    fallback after a failed outcome; the projection of its topics holds its decisions, and
    ``backbone audit request:q1 --json`` shows the first decision, the fallback (the failed model refused
    as already tried) and both outcomes."""
    from configuration.store import ConfigStore

    t = {
        n: create_topic(unique_name(n), p)
        for n, p in (("req", 3), ("out", 3), ("cfg", 1), ("dec", 3), ("dlq", 1))
    }
    s = _db(settings, pg_url)
    with ConfigStore(s) as store:
        version = store.set("routing.config", CONFIG, author="test", reason="routing projection").version
    env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
           "BACKBONE_POSTGRES__URL": pg_url, "BACKBONE_REDIS__URL": "", "BACKBONE_STATE_DIR": str(tmp_path),
           "BACKBONE_LOG_FORMAT": "json"}  # fmt: skip
    code = "import sys; from backbone.cli.routing_policy import app; app(sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "policy-worker", "--app-id", unique_name("policy"), "--requests-topic", t["req"],
         "--outcomes-topic", t["out"], "--config-topic", t["cfg"], "--decisions-topic", t["dec"],
         "--dlq-topic", t["dlq"], "--stop-after-idle", "15", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    projection = RoutingProjection(decisions_topic=t["dec"], outcomes_topic=t["out"])
    group, dlq = unique_name("g"), create_topic(unique_name("pdlq"), 1)

    def count(sql: str) -> Callable[[psycopg.Connection], bool]:
        return lambda c: (
            c.execute("SELECT to_regclass('proj_routing.routing_decisions') IS NOT NULL").fetchone()[0]
            and bool(c.execute(sql).fetchone()[0])
        )

    try:
        reqs = [PolicyRequest(request_id=f"q{i}", requested_at=T0 + timedelta(seconds=i), prompt=f"Say hello {i}.")
                for i in range(1, 4)]  # fmt: skip
        _produce(s, t["req"], [(r.request_id.encode(), json.dumps(r.to_json()).encode()) for r in reqs])
        _project_until(s, serde, projection, group, dlq,
                       count("SELECT count(*) = 3 FROM proj_routing.routing_decisions"), proc)  # fmt: skip
        with psycopg.connect(pg_url) as c:
            first = routing.decisions(c, request_id="q1")[0]
        assert first["config_version"] == version and first["model"] and not first["fallback_from"]
        failed = Outcome(request_id="q1", model=first["model"], success=False, latency_ms=900.0, cost_usd=0.0,
                         occurred_at=T0 + timedelta(seconds=5))  # fmt: skip
        _produce(s, t["out"], [(b"q1", json.dumps(failed.to_json()).encode())])
        _project_until(s, serde, projection, group, dlq, count(
            "SELECT count(*) = 1 FROM proj_routing.routing_decisions WHERE cardinality(fallback_from) > 0"), proc)  # fmt: skip
        with psycopg.connect(pg_url) as c:
            fallback = next(d for d in routing.decisions(c, request_id="q1") if d["fallback_from"])
        ok = Outcome(request_id="q1", model=fallback["model"], success=True, latency_ms=120.0, cost_usd=0.001,
                     occurred_at=T0 + timedelta(seconds=6))  # fmt: skip
        _produce(s, t["out"], [(b"q1", json.dumps(ok.to_json()).encode())])
        _project_until(s, serde, projection, group, dlq,
                       count("SELECT count(*) = 2 FROM proj_routing.routing_outcomes"), proc)  # fmt: skip
        proc.send_signal(signal.SIGTERM)  # all is decided: its clean stop, as --stop-after-idle's
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
        worker = json.loads(stdout[stdout.find("{") :])
        assert (worker["decisions_count"], worker["fallbacks_count"]) == (4, 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    from typer.testing import CliRunner

    from backbone.cli import mounted_app
    from core.settings import get_settings

    app = mounted_app()
    monkeypatch.setenv("BACKBONE_POSTGRES__URL", pg_url)
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, ["audit", "request:q1", "--json"])
    finally:
        get_settings.cache_clear()
        import structlog

        structlog.reset_defaults()
    assert res.exit_code == 0, res.output
    audit = json.loads(res.output)
    assert [d["decision_id"] for d in audit["decisions"]] == [first["decision_id"], fallback["decision_id"]]
    assert audit["decisions"][1]["fallback_from"] == [first["model"]] and audit["decisions"][1]["fallback"]
    tried = next(c for c in audit["decisions"][1]["candidates"] if c["model"] == first["model"])
    assert not tried["eligible"] and "already tried and failed" in tried["reasons"]
    assert all(d["config_version"] == version and d["learner_version"] == "none" for d in audit["decisions"])
    assert [(o["model"], o["success"], o["decision_id"]) for o in audit["outcomes"]] == [
        (first["model"], False, first["decision_id"]), (fallback["model"], True, fallback["decision_id"])
    ]  # fmt: skip
