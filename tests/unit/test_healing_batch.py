"""The healer's batch path (``_HealingShell.handle_batch``, fed by :class:`processors.shell.BatchDelivery`), with
fake topics and a dict for the state table (no broker): the future that a batch's commit waits for is done only
once a written checkpoint holds every one of its records (offsets stored with the state at least theirs), the
decisions are those of the per-record path in the same order, records the state already holds are skipped; and
``BatchDelivery(interleave=True)`` hands a fetch's records in the order Faust's scheduler gives an agent."""

from __future__ import annotations

import asyncio
import json
import zlib
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from faust.transport.utils import DefaultSchedulingStrategy
from faust.types import TP

from configuration.schemas import HealingThresholds
from core.settings import Settings
from processors.healing.app import STATE_KEY, HealingTopics, _HealingShell
from processors.healing.healer import Healer, HealingConfig
from processors.shell import BatchDelivery
from streams.envelope import Event
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde
from tests.fakes.faust_topic import AckedTopic

T0 = datetime(2025, 11, 18, 23, 45, tzinfo=UTC)


def _record(serde: AvroSerde, s: int, ok: bool) -> SimpleNamespace:
    data = {"run_id": "run-1", "step": s + 1, "event_time": T0 + timedelta(seconds=s), "model": "gemini-3-pro",
            "provider": "batch-test", "response_id": None, "prompt_tokens": 100, "completion_tokens": 10,
            "cached_tokens": 0, "reasoning_tokens": 0, "cost_usd": 0.001, "finish_reason": "stop" if ok else None,
            "latency_ms": 900, "outcome": "ok" if ok else "server_error", "error_kind": None if ok else "server_error",
            "http_status": None if ok else 503, "request_id": f"q-{s}", "attempt": 1, "agent": None}  # fmt: skip
    event = Event.create(
        "sophia.agent.LlmCall", "run-1", data, source="/test", time=data["event_time"], id=f"c-{s}"
    )
    return SimpleNamespace(headers=event.attributes.to_headers(), value=serde.encode(event.schema, event.data),
                           key=b"run-1", topic="agent.events", partition=0, offset=s)  # fmt: skip


def _shell(serde: AvroSerde, topic: AckedTopic, table: dict[str, Any] | None) -> _HealingShell:
    thresholds = HealingThresholds(consecutive_failures=2, open_seconds=20, half_open_successes=1)
    return _HealingShell(Settings(), HealingTopics(), serde, Healer(HealingConfig(thresholds, 1)), None, topic,  # type: ignore[arg-type]
                         None, None, table)  # fmt: skip


def _stored_offsets(table: dict[str, Any]) -> dict[str, int]:
    return json.loads(zlib.decompress(table[STATE_KEY]))["offsets"]  # type: ignore[no-any-return]


def test_a_batch_is_committable_only_once_a_written_checkpoint_holds_it() -> None:
    serde = AvroSerde(EmbeddedRegistry())
    records = [_record(serde, s, ok=s % 5 not in (1, 2)) for s in range(12)]
    table: dict[str, Any] = {}
    batched_topic, alone_topic = AckedTopic(), AckedTopic()
    batched, alone = _shell(serde, batched_topic, table), _shell(serde, alone_topic, None)
    batched.checkpoints.every_records, batched.checkpoints.every_seconds = 5, 3600.0

    async def run() -> None:
        first = await batched.handle_batch(records[0:3])
        assert first is not None and not first.done() and STATE_KEY not in table  # 3 of 5: no checkpoint yet
        assert batched.offsets == {"agent.events:0": 2}  # in the state in memory, not written
        second = await batched.handle_batch(records[3:6])  # 6 held: the checkpoint is written
        assert second is first and first.done() and _stored_offsets(table) == {"agent.events:0": 5}
        third = await batched.handle_batch(records[6:8])
        assert third is not None and not third.done() and _stored_offsets(table) == {"agent.events:0": 5}
        async with batched.lock:  # the timer's checkpoint
            batched.checkpoints.checkpoint()
        assert third.done() and _stored_offsets(table) == {"agent.events:0": 7}
        assert await batched.handle_batch(records[4:8]) is None  # held by the state already: skipped
        fourth = await batched.handle_batch(records[8:12])
        assert fourth is not None and not fourth.done()
        batched.checkpoints.checkpoint()  # BatchDelivery's flush before a revocation or stop
        assert fourth.done() and _stored_offsets(table) == {"agent.events:0": 11}
        for r in records:
            await alone.handle(r)

    asyncio.run(run())
    assert batched.stats.replayed_count == 4 and batched.stats.state_writes_count == 3
    assert batched_topic.sent and [kw["headers"] for kw in batched_topic.sent] == [
        kw["headers"] for kw in alone_topic.sent
    ]
    assert batched.stats.decisions_count == alone.stats.decisions_count


def test_interleaved_delivery_hands_a_fetch_in_the_order_of_fausts_scheduler() -> None:
    subscribed: list[Any] = []
    app = SimpleNamespace(
        batch_deliveries={}, topics=SimpleNamespace(add=subscribed.append), task=lambda _: None
    )
    delivery = BatchDelivery(app, SimpleNamespace(topics=("ev", "cfg")), None, interleave=True)  # type: ignore[arg-type]
    ev0, ev1, cfg = TP("ev", 0), TP("ev", 1), TP("cfg", 0)
    fetch = {ev0: [SimpleNamespace(topic="ev", partition=0, offset=o) for o in range(4)],
             ev1: [SimpleNamespace(topic="ev", partition=1, offset=o) for o in range(2)],
             cfg: [SimpleNamespace(topic="cfg", partition=0, offset=o) for o in range(2)]}  # fmt: skip
    scheduler = DefaultSchedulingStrategy()
    expected = [(tp.topic, tp.partition, r.offset) for tp, r in scheduler.iterate(fetch)]
    delivery.put_interleaved(fetch, scheduler)
    delivery.put_interleaved(
        {ev0: [*fetch[ev0][2:], SimpleNamespace(topic="ev", partition=0, offset=4)]}, scheduler
    )
    records, upto = delivery._take()
    got = [(r.topic, r.partition, r.offset) for r in records]
    assert got == [*expected, ("ev", 0, 4)]  # the second fetch's records below the expected offset dropped
    assert got[:3] == [("ev", 0, 0), ("cfg", 0, 0), ("ev", 1, 0)]  # round robin: topics, then partitions
    assert upto == {ev0: 5, ev1: 2, cfg: 2} and delivery.buffered == 0
    assert len(subscribed) == 1 and app.batch_deliveries == {"ev": delivery, "cfg": delivery}
