"""Evaluation of the healer on real agent runs: early warnings and an injected provider outage.

Both read mini-swe-agent trajectories with ``results.csv`` (``../shared/data/agent_runs``: 120 real
SWE-bench Verified runs of mini-swe-agent with Gemini 3 Pro) through ``connectors.agent_runs.iter_runs``
and replay every run's events merged in event-time order (ties: run id, then the run's own order).

:func:`evaluate_early_warnings`
    Feeds the merged stream to a :class:`processors.healing.healer.Healer` and scores its
    ``agent_warning`` decisions as predictions of "this run will not resolve". A run is flagged when
    a warning at ``min_level`` or above was raised **before its last step** (the step of the warning
    is below the run's last step); the same is scored with only the warnings raised by each run's
    midpoint step. The baseline flags a run, in the same replay, as soon as its step count exceeds the
    median final step count of the runs that have finished so far (once ``min_peers`` have finished).
    With ``split``, the same is done again on each half of the runs on its own (a replay of that half
    only, so its peers are that half's runs): ``time`` splits them by start time (first half, second
    half), ``id`` by the parity of the SHA-256 of the run id (a fixed 2-fold split).

:func:`evaluate_outage`
    Replays the real LLM-call stream (one request per recorded call, at its recorded time, to its
    recorded provider) through the client's policy (:func:`simulate`): the provider's circuit must
    admit the attempt; a retryable failure is retried on the same provider up to
    ``retry_max_attempts`` times after a full-jitter backoff seeded by the request id; then the
    request falls back along the chain of the other providers; a request that no provider served
    fails to the caller. An outage is injected on one provider for a window: each attempt to it then
    fails with probability ``failure_rate`` (half server errors, HTTP 503, half rate limits, HTTP
    429), drawn from a generator seeded by ``(seed, request id, attempt)``. Two circuit policies run on
    the same stream: the healer's circuit breaker, and a baseline after LiteLLM's documented router
    cooldown (``allowed_fails`` 3 per minute, ``cooldown_time`` 5 s, no half-open state:
    :class:`LiteLLMCooldown`).
"""

from __future__ import annotations

import hashlib
import random
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from configuration.schemas import HealingThresholds
from connectors.agent_runs import LLM_CALL, RUN_LIFECYCLE, ImportProblem, ParsedRun, iter_runs
from processors.healing.agent_health import LEVELS
from processors.healing.breaker import CircuitBreaker
from processors.healing.healer import Healer, HealingConfig, InputEvent
from processors.healing.retry import backoff_seconds

__all__ = [
    "SPLITS",
    "LiteLLMCooldown",
    "evaluate_early_warnings",
    "evaluate_outage",
    "load_runs",
    "merged_events",
    "simulate",
    "split_runs",
]


def load_runs(directory: Path) -> list[ParsedRun]:
    """Every run of a mini-swe-agent results folder (files that cannot be imported are left out).

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: no run could be imported from it.
    """
    runs = [r for r in iter_runs(Path(directory)) if not isinstance(r, ImportProblem)]
    if not runs:
        raise ValueError(f"no mini-swe-agent trajectory could be imported from {directory}")
    return runs


def merged_events(runs: Iterable[ParsedRun]) -> Iterator[InputEvent]:
    """All events of ``runs`` in event-time order (ties: run id, then the run's own order)."""
    keyed = []
    for run in runs:
        for i, e in enumerate(run.events):
            keyed.append((e.data["event_time"], run.run_id, i, InputEvent(e.schema, e.data, e.attributes.id)))
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    for *_, ev in keyed:
        yield ev


def _pr(flagged: set[str], positives: set[str]) -> dict[str, float | int | None]:
    tp = len(flagged & positives)
    p = tp / len(flagged) if flagged else None
    r = tp / len(positives) if positives else None
    return {
        "flagged": len(flagged),
        "true_positives": tp,
        "precision": round(p, 4) if p is not None else None,
        "recall": round(r, 4) if r is not None else None,
        "f1": round(2 * p * r / (p + r), 4) if p is not None and r is not None and p + r > 0 else None,
    }


def _median(xs: list[float]) -> float | None:
    return round(float(statistics.median(xs)), 3) if xs else None


#: How ``evaluate_early_warnings`` may split the runs into two folds.
SPLITS = ("time", "id")


def split_runs(runs: list[ParsedRun], split: str) -> tuple[list[ParsedRun], list[ParsedRun]]:
    """Two folds of ``runs``: ``time``, the first and second half by start time (ties: run id);
    ``id``, runs whose run id's SHA-256 (as an integer) is even, then odd (see :func:`evaluate_early_warnings`).

    Raises:
        ValueError: unknown ``split``.
    """
    if split == "time":
        ordered = sorted(runs, key=lambda r: (r.events[0].data["event_time"], r.run_id))
        half = (len(ordered) + 1) // 2
        return ordered[:half], ordered[half:]
    if split == "id":
        even = [r for r in runs if int(hashlib.sha256(r.run_id.encode()).hexdigest(), 16) % 2 == 0]
        odd = [r for r in runs if int(hashlib.sha256(r.run_id.encode()).hexdigest(), 16) % 2 == 1]
        return even, odd
    raise ValueError(f"split is one of {SPLITS}, not {split!r}")


def evaluate_early_warnings(
    directory: Path,
    *,
    thresholds: HealingThresholds | None = None,
    min_level: str = "warn",
    min_peers: int = 5,
    split: str | None = None,
) -> dict[str, Any]:
    """Early warnings on real runs versus the "more steps than the median so far" baseline.

    Args:
        directory: mini-swe-agent results folder with ``results.csv``.
        thresholds: healing thresholds (default: the defaults of :class:`HealingThresholds`).
        min_level: lowest warning level that flags a run (``warn``, ``recommend_restart``, ``escalate``).
        min_peers: finished runs the baseline needs before it speaks.
        split: ``None``, or ``time`` / ``id``: add the same table for each of two folds (``"folds"``).

    Returns:
        ``{"runs", "unresolved", "precision", "recall", "f1", "median_lead_steps",
        "median_lead_seconds", "flagged", "true_positives", "midpoint": {"precision", "recall", "f1",
        "flagged", ...}, "signals": {signal: runs flagged by it}, "signal_precision": {signal:
        {"flagged", "true_positives", "precision"}}, "baseline": {"precision", "recall", "f1",
        "median_lead_steps", "median_lead_seconds", "midpoint": {...}}, "min_level", "config"}``, and
        with ``split`` ``"split"`` and ``"folds": [table, table]`` (each without ``config``).
        Precision is ``None`` when nothing was flagged. Leads are counted on the flagged unresolved
        runs: steps (and seconds) from the first flagging warning to the run's last step (end).

    Raises:
        ValueError: unknown ``min_level`` or ``split``, or no run in ``directory``.
    """
    if min_level not in LEVELS:
        raise ValueError(f"min_level is one of {LEVELS}, not {min_level!r}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split is one of {SPLITS}, not {split!r}")
    runs = load_runs(directory)
    t = thresholds or HealingThresholds()
    result = _early_warnings(runs, t, min_level, min_peers)
    result["config"] = t.model_dump(
        mode="json",
        include={
            "failing_streak",
            "loop_repeats",
            "loop_window",
            "stall_seconds",
            "runaway_factor",
            "runaway_min_peers",
            "trouble_min_step_ratio",
        },
    )
    if split is not None:
        result["split"] = split
        result["folds"] = [_early_warnings(fold, t, min_level, min_peers) for fold in split_runs(runs, split)]
    return result


def _early_warnings(
    runs: list[ParsedRun], t: HealingThresholds, min_level: str, min_peers: int
) -> dict[str, Any]:
    """The table of :func:`evaluate_early_warnings` (without ``config``) for one replay of ``runs``."""
    last_step = {
        r.run_id: max((int(e.data["step"]) for e in r.events if "step" in e.data), default=0) for r in runs
    }
    end_time = {r.run_id: r.events[-1].data["event_time"] for r in runs}
    outcome = {r.run_id: r.events[-1].data.get("outcome") for r in runs}
    scored = {rid for rid, o in outcome.items() if o in ("RESOLVED", "UNRESOLVED")}
    positives = {rid for rid in scored if outcome[rid] == "UNRESOLVED"}

    healer = Healer(HealingConfig(t, 0))
    rank = LEVELS.index(min_level)
    first_warning: dict[str, tuple[int, datetime, str]] = {}
    by_signal: dict[str, set[str]] = {}
    mid_flagged: set[str] = set()
    # baseline state
    finished_steps: list[int] = []
    base_first: dict[str, tuple[int, datetime]] = {}
    base_mid: set[str] = set()
    for ev in merged_events(runs):
        for d in healer.feed(ev):
            if d.kind != "agent_warning" or LEVELS.index(d.details["level"]) < rank:
                continue
            rid, step = d.details["run_id"], int(d.details["step"])
            if rid not in last_step or step >= last_step[rid]:
                continue
            by_signal.setdefault(d.details["signal"], set()).add(rid)
            if rid not in first_warning:
                first_warning[rid] = (step, d.event_time, d.details["signal"])
            if step <= (last_step[rid] + 1) // 2:
                mid_flagged.add(rid)
        rid = str(ev.data["run_id"])
        if ev.schema == RUN_LIFECYCLE and ev.data.get("phase") == "FINISHED":
            finished_steps.append(last_step[rid])
        elif ev.schema == LLM_CALL and len(finished_steps) >= min_peers and rid not in base_first:
            step = int(ev.data["step"])
            if step < last_step[rid] and step > statistics.median(finished_steps):
                base_first[rid] = (step, ev.data["event_time"])
                if step <= (last_step[rid] + 1) // 2:
                    base_mid.add(rid)

    def leads(first: dict[str, tuple[Any, ...]]) -> tuple[float | None, float | None]:
        tp = [rid for rid in first if rid in positives]
        steps = [last_step[rid] - first[rid][0] for rid in tp]
        secs = [(end_time[rid] - first[rid][1]).total_seconds() for rid in tp]
        return _median(steps), _median(secs)

    flagged = set(first_warning) & scored
    lead_steps, lead_secs = leads(first_warning)
    b_flagged = set(base_first) & scored
    b_steps, b_secs = leads(base_first)
    main = _pr(flagged, positives)
    base = _pr(b_flagged, positives)
    return {
        "runs": len(runs),
        "unresolved": len(positives),
        "precision": main["precision"],
        "recall": main["recall"],
        "f1": main["f1"],
        "median_lead_steps": lead_steps,
        "median_lead_seconds": lead_secs,
        "flagged": main["flagged"],
        "true_positives": main["true_positives"],
        "midpoint": _pr(mid_flagged & scored, positives),
        "signals": {k: len(v & scored) for k, v in sorted(by_signal.items())},
        "signal_precision": {
            k: {key: pr[key] for key in ("flagged", "true_positives", "precision")}
            for k, v in sorted(by_signal.items())
            for pr in (_pr(v & scored, positives),)
        },
        "baseline": {
            "name": f"more steps than the median final step count of the runs finished so far (after {min_peers})",
            "precision": base["precision"],
            "recall": base["recall"],
            "f1": base["f1"],
            "median_lead_steps": b_steps,
            "median_lead_seconds": b_secs,
            "flagged": base["flagged"],
            "true_positives": base["true_positives"],
            "midpoint": _pr(base_mid & scored, positives),
        },
        "min_level": min_level,
    }


# -- outage ------------------------------------------------------------------------------------------


class CircuitPolicy(Protocol):
    """What the client asks of a circuit policy for one provider."""

    def allow(self, at: datetime) -> bool: ...
    def record(self, at: datetime, ok: bool) -> None: ...


class HealerCircuit:
    """The healer's :class:`CircuitBreaker` as a client policy (admission counts half-open probes)."""

    def __init__(self, key: str, thresholds: HealingThresholds) -> None:
        self.breaker = CircuitBreaker(key, thresholds)
        self.transitions: list[tuple[datetime, str]] = []

    def allow(self, at: datetime) -> bool:
        ok, out = self.breaker.allow(at)
        self.transitions += [(d.event_time, d.kind) for d in out]
        return ok

    def record(self, at: datetime, ok: bool) -> None:
        out = self.breaker.record(at, ok, admitted=True)
        self.transitions += [(d.event_time, d.kind) for d in out]


class LiteLLMCooldown:
    """LiteLLM router cooldown as documented: more than ``allowed_fails`` failures of a deployment
    within a minute put it in cooldown for ``cooldown_seconds``; no half-open state (after the
    cooldown every request goes through again).

    The failure count is a one-minute window that starts at the first failure after the last reset
    (LiteLLM keeps it in a cache entry with a 60 s TTL).
    """

    def __init__(
        self, allowed_fails: int = 3, cooldown_seconds: float = 5.0, minute_seconds: float = 60.0
    ) -> None:
        self.allowed_fails = allowed_fails
        self.cooldown = timedelta(seconds=cooldown_seconds)
        self.minute = timedelta(seconds=minute_seconds)
        self.fails = 0
        self.window_start: datetime | None = None
        self.until: datetime | None = None
        self.transitions: list[tuple[datetime, str]] = []

    def allow(self, at: datetime) -> bool:
        if self.until is not None and at >= self.until:
            self.transitions.append((self.until, "circuit_closed"))
            self.until = None
        return self.until is None

    def record(self, at: datetime, ok: bool) -> None:
        if ok:
            return
        if self.window_start is None or at >= self.window_start + self.minute:
            self.window_start, self.fails = at, 0
        self.fails += 1
        if self.fails > self.allowed_fails and self.until is None:
            self.until = at + self.cooldown
            self.transitions.append((at, "circuit_opened"))


@dataclass(slots=True)
class _Tally:
    attempts: int = 0
    calls_to_failing_while_down: int = 0
    failed_to_caller: int = 0
    served_by_fallback: int = 0
    retry_wait_seconds: list[float] = field(default_factory=list)
    first_ok_after_recovery: datetime | None = None


def _fails(seed: int, request_id: str, attempt_no: int, rate: float) -> tuple[bool, str, int]:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{request_id}:{attempt_no}".encode()).digest()[:8], "big")
    rng = random.Random(h)
    if rng.random() >= rate:
        return False, "ok", 200
    return (True, "server_error", 503) if rng.random() < 0.5 else (True, "rate_limited", 429)


def simulate(
    calls: list[tuple[datetime, str, str]],
    policies: dict[str, CircuitPolicy],
    chain: list[str],
    *,
    failing: str,
    down_from: datetime,
    down_until: datetime,
    failure_rate: float,
    seed: int,
    thresholds: HealingThresholds,
) -> dict[str, Any]:
    """Replay ``calls`` (``(time, request id, provider)``, in time order) through a client with ``policies``.

    Returns:
        ``{"calls_to_failing_provider_while_down", "requests_failed_to_caller", "requests",
        "attempts", "served_by_fallback", "median_retry_wait_seconds_while_down",
        "first_ok_after_recovery"}`` (the last one a datetime or None).
    """
    tally = _Tally()
    for at, request_id, provider in calls:
        order = [provider, *[p for p in chain if p != provider]]
        served = False
        waited = 0.0
        attempt_no = 0
        for target in order:
            for attempt in range(1, thresholds.retry_max_attempts + 1):
                now = at + timedelta(seconds=waited)
                if not policies[target].allow(now):
                    break
                attempt_no += 1
                tally.attempts += 1
                down = target == failing and down_from <= now < down_until
                if down:
                    tally.calls_to_failing_while_down += 1
                failed, _kind, _status = (
                    _fails(seed, request_id, attempt_no, failure_rate) if down else (False, "ok", 200)
                )
                policies[target].record(now, not failed)
                if not failed:
                    served = True
                    if target == failing and now >= down_until and tally.first_ok_after_recovery is None:
                        tally.first_ok_after_recovery = now
                    break
                if attempt < thresholds.retry_max_attempts:
                    waited += backoff_seconds(
                        request_id, attempt_no, thresholds.retry_base_seconds, thresholds.retry_max_seconds
                    )
            if served:
                if target != provider:
                    tally.served_by_fallback += 1
                break
        if not served:
            tally.failed_to_caller += 1
        if down_from <= at < down_until and provider == failing:
            tally.retry_wait_seconds.append(waited)
    return {
        "calls_to_failing_provider_while_down": tally.calls_to_failing_while_down,
        "requests_failed_to_caller": tally.failed_to_caller,
        "requests": len(calls),
        "attempts": tally.attempts,
        "served_by_fallback": tally.served_by_fallback,
        "median_retry_wait_seconds_while_down": _median(tally.retry_wait_seconds),
        "first_ok_after_recovery": tally.first_ok_after_recovery,
    }


def _times(
    transitions: list[tuple[datetime, str]],
    down_from: datetime,
    down_until: datetime,
    first_ok: datetime | None,
) -> dict[str, Any]:
    opened = [t for t, k in transitions if k == "circuit_opened" and t >= down_from]
    opens_while_down = [t for t in opened if t < down_until]
    closed = [t for t, k in transitions if k == "circuit_closed" and t >= down_until]
    return {
        "time_to_open_seconds": round((opened[0] - down_from).total_seconds(), 3) if opened else None,
        "time_to_close_after_recovery_seconds": round((first_ok - down_until).total_seconds(), 3) if first_ok else None,
        "first_closed_transition_after_recovery_seconds": round((closed[0] - down_until).total_seconds(), 3) if closed else None,
        "opens_while_down": len(opens_while_down),
    }  # fmt: skip


def evaluate_outage(
    directory: Path,
    *,
    provider: str | None = None,
    start_offset_seconds: float = 600.0,
    duration_seconds: float = 900.0,
    failure_rate: float = 0.8,
    seed: int = 11,
    thresholds: HealingThresholds | None = None,
) -> dict[str, Any]:
    """An outage injected on one provider of the real LLM-call stream: healer versus LiteLLM cooldown.

    Args:
        directory: mini-swe-agent results folder.
        provider: the provider that fails (default: the one with the most calls).
        start_offset_seconds: outage start after the failing provider's first call.
        duration_seconds: outage length.
        failure_rate: probability that an attempt to the failing provider fails while it is down.
        seed: seed of the failure draws.
        thresholds: the healer's thresholds (default: :class:`HealingThresholds` defaults); the
            client's retry settings (``retry_*``) are shared by both policies.

    Returns:
        ``{"healer": {...}, "baseline": {...}, "outage": {...}}``; each policy has
        ``calls_to_failing_provider_while_down``, ``time_to_open_seconds`` (outage start to the
        first open / cooldown), ``time_to_close_after_recovery_seconds`` (outage end to the first
        successful call that the policy lets through to the recovered provider),
        ``requests_failed_to_caller`` and more counts. ``None`` where the event never happened.

    Raises:
        ValueError: no run in ``directory``, or ``provider`` has no call.
    """
    runs = load_runs(directory)
    t = thresholds or HealingThresholds()
    calls: list[tuple[datetime, str, str]] = []
    counts: dict[str, int] = {}
    for ev in merged_events(runs):
        if ev.schema != LLM_CALL:
            continue
        p = ev.data.get("provider") or "unknown"
        counts[p] = counts.get(p, 0) + 1
        calls.append(
            (ev.data["event_time"], ev.data.get("response_id") or f"{ev.data['run_id']}:{ev.data['step']}", p)
        )
    chain = sorted(counts, key=lambda p: (-counts[p], p))
    failing = provider or chain[0]
    if failing not in counts:
        raise ValueError(f"provider {failing!r} has no call in {directory}; providers: {sorted(counts)}")
    first_call = next(at for at, _, p in calls if p == failing)
    down_from = first_call + timedelta(seconds=start_offset_seconds)
    down_until = down_from + timedelta(seconds=duration_seconds)
    common = dict(
        failing=failing,
        down_from=down_from,
        down_until=down_until,
        failure_rate=failure_rate,
        seed=seed,
        thresholds=t,
    )
    result: dict[str, Any] = {}
    for name, make in (
        ("healer", lambda p: HealerCircuit(f"provider:{p}", t)),
        ("baseline", lambda p: LiteLLMCooldown()),
    ):
        policies = {p: make(p) for p in chain}
        sim = simulate(calls, policies, chain, **common)  # type: ignore[arg-type]
        first_ok = sim.pop("first_ok_after_recovery")
        result[name] = {**sim, **_times(policies[failing].transitions, down_from, down_until, first_ok)}  # type: ignore[attr-defined]
    result["baseline"]["policy"] = (
        "LiteLLM router cooldown: allowed_fails=3 per minute, cooldown_time=5 s, no half-open"
    )
    result["healer"]["policy"] = (
        f"circuit breaker: error_rate {t.error_rate} over {t.window_seconds:g} s (min {t.min_calls} calls) or "
        f"{t.consecutive_failures} consecutive failures; open {t.open_seconds:g} s; {t.half_open_max_probes} probe(s)"
    )
    result["outage"] = {
        "provider": failing,
        "fallback_chain": chain,
        "calls_per_provider": counts,
        "from": down_from.isoformat(),
        "until": down_until.isoformat(),
        "duration_seconds": duration_seconds,
        "failure_rate": failure_rate,
        "seed": seed,
        "recorded_calls_to_provider_while_down": sum(
            1 for at, _, p in calls if p == failing and down_from <= at < down_until
        ),
        "retry": {
            "max_attempts": t.retry_max_attempts,
            "base_seconds": t.retry_base_seconds,
            "max_seconds": t.retry_max_seconds,
        },
    }
    return result
