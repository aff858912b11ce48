"""Lag analysis per source pair: percentiles, de-duplication, order independence, bounded state."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from processors.correlation.lag import LagStats, percentile


def test_percentile_matches_numpy_linear() -> None:
    """Median and p90 of 1..10 are 5.5 and 9.1, as numpy's linear method gives."""
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile(values, 90) == pytest.approx(float(np.percentile(values, 90)))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_per_pair_and_reversed_pairs() -> None:
    """A link seen as (git, slack) is folded into (slack, git) with its lag negated."""
    st = LagStats()
    st.add("l1", "slack", "git", 60.0)
    st.add("l2", "slack", "git", -120.0)
    st.add("l3", "git", "slack", -300.0)  # slack 300 s after git
    (s,) = st.summary()
    assert (s.source_a, s.source_b, s.count) == ("slack", "git", 3)
    assert s.median_seconds == 60.0
    assert s.p90_seconds == pytest.approx(60 + 0.8 * 240)
    assert s.abs_median_seconds == 120.0


def test_replayed_links_count_once_and_order_does_not_matter() -> None:
    """Every permutation of the same links, with duplicates, gives the same summary."""
    links = [("a", 10.0), ("b", 20.0), ("c", -5.0), ("a", 10.0)]
    results = set()
    for perm in itertools.permutations(links):
        st = LagStats()
        for lid, lag in perm:
            st.add(lid, "github", "slack", lag)
        results.add(tuple(st.summary()))
    assert len(results) == 1
    assert next(iter(results))[0].count == 3


def test_bounded_state_keeps_smallest_ids_whatever_the_order() -> None:
    """With room for two lags, the two smallest link ids are kept in any arrival order."""
    for order in (["c", "a", "b"], ["a", "b", "c"], ["b", "c", "a"]):
        st = LagStats(max_per_pair=2)
        for lid in order:
            st.add(lid, "x", "y", float(ord(lid)))
        assert sorted(st.pairs[("x", "y")]) == ["a", "b"]
    assert LagStats.from_dict(st.to_dict()).summary() == st.summary()


def test_bad_lags_are_refused() -> None:
    """A non-finite lag or a pair of one source raises ValueError."""
    st = LagStats()
    with pytest.raises(ValueError):
        st.add("l", "a", "b", float("nan"))
    with pytest.raises(ValueError):
        st.add("l", "a", "a", 1.0)
