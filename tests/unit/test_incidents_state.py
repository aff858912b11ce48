"""The incident engine's state survives a restart: on the project's Nezha slice, an engine snapshotted part way
(``snapshot`` -> ``json.dumps`` -> ``json.loads`` -> ``restore``) and fed the rest gives the insights of an
engine fed everything without a break, at several cut points (one while an incident is open), and ends in the
same state; a snapshot of another format is refused with a clear error."""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.nezha import iter_day
from processors.incidents.changes import change_from_config
from processors.incidents.eval_nezha import TELEMETRY_KINDS
from processors.incidents.incident import SNAPSHOT_FORMAT, IncidentEngine, SnapshotError
from processors.incidents.nezha_detect import RobustZ
from streams.producer import epoch_ms

SLICE = Path(__file__).resolve().parents[2] / "datasets" / "nezha"
_KIND = TELEMETRY_KINDS


def _inputs() -> tuple[list[tuple[str, dict[str, Any], str, bool]], list[str]]:
    """The slice as the worker's correlate stage sees it: ``(kind, record, source, drained)`` with JSON
    records (times in epoch ms, the CloudEvents id as ``event_id``), each topic split over three sources by
    key (each source's last record drained), a quarter of the traces (whole traces) and two config changes;
    and the declared sources."""
    rows: list[tuple[str, dict[str, Any], str]] = []
    for topic, e in iter_day(SLICE):
        if topic == "telemetry.spans" and zlib.crc32(e.key.encode()) % 4:
            continue
        record = {k: epoch_ms(v) if isinstance(v, datetime) else v for k, v in e.data.items()}
        record["event_id"] = e.attributes.id
        rows.append((_KIND[topic], record, f"{topic}/{zlib.crc32(e.key.encode()) % 3}"))
        if len(rows) == 2000:  # the changes arrive among the telemetry, as on their own topic
            for minute, key, eid in (
                (30, "services.ts-contacts-service.pool_size", "cfg-1"),
                (31, "routing", "cfg-2"),
            ):
                at = datetime(2023, 1, 29, 8, minute, tzinfo=UTC)
                data = {"key": key, "version": 1, "change": "CHANGED", "author": "alice", "reason": "test",
                        "changed_at": at}  # fmt: skip
                change = change_from_config(data, eid)
                rows.append(("change", {**change, "event_time": epoch_ms(at)}, "config.changes/0"))
    last = {source: i for i, (_, _, source) in enumerate(rows)}
    fed = [(kind, r, source, last[source] == i) for i, (kind, r, source) in enumerate(rows)]
    return fed, sorted(last)


def _feed(engine: IncidentEngine, rows: list[tuple[str, dict[str, Any], str, bool]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for kind, record, source, drained in rows:
        out.extend(engine.feed(kind, record, source=source, drained=drained))
    return out


def _roundtrip(engine: IncidentEngine) -> IncidentEngine:
    return IncidentEngine.restore(json.loads(json.dumps(engine.snapshot())))


def test_a_restored_engine_gives_the_insights_of_an_uninterrupted_one() -> None:
    rows, sources = _inputs()
    whole = IncidentEngine(sources=sources)
    insights: list[dict[str, Any]] = []
    # row index i -> (snapshot JSON after rows[:i], insights given by then)
    cuts: dict[int, tuple[str, int]] = {}
    # where to cut: fixed points, the last row before the incident opened (its anomalies wait in the
    # correlation window), and 50 rows after it opened (the incident is open)
    probe, opened_at, recent_at = IncidentEngine(sources=sources), None, None
    for i, row in enumerate(rows):
        _feed(probe, [row])
        if probe._open is not None:
            opened_at = i
            break
        if probe._recent:
            recent_at = i + 1
    assert opened_at is not None and recent_at is not None, "the slice opens an incident (the fault at 08:43)"
    at_points = {1, len(rows) // 4, len(rows) // 2, recent_at, opened_at + 50}
    for i, row in enumerate(rows):
        if i in at_points:
            cuts[i] = (json.dumps(whole.snapshot()), len(insights))
        insights.extend(_feed(whole, [row]))
    assert json.loads(cuts[recent_at][0])["recent"]
    final_state = whole.snapshot()
    insights.extend(whole.flush())
    kinds = [i["kind"] for i in insights]
    assert "incident.opened" in kinds and "incident.closed" in kinds
    assert json.loads(cuts[opened_at + 50][0])["open"] is not None  # one cut while the incident is open
    sizes = {}
    for at, (raw, given) in cuts.items():
        sizes[at] = len(zlib.compress(raw.encode(), 1))
        restored = IncidentEngine.restore(json.loads(raw))
        before = insights[:given]
        after = _feed(restored, rows[at:])
        assert restored.snapshot() == final_state, f"cut at {at}"
        after.extend(restored.flush())
        assert before + after == insights, f"cut at {at}"
    assert max(sizes.values()) < 1_000_000
    print("compressed snapshot bytes by cut:", sizes)


def test_a_chain_of_restores_keeps_every_insight() -> None:
    rows, sources = _inputs()
    expected = _feed(IncidentEngine(sources=sources), rows)
    engine, got = IncidentEngine(sources=sources), []
    step = len(rows) // 7
    for start in range(0, len(rows), step):
        got.extend(_feed(engine, rows[start : start + step]))
        engine = _roundtrip(engine)
    assert got == expected and expected


def test_robust_z_round_trips() -> None:
    d = RobustZ(window=5, min_history=2, direction=-1, abs_floor=0.5, rel_floor=0.2)
    for v in (1.0, 2.5, 0.1, 3.0):
        d.update(v)
    back = RobustZ.from_dict(json.loads(json.dumps(d.to_dict())))
    assert back == d and back.update(9.0) == d.update(9.0)


def test_a_snapshot_of_another_format_is_refused() -> None:
    state = IncidentEngine().snapshot()
    assert state["format"] == SNAPSHOT_FORMAT
    with pytest.raises(SnapshotError, match="format 99"):
        IncidentEngine.restore({**state, "format": 99})
    with pytest.raises(SnapshotError, match="format None"):
        IncidentEngine.restore({"engine": state})
    with pytest.raises(SnapshotError, match="not an incident engine snapshot"):
        IncidentEngine.restore({k: v for k, v in state.items() if k != "detectors"})


def test_the_json_snapshot_is_the_snapshot_with_each_buffered_record_encoded_once() -> None:
    """``snapshot_json`` (the worker's checkpoint) reads back as ``snapshot()`` at every point of the slice, while
    windows are buffered, grow and close; a buffered record's text is made once and reused by later checkpoints."""
    rows, sources = _inputs()
    engine = IncidentEngine(sources=sources)
    compared = reused = 0
    for n, (kind, record, source, drained) in enumerate(rows):
        engine.feed(kind, record, source, drained=drained)
        if n % 250 == 0:
            before = {w: list(texts) for w, texts in engine._encoded.items()}
            assert json.loads(engine.snapshot_json()) == engine.snapshot()
            for w, texts in before.items():  # the texts of a window still buffered are the same objects
                if w in engine._encoded:
                    assert all(a is b for a, b in zip(texts, engine._encoded[w], strict=False))
                    reused += len(texts)
            compared += 1
    engine.flush()
    assert json.loads(engine.snapshot_json()) == engine.snapshot()
    assert engine._encoded == {}  # every window closed: nothing cached
    assert compared > 30 and reused > 1000
