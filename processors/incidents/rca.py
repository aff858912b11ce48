"""Root-cause ranking of an incident: anomalies of pods + the call graph seen in traces.

Plain Python, deterministic (ties broken by name). The idea, as in trace-based RCA (MicroRCA,
Nezha): a fault shows on its own pod first and spreads *upstream*, to the callers that wait for it or
receive its errors. So among anomalous pods, the one whose own callees are healthy is the likelier
origin; a caller whose callee is at least as anomalous is more likely a victim.

Score of a pod (its evidence is every anomaly of the incident on that pod):

* evidence = sum over its signals of ``weight(signal) * log1p(score)``, the strongest anomaly per
  signal only (a signal that fires in three windows is one piece of evidence, not three);
  new WARN/ERROR log templates weigh :data:`LOG_WEIGHT`, span latency :data:`TRACE_WEIGHT`, metrics 1;
* call graph: when a callee (an edge ``pod -> callee`` in the traces) has evidence at least
  ``victim_ratio`` times the pod's, the pod's rank score is multiplied by :data:`VICTIM_FACTOR`
  (it is probably a victim); a pod that anomalous callers point to gains :data:`BLAME_BONUS` of each
  such caller's evidence;
* the front end is a symptom, never a candidate (it is the entry of every call chain).

Services are ranked by the best of their pods.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from processors.incidents.nezha_detect import Anomaly

__all__ = ["BLAME_BONUS", "LOG_WEIGHT", "TRACE_WEIGHT", "VICTIM_FACTOR", "Candidate", "rank"]

LOG_WEIGHT = 3.0
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


def _weight(signal: str) -> float:
    if signal.startswith("log:"):
        return LOG_WEIGHT
    if signal.startswith("trace:"):
        return TRACE_WEIGHT
    return 1.0


def rank(
    anomalies: Iterable[Anomaly],
    call_graph: Mapping[str, Mapping[str, int]],
    *,
    victim_ratio: float = 1.0,
    limit: int = 5,
) -> list[Candidate]:
    """Rank the pods of ``anomalies`` as root-cause candidates.

    Args:
        anomalies: the incident's anomalies.
        call_graph: ``caller pod -> {callee pod: calls seen}`` from trace spans.
        victim_ratio: a callee with evidence >= this times the pod's makes the pod a likely victim.
        limit: most candidates returned.

    Returns:
        Candidates, best first (ties by pod name).
    """
    best: dict[str, dict[str, Anomaly]] = defaultdict(dict)
    services: dict[str, str] = {}
    for a in anomalies:
        if a.pod in _NOT_CANDIDATES:
            continue
        services[a.pod] = a.service
        cur = best[a.pod].get(a.signal)
        if cur is None or (a.score, -a.window_start_ms) > (cur.score, -cur.window_start_ms):
            best[a.pod][a.signal] = a
    evidence = {
        pod: sum(_weight(s) * math.log1p(a.score) for s, a in sigs.items()) for pod, sigs in best.items()
    }
    notes: dict[str, list[str]] = defaultdict(list)
    score = dict(evidence)
    for pod, ev in evidence.items():
        callees = sorted(c for c in call_graph.get(pod, {}) if c in evidence and c != pod)
        worse = [c for c in callees if evidence[c] >= victim_ratio * ev]
        if worse:
            score[pod] *= VICTIM_FACTOR
            notes[pod].append(f"calls anomalous {', '.join(worse)}: likely a victim (x{VICTIM_FACTOR})")
        for c in callees:
            score[c] += BLAME_BONUS * ev
            notes[c].append(f"called by anomalous {pod} (+{BLAME_BONUS * ev:.2f})")
    order = sorted(score, key=lambda p: (-score[p], p))[:limit]
    out = []
    for i, pod in enumerate(order, 1):
        lines = [
            f"{a.signal} score {a.score:.1f}: {a.value:g} vs median {a.baseline:g}"
            + (f" ({a.detail})" if a.detail else "")
            for a in sorted(best[pod].values(), key=lambda a: (-a.score, a.signal))
        ]
        out.append(Candidate(i, pod, services[pod], score[pod], tuple(lines + notes[pod])))
    return out
