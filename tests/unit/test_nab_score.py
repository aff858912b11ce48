"""The NAB scorer on small cases computed by hand from the published rules."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from processors.incidents.nab_score import (
    PROFILES,
    optimise_threshold,
    probation_rows,
    scaled_sigmoid,
    score_corpus,
    score_series,
    sweep_rows,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)
TS = [T0 + timedelta(minutes=5 * i) for i in range(10)]
WINDOW = [(TS[4], TS[6])]  # rows 4, 5, 6: width 3
STD = PROFILES["standard"]


def scores_at(*rows: int) -> list[float]:
    return [1.0 if i in rows else 0.0 for i in range(10)]


def test_scaled_sigmoid_values() -> None:
    """sigma(-1) = 2/(1+e^-5) - 1 = 0.98661, sigma(0) = 0, sigma(1) = -0.98661, and -1 beyond 3."""
    assert scaled_sigmoid(-1.0) == pytest.approx(0.9866143, abs=1e-7)
    assert scaled_sigmoid(0.0) == 0.0
    assert scaled_sigmoid(1.0) == pytest.approx(-0.9866143, abs=1e-7)
    assert scaled_sigmoid(3.5) == -1.0


def test_probation_is_fifteen_percent_capped_at_750_rows() -> None:
    """floor(0.15 n) rows, never more than 750."""
    assert probation_rows(10) == 1
    assert probation_rows(4032) == 604
    assert probation_rows(22695) == 750


def test_first_row_of_window_is_worth_a_full_true_positive() -> None:
    """Detecting row 4 (start of the window): raw = 1, normalised (1 - -1) / (1 - -1) = 100."""
    s = score_series(TS, scores_at(4), WINDOW, 0.5, STD)
    assert s.raw == pytest.approx(1.0)
    c = score_corpus({"a": sweep_rows(TS, scores_at(4), WINDOW)}, 0.5, STD)
    assert c.score == pytest.approx(100.0)
    assert (c.precision, c.recall) == (1.0, 1.0)


def test_last_row_of_window_scores_less() -> None:
    """Row 6: y = -1/3, sigma(-1/3)/sigma(-1) = 0.68222/0.98661 = 0.69152."""
    assert score_series(TS, scores_at(6), WINDOW, 0.5, STD).raw == pytest.approx(0.6915182, abs=1e-6)


def test_only_the_best_detection_of_a_window_counts() -> None:
    """Rows 4, 5 and 6 all detected: the window is worth 1, not the sum."""
    assert score_series(TS, scores_at(4, 5, 6), WINDOW, 0.5, STD).raw == pytest.approx(1.0)


def test_false_positives_before_and_after_the_window() -> None:
    """Row 2 (no window before): -0.11; row 8: d = |6-8|/(3-1) = 1, 0.11 * sigma(1) = -0.108528."""
    s = score_series(TS, scores_at(2, 4, 8), WINDOW, 0.5, STD)
    assert s.raw == pytest.approx(1.0 - 0.11 - 0.11 * 0.9866143, abs=1e-6)
    assert (s.detections, s.true_detections) == (3, 1)


def test_missed_window_and_profiles() -> None:
    """Nothing detected: raw = -A_FN (standard -1, reward_low_FN_rate -2); normalised 0."""
    assert score_series(TS, scores_at(), WINDOW, 0.5, STD).raw == -1.0
    assert score_series(TS, scores_at(), WINDOW, 0.5, PROFILES["reward_low_FN_rate"]).raw == -2.0
    swept = {"a": sweep_rows(TS, scores_at(), WINDOW)}
    assert score_corpus(swept, 0.5, STD).score == 0.0
    # reward_low_FP_rate doubles the false-positive weight: row 2 costs 0.22
    assert score_series(TS, scores_at(2), WINDOW, 0.5, PROFILES["reward_low_FP_rate"]).raw == pytest.approx(
        -1.22
    )


def test_detection_in_probation_is_ignored() -> None:
    """Row 0 lies in the 1-row probationary period of a 10-row series: no false positive."""
    assert score_series(TS, scores_at(0), WINDOW, 0.5, STD).raw == -1.0


def test_corpus_normalisation_of_two_series() -> None:
    """Two series, two windows: one hit at its start (1) with a 0.11 FP, one missed (-1):
    raw = -0.11, null = -2, perfect = 2, score = 100 * 1.89 / 4 = 47.25."""
    swept = {"a": sweep_rows(TS, scores_at(2, 4), WINDOW), "b": sweep_rows(TS, scores_at(), WINDOW)}
    c = score_corpus(swept, 0.5, STD)
    assert c.score == pytest.approx(47.25)
    assert c.recall == 0.5
    assert c.precision == 0.5


def test_threshold_optimisation_picks_the_best_threshold() -> None:
    """Scores 0.9 at the window start and 0.6 at a false positive: 0.9 beats 0.6 as a threshold."""
    scores = [0.0] * 10
    scores[4], scores[2] = 0.9, 0.6
    best = optimise_threshold({"a": sweep_rows(TS, scores, WINDOW)}, STD)
    assert best.threshold == 0.9
    assert best.score == pytest.approx(100.0)
    assert math.isfinite(best.raw)


def test_lengths_must_match() -> None:
    """A score list of the wrong length is refused."""
    with pytest.raises(ValueError):
        sweep_rows(TS, [0.0], WINDOW)
