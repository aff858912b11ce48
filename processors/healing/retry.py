"""Durable retries on event time: exponential backoff with deterministic full jitter, fallback, escalation.

A failed inference request is not retried in memory: :meth:`RetryScheduler.on_failure` returns a
``retry_scheduled`` decision carrying the due time, the scheduler keeps it in a heap, and
:meth:`RetryScheduler.due` turns it into ``retry_due`` once the watermark reaches that time (the Faust
shell re-issues the request then). Since every scheduled retry is an event, a restarted scheduler
rebuilds its heap from them (:meth:`RetryScheduler.restore`).

Backoff is "full jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter"): attempt ``n``
(the retry after the n-th failure) waits ``uniform(0, min(max_seconds, base_seconds * 2**(n-1)))``.
The uniform draw is seeded by ``sha256(request_id, n)``, so a replay agrees on every due time.

After ``retry_max_attempts`` attempts on one target the request falls back to the next target of its
chain (``fallback`` decision, attempt counting restarts at 1); when the chain is exhausted, or the
error is not retryable (``context_length``, ``content_filter``, ``auth`` go straight to the next
target), the request is escalated (``escalation`` decision) once the chain is exhausted.

What the scheduler remembers of a request (the targets tried, its chain) is forgotten when it succeeds,
is escalated, or once :data:`REQUEST_RETENTION_SECONDS` of event time have passed since its last
failure with no retry of it still pending (:meth:`RetryScheduler.due` prunes): a failure of it after
that starts a new chain. So the scheduler's state (:meth:`RetryScheduler.dump_state`) stays bounded.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from configuration.schemas import HealingThresholds
from processors.healing.decisions import Decision, from_us, to_us, to_utc

__all__ = [
    "ERROR_KINDS",
    "REQUEST_RETENTION_SECONDS",
    "RETRYABLE",
    "RetryScheduler",
    "backoff_seconds",
    "fallback_chain",
]

#: Error kinds of a failed LLM call.
ERROR_KINDS = ("rate_limited", "timeout", "server_error", "context_length", "content_filter", "auth")
#: Those worth retrying on the same target.
RETRYABLE = frozenset({"rate_limited", "timeout", "server_error"})
#: Event time after a request's last failure (no retry pending) after which the scheduler forgets it.
REQUEST_RETENTION_SECONDS = 3600.0


def backoff_seconds(request_id: str, attempt: int, base_seconds: float, max_seconds: float) -> float:
    """Full-jitter backoff before the retry that follows failed attempt ``attempt`` (1-based), in seconds.

    ``uniform(0, min(max_seconds, base_seconds * 2**(attempt-1)))`` drawn from a generator seeded by
    ``sha256(f"{request_id}:{attempt}")``: the same request and attempt always wait the same time.

    Raises:
        ValueError: ``attempt`` below 1.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    cap = min(max_seconds, base_seconds * 2 ** (attempt - 1))
    seed = int.from_bytes(hashlib.sha256(f"{request_id}:{attempt}".encode()).digest()[:8], "big")
    return random.Random(seed).uniform(0.0, cap)


def fallback_chain(target: str, chains: dict[str, list[str]]) -> list[str]:
    """The targets to try after ``target``: ``chains[target]``, else ``chains[provider]`` for ``provider/model``."""
    if target in chains:
        return list(chains[target])
    provider = target.split("/", 1)[0]
    return list(chains.get(provider, []))


@dataclass(order=True, frozen=True, slots=True)
class _Pending:
    due: datetime
    request_id: str
    attempt: int
    target: str
    decision_id: str


class RetryScheduler:
    """Schedules retries, fallbacks and escalations of failed requests.

    Args:
        thresholds: ``retry_max_attempts``, ``retry_base_seconds``, ``retry_max_seconds``, ``fallback_chains``.
        config_version: recorded in each decision.
    """

    def __init__(self, thresholds: HealingThresholds, config_version: int = 0) -> None:
        self.thresholds = thresholds
        self.config_version = config_version
        self._heap: list[_Pending] = []
        self._tried: dict[str, list[str]] = {}
        self._chains: dict[str, list[str]] = {}
        # request id -> event time of its last failure, oldest first (re-inserted at each failure)
        self._last_failure: dict[str, datetime] = {}

    def reconfigure(self, thresholds: HealingThresholds, config_version: int) -> None:
        """Use new thresholds for the decisions made from now on."""
        self.thresholds, self.config_version = thresholds, config_version

    def on_failure(
        self,
        *,
        request_id: str,
        target: str,
        attempt: int,
        error_kind: str,
        at: datetime | float,
        causation_id: str | None = None,
        chain: Sequence[str] | None = None,
    ) -> Decision:
        """Decide what follows a failed attempt.

        Args:
            request_id: the request (the seed of its jitter).
            target: where the attempt went (``provider`` or ``provider/model``).
            attempt: 1-based attempt number on that target.
            error_kind: one of :data:`ERROR_KINDS` (an unknown kind is treated as not retryable).
            at: event time of the failure.
            causation_id: id of the failed call's event.
            chain: fallback targets of the request; default ``fallback_chains`` of the request's
                first target. Fixed at the request's first failure.

        Returns:
            ``retry_scheduled`` (details: ``due_time``, ``backoff_seconds``, ``attempt`` of the retry),
            ``fallback`` (details: ``to_target``), or ``escalation`` when nothing is left.

        Raises:
            ValueError: ``attempt`` below 1.
        """
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, got {attempt}")
        at = to_utc(at)
        t = self.thresholds
        self._last_failure.pop(request_id, None)
        self._last_failure[request_id] = at
        tried = self._tried.setdefault(request_id, [])
        if target not in tried:
            tried.append(target)
        if request_id not in self._chains:
            first = tried[0]
            self._chains[request_id] = (
                list(chain) if chain is not None else fallback_chain(first, t.fallback_chains)
            )
        subject = f"request:{request_id}"
        base = {
            "request_id": request_id,
            "target": target,
            "failed_attempt": attempt,
            "error_kind": error_kind,
        }
        if error_kind in RETRYABLE and attempt < t.retry_max_attempts:
            wait = backoff_seconds(request_id, attempt, t.retry_base_seconds, t.retry_max_seconds)
            due = at + timedelta(seconds=wait)
            decision = Decision(
                kind="retry_scheduled",
                subject=subject,
                event_time=at,
                config_version=self.config_version,
                causation_id=causation_id,
                details={
                    **base,
                    "attempt": attempt + 1,
                    "backoff_seconds": round(wait, 6),
                    "due_time": due.isoformat(),
                },
            )
            heapq.heappush(self._heap, _Pending(due, request_id, attempt + 1, target, decision.id))
            return decision
        remaining = [c for c in self._chains[request_id] if c not in tried]
        if remaining:
            nxt = remaining[0]
            tried.append(nxt)
            return Decision(
                kind="fallback",
                subject=subject,
                event_time=at,
                config_version=self.config_version,
                causation_id=causation_id,
                details={**base, "to_target": nxt, "attempt": 1, "reason": _why(error_kind, attempt, t)},
            )
        self._forget(request_id)
        return Decision(
            kind="escalation",
            subject=subject,
            event_time=at,
            config_version=self.config_version,
            causation_id=causation_id,
            details={
                **base,
                "tried": tried,
                "reason": "fallback chain exhausted: " + _why(error_kind, attempt, t),
            },
        )

    def on_success(self, request_id: str) -> None:
        """Forget a request that succeeded."""
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._tried.pop(request_id, None)
        self._chains.pop(request_id, None)
        self._last_failure.pop(request_id, None)

    def due(self, now: datetime | float) -> list[Decision]:
        """``retry_due`` decisions for every scheduled retry whose due time is at or before ``now``, in due order.

        Also forgets the requests whose last failure is more than :data:`REQUEST_RETENTION_SECONDS`
        before ``now`` and that have no retry pending (oldest failures first; stops at the first kept).
        """
        now = to_utc(now)
        out: list[Decision] = []
        while self._heap and self._heap[0].due <= now:
            p = heapq.heappop(self._heap)
            out.append(
                Decision(
                    kind="retry_due",
                    subject=f"request:{p.request_id}",
                    event_time=p.due,
                    config_version=self.config_version,
                    causation_id=p.decision_id,
                    details={"request_id": p.request_id, "target": p.target, "attempt": p.attempt},
                )
            )
        horizon = now - timedelta(seconds=REQUEST_RETENTION_SECONDS)
        if self._last_failure and next(iter(self._last_failure.values())) < horizon:
            waiting = {p.request_id for p in self._heap}
            while self._last_failure:
                request_id, at = next(iter(self._last_failure.items()))
                if at >= horizon or request_id in waiting:
                    break
                self._forget(request_id)
        return out

    def pending(self) -> list[dict[str, Any]]:
        """Scheduled retries not yet due: ``[{"request_id", "target", "attempt", "due_time"}]`` in due order."""
        return [
            {
                "request_id": p.request_id,
                "target": p.target,
                "attempt": p.attempt,
                "due_time": p.due.isoformat(),
            }
            for p in sorted(self._heap)
        ]

    def dump_state(self) -> dict[str, Any]:
        """The scheduler's whole state, JSON-ready and deterministic (times in epoch microseconds).

        ``{"heap": [[due_us, request_id, attempt, target, decision_id], ...] (due order),
        "requests": [[request_id, last_failure_us, tried, chain], ...] (oldest last failure first)}``.
        """
        return {
            "heap": [
                [to_us(p.due), p.request_id, p.attempt, p.target, p.decision_id] for p in sorted(self._heap)
            ],
            "requests": [
                [r, to_us(at), list(self._tried.get(r, [])), self._chains.get(r)]
                for r, at in self._last_failure.items()
            ],
        }

    def load_state(self, data: dict[str, Any]) -> None:
        """Replace the state by :meth:`dump_state`'s.

        Raises:
            KeyError, TypeError, ValueError: ``data`` is not such a state.
        """
        self._heap = [
            _Pending(from_us(int(d)), str(r), int(a), str(t), str(i))  # type: ignore[arg-type]
            for d, r, a, t, i in data["heap"]
        ]
        heapq.heapify(self._heap)
        self._tried, self._chains, self._last_failure = {}, {}, {}
        for r, at, tried, chain in data["requests"]:
            self._last_failure[r] = from_us(int(at))  # type: ignore[assignment]
            self._tried[r] = list(tried)
            if chain is not None:
                self._chains[r] = list(chain)

    def restore(self, decisions: Iterable[Decision | dict[str, Any]]) -> None:
        """Rebuild the heap from the decision log: every ``retry_scheduled`` without a later ``retry_due``."""
        scheduled: dict[str, _Pending] = {}
        for d in decisions:
            data = d.as_json() if isinstance(d, Decision) else d
            details = data["details"]
            if data["kind"] == "retry_scheduled":
                scheduled[data["id"]] = _Pending(
                    to_utc(datetime.fromisoformat(details["due_time"])),
                    details["request_id"],
                    int(details["attempt"]),
                    details["target"],
                    data["id"],
                )
            elif data["kind"] == "retry_due":
                scheduled.pop(data.get("causation_id") or "", None)
        self._heap = sorted(scheduled.values())
        heapq.heapify(self._heap)


def _why(error_kind: str, attempt: int, t: HealingThresholds) -> str:
    if error_kind not in RETRYABLE:
        return f"{error_kind} is not retryable"
    return f"attempt {attempt} of {t.retry_max_attempts} failed ({error_kind})"
