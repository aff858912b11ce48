"""Score incident detection and root-cause ranking on Nezha days against ``fault_list.json``.

Reads a day folder (or a folder of day folders) with :func:`connectors.nezha.iter_day` -- the same
parser the importer uses -- feeds the telemetry through :class:`processors.incidents.incident.
IncidentEngine` in event-time order, and matches the ``incident.opened`` / ``incident.closed``
insights to the injected faults (ground truth, read only here).

Matching: a fault is *detected* by the first ``incident.opened`` or ``incident.updated`` insight
whose window ends after ``inject_time`` and starts before ``inject_time + match_horizon_seconds`` and
before the next fault's injection (an incident already open when the fault starts detects it when
it gains anomalies of the fault's windows). The detection time is that insight's event time (end of
its window plus the allowed lateness) minus ``inject_time``. Root cause: the ranked candidates of that incident's ``incident.closed`` insight; top-k
is right when the injected pod (or its service) is among the first k (undetected faults count as
wrong). Incidents matched to no fault are reported as ``false_incidents`` with their rate per hour of
telemetry, so a detector that raises incidents all the time cannot look good.

Chance baseline (``chance``): the same insights matched the same way to the faults with every
injection time moved by :data:`CHANCE_SHIFTS_MINUTES` (a few minutes, about half and one whole gap
between this day's faults, so the moved times fall between faults in the same busy hours). A
detector that finds faults scores clearly above it; one whose matches come from incidents that
happen to be open anyway scores about the same.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from connectors.nezha import Fault, ImportReport, day_folders, iter_day, load_faults
from processors.incidents.incident import EngineConfig, IncidentEngine

__all__ = ["CHANCE_SHIFTS_MINUTES", "TELEMETRY_KINDS", "FaultResult", "evaluate"]

CHANCE_SHIFTS_MINUTES = (-8, -4, 4, 8)
"""Shifts of every fault's time for the chance baseline (see :func:`evaluate`)."""

TELEMETRY_KINDS = {"telemetry.metrics": "metric", "telemetry.logs": "log", "telemetry.spans": "span"}
"""The engine's record kind (:data:`processors.incidents.incident.KINDS`) of each telemetry topic the Nezha
importer (:func:`connectors.nezha.iter_day`) produces to."""


@dataclass(frozen=True, slots=True)
class FaultResult:
    """The outcome for one fault (``rank_pod``/``rank_service`` are 1-based, None when absent)."""

    inject_time: str
    pod: str
    kind: str
    logs_or_traces: bool
    detected: bool
    detection_seconds: float | None
    rank_pod: int | None
    rank_service: int | None
    top1_pod: str | None


def evaluate(
    path: Path, *, config: EngineConfig | None = None, match_horizon_seconds: float = 300.0
) -> dict[str, Any]:
    """Run the engine on every day under ``path`` and score it.

    Returns:
        ``{"faults", "detected", "median_detection_seconds", "top1", "top3", "top1_service",
        "top3_service"}`` (shares in [0, 1]; ``detected`` is a share too; the median over detected
        faults, null when none), plus ``detected_within_180s``, ``incidents``, ``false_incidents``,
        ``false_incidents_per_hour``, ``telemetry_hours``, the same scores for the faults with log or
        trace records within two minutes of injection (``with_logs_or_traces``) and for the others
        (``metrics_only``), ``chance`` (``detected``, ``detected_within_180s``, ``top1`` and ``top3``
        averaged over the shifted fault times, ``shifts_minutes``, ``per_shift``), ``engine``
        (counters), ``import`` (counts), ``per_fault`` rows and ``ranked`` (``{incident entity: [pod,
        ...]}``: the root-cause candidates of each incident's last insight, best first).

    Raises:
        connectors.nezha.NezhaImportError: no day folder, or a day without ``fault_list.json``.
    """
    results: list[FaultResult] = []
    chance: dict[int, list[FaultResult]] = {}
    incidents = false_incidents = 0
    hours = 0.0
    engines: list[dict[str, Any]] = []
    ranked: dict[str, list[str]] = {}
    report = ImportReport()
    for day in day_folders(path):
        faults = load_faults(day)
        engine = IncidentEngine(config)
        insights: list[dict[str, Any]] = []
        first = last = None
        covered_ms: set[int] = set()
        for topic, event in iter_day(day, report):
            t = event.attributes.time
            if topic != "telemetry.metrics":
                covered_ms.add(int(t.timestamp()) // 60 * 60_000)
            first = t if first is None else min(first, t)
            last = t if last is None else max(last, t)
            insights.extend(engine.feed(TELEMETRY_KINDS[topic], event.data))
        insights.extend(engine.flush())
        engines.append({"day": day.name, **engine.stats()})
        if first is not None and last is not None:
            hours += (last - first).total_seconds() / 3600
        window_ms = engine.config.window_ms
        active = sorted(
            (i for i in insights if i["kind"] in ("incident.opened", "incident.updated")),
            key=lambda i: (i["event_time"], i["insight_id"]),
        )
        opened = [i for i in active if i["kind"] == "incident.opened"]
        closed = {i["entity"]: i for i in insights if i["kind"] == "incident.closed"}
        for i in insights:  # in emission order: each incident's last insight wins
            ranked[i["entity"]] = [c["pod"] for c in json.loads(i["labels"]["candidates"])]
        incidents += len(opened)
        day_results, used = _match(faults, active, closed, covered_ms, window_ms, match_horizon_seconds)
        results.extend(day_results)
        for s in CHANCE_SHIFTS_MINUTES:
            moved = [replace(f, inject_time=f.inject_time + timedelta(minutes=s)) for f in faults]
            chance.setdefault(s, []).extend(
                _match(moved, active, closed, covered_ms, window_ms, match_horizon_seconds)[0]
            )
        false_incidents += sum(1 for i in opened if i["entity"] not in used)
    scores = _scores(results)
    covered = [r for r in results if r.logs_or_traces]
    return {
        **scores,
        "incidents": incidents,
        "false_incidents": false_incidents,
        "telemetry_hours": round(hours, 2),
        "false_incidents_per_hour": round(false_incidents / hours, 3) if hours else None,
        "with_logs_or_traces": _scores(covered),
        "metrics_only": _scores([r for r in results if not r.logs_or_traces]),
        "chance": _chance(chance),
        "engine": engines,
        "import": {k: v for k, v in report.as_dict().items() if k != "bad_records"},
        "per_fault": [_row(r) for r in results],
        "ranked": ranked,
    }


def _match(
    faults: list[Fault],
    active: list[dict[str, Any]],
    closed: dict[str, dict[str, Any]],
    covered_ms: set[int],
    window_ms: int,
    match_horizon_seconds: float,
) -> tuple[list[FaultResult], set[str]]:
    """Match ``faults`` (sorted by time) to the incident insights; returns the rows and the matched incidents."""
    results: list[FaultResult] = []
    used: set[str] = set()
    for n, f in enumerate(faults):
        t0 = int(f.inject_time.timestamp() * 1000)
        end = t0 + int(match_horizon_seconds * 1000)
        covered = any(m in covered_ms for m in range(t0 // 60_000 * 60_000, t0 + 120_000, 60_000))
        if n + 1 < len(faults):
            end = min(end, int(faults[n + 1].inject_time.timestamp() * 1000))
        match = next(
            (
                i
                for i in active
                if t0 < i["metrics"]["window_ms"] + window_ms and i["metrics"]["window_ms"] < end
            ),
            None,
        )
        if match is None:
            results.append(
                FaultResult(_fmt(f.inject_time), f.pod, f.kind, covered, False, None, None, None, None)
            )
            continue
        used.add(match["entity"])
        final = closed.get(match["entity"], match)
        cands = json.loads(final["labels"]["candidates"])
        pods = [c["pod"] for c in cands]
        services = list(dict.fromkeys(c["service"] for c in cands))
        results.append(
            FaultResult(
                _fmt(f.inject_time), f.pod, f.kind, covered, True, (match["event_time"] - t0) / 1000,
                pods.index(f.pod) + 1 if f.pod in pods else None,
                services.index(f.service) + 1 if f.service in services else None,
                pods[0] if pods else None,
            )
        )  # fmt: skip
    return results, used


def _scores(results: list[FaultResult]) -> dict[str, Any]:
    n = len(results)
    delays = [r.detection_seconds for r in results if r.detection_seconds is not None]

    def share(pred: Any) -> float:
        return round(sum(1 for r in results if pred(r)) / n, 4) if n else 0.0

    return {
        "faults": n,
        "detected": share(lambda r: r.detected),
        "median_detection_seconds": statistics.median(delays) if delays else None,
        "top1": share(lambda r: r.rank_pod == 1),
        "top3": share(lambda r: r.rank_pod is not None and r.rank_pod <= 3),
        "top1_service": share(lambda r: r.rank_service == 1),
        "top3_service": share(lambda r: r.rank_service is not None and r.rank_service <= 3),
        "detected_within_180s": share(
            lambda r: r.detection_seconds is not None and r.detection_seconds <= 180
        ),
    }


def _chance(by_shift: dict[int, list[FaultResult]]) -> dict[str, Any]:
    keys = ("detected", "detected_within_180s", "top1", "top3")
    per = {s: _scores(rs) for s, rs in sorted(by_shift.items())}
    mean = {k: round(statistics.fmean(p[k] for p in per.values()), 4) if per else 0.0 for k in keys}
    return {
        "shifts_minutes": list(per),
        **mean,
        "per_shift": {str(s): {k: p[k] for k in keys} for s, p in per.items()},
    }


def _row(r: FaultResult) -> dict[str, Any]:
    return {s: getattr(r, s) for s in FaultResult.__slots__}


def _fmt(t: Any) -> str:
    return (t - timedelta(0)).strftime("%Y-%m-%d %H:%M:%S")
