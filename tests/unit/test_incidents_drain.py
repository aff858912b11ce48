"""The incident worker's input shell and a partition's end (fake topics and messages, no broker): a record
read while the consumer does not know the partition's fetch high watermark is not taken as the
partition's last (an unknown end once read as 0 made it "drained", letting the watermark pass records not
read yet); once the partition is known to be read to its end, one ``drained`` marker follows its records
on the merged topic, and the engine lets the partition turn idle."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from connectors.nezha import iter_day
from core.settings import Settings
from processors.incidents.app import IncidentTopics, _IncidentShell
from processors.incidents.incident import EngineConfig, IncidentEngine
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde
from tests.fakes.faust_topic import AckedTopic

SLICE = Path(__file__).resolve().parents[2] / "datasets" / "nezha"


async def _one(shell: _IncidentShell, message: SimpleNamespace) -> None:
    """``message`` forwarded alone: a batch of one, as BatchDelivery hands over a fetch that holds one record."""
    assert await shell.handle_records([message]) is None


def _bodies(merged: AckedTopic) -> list[dict[str, Any]]:
    """The merged bodies sent, in order (a batch's message is a JSON list of them, a timer's marker one body)."""
    values = [json.loads(sent["value"]) for sent in merged.sent]
    return [b for v in values for b in (v if isinstance(v, list) else [v])]


def test_an_unknown_high_watermark_is_not_the_end_and_a_marker_follows_once_it_is() -> None:
    serde = AvroSerde(EmbeddedRegistry())
    metrics = [e for t, e in itertools.islice(iter_day(SLICE), 400) if t == "telemetry.metrics"][:3]
    merged = AckedTopic()
    engine = IncidentEngine(EngineConfig())
    shell = _IncidentShell(
        Settings(), IncidentTopics(), serde, engine, {"merged": merged, "insights": AckedTopic()}
    )
    tp = ("telemetry.metrics", 0)
    highwater: dict[Any, int | None] = {tp: None}  # no fetch answered since the assignment
    shell.drains.highwater = highwater.get

    def message(offset: int) -> SimpleNamespace:
        e = metrics[offset]
        return SimpleNamespace(topic=tp[0], partition=tp[1], offset=offset, tp=tp, key=e.key.encode(),
                               headers=e.attributes.to_headers(), value=serde.encode(e.schema, e.data))  # fmt: skip

    async def run() -> None:
        await _one(shell, message(0))
        await shell.send_drain_markers()  # the end is still unknown: no marker
        highwater[tp] = 3  # a fetch answered: two records to come
        await shell.send_drain_markers()
        await _one(shell, message(1))
        await _one(shell, message(2))  # the last one, known as such: drained, no marker needed
        await shell.send_drain_markers()
        highwater[tp] = None  # a new assignment: offset 3 (produced since) is read while the end is unknown
        await _one(shell, _at(message(0), 3))
        highwater[tp] = 4  # now known: offset 3 was the last
        await shell.send_drain_markers()
        await shell.send_drain_markers()  # only once
        for sent in merged.sent:
            await shell.handle_merged(SimpleNamespace(value=sent["value"]))

    def _at(m: SimpleNamespace, offset: int) -> SimpleNamespace:
        return SimpleNamespace(**{**vars(m), "offset": offset})

    asyncio.run(run())
    bodies = _bodies(merged)
    assert [(b["kind"], b.get("drained")) for b in bodies] == [
        ("metric", False), ("metric", False), ("metric", True), ("metric", False), ("drained", None),
    ]  # fmt: skip
    assert bodies[-1]["source"] == "telemetry.metrics/0"
    assert shell.stats.drain_markers_count == 1
    assert "telemetry.metrics/0" in engine._drained


def test_a_partition_ending_in_a_skipped_change_is_told_drained() -> None:
    """A commit (a change, forwarded) then an issue comment (skipped) on one partition: the comment is
    the partition's last record, so a marker follows; otherwise the commit's partition would hold the
    watermark at the commit's time for good."""
    from datetime import UTC, datetime

    from streams.envelope import Event

    serde = AvroSerde(EmbeddedRegistry())
    merged = AckedTopic()
    engine = IncidentEngine(EngineConfig())
    shell = _IncidentShell(
        Settings(), IncidentTopics(), serde, engine, {"merged": merged, "insights": AckedTopic()}
    )
    tp = ("external.events", 0)
    shell.drains.highwater = {tp: 2}.get

    def external(offset: int, kind: str) -> SimpleNamespace:
        at = datetime(2023, 1, 29, 8, 41 + offset, tzinfo=UTC)
        data = {"platform": kind.split(".")[0], "kind": kind, "entity": "git:acme/shop@abc", "actor": "bob",
                "occurred_at": at, "url": None, "title": "shop: pool", "body_excerpt": None, "refs": [],
                "source_id": f"e{offset}"}  # fmt: skip
        e = Event.create(
            "sophia.external.ExternalEvent", data["entity"], data, source="/test", time=at, id=f"e{offset}"
        )
        return SimpleNamespace(topic=tp[0], partition=tp[1], offset=offset, tp=tp, key=b"k",
                               headers=e.attributes.to_headers(), value=serde.encode(e.schema, e.data))  # fmt: skip

    async def run() -> None:
        await _one(shell, external(0, "git.commit"))
        await _one(shell, external(1, "github.issue_comment.created"))
        await shell.send_drain_markers()  # nothing more: the marker was sent at once

    asyncio.run(run())
    bodies = _bodies(merged)
    assert [(b["kind"], b.get("drained")) for b in bodies] == [("change", False), ("drained", None)]
    assert shell.stats.changes_skipped_count == 1 and shell.stats.drain_markers_count == 1


def test_a_batch_from_the_fetch_is_drained_at_each_partitions_last_record() -> None:
    """Records as BatchDelivery hands them (aiokafka records: no Faust ``tp``), two partitions in one batch:
    only a partition's last record in the batch can be drained, and only when the consumer knows its end;
    a partition whose end is unknown gets its marker from the timer once the end is known."""
    serde = AvroSerde(EmbeddedRegistry())
    metrics = [e for t, e in itertools.islice(iter_day(SLICE), 400) if t == "telemetry.metrics"][:5]
    merged = AckedTopic()
    engine = IncidentEngine(EngineConfig())
    shell = _IncidentShell(
        Settings(), IncidentTopics(), serde, engine, {"merged": merged, "insights": AckedTopic()}
    )
    highwater: dict[Any, int | None] = {("telemetry.metrics", 0): 3, ("telemetry.metrics", 1): None}
    shell.drains.highwater = highwater.get

    def record(partition: int, offset: int, e: Any) -> SimpleNamespace:
        return SimpleNamespace(topic="telemetry.metrics", partition=partition, offset=offset, key=e.key.encode(),
                               headers=e.attributes.to_headers(), value=serde.encode(e.schema, e.data))  # fmt: skip

    batch = [record(0, 0, metrics[0]), record(0, 1, metrics[1]), record(0, 2, metrics[2]),
             record(1, 0, metrics[3]), record(1, 1, metrics[4])]  # fmt: skip

    async def run() -> None:
        assert await shell.handle_records(batch) is None  # nothing to wait for: handed to the producer
        await shell.send_drain_markers()  # partition 1's end is still unknown: no marker
        highwater[("telemetry.metrics", 1)] = 2
        await shell.send_drain_markers()
        await shell.send_drain_markers()  # only once

    asyncio.run(run())
    bodies = _bodies(merged)
    assert [(b["kind"], b["source"], b.get("drained")) for b in bodies] == [
        ("metric", "telemetry.metrics/0", False), ("metric", "telemetry.metrics/0", False),
        ("metric", "telemetry.metrics/0", True), ("metric", "telemetry.metrics/1", False),
        ("metric", "telemetry.metrics/1", False), ("drained", "telemetry.metrics/1", None),
    ]  # fmt: skip
    assert len(merged.sent) == 2  # the batch as one merged message, then the timer's marker
    assert shell.stats.forwarded_count == 5 and shell.stats.drain_markers_count == 1
