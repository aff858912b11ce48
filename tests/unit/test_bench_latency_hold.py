"""bench_latency's --max-rate decision: when a step counts as held (issue 16's "highest rate held for a
minute with lag bounded")."""

from __future__ import annotations

import pytest

from bench.bench_latency import HoldCriteria, judge_hold

RATE = 1000.0
HOLD = 60.0


def _steady(latency_seconds: float = 0.05, runs: int = 600) -> list[tuple[float, float]]:
    """``runs`` runs acked evenly over the hold, each seen after ``latency_seconds``."""
    return [(i * HOLD / runs, latency_seconds) for i in range(runs)]


def _sawtooth_lag(peak_seconds: float) -> list[tuple[float, int]]:
    """A group that keeps up but commits every ``peak_seconds``: sampled every 3 s, its lag swings
    between 0 and the peak."""
    return [(float(t), int(RATE * (t % peak_seconds))) for t in range(3, 61, 3)]


def test_a_pipeline_that_keeps_up_is_held() -> None:
    v = judge_hold(RATE, 995.0, HOLD, _sawtooth_lag(2.8), _steady(), 600)
    assert v.held and v.reasons == ()
    assert v.lag_max_seconds is not None and 2.0 < v.lag_max_seconds < 2.8
    assert (v.seen, v.runs) == (600, 600)


def test_a_generator_that_falls_behind_is_not_held() -> None:
    v = judge_hold(RATE, 960.0, HOLD, _sawtooth_lag(2.8), _steady(), 600)
    assert not v.held
    assert len(v.reasons) == 1 and "achieved 960" in v.reasons[0]


def test_a_growing_lag_is_not_held_even_when_latency_looks_flat() -> None:
    growing = [(float(t), int(RATE * 0.15 * t)) for t in range(3, 61, 3)]  # 15 % short: 9 s behind at the end
    v = judge_hold(RATE, 1000.0, HOLD, growing, _steady(), 600)
    assert not v.held
    assert v.lag_end_seconds == pytest.approx(9.0)
    assert any("lag 9.0 s of input" in r for r in v.reasons)


def test_a_latency_that_trends_up_is_not_held() -> None:
    # the queue grows by 5 ms a second: 50 ms at the start, 350 ms at the end; lag samples stay under the bound
    trending = [(t, 0.05 + 0.005 * t) for t, _ in _steady()]
    v = judge_hold(RATE, 1000.0, HOLD, _sawtooth_lag(2.8), trending, 600)
    assert not v.held
    assert v.p95_last_ms - v.p95_first_ms > 100
    assert any("p95 latency grew" in r for r in v.reasons)
    # the same trend, within a looser bound, is held
    assert judge_hold(RATE, 1000.0, HOLD, _sawtooth_lag(2.8), trending, 600,
                      HoldCriteria(latency_growth_seconds=0.5)).held  # fmt: skip


def test_missing_runs_and_missing_samples_are_not_held() -> None:
    v = judge_hold(RATE, 1000.0, HOLD, _sawtooth_lag(2.8), _steady()[:-10], 600)
    assert not v.held and v.reasons == ("10 of 600 runs not seen",)
    early_only = [(t, n) for t, n in _sawtooth_lag(2.8) if t < HOLD / 2]
    v = judge_hold(RATE, 1000.0, HOLD, early_only, _steady(), 600)
    assert not v.held and v.reasons == ("no lag sample in the hold's second half",)
    v = judge_hold(RATE, 1000.0, HOLD, _sawtooth_lag(2.8), [], 600)
    assert not v.held and "no latency seen in the hold's first or last third" in v.reasons


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        judge_hold(0, 0, HOLD, [], [], 0)
