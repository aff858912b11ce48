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
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from processors.incidents.anomaly import DetectorConfig, SeriesState, make_detector
from processors.incidents.nab_score import PROFILES, CorpusScore, optimise_threshold, score_corpus, sweep_rows

__all__ = ["AnomalyEvaluation", "LabelledSeries", "evaluate_alerts", "evaluate_raw_scores", "raw_scores"]


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
