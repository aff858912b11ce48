"""Automatic rollback of a configuration change that made a component worse, with guardrails.

For each configuration change (a ``sophia.config.ConfigChange`` event) the monitor notes the
components it touches (:func:`components_of`), then, once ``rollback_window_seconds`` of event time
have passed after the change, compares the calls of those components in the window after the change
with the window of the same length before it:

* **error rate**: Fisher's exact test, one-sided (more failures after), on the 2x2 table
  ``[[failed_after, ok_after], [failed_before, ok_before]]`` (``scipy.stats.fisher_exact``); the
  two-proportion z statistic is reported next to it;
* **latency** and **cost**: the Mann-Whitney U test, one-sided (larger after)
  (``scipy.stats.mannwhitneyu``), on the calls that carry a latency in ms or a cost in USD.

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

Bounded state (:meth:`RollbackMonitor.dump_state`): the calls of a component are kept for
``2 * rollback_window_seconds + 1`` seconds of event time before the earlier of the watermark and the
oldest change still to evaluate (a change that arrives later than that is compared with the calls still
kept); evaluated changes are dropped unless a rollback escalation waits for them; one version number
per configuration key is kept for the re-delivery check. Whatever the call rate, at most
:data:`CALLS_KEPT_PER_SECOND` calls of a component are kept whole per second of event time (the first
that arrive); the others of that second are only counted (calls, failures). The error-rate test counts
every call; the latency and cost tests see the kept calls (a sample of up to
``CALLS_KEPT_PER_SECOND * rollback_window_seconds`` per window). Below that rate nothing changes; at
1,000 calls/s the state of a component stays about 50 times smaller than the calls themselves. The
counted calls of a second fall in a window when the second begins in it (a window edge is exact to the
second for them).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from scipy import stats

from configuration.schemas import HealingThresholds
from processors.healing.decisions import Decision, from_us, to_us, to_utc

__all__ = ["HEALER_AUTHOR", "RollbackMonitor", "compare_windows", "components_of"]

#: The author name under which the healer writes its rollbacks to the config store.
HEALER_AUTHOR = "healer"

CALLS_KEPT_PER_SECOND = 20
"""Calls of a component kept whole per second of event time; the rest of that second are counted only."""


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


def _z(fail_a: int, n_a: int, fail_b: int, n_b: int) -> float:
    pooled = (fail_a + fail_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    return 0.0 if se == 0 else (fail_a / n_a - fail_b / n_b) / se


def compare_windows(
    before: list[tuple[bool, float | None, float | None]],
    after: list[tuple[bool, float | None, float | None]],
    *,
    alpha: float,
    min_calls: int,
    counted_before: tuple[int, int] = (0, 0),
    counted_after: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    """Compare two windows of calls ``(ok, latency_ms, cost_usd)`` with one-sided tests.

    ``counted_before`` and ``counted_after`` are ``(calls, failures)`` counted beyond the calls listed
    (they enter the error-rate test only).

    Returns:
        ``{"significant": bool, "why": str, "alpha_per_metric": float, "metrics": {"error_rate":
        {...}, "latency_ms": {...}, "cost_usd": {...}}}``; each metric has ``before``, ``after``
        (rate or median), ``n_before``, ``n_after``, ``test``, ``p_value`` (null when not tested,
        with ``skipped`` saying why) and ``significant``.
    """
    per = alpha / 3
    metrics: dict[str, Any] = {}
    nb, na = len(before) + counted_before[0], len(after) + counted_after[0]
    fb = sum(1 for ok, _, _ in before if not ok) + counted_before[1]
    fa = sum(1 for ok, _, _ in after if not ok) + counted_after[1]
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
    for name, idx in (("latency_ms", 1), ("cost_usd", 2)):
        xb = [float(c[idx]) for c in before if c[idx] is not None]
        xa = [float(c[idx]) for c in after if c[idx] is not None]
        m = {"before": float(_median(xb)) if xb else None, "after": float(_median(xa)) if xa else None,
             "n_before": len(xb), "n_after": len(xa), "test": "mann_whitney_u one-sided", "p_value": None,
             "significant": False}  # fmt: skip
        if len(xb) >= min_calls and len(xa) >= min_calls:
            res = stats.mannwhitneyu(xa, xb, alternative="greater")
            m["p_value"] = float(res.pvalue)
            m["significant"] = bool(res.pvalue < per and m["after"] >= m["before"])
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


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


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
        self._calls: dict[str, deque[tuple[datetime, bool, float | None, float | None]]] = {}
        self._kept: dict[str, dict[int, int]] = {}  # component -> {epoch second: calls kept whole}
        self._counted: dict[str, dict[int, list[int]]] = {}  # component -> {epoch second: [calls, failures]}
        self._changes: list[_Change] = []
        self._latest_by_key: dict[str, _Change] = {}
        self._done: list[datetime] = []
        self.pending: dict[str, _Pending] = {}
        self._watermark: datetime | None = None
        self._versions: dict[str, int] = {}

    def reconfigure(self, thresholds: HealingThresholds, config_version: int) -> None:
        """Use new thresholds from now on."""
        self.thresholds, self.config_version = thresholds, config_version

    def on_call(
        self,
        components: list[str],
        at: datetime | float,
        ok: bool,
        latency_ms: float | None = None,
        cost_usd: float | None = None,
    ) -> None:
        """Record one call of ``components`` (``provider:P``, ``model:M``, ``agent:A``, ``key:K``)."""
        at = to_utc(at)
        keep = timedelta(seconds=2 * self.thresholds.rollback_window_seconds + 1)
        second = math.floor(at.timestamp())
        for c in components:
            kept = self._kept.setdefault(c, {})
            if kept.get(second, 0) >= CALLS_KEPT_PER_SECOND:
                n = self._counted.setdefault(c, {}).setdefault(second, [0, 0])
                n[0] += 1
                n[1] += not ok
                continue
            kept[second] = kept.get(second, 0) + 1
            q = self._calls.setdefault(c, deque())
            q.append((at, ok, latency_ms, cost_usd))
            while q and q[0][0] < at - keep:
                q.popleft()

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

    def advance(self, now: datetime | float) -> list[Decision]:
        """Evaluate every change whose after-window has closed by watermark ``now``."""
        now = to_utc(now)
        if self._watermark is None or now > self._watermark:
            self._watermark = now
        w = timedelta(seconds=self.thresholds.rollback_window_seconds)
        out: list[Decision] = []
        for ch in self._changes:
            if not ch.evaluated and self._watermark >= ch.at + w:
                ch.evaluated = True
                out += self._evaluate(ch, ch.at + w)
        self._changes = [c for c in self._changes if not c.evaluated]
        self._latest_by_key = {k: c for k, c in self._latest_by_key.items() if not c.evaluated}
        self._prune_calls()
        return out

    def _prune_calls(self) -> None:
        if self._watermark is None:
            return
        oldest = min([self._watermark, *(c.at for c in self._changes)])
        horizon = oldest - timedelta(seconds=2 * self.thresholds.rollback_window_seconds + 1)
        for c in list(self._calls):
            q = self._calls[c]
            while q and q[0][0] < horizon:
                q.popleft()
            if not q:
                del self._calls[c]
        edge = math.floor(horizon.timestamp())
        for per in (self._kept, self._counted):
            for c in list(per):
                seconds = per[c]
                for sec in [sec for sec in seconds if sec < edge]:
                    del seconds[sec]
                if not seconds:
                    del per[c]

    def _window(
        self, ch: _Change, start: datetime, end: datetime
    ) -> list[tuple[bool, float | None, float | None]]:
        seen: list[tuple[bool, float | None, float | None]] = []
        for c in ch.components:
            for at, ok, lat, cost in self._calls.get(c, ()):
                if start <= at < end:
                    seen.append((ok, lat, cost))
        return seen

    def _counted_in(self, ch: _Change, start: datetime, end: datetime) -> tuple[int, int]:
        """``(calls, failures)`` only counted (beyond the kept ones) in seconds that begin in ``[start, end)``."""
        lo, hi = start.timestamp(), end.timestamp()
        calls = failures = 0
        for c in ch.components:
            for sec, (n, f) in self._counted.get(c, {}).items():
                if lo <= sec < hi:
                    calls, failures = calls + n, failures + f
        return calls, failures

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
        w = timedelta(seconds=t.rollback_window_seconds)
        end = min(ch.at + w, ch.superseded_at) if ch.superseded_at else ch.at + w
        evidence = compare_windows(
            self._window(ch, ch.at - w, ch.at),
            self._window(ch, ch.at, end),
            alpha=t.rollback_alpha,
            min_calls=t.rollback_min_calls,
            counted_before=self._counted_in(ch, ch.at - w, ch.at),
            counted_after=self._counted_in(ch, ch.at, end),
        )
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

        ``{"watermark_us", "calls": {component: [[time_us, ok, latency_ms, cost_usd], ...]},
        "counted": {component: [[epoch_second, calls, failures], ...]}, "changes": [change, ...] (to evaluate, in arrival order), "pending": [[escalation, change,
        evidence], ...], "done_us": [...], "versions": {key: version}}``; a change is ``{"event_id",
        "key", "version", "at_us", "components", "previous_version", "healer_rollback", "evaluated",
        "rolled_back", "superseded_at_us"}``, an escalation :meth:`Decision.to_state`.
        """
        return {
            "watermark_us": to_us(self._watermark),
            "calls": {
                c: [[to_us(at), ok, lat, cost] for at, ok, lat, cost in q]
                for c, q in sorted(self._calls.items())
            },
            "counted": {
                c: [[sec, n, f] for sec, (n, f) in sorted(per.items())]
                for c, per in sorted(self._counted.items())
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
        """Replace the state by :meth:`dump_state`'s.

        Raises:
            KeyError, TypeError, ValueError: ``data`` is not such a state.
        """
        self._watermark = from_us(data["watermark_us"])
        self._calls = {
            c: deque((from_us(int(t)), bool(ok), lat, cost) for t, ok, lat, cost in q)  # type: ignore[misc]
            for c, q in data["calls"].items()
        }
        self._kept = {}
        for c, q in self._calls.items():
            kept = self._kept.setdefault(c, {})
            for at, *_ in q:
                sec = math.floor(at.timestamp())
                kept[sec] = kept.get(sec, 0) + 1
        self._counted = {
            c: {int(sec): [int(n), int(f)] for sec, n, f in rows}
            for c, rows in data.get("counted", {}).items()
        }
        self._changes = [_change_from(c) for c in data["changes"]]
        by_id = {c.event_id: c for c in self._changes}
        self._latest_by_key = {k: by_id[eid] for k, eid in data["latest"].items()}
        self.pending = {
            eid: _Pending(_change_from(ch), Decision.from_state(d), dict(ev))
            for eid, ch, d, ev in data["pending"]
        }
        self._done = [from_us(int(d)) for d in data["done_us"]]  # type: ignore[misc]
        self._versions = {k: int(v) for k, v in data["versions"].items()}

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
