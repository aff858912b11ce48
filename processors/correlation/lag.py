"""Lag analysis: per pair of sources, the distribution of event-time lags between linked events.

Plain Python, no Kafka. A correlation link joins an event of source A (e.g. ``slack``) and one of source B
(e.g. ``git``); its lag is ``time(A) - time(B)`` in seconds (positive: A came after B). :class:`LagStats`
keeps, per ordered pair ``(A, B)``, the lags of distinct links (keyed by link id, so a replayed link is
counted once and the result does not depend on arrival order) and reports count, median and p90 (linear
interpolation between closest ranks, numpy's default ``linear`` method) of the lags and of their absolute
values. State is bounded: at most ``max_per_pair`` lags per pair; beyond that the lags with the smallest
link ids are kept (a deterministic sample that does not depend on arrival order).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LagStats", "LagSummary", "percentile"]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ascending values, linear interpolation between closest ranks.

    Raises:
        ValueError: no values, or ``q`` outside ``[0, 100]``.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must lie in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class LagSummary:
    """Lags of one source pair, in seconds.

    Attributes:
        source_a, source_b: the pair; lag = time(a) - time(b).
        count: distinct links.
        median_seconds, p90_seconds: of the signed lags.
        abs_median_seconds, abs_p90_seconds: of the absolute lags.
    """

    source_a: str
    source_b: str
    count: int
    median_seconds: float
    p90_seconds: float
    abs_median_seconds: float
    abs_p90_seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"source_a": self.source_a, "source_b": self.source_b, "count": self.count,
                "median_seconds": self.median_seconds, "p90_seconds": self.p90_seconds,
                "abs_median_seconds": self.abs_median_seconds, "abs_p90_seconds": self.abs_p90_seconds}  # fmt: skip


class LagStats:
    """Lag distributions per ordered source pair.

    Args:
        max_per_pair: most lags kept per pair (bounded state).
    """

    def __init__(self, max_per_pair: int = 10_000) -> None:
        if max_per_pair < 1:
            raise ValueError(f"max_per_pair must be positive, got {max_per_pair}")
        self.max_per_pair = max_per_pair
        self.pairs: dict[tuple[str, str], dict[str, float]] = {}

    def add(self, link_id: str, source_a: str, source_b: str, lag_seconds: float) -> bool:
        """Record one link's lag; return False when the link was already counted or falls outside the kept
        sample.

        Args:
            link_id: the link's deterministic id (de-duplication key).
            source_a, source_b: sources of the two events, e.g. ``slack`` and ``git``; the pair is stored in
                this order (``(b, a)`` with the lag negated is the same pair seen the other way).
            lag_seconds: time(a) - time(b), seconds.

        Raises:
            ValueError: a lag that is not finite, or a == b.
        """
        if not math.isfinite(lag_seconds):
            raise ValueError(f"lag {lag_seconds!r} is not finite")
        if source_a == source_b:
            raise ValueError(f"a pair needs two sources, got {source_a!r} twice")
        if (source_b, source_a) in self.pairs:
            source_a, source_b, lag_seconds = source_b, source_a, -lag_seconds
        lags = self.pairs.setdefault((source_a, source_b), {})
        if link_id in lags:
            return False
        lags[link_id] = float(lag_seconds)
        if len(lags) > self.max_per_pair:
            drop = max(lags)
            del lags[drop]
            return drop != link_id
        return True

    def summary(self) -> list[LagSummary]:
        """One :class:`LagSummary` per pair with at least one lag, sorted by pair."""
        out = []
        for (a, b), lags in sorted(self.pairs.items()):
            if not lags:
                continue
            values = sorted(lags.values())
            absolute: list[float] = []
            for v in values:
                bisect.insort(absolute, abs(v))
            out.append(LagSummary(a, b, len(values), percentile(values, 50), percentile(values, 90),
                                  percentile(absolute, 50), percentile(absolute, 90)))  # fmt: skip
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state."""
        return {"max_per_pair": self.max_per_pair,
                "pairs": [{"a": a, "b": b, "lags": dict(lags)} for (a, b), lags in sorted(self.pairs.items())]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LagStats:
        """Inverse of :meth:`to_dict`."""
        st = cls(int(d["max_per_pair"]))
        for p in d["pairs"]:
            st.pairs[(str(p["a"]), str(p["b"]))] = {str(k): float(v) for k, v in p["lags"].items()}
        return st
