"""Per-series streaming anomaly detection on pod telemetry (metrics, log templates, span latency).

Plain Python, no Faust, no wall clock: every score is computed from the series' own past only (the
sample being scored is added to the history *after* it is scored, so there is no look-ahead).

Why an own detector and not river's ``anomaly.GaussianScorer``: the per-pod latency series of
TrainTicket (Nezha, 2023-01-29) are heavy-tailed -- an idle pod's P99 jumps from 0.005 s to 28.8 s on
a single slow request -- so a mean/variance model is dragged by every spike and then misses the next
real shift. The median and the median absolute deviation (MAD) of a trailing window ignore up to half
the window being outliers (breakdown point 50 %), which is the textbook robust z-score (Iglewicz &
Hoaglin, 1993: modified z = 0.6745 (x - median) / MAD). A floor on the scale (a fraction of the
median and an absolute floor in the series' unit) keeps near-constant series from scoring noise as
infinite. Measured on Nezha 2023-01-29 with the same engine (``bench/nezha_river_baseline.py``):
river 0.26.1 ``GaussianScorer(window_size=60, grace_period=10)`` saturates on the spikes (score 1.0,
so any threshold gives the same result): 183 incidents, 10.2 false incidents per hour, top-1 0 %,
top-3 10.7 % (3.6 % at z 6), and it raised ``TypeError`` (a negative rolling variance turned into a
complex number) 145 times; this detector (``robust-mad-1``, before the workload gate below): 47
incidents, 2.2 false per hour, top-1 17.9 %, top-3 21.4 %; ``robust-mad-2`` (workload gate, template
quiet spell, span self time, evidence kinds in :mod:`processors.incidents.rca`): 23 incidents, 0.78
false per hour, top-1 21.4 %, top-3 21.4 %; ``robust-mad-3`` (log baseline after a gap, template
freshness in event time, trace-linked error propagation in :mod:`processors.incidents.rca`): 23
incidents, 0.78 false per hour, top-1 25.0 %, top-3 25.0 % (the three faults with logs and traces all
top-1).

Signals (one series per pod and signal):

* ``metric:<name>`` -- from ``sophia.telemetry.MetricSample``: ``CpuUsageRate(%)``,
  ``MemoryUsageRate(%)``, ``PodServerLatencyP90(s)``, ``PodServerLatencyP99(s)`` (one-sided: only an
  increase is a symptom; a pod latency percentile only when the pod's ``PodWorkload(Ops)`` (requests
  per second: the server spans of the traced minutes count 50 to 60 a minute per 1.0) times the window
  holds at least ``min_tail_requests`` requests above the percentile, i.e. 10 requests a minute for
  P90, 100 for P99: on fewer, the P99 is the one slowest request and a single slow call would look
  like a pod-wide shift; without a workload value it is scored); front end ``LatencyP90(s)``
  (increase) and ``SuccessRate(%)`` (decrease). Client latencies, workload and network bytes follow
  traffic and downstream pods, not the pod's own health, and node-level columns describe the node:
  they are not scored.
* ``log:new_template`` -- from ``sophia.telemetry.LogLine``: a WARN/ERROR/FATAL ``(level, logger)``
  never seen before on that pod, or not seen on it for more than ``max_incident_ms`` of event time
  (quiet for longer than the longest incident, it cannot belong to the incident it last showed in: a
  new occurrence, e.g. a fault repeated on the same pod); the score grows with how many lines the new
  template wrote in the window. The log stream's first ``log_warmup_windows`` windows, and again the
  first ones after a gap of more than ``log_gap_windows`` windows without any log line, are the
  baseline: what happened in the gap is unknown, so no log anomaly is raised in them, and a template
  present in them is going on, not new. Trade-off: a bursty template absent from the baseline window
  and quiet for longer than an incident before the gap is called new (on 2023-01-29 the order-other
  ``WARN #72`` at 08:51); the ranking's trace-linked error propagation outweighs it there.
* ``log:error_count`` -- ERROR/FATAL lines of a pod per window (0 for a pod that logged before but
  not in this window), scored like a metric once ``log_min_history`` windows with logs are known (not
  in a baseline window: there the count is learnt only).
* ``trace:p90_self_ms`` -- from ``sophia.telemetry.Span``: the P90 of the self times of the pod's
  spans in the window (a span's duration less the durations of its child spans of the same window,
  at least 0), scored like a metric (increase only). Self time, not duration: a caller's span lasts
  as long as its slow callee's, so durations would make every caller on the path look slow; the self
  time grows on the pod that spends the time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from statistics import median
from typing import Any

__all__ = [
    "DETECTOR_VERSION",
    "METRIC_RULES",
    "Anomaly",
    "MetricRule",
    "RobustZ",
]

DETECTOR_VERSION = "robust-mad-3"


@dataclass(frozen=True, slots=True)
class MetricRule:
    """How one metric is scored.

    Attributes:
        direction: ``1`` only increases are anomalous, ``-1`` only decreases.
        abs_floor: smallest scale in the metric's unit (e.g. 1.0 for a percentage), or in natural-log
            units when ``log_scale`` (0.35 is a factor of about 1.4).
        log_scale: score ``ln(value + offset)`` instead of the value: latency percentiles are
            bucket bounds of a histogram (0.0235, 0.475, 0.95 s, ...), so a one-bucket step doubles
            the value; on a log scale every bucket step weighs the same, at any latency.
        offset: added before the logarithm (the smallest latency that matters, in the unit).
        quantile: for a per-pod latency percentile, its level (0.9 for P90): the value is scored only
            when the pod served enough requests in the window that at least one lies above that level
            (see :attr:`processors.incidents.incident.EngineConfig.min_tail_requests`); below that the
            "percentile" is the single slowest request, not a property of the pod.
    """

    direction: int
    abs_floor: float
    log_scale: bool = False
    offset: float = 0.0
    quantile: float | None = None

    def transform(self, value: float) -> float:
        """The value the detector sees."""
        return math.log(max(value, 0.0) + self.offset) if self.log_scale else value


METRIC_RULES: dict[str, MetricRule] = {
    "CpuUsageRate(%)": MetricRule(1, 1.0),
    "MemoryUsageRate(%)": MetricRule(1, 1.0),
    "PodServerLatencyP90(s)": MetricRule(1, 0.35, log_scale=True, offset=0.01, quantile=0.9),
    "PodServerLatencyP99(s)": MetricRule(1, 0.35, log_scale=True, offset=0.01, quantile=0.99),
    "LatencyP90(s)": MetricRule(1, 0.35, log_scale=True, offset=0.01),
    "SuccessRate(%)": MetricRule(-1, 1.0),
}
"""The metrics scored, by the column name of the source (unit in the suffix)."""


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One anomalous value of one series in one window.

    Attributes:
        pod: the pod (``frontend`` for the front end).
        service: the pod's service.
        signal: ``metric:<name>``, ``log:new_template``, ``log:error_count`` or ``trace:p90_self_ms``.
        window_start_ms: start of the one-minute window (epoch ms, event time).
        score: robust z-score (or the log score); higher is more anomalous.
        value: the observed value (for a log template: lines written in the window).
        baseline: the median of the history it was compared with (0 for a log template).
        detail: e.g. the new log template ``ERROR c.s.ContactsServiceImpl#37``.
    """

    pod: str
    service: str
    signal: str
    window_start_ms: int
    score: float
    value: float
    baseline: float
    detail: str = ""

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (the score rounded to 3 decimals)."""
        return {
            "pod": self.pod,
            "service": self.service,
            "signal": self.signal,
            "window_start_ms": self.window_start_ms,
            "score": round(self.score, 3),
            "value": self.value,
            "baseline": self.baseline,
            "detail": self.detail,
        }


@dataclass(slots=True)
class RobustZ:
    """Robust z-score of a value against a trailing window of the series' past values.

    ``score(x)`` = direction * (x - median) / max(1.4826 * MAD, rel_floor * |median|, abs_floor), or 0
    while fewer than ``min_history`` values are known. :meth:`update` scores then adds ``x``.

    Args:
        window: how many past values are kept (bounded state).
        min_history: values needed before any score is given (warm-up).
        direction: 1 scores increases, -1 decreases, 0 both.
        abs_floor: smallest scale, in the series' unit.
        rel_floor: smallest scale as a fraction of the median.
    """

    window: int = 60
    min_history: int = 10
    direction: int = 1
    abs_floor: float = 1e-6
    rel_floor: float = 0.1
    history: deque[float] = field(default_factory=deque)

    def score(self, x: float) -> tuple[float, float]:
        """``(score, median)`` of ``x`` against the history (``(0.0, nan)`` during warm-up)."""
        if len(self.history) < self.min_history:
            return 0.0, math.nan
        med = median(self.history)
        mad = median(abs(h - med) for h in self.history)
        scale = max(1.4826 * mad, self.rel_floor * abs(med), self.abs_floor)
        z = (x - med) / scale
        return (abs(z) if self.direction == 0 else max(0.0, self.direction * z)), med

    def update(self, x: float) -> tuple[float, float]:
        """Score ``x`` against the past, then add it to the history; returns ``(score, median)``."""
        out = self.score(x)
        self.history.append(x)
        if len(self.history) > self.window:
            self.history.popleft()
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state: the parameters and the history (oldest first), floats as they are (``json``
        writes them exactly)."""
        return {"window": self.window, "min_history": self.min_history, "direction": self.direction,
                "abs_floor": self.abs_floor, "rel_floor": self.rel_floor, "history": list(self.history)}  # fmt: skip

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RobustZ:
        """The detector :meth:`to_dict` described.

        Raises:
            KeyError: a field is missing; ``TypeError``/``ValueError``: a field of the wrong type.
        """
        return cls(window=int(state["window"]), min_history=int(state["min_history"]),
                   direction=int(state["direction"]), abs_floor=float(state["abs_floor"]),
                   rel_floor=float(state["rel_floor"]), history=deque(float(v) for v in state["history"]))  # fmt: skip
