"""The Numenta Anomaly Benchmark (NAB) score, re-implemented from its published scoring rules.

Plain Python, no Kafka. Reads nothing itself; :mod:`connectors.nab` reads the files. The rules are those
of NAB v1.1 (numenta/NAB @ ea702d7, ``nab/sweeper.py``, ``nab/scorer.py``, ``config/profiles.json``;
Lavin & Ahmad, "Evaluating Real-time Anomaly Detection Algorithms - the Numenta Anomaly Benchmark",
ICMLA 2015):

* **Probationary period**: the first ``min(floor(0.15 * n), 0.15 * 5000)`` rows of a series of ``n``
  rows are not scored (a detector is learning).
* **Windows**: each labelled anomaly window ``[start, end]`` (timestamps of rows, inclusive). A row inside
  a window scores as a true positive with the **scaled sigmoid** of its relative position
  ``y = -(right - i + 1) / width`` (``width`` = rows in the window), ``sigma(y) = 2 / (1 + exp(5 y)) - 1``,
  divided by ``sigma(-1)`` so the first row of a window is worth exactly ``A_TP``. Only the best (the
  earliest) detection of a window counts. A window without a detection costs ``-A_FN``.
* A detection **outside** a window is a false positive worth ``A_FP * sigma(d)`` with
  ``d = |i - right_prev| / (width_prev - 1)`` measured from the end of the previous window (``sigma`` is
  -1 beyond ``d > 3`` and when no window came before), so a late detection just after a window costs
  little and a distant one costs ``A_FP``. Each false-positive row counts.
* **Profiles** (weights ``A_TP, A_FP, A_FN``): standard (1, 0.11, 1), reward_low_FP_rate (1, 0.22, 1),
  reward_low_FN_rate (1, 0.11, 2).
* **Normalisation** over a corpus: ``100 * (S - S_null) / (S_perfect - S_null)``, where the null detector
  detects nothing (``S_null = -A_FN * windows``) and the perfect detector flags the first row of each window
  (``S_perfect = A_TP * windows``).
* **Threshold**: a row is a detection when its anomaly score is ``>= threshold``. NAB optimises one
  threshold per detector and profile over the whole corpus (:func:`optimise_threshold` does the same
  search over the distinct scores); the backbone's evaluation uses a **fixed** threshold unless told
  otherwise, because a threshold fitted on the labels is fitting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "PROBATION_PERCENT",
    "PROFILES",
    "CorpusScore",
    "Profile",
    "ScoredRow",
    "SeriesScore",
    "optimise_threshold",
    "probation_rows",
    "scaled_sigmoid",
    "score_corpus",
    "score_rows",
    "score_series",
    "sweep_rows",
]

PROBATION_PERCENT = 0.15


@dataclass(frozen=True, slots=True)
class Profile:
    """Application profile of NAB: the weights of a true positive, a false positive and a missed window."""

    name: str
    tp_weight: float
    fp_weight: float
    fn_weight: float


PROFILES: dict[str, Profile] = {
    "standard": Profile("standard", 1.0, 0.11, 1.0),
    "reward_low_FP_rate": Profile("reward_low_FP_rate", 1.0, 0.22, 1.0),
    "reward_low_FN_rate": Profile("reward_low_FN_rate", 1.0, 0.11, 2.0),
}


def scaled_sigmoid(y: float) -> float:
    """NAB's scaled sigmoid: ``2 / (1 + exp(5 y)) - 1``, and ``-1`` for ``y > 3``.

    Args:
        y: relative position (negative inside a window, positive after it), unitless.

    Returns:
        A value in ``(-1, 1)``: near 1 at the start of a window, 0 at its end, towards -1 after it.
    """
    if y > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


def probation_rows(n_rows: int, percent: float = PROBATION_PERCENT) -> int:
    """Rows at the start of a series that NAB does not score: ``min(floor(p * n), p * 5000)``."""
    return int(min(math.floor(percent * n_rows), percent * 5000))


@dataclass(frozen=True, slots=True)
class ScoredRow:
    """One row with what detecting it would be worth.

    Attributes:
        index: row number in the series (0-based).
        anomaly_score: the detector's score of the row.
        tp_value: unweighted scaled sigmoid when the row lies in a window (``sigma(y) / sigma(-1)``), else None.
        fp_value: unweighted scaled sigmoid (negative) when the row lies outside every window, else None.
        window: index of the window the row lies in, else None.
        probation: True in the probationary period (never scored).
    """

    index: int
    anomaly_score: float
    tp_value: float | None
    fp_value: float | None
    window: int | None
    probation: bool


def sweep_rows(
    timestamps: Sequence[datetime], scores: Sequence[float], windows: Sequence[tuple[datetime, datetime]]
) -> list[ScoredRow]:
    """What each row is worth if detected (NAB's sweep of one series).

    Args:
        timestamps: the rows' times, ascending.
        scores: the detector's anomaly score per row (same length).
        windows: labelled windows ``(start, end)``, inclusive, ascending, not overlapping. A window edge
            that is not a row time is moved inward to the nearest row inside it.

    Returns:
        One :class:`ScoredRow` per row.

    Raises:
        ValueError: lengths differ.
    """
    if len(timestamps) != len(scores):
        raise ValueError(f"{len(timestamps)} timestamps but {len(scores)} scores")
    n = len(timestamps)
    bounds: list[tuple[int, int]] = []
    for start, end in windows:
        left = next((i for i, t in enumerate(timestamps) if t >= start), None)
        right = next((i for i in range(n - 1, -1, -1) if timestamps[i] <= end), None)
        if left is not None and right is not None and left <= right:
            bounds.append((left, right))
    probation = probation_rows(n)
    max_tp = scaled_sigmoid(-1.0)
    rows: list[ScoredRow] = []
    w = 0
    prev: tuple[int, int] | None = None
    for i in range(n):
        while w < len(bounds) and bounds[w][1] < i:
            prev = bounds[w]
            w += 1
        inside = w < len(bounds) and bounds[w][0] <= i <= bounds[w][1]
        tp = fp = None
        if inside:
            left, right = bounds[w]
            tp = scaled_sigmoid(-(right - i + 1) / float(right - left + 1)) / max_tp
        elif prev is None:
            fp = -1.0
        else:
            left, right = prev
            width = right - left + 1
            fp = scaled_sigmoid(abs(right - i) / float(width - 1)) if width > 1 else -1.0
        rows.append(ScoredRow(i, float(scores[i]), tp, fp, w if inside else None, i < probation))
    return rows


@dataclass(slots=True)
class SeriesScore:
    """Raw NAB score of one series under one profile and threshold.

    Attributes:
        raw: the raw score ``sum(TP) + sum(FP) - A_FN * missed windows``.
        windows: labelled windows in the series (after probation-independent clipping to rows).
        detected_windows: windows with at least one detection.
        detections: scored rows (after probation) at or above the threshold.
        true_detections: those inside a window.
    """

    raw: float = 0.0
    windows: int = 0
    detected_windows: int = 0
    detections: int = 0
    true_detections: int = 0


def score_rows(rows: Sequence[ScoredRow], threshold: float, profile: Profile) -> SeriesScore:
    """Score swept rows at one threshold (a row is a detection when ``anomaly_score >= threshold``).

    Args:
        rows: from :func:`sweep_rows`.
        threshold: the detection threshold, same scale as the scores.
        profile: the weights.

    Returns:
        The raw score and counts.
    """
    windows = {r.window for r in rows if r.window is not None}
    best: dict[int, float] = {}
    out = SeriesScore(windows=len(windows))
    for r in rows:
        if r.probation or r.anomaly_score < threshold:
            continue
        out.detections += 1
        if r.window is not None:
            out.true_detections += 1
            assert r.tp_value is not None
            best[r.window] = max(best.get(r.window, -math.inf), r.tp_value)
        else:
            assert r.fp_value is not None
            out.raw += profile.fp_weight * r.fp_value
    out.raw += profile.tp_weight * sum(best.values())
    out.detected_windows = len(best)
    out.raw -= profile.fn_weight * (len(windows) - len(best))
    return out


def score_series(
    timestamps: Sequence[datetime],
    scores: Sequence[float],
    windows: Sequence[tuple[datetime, datetime]],
    threshold: float,
    profile: Profile = PROFILES["standard"],
) -> SeriesScore:
    """:func:`sweep_rows` then :func:`score_rows`."""
    return score_rows(sweep_rows(timestamps, scores, windows), threshold, profile)


@dataclass(slots=True)
class CorpusScore:
    """Normalised NAB score of a set of series.

    Attributes:
        score: ``100 * (raw - null) / (perfect - null)``.
        raw: sum of the series' raw scores.
        null: raw score of the null detector (``-A_FN * windows``).
        perfect: raw score of the perfect detector (``A_TP * windows``).
        threshold: the threshold used.
        windows, detected_windows, detections, true_detections: summed counts.
        per_series: raw score per series name.
    """

    score: float
    raw: float
    null: float
    perfect: float
    threshold: float
    windows: int
    detected_windows: int
    detections: int
    true_detections: int
    per_series: dict[str, float] = field(default_factory=dict)

    @property
    def recall(self) -> float:
        """Share of windows with at least one detection."""
        return self.detected_windows / self.windows if self.windows else 0.0

    @property
    def precision(self) -> float:
        """Share of detections (scored rows at or above the threshold) that lie inside a window."""
        return self.true_detections / self.detections if self.detections else 0.0


def score_corpus(swept: Mapping[str, Sequence[ScoredRow]], threshold: float, profile: Profile) -> CorpusScore:
    """Normalised score of several swept series at one threshold.

    Args:
        swept: series name → rows from :func:`sweep_rows`.
        threshold: detection threshold.
        profile: the weights.

    Returns:
        The corpus score (100 = perfect detector, 0 = null detector; negative is worse than detecting nothing).
    """
    parts = {name: score_rows(rows, threshold, profile) for name, rows in swept.items()}
    windows = sum(p.windows for p in parts.values())
    raw = sum(p.raw for p in parts.values())
    null = -profile.fn_weight * windows
    perfect = profile.tp_weight * windows
    score = 100.0 * (raw - null) / (perfect - null) if perfect != null else 0.0
    return CorpusScore(
        score=score, raw=raw, null=null, perfect=perfect, threshold=threshold, windows=windows,
        detected_windows=sum(p.detected_windows for p in parts.values()),
        detections=sum(p.detections for p in parts.values()),
        true_detections=sum(p.true_detections for p in parts.values()),
        per_series={k: p.raw for k, p in parts.items()},
    )  # fmt: skip


def optimise_threshold(
    swept: Mapping[str, Sequence[ScoredRow]], profile: Profile, *, candidates: Sequence[float] | None = None
) -> CorpusScore:
    """NAB's threshold optimisation: the threshold with the best corpus score.

    NAB sweeps every distinct score; here the candidates default to the distinct scored values (at most
    200 quantiles of them), which finds the same maximum up to ties between neighbouring values.

    Args:
        swept: series name → swept rows.
        profile: the weights.
        candidates: thresholds to try (default: see above).

    Returns:
        The best :class:`CorpusScore` (highest threshold on a tie).
    """
    if candidates is None:
        values = sorted({r.anomaly_score for rows in swept.values() for r in rows if not r.probation})
        if len(values) > 200:
            values = [values[int(k * (len(values) - 1) / 199)] for k in range(200)]
        candidates = [*values, math.inf]
    best: CorpusScore | None = None
    for t in sorted(candidates, reverse=True):
        s = score_corpus(swept, t, profile)
        if best is None or s.score > best.score:
            best = s
    assert best is not None
    return best
