"""The Nezha importer on the copied slice (datasets/nezha) and on hand-made bad input."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.nezha import (
    LOG_LINE,
    METRIC_SAMPLE,
    SPAN,
    ImportReport,
    NezhaImportError,
    day_folders,
    iter_day,
    load_faults,
    service_of,
)
from core.settings import SchemaRegistrySettings
from streams.serde import serde_from_settings

SLICE = Path(__file__).resolve().parents[2] / "datasets" / "nezha"
DAY = SLICE / "2023-01-29"

METRIC_HEADER = (
    "Time,TimeStamp,PodName,CpuUsage(m),CpuUsageRate(%),PodServerLatencyP90(s)\n"
)  # fmt: skip
LOG_HEADER = "Timestamp,TimeUnixNano,Node,PodName,Container,TraceID,SpanID,Log\n"
TRACE_HEADER = "TraceID,SpanID,ParentID,PodName,OperationName,StartTimeUnixNano,EndTimeUnixNano,Duration\n"
POD = "ts-basic-service-5dc8d4f9fd-46997"


def _log_row(ns: int, level: str = "ERROR", raw_log: str | None = None) -> str:
    inner = f'{{""log"":""16:42:22.382 {level}  f.m.s.BasicServiceImpl#405 TraceID: t1 SpanID: s1 [x]\\n"",""stream"":""stdout""}}'
    return f'2023-01-29T08:42:22Z,{ns},1.2.3.4,{POD},server,t1,s1,"{raw_log if raw_log is not None else inner}"\n'


def _day(tmp_path: Path) -> Path:
    day = tmp_path / "2023-01-29"
    for sub in ("metric", "log", "trace"):
        (day / sub).mkdir(parents=True)
    (day / "metric" / f"{POD}_metric.csv").write_text(
        METRIC_HEADER
        + f"2023-01-29 08:41:09 +0000 UTC,1674981669,{POD},4.6,0.9,0.24\n"
        + f"2023-01-29 08:42:09 +0000 UTC,1674981729,{POD},4.6,abc,0.24\n"
        + f"2023-01-29 08:43:09 +0000 UTC,1674981789,{POD},4.6,0.9,nan\n"
    )
    (day / "log" / "08_43_log.csv").write_text(
        LOG_HEADER + _log_row(1674981742383150913) + _log_row(1674981742383150999, raw_log="not json")
    )
    (day / "log" / "08_44_log.csv").write_text(LOG_HEADER + _log_row(1674981742383150913))  # overlap
    (day / "trace" / "08_43_trace.csv").write_text(
        TRACE_HEADER
        + f"t1,a,root,{POD},/*,1674981768697000000,1674981769015316530,318316\n"
        + f"t1,b,a,{POD},HTTP GET,1674981768698000000,1674981768710000000,12000\n"
        + f"t1,c,zzz,{POD},HTTP GET,1674981768699000000,1674981768710000000,11000\n"
    )
    (day / "fault_list.json").write_text(
        '{"08": [{"inject_time": "2023-01-29 08:43:04", "inject_timestamp": "1674953044", '
        f'"inject_pod": "{POD}", "inject_type": "return"}}]}}'
    )
    return day


def test_slice_counts_and_schemas() -> None:
    report = ImportReport()
    events = list(iter_day(SLICE, report))
    assert report.metric_samples == 1410  # 47 pods and the front end, 30 minutes
    assert report.log_lines == 5057
    assert report.spans == 9352
    assert report.nan_values == 648
    assert report.bad == [] and report.duplicates == 0
    assert report.faults_ground_truth == 4
    schemas = {e.schema for _, e in events}
    assert schemas == {METRIC_SAMPLE, LOG_LINE, SPAN}  # nothing from fault_list.json
    serde = serde_from_settings(SchemaRegistrySettings())
    for _, e in events[::97]:
        assert serde.decode(serde.encode(e.schema, e.data))[1]["event_time"] == e.data["event_time"]
    times = [e.attributes.time for _, e in events]
    assert times == sorted(times)


def test_ids_are_deterministic_and_unique() -> None:
    first = [e.attributes.id for _, e in iter_day(DAY)]
    second = [e.attributes.id for _, e in iter_day(DAY)]
    assert first == second
    assert len(set(first)) == len(first)


def test_clock_facts() -> None:
    faults = load_faults(DAY)
    assert faults[0].inject_time == datetime(
        2023, 1, 29, 8, 43, 4, tzinfo=UTC
    )  # inject_time, not inject_timestamp
    assert faults[0].service == "ts-contacts-service"
    log = next(e for t, e in iter_day(DAY) if t == "telemetry.logs")
    # the Logback clock inside the line says 16:42 (UTC+8); the event time is the UTC TimeUnixNano
    assert log.attributes.time.hour == 8


def test_bad_records_are_counted_and_kept_raw(tmp_path: Path) -> None:
    day = _day(tmp_path)
    report = ImportReport()
    events = list(iter_day(day, report))
    assert report.metric_samples == 2 and report.bad_metric_values == 1 and report.nan_values == 1
    assert report.log_lines == 1 and report.duplicates == 1 and report.unparsable_log_lines == 1
    assert report.spans == 2 and report.orphan_spans == 1
    reasons = {b.kind: b for b in report.bad}
    assert "CpuUsageRate(%) is not a number" in reasons["metric"].reason
    assert b"abc" in reasons["metric"].raw and reasons["metric"].line == 3
    assert "parent span zzz" in reasons["span"].reason
    assert b"not json" in reasons["log"].raw
    nan_sample = [e for t, e in events if t == "telemetry.metrics"][-1]
    assert nan_sample.data["metrics"]["PodServerLatencyP90(s)"] is None
    assert report.as_dict()["dead_lettered"] == 3


def test_folder_of_days_and_errors(tmp_path: Path) -> None:
    shutil.copytree(_day(tmp_path / "a"), tmp_path / "days" / "2023-01-29")
    assert [d.name for d in day_folders(tmp_path / "days")] == ["2023-01-29"]
    with pytest.raises(NezhaImportError, match="no such directory"):
        day_folders(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NezhaImportError, match="neither a Nezha day"):
        day_folders(tmp_path / "empty")


def test_service_of() -> None:
    assert service_of(POD) == "ts-basic-service"
    assert service_of("ts-consign-price-service-df498d7fb-725nt") == "ts-consign-price-service"
    assert service_of("frontend") == "frontend"
