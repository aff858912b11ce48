"""The incident worker's state survives a SIGKILL (real Tansu; the workers are separate processes).

The Nezha slice (a quarter of the traces, and the replay test's changes) is produced up to a cut in event time; a
worker runs until its group has committed the merged topic to its end (and, for the first cut, the insights
expected by then are out), and is then SIGKILLed (no clean shutdown). The rest of the slice is produced and a
worker with the same app id runs until idle: it must go on from the state the first one checkpointed (table
``incident_state``), so that the de-duplicated insights (by ``insight_id``: kind, event time, candidates, suspect
changes) equal those of one uninterrupted worker (another app id) over the whole input. Two cuts:

* ``open-incident`` (09:02:30): after the first incident's three insights and the opening of a second one, which
  only the restored state can close;
* ``buffered`` (08:50): while the logs and spans hold the watermark before the fault's window, so minutes of
  windows are buffered: a state written to the table in parts (the workers run with ``--state-part-bytes``
  64 KiB: since the engine keeps only the fields it reads, this state is under the default 512 KiB).

A worker that starts cold from the committed offset (the code before the state table) fails both: it never
closes the open incident, and it never sees the buffered fault.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from backbone.chaos import telemetry_events
from core.settings import Settings
from streams.consumer import ConsumedEvent
from streams.envelope import Event
from streams.offsets import end_offsets
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.replay import read_range
from streams.serde import AvroSerde
from tests.integration.test_incidents_replay import SLICE, _changes, incident_topics
from tests.support import committed_offsets

pytestmark = pytest.mark.integration

OPEN_INCIDENT = datetime(2023, 1, 29, 9, 2, 30, tzinfo=UTC)
"""A cut after the first incident's three insights and the second's opening."""
BUFFERED = datetime(2023, 1, 29, 8, 50, tzinfo=UTC)
"""A cut while the logs and spans (which end at 08:44:08) hold the watermark before the fault's window: minutes of
windows are buffered, a state written in parts of :data:`PART_BYTES`."""
PART_BYTES = 64 * 1024
"""The ``--state-part-bytes`` of the ``buffered`` cut's workers."""


def _env(settings: Settings, tmp_path: Path, app_id: str) -> dict[str, str]:
    return {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
            "BACKBONE_STATE_DIR": str(tmp_path / app_id), "BACKBONE_LOG_FORMAT": "json"}  # fmt: skip


def _command(app_id: str, topics: dict[str, str], part_bytes: int | None = None) -> list[str]:
    args = [f"--{k}-topic={v}" for k, v in topics.items()]
    if part_bytes is not None:
        args.append(f"--state-part-bytes={part_bytes}")
    return [
        sys.executable,
        "-m",
        "processors.incidents.app",
        "--app-id",
        app_id,
        *args,
        "--stop-after-idle",
        "4",
    ]


def _run(
    settings: Settings, tmp_path: Path, app_id: str, topics: dict[str, str], part_bytes: int | None = None
) -> dict[str, Any]:
    """Run a worker until idle; its counters, with ``restored_parts``: the parts of the state it restored
    (from its ``incident_state_restored`` log line; None when it restored none)."""
    done = subprocess.run(_command(app_id, topics, part_bytes), env=_env(settings, tmp_path, app_id), check=False,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    stats: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    restored = [
        line for line in (done.stdout + done.stderr).splitlines() if "incident_state_restored" in line
    ]
    stats["restored_parts"] = json.loads(restored[0][restored[0].index("{") :])["parts"] if restored else None
    return stats


def _produce(settings: Settings, topics: dict[str, str], events: list[tuple[str, Event]]) -> None:
    names = {"telemetry.metrics": "metrics", "telemetry.logs": "logs", "telemetry.spans": "spans",
             "config.changes": "config", "external.events": "external"}  # fmt: skip
    with EventProducer(settings.kafka, AvroSerde(EmbeddedRegistry())) as producer:
        for topic, e in events:
            producer.produce(topics[names[topic]], e)
        producer.flush()


def _insights(settings: Settings, topic: str) -> list[dict[str, Any]]:
    serde = AvroSerde(EmbeddedRegistry())
    return [r.data for r in read_range(settings.kafka, serde, topic) if isinstance(r, ConsumedEvent)]


def _merged_committed(settings: Settings, app_id: str) -> tuple[int, int]:
    """``(committed offset, end offset)`` of the worker's merged topic (negative for no commit; the end is
    0 while the topic does not exist yet)."""
    merged = f"{app_id}-telemetry-repartition"
    try:
        end = end_offsets(settings.kafka, merged, timeout_seconds=5.0).get(0, 0)
    except KeyError:
        return -1, 0
    return committed_offsets(settings.kafka, app_id, merged, 1)[0], end


def _by_id(insights: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """Each insight id once, with what it says; a re-sent insight (after the crash) must say the same."""
    out: dict[str, tuple[Any, ...]] = {}
    for i in insights:
        said = (i["kind"], i["event_time"], i["labels"]["candidates"], i["labels"]["suspect_changes"])
        assert out.setdefault(i["insight_id"], said) == said, i["insight_id"]
    return out


@pytest.mark.parametrize(
    ("cut", "insights_at_kill", "part_bytes"),
    [(OPEN_INCIDENT, 4, None), (BUFFERED, 0, PART_BYTES)],
    ids=["open-incident", "buffered"],
)
def test_a_worker_killed_mid_stream_goes_on_from_its_checkpointed_state(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str], tmp_path: Path,
    cut: datetime, insights_at_kill: int, part_bytes: int | None,
) -> None:  # fmt: skip
    events = telemetry_events(SLICE) + _changes()
    before = [(t, e) for t, e in events if e.attributes.time < cut]
    after = [(t, e) for t, e in events if e.attributes.time >= cut]
    assert before and after
    topics = incident_topics(create_topic, unique_name)
    _produce(settings, topics, before)
    app_id = unique_name("incidents")
    worker = subprocess.Popen(_command(app_id, topics, part_bytes), env=_env(settings, tmp_path, app_id),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        # the first incident's three insights and the second's opening are out, and the group committed the
        # merged topic to its end: a restart must not read the slice again, only what comes after
        while True:
            assert worker.poll() is None, worker.stderr.read()[-3000:] if worker.stderr else ""
            assert time.monotonic() < deadline, "the worker did not emit four insights and commit them"
            sent = end_offsets(settings.kafka, topics["insights"], timeout_seconds=5.0).get(0, 0)
            committed, end = _merged_committed(settings, app_id)
            if sent >= insights_at_kill and committed >= end > 0:
                break
            time.sleep(0.3)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    killed = _insights(settings, topics["insights"])
    if insights_at_kill:
        assert [i["kind"] for i in killed][-1] == "incident.opened"  # the second incident is open at the kill
    else:
        assert killed == []  # the fault's window is buffered, not processed

    _produce(settings, topics, after)
    restarted = _run(settings, tmp_path, app_id, topics, part_bytes)
    got = _insights(settings, topics["insights"])

    alone = {**topics, "insights": create_topic(unique_name("incidents-alone"), partitions=1)}
    uninterrupted = _run(settings, tmp_path, unique_name("incidents-alone"), alone)
    expected = _insights(settings, alone["insights"])
    assert [i["kind"] for i in expected].count("incident.closed") == 2
    assert _by_id(got) == _by_id(expected)
    assert len(got) > len(killed)
    assert restarted["restored"] is True and uninterrupted["restored"] is False
    # a state written whole, or in parts (two or more)
    assert restarted["restored_parts"] == 0 if part_bytes is None else restarted["restored_parts"] >= 2
    assert restarted["late_count"] == 0 and uninterrupted["late_count"] == 0
    print(
        f"killed after {len(killed)} insights; {len(got)} in all ({len(expected)} uninterrupted); restarted: "
        f"replayed {restarted['replayed_count']} merged messages, {restarted['state_writes_count']} state "
        f"writes, largest {restarted['state_bytes_max']} bytes; uninterrupted: {uninterrupted['state_writes_count']}"
        f" writes, {uninterrupted['state_bytes']} bytes in all, largest {uninterrupted['state_bytes_max']},"
        f" {uninterrupted['state_write_seconds']:.3f} s writing, {uninterrupted['correlated_count']} bodies"
    )
