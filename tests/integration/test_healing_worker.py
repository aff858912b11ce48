"""The healer worker on real Tansu, PostgreSQL and Redis: breaker transitions, rollback, dead letters, replay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import structlog
from pydantic import SecretStr

from bench.common import realistic_events
from configuration.store import ConfigStore
from core.settings import PostgresSettings, Settings, get_settings
from processors.healing.read_model import HealingReadModel
from streams.consumer import ConsumedEvent
from streams.envelope import Event
from streams.producer import EventProducer
from streams.replay import read_range
from streams.serde import serde_from_settings

pytestmark = pytest.mark.integration

T0 = datetime(2025, 11, 18, 23, 45, tzinfo=UTC)
THRESHOLDS = {"consecutive_failures": 5, "open_seconds": 20, "rollback_window_seconds": 25, "rollback_min_calls": 10,
              "rollback_alpha": 0.05}  # fmt: skip


def _call(s: float, ok: bool) -> Event:
    data = {"run_id": "run-1", "step": int(s) + 1, "event_time": T0 + timedelta(seconds=s), "model": "gemini-3-pro",
            "provider": "google", "response_id": None, "prompt_tokens": 100, "completion_tokens": 10, "cached_tokens": 0,
            "reasoning_tokens": 0, "cost_usd": 0.001, "finish_reason": "stop" if ok else None, "latency_ms": 900,
            "outcome": "ok" if ok else "server_error", "error_kind": None if ok else "server_error",
            "http_status": None if ok else 503, "request_id": f"q-{s}", "attempt": 1, "agent": None}  # fmt: skip
    return Event.create(
        "sophia.agent.LlmCall", "run-1", data, source="/test", time=data["event_time"], id=f"call-{s}"
    )


def _change(v: Any, at: datetime) -> Event:
    data = {"key": v.key, "version": v.version, "change": v.change, "value_json": json.dumps(v.value), "author": v.author,
            "reason": v.reason, "changed_at": at, "schema_name": v.schema_name, "restored_version": None,
            "rolled_back_from_version": None, "causation_id": None, "aggregate_id": "00000000-0000-0000-0000-000000000001",
            "notification_id": v.version}  # fmt: skip
    return Event.create("sophia.config.ConfigChange", v.key, data, source="/test", time=at, id=v.event_id)


def _worker(
    settings: Settings, pg_url: str, state_dir: Path, app_id: str, topics: dict[str, str], *extra: str
) -> None:
    env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
           "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
           "BACKBONE_POSTGRES__URL": pg_url, "BACKBONE_REDIS__URL": settings.redis.dsn(),
           "BACKBONE_STATE_DIR": str(state_dir), "BACKBONE_LOG_FORMAT": "json"}  # fmt: skip
    args = ["--app-id", app_id, "--events-topic", topics["events"], "--config-topic", topics["config"],
            "--decisions-topic", topics["decisions"], "--dlq-topic", topics["dlq"], "--thresholds", json.dumps(THRESHOLDS),
            "--stop-after-idle", "3", *extra]  # fmt: skip
    code = "import sys; from backbone.cli.healing import heal_app; heal_app(sys.argv[1:])"
    run = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=90, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-2000:]


def _decisions(settings: Settings, topic: str) -> list[ConsumedEvent]:
    serde = serde_from_settings(settings)
    return [
        r
        for r in read_range(settings.kafka, serde, topic, idle_timeout_seconds=5)
        if isinstance(r, ConsumedEvent)
    ]


def test_outage_opens_and_closes_the_circuit_and_a_bad_change_is_rolled_back(
    settings: Settings, pg_url: str, redis_url: str, create_topic: Any, unique_name: Any, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(pg_url))})
    topics = {"events": create_topic(unique_name("events"), 1), "config": create_topic(unique_name("config"), 1),
              "decisions": create_topic(unique_name("decisions"), 1), "dlq": create_topic(unique_name("dlq"), 1)}  # fmt: skip
    store = ConfigStore(settings)
    try:
        v1 = store.set("providers.google", {"requests_per_minute": 600}, author="ana", reason="initial")
        v2 = store.set(
            "providers.google", {"requests_per_minute": 6000}, author="ana", reason="raise the limit"
        )
    finally:
        store.close()
    serde = serde_from_settings(settings)
    with EventProducer(settings.kafka, serde) as p:
        p.produce(topics["config"], _change(v1, T0 - timedelta(hours=1)))
        p.produce(topics["config"], _change(v2, T0 + timedelta(seconds=29.5)))
        p.flush()
    # the config events first, so the single agent sees them before the calls they precede in event time
    with EventProducer(settings.kafka, serde) as p:
        for s in range(0, 121):
            p.produce(topics["events"], _call(float(s), ok=not 30 <= s < 50))
        p.produce_raw(
            topics["events"], key=b"run-1", value=b"\x00\x00\x00\x00\x01 not avro", headers=[("ce_id", b"x")]
        )
        p.flush()

    _worker(settings, pg_url, tmp_path, unique_name("heal"), topics)

    model = HealingReadModel(pg_url, redis.Redis.from_url(redis_url))
    trail = [(r["kind"], r["event_time"]) for r in model.audit("circuit:provider:google")]
    assert [k for k, _ in trail] == ["circuit_opened", "circuit_half_open", "circuit_closed"]
    assert [t for _, t in trail] == [
        T0 + timedelta(seconds=34),
        T0 + timedelta(seconds=54),
        T0 + timedelta(seconds=54),
    ]
    assert model.circuit_state("provider:google") == "closed"
    config_trail = model.audit("config:providers.google")
    kinds = [r["kind"] for r in config_trail]
    assert kinds == ["rollback_not_needed", "rollback", "rollback_applied"], kinds  # v1: nothing to compare
    assert config_trail[0]["details"]["change_version"] == 1
    rollback = config_trail[1]
    assert rollback["causation_id"] == v2.event_id and rollback["details"]["to_version"] == 1
    assert rollback["details"]["evidence"]["metrics"]["error_rate"]["significant"]
    store = ConfigStore(settings)
    try:
        now = store.get("providers.google")
    finally:
        store.close()
    assert (now.version, now.restored_version, now.author, now.causation_id) == (
        3,
        1,
        "healer",
        rollback["id"],
    )
    dead = [
        r
        for r in read_range(settings.kafka, serde, topics["dlq"], idle_timeout_seconds=5)
        if isinstance(r, ConsumedEvent)
    ]
    assert len(dead) == 1
    first = [(r.data["id"], r.data["kind"]) for r in _decisions(settings, topics["decisions"])]
    with psycopg.connect(pg_url) as conn:
        projected = conn.execute("SELECT id, kind FROM proj_healing.decisions ORDER BY seq").fetchall()
    assert first == [tuple(r) for r in projected]  # every published decision is projected, in order

    # replay: a second worker (new group, new decisions topic, no rollbacks) decides the same things
    topics2 = {**topics, "decisions": create_topic(unique_name("decisions2"), 1)}
    _worker(settings, pg_url, tmp_path, unique_name("heal2"), topics2, "--no-rollback")
    second = [(r.data["id"], r.data["kind"]) for r in _decisions(settings, topics2["decisions"])]
    assert second == [d for d in first if d[1] != "rollback_applied"]


def test_approval_mode_waits_for_a_persons_ack_then_rolls_back(
    settings: Settings, pg_url: str, redis_url: str, create_topic: Any, unique_name: Any, tmp_path: Path
) -> None:
    """rollback_mode=approval: the bad change is escalated, not rolled back; ``backbone healing ack`` (a
    separate process, as a person would run it) publishes the ack on the acks topic, the running worker
    reads it and carries out the rollback, and the config key's audit shows change -> escalation -> ack
    -> rollback -> rollback applied, each caused by the one before."""
    settings = settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(pg_url))})
    topics = {
        name: create_topic(unique_name(name), 1) for name in ("events", "config", "decisions", "acks", "dlq")
    }
    key = f"providers.{unique_name('p')}"  # fresh key: the read model and the store are shared by tests
    store = ConfigStore(settings)
    try:
        v1 = store.set(key, {"requests_per_minute": 600}, author="ana", reason="initial")
        v2 = store.set(key, {"requests_per_minute": 6000}, author="ana", reason="raise the limit")
    finally:
        store.close()
    serde = serde_from_settings(settings)
    provider = key.removeprefix("providers.")
    with EventProducer(settings.kafka, serde) as p:
        p.produce(topics["config"], _change(v1, T0 - timedelta(hours=1)))
        p.produce(topics["config"], _change(v2, T0 + timedelta(seconds=29.5)))
    env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
           "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
           "BACKBONE_POSTGRES__URL": pg_url, "BACKBONE_REDIS__URL": redis_url,
           "BACKBONE_STATE_DIR": str(tmp_path), "BACKBONE_LOG_FORMAT": "json"}  # fmt: skip
    approval = json.dumps({**THRESHOLDS, "rollback_mode": "approval"})
    code = "import sys; from backbone.cli.healing import heal_app; heal_app(sys.argv[1:])"
    worker = subprocess.Popen(
        [sys.executable, "-c", code, "--app-id", unique_name("heal"), "--events-topic", topics["events"],
         "--config-topic", topics["config"], "--decisions-topic", topics["decisions"], "--acks-topic", topics["acks"],
         "--dlq-topic", topics["dlq"], "--thresholds", approval, "--stop-after-idle", "20", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with EventProducer(settings.kafka, serde) as p:
            for sec in range(0, 121):
                call = _call(float(sec), ok=not 30 <= sec < 50)
                call.data["provider"] = provider
                p.produce(topics["events"], call)
        model = HealingReadModel(pg_url, redis.Redis.from_url(redis_url))
        model.ensure_schema()  # the worker makes it too, at its start
        deadline = time.monotonic() + 90
        while not (esc := [r for r in model.audit(f"config:{key}") if r["kind"] == "escalation"]):
            assert worker.poll() is None, worker.stderr.read()[-3000:] if worker.stderr else ""
            assert time.monotonic() < deadline, "no escalation"
            time.sleep(0.5)
        [escalation] = esc
        assert escalation["causation_id"] == v2.event_id
        cli = "import sys; from backbone.cli.healing import app; app(sys.argv[1:])"
        ack = subprocess.run(
            [sys.executable, "-c", cli, "ack", escalation["id"], "--by", "ana", "--note", "roll it back",
             "--acks-topic", topics["acks"], "--json"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert ack.returncode == 0, ack.stderr[-3000:]
        ack_id = json.loads(ack.stdout)["id"]
        while not any(r["kind"] == "rollback_applied" for r in model.audit(f"config:{key}")):
            assert worker.poll() is None, worker.stderr.read()[-3000:] if worker.stderr else ""
            assert time.monotonic() < deadline + 90, "no rollback applied"
            time.sleep(0.5)
        worker.send_signal(signal.SIGTERM)  # all is done: its clean stop, as --stop-after-idle's
        stdout, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
    kinds = [(r["kind"], r["causation_id"]) for r in model.audit(f"config:{key}")]
    rollback = next(r for r in model.audit(f"config:{key}") if r["kind"] == "rollback")
    assert kinds == [
        ("rollback_not_needed", v1.event_id),
        ("escalation", v2.event_id),
        ("escalation_acked", escalation["id"]),
        ("rollback", escalation["id"]),
        ("rollback_applied", rollback["id"]),
    ], kinds
    assert json.loads(stdout)["rollbacks_done"] == 1
    on_topic = [r.data["id"] for r in _decisions(settings, topics["decisions"])]
    assert ack_id in on_topic  # the person's ack is on the decisions topic too: the audit replays
    store = ConfigStore(settings)
    try:
        now = store.get(key)
    finally:
        store.close()
    assert (now.version, now.restored_version, now.author, now.causation_id) == (
        3,
        1,
        "healer",
        rollback["id"],
    )


def test_status_ack_and_audit_commands(
    settings: Settings,
    pg_url: str,
    redis_url: str,
    create_topic: Any,
    unique_name: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """healing status / ack / audit on the read model in a real PostgreSQL and Redis; the ack is also
    published on the acks topic for the healer."""
    monkeypatch.setenv("BACKBONE_POSTGRES__URL", pg_url)
    monkeypatch.setenv("BACKBONE_REDIS__URL", redis_url)
    monkeypatch.setenv("BACKBONE_KAFKA__BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers)
    acks = create_topic(unique_name("acks"), 1)
    get_settings.cache_clear()
    try:
        ack_id = _cli_checks(pg_url, redis_url, acks)
        [published] = _decisions(settings, acks)
        assert published.data["id"] == ack_id and published.data["kind"] == "escalation_acked"
    finally:
        get_settings.cache_clear()
        structlog.reset_defaults()  # the CLI pointed logging at CliRunner's stream, closed by now


def _cli_checks(pg_url: str, redis_url: str, acks_topic: str) -> str:
    from typer.testing import CliRunner

    from backbone.cli.healing import app
    from processors.healing.decisions import Decision

    model = HealingReadModel(pg_url, redis.Redis.from_url(redis_url))
    model.ensure_schema()
    opened = Decision(
        kind="circuit_opened",
        subject="circuit:provider:Google",
        event_time=T0,
        config_version=2,
        details={"circuit": "provider:Google", "to_state": "open", "reason": "5 consecutive failures >= 5"},
    )
    esc = Decision(
        kind="escalation",
        subject="request:q-1",
        event_time=T0,
        config_version=2,
        details={"reason": "fallback chain exhausted", "tried": ["Google"]},
    )
    warn = Decision(kind="agent_warning", subject="run:r1", event_time=T0, config_version=2,
                    details={"run_id": "r1", "signal": "loop", "level": "warn", "step": 7})  # fmt: skip
    assert (
        model.apply([opened, esc, warn]) == 3 and model.apply([opened]) == 0
    )  # a replayed decision is a no-op
    assert model.circuit_state("provider:Google") == "open"  # from Redis
    assert redis.Redis.from_url(redis_url).hget("backbone:circuit:provider:Google", "state") == b"open"
    # the policy router reads this read model: the provider's open circuit blocks each of its models
    from processors.routing.policy_app import CircuitReader

    reader = CircuitReader(redis_url, max_age_seconds=0.5)
    states = reader.read({"gemini-2.5-pro": "Google", "gpt-4o": "OpenAI-test-absent"})
    assert states == {"gemini-2.5-pro": "open", "gpt-4o": "closed"}
    # a read is reused for max_age_seconds, then the read model is read again
    r = redis.Redis.from_url(redis_url)
    r.hset("backbone:circuit:provider:OpenAI-test-absent", "state", "open")
    try:
        assert reader.read({"gemini-2.5-pro": "Google", "gpt-4o": "OpenAI-test-absent"}) == states
        time.sleep(0.6)
        assert reader.read({"gemini-2.5-pro": "Google", "gpt-4o": "OpenAI-test-absent"})["gpt-4o"] == "open"
    finally:
        r.delete("backbone:circuit:provider:OpenAI-test-absent")
    # Redis gone: the router falls back to the read model's PostgreSQL table
    gone = CircuitReader("redis://127.0.0.1:1/0", pg_url=pg_url)
    assert gone.read({"gemini-2.5-pro": "Google", "gpt-4o": "OpenAI-test-absent"}) == states
    assert gone.fallback_reads == 1
    assert CircuitReader("redis://127.0.0.1:1/0").read({"gemini-2.5-pro": "Google"}) is None  # keep the last
    runner = CliRunner()
    status = runner.invoke(app, ["status", "--json"])
    assert status.exit_code == 0, status.output
    body = json.loads(status.output)
    assert [c["circuit"] for c in body["circuits"]] == ["provider:Google"] and body["escalations"][0][
        "id"
    ] == esc.id
    assert body["warnings"][0]["signal"] == "loop"
    ack = runner.invoke(
        app,
        [
            "ack",
            esc.id,
            "--by",
            "ana",
            "--note",
            "switching the agent to Studio",
            "--acks-topic",
            acks_topic,
            "--json",
        ],
    )
    assert ack.exit_code == 0, ack.output
    assert json.loads(ack.output)["causation_id"] == esc.id
    again = runner.invoke(app, ["ack", esc.id, "--by", "bob", "--note", "me too"])
    assert again.exit_code == 2 and "already acked by ana" in again.output
    assert runner.invoke(app, ["ack", "nope", "--by", "a", "--note", "b"]).exit_code == 2
    assert json.loads(runner.invoke(app, ["status", "--json"]).output)["escalations"] == []
    audit = json.loads(runner.invoke(app, ["audit", "request:q-1", "--json"]).output)
    assert [r["kind"] for r in audit] == ["escalation", "escalation_acked"]
    redis.Redis.from_url(redis_url).delete("backbone:circuit:__ready__")
    assert model.circuit_state("provider:Google") == "open"  # Redis not ready: PostgreSQL answers
    return str(json.loads(ack.output)["id"])


def test_read_model_writer_connection_survives_its_backend_being_killed(pg_url: str, redis_url: str) -> None:
    """The read model keeps one writer connection; when PostgreSQL drops it (a backend killed, a restart)
    the next ``apply`` connects again and writes, nothing lost."""
    from processors.healing.decisions import Decision

    model = HealingReadModel(pg_url, redis.Redis.from_url(redis_url))
    model.ensure_schema()
    t = datetime(2026, 3, 1, 12, tzinfo=UTC)

    def opened(i: int) -> Decision:
        return Decision(
            kind="circuit_opened", subject=f"circuit:model:p/m{i}", event_time=t + timedelta(seconds=i),
            config_version=0, details={"circuit": f"model:p/m{i}", "from_state": "closed", "to_state": "open"},
        )  # fmt: skip

    try:
        assert model.apply([opened(1)]) == 1
        writer = model._writer
        assert writer is not None
        pid = writer.info.backend_pid
        assert model.apply([opened(2)]) == 1 and model._writer is writer  # the same connection
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        assert model.apply([opened(3), opened(1)]) == 1  # reconnected; decision 1 again changes nothing
        assert model._writer is not None and model._writer.info.backend_pid != pid
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute(
                "SELECT circuit, state FROM proj_healing.circuits ORDER BY circuit"
            ).fetchall()
        assert rows == [("model:p/m1", "open"), ("model:p/m2", "open"), ("model:p/m3", "open")]
        assert redis.Redis.from_url(redis_url).hget("backbone:circuit:model:p/m3", "state") == b"open"
    finally:
        model.close()


def test_on_three_partitions_the_worker_decides_what_each_partition_s_records_decide_in_order(
    settings: Settings, pg_url: str, create_topic: Any, unique_name: Any, tmp_path: Path
) -> None:
    """The worker interleaves its input partitions as its fetches bring them; its decisions are those of a
    healer fed each partition whole, in turn (agent health per partition), and a second worker on the same
    input decides the same. With one watermark over all partitions the interleaving raised stall warnings
    that no partition's own records justified."""
    from configuration.schemas import HealingThresholds
    from processors.healing.healer import Healer, HealingConfig

    settings = settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(pg_url))})
    topics = {"events": create_topic(unique_name("events"), 3), "config": create_topic(unique_name("config"), 1),
              "decisions": create_topic(unique_name("decisions"), 1), "dlq": create_topic(unique_name("dlq"), 1)}  # fmt: skip
    serde = serde_from_settings(settings)
    with EventProducer(settings.kafka, serde) as p:
        for e in realistic_events(copies=2):  # the real runs twice, the second copy later in event time
            p.produce(topics["events"], e)
        p.flush()
    records = [r for r in read_range(settings.kafka, serde, topics["events"], idle_timeout_seconds=5)
               if isinstance(r, ConsumedEvent)]  # fmt: skip
    assert len({r.partition for r in records}) == 3
    healer = Healer(HealingConfig(HealingThresholds.model_validate(THRESHOLDS), 0))
    want: list[tuple[str, str]] = []
    for p in range(3):  # each partition whole, in turn
        key = f"{topics['events']}:{p}"
        for r in sorted((r for r in records if r.partition == p), key=lambda r: r.offset):
            event = {"schema": r.schema, "data": r.data, "id": r.attributes.id, "partition": key}
            want += [(d.id, d.kind) for d in healer.feed(event)]
    assert len(want) > 40 and {k for _, k in want} == {"agent_warning"}

    _worker(settings, pg_url, tmp_path, unique_name("heal"), topics, "--no-rollback")
    first = [(r.data["id"], r.data["kind"]) for r in _decisions(settings, topics["decisions"])]
    assert sorted(first) == sorted(want)
    topics2 = {**topics, "decisions": create_topic(unique_name("decisions2"), 1)}
    _worker(settings, pg_url, tmp_path, unique_name("heal2"), topics2, "--no-rollback")
    second = [(r.data["id"], r.data["kind"]) for r in _decisions(settings, topics2["decisions"])]
    assert sorted(second) == sorted(want)


def test_a_run_gone_quiet_on_a_partition_with_no_traffic_is_found_stalled_as_the_other_partition_moves(
    settings: Settings, pg_url: str, create_topic: Any, unique_name: Any, tmp_path: Path
) -> None:
    """Two partitions: run-quiet (partition 0) makes progress once and says nothing more; run-busy
    (partition 1) goes on for 25 minutes of event time. With ``--idle-partitions follow``, partition 0 is
    read to its end, so its run is judged on the time partition 1 brings: stalled at 10 and 20 minutes
    (stall_seconds 600). By default (``hold``) partition 0's time stays at its one record: no decision."""
    settings = settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(pg_url))})
    topics = {"events": create_topic(unique_name("events"), 2), "config": create_topic(unique_name("config"), 1),
              "decisions": create_topic(unique_name("decisions"), 1), "dlq": create_topic(unique_name("dlq"), 1)}  # fmt: skip

    def tool(run: str, s: float, step: int) -> Event:
        at = T0 + timedelta(seconds=s)
        data = {"run_id": run, "step": step, "event_time": at, "tool": "bash", "command": f"echo {step}",
                "return_code": 0, "output_bytes": 2, "timed_out": False}  # fmt: skip
        return Event.create("sophia.agent.ToolCall", run, data, source="/test", time=at, id=f"{run}-{step}")

    serde = serde_from_settings(settings)
    with EventProducer(settings.kafka, serde) as p:
        p.produce(topics["events"], tool("run-quiet", 0, 1))
        for i in range(51):
            p.produce(topics["events"], tool("run-busy", 30 * i, i + 1))
        p.flush()
    parts = {r.key: r.partition for r in read_range(settings.kafka, serde, topics["events"], idle_timeout_seconds=5)
             if isinstance(r, ConsumedEvent)}  # fmt: skip
    assert parts == {"run-quiet": 0, "run-busy": 1}
    _worker(settings, pg_url, tmp_path, unique_name("held"), topics, "--no-rollback")
    assert _decisions(settings, topics["decisions"]) == []
    _worker(
        settings,
        pg_url,
        tmp_path,
        unique_name("heal"),
        topics,
        "--no-rollback",
        "--idle-partitions",
        "follow",
    )
    stalls = [(r.data["subject"], r.data["event_time"], json.loads(r.data["details_json"])["level"])
              for r in _decisions(settings, topics["decisions"])]  # fmt: skip
    assert stalls == [
        ("run:run-quiet", T0 + timedelta(seconds=600), "warn"),
        ("run:run-quiet", T0 + timedelta(seconds=1200), "recommend_restart"),
    ]
