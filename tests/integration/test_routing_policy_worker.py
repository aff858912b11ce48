"""Integration test of the N-model policy router worker on the session's real Tansu, PostgreSQL and Redis.

The configuration goes through the real config store (schema-validated) and outbox relay to the
config-changes topic; circuit states are written to Redis hashes as the healer's projection would; the
worker runs as a subprocess (``backbone routing policy-worker``) and its history folder is replayed by
``simulate``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from configuration.errors import ConfigValueError
from configuration.relay import OutboxRelay
from configuration.store import ConfigStore
from core.settings import Settings
from processors.routing.policy import PolicyRequest, ab_arm, route, setup_from_config
from processors.routing.simulate import read_history, simulate
from streams.consumer import DLQ_TOPIC  # noqa: F401 - the production name the test topic stands for
from streams.offsets import end_offsets

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MODELS = {
    "big": {"provider": "openai", "capabilities": ["chat", "code"], "context_window_tokens": 128000,
            "usd_per_million_input_tokens": 10.0, "usd_per_million_output_tokens": 30.0},
    "small": {"provider": "mistral", "capabilities": ["chat"], "context_window_tokens": 32000,
              "usd_per_million_input_tokens": 0.6, "usd_per_million_output_tokens": 0.6},
    "tiny": {"provider": "mistral", "capabilities": ["chat"], "context_window_tokens": 8000,
             "usd_per_million_input_tokens": 0.1, "usd_per_million_output_tokens": 0.1},
}  # fmt: skip
V1 = {
    "providers": {"openai": {"requests_per_minute": 500}, "mistral": {"requests_per_minute": 500}},
    "models": MODELS,
    "policies": {"cheap": {"kind": "cheapest", "models": ["small", "tiny", "big"], "quality_target": 0.4},
                 "best": {"kind": "best_quality", "models": ["big", "small", "tiny"], "budget_usd": 0.5}},
    "default_policy": "cheap",
}  # fmt: skip
V2 = {**V1, "ab": {"policy_a": "cheap", "policy_b": "best", "weight_a": 0.5}}


def _produce(settings: Settings, topic: str, items: list[tuple[str, bytes]]) -> None:
    p = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})
    for key, value in items:
        p.produce(topic, key=key.encode(), value=value)
    assert p.flush(30) == 0


def _read(settings: Settings, topic: str) -> list[tuple[str, bytes]]:
    """Every record of ``topic`` up to its end offsets as read now (from the end-of-partition events: the
    broker's ``ListOffsets`` answer is a batch's base offset + 1 on Tansu, so a batch of several decisions
    read short; and with a fresh group id each time, so a slow machine gives late records, never a short
    read taken for the whole)."""
    ends = end_offsets(settings.kafka, topic)
    todo = {p for p, end in ends.items() if end > 0}
    c = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": f"read-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})  # fmt: skip
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(todo)])
        out, deadline = [], time.monotonic() + 30
        while todo and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            out.append(((m.key() or b"").decode(), m.value()))
            if m.offset() >= ends[m.partition()] - 1:
                todo.discard(m.partition())
        assert not todo, f"{topic}: partitions {sorted(todo)} not read to their ends in 30 s"
        return out
    finally:
        c.close()


def _decisions(settings: Settings, topic: str) -> list[dict]:
    return [json.loads(v) for _, v in _read(settings, topic)]


def _wait_for(
    settings: Settings,
    topic: str,
    check: Callable[[list[dict]], bool],
    proc: subprocess.Popen,
    timeout: float = 60,
) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ds = _decisions(settings, topic)
        if check(ds):
            return ds
        if proc.poll() is not None:
            # the worker may have stopped when idle after answering; read once more before failing
            ds = _decisions(settings, topic)
            if check(ds):
                return ds
            raise AssertionError(f"worker exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    got = [(d["request_id"], d["model"]) for d in _decisions(settings, topic)]
    raise AssertionError(f"timed out; decisions: {got}; worker log: {proc.stderr.read()[-3000:]}")


def _request(i: int, **kw: object) -> tuple[str, bytes]:
    req = PolicyRequest(
        request_id=f"q{i}",
        requested_at=T0 + timedelta(seconds=i),
        prompt=kw.pop("prompt", f"Say hello {i}."),
        **kw,
    )
    return req.request_id, json.dumps(req.to_json()).encode()


def test_policy_worker_decides_hot_reloads_falls_back_and_replays(
    settings: Settings,
    redis_url: str,
    create_topic: Callable[..., str],
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    t = {name: create_topic(unique_name(name), partitions=p)
         for name, p in (("req", 3), ("out", 3), ("cfg", 3), ("dec", 3), ("dlq", 1))}  # fmt: skip
    store = ConfigStore(settings)
    relay = OutboxRelay(settings, topic=t["cfg"], name=unique_name("relay"), batch_size=100)
    r = redis.Redis.from_url(redis_url)
    try:
        bad = {**V1, "policies": {**V1["policies"], "x": {"kind": "cheapest", "models": ["small", "gpt-9"]}}}
        with pytest.raises(ConfigValueError, match=r"policies\.x\.models\.1: unknown model 'gpt-9'"):
            store.set("routing.config", bad, author="test", reason="refused")
        v1 = store.set("routing.config", V1, author="test", reason="first").version
        while relay.run_once():
            pass
        history = tmp_path / "history"
        env = {
            **os.environ,
            "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
            "BACKBONE_POSTGRES__URL": settings.postgres.dsn(),
            "BACKBONE_REDIS__URL": redis_url,
            "BACKBONE_STATE_DIR": str(tmp_path),
            "BACKBONE_LOG_FORMAT": "json",
        }
        code = "import sys; from backbone.cli.routing_policy import app; app(sys.argv[1:])"
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "policy-worker", "--app-id", unique_name("policy"),
             "--requests-topic", t["req"], "--outcomes-topic", t["out"], "--config-topic", t["cfg"],
             "--decisions-topic", t["dec"], "--dlq-topic", t["dlq"], "--history-dir", str(history),
             "--stop-after-idle", "20", "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        # 1. four requests and one without prompt or reference
        _produce(settings, t["req"], [_request(i) for i in range(1, 5)])
        _produce(
            settings,
            t["req"],
            [("q-bad", json.dumps({"request_id": "q-bad", "requested_at": T0.isoformat()}).encode())],
        )
        ds = _wait_for(settings, t["dec"], lambda ds: len(ds) >= 4, proc)
        setup1 = setup_from_config(V1, v1)
        for d in ds:
            assert d["config_version"] == v1 and d["policy"] == "cheap" and d["learner_version"] == "none"
            i = int(d["request_id"][1:])
            want = route(setup1, PolicyRequest.from_json(json.loads(_request(i)[1])), {}, None)
            assert d == want.to_json()  # the worker's decision is the pure function's
        first_model = ds[0]["model"]
        # 2. the chosen model fails for q1: the fallback decision follows
        failed = next(d for d in ds if d["request_id"] == "q1")
        _produce(settings, t["out"], [("q1", json.dumps({"request_id": "q1", "model": failed["model"], "success": False,
                                                          "latency_ms": 900.0, "occurred_at": (T0 + timedelta(seconds=2)).isoformat()}).encode())])  # fmt: skip
        ds = _wait_for(settings, t["dec"], lambda ds: any(d["fallback_from"] for d in ds), proc)
        fb = next(d for d in ds if d["fallback_from"])
        assert (
            fb["request_id"] == "q1"
            and fb["fallback_from"] == [failed["model"]]
            and fb["model"] != failed["model"]
        )
        # 3. the healer opens small's circuit (its read model's hash); the policy changes to an A/B split (v2)
        r.hset(f"backbone:circuit:model:mistral/{first_model}", "state", "open")
        r.set("backbone:circuit:__ready__", "1")  # as the read model marks Redis once it holds its circuits
        v2 = store.set("routing.config", V2, author="test", reason="ab").version
        while relay.run_once():
            pass
        time.sleep(3)
        _produce(settings, t["req"], [_request(i) for i in range(5, 13)])
        ds = _wait_for(settings, t["dec"], lambda ds: len({d["request_id"] for d in ds}) >= 12, proc)
        later = [d for d in ds if int(d["request_id"][1:]) >= 5]
        for d in later:
            assert d["config_version"] == v2 and d["ab_arm"] == ab_arm(d["request_id"], 0.5)
            assert d["policy"] == ("cheap" if d["ab_arm"] == "a" else "best")
            assert d["model"] != first_model
            c = next(c for c in d["candidates"] if c["model"] == first_model)
            assert c["circuit_state"] == "open" and "circuit open" in c["reasons"]
        # 4. both providers' circuits open (each blocks all its models) and a capability nobody has: the
        # decision says why
        for p in ("openai", "mistral"):
            r.hset(f"backbone:circuit:provider:{p}", "state", "open")
        _produce(settings, t["req"], [_request(20, required_capabilities=("vision",))])
        ds = _wait_for(settings, t["dec"], lambda ds: any(d["request_id"] == "q20" for d in ds), proc)
        q20 = next(d for d in ds if d["request_id"] == "q20")
        assert (
            q20["model"] is None
            and q20["reason"].startswith("no model can serve")
            and "circuit open" in q20["reason"]
        )
        proc.send_signal(signal.SIGTERM)  # all is decided: its clean stop, as --stop-after-idle's
        stdout, stderr = proc.communicate(timeout=90)
        assert proc.returncode == 0, stderr[-3000:]
        stats = json.loads(stdout[stdout.find("{") :])
        assert (
            stats["dead_letters_count"] == 1
            and stats["fallbacks_count"] == 1
            and stats["unservable_count"] == 1
        )
        dlq = _read(settings, t["dlq"])
        assert len(dlq) == 1
        # 5. the history replays to the very same decisions with the live rule
        report = simulate(read_history(history), "cheap")
        assert report["identical"] and report["mismatches"] == 0 and report["live"]["requests"] == 13
    finally:
        for key in [
            *r.scan_iter("backbone:circuit:model:mistral/*"),
            *r.scan_iter("backbone:circuit:provider:*"),
        ]:
            r.delete(key)
        relay.close()
        store.close()
