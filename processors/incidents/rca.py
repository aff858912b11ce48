"""Root-cause ranking of an incident: anomalies of pods + the call graph seen in traces.

Plain Python, deterministic (ties broken by name). The idea, as in trace-based RCA (MicroRCA,
Nezha): a fault shows on its own pod first and spreads *upstream*, to the callers that wait for it or
receive its errors. So among anomalous pods, the one whose own callees are healthy is the likelier
origin; a caller whose callee is at least as anomalous is more likely a victim. What spreads upstream
is a *symptom* (latency, errors); a pod's own resource saturation (CPU, memory) does not spread to its
callers and is not inherited from its callees.

Score of a pod (its evidence is every anomaly of the incident on that pod):

* each anomaly weighs ``weight(signal) * log1p(score)``; new ERROR/FATAL log templates and error
  counts weigh :data:`LOG_WEIGHT`, a new WARN template :data:`WARN_FACTOR` of it (a WARN is a handled
  condition, often a routine business outcome: on Nezha 2023-01-29 four of the five WARN templates,
  e.g. ``No content``, ``Left ticket info is empty``, ``Verify code start``, are in 7 to 9 of the 10
  one-minute log windows; a failing request logs an ERROR), span latency :data:`TRACE_WEIGHT`, metrics 1;
* signals are grouped by evidence kind (:func:`evidence_kind`): ``resource`` (CPU, memory),
  ``latency`` (server latency percentiles, span durations) and ``errors`` (log templates, error
  counts). A kind counts once, by its strongest anomaly: P90 and P99 of one latency histogram, or the
  same signal in three windows, are one piece of evidence, not several. The pod's evidence is the sum
  over kinds, so independent kinds of evidence reinforce each other;
* call graph: when a callee (an edge ``pod -> callee`` in the traces) has evidence at least
  ``victim_ratio`` times the pod's *symptom* evidence (latency + errors), that symptom evidence is
  multiplied by :data:`VICTIM_FACTOR` (it is probably inherited); its resource evidence is kept. A
  callee gains :data:`BLAME_BONUS` of each anomalous caller's symptom evidence (a caller whose only
  anomaly is its own CPU points at nobody);
* error propagation (``error_graph``, from traces: a caller's ERROR line in a span below which a
  callee's span logged an ERROR in the same trace): the caller's ``errors`` evidence is inherited --
  it keeps :data:`VICTIM_FACTOR` of it and the callee gains the rest, split by the traces that link
  them (so the evidence is moved, not created). Unlike the call graph, which says only who *can*
  call whom, such a trace shows the error travelling from the callee up to the caller. A callee
  gains this even without an anomaly of its own (its error template may be old, e.g. a fault that
  repeats on the same pod), but only from an anomalous caller;
* the front end is a symptom, never a candidate (it is the entry of every call chain).

Services are ranked by the best of their pods.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from processors.incidents.nezha_detect import Anomaly

__all__ = [
    "BLAME_BONUS",
    "LOG_WEIGHT",
    "TRACE_WEIGHT",
    "VICTIM_FACTOR",
    "WARN_FACTOR",
    "Candidate",
    "evidence_kind",
    "rank",
]

LOG_WEIGHT = 3.0
WARN_FACTOR = 0.5
TRACE_WEIGHT = 1.5
VICTIM_FACTOR = 0.5
BLAME_BONUS = 0.25
_NOT_CANDIDATES = frozenset({"frontend"})


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ranked root-cause candidate.

    Attributes:
        rank: 1-based.
        pod: the pod.
        service: its service.
        score: the rank score (evidence adjusted by the call graph).
        evidence: one line per reason, strongest first (signal, score, value vs baseline, graph notes).
    """

    rank: int
    pod: str
    service: str
    score: float
    evidence: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"rank": self.rank, "pod": self.pod, "service": self.service, "score": round(self.score, 3),
                "evidence": list(self.evidence)}  # fmt: skip


_RESOURCE = ("metric:CpuUsageRate", "metric:MemoryUsageRate")
_SYMPTOMS = ("latency", "errors")


def evidence_kind(signal: str) -> str:
    """The evidence kind of a signal: ``resource`` (CPU, memory of the pod), ``errors`` (``log:*``),
    ``latency`` (``trace:*`` and the latency / success-rate metrics)."""
    if signal.startswith(_RESOURCE):
        return "resource"
    if signal.startswith("log:"):
        return "errors"
    return "latency"


def _weight(a: Anomaly) -> float:
    signal = a.signal
    if signal.startswith("log:"):
        return LOG_WEIGHT * (WARN_FACTOR if a.detail.startswith("WARN ") else 1.0)
    if signal.startswith("trace:"):
        return TRACE_WEIGHT
    return 1.0


def rank(
    anomalies: Iterable[Anomaly],
    call_graph: Mapping[str, Mapping[str, int]],
    *,
    error_graph: Mapping[str, Mapping[str, int]] | None = None,
    services: Mapping[str, str] | None = None,
    victim_ratio: float = 1.0,
    limit: int = 5,
) -> list[Candidate]:
    """Rank the pods of ``anomalies`` as root-cause candidates.

    Args:
        anomalies: the incident's anomalies.
        call_graph: ``caller pod -> {callee pod: calls seen}`` from trace spans.
        error_graph: ``caller pod -> {callee pod: traces}`` where the callee's ERROR explains the
            caller's (see the module docstring); None or empty: no trace-linked errors.
        services: ``pod -> service`` for pods that appear only in ``error_graph``; a pod without
            one is named as its own service.
        victim_ratio: a callee with evidence >= this times the pod's makes the pod a likely victim.
        limit: most candidates returned.

    Returns:
        Candidates, best first (ties by pod name).
    """
    best: dict[str, dict[str, Anomaly]] = defaultdict(dict)
    pod_service: dict[str, str] = {}
    for a in anomalies:
        if a.pod in _NOT_CANDIDATES:
            continue
        pod_service[a.pod] = a.service
        cur = best[a.pod].get(a.signal)
        if cur is None or (a.score, -a.window_start_ms) > (cur.score, -cur.window_start_ms):
            best[a.pod][a.signal] = a
    kinds: dict[str, dict[str, float]] = {}
    for pod, sigs in best.items():
        per: dict[str, float] = defaultdict(float)
        for s, a in sigs.items():
            k = evidence_kind(s)
            per[k] = max(per[k], _weight(a) * math.log1p(a.score))
        kinds[pod] = per
    evidence = {pod: sum(per.values()) for pod, per in kinds.items()}
    symptom = {pod: sum(per[k] for k in _SYMPTOMS if k in per) for pod, per in kinds.items()}
    notes: dict[str, list[str]] = defaultdict(list)
    score = dict(evidence)
    for pod in sorted(evidence):
        callees = sorted(c for c in call_graph.get(pod, {}) if c in evidence and c != pod)
        sym = symptom[pod]
        worse = [c for c in callees if sym > 0 and evidence[c] >= victim_ratio * sym]
        if worse:
            score[pod] -= (1 - VICTIM_FACTOR) * sym
            notes[pod].append(
                f"calls anomalous {', '.join(worse)}: likely a victim, latency/errors inherited (x{VICTIM_FACTOR})"
            )
        if sym > 0:
            for c in callees:
                score[c] += BLAME_BONUS * sym
                notes[c].append(f"called by anomalous {pod} (+{BLAME_BONUS * sym:.2f})")
    for pod in sorted((error_graph or {}).keys() & kinds.keys()):
        errs = kinds[pod].get("errors", 0.0)
        links = {
            c: n
            for c, n in (error_graph or {})[pod].items()
            if c != pod and c not in _NOT_CANDIDATES and n > 0
        }
        if errs <= 0 or not links:
            continue
        moved = (1 - VICTIM_FACTOR) * errs
        score[pod] -= moved
        total = sum(links.values())
        notes[pod].append(
            f"its errors follow errors of {', '.join(sorted(links))} in the same traces: inherited (x{VICTIM_FACTOR})"
        )
        for c, n in sorted(links.items()):
            share = moved * n / total
            score[c] = score.get(c, 0.0) + share
            pod_service.setdefault(c, (services or {}).get(c, c))
            best.setdefault(c, {})
            notes[c].append(f"errors propagate from it to {pod} in {n} trace(s) (+{share:.2f})")
    order = sorted(score, key=lambda p: (-score[p], p))[:limit]
    out = []
    for i, pod in enumerate(order, 1):
        lines = [
            f"{a.signal} score {a.score:.1f}: {a.value:g} vs median {a.baseline:g}"
            + (f" ({a.detail})" if a.detail else "")
            for a in sorted(best[pod].values(), key=lambda a: (-a.score, a.signal))
        ]
        out.append(Candidate(i, pod, pod_service[pod], score[pod], tuple(lines + notes[pod])))
    return out
