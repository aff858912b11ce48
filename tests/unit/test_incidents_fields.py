"""The engine keeps only the fields it reads (:func:`processors.incidents.incident.engine_fields`), and a window's
records are processed in one order whatever their arrival, down to records that differ only by event id."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from connectors.nezha import iter_day
from processors.incidents.app import engine_record
from processors.incidents.eval_nezha import TELEMETRY_KINDS
from processors.incidents.incident import EngineConfig, IncidentEngine, engine_fields
from processors.incidents.nezha_detect import METRIC_RULES
from streams.producer import epoch_ms

SLICE = Path(__file__).resolve().parents[2] / "datasets" / "nezha"
_KIND = TELEMETRY_KINDS


def _slice() -> list[tuple[str, dict[str, Any]]]:
    """The slice as the worker forwards it (:func:`processors.incidents.app.engine_record`: lean)."""
    return [(_KIND[t], engine_record(_KIND[t], e.data, e.attributes.id)) for t, e in iter_day(SLICE)]


def _whole() -> list[tuple[str, dict[str, Any]]]:
    """The slice's records with every field the importer gives (times in epoch ms, the CloudEvents id)."""
    return [
        (_KIND[t], {**{k: epoch_ms(v) if isinstance(v, datetime) else v for k, v in e.data.items()},
                    "event_id": e.attributes.id})
        for t, e in iter_day(SLICE)
    ]  # fmt: skip


def test_each_kind_keeps_the_fields_the_engine_reads() -> None:
    metric = {"pod": "p", "service": "s", "event_time": 1, "event_id": "m", "node": "n1",
              "metrics": {"CpuUsageRate(%)": 1.0, "PodWorkload(Ops)": 0.5, "NetworkReceiveBytes": 9.0, "Custom": 2.0}}  # fmt: skip
    assert engine_fields("metric", metric) == {
        "pod": "p", "service": "s", "event_time": 1, "event_id": "m",
        "metrics": {"CpuUsageRate(%)": 1.0, "PodWorkload(Ops)": 0.5},
    }  # fmt: skip
    # the configured workload metric is kept
    kept = engine_fields("metric", metric, EngineConfig(workload_metric="Custom"))["metrics"]
    assert kept == {"CpuUsageRate(%)": 1.0, "Custom": 2.0}
    log = {"pod": "p", "service": "s", "level": "ERROR", "logger": "c.Impl#3", "trace_id": "t", "span_id": "a",
           "event_time": 1, "event_id": "l", "message": "x" * 500, "node": "n1"}  # fmt: skip
    assert "message" not in engine_fields("log", log) and len(engine_fields("log", log)) == 8
    span = {"pod": "p", "service": "s", "trace_id": "t", "span_id": "a", "parent_id": None, "duration_us": 5,
            "event_time": 1, "event_id": "x", "operation": "GET /x", "end_time": 2}  # fmt: skip
    assert set(engine_fields("span", span)) == set(span) - {"operation", "end_time"}
    change = {"change_id": "c", "targets": ["s"], "summary": "deploy", "event_time": 1}
    assert engine_fields("change", change) == change


def test_the_slice_trimmed_gives_the_insights_of_the_whole_records_and_a_smaller_state() -> None:
    whole = _whole()
    assert any(
        len(r.get("metrics", {})) > len(METRIC_RULES) + 1 for _, r in whole
    )  # the slice has more columns
    full, lean = IncidentEngine(), IncidentEngine()
    out_full = [i for k, r in whole for i in full.feed(k, r)]
    out_lean = [i for k, r in whole for i in lean.feed(k, engine_fields(k, r))]
    forwarded = IncidentEngine()
    out_forwarded = [i for k, r in _slice() for i in forwarded.feed(k, r)]
    # the worker's correlate stage feeds what engine_record forwarded with trimmed=True: not trimmed again
    taken = IncidentEngine()
    out_taken = [i for k, r in _slice() for i in taken.feed(k, r, trimmed=True)]
    assert out_full and out_full == out_lean == out_forwarded == out_taken
    kept = IncidentEngine()
    first = next(r for k, r in _slice() if k == "metric")
    kept.feed("metric", first, trimmed=True)
    assert any(r is first for _, items in kept._buffer.items() for _, r in items)  # buffered as given
    # what the engine buffers is lean whatever it is fed: a snapshot while windows are buffered
    buffered = IncidentEngine()
    for k, r in whole[:5000]:
        buffered.feed(k, r)
    snap = buffered.snapshot()
    records = [r for _, items in snap["buffer"] for _, r in items]
    assert records and all("message" not in r and "operation" not in r for r in records)
    assert all(set(r.get("metrics", {})) <= set(METRIC_RULES) | {"PodWorkload(Ops)"} for r in records)
    assert len(json.dumps(snap)) < sum(len(json.dumps(r)) for _, r in whole[:5000])


def test_records_that_differ_only_by_event_id_are_processed_in_one_order() -> None:
    """Two samples of one pod at the same millisecond (one sample imported under two ids): the detector sees them
    in event-id order, so the histories, and what follows, do not depend on which arrived first."""
    rows = [
        (k, r) for k, r in _slice() if k == "metric" and r["pod"] == "ts-contacts-service-866bd68c97-xcqfx"
    ]
    assert len(rows) > 12
    k, first = rows[12]
    twin = {
        **first,
        "event_id": "0-twin",
        "metrics": {m: None if v is None else v * 3 for m, v in first["metrics"].items()},
    }

    def history(order: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        engine = IncidentEngine()
        for kind, r in order:
            engine.feed(kind, r)
        engine.flush()
        return [d for d in engine.snapshot()["detectors"] if d[0] == first["pod"]]

    a = [*rows[:13], (k, twin), *rows[13:]]
    b = [*rows[:12], (k, twin), *rows[12:]]
    assert history(a) == history(b)
