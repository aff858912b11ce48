"""Incident correlation over pod telemetry: event-time windows, watermark, anomalies -> incidents.

Plain Python, deterministic, no Faust (the Faust app feeds :class:`IncidentEngine` and produces what
it returns). Input records are the decoded data of ``sophia.telemetry.MetricSample``, ``LogLine`` and
``Span`` (dicts whose ``event_time`` is an aware datetime or epoch milliseconds).

Time model:

* Tumbling one-minute windows in event time (``window_ms``), aligned to the epoch.
* Watermark = the highest event time seen minus ``allowed_lateness_ms`` (with several inputs: the
  slowest active input's highest event time, see :meth:`IncidentEngine.feed`). A window is processed once
  the watermark reaches its end; an event for a window already processed is *late*: it is counted
  (:attr:`IncidentEngine.late`, per kind; :attr:`IncidentEngine.late_sources`, per source; the first one's
  event time and the watermark then in :attr:`IncidentEngine.first_late`) and not used.
* A closed window is processed in a canonical order (kind, pod, event time, identity, event id), so the result
  depends only on the set of events that arrived within the allowed lateness, never on their arrival
  order. Insights carry event times derived from window bounds, never from arrival or wall clock.

Per window the detectors of :mod:`processors.incidents.nezha_detect` score every series; anomalies
(score >= ``z_threshold``) feed the correlator:

* An incident **opens** when, within the last ``correlation_window_ms``, the unassigned anomalies cover
  at least ``min_services`` services, or include a new WARN/ERROR log template, or one anomaly scores
  at least ``strong_threshold``. Its ``incident.opened`` insight is stamped with the end of the window
  that opened it plus the allowed lateness (the earliest moment a streaming worker can know).
* Its **priority** (label ``priority`` of every insight, read by the ``backbone_incidents_opened_total``
  counter of :mod:`processors.incidents.app`) is derived from its anomalies, since the telemetry carries
  no severity of its own: ``p1`` when they cover at least ``min_services`` services (the frontend not
  counted, as in the trigger), else ``p2`` when one scores at least ``strong_threshold``, else ``p3``
  (e.g. opened by a new WARN/ERROR log template alone). It can rise while the incident grows.
* Anomalies of later windows join the open incident, each window that adds some gives an
  ``incident.updated`` insight (same stamping); it **closes** when ``incident_gap_ms`` pass
  without an anomaly, or ``max_incident_ms`` after it opened, and its ``incident.closed`` insight
  carries the ranked root-cause candidates (:func:`processors.incidents.rca.rank`) with their evidence.

**Suspect changes**: change records (kind ``change``, :mod:`processors.incidents.changes`: config
changes, commits, pushes, deploys, releases) go through the same windows and watermark, so they are
kept in event-time order whatever their arrival. Every insight's label ``suspect_changes`` lists the
changes that touched one of the incident's services or pods (by name, see
:mod:`processors.incidents.changes`) from ``suspect_window_ms`` before the window of its first anomaly
to that window's end, ranked by the best root-cause rank of the services they touched, then by how
shortly they came before the first anomaly (at most ``max_suspects``). Change sources are *sparse*
(:data:`SPARSE_KINDS`). Kept changes are bounded by age and by ``max_changes_kept``.

The call graph is learnt from spans (caller pod -> callee pod, by parent span id); span ids are kept
``span_memory_windows`` windows, the graph is bounded by the number of pod pairs. **Error
propagation**: an ERROR/FATAL log line carries its trace and span id; placed in the call tree of the
span memory, a caller's error line whose span lies above a callee's error line of the same trace is
explained by it (edge caller -> callee, counted once per trace). The edges of an incident's windows
(and of the correlation window before it opened) go to :func:`processors.incidents.rca.rank`. Every other piece of
state is bounded too: detector histories (``history_window`` values), seen log templates per pod,
and buffered windows not yet closed.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Final

from processors.incidents.nezha_detect import DETECTOR_VERSION, METRIC_RULES, Anomaly, RobustZ
from processors.incidents.rca import rank
from streams.envelope import deterministic_id

__all__ = [
    "KINDS",
    "PRIORITIES",
    "SNAPSHOT_FORMAT",
    "SPARSE_KINDS",
    "EngineConfig",
    "Incident",
    "IncidentEngine",
    "SnapshotError",
    "engine_fields",
    "priority",
]

SNAPSHOT_FORMAT = 1
"""Layout version of :meth:`IncidentEngine.snapshot` (the one :meth:`IncidentEngine.restore` reads)."""


class SnapshotError(ValueError):
    """A snapshot that :meth:`IncidentEngine.restore` cannot take (another format, or not an engine's state)."""


KINDS = ("metric", "log", "span", "change")
SPARSE_KINDS = frozenset({"change"})
"""Kinds whose sources are sparse (config changes, commits, deploys: minutes or days apart): once
drained such a source holds the watermark back no longer, and its event times do not count as the
fastest source's (a live config change does not make replayed telemetry idle)."""
_LOG_ALERT_LEVELS = frozenset({"WARN", "ERROR", "FATAL"})
_MAX_TRACE_DEPTH = 64  # a call chain deeper than this is cut (bounded walk; TrainTicket's are < 10)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Tuning of :class:`IncidentEngine` (times in event-time milliseconds)."""

    window_ms: int = 60_000
    allowed_lateness_ms: int = 15_000
    z_threshold: float = 6.0
    strong_threshold: float = 25.0
    min_services: int = 3
    history_window: int = 60
    min_history: int = 10
    trace_min_history: int = 2
    log_warmup_windows: int = 1
    log_gap_windows: int = 2
    log_min_history: int = 2
    log_error_floor: float = 0.5
    correlation_window_ms: int = 180_000
    incident_gap_ms: int = 120_000
    max_incident_ms: int = 300_000
    span_memory_windows: int = 5
    idle_source_ms: int = 600_000
    workload_metric: str = "PodWorkload(Ops)"
    min_tail_requests: float = 1.0
    suspect_window_ms: int = 3_600_000
    max_suspects: int = 10
    max_changes_kept: int = 10_000


PRIORITIES = ("p1", "p2", "p3")
_DEFAULT_CONFIG: Final = EngineConfig()


def priority(anomalies: Iterable[Anomaly], config: EngineConfig) -> str:
    """The priority of an incident made of ``anomalies`` (see the module docstring): ``p1`` (at least
    ``min_services`` services, the frontend not counted), ``p2`` (a score >= ``strong_threshold``), else ``p3``."""
    found = list(anomalies)
    if len({a.service for a in found if a.pod != "frontend"}) >= config.min_services:
        return "p1"
    if any(a.score >= config.strong_threshold for a in found):
        return "p2"
    return "p3"


_LOG_FIELDS: Final = ("pod", "service", "level", "logger", "trace_id", "span_id", "event_time", "event_id")
_SPAN_FIELDS: Final = (
    "pod",
    "service",
    "trace_id",
    "span_id",
    "parent_id",
    "duration_us",
    "event_time",
    "event_id",
)
_METRIC_FIELDS: Final = ("pod", "service", "event_time", "event_id")


def engine_fields(kind: str, record: Mapping[str, Any], config: EngineConfig | None = None) -> dict[str, Any]:
    """The part of a ``kind`` record that the engine reads, as a new dict (the engine buffers, snapshots and
    the worker forwards only this).

    * ``metric``: ``pod``, ``service``, ``event_time``, ``event_id`` and, of ``metrics``, the scored ones
      (:data:`processors.incidents.nezha_detect.METRIC_RULES`) and ``config.workload_metric``: on Nezha's
      pod metrics 5 of the 19 columns, the front end's 2 of 5 (``bench/bench_incidents.py`` prints each
      kind's average JSON whole and as the worker forwards it: on 2023-01-29 a metric record's from 794 to
      325 bytes, a span's from 340 to 276, a log line's from 583 to 277);
    * ``log``: ``pod``, ``service``, ``level``, ``logger``, ``trace_id``, ``span_id``, ``event_time``,
      ``event_id`` (not the message: a log line counts by its level and logger);
    * ``span``: ``pod``, ``service``, ``trace_id``, ``span_id``, ``parent_id``, ``duration_us``,
      ``event_time``, ``event_id`` (not the operation, the node or the end time);
    * ``change``: every field.

    A field absent from ``record`` stays absent (the engine raises where it needs it, as before); an unknown
    kind is returned whole (:meth:`IncidentEngine.feed` rejects it).
    """
    if kind == "metric":
        keep = _scored_metrics((config or _DEFAULT_CONFIG).workload_metric)
        out = {k: record[k] for k in _METRIC_FIELDS if k in record}
        metrics = record.get("metrics")
        if metrics is not None:
            out["metrics"] = {k: v for k, v in metrics.items() if k in keep}
        return out
    if kind == "log":
        return {k: record[k] for k in _LOG_FIELDS if k in record}
    if kind == "span":
        return {k: record[k] for k in _SPAN_FIELDS if k in record}
    return dict(record)


@functools.cache
def _scored_metrics(workload_metric: str) -> frozenset[str]:
    """The metric names :func:`engine_fields` keeps (one set per workload metric, made once)."""
    return frozenset(METRIC_RULES) | {workload_metric}


def _ms(t: Any) -> int:
    if isinstance(t, datetime):
        return int(t.astimezone(UTC).timestamp() * 1000)
    return int(t)


@dataclass(slots=True)
class Incident:
    """An incident being built."""

    opened_window_ms: int
    anomalies: list[Anomaly] = field(default_factory=list)
    last_anomaly_window_ms: int = 0
    error_edges: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def incident_id(self) -> str:
        first = sorted((a.window_start_ms, a.pod, a.signal) for a in self.anomalies)[0]
        return deterministic_id("incident", *first)


class IncidentEngine:
    """Windows, detectors and the incident correlator; feed records, collect insights.

    Args:
        config: tuning (defaults are the ones evaluated in ``backbone eval incidents``).
        sources: the inputs known in advance to hold records to read (e.g. every input
            ``topic/partition`` with records after the group's committed offset): the watermark does
            not move until each has delivered a record (its first record may be older than any other
            source's: a backlog that starts earlier) or been marked drained (:meth:`mark_drained`);
            then each holds it back until it turns idle. A source that is not declared counts from its
            first record.

    Insights are dicts in the shape of ``sophia.insight.Insight`` (``insight_id``, ``kind``
    (``incident.opened`` / ``incident.updated`` / ``incident.closed``), ``entity`` ``incident:<id>``, ``event_time`` (epoch
    ms), ``summary``, ``metrics``, ``labels``; ``labels["candidates"]`` is the JSON of the ranked
    candidates with their evidence, ``labels["anomalies"]`` the JSON of the anomalies behind them).
    """

    def __init__(self, config: EngineConfig | None = None, sources: Iterable[str] = ()) -> None:
        self.config = config or EngineConfig()
        self._waiting: set[str] = set(sources)  # declared, not heard from yet: the watermark waits
        self.watermark_ms: int | None = None
        self.late: Counter[str] = Counter()
        self.late_sources: Counter[str] = Counter()
        self.first_late: dict[str, Any] | None = None
        self.processed_windows = 0
        self.anomaly_count = 0
        self._source_max: dict[str, int] = {}
        self._drained: set[str] = set()
        self._buffer: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        # snapshot_json's cache: window -> the JSON texts of its buffered records so far (windows only grow by
        # appends until they close, so the first len(texts) records are the ones encoded)
        self._encoded: dict[int, list[str]] = {}
        self._ids: dict[int, set[str]] = defaultdict(set)
        self.duplicates: Counter[str] = Counter()
        self._next_window_ms: int | None = None  # windows below this are closed
        self._detectors: dict[tuple[str, str], RobustZ] = {}
        self._templates: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
        self._log_windows = 0
        self._last_log_window: int | None = None
        self._log_services: dict[str, str] = {}
        self._span_pods: dict[int, dict[tuple[str, str], tuple[str, str | None]]] = {}
        self._pod_services: dict[str, str] = {}
        self._recent_errors: list[tuple[int, Counter[tuple[str, str]]]] = []
        self.call_graph: dict[str, Counter[str]] = defaultdict(Counter)
        self._recent: list[Anomaly] = []
        self._open: Incident | None = None
        self._sparse: set[str] = set()
        self._changes: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ intake

    def feed(
        self,
        kind: str,
        record: Mapping[str, Any],
        source: str | None = None,
        *,
        drained: bool = False,
        trimmed: bool = False,
    ) -> list[dict[str, Any]]:
        """Take one record of ``kind`` (``metric``, ``log``, ``span`` or ``change``); return the insights
        that the watermark's advance completed (often none). A record whose ``event_id`` (a change: its
        ``change_id``) was already taken for the same window is a duplicate (an at-least-once
        redelivery, the same file imported twice): counted in :attr:`duplicates`, not used; a duplicate
        arriving after its window closed is counted as late.

        Args:
            kind: what the record is.
            record: its decoded data.
            source: the input it came from (e.g. ``telemetry.logs/3``). With several sources the
                watermark follows the slowest *active* one (the minimum of the sources' highest event
                times). ``None``: one implicit source.
            drained: this record was the last one the source held when it was read (e.g. the
                partition's fetch high watermark was reached). Only a drained source can turn idle:
                once its highest event time is more than ``idle_source_ms`` behind the fastest source
                it holds nothing back; a new record un-drains it. A source that is merely read later
                than another (a backlog) never turns idle, so a replay's skew between topics makes
                nothing late.
            trimmed: ``record`` is already a new dict of :func:`engine_fields` (for this engine's
                ``workload_metric``), e.g. a body the incident worker forwarded: buffered as given, not
                trimmed again. False (eval, replay, tests): trimmed here.

        Raises:
            ValueError: an unknown kind, or a record without ``event_time``.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        if "event_time" not in record:
            raise ValueError(f"{kind} record has no event_time")
        t = _ms(record["event_time"])
        w = t - t % self.config.window_ms
        src = source or "-"
        if self._next_window_ms is not None and w < self._next_window_ms:
            self.late[kind] += 1
            self.late_sources[src] += 1
            if self.first_late is None:
                self.first_late = {"kind": kind, "source": src, "event_time_ms": t,
                                   "watermark_ms": self.watermark_ms, "closed_below_ms": self._next_window_ms}  # fmt: skip
            return self._dropped(src, drained)
        ident = record.get("event_id") or (record.get("change_id") if kind == "change" else None)
        if ident is not None:
            if ident in self._ids[w]:
                self.duplicates[kind] += 1  # the same event again (a redelivery, a second import)
                return self._dropped(src, drained)
            self._ids[w].add(ident)
        if trimmed:
            lean = record if isinstance(record, dict) else dict(record)
        else:
            lean = engine_fields(kind, record, self.config)
        self._buffer[w].append((kind, lean))
        self._waiting.discard(src)
        if kind in SPARSE_KINDS:
            self._sparse.add(src)
        if drained:
            self._drained.add(src)
        else:
            self._drained.discard(src)
        if t <= self._source_max.get(src, t - 1):
            return self._move_watermark() if drained else []
        self._source_max[src] = t
        return self._move_watermark()

    def _dropped(self, src: str, drained: bool) -> list[dict[str, Any]]:
        """A record of ``src`` not used (late, or a duplicate) still says where its source stands: read to
        its end (``drained``: it may turn idle, :meth:`mark_drained`) or not (it holds the watermark again).
        A source whose last record was a redelivery of an older event otherwise never turned idle and held
        the watermark for good (found by the chaos harness: no incident at all after a replay whose
        log held 3 % redeliveries)."""
        if src not in self._source_max and src not in self._waiting:
            return []  # a source never heard from: its first record, dropped, holds nothing yet
        if drained:
            return self.mark_drained(src)
        self._drained.discard(src)
        return []

    def mark_drained(self, source: str) -> list[dict[str, Any]]:
        """``source`` has been read to its end since its last record (whose ``drained`` was ``False``
        because the end was not known then): it may now turn idle, as if that record had been fed with
        ``drained=True``. A declared source not heard from yet (:class:`IncidentEngine` ``sources``) stops
        holding the watermark back. Returns the insights the watermark's advance completed (often none); an
        unknown source is ignored."""
        if (source not in self._source_max and source not in self._waiting) or source in self._drained:
            return []
        self._drained.add(source)
        return self._move_watermark()

    def _move_watermark(self) -> list[dict[str, Any]]:
        if self._waiting - self._drained:
            return []  # a declared input has not spoken: its first record may be older than any seen
        dense = [v for s, v in self._source_max.items() if s not in self._sparse]
        if not dense:
            return []  # changes alone never move the watermark
        top = max(dense)
        holding = [
            v
            for s, v in self._source_max.items()
            if s not in self._drained or (s not in self._sparse and v >= top - self.config.idle_source_ms)
        ]  # never empty: the fastest dense source holds
        mark = min(holding) - self.config.allowed_lateness_ms
        if self.watermark_ms is not None and mark <= self.watermark_ms:
            return []
        self.watermark_ms = mark
        return self._advance(mark)

    def flush(self) -> list[dict[str, Any]]:
        """End of input: process every buffered window and close the open incident."""
        out = self._advance(None)
        if self._open is not None:
            out.append(self._close(self._open, self._open.last_anomaly_window_ms + self.config.window_ms))
            self._open = None
        return out

    # ------------------------------------------------------------------------------------------ windows

    def _advance(self, watermark: int | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for w in sorted(self._buffer):
            if watermark is not None and w + self.config.window_ms > watermark:
                break
            out.extend(self._maybe_close(w))
            out.extend(self._process(w, self._buffer.pop(w)))
            self._ids.pop(w, None)
            self._next_window_ms = w + self.config.window_ms
        if watermark is not None:
            out.extend(self._maybe_close(watermark))
        return out

    def _maybe_close(self, now_ms: int) -> list[dict[str, Any]]:
        inc, c = self._open, self.config
        if inc is None:
            return []
        gap_end = inc.last_anomaly_window_ms + c.window_ms + c.incident_gap_ms
        cap_end = inc.opened_window_ms + c.max_incident_ms
        if now_ms >= min(gap_end, cap_end):
            self._open = None
            return [self._close(inc, min(gap_end, cap_end))]
        return []

    def _process(self, w: int, records: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        self.processed_windows += 1
        records.sort(key=_canonical)
        found: list[Anomaly] = []
        self._keep_changes(w, [r for k, r in records if k == "change"])
        spans = [r for k, r in records if k == "span"]
        logs = [r for k, r in records if k == "log"]
        for k, r in records:
            if k == "metric":
                found.extend(self._metric(w, r))
        found.extend(self._spans(w, spans))
        found.extend(self._logs(w, logs))
        self.anomaly_count += len(found)
        return self._correlate(w, found, self._error_edges(logs))

    def _keep_changes(self, w: int, changes: list[dict[str, Any]]) -> None:
        c = self.config
        self._changes.extend(
            {**r, "event_time": _ms(r["event_time"]), "targets": frozenset(r.get("targets") or ())}
            for r in changes
        )
        # an incident open now began at most max_incident_ms ago, its first anomaly at most a correlation
        # window before that: older changes can never be suspects again
        oldest = w - c.suspect_window_ms - c.max_incident_ms - c.correlation_window_ms
        self._changes = [r for r in self._changes if r["event_time"] >= oldest][-c.max_changes_kept :]

    def _suspects(self, inc: Incident, first_ms: int, candidates: list[Any]) -> list[dict[str, Any]]:
        c = self.config
        service_of = {a.pod: a.service for a in inc.anomalies}
        service_of.update({a.service: a.service for a in inc.anomalies})
        best_rank: dict[str, int] = {}
        for cand in candidates:
            best_rank.setdefault(cand.service, cand.rank)
        lo, hi = first_ms - c.suspect_window_ms, first_ms + c.window_ms
        found = []
        for r in self._changes:
            if not lo <= r["event_time"] < hi:
                continue
            services = sorted({service_of[n] for n in r["targets"] if n in service_of})
            if not services:
                continue
            ranks = [best_rank[s] for s in services if s in best_rank]
            found.append(
                {
                    "change_id": r["change_id"],
                    "origin": r["origin"],
                    "change_kind": r["change_kind"],
                    "summary": r["summary"],
                    "changed_at": datetime.fromtimestamp(r["event_time"] / 1000, UTC).isoformat(),
                    "lead_seconds": (first_ms - r["event_time"]) / 1000,
                    "services": services,
                    "candidate_rank": min(ranks) if ranks else None,
                }
            )
        found.sort(key=lambda s: (s["candidate_rank"] is None, s["candidate_rank"] or 0, s["lead_seconds"],
                                  s["change_id"]))  # fmt: skip
        return found[: c.max_suspects]

    # ---------------------------------------------------------------------------------------- detectors

    def _detector(self, pod: str, signal: str, direction: int, abs_floor: float, min_history: int) -> RobustZ:
        d = self._detectors.get((pod, signal))
        if d is None:
            c = self.config
            d = self._detectors[(pod, signal)] = RobustZ(
                window=c.history_window, min_history=min_history, direction=direction, abs_floor=abs_floor
            )
        return d

    def _metric(self, w: int, r: dict[str, Any]) -> list[Anomaly]:
        out = []
        c = self.config
        metrics = r.get("metrics") or {}
        load = metrics.get(c.workload_metric)
        requests = load * c.window_ms / 1000 if load is not None and math.isfinite(load) else None
        for name in sorted(metrics):
            rule = METRIC_RULES.get(name)
            v = metrics[name]
            if rule is None or v is None or not math.isfinite(v):
                continue
            if (
                rule.quantile is not None
                and requests is not None
                and requests * (1 - rule.quantile) < c.min_tail_requests
            ):
                continue  # too few requests: the percentile is one request, neither scored nor learnt
            d = self._detector(
                r["pod"], f"metric:{name}", rule.direction, rule.abs_floor, self.config.min_history
            )
            score, med = d.update(rule.transform(float(v)))
            med = math.exp(med) - rule.offset if rule.log_scale and math.isfinite(med) else med
            if score >= self.config.z_threshold:
                out.append(
                    Anomaly(r["pod"], r["service"], f"metric:{name}", w, score, float(v), round(med, 6))
                )
        return out

    def _spans(self, w: int, spans: list[dict[str, Any]]) -> list[Anomaly]:
        c = self.config
        here = {(s["trace_id"], s["span_id"]): (s["pod"], s.get("parent_id")) for s in spans}
        self._span_pods[w] = here
        for old in [k for k in self._span_pods if k < w - c.span_memory_windows * c.window_ms]:
            del self._span_pods[old]
        children_us: Counter[tuple[str, str]] = Counter()
        for s in spans:
            if s.get("parent_id"):
                children_us[(s["trace_id"], s["parent_id"])] += s["duration_us"]
        durations: dict[str, list[float]] = defaultdict(list)
        services: dict[str, str] = {}
        for s in spans:
            # self time: the span's duration less its children's (clamped at 0 for parallel children)
            own_us = max(0, s["duration_us"] - children_us[(s["trace_id"], s["span_id"])])
            durations[s["pod"]].append(own_us / 1000.0)
            services[s["pod"]] = s["service"]
            self._pod_services[s["pod"]] = s["service"]
            parent = s.get("parent_id")
            if parent:
                found = self._span((s["trace_id"], parent))
                if found is not None and found[0] != s["pod"]:
                    self.call_graph[found[0]][s["pod"]] += 1
        out = []
        for pod in sorted(durations):
            ds = sorted(durations[pod])
            p90 = ds[min(len(ds) - 1, math.ceil(0.9 * len(ds)) - 1)]
            d = self._detector(pod, "trace:p90_self_ms", 1, 5.0, c.trace_min_history)
            score, med = d.update(p90)
            if score >= c.z_threshold:
                out.append(
                    Anomaly(pod, services[pod], "trace:p90_self_ms", w, score, round(p90, 3), round(med, 3))
                )
        return out

    def _span(self, key: tuple[str, str]) -> tuple[str, str | None] | None:
        """``(pod, parent span id)`` of a span kept in the span memory, or None."""
        for mem in self._span_pods.values():
            found = mem.get(key)
            if found is not None:
                return found
        return None

    def _error_edges(self, logs: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
        """Error propagation seen in traces: ``(caller pod, callee pod) -> traces``. For each ERROR/FATAL
        line of the window, the span it was logged in is walked up (parent by parent, through the span
        memory) to the nearest span of *another* pod that also logged an ERROR/FATAL line: that pod's
        error is explained by this one's (edge that pod -> this pod). A line without trace/span id, or
        whose span is not in the span memory, adds nothing. Counted once per trace and pod pair; the
        walk is bounded by :data:`_MAX_TRACE_DEPTH`."""
        failing: dict[tuple[str, str], str] = {}
        for r in logs:
            if r["level"] in ("ERROR", "FATAL") and r.get("trace_id") and r.get("span_id"):
                failing[(str(r["trace_id"]), str(r["span_id"]))] = r["pod"]
        edges: set[tuple[str, str, str]] = set()
        for (trace, span), pod in sorted(failing.items()):
            cur = self._span((trace, span))
            for _ in range(_MAX_TRACE_DEPTH):  # walk up to the nearest failing span of another pod
                if cur is None or cur[1] is None:
                    break
                caller_key = (trace, cur[1])
                caller_pod = failing.get(caller_key)
                if caller_pod is not None and caller_pod != pod:
                    edges.add((trace, caller_pod, pod))
                    break
                cur = self._span(caller_key)
        return Counter((caller, callee) for _, caller, callee in edges)

    def _logs(self, w: int, logs: list[dict[str, Any]]) -> list[Anomaly]:
        c = self.config
        if not logs:
            return []
        if self._last_log_window is not None and w - self._last_log_window > c.log_gap_windows * c.window_ms:
            self._log_windows = 0  # the log stream had a gap: learn again before calling a template new
        self._last_log_window = w
        warm = self._log_windows >= c.log_warmup_windows
        counts: Counter[tuple[str, str, str]] = Counter()
        errors: Counter[str] = Counter()
        for r in logs:
            counts[(r["pod"], r["level"], r["logger"])] += 1
            self._log_services[r["pod"]] = r["service"]
            if r["level"] in ("ERROR", "FATAL"):
                errors[r["pod"]] += 1
        out = []
        for (pod, level, logger), n in sorted(counts.items()):
            seen = self._templates[pod]
            last = seen.get((level, logger))
            # absent from the baseline (the warm-up windows after the last gap) and from the last
            # max_incident_ms of event time: it cannot belong to the incident it last showed in
            fresh = last is None or w - last > c.max_incident_ms
            if warm and level in _LOG_ALERT_LEVELS and fresh:
                detail = f"{level} {logger}"
                out.append(
                    Anomaly(
                        pod,
                        self._log_services[pod],
                        "log:new_template",
                        w,
                        c.z_threshold + n,
                        float(n),
                        0.0,
                        detail,
                    )
                )
            seen[(level, logger)] = w
        for pod in sorted(self._log_services):  # every pod that ever logged: 0 errors is a value too
            d = self._detector(pod, "log:error_count", 1, c.log_error_floor, c.log_min_history)
            score, med = d.update(float(errors[pod]))
            if warm and score >= c.z_threshold:  # a warm-up window is the baseline, not a symptom
                out.append(
                    Anomaly(
                        pod, self._log_services[pod], "log:error_count", w, score, float(errors[pod]), med
                    )
                )
        self._log_windows += 1
        return out

    # --------------------------------------------------------------------------------------- correlator

    def _correlate(
        self, w: int, found: list[Anomaly], errors: Counter[tuple[str, str]]
    ) -> list[dict[str, Any]]:
        c = self.config
        if self._open is not None:
            self._open.error_edges.update(errors)
            if not found:
                return []
            self._open.anomalies.extend(found)
            self._open.last_anomaly_window_ms = w
            return [self._insight(self._open, "incident.updated", w + c.window_ms + c.allowed_lateness_ms, w)]
        self._recent = [a for a in self._recent if a.window_start_ms > w - c.correlation_window_ms] + found
        self._recent_errors = [e for e in self._recent_errors if e[0] > w - c.correlation_window_ms]
        if errors:
            self._recent_errors.append((w, errors))
        if not found:
            return []
        services = {a.service for a in self._recent if a.pod != "frontend"}
        trigger = (
            len(services) >= c.min_services
            or any(a.signal.startswith("log:") for a in self._recent)
            or any(a.score >= c.strong_threshold for a in self._recent)
        )
        if not trigger:
            return []
        inc = Incident(opened_window_ms=w, anomalies=list(self._recent), last_anomaly_window_ms=w)
        for _, e in self._recent_errors:
            inc.error_edges.update(e)
        self._recent = []
        self._recent_errors = []
        self._open = inc
        return [self._insight(inc, "incident.opened", w + c.window_ms + c.allowed_lateness_ms, w)]

    def _close(self, inc: Incident, at_ms: int) -> dict[str, Any]:
        return self._insight(
            inc, "incident.closed", at_ms + self.config.allowed_lateness_ms, inc.last_anomaly_window_ms
        )

    def _insight(self, inc: Incident, kind: str, event_ms: int, window_ms: int) -> dict[str, Any]:
        graph = {k: dict(v) for k, v in self.call_graph.items()}
        errors: dict[str, dict[str, int]] = defaultdict(dict)
        for (caller, callee), n in sorted(inc.error_edges.items()):
            errors[caller][callee] = n
        candidates = rank(inc.anomalies, graph, error_graph=errors, services=self._pod_services)
        iid = inc.incident_id
        services = sorted({a.service for a in inc.anomalies})
        first = min(a.window_start_ms for a in inc.anomalies)
        top = candidates[0] if candidates else None
        summary = f"incident over {len(services)} service(s), {len(inc.anomalies)} anomalies; " + (
            f"most likely cause {top.pod} ({top.service})" if top else "no candidate"
        )
        return {
            "insight_id": deterministic_id("insight", kind, iid, window_ms),
            "kind": kind,
            "entity": f"incident:{iid}",
            "event_time": event_ms,
            "summary": summary,
            "metrics": {
                "anomalies_count": float(len(inc.anomalies)),
                "services_count": float(len(services)),
                "first_anomaly_window_ms": float(first),
                "opened_window_ms": float(inc.opened_window_ms),
                "window_ms": float(window_ms),
                "last_anomaly_window_ms": float(inc.last_anomaly_window_ms),
            },
            "labels": {
                "detector_version": DETECTOR_VERSION,
                "priority": priority(inc.anomalies, self.config),
                "top1_pod": top.pod if top else "",
                "top1_service": top.service if top else "",
                "candidates": json.dumps([c.as_dict() for c in candidates], sort_keys=True),
                "suspect_changes": json.dumps(self._suspects(inc, first, candidates), sort_keys=True),
                "anomalies": json.dumps(
                    [
                        a.as_dict()
                        for a in sorted(inc.anomalies, key=lambda a: (a.window_start_ms, a.pod, a.signal))
                    ][:200],
                    sort_keys=True,
                ),
            },
        }

    # ------------------------------------------------------------------------------------------- state

    def snapshot(self) -> dict[str, Any]:
        """The engine's whole state, JSON-ready (``json.dumps`` takes it as is) and
        deterministic for a given history (every collection in the engine's own order); nothing is shared
        with the live engine. Datetimes in buffered records (an engine fed decoded Avro rather than the
        worker's JSON bodies) are written as epoch ms, which the engine reads alike.

        Returns:
            ``{"format": SNAPSHOT_FORMAT, "config": {EngineConfig fields}, "watermark_ms", "next_window_ms"
            (epoch ms or null), "waiting", "drained", "sparse" (source names), "source_max": {source: ms},
            "buffer": [[window_ms, [[kind, record], ...]], ...], "ids": [[window_ms, [event id, ...]], ...],
            "detectors": [[pod, signal, RobustZ.to_dict()], ...], "templates": {pod: [[level, logger,
            window_ms], ...]}, "log_windows", "last_log_window", "log_services": {pod: service},
            "span_pods": [[window_ms, [[trace, span, pod, parent or null], ...]], ...], "pod_services",
            "call_graph": {caller: {callee: calls}}, "recent": [anomaly, ...], "recent_errors": [[window_ms,
            [[caller, callee, traces], ...]], ...], "open": null or {"opened_window_ms",
            "last_anomaly_window_ms", "anomalies", "error_edges"}, "changes": [change, ...] (targets as
            sorted lists), "late", "late_sources", "duplicates" (counters as dicts), "first_late",
            "processed_windows", "anomaly_count"}``; an anomaly is its fields as a dict (score unrounded).
        """
        buffer = [[w, [[k, _plain(r)] for k, r in items]] for w, items in self._buffer.items()]
        return {**self._state(), "buffer": buffer}

    def snapshot_json(self) -> bytes:
        """:meth:`snapshot` as compact JSON (UTF-8), ``json.loads`` of which equals ``snapshot()`` (the
        ``"buffer"`` key comes last). A buffered window's records are encoded once each and their texts kept
        until the window closes, so a checkpoint encodes only what was buffered since the last one (a large state
        is mostly buffered windows: the slowest input holds the watermark while the others' records wait)."""
        fragments = []
        for w, items in self._buffer.items():
            texts = self._encoded.setdefault(w, [])
            texts.extend(_JSON.encode([k, _plain(r)]) for k, r in items[len(texts) :])
            fragments.append(f"[{w},[{','.join(texts)}]]")
        for w in [w for w in self._encoded if w not in self._buffer]:
            del self._encoded[w]
        head = _JSON.encode(self._state())
        return f'{head[:-1]},"buffer":[{",".join(fragments)}]}}'.encode()

    def _state(self) -> dict[str, Any]:
        """:meth:`snapshot` without ``"buffer"``."""
        return {
            "format": SNAPSHOT_FORMAT,
            "config": asdict(self.config),
            "watermark_ms": self.watermark_ms,
            "next_window_ms": self._next_window_ms,
            "waiting": sorted(self._waiting),
            "drained": sorted(self._drained),
            "sparse": sorted(self._sparse),
            "source_max": dict(self._source_max),
            "ids": [[w, sorted(ids)] for w, ids in self._ids.items()],
            "detectors": [[pod, signal, d.to_dict()] for (pod, signal), d in self._detectors.items()],
            "templates": {
                pod: [[level, logger, w] for (level, logger), w in seen.items()]
                for pod, seen in self._templates.items()
            },
            "log_windows": self._log_windows,
            "last_log_window": self._last_log_window,
            "log_services": dict(self._log_services),
            "span_pods": [
                [w, [[trace, span, pod, parent] for (trace, span), (pod, parent) in mem.items()]]
                for w, mem in self._span_pods.items()
            ],
            "pod_services": dict(self._pod_services),
            "call_graph": {caller: dict(callees) for caller, callees in self.call_graph.items()},
            "recent": [_anomaly_state(a) for a in self._recent],
            "recent_errors": [[w, _edges_state(e)] for w, e in self._recent_errors],
            "open": None if self._open is None else {
                "opened_window_ms": self._open.opened_window_ms,
                "last_anomaly_window_ms": self._open.last_anomaly_window_ms,
                "anomalies": [_anomaly_state(a) for a in self._open.anomalies],
                "error_edges": _edges_state(self._open.error_edges),
            },
            "changes": [{**_plain(r), "targets": sorted(r["targets"])} for r in self._changes],
            "late": dict(self.late),
            "late_sources": dict(self.late_sources),
            "duplicates": dict(self.duplicates),
            "first_late": None if self.first_late is None else dict(self.first_late),
            "processed_windows": self.processed_windows,
            "anomaly_count": self.anomaly_count,
        }  # fmt: skip

    @classmethod
    def restore(cls, snapshot: Mapping[str, Any]) -> IncidentEngine:
        """An engine in the state :meth:`snapshot` described (its configuration included), which goes on
        exactly as the snapshotted engine would (same insights for the same records that follow).

        Raises:
            SnapshotError: ``snapshot``'s ``format`` is not :data:`SNAPSHOT_FORMAT`, or it is not an engine's
                state (a field missing or of the wrong type; the cause is chained).
        """
        if not isinstance(snapshot, Mapping) or snapshot.get("format") != SNAPSHOT_FORMAT:
            found = snapshot.get("format") if isinstance(snapshot, Mapping) else type(snapshot).__name__
            raise SnapshotError(
                f"incident engine snapshot format {found!r}, this engine reads {SNAPSHOT_FORMAT}"
            )
        try:
            s = snapshot
            e = cls(EngineConfig(**s["config"]), sources=s["waiting"])
            e.watermark_ms = _opt_int(s["watermark_ms"])
            e._next_window_ms = _opt_int(s["next_window_ms"])
            e._drained = set(s["drained"])
            e._sparse = set(s["sparse"])
            e._source_max = {str(k): int(v) for k, v in s["source_max"].items()}
            for w, items in s["buffer"]:
                e._buffer[int(w)] = [(str(k), dict(r)) for k, r in items]
            for w, ids in s["ids"]:
                e._ids[int(w)] = set(ids)
            for pod, signal, d in s["detectors"]:
                e._detectors[(pod, signal)] = RobustZ.from_dict(d)
            for pod, seen in s["templates"].items():
                e._templates[pod] = {(level, logger): int(w) for level, logger, w in seen}
            e._log_windows = int(s["log_windows"])
            e._last_log_window = _opt_int(s["last_log_window"])
            e._log_services = dict(s["log_services"])
            for w, mem in s["span_pods"]:
                e._span_pods[int(w)] = {(trace, span): (pod, parent) for trace, span, pod, parent in mem}
            e._pod_services = dict(s["pod_services"])
            for caller, callees in s["call_graph"].items():
                e.call_graph[caller] = Counter({callee: int(n) for callee, n in callees.items()})
            e._recent = [_anomaly(a) for a in s["recent"]]
            e._recent_errors = [(int(w), _edges(edges)) for w, edges in s["recent_errors"]]
            if s["open"] is not None:
                o = s["open"]
                e._open = Incident(
                    opened_window_ms=int(o["opened_window_ms"]),
                    anomalies=[_anomaly(a) for a in o["anomalies"]],
                    last_anomaly_window_ms=int(o["last_anomaly_window_ms"]),
                    error_edges=_edges(o["error_edges"]),
                )
            e._changes = [{**r, "targets": frozenset(r["targets"])} for r in s["changes"]]
            e.late = Counter(s["late"])
            e.late_sources = Counter(s["late_sources"])
            e.duplicates = Counter(s["duplicates"])
            e.first_late = None if s["first_late"] is None else dict(s["first_late"])
            e.processed_windows = int(s["processed_windows"])
            e.anomaly_count = int(s["anomaly_count"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SnapshotError(f"not an incident engine snapshot: {type(exc).__name__}: {exc}") from exc
        return e

    def stats(self) -> dict[str, Any]:
        """Counters: processed windows, anomalies, late events per kind, state sizes."""
        return {
            "processed_windows": self.processed_windows,
            "anomalies": self.anomaly_count,
            "late_events": dict(sorted(self.late.items())),
            "duplicate_events": dict(sorted(self.duplicates.items())),
            "series": len(self._detectors),
            "call_graph_edges": sum(len(v) for v in self.call_graph.values()),
            "buffered_windows": len(self._buffer),
            "changes_kept": len(self._changes),
        }


_JSON: Final = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def _plain(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record with its datetimes as epoch ms (JSON-ready; the engine reads both alike)."""
    return {k: _ms(v) if isinstance(v, datetime) else v for k, v in record.items()}


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _anomaly_state(a: Anomaly) -> dict[str, Any]:
    return {f.name: getattr(a, f.name) for f in fields(Anomaly)}


def _anomaly(state: Mapping[str, Any]) -> Anomaly:
    return Anomaly(str(state["pod"]), str(state["service"]), str(state["signal"]), int(state["window_start_ms"]),
                   float(state["score"]), float(state["value"]), float(state["baseline"]), str(state["detail"]))  # fmt: skip


def _edges_state(edges: Counter[tuple[str, str]]) -> list[list[Any]]:
    return [[caller, callee, n] for (caller, callee), n in edges.items()]


def _edges(state: Iterable[list[Any]]) -> Counter[tuple[str, str]]:
    return Counter({(str(caller), str(callee)): int(n) for caller, callee, n in state})


def _canonical(item: tuple[str, dict[str, Any]]) -> tuple[Any, ...]:
    kind, r = item
    ident = r.get("span_id") or r.get("logger") or r.get("change_id") or ""
    # the event id last: two records of one pod at the same time (e.g. one sample imported under two ids) keep one
    # order whatever their arrival
    return (KINDS.index(kind), r.get("pod", ""), _ms(r["event_time"]), str(r.get("trace_id") or ""), str(ident),
            str(r.get("event_id") or ""))  # fmt: skip


def run(
    records: Iterable[tuple[str, Mapping[str, Any]]], config: EngineConfig | None = None
) -> tuple[list[dict[str, Any]], IncidentEngine]:
    """Feed ``(kind, record)`` pairs through a fresh engine and flush; return the insights and the engine."""
    engine = IncidentEngine(config)
    out: list[dict[str, Any]] = []
    for kind, r in records:
        out.extend(engine.feed(kind, r))
    out.extend(engine.flush())
    return out, engine
