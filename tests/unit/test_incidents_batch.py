"""The incident worker's batched hop (fake topics, no broker): a batch of input records becomes merged
messages that are JSON lists of bodies in the input order, split by size; each partition's last record in
the batch is ``drained`` when the consumer's high watermark says so as the batch is handled; the correlate
side unpacks lists (and single bodies, as written before batching) and feeds the engine the same records as
one message per record would."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from core.settings import Settings
from processors.incidents.app import IncidentTopics, _IncidentShell, pack_bodies
from processors.incidents.incident import EngineConfig, IncidentEngine
from streams.envelope import Event
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde
from tests.fakes.faust_topic import AckedTopic

T0 = datetime(2023, 1, 29, 8, 0, 9, tzinfo=UTC)


def _sample(pod: str, minute: int, cpu: float) -> Event:
    t = T0 + timedelta(minutes=minute)
    data = {"pod": pod, "service": pod.rsplit("-", 1)[0], "event_time": t,
            "metrics": {"CpuUsageRate(%)": cpu, "PodServerLatencyP90(s)": 0.02}}  # fmt: skip
    return Event.create("sophia.telemetry.MetricSample", pod, data, source="/test", time=t,
                        id=f"{pod}-{minute}")  # fmt: skip


def _record(serde: AvroSerde, e: Event, partition: int, offset: int) -> SimpleNamespace:
    """An input record as BatchDelivery hands it over (an aiokafka record's fields)."""
    return SimpleNamespace(headers=e.attributes.to_headers(), value=serde.encode(e.schema, e.data),
                           key=e.key.encode(), topic="telemetry.metrics", partition=partition,
                           offset=offset)  # fmt: skip


def _shell(merged: AckedTopic, insights: AckedTopic) -> _IncidentShell:
    serde = AvroSerde(EmbeddedRegistry())
    engine = IncidentEngine(EngineConfig(), sources=["telemetry.metrics/0", "telemetry.metrics/1"])
    return _IncidentShell(
        Settings(), IncidentTopics(), serde, engine, {"merged": merged, "insights": insights}
    )


def test_pack_bodies_keeps_the_order_and_splits_by_size() -> None:
    bodies = [{"i": i, "pad": "x" * 50} for i in range(40)]
    one = pack_bodies(bodies, 1_000_000)
    assert len(one) == 1 and one[0][1] == 40 and json.loads(one[0][0]) == bodies
    parts = pack_bodies(bodies, 700)
    assert all(len(p) <= 700 for p, _ in parts) and len(parts) > 1
    assert [b for p, _ in parts for b in json.loads(p)] == bodies
    assert sum(n for _, n in parts) == 40
    big = [{"pad": "y" * 2000}]
    assert pack_bodies(big, 700) == [(json.dumps(big, separators=(",", ":")).encode(), 1)]
    assert pack_bodies([], 700) == []


def test_a_batch_forwards_its_records_in_order_as_one_merged_message() -> None:
    merged, insights = AckedTopic(), AckedTopic()
    shell = _shell(merged, insights)
    serde = shell.serde
    highwater = {("telemetry.metrics", 0): 3, ("telemetry.metrics", 1): 2}
    shell.drains.highwater = lambda tp: highwater[tp]
    records = [_record(serde, _sample("a-1", m, 1.0 + m), 0, m) for m in range(3)]
    records += [_record(serde, _sample("b-1", m, 2.0 + m), 1, m) for m in range(2)]
    assert asyncio.run(shell.handle_records(records)) is None  # handed to the producer: nothing to wait for
    assert len(merged.sent) == 1 and merged.sent[0]["key"] == b"telemetry"
    bodies = json.loads(merged.sent[0]["value"])
    assert [(b["source"], b["record"]["event_id"], b["drained"]) for b in bodies] == [
        ("telemetry.metrics/0", "a-1-0", False), ("telemetry.metrics/0", "a-1-1", False),
        ("telemetry.metrics/0", "a-1-2", True), ("telemetry.metrics/1", "b-1-0", False),
        ("telemetry.metrics/1", "b-1-1", True),
    ]  # fmt: skip
    assert bodies[0]["record"]["event_time"] == int(T0.timestamp() * 1000)
    assert shell.stats.forwarded_count == 5 and shell.drains.pending == {}  # both partitions' ends known


def test_the_correlate_side_feeds_a_list_as_it_fed_one_message_per_record() -> None:
    bodies = []
    for m in range(40):
        for i, pod in enumerate(("a-1", "b-1", "c-1")):
            cpu = 95.0 if pod == "b-1" and 30 <= m < 33 else 2.0 + ((m * 7 + i * 3) % 10) / 10
            record = {"pod": pod, "service": pod.rsplit("-", 1)[0], "event_time": int((T0 + timedelta(minutes=m)).timestamp() * 1000),
                      "metrics": {"CpuUsageRate(%)": cpu, "PodServerLatencyP90(s)": 0.02}, "event_id": f"{pod}-{m}"}  # fmt: skip
            bodies.append(
                {"kind": "metric", "source": "telemetry.metrics/0", "drained": False, "record": record}
            )

    def run(messages: list[bytes]) -> tuple[list[Any], Any]:
        insights = AckedTopic()
        shell = _shell(AckedTopic(), insights)
        shell.engine = IncidentEngine(EngineConfig())

        async def feed() -> None:
            for value in messages:
                await shell.handle_merged(SimpleNamespace(value=value))

        asyncio.run(feed())
        return [(k["key"], k["value"]) for k in insights.sent], shell.stats

    one_by_one, stats1 = run([json.dumps(b).encode() for b in bodies])
    batched, stats2 = run([p for p, _ in pack_bodies(bodies, 4_000)])
    assert one_by_one and batched == one_by_one
    assert stats1.correlated_count == stats2.correlated_count == len(bodies)
    assert stats1.insights_count == stats2.insights_count == len(one_by_one)
