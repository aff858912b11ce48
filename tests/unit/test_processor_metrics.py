"""The healing and incident processors' Prometheus metrics, set by their Faust shells (fake topics, no broker):
``backbone_circuit_open{circuit}`` follows every breaker transition the healer decides, and
``backbone_incidents_opened_total{priority}`` counts each ``incident.opened`` insight sent."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from configuration.schemas import HealingThresholds
from core.observability import REGISTRY
from core.settings import Settings
from processors.healing.app import HealingTopics, _HealingShell
from processors.healing.healer import Healer, HealingConfig
from processors.incidents.app import IncidentTopics, _IncidentShell
from processors.incidents.incident import EngineConfig, IncidentEngine, priority
from processors.incidents.nezha_detect import Anomaly
from streams.envelope import Event
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde
from tests.fakes.faust_topic import AckedTopic

T0 = datetime(2025, 11, 18, 23, 45, tzinfo=UTC)


def _message(serde: AvroSerde, event: Event, offset: int) -> SimpleNamespace:
    return SimpleNamespace(headers=event.attributes.to_headers(), value=serde.encode(event.schema, event.data),
                           key=event.key.encode(), topic="agent.events", partition=0, offset=offset)  # fmt: skip


def _call(s: float, ok: bool) -> Event:
    data = {"run_id": "run-1", "step": int(s) + 1, "event_time": T0 + timedelta(seconds=s), "model": "gemini-3-pro",
            "provider": "metrics-test", "response_id": None, "prompt_tokens": 100, "completion_tokens": 10,
            "cached_tokens": 0, "reasoning_tokens": 0, "cost_usd": 0.001, "finish_reason": "stop" if ok else None,
            "latency_ms": 900, "outcome": "ok" if ok else "server_error", "error_kind": None if ok else "server_error",
            "http_status": None if ok else 503, "request_id": f"q-{s}", "attempt": 1, "agent": None}  # fmt: skip
    return Event.create(
        "sophia.agent.LlmCall", "run-1", data, source="/test", time=data["event_time"], id=f"c-{s}"
    )


def _circuit(key: str) -> float | None:
    return REGISTRY.get_sample_value("backbone_circuit_open", {"circuit": key})


def test_breaker_transitions_set_backbone_circuit_open() -> None:
    serde = AvroSerde(EmbeddedRegistry())
    thresholds = HealingThresholds(consecutive_failures=5, open_seconds=20, half_open_successes=1)
    topic = AckedTopic()
    shell = _HealingShell(Settings(), HealingTopics(), serde, Healer(HealingConfig(thresholds, 1)),
                          None, topic, None, None)  # type: ignore[arg-type]  # fmt: skip
    provider, model = "provider:metrics-test", "model:metrics-test/gemini-3-pro"
    states: list[tuple[float | None, float | None]] = []

    async def feed(seconds: range, ok: bool) -> None:
        for s in seconds:
            await shell.handle(_message(serde, _call(float(s), ok), s))
            states.append((_circuit(provider), _circuit(model)))

    asyncio.run(feed(range(0, 10), ok=True))
    assert states[-1] == (None, None)  # no transition yet: no series
    asyncio.run(feed(range(10, 15), ok=False))  # 5 failures in a row: both circuits open
    assert states[-2] == (None, None) and states[-1] == (1.0, 1.0)
    asyncio.run(feed(range(15, 30), ok=False))  # refused while open: still open
    assert states[-1] == (1.0, 1.0)
    assert len(topic.sent) >= 2  # the transitions were sent as decisions too
    asyncio.run(feed(range(40, 41), ok=True))  # cool-down over: half-open probe succeeds -> closed
    assert states[-1] == (0.0, 0.0)
    assert shell.healer.breakers.get(provider).state.value == "closed"


def test_a_half_open_circuit_reads_open() -> None:
    serde = AvroSerde(EmbeddedRegistry())
    thresholds = HealingThresholds(
        consecutive_failures=2, open_seconds=20, half_open_max_probes=2, half_open_successes=2
    )
    healer = Healer(HealingConfig(thresholds, 1))
    shell = _HealingShell(Settings(), HealingTopics(), serde, healer, None, AckedTopic(), None, None)  # type: ignore[arg-type]
    key = "provider:metrics-test"

    async def feed(s: int, ok: bool) -> None:
        await shell.handle(_message(serde, _call(float(s), ok), s))

    for s in (100, 101):
        asyncio.run(feed(s, ok=False))
    assert _circuit(key) == 1.0
    asyncio.run(feed(130, ok=True))  # cool-down over: half-open, 1 of 2 probes succeeded
    assert healer.breakers.get(key).state.value == "half_open" and _circuit(key) == 1.0
    asyncio.run(feed(131, ok=False))  # the probe failed: open again
    assert healer.breakers.get(key).state.value == "open" and _circuit(key) == 1.0


def _a(pod: str, score: float, signal: str = "metric:CpuUsageRate(%)") -> Anomaly:
    return Anomaly(pod, pod.rsplit("-", 1)[0], signal, 0, score, 1.0, 0.0)


def test_priority_is_derived_from_the_anomalies() -> None:
    c = EngineConfig()
    assert priority([_a("a-1", 7), _a("b-1", 7), _a("c-1", 7)], c) == "p1"
    assert priority([_a("a-1", 7), _a("b-1", 7), _a("frontend", 7)], c) == "p3"  # the frontend is no service
    assert priority([_a("a-1", 7), _a("a-2", 30)], c) == "p2"
    assert priority([_a("a-1", 7, "log:new_template")], c) == "p3"


def _metric(pod: str, minute: int, cpu: float) -> dict[str, Any]:
    t = datetime(2023, 1, 29, 8, 0, 9, tzinfo=UTC) + timedelta(minutes=minute)
    return {"pod": pod, "service": pod.rsplit("-", 1)[0], "event_time": int(t.timestamp() * 1000),
            "metrics": {"CpuUsageRate(%)": cpu, "PodServerLatencyP90(s)": 0.02}}  # fmt: skip


def test_an_opened_incident_increments_backbone_incidents_opened_total() -> None:
    engine = IncidentEngine(EngineConfig())
    insights = AckedTopic()
    shell = _IncidentShell(Settings(), IncidentTopics(), AvroSerde(EmbeddedRegistry()), engine,
                           {"merged": AckedTopic(), "insights": insights})  # fmt: skip

    def opened(p: str) -> float:
        return REGISTRY.get_sample_value("backbone_incidents_opened_total", {"priority": p}) or 0.0

    before = {p: opened(p) for p in ("p1", "p2", "p3")}

    async def feed() -> None:
        for m in range(40):
            for i, pod in enumerate(("a-1", "b-1", "c-1")):
                cpu = 95.0 if pod == "b-1" and 30 <= m < 33 else 2.0 + ((m * 7 + i * 3) % 10) / 10
                body = {"kind": "metric", "source": "telemetry.metrics/0", "drained": False,
                        "record": _metric(pod, m, cpu)}  # fmt: skip
                await shell.handle_merged(SimpleNamespace(value=json.dumps(body).encode()))

    asyncio.run(feed())
    sent = [k["key"] for k in insights.sent]
    assert any(k.startswith(b"incident:") for k in sent)
    # one incident opened (a CPU hog on one pod of one service, far above the strong threshold): p2
    assert {p: opened(p) - before[p] for p in before} == {"p1": 0.0, "p2": 1.0, "p3": 0.0}


def test_a_healer_batch_sends_at_once_and_holds_offsets_until_its_deliveries() -> None:
    """``_HealingShell.take`` decides a record and sends its decisions at once, without awaiting their
    delivery; only ``flush`` (the batch's end) awaits the deliveries, projects them and notes the records'
    offsets in the state, so a checkpoint can never hold (and ack) a record whose decisions are not on the
    broker. The decisions are those of one record at a time (same ids, same order)."""
    serde = AvroSerde(EmbeddedRegistry())
    thresholds = HealingThresholds(consecutive_failures=2, open_seconds=20, half_open_successes=1)

    class _SlowTopic(AckedTopic):
        """Deliveries acknowledged only when the test says so."""

        def __init__(self) -> None:
            super().__init__()
            self.futures: list[asyncio.Future[None]] = []

        async def send(self, **kw: Any) -> asyncio.Future[None]:
            self.sent.append(kw)
            self.futures.append(asyncio.get_running_loop().create_future())
            return self.futures[-1]

    topic = _SlowTopic()
    batched = _HealingShell(Settings(), HealingTopics(), serde, Healer(HealingConfig(thresholds, 1)),
                            None, topic, None, None)  # type: ignore[arg-type]  # fmt: skip
    alone_topic = AckedTopic()
    alone = _HealingShell(Settings(), HealingTopics(), serde, Healer(HealingConfig(thresholds, 1)),
                          None, alone_topic, None, None)  # type: ignore[arg-type]  # fmt: skip
    messages = [_message(serde, _call(float(s), ok=s % 4 != 1 and s % 4 != 2), s) for s in range(12)]

    async def run() -> None:
        for m in messages:
            await batched.take(m)
            await alone.handle(m)
        assert topic.sent and batched.offsets == {} and batched.stats.decisions_count == 0
        flushing = asyncio.ensure_future(batched.flush())
        await asyncio.sleep(0)
        assert not flushing.done() and batched.offsets == {}  # waits for the deliveries
        for f in topic.futures:
            f.set_result(None)
        await flushing

    asyncio.run(run())
    assert batched.offsets == {"agent.events:0": 11} == alone.offsets
    assert batched.stats.decisions_count == alone.stats.decisions_count == len(topic.sent)
    assert [kw["headers"] for kw in topic.sent] == [kw["headers"] for kw in alone_topic.sent]
    assert batched.stats.batches_count == 1 and alone.stats.batches_count == 12
