"""Automatic rollback of a configuration change that made a component worse, with guardrails.

For each configuration change (a ``sophia.config.ConfigChange`` event) the monitor notes the
components it touches (:func:`components_of`), then, once the window after the change has closed in
event time (the watermark has reached its end), compares the calls of those components in the window
after the change with the window of the same length before it:

* **error rate**: Fisher's exact test, one-sided (more failures after), on the 2x2 table
  ``[[failed_after, ok_after], [failed_before, ok_before]]`` (``scipy.stats.fisher_exact``); the
  two-proportion z statistic is reported next to it;
* **latency** and **cost**: the Mann-Whitney U test, one-sided (larger after), on the calls that carry
  a latency in ms or a cost in USD, computed from the windows' histograms (:func:`mann_whitney_binned`:
  the calls of a bin are ties; normal approximation with tie and continuity correction, the same U and
  p-value as ``scipy.stats.mannwhitneyu(after, before, alternative="greater", method="asymptotic")`` on
  the calls' bin centres). The medians reported are bin centres too (``median_of`` in the evidence).

A metric is significant when its p-value is below ``rollback_alpha / 3`` (Bonferroni over the three
metrics) and each window holds at least ``rollback_min_calls`` calls with that metric. When one is,
the decision depends on the guardrails, checked in this order:

1. at most one evaluation and one rollback per change (its event id); a change whose version is not
   above the last one seen for its key (a re-delivery by the outbox relay) is ignored;
2. never a rollback of a rollback the healer itself made (``rollback_suppressed``);
3. no earlier version to go back to (``rollback_impossible``);
4. at most ``rollback_max_per_hour`` rollbacks per event-time hour (``rollback_suppressed``);
5. ``rollback_mode``: ``dry_run`` gives ``rollback_recommended``; ``approval`` gives an
   ``escalation`` that waits for :meth:`RollbackMonitor.ack`, which then gives the ``rollback``;
   ``auto`` gives ``rollback`` at once.

A ``rollback`` decision's details say which key to restore to which version (the version current
before the change), the evidence, and its causation id is the change's event id. Carrying it out
is the shell's job (``configuration.store.ConfigStore.rollback`` with author ``healer``).

Buckets and windows. No call is kept: the calls of a component are aggregated into buckets of event
time, each holding the calls, the failures and two histograms (latency_ms, cost_usd). A bucket is
:func:`bucket_seconds` wide (``max(1, rollback_window_seconds // BUCKETS_PER_WINDOW)`` whole seconds,
so 30 s for the default 600 s window, 1 s for a window under 40 s); bucket ``i`` covers
``[i * width, (i + 1) * width)`` seconds after the Unix epoch (event time only, so deterministic). A
window is :func:`buckets_per_window` whole buckets (``ceil(rollback_window_seconds / width)``, 20 for
a window of at least 20 s that is a multiple of 20 s, at most 40 for any window). The window after a change
starts at the first bucket edge at or after the change; the window before ends at the last bucket edge
at or before it. A change on a bucket edge therefore compares exactly ``[at - window, at)`` with
``[at, at + window)``; a change inside a bucket leaves that bucket out of both windows (it holds calls
of both sides), and its after-window closes up to one bucket later. A change superseded (a newer
version of the same key) before its after-window closed ends that window at the bucket edge at or
before the newer change. The decision's event time is the after-window's end; its evidence's
``windows`` gives ``bucket_seconds`` and the ``before`` and ``after`` windows as ``[start, end)`` times.

Histograms: :data:`BINS_PER_DECADE` log-spaced bins per decade, bin ``floor(log10(x) *
BINS_PER_DECADE)``, values clamped to ``[1e-9, 1e9)`` (so at most 360 bins) and values <= 0 in a bin
of their own below all others; a bin stands for its geometric centre ``10 ** ((bin + 0.5) /
BINS_PER_DECADE)`` (0 for the zero bin), a relative width of 12 %. The tests are exact for the binned
values; what binning costs is power: a latency or cost shift well under a bin's width moves only the
calls near a bin edge, so it needs more calls to be seen than it would on the raw values.

Bounded state (:meth:`RollbackMonitor.dump_state`): buckets are kept from ``2 * buckets_per_window +
1`` buckets before the bucket of the earlier of the watermark and the oldest change still to evaluate
(a change that arrives up to a window late is still compared in full; one later than that with the
buckets still kept); a call older than that is dropped. So a component holds at most about ``3 *
buckets_per_window + 3`` buckets (63 for the default window), each with at most 2 * 361 bins, whatever
the call rate and the window length. Evaluated changes are dropped unless a rollback escalation waits
for them; one version number per configuration key is kept for the re-delivery check. A state of the
earlier layout (``"calls"`` kept whole and ``"counted"`` per second, :data:`~processors.healing.healer.
SNAPSHOT_FORMAT` 1) is converted on load: each call goes into its bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from scipy import special, stats

from configuration.schemas import HealingThresholds
from processors.healing.decisions import Decision, from_us, to_us, to_utc

__all__ = [
    "BINS_PER_DECADE",
    "BUCKETS_PER_WINDOW",
    "HEALER_AUTHOR",
    "ZERO_BIN",
    "CallStats",
    "RollbackMonitor",
    "bin_centre",
    "bin_of",
    "bucket_seconds",
    "buckets_per_window",
    "compare_windows",
    "components_of",
    "mann_whitney_binned",
]

#: The author name under which the healer writes its rollbacks to the config store.
HEALER_AUTHOR = "healer"

BUCKETS_PER_WINDOW = 20
"""Buckets a window is cut into (the bucket width is ``rollback_window_seconds // BUCKETS_PER_WINDOW``, at least 1 s)."""

BINS_PER_DECADE = 20
"""Log-spaced histogram bins per decade of latency_ms or cost_usd (a bin is 12 % wide)."""

_LOW_DECADE, _HIGH_DECADE = -9, 9  # values are clamped into [1e-9, 1e9)
_LOW_BIN = _LOW_DECADE * BINS_PER_DECADE
_HIGH_BIN = _HIGH_DECADE * BINS_PER_DECADE - 1
ZERO_BIN = _LOW_BIN - 1
"""The bin of values <= 0 (below every other bin; it stands for 0)."""

_US = 1_000_000


def bin_of(x: float) -> int:
    """Histogram bin of a latency or cost ``x``: ``floor(log10(x) * BINS_PER_DECADE)`` clamped, :data:`ZERO_BIN` for x <= 0."""
    if x <= 0 or x != x:  # NaN too
        return ZERO_BIN
    b = math.floor(math.log10(x) * BINS_PER_DECADE)
    return _LOW_BIN if b < _LOW_BIN else _HIGH_BIN if b > _HIGH_BIN else b


def bin_centre(b: int) -> float:
    """The value bin ``b`` stands for: its geometric centre ``10 ** ((b + 0.5) / BINS_PER_DECADE)``, 0.0 for :data:`ZERO_BIN`."""
    return 0.0 if b == ZERO_BIN else 10 ** ((b + 0.5) / BINS_PER_DECADE)


def bucket_seconds(window_seconds: float) -> int:
    """Width of a bucket in whole seconds: ``max(1, window_seconds // BUCKETS_PER_WINDOW)``."""
    return max(1, int(window_seconds // BUCKETS_PER_WINDOW))


def buckets_per_window(window_seconds: float) -> int:
    """Whole buckets in a window: ``ceil(window_seconds / bucket_seconds(window_seconds))`` (at most 40)."""
    return max(1, math.ceil(window_seconds / bucket_seconds(window_seconds)))


def components_of(key: str, value: Mapping[str, Any] | None) -> list[str]:
    """The components a configuration key touches, as call-component names.

    ``providers.P`` -> ``provider:P``; ``agents.A`` -> ``agent:A`` and ``model:<value.model>``;
    ``routing.*`` -> ``model:M`` for each of ``value.models`` and ``value.fallback_model``;
    any other key -> ``key:<key>`` (calls can name it in their ``components``).
    """
    value = value or {}
    if key.startswith("providers."):
        return [f"provider:{key.removeprefix('providers.')}"]
    if key.startswith("agents."):
        out = [f"agent:{key.removeprefix('agents.')}"]
        if value.get("model"):
            out.append(f"model:{value['model']}")
        return out
    if key.startswith("routing."):
        models = [
            *(value.get("models") or []),
            *([value["fallback_model"]] if value.get("fallback_model") else []),
        ]
        return [f"model:{m}" for m in dict.fromkeys(models)]
    return [f"key:{key}"]


def _hist_state(h: Mapping[int, int]) -> list[int]:
    """``[]`` (empty), ``[zeros]`` or ``[zeros, lowest_bin, count, count, ...]`` (dense from the lowest non-zero bin)."""
    if not h:
        return []
    zeros = h.get(ZERO_BIN, 0)
    bins = [b for b in h if b != ZERO_BIN]
    if not bins:
        return [zeros]
    lo, hi = min(bins), max(bins)
    return [zeros, lo, *(h.get(b, 0) for b in range(lo, hi + 1))]


def _hist_from(row: Sequence[int]) -> dict[int, int]:
    h: dict[int, int] = {}
    if row and int(row[0]):
        h[ZERO_BIN] = int(row[0])
    if len(row) > 1:
        lo = int(row[1])
        for i, n in enumerate(row[2:]):
            if int(n):
                b = lo + i
                if not _LOW_BIN <= b <= _HIGH_BIN:
                    raise ValueError(f"histogram bin {b} outside [{_LOW_BIN}, {_HIGH_BIN}]")
                h[b] = int(n)
    return h


def _merge(into: dict[int, int], h: Mapping[int, int]) -> None:
    for b, n in h.items():
        into[b] = into.get(b, 0) + n


@dataclass(slots=True)
class CallStats:
    """Calls aggregated over a bucket or a window: counts and histograms (bin -> calls, :func:`bin_of`)."""

    calls: int = 0
    failures: int = 0
    latency_ms: dict[int, int] = field(default_factory=dict)
    cost_usd: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, calls: Iterable[tuple[bool, float | None, float | None]]) -> CallStats:
        """Aggregate calls ``(ok, latency_ms, cost_usd)``."""
        s = cls()
        for ok, lat, cost in calls:
            s.add(
                ok, None if lat is None else bin_of(float(lat)), None if cost is None else bin_of(float(cost))
            )
        return s

    def add(self, ok: bool, latency_bin: int | None, cost_bin: int | None) -> None:
        """Count one call (its metrics already binned; ``None``: the call has no such metric)."""
        self.calls += 1
        if not ok:
            self.failures += 1
        if latency_bin is not None:
            self.latency_ms[latency_bin] = self.latency_ms.get(latency_bin, 0) + 1
        if cost_bin is not None:
            self.cost_usd[cost_bin] = self.cost_usd.get(cost_bin, 0) + 1

    def merge(self, other: CallStats) -> None:
        """Add ``other``'s calls to these."""
        self.calls += other.calls
        self.failures += other.failures
        _merge(self.latency_ms, other.latency_ms)
        _merge(self.cost_usd, other.cost_usd)

    def to_state(self) -> list[Any]:
        """``[calls, failures, latency_ms histogram, cost_usd histogram]`` (see :func:`_hist_state`)."""
        return [self.calls, self.failures, _hist_state(self.latency_ms), _hist_state(self.cost_usd)]

    @classmethod
    def from_state(cls, row: Sequence[Any]) -> CallStats:
        """The inverse of :meth:`to_state`.

        Raises:
            ValueError, TypeError, IndexError: ``row`` is not such a state.
        """
        calls, failures, lat, cost = row
        return cls(int(calls), int(failures), _hist_from(lat), _hist_from(cost))


def mann_whitney_binned(x: Mapping[int, int], y: Mapping[int, int]) -> tuple[float, float]:
    """One-sided Mann-Whitney U test (``x`` larger) on two histograms (bin -> count) over the same bins.

    The values of a bin are ties (midranks). Normal approximation with the tie correction and the
    continuity correction, as ``scipy.stats.mannwhitneyu(x_values, y_values, alternative="greater",
    method="asymptotic")`` on the values the bins stand for.

    Returns:
        ``(U of x, p_value)``; p is 1.0 when every value is tied.

    Raises:
        ValueError: a histogram is empty.
    """
    n1, n2 = sum(x.values()), sum(y.values())
    if not n1 or not n2:
        raise ValueError("both histograms need a value")
    n = n1 + n2
    rank_sum = 0.0
    below = 0
    tie_term = 0
    for b in sorted(set(x) | set(y)):
        a = x.get(b, 0)
        t = a + y.get(b, 0)
        rank_sum += a * (below + (t + 1) / 2)
        tie_term += t**3 - t
        below += t
    u1 = rank_sum - n1 * (n1 + 1) / 2
    s = math.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
    numerator = u1 - n1 * n2 / 2 - 0.5
    if s <= 0:
        return u1, 1.0
    p = float(special.ndtr(-(numerator / s)))
    return u1, min(1.0, max(0.0, p))


def _hist_median(h: Mapping[int, int]) -> float | None:
    """Median of the values the bins stand for (the mean of the two middle ones for an even count)."""
    n = sum(h.values())
    if not n:
        return None
    wanted = [n // 2] if n % 2 else [n // 2 - 1, n // 2]  # 0-based positions
    out: list[float] = []
    seen = 0
    for b in sorted(h):
        seen += h[b]
        while wanted and wanted[0] < seen:
            out.append(bin_centre(b))
            wanted.pop(0)
    return sum(out) / len(out)


def _z(fail_a: int, n_a: int, fail_b: int, n_b: int) -> float:
    pooled = (fail_a + fail_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    return 0.0 if se == 0 else (fail_a / n_a - fail_b / n_b) / se


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")


Calls = Sequence[tuple[bool, float | None, float | None]]


def compare_windows(
    before: CallStats | Calls, after: CallStats | Calls, *, alpha: float, min_calls: int
) -> dict[str, Any]:
    """Compare two windows (:class:`CallStats`, or calls ``(ok, latency_ms, cost_usd)`` to aggregate) with one-sided tests.

    Returns:
        ``{"significant": bool, "why": str, "alpha_per_metric": float, "metrics": {"error_rate":
        {...}, "latency_ms": {...}, "cost_usd": {...}}}``; each metric has ``before``, ``after``
        (rate, or median as a bin centre: ``median_of`` says so), ``n_before``, ``n_after``, ``test``,
        ``p_value`` (null when not tested, with ``skipped`` saying why) and ``significant``.
    """
    b = before if isinstance(before, CallStats) else CallStats.of(before)
    a = after if isinstance(after, CallStats) else CallStats.of(after)
    per = alpha / 3
    metrics: dict[str, Any] = {}
    nb, na, fb, fa = b.calls, a.calls, b.failures, a.failures
    m: dict[str, Any] = {"before": round(fb / nb, 6) if nb else None, "after": round(fa / na, 6) if na else None,
                         "n_before": nb, "n_after": na, "test": "fisher_exact one-sided", "p_value": None,
                         "significant": False}  # fmt: skip
    if nb >= min_calls and na >= min_calls:
        _, p = stats.fisher_exact([[fa, na - fa], [fb, nb - fb]], alternative="greater")
        m["p_value"] = float(p)
        m["z"] = round(_z(fa, na, fb, nb), 4)
        m["significant"] = bool(p < per and fa / na > fb / nb)
    else:
        m["skipped"] = f"fewer than {min_calls} calls in a window"
    metrics["error_rate"] = m
    for name in ("latency_ms", "cost_usd"):
        hb, ha = getattr(b, name), getattr(a, name)
        xb, xa = sum(hb.values()), sum(ha.values())
        med_b, med_a = _hist_median(hb), _hist_median(ha)
        m = {"before": _round(med_b), "after": _round(med_a), "n_before": xb, "n_after": xa,
             "median_of": f"histogram bin centres ({BINS_PER_DECADE} log bins per decade)",
             "test": "mann_whitney_u one-sided (asymptotic, binned)", "p_value": None,
             "significant": False}  # fmt: skip
        if xb >= min_calls and xa >= min_calls:
            _, p = mann_whitney_binned(ha, hb)
            m["p_value"] = p
            m["significant"] = bool(p < per and med_a is not None and med_b is not None and med_a >= med_b)
        else:
            m["skipped"] = f"fewer than {min_calls} calls with this metric in a window"
        metrics[name] = m
    sig = [k for k, v in metrics.items() if v["significant"]]
    why = (
        "; ".join(
            f"{k} {metrics[k]['before']} -> {metrics[k]['after']} ({metrics[k]['test']}, p={metrics[k]['p_value']:.3g} < {per:.3g})"
            for k in sig
        )
        if sig
        else "no metric worse at p < " + f"{per:.3g}"
    )
    return {"significant": bool(sig), "why": why, "alpha_per_metric": per, "metrics": metrics}


@dataclass(slots=True)
class _Change:
    event_id: str
    key: str
    version: int
    at: datetime
    components: list[str]
    previous_version: int | None
    healer_rollback: bool
    evaluated: bool = False
    rolled_back: bool = False
    superseded_at: datetime | None = None


@dataclass(slots=True)
class _Pending:
    change: _Change
    decision: Decision
    evidence: dict[str, Any] = field(default_factory=dict)


def _change_state(c: _Change) -> dict[str, Any]:
    return {
        "event_id": c.event_id,
        "key": c.key,
        "version": c.version,
        "at_us": to_us(c.at),
        "components": list(c.components),
        "previous_version": c.previous_version,
        "healer_rollback": c.healer_rollback,
        "evaluated": c.evaluated,
        "rolled_back": c.rolled_back,
        "superseded_at_us": to_us(c.superseded_at),
    }


def _change_from(d: dict[str, Any]) -> _Change:
    return _Change(
        event_id=str(d["event_id"]),
        key=str(d["key"]),
        version=int(d["version"]),
        at=from_us(int(d["at_us"])),  # type: ignore[arg-type]
        components=[str(c) for c in d["components"]],
        previous_version=None if d["previous_version"] is None else int(d["previous_version"]),
        healer_rollback=bool(d["healer_rollback"]),
        evaluated=bool(d["evaluated"]),
        rolled_back=bool(d["rolled_back"]),
        superseded_at=from_us(d["superseded_at_us"]),
    )


class RollbackMonitor:
    """Watches configuration changes and the calls of the components they touch.

    Args:
        thresholds: ``rollback_*`` fields of the healing configuration.
        config_version: recorded in each decision.
    """

    def __init__(self, thresholds: HealingThresholds, config_version: int = 0) -> None:
        self.thresholds = thresholds
        self.config_version = config_version
        self._width = bucket_seconds(thresholds.rollback_window_seconds)
        self._buckets: dict[str, dict[int, CallStats]] = {}  # component -> {bucket index: calls}
        self._kept_from: int | None = None  # buckets below this index are dropped (None: nothing dropped yet)
        self._changes: list[_Change] = []
        self._latest_by_key: dict[str, _Change] = {}
        self._done: list[datetime] = []
        self.pending: dict[str, _Pending] = {}
        self._watermark: datetime | None = None
        self._versions: dict[str, int] = {}

    @property
    def bucket_seconds(self) -> int:
        """Width of a bucket in seconds (:func:`bucket_seconds` of the window)."""
        return self._width

    def reconfigure(self, thresholds: HealingThresholds, config_version: int) -> None:
        """Use new thresholds from now on; a new window length re-buckets the calls kept (a bucket
        goes whole into the new bucket its start falls in)."""
        self.thresholds, self.config_version = thresholds, config_version
        width = bucket_seconds(thresholds.rollback_window_seconds)
        if width == self._width:
            return
        old, self._width = self._width, width
        for comp, per in self._buckets.items():
            merged: dict[int, CallStats] = {}
            for i in sorted(per):
                merged.setdefault(i * old // width, CallStats()).merge(per[i])
            self._buckets[comp] = merged
        if self._kept_from is not None:
            self._kept_from = self._kept_from * old // width
        self._prune()

    def _index(self, at: datetime) -> int:
        return to_us(at) // (self._width * _US)  # type: ignore[operator]

    def on_call(
        self,
        components: list[str],
        at: datetime | float,
        ok: bool,
        latency_ms: float | None = None,
        cost_usd: float | None = None,
    ) -> None:
        """Record one call of ``components`` (``provider:P``, ``model:M``, ``agent:A``, ``key:K``) in its bucket."""
        i = self._index(to_utc(at))
        if self._kept_from is not None and i < self._kept_from:
            return  # older than every window still to compare
        lat = None if latency_ms is None else bin_of(float(latency_ms))
        cost = None if cost_usd is None else bin_of(float(cost_usd))
        for c in components:
            per = self._buckets.get(c)
            if per is None:
                per = self._buckets[c] = {}
            b = per.get(i)
            if b is None:
                b = per[i] = CallStats()
            b.add(ok, lat, cost)

    def on_change(
        self,
        *,
        event_id: str,
        key: str,
        version: int,
        at: datetime | float,
        change: str = "CHANGED",
        author: str = "",
        value: Mapping[str, Any] | None = None,
        components: list[str] | None = None,
        restored_version: int | None = None,
    ) -> list[Decision]:
        """Note a configuration change (fields of ``sophia.config.ConfigChange``); nothing is decided yet."""
        at = to_utc(at)
        if int(version) <= self._versions.get(key, 0):
            return []  # seen already: a re-delivery is not a new change
        self._versions[key] = int(version)
        prev = self._latest_by_key.get(key)
        if prev is not None and not prev.evaluated:
            prev.superseded_at = at
        if change == "RETIRED":
            return []
        ch = _Change(
            event_id=event_id,
            key=key,
            version=int(version),
            at=at,
            components=list(components if components is not None else components_of(key, value)),
            previous_version=int(version) - 1 if int(version) > 1 else None,
            healer_rollback=change == "ROLLED_BACK" and author == HEALER_AUTHOR,
        )
        self._changes.append(ch)
        self._latest_by_key[key] = ch
        return []

    def _windows(self, ch: _Change) -> tuple[int, int, int, int]:
        """Bucket index ranges ``[b0, b1)`` before and ``[a0, a1)`` after the change (see the module docstring)."""
        k = buckets_per_window(self.thresholds.rollback_window_seconds)
        w_us = self._width * _US
        at_us: int = to_us(ch.at)  # type: ignore[assignment]
        b1 = at_us // w_us  # the last bucket edge at or before the change
        a0 = -(-at_us // w_us)  # the first bucket edge at or after it
        a1 = a0 + k
        if ch.superseded_at is not None:
            a1 = max(a0, min(a1, to_us(ch.superseded_at) // w_us))  # type: ignore[operator]
        return b1 - k, b1, a0, a1

    def _window_end(self, ch: _Change) -> datetime:
        a0 = -(-to_us(ch.at) // (self._width * _US))  # type: ignore[operator]
        return from_us((a0 + buckets_per_window(self.thresholds.rollback_window_seconds)) * self._width * _US)  # type: ignore[return-value]

    def advance(self, now: datetime | float) -> list[Decision]:
        """Evaluate every change whose after-window has closed by watermark ``now``."""
        now = to_utc(now)
        if self._watermark is None or now > self._watermark:
            self._watermark = now
        out: list[Decision] = []
        for ch in self._changes:
            if not ch.evaluated:
                end = self._window_end(ch)
                if self._watermark >= end:
                    ch.evaluated = True
                    out += self._evaluate(ch, end)
        if out:
            self._changes = [c for c in self._changes if not c.evaluated]
            self._latest_by_key = {k: c for k, c in self._latest_by_key.items() if not c.evaluated}
        self._prune()
        return out

    def _prune(self) -> None:
        if self._watermark is None:
            return
        oldest = min([self._watermark, *(c.at for c in self._changes)])
        k = buckets_per_window(self.thresholds.rollback_window_seconds)
        kept_from = self._index(oldest) - 2 * k - 1
        if self._kept_from is not None and kept_from <= self._kept_from:
            return  # nothing more to drop
        self._kept_from = kept_from
        for c in list(self._buckets):
            per = self._buckets[c]
            for i in [i for i in per if i < kept_from]:
                del per[i]
            if not per:
                del self._buckets[c]

    def _stats(self, ch: _Change, lo: int, hi: int) -> CallStats:
        """The calls of the change's components in buckets ``[lo, hi)`` (a call of two of them counts twice)."""
        s = CallStats()
        for c in ch.components:
            per = self._buckets.get(c, {})
            for i in range(lo, hi):
                b = per.get(i)
                if b is not None:
                    s.merge(b)
        return s

    def _decision(
        self, kind: str, ch: _Change, at: datetime, details: dict[str, Any], cause: str | None = None
    ) -> Decision:
        return Decision(
            kind=kind,
            subject=f"config:{ch.key}",
            event_time=at,
            config_version=self.config_version,
            causation_id=cause or ch.event_id,
            details={"key": ch.key, "change_version": ch.version, "components": ch.components, **details},
        )

    def _evaluate(self, ch: _Change, at: datetime) -> list[Decision]:
        t = self.thresholds
        b0, b1, a0, a1 = self._windows(ch)
        evidence = compare_windows(
            self._stats(ch, b0, b1),
            self._stats(ch, a0, a1),
            alpha=t.rollback_alpha,
            min_calls=t.rollback_min_calls,
        )
        w_us = self._width * _US
        evidence["windows"] = {
            "bucket_seconds": self._width,
            "before": [from_us(b0 * w_us).isoformat(), from_us(b1 * w_us).isoformat()],  # type: ignore[union-attr]
            "after": [from_us(a0 * w_us).isoformat(), from_us(a1 * w_us).isoformat()],  # type: ignore[union-attr]
        }
        if not evidence["significant"]:
            return [self._decision("rollback_not_needed", ch, at, {"evidence": evidence})]
        if ch.healer_rollback:
            return [
                self._decision(
                    "rollback_suppressed",
                    ch,
                    at,
                    {"reason": "the change is a rollback the healer made", "evidence": evidence},
                )
            ]
        if ch.previous_version is None:
            return [
                self._decision(
                    "rollback_impossible",
                    ch,
                    at,
                    {"reason": "no earlier version to restore", "evidence": evidence},
                )
            ]
        self._done = [d for d in self._done if d > at - timedelta(hours=1)]
        if len(self._done) >= t.rollback_max_per_hour:
            return [
                self._decision(
                    "rollback_suppressed", ch, at,
                    {"reason": f"limit of {t.rollback_max_per_hour} rollbacks per hour reached", "evidence": evidence},
                )
            ]  # fmt: skip
        target = {"to_version": ch.previous_version, "evidence": evidence}
        if t.rollback_mode == "dry_run":
            return [self._decision("rollback_recommended", ch, at, {**target, "mode": "dry_run"})]
        if t.rollback_mode == "approval":
            d = self._decision(
                "escalation", ch, at, {**target, "mode": "approval", "action": "rollback", "awaiting": "ack"}
            )
            self.pending[d.id] = _Pending(ch, d, evidence)
            return [d]
        return [self._rollback(ch, at, target, ch.event_id)]

    def _rollback(self, ch: _Change, at: datetime, target: dict[str, Any], cause: str) -> Decision:
        ch.rolled_back = True
        self._done.append(at)
        return self._decision("rollback", ch, at, {**target, "author": HEALER_AUTHOR}, cause)

    def dump_state(self) -> dict[str, Any]:
        """The monitor's whole state, JSON-ready and deterministic (times in epoch microseconds).

        ``{"watermark_us", "bucket_seconds", "kept_from" (bucket index or null), "buckets": {component:
        [[bucket_index, calls, failures, latency_ms histogram, cost_usd histogram], ...] (by index)},
        "changes": [change, ...] (to evaluate, in arrival order), "latest": {key: event_id}, "pending":
        [[escalation_id, change, escalation, evidence], ...], "done_us": [...], "versions": {key:
        version}}``; a histogram is ``[]``, ``[calls <= 0]`` or ``[calls <= 0, lowest_bin, calls in that
        bin, in the next, ...]`` (:func:`bin_of`); a change is ``{"event_id", "key", "version", "at_us",
        "components", "previous_version", "healer_rollback", "evaluated", "rolled_back",
        "superseded_at_us"}``, an escalation :meth:`Decision.to_state`.
        """
        return {
            "watermark_us": to_us(self._watermark),
            "bucket_seconds": self._width,
            "kept_from": self._kept_from,
            "buckets": {
                c: [[i, *per[i].to_state()] for i in sorted(per)] for c, per in sorted(self._buckets.items())
            },
            "changes": [_change_state(c) for c in self._changes],
            "latest": {k: c.event_id for k, c in sorted(self._latest_by_key.items()) if not c.evaluated},
            "pending": [
                [eid, _change_state(p.change), p.decision.to_state(), p.evidence]
                for eid, p in self.pending.items()
            ],
            "done_us": [to_us(d) for d in self._done],
            "versions": dict(sorted(self._versions.items())),
        }

    def load_state(self, data: dict[str, Any]) -> None:
        """Replace the state by :meth:`dump_state`'s, or convert one of the earlier layout (calls kept
        whole in ``"calls"``, ``[[time_us, ok, latency_ms, cost_usd], ...]``, and counted per second in
        ``"counted"``, ``[[epoch_second, calls, failures], ...]``): each call goes into its bucket, the
        counted ones with no latency or cost.

        Raises:
            KeyError, TypeError, ValueError, IndexError: ``data`` is not such a state.
        """
        self._watermark = from_us(data["watermark_us"])
        self._changes = [_change_from(c) for c in data["changes"]]
        by_id = {c.event_id: c for c in self._changes}
        self._latest_by_key = {k: by_id[eid] for k, eid in data["latest"].items()}
        self.pending = {
            eid: _Pending(_change_from(ch), Decision.from_state(d), dict(ev))
            for eid, ch, d, ev in data["pending"]
        }
        self._done = [from_us(int(d)) for d in data["done_us"]]  # type: ignore[misc]
        self._versions = {k: int(v) for k, v in data["versions"].items()}
        self._buckets = {}
        self._kept_from = None
        if "buckets" not in data:  # the earlier layout: calls kept whole
            self._width = bucket_seconds(self.thresholds.rollback_window_seconds)
            for c, q in data["calls"].items():
                for t, ok, lat, cost in q:
                    self.on_call([c], from_us(int(t)), bool(ok), lat, cost)  # type: ignore[arg-type]
            for c, rows in data.get("counted", {}).items():
                for sec, n, f in rows:
                    b = self._buckets.setdefault(c, {}).setdefault(int(sec) // self._width, CallStats())
                    b.calls, b.failures = b.calls + int(n), b.failures + int(f)
            self._prune()
            return
        self._width = int(data["bucket_seconds"])
        if self._width < 1:
            raise ValueError(f"bucket_seconds {self._width} < 1")
        self._kept_from = None if data["kept_from"] is None else int(data["kept_from"])
        self._buckets = {
            c: {int(row[0]): CallStats.from_state(row[1:]) for row in rows}
            for c, rows in data["buckets"].items()
        }
        width = bucket_seconds(self.thresholds.rollback_window_seconds)
        if width != self._width:  # thresholds other than the dumped monitor's: re-bucket as reconfigure does
            self.reconfigure(self.thresholds, self.config_version)

    def forget_pending(self, escalation_id: str) -> None:
        """Drop a rollback escalation that will no longer be acked (expired); nothing if unknown."""
        self.pending.pop(escalation_id, None)

    def ack(self, escalation_id: str, *, by: str, note: str, at: datetime | float) -> list[Decision]:
        """A person approves a pending rollback: returns ``escalation_acked`` then ``rollback``.

        Raises:
            KeyError: no pending rollback escalation has that id.
        """
        at = to_utc(at)
        p = self.pending.pop(escalation_id)
        acked = self._decision(
            "escalation_acked",
            p.change,
            at,
            {"escalation_id": escalation_id, "by": by, "note": note},
            escalation_id,
        )
        if p.change.rolled_back:
            return [acked]
        return [
            acked,
            self._rollback(
                p.change, at, {"to_version": p.change.previous_version, "evidence": p.evidence}, escalation_id
            ),
        ]
