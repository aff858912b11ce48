"""Import a Nezha TrainTicket day as telemetry events (pure parsing: no Kafka here).

Source: the Nezha multimodal RCA data set, IntelligentDDS/Nezha @ d814010 : ``rca_data/<day>/``
(MIT), as copied to ``../shared/data/incidents/nezha/2023-01-29``. A day folder holds:

* ``metric/<pod>_metric.csv`` -- one row per pod per minute: ``Time`` (Go ``time.String`` with a
  monotonic suffix, e.g. ``2023-01-29 08:41:09.712997733 +0000 UTC m=+0.789159594``), ``TimeStamp``
  (unix seconds, UTC), ``PodName`` and 19 numeric columns (``CpuUsageRate(%)``,
  ``PodServerLatencyP90(s)``, ``PodWorkload(Ops)``, ...). Becomes ``sophia.telemetry.MetricSample``.
* ``metric/front_service.csv`` -- the front end, one row per minute: ``ServiceName`` ``Frontend``,
  ``SuccessRate(%)`` and latency percentiles. Becomes a MetricSample of pod and service ``frontend``.
* ``log/HH_MM_log.csv`` -- ``Timestamp,TimeUnixNano,Node,PodName,Container,TraceID,SpanID,Log``;
  ``Log`` is a Docker JSON log record whose ``log`` field is a Logback line
  ``HH:MM:SS.mmm LEVEL logger#line TraceID: .. SpanID: .. [..]``. Becomes ``sophia.telemetry.LogLine``.
* ``trace/HH_MM_trace.csv`` -- ``TraceID,SpanID,ParentID,PodName,OperationName,StartTimeUnixNano,
  EndTimeUnixNano,Duration`` (``Duration`` in microseconds, ``ParentID`` ``root`` for a root span).
  Becomes ``sophia.telemetry.Span``.
* ``fault_list.json`` -- the injected faults, ground truth for evaluation only. :func:`load_faults`
  reads it; nothing here turns it into an event, so it never reaches a topic a processor reads.

Odd records, handled and never fixed:

* ``nan`` metric values (seen in the latency columns when a pod served no request in the minute):
  kept as an absent value (``null`` in the sample's ``metrics`` map) and counted in ``nan_values``.
  ``PodSuccessRate(%)`` is 0 on every row of 2023-01-29 although requests succeed; it is kept as read.
* The Logback time inside a log line is the pods' local clock, UTC+8 (``16:42:22.382`` for a record
  stamped ``2023-01-29T08:42:22.383Z``); the event time is ``TimeUnixNano`` (UTC), the inner clock is
  ignored.
* Log and trace windows overlap (``08_52_*.csv`` covers 08:50-08:53, ``08_53_*.csv`` 08:52-08:53):
  the same record appears twice; it gets the same deterministic id and is imported once
  (``duplicates`` counts the repeats).
* In ``fault_list.json`` ``inject_time`` is UTC like the telemetry, while ``inject_timestamp`` is
  8 hours off (and for the 09:12:56 fault repeats the previous fault's value): only ``inject_time``
  is used.

Bad input -- a metric value that is not a number, a log line whose ``Log`` is not Docker JSON or
whose inner line has no Logback level, a span whose parent is neither ``root`` nor a span of the same
trace in the import, a row with missing columns -- is counted in the report and returned as a
:class:`BadRecord` carrying the raw bytes and the reason, for the dead-letter topic; the rest goes on.

Event ids are deterministic (:func:`streams.envelope.deterministic_id`): metrics
``("nezha", "metric", pod, unix_seconds)``, logs ``("nezha", "log", pod, TimeUnixNano,
sha1(Log))``, spans ``("nezha", "span", trace_id, span_id)``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from connectors.errors import SourceDataError
from streams.envelope import Event, deterministic_id

__all__ = [
    "LOG_LINE",
    "METRIC_SAMPLE",
    "SOURCE",
    "SPAN",
    "TOPIC_LOGS",
    "TOPIC_METRICS",
    "TOPIC_SPANS",
    "BadRecord",
    "Fault",
    "ImportReport",
    "NezhaImportError",
    "day_folders",
    "iter_day",
    "load_faults",
    "service_of",
]

SOURCE = "/connectors/nezha"
METRIC_SAMPLE = "sophia.telemetry.MetricSample"
LOG_LINE = "sophia.telemetry.LogLine"
SPAN = "sophia.telemetry.Span"
TOPIC_METRICS = "telemetry.metrics"
TOPIC_LOGS = "telemetry.logs"
TOPIC_SPANS = "telemetry.spans"
FRONTEND = "frontend"

_POD = re.compile(r"^(?P<service>.+?)-[0-9a-f]{6,10}-[0-9a-z]{5}$")
_LOGBACK = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3})\s+(TRACE|DEBUG|INFO|WARN|ERROR|FATAL)\s+(\S+)\s+(.*)$", re.S)
_TIME_COLUMNS = ("Time", "TimeStamp", "PodName", "ServiceName")


class NezhaImportError(SourceDataError):
    """The folder is not a Nezha day (or folder of days): message names the path and what is missing."""


def service_of(pod: str) -> str:
    """The Kubernetes service of a pod name: ``ts-basic-service-5dc8d4f9fd-46997`` -> ``ts-basic-service``.

    A name without the ReplicaSet hash and pod suffix is its own service.
    """
    m = _POD.match(pod)
    return m.group("service") if m else pod


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault (ground truth).

    Attributes:
        inject_time: when it was injected (UTC, from ``inject_time``).
        pod: the pod it was injected into.
        service: that pod's service.
        kind: ``inject_type`` (``return``, ``exception``, ``cpu_contention``, ...).
    """

    inject_time: datetime
    pod: str
    service: str
    kind: str


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record that could not be turned into an event (for the dead-letter topic).

    Attributes:
        path: the file it came from.
        line: 1-based line number in the file (header is line 1).
        kind: ``metric``, ``log`` or ``span``.
        raw: the raw CSV line, UTF-8.
        reason: what was wrong.
    """

    path: str
    line: int
    kind: str
    raw: bytes
    reason: str


@dataclass(slots=True)
class ImportReport:
    """Counts of one import. ``bad`` holds the dead-letter candidates (not serialised by :meth:`as_dict`)."""

    days: list[str] = field(default_factory=list)
    metric_samples: int = 0
    log_lines: int = 0
    spans: int = 0
    duplicates: int = 0
    nan_values: int = 0
    bad_metric_values: int = 0
    unparsable_log_lines: int = 0
    orphan_spans: int = 0
    faults_ground_truth: int = 0
    bad: list[BadRecord] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counts, plus the first 20 bad records' file, line and reason."""
        return {
            "days": self.days,
            "metric_samples": self.metric_samples,
            "log_lines": self.log_lines,
            "spans": self.spans,
            "events": self.metric_samples + self.log_lines + self.spans,
            "duplicates": self.duplicates,
            "nan_values": self.nan_values,
            "bad_metric_values": self.bad_metric_values,
            "unparsable_log_lines": self.unparsable_log_lines,
            "orphan_spans": self.orphan_spans,
            "dead_lettered": len(self.bad),
            "bad_records": [
                {"path": b.path, "line": b.line, "kind": b.kind, "reason": b.reason} for b in self.bad[:20]
            ],
            "faults_ground_truth_not_imported": self.faults_ground_truth,
        }


def day_folders(path: Path) -> list[Path]:
    """The day folders under ``path``: ``path`` itself when it holds ``metric/``, else its children that do.

    Raises:
        NezhaImportError: no day folder found.
    """
    if not path.is_dir():
        raise NezhaImportError(path, "no such directory")
    if (path / "metric").is_dir():
        return [path]
    days = sorted(p for p in path.iterdir() if (p / "metric").is_dir())
    if not days:
        raise NezhaImportError(
            path, "neither a Nezha day folder (metric/, log/, trace/) nor a folder of them"
        )
    return days


def load_faults(day: Path) -> list[Fault]:
    """Read ``fault_list.json`` of a day (``{"HH": [{"inject_time", "inject_timestamp", "inject_pod",
    "inject_type"}]}``), sorted by time. Ground truth only: ``inject_time`` is UTC; the 8-hour-off
    ``inject_timestamp`` is ignored.

    Raises:
        NezhaImportError: the file is missing or not in that shape.
    """
    p = day / "fault_list.json"
    try:
        doc = json.loads(p.read_text())
        faults = [
            Fault(
                datetime.strptime(f["inject_time"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC),
                f["inject_pod"],
                service_of(f["inject_pod"]),
                f["inject_type"],
            )
            for hour in doc.values()
            for f in hour
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NezhaImportError(p, f"not a Nezha fault list: {exc}") from exc
    return sorted(faults, key=lambda f: (f.inject_time, f.pod))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(ns: int) -> datetime:
    """Nanoseconds since the epoch -> aware datetime, truncated to the millisecond (the Avro precision)."""
    return _EPOCH + timedelta(milliseconds=ns // 1_000_000)


def _event(schema: str, key: str, data: dict[str, Any], time: datetime, *id_parts: object) -> Event:
    return Event.create(schema, key, data, source=SOURCE, time=time, id=deterministic_id("nezha", *id_parts))


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str] | None, str]]:
    """(line number, row or None when the column count is wrong, raw line) of a CSV file with a header."""
    # fields may hold quoted newlines: parse with csv over the whole text, keep raw by re-serialising
    reader = csv.reader(io.StringIO(path.read_text(encoding="utf-8", errors="replace")))
    header = next(reader, None)
    if header is None:
        return
    for row in reader:
        line = reader.line_num
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow(row)
        yield line, (dict(zip(header, row, strict=True)) if len(row) == len(header) else None), buf.getvalue()


def _metric_file(path: Path, report: ImportReport) -> Iterator[Event]:
    front = path.name == "front_service.csv"
    for line, row, raw in _rows(path):

        def bad(reason: str, line: int = line, raw: str = raw) -> None:
            report.bad.append(BadRecord(str(path), line, "metric", raw.encode(), reason))

        if row is None:
            bad("wrong number of columns")
            continue
        try:
            ts = int(row["TimeStamp"])
        except (KeyError, ValueError):
            bad(f"TimeStamp is not an integer: {row.get('TimeStamp')!r}")
            continue
        pod = FRONTEND if front else row.get("PodName", "")
        if not pod:
            bad("no PodName")
            continue
        metrics: dict[str, float | None] = {}
        problem = None
        for col, value in row.items():
            if col in _TIME_COLUMNS:
                continue
            try:
                v = float(value)
            except ValueError:
                problem = f"{col} is not a number: {value!r}"
                break
            if math.isnan(v):
                report.nan_values += 1
                metrics[col] = None
            elif math.isinf(v):
                problem = f"{col} is infinite: {value!r}"
                break
            else:
                metrics[col] = v
        if problem:
            report.bad_metric_values += 1
            bad(problem)
            continue
        service = FRONTEND if front else service_of(pod)
        data = {
            "pod": pod,
            "service": service,
            "event_time": datetime.fromtimestamp(ts, UTC),
            "metrics": metrics,
        }
        yield _event(METRIC_SAMPLE, pod, data, data["event_time"], "metric", pod, ts)
        report.metric_samples += 1


def _log_file(path: Path, report: ImportReport, seen: set[str]) -> Iterator[Event]:
    for line, row, raw in _rows(path):

        def bad(reason: str, line: int = line, raw: str = raw) -> None:
            report.unparsable_log_lines += 1
            report.bad.append(BadRecord(str(path), line, "log", raw.encode(), reason))

        if row is None:
            bad("wrong number of columns")
            continue
        try:
            ns = int(row["TimeUnixNano"])
            inner = json.loads(row["Log"])["log"]
            if not isinstance(inner, str):
                raise TypeError("log is not a string")
        except (KeyError, ValueError, TypeError) as exc:
            bad(f"not a Docker JSON log record with a time: {exc}")
            continue
        m = _LOGBACK.match(inner)
        if m is None:
            bad("inner line has no Logback time and level")
            continue
        pod = row["PodName"]
        digest = hashlib.sha1(row["Log"].encode()).hexdigest()
        eid = deterministic_id("nezha", "log", pod, ns, digest)
        if eid in seen:
            report.duplicates += 1
            continue
        seen.add(eid)
        t = _ms(ns)
        data = {
            "pod": pod,
            "service": service_of(pod),
            "event_time": t,
            "level": m.group(2),
            "logger": m.group(3),
            "message": m.group(4).rstrip("\n")[:2000],
            "trace_id": row.get("TraceID") or None,
            "span_id": row.get("SpanID") or None,
            "node": row.get("Node") or None,
        }
        yield Event.create(LOG_LINE, pod, data, source=SOURCE, time=t, id=eid)
        report.log_lines += 1


def _span_files(paths: list[Path], report: ImportReport, seen: set[str]) -> Iterator[Event]:
    rows: list[tuple[Path, int, dict[str, str], str]] = []
    known: set[tuple[str, str]] = set()
    for path in paths:
        for line, row, raw in _rows(path):
            if row is None:
                report.bad.append(BadRecord(str(path), line, "span", raw.encode(), "wrong number of columns"))
                continue
            rows.append((path, line, row, raw))
            known.add((row.get("TraceID", ""), row.get("SpanID", "")))
    for path, line, row, raw in rows:
        try:
            trace, span, parent = row["TraceID"], row["SpanID"], row["ParentID"]
            start, end, dur = int(row["StartTimeUnixNano"]), int(row["EndTimeUnixNano"]), int(row["Duration"])
        except (KeyError, ValueError) as exc:
            report.bad.append(BadRecord(str(path), line, "span", raw.encode(), f"bad span field: {exc}"))
            continue
        if parent != "root" and (trace, parent) not in known:
            report.orphan_spans += 1
            report.bad.append(
                BadRecord(str(path), line, "span", raw.encode(), f"parent span {parent} not in trace {trace}")
            )
            continue
        eid = deterministic_id("nezha", "span", trace, span)
        if eid in seen:
            report.duplicates += 1
            continue
        seen.add(eid)
        t = _ms(start)
        pod = row["PodName"]
        data = {
            "trace_id": trace,
            "span_id": span,
            "parent_id": None if parent == "root" else parent,
            "pod": pod,
            "service": service_of(pod),
            "operation": row["OperationName"],
            "event_time": t,
            "end_time": _ms(end),
            "duration_us": dur,
        }
        yield Event.create(SPAN, trace, data, source=SOURCE, time=t, id=eid)
        report.spans += 1


def iter_day(path: Path, report: ImportReport | None = None) -> Iterator[tuple[str, Event]]:
    """Yield ``(topic, event)`` for every metric sample, log line and span under ``path`` (a day folder
    or a folder of day folders), day by day, each day in event-time order (ties: topic, then event
    id), as a live system would emit them. Bad records go to ``report.bad``.

    Raises:
        NezhaImportError: ``path`` holds no day folder.
    """
    report = report if report is not None else ImportReport()
    for day in day_folders(path):
        report.days.append(day.name)
        if (day / "fault_list.json").exists():
            report.faults_ground_truth += len(load_faults(day))
        seen: set[str] = set()
        events: list[tuple[str, Event]] = []
        for f in sorted((day / "metric").glob("*.csv")):
            events.extend((TOPIC_METRICS, e) for e in _metric_file(f, report))
        for f in sorted((day / "log").glob("*.csv")) if (day / "log").is_dir() else []:
            events.extend((TOPIC_LOGS, e) for e in _log_file(f, report, seen))
        spans = sorted((day / "trace").glob("*.csv")) if (day / "trace").is_dir() else []
        events.extend((TOPIC_SPANS, e) for e in _span_files(spans, report, seen))
        events.sort(key=lambda te: (te[1].attributes.time, te[0], te[1].attributes.id))
        yield from events
