"""Evaluate the streaming anomaly detector on NAB series with the NAB scorer.

Plain Python. Each series is streamed through a fresh :class:`~processors.incidents.anomaly.SeriesState`
in row order (the windows are never shown to the detector); an alert is a detection (score 1, every other
row 0), and :mod:`processors.incidents.nab_score` scores the rows at the **fixed** threshold 0.5 of those
0/1 scores, i.e. the detector's own fixed threshold and suppression decide, nothing is tuned on the
labels. :func:`evaluate_raw_scores` scores a detector's raw scores with NAB's own threshold optimisation
instead (how NAB's scoreboard scores the windowed-Gaussian baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from processors.incidents.anomaly import DetectorConfig, SeriesState, make_detector
from processors.incidents.nab_score import (
    PROFILES,
    CorpusScore,
    ScoredRow,
    SeriesScore,
    optimise_threshold,
    score_corpus,
    score_rows,
    sweep_rows,
)

__all__ = [
    "LOO_SUPPRESS",
    "LOO_THRESHOLDS",
    "AnomalyEvaluation",
    "LabelledSeries",
    "LeaveOneOut",
    "evaluate_alerts",
    "evaluate_raw_scores",
    "gate_scores",
    "leave_one_out",
    "raw_scores",
]

LOO_THRESHOLDS: tuple[float, ...] = (0.99, 0.995, 0.999, 0.9995)
"""Thresholds :func:`leave_one_out` chooses from."""
LOO_SUPPRESS: tuple[int, ...] = (100, 150, 200, 300)
"""Suppressions (samples) :func:`leave_one_out` chooses from."""


class LabelledSeries(Protocol):
    """A series with its ground truth (e.g. :class:`connectors.nab.NabSeries`): ``name``, ``series`` (the
    event key), ascending aware ``timestamps``, ``values`` and labelled ``windows``."""

    name: str
    timestamps: list[datetime]
    values: list[float]
    windows: list[tuple[datetime, datetime]]

    @property
    def series(self) -> str: ...


@dataclass(slots=True)
class AnomalyEvaluation:
    """Scores of one detector configuration on a set of series.

    Attributes:
        detector: detector name and version.
        threshold_mode: ``fixed`` (the detector's own threshold) or ``nab-optimised``.
        series: number of series.
        scores: profile name → :class:`CorpusScore`.
    """

    detector: str
    threshold_mode: str
    series: int
    scores: dict[str, CorpusScore]

    def as_dict(self) -> dict[str, Any]:
        """The JSON of ``backbone eval anomalies``: series, score_standard, precision, recall and more."""
        std = self.scores["standard"]
        return {
            "series": self.series,
            "score_standard": round(std.score, 2),
            "precision": round(std.precision, 4),
            "recall": round(std.recall, 4),
            "score_reward_low_FP_rate": round(self.scores["reward_low_FP_rate"].score, 2),
            "score_reward_low_FN_rate": round(self.scores["reward_low_FN_rate"].score, 2),
            "windows": std.windows,
            "detected_windows": std.detected_windows,
            "detections": std.detections,
            "detector": self.detector,
            "threshold_mode": self.threshold_mode,
            "threshold": std.threshold,
        }


def evaluate_alerts(
    series: Sequence[LabelledSeries], config: DetectorConfig | None = None
) -> AnomalyEvaluation:
    """Stream each series through a fresh state and score its alerts (fixed threshold, no fitting).

    Args:
        series: e.g. from :func:`connectors.nab.read_nab`.
        config: detector, threshold and suppression.

    Returns:
        The evaluation under the three NAB profiles.
    """
    config = config or DetectorConfig()
    swept = {}
    version = ""
    for s in series:
        state = SeriesState(s.series, config)
        version = state.detector.version
        flags = []
        for t, v in zip(s.timestamps, s.values, strict=True):
            _, alert = state.observe(t, v)
            flags.append(1.0 if alert is not None else 0.0)
        swept[s.name] = sweep_rows(s.timestamps, flags, s.windows)
    scores = {name: score_corpus(swept, 0.5, p) for name, p in PROFILES.items()}
    return AnomalyEvaluation(f"{version} threshold={config.threshold} suppress={config.suppress}", "fixed",
                             len(series), scores)  # fmt: skip


def raw_scores(s: LabelledSeries, detector: str, **params: Any) -> list[float]:
    """The raw scores of a fresh ``detector`` over one series, in row order (scored before learnt)."""
    det = make_detector(detector, **params)
    return [det.score_learn(v, t.timestamp()) for t, v in zip(s.timestamps, s.values, strict=True)]


def evaluate_raw_scores(series: Sequence[LabelledSeries], detector: str, **params: Any) -> AnomalyEvaluation:
    """Score a detector's raw scores with NAB's threshold optimisation (one threshold per profile for the
    whole set, as NAB's scoreboard does; this fits the threshold on the labels)."""
    swept = {s.name: sweep_rows(s.timestamps, raw_scores(s, detector, **params), s.windows) for s in series}
    scores = {name: optimise_threshold(swept, p) for name, p in PROFILES.items()}
    return AnomalyEvaluation(make_detector(detector, **params).version, "nab-optimised", len(series), scores)


def gate_scores(scores: Sequence[float], threshold: float, suppress: int) -> list[float]:
    """The alert gate of :class:`~processors.incidents.anomaly.SeriesState` on precomputed scores: 1.0 where
    a sample raises an alert (score at least ``threshold`` and no alert in the ``suppress`` samples
    before), else 0.0 (a series with strictly increasing times, as NAB's, so nothing is out of order)."""
    out = [0.0] * len(scores)
    last: int | None = None
    for i, score in enumerate(scores):
        if score >= threshold and (last is None or i - last > suppress):
            last = i
            out[i] = 1.0
    return out


@dataclass(slots=True)
class LeaveOneOut:
    """Leave-one-series-out score of a detector's threshold and suppression (see :func:`leave_one_out`).

    Attributes:
        score_standard: normalised standard-profile score of the held-out series together.
        chosen: series name → (threshold, suppression) chosen on the other series.
    """

    score_standard: float
    chosen: dict[str, tuple[float, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``score_standard`` and ``chosen`` (series → [threshold, suppress])."""
        return {"score_standard": round(self.score_standard, 2),
                "chosen": {k: list(v) for k, v in self.chosen.items()}}  # fmt: skip


def leave_one_out(
    series: Sequence[LabelledSeries],
    detector: str,
    thresholds: Sequence[float] = LOO_THRESHOLDS,
    suppress: Sequence[int] = LOO_SUPPRESS,
) -> LeaveOneOut:
    """How a threshold and suppression chosen on labelled series fare on a series not among them.

    For each series, the (threshold, suppression) pair with the best standard score on the **other**
    series (ties: the first in ``thresholds`` x ``suppress`` order) scores the held-out one; the held-out
    raw scores are summed and normalised together (null and perfect detectors over all windows). The
    detector's scores are computed once per series (fresh detector, row order), then gated as
    :class:`~processors.incidents.anomaly.SeriesState` gates them (:func:`gate_scores`).

    Args:
        series: at least two labelled series.
        detector: detector name.
        thresholds, suppress: the grid chosen from.

    Returns:
        The held-out score and the choice per series.

    Raises:
        ValueError: fewer than two series.
    """
    if len(series) < 2:
        raise ValueError(f"leave-one-out needs at least two series, got {len(series)}")
    profile = PROFILES["standard"]
    parts: dict[tuple[float, int], dict[str, SeriesScore]] = {}
    for s in series:
        scores = raw_scores(s, detector)
        rows = sweep_rows(s.timestamps, scores, s.windows)
        for t in thresholds:
            for k in suppress:
                gated = [ScoredRow(r.index, flag, r.tp_value, r.fp_value, r.window, r.probation)
                         for r, flag in zip(rows, gate_scores(scores, t, k), strict=True)]  # fmt: skip
                parts.setdefault((t, k), {})[s.name] = score_rows(gated, 0.5, profile)

    def normalised(raw: float, windows: int) -> float:
        null, perfect = -profile.fn_weight * windows, profile.tp_weight * windows
        return 100.0 * (raw - null) / (perfect - null) if perfect != null else 0.0

    raw, windows = 0.0, 0
    chosen: dict[str, tuple[float, int]] = {}
    for held in (s.name for s in series):
        best, best_score = next(iter(parts)), -float("inf")
        for setting, by_series in parts.items():
            others = [p for n, p in by_series.items() if n != held]
            score = normalised(sum(p.raw for p in others), sum(p.windows for p in others))
            if score > best_score:
                best, best_score = setting, score
        chosen[held] = best
        raw += parts[best][held].raw
        windows += parts[best][held].windows
    value = normalised(raw, windows)
    return LeaveOneOut(value, chosen)
