"""The healer's state survives a restart (real Tansu, PostgreSQL, Redis; workers are separate processes).

Each test runs the worker of ``backbone processors heal`` as a subprocess (as it runs in deployment), stops
it (idle stop: SIGTERM, or SIGKILL for the crash), starts a new one with the same app id, and checks that
the new one goes on from the state of the old one (table ``healer_state``, changelog
``<app id>-healer_state-changelog``) and decides what one uninterrupted worker decides.
"""

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

import pytest
import redis
from pydantic import SecretStr

from configuration.store import ConfigStore
from core.settings import PostgresSettings, Settings
from processors.healing.read_model import HealingReadModel
from streams.consumer import ConsumedEvent
from streams.envelope import Event
from streams.offsets import end_offsets
from streams.producer import EventProducer
from streams.replay import read_range
from streams.serde import serde_from_settings

pytestmark = pytest.mark.integration

T0 = datetime(2025, 11, 18, 23, 45, tzinfo=UTC)
THRESHOLDS = {"consecutive_failures": 5, "open_seconds": 20, "rollback_window_seconds": 25, "rollback_min_calls": 10,
              "rollback_alpha": 0.05, "rollback_max_per_hour": 1}  # fmt: skip
HEAL = "import sys; from backbone.cli.healing import heal_app; heal_app(sys.argv[1:])"
HEALING = "import sys; from backbone.cli.healing import app; app(sys.argv[1:])"


def _call(
    s: float, ok: bool, provider: str = "google", error_kind: str = "server_error", request: str = ""
) -> Event:
    data = {"run_id": "run-1", "step": int(s) + 1, "event_time": T0 + timedelta(seconds=s), "model": "gemini-3-pro",
            "provider": provider, "response_id": None, "prompt_tokens": 100, "completion_tokens": 10, "cached_tokens": 0,
            "reasoning_tokens": 0, "cost_usd": 0.001, "finish_reason": "stop" if ok else None, "latency_ms": 900,
            "outcome": "ok" if ok else error_kind, "error_kind": None if ok else error_kind,
            "http_status": None if ok else 503, "request_id": request or f"q-{provider}-{s}", "attempt": 1, "agent": None}  # fmt: skip
    return Event.create(
        "sophia.agent.LlmCall",
        "run-1",
        data,
        source="/test",
        time=data["event_time"],
        id=f"call-{provider}-{s}",
    )


def _change(v: Any, at: datetime) -> Event:
    data = {"key": v.key, "version": v.version, "change": v.change, "value_json": json.dumps(v.value), "author": v.author,
            "reason": v.reason, "changed_at": at, "schema_name": v.schema_name, "restored_version": None,
            "rolled_back_from_version": None, "causation_id": None, "aggregate_id": "00000000-0000-0000-0000-000000000001",
            "notification_id": v.version}  # fmt: skip
    return Event.create("sophia.config.ConfigChange", v.key, data, source="/test", time=at, id=v.event_id)


def _env(settings: Settings, pg_url: str, state_dir: Path) -> dict[str, str]:
    return {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
            "BACKBONE_POSTGRES__URL": pg_url, "BACKBONE_REDIS__URL": settings.redis.dsn(),
            "BACKBONE_STATE_DIR": str(state_dir), "BACKBONE_LOG_FORMAT": "json"}  # fmt: skip


def _args(app_id: str, topics: dict[str, str], idle: float, *extra: str) -> list[str]:
    return ["--app-id", app_id, "--events-topic", topics["events"], "--config-topic", topics["config"],
            "--decisions-topic", topics["decisions"], "--acks-topic", topics["acks"], "--dlq-topic", topics["dlq"],
            "--thresholds", json.dumps(THRESHOLDS), "--stop-after-idle", str(idle), "--json", *extra]  # fmt: skip


def _worker(
    settings: Settings, pg_url: str, state_dir: Path, app_id: str, topics: dict[str, str], *extra: str
) -> dict[str, Any]:
    """Run a worker until it has been idle for 3 s; its JSON summary."""
    run = subprocess.run([sys.executable, "-c", HEAL, *_args(app_id, topics, 3, *extra)],
                         env=_env(settings, pg_url, state_dir), capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-2000:]
    summary: dict[str, Any] = json.loads(run.stdout)
    return summary


def _decisions(settings: Settings, topic: str) -> list[dict[str, Any]]:
    serde = serde_from_settings(settings)
    return [
        r.data
        for r in read_range(settings.kafka, serde, topic, idle_timeout_seconds=5)
        if isinstance(r, ConsumedEvent)
    ]


def _checkpointed(settings: Settings, app_id: str) -> bool:
    """Whether the worker ``app_id`` wrote a checkpoint (a record in its ``healer_state`` changelog)."""
    try:
        ends = end_offsets(settings.kafka, f"{app_id}-healer_state-changelog", timeout_seconds=5.0)
    except KeyError:  # not created yet
        return False
    return sum(ends.values()) > 0


def _first_seen(decisions: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(id, kind)`` in order, each id once (a re-emit after a crash is a duplicate with the same id)."""
    seen: dict[str, str] = {}
    for d in decisions:
        seen.setdefault(d["id"], d["kind"])
    return list(seen.items())


def _topics(create_topic: Any, unique_name: Any) -> dict[str, str]:
    return {n: create_topic(unique_name(n), 1) for n in ("events", "config", "decisions", "acks", "dlq")}


def _produce(settings: Settings, topic: str, events: list[Event]) -> None:
    with EventProducer(settings.kafka, serde_from_settings(settings)) as p:
        for e in events:
            p.produce(topic, e)
        p.flush()


def test_open_circuit_and_escalation_survive_restarts_and_decisions_equal_an_uninterrupted_run(
    settings: Settings, pg_url: str, redis_url: str, create_topic: Any, unique_name: Any, tmp_path: Path
) -> None:
    """Worker 1 opens the google circuit and escalates a request; worker 2 (same app id) finds the circuit
    still open and closes it by the half-open probe; a person acks the escalation; worker 3 matches it."""
    settings = settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(pg_url))})
    topics = _topics(create_topic, unique_name)
    app_id = unique_name("heal")
    phase1 = [_call(float(s), ok=not 30 <= s < 41) for s in range(0, 41)]
    phase1.insert(10, _call(9.5, ok=False, provider="studio", error_kind="auth", request="q-auth"))
    _produce(settings, topics["events"], phase1)
    first = _worker(settings, pg_url, tmp_path, app_id, topics)
    assert first["state_restored"] is False and first["records"] == 42
    model = HealingReadModel(pg_url, redis.Redis.from_url(redis_url))
    assert model.circuit_state("provider:google") == "open"
    [escalation] = [r for r in model.audit("request:q-auth") if r["kind"] == "escalation"]

    # worker 2: no failure any more; only the restored state knows the circuit is open
    _produce(settings, topics["events"], [_call(float(s), ok=True) for s in range(41, 81)])
    second = _worker(settings, pg_url, tmp_path, app_id, topics)
    assert second["state_restored"] is True and second["records"] == 40 and second["replayed"] == 0
    trail = [(r["kind"], r["event_time"]) for r in model.audit("circuit:provider:google")]
    assert trail == [
        ("circuit_opened", T0 + timedelta(seconds=34)),
        ("circuit_half_open", T0 + timedelta(seconds=54)),  # open_seconds after it opened
        ("circuit_closed", T0 + timedelta(seconds=54)),  # the probe at 54 s succeeded
    ], trail
    assert model.circuit_state("provider:google") == "closed"
    before_ack = _decisions(settings, topics["decisions"])

    # a person acks the escalation raised by worker 1; worker 3 matches it
    ack = subprocess.run([sys.executable, "-c", HEALING, "ack", escalation["id"], "--by", "ana", "--note", "on it",
                          "--acks-topic", topics["acks"], "--json"],
                         env=_env(settings, pg_url, tmp_path), capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert ack.returncode == 0, ack.stderr[-3000:]
    third = _worker(settings, pg_url, tmp_path, app_id, topics)
    assert third["state_restored"] is True and third["records"] == 1
    after = _decisions(settings, topics["decisions"])[len(before_ack) :]
    assert [d["kind"] for d in after if d["kind"] in ("escalation_acked", "ack_unmatched")] == [
        "escalation_acked"
    ]
    assert [d["causation_id"] for d in after if d["kind"] == "escalation_acked"] == [escalation["id"]]

    # one uninterrupted worker on the same agent events decides exactly what workers 1 and 2 decided
    alone = {**topics, "decisions": create_topic(unique_name("decisions-alone"), 1),
             "acks": create_topic(unique_name("acks-alone"), 1)}  # fmt: skip
    _worker(settings, pg_url, tmp_path, unique_name("heal-alone"), alone, "--no-rollback")
    assert [(d["id"], d["kind"]) for d in _decisions(settings, alone["decisions"])] == [
        (d["id"], d["kind"]) for d in before_ack
    ]


def test_a_worker_killed_mid_stream_is_replaced_without_lost_or_changed_decisions(
    settings: Settings, pg_url: str, redis_url: str, create_topic: Any, unique_name: Any, tmp_path: Path
) -> None:
    """SIGKILL while records are being handled (no clean shutdown, no final commit): the next worker
    re-reads from the committed offset, skips what its restored state already holds and re-emits at most
    decisions with the same ids; de-duplicated by id, the decisions are those of an uninterrupted run."""
    settings = settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(pg_url))})
    topics = _topics(create_topic, unique_name)
    events = []
    for s in range(0, 1500):
        down = 300 <= s % 500 < 330  # three outages of google
        events.append(_call(float(s), ok=not down))
        events.append(_call(s + 0.5, ok=s % 7 != 0, provider="studio", error_kind="rate_limited"))
    _produce(settings, topics["events"], events)
    app_id = unique_name("heal")
    worker = subprocess.Popen([sys.executable, "-c", HEAL, *_args(app_id, topics, 30)],
                              env=_env(settings, pg_url, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    model = HealingReadModel(pg_url, redis.Redis.from_url(redis_url))
    model.ensure_schema()  # the worker makes it too, at its start
    try:
        deadline = time.monotonic() + 90
        # mid-stream, after the first outage was decided and after the first checkpoint (every 1,000
        # records), so that the replacement has a state to restore: a batch's decisions are projected
        # before its checkpoint, so the outage alone can be seen while nothing is checkpointed yet
        while not (
            any(r["kind"] == "circuit_closed" for r in model.audit("circuit:provider:google"))
            and _checkpointed(settings, app_id)
        ):
            assert worker.poll() is None, worker.stderr.read()[-3000:] if worker.stderr else ""
            assert time.monotonic() < deadline, "the first outage was not handled and checkpointed"
            time.sleep(0.2)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    killed_at = len(_decisions(settings, topics["decisions"]))
    summary = _worker(settings, pg_url, tmp_path, app_id, topics)
    assert summary["state_restored"] is True
    restarted = _decisions(settings, topics["decisions"])
    assert killed_at < len(restarted)  # the kill came before the end of the input

    alone = {**topics, "decisions": create_topic(unique_name("decisions-alone"), 1)}
    _worker(settings, pg_url, tmp_path, unique_name("heal-alone"), alone)
    uninterrupted = [(d["id"], d["kind"]) for d in _decisions(settings, alone["decisions"])]
    assert len({k for _, k in uninterrupted} & {"circuit_opened", "circuit_closed", "retry_scheduled"}) == 3
    assert _first_seen(restarted) == uninterrupted
    duplicates = len(restarted) - len(uninterrupted)
    print(
        f"killed after {killed_at} decisions; re-emitted {duplicates}; replayed {summary['replayed']} records"
    )


def test_rollback_guardrails_hold_across_a_restart(
    settings: Settings, pg_url: str, redis_url: str, create_topic: Any, unique_name: Any, tmp_path: Path
) -> None:
    """Worker 1 rolls back a bad change of providers.google. After a restart, the same change delivered
    again (the outbox relay is at least once) is not evaluated again, and a bad change of providers.studio
    within the hour is suppressed by the per-hour limit (rollback_max_per_hour=1) the restored state recalls."""
    settings = settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(pg_url))})
    topics = _topics(create_topic, unique_name)
    store = ConfigStore(settings)
    try:
        g1 = store.set("providers.google", {"requests_per_minute": 600}, author="ana", reason="initial")
        g2 = store.set(
            "providers.google", {"requests_per_minute": 6000}, author="ana", reason="raise the limit"
        )
        s1 = store.set("providers.studio", {"requests_per_minute": 600}, author="ana", reason="initial")
        s2 = store.set(
            "providers.studio", {"requests_per_minute": 6000}, author="ana", reason="raise the limit"
        )
    finally:
        store.close()
    _produce(settings, topics["config"], [_change(g1, T0 - timedelta(hours=1)), _change(s1, T0 - timedelta(hours=1)),
                                           _change(g2, T0 + timedelta(seconds=29.5))])  # fmt: skip
    _produce(settings, topics["events"], [_call(float(s), ok=not 30 <= s < 50) for s in range(0, 121)])
    app_id = unique_name("heal")
    _worker(settings, pg_url, tmp_path, app_id, topics)
    model = HealingReadModel(pg_url, redis.Redis.from_url(redis_url))
    google = [r["kind"] for r in model.audit("config:providers.google")]
    assert google == ["rollback_not_needed", "rollback", "rollback_applied"], google

    # restart: the google change again, and a bad studio change 40 minutes later
    _produce(settings, topics["config"], [_change(g2, T0 + timedelta(seconds=29.5)),
                                           _change(s2, T0 + timedelta(minutes=40, seconds=29.5))])  # fmt: skip
    later = T0 + timedelta(minutes=40)
    _produce(settings, topics["events"], [_call((later - T0).total_seconds() + s, ok=not 30 <= s < 50, provider="studio")
                                          for s in range(0, 121)])  # fmt: skip
    second = _worker(settings, pg_url, tmp_path, app_id, topics)
    assert second["state_restored"] is True and second["rollbacks_done"] == 0
    assert [r["kind"] for r in model.audit("config:providers.google")] == google  # not evaluated again
    studio = model.audit("config:providers.studio")
    assert [r["kind"] for r in studio] == ["rollback_not_needed", "rollback_suppressed"], studio
    assert "1 rollbacks per hour" in studio[1]["details"]["reason"]
    store = ConfigStore(settings)
    try:
        assert (store.get("providers.google").version, store.get("providers.studio").version) == (3, 2)
    finally:
        store.close()


def test_inputs_with_several_partitions_share_the_one_state(
    settings: Settings, pg_url: str, redis_url: str, create_topic: Any, unique_name: Any, tmp_path: Path
) -> None:
    """As in deployment (agent.events has 6 partitions, config.changes 3): the one-partition state table
    takes writes whatever the input's partition (no co-partitioning error) and a restart restores it."""
    settings = settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(pg_url))})
    topics = {**_topics(create_topic, unique_name), "events": create_topic(unique_name("events6"), 6),
              "config": create_topic(unique_name("config3"), 3)}  # fmt: skip
    app_id = unique_name("heal")
    _produce(settings, topics["events"], [_call(float(s), ok=not 30 <= s < 41) for s in range(0, 41)])
    first = _worker(settings, pg_url, tmp_path, app_id, topics)
    assert first["records"] == 41 and first["state_writes"] >= 1
    _produce(settings, topics["events"], [_call(float(s), ok=True) for s in range(41, 81)])
    second = _worker(settings, pg_url, tmp_path, app_id, topics)
    assert second["state_restored"] is True and second["records"] == 40
    model = HealingReadModel(pg_url, redis.Redis.from_url(redis_url))
    assert [r["kind"] for r in model.audit("circuit:provider:google")] == [
        "circuit_opened",
        "circuit_half_open",
        "circuit_closed",
    ]
