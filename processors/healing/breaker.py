"""Circuit breakers on event time: closed -> open -> half-open -> closed (or open again).

A :class:`CircuitBreaker` watches the outcomes of calls to one target (a provider, a provider's model,
or an agent). It is driven by event time only, so a replay of the same outcomes gives the same
transitions:

* **closed -> open** when the sliding window (the last ``window_seconds`` of event time) holds at
  least ``min_calls`` calls and their failure rate is at least ``error_rate``, or when
  ``consecutive_failures`` calls in a row failed. The window is kept as buckets of
  :data:`BUCKET_US` (100 ms) of event time, each with its calls and failures, as Resilience4j's
  time-based sliding window aggregates calls per bucket: a call leaves the window with its bucket
  (when the bucket's start is ``window_seconds`` behind the watermark), and the state stays within
  ``10 * window_seconds`` buckets whatever the call rate;
* **open -> half-open** once ``open_seconds`` of event time have passed since it opened (the transition
  is stamped at ``opened_at + open_seconds``, not at the time of the event that noticed it);
* **half-open**: at most ``half_open_max_probes`` calls are admitted (:meth:`CircuitBreaker.allow`);
  a failed probe opens it again, ``half_open_successes`` successful probes close it.

Every transition is returned as a :class:`processors.healing.decisions.Decision` (kinds
``circuit_opened``, ``circuit_half_open``, ``circuit_closed``) whose details hold the window's counts,
the thresholds and the reason. :class:`BreakerBoard` keeps one breaker per provider, per
``provider/model`` and per agent, and creates a breaker for any target it has not seen.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from configuration.schemas import HealingThresholds
from processors.healing.decisions import Decision, from_us, to_us, to_utc

__all__ = ["BreakerBoard", "CircuitBreaker", "CircuitState", "circuit_keys"]

BUCKET_US = 100_000
"""Width of a window bucket in microseconds of event time."""


class CircuitState(StrEnum):
    """State of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_KIND = {
    CircuitState.OPEN: "circuit_opened",
    CircuitState.HALF_OPEN: "circuit_half_open",
    CircuitState.CLOSED: "circuit_closed",
}


@dataclass(slots=True)
class _Probe:
    admitted: int = 0
    succeeded: int = 0


class CircuitBreaker:
    """One circuit breaker on event time.

    Args:
        key: the circuit, ``<scope>:<name>`` (``provider:Google``, ``model:Google/gemini-3-pro``, ``agent:coder``).
        thresholds: the healing configuration (``error_rate``, ``window_seconds``, ``min_calls``,
            ``consecutive_failures``, ``open_seconds``, ``half_open_max_probes``, ``half_open_successes``).
        config_version: version of that configuration, recorded in each transition.
    """

    def __init__(self, key: str, thresholds: HealingThresholds, config_version: int = 0) -> None:
        self.key = key
        self.thresholds = thresholds
        self.config_version = config_version
        self.state = CircuitState.CLOSED
        self.opened_at: datetime | None = None
        self.changed_at: datetime | None = None
        self.consecutive = 0
        self.calls_while_open = 0
        self._window: deque[list[int]] = deque()  # [bucket start (epoch us), calls, failures], oldest first
        self._calls_in_window = 0
        self._failures_in_window = 0
        self._probe = _Probe()
        self._watermark: datetime | None = None
        self._watermark_us = 0  # to_us(self._watermark) once it is set
        self._window_us = _window_us(thresholds)
        self._board: BreakerBoard | None = None  # the board that keeps this breaker, told when it opens
        self._epoch = 0  # the board's advance this breaker's window was last pruned at (see BreakerBoard)

    # -- configuration --------------------------------------------------------------------------
    def reconfigure(self, thresholds: HealingThresholds, config_version: int) -> None:
        """Use new thresholds from now on (the window and the state are kept)."""
        self.thresholds = thresholds
        self.config_version = config_version
        self._window_us = _window_us(thresholds)

    # -- time -----------------------------------------------------------------------------------
    def _tick(self, now: datetime) -> datetime:
        now = to_utc(now)
        watermark = self._watermark
        if watermark is None or now > watermark:
            self._watermark = watermark = now
            self._watermark_us = to_us(now)  # type: ignore[assignment]
        edge = self._watermark_us - self._window_us  # to_us(watermark - window_seconds)
        window = self._window
        while window and window[0][0] <= edge:
            _, calls, failures = window.popleft()
            self._calls_in_window -= calls
            self._failures_in_window -= failures
        return watermark

    def advance(self, now: datetime | float) -> list[Decision]:
        """Move event time to ``now``: an open circuit whose cool-down has passed turns half-open.

        Returns:
            The ``circuit_half_open`` transition, or nothing.
        """
        watermark = self._tick(to_utc(now))
        if self.state is CircuitState.OPEN and self.opened_at is not None:
            due = self._due()
            if due is not None and watermark >= due:
                self._probe = _Probe()
                return [self._transition(CircuitState.HALF_OPEN, due, "cool-down elapsed")]
        return []

    def _due(self) -> datetime | None:
        """When an open breaker's cool-down ends (None: not opened)."""
        if self.opened_at is None:
            return None
        return self.opened_at + timedelta(seconds=self.thresholds.open_seconds)

    # -- admission ------------------------------------------------------------------------------
    def allow(self, now: datetime | float) -> tuple[bool, list[Decision]]:
        """Whether a call may go to this target at ``now``; admitting a half-open probe counts it.

        Returns:
            ``(allowed, transitions)``: the transitions are those :meth:`advance` produced on the way.
        """
        out = self.advance(now)
        if self.state is CircuitState.CLOSED:
            return True, out
        if self.state is CircuitState.OPEN:
            return False, out
        if self._probe.admitted < self.thresholds.half_open_max_probes:
            self._probe.admitted += 1
            return True, out
        return False, out

    def peek(self, now: datetime | float) -> CircuitState:
        """The state at ``now`` without changing anything (an open circuit past its cool-down reads half-open)."""
        if (
            self.state is CircuitState.OPEN
            and self.opened_at is not None
            and to_utc(now) >= self.opened_at + timedelta(seconds=self.thresholds.open_seconds)
        ):
            return CircuitState.HALF_OPEN
        return self.state

    # -- outcomes -------------------------------------------------------------------------------
    def record(self, now: datetime | float, ok: bool, *, admitted: bool = False) -> list[Decision]:
        """Record the outcome of one call that ended at event time ``now``.

        Args:
            now: event time of the outcome.
            ok: whether the call succeeded.
            admitted: the call was admitted through :meth:`allow` (then a half-open probe was
                already counted); an observed call that did not ask counts as a probe when it arrives
                in half-open and probes are left, and is ignored otherwise.

        Returns:
            The transitions it caused (``circuit_half_open`` first when the cool-down had passed).
        """
        now = to_utc(now)
        out = self.advance(now)
        bucket = to_us(now) // BUCKET_US * BUCKET_US  # type: ignore[operator]
        if self._window and self._window[-1][0] == bucket:
            self._window[-1][1] += 1
            self._window[-1][2] += not ok
        else:
            self._window.append([bucket, 1, int(not ok)])
        self._calls_in_window += 1
        if not ok:
            self._failures_in_window += 1
        self.consecutive = 0 if ok else self.consecutive + 1
        t = self.thresholds
        if self.state is CircuitState.OPEN:
            self.calls_while_open += 1
            return out
        if self.state is CircuitState.HALF_OPEN:
            if not admitted:
                if self._probe.admitted >= t.half_open_max_probes:
                    return out
                self._probe.admitted += 1
            if not ok:
                out.append(self._open(now, "half-open probe failed"))
                return out
            self._probe.succeeded += 1
            if self._probe.succeeded >= t.half_open_successes:
                out.append(self._transition(CircuitState.CLOSED, now, "half-open probes succeeded"))
                self._window.clear()
                self._calls_in_window = 0
                self._failures_in_window = 0
                self.consecutive = 0
            return out
        calls = self._calls_in_window
        rate = self._failures_in_window / calls if calls else 0.0
        if not ok and self.consecutive >= t.consecutive_failures:
            out.append(
                self._open(now, f"{self.consecutive} consecutive failures >= {t.consecutive_failures}")
            )
        elif not ok and calls >= t.min_calls and rate >= t.error_rate:
            out.append(
                self._open(
                    now, f"failure rate {rate:.3f} >= {t.error_rate} over {calls} calls (min {t.min_calls})"
                )
            )
        return out

    def _open(self, at: datetime, reason: str) -> Decision:
        self.opened_at = at
        self.calls_while_open = 0
        if self._board is not None:
            self._board._opened(self)
        return self._transition(CircuitState.OPEN, at, reason)

    def _transition(self, to: CircuitState, at: datetime, reason: str) -> Decision:
        before = self.state
        self.state = to
        self.changed_at = at
        return Decision(
            kind=_KIND[to],
            subject=f"circuit:{self.key}",
            event_time=at,
            config_version=self.config_version,
            details={
                "circuit": self.key,
                "from_state": before.value,
                "to_state": to.value,
                "reason": reason,
                **self.counts(),
                "threshold": self.threshold_details(),
            },
        )

    def counts(self) -> dict[str, Any]:
        """The window's counts: ``{"window_calls", "window_failures", "failure_rate", "consecutive_failures", "probes_admitted", "probes_succeeded"}``."""
        calls = self._calls_in_window
        return {
            "window_calls": calls,
            "window_failures": self._failures_in_window,
            "failure_rate": round(self._failures_in_window / calls, 6) if calls else 0.0,
            "consecutive_failures": self.consecutive,
            "probes_admitted": self._probe.admitted,
            "probes_succeeded": self._probe.succeeded,
        }

    def threshold_details(self) -> dict[str, Any]:
        """The thresholds this breaker applies, for the evidence of a transition."""
        t = self.thresholds
        return {
            "error_rate": t.error_rate,
            "window_seconds": t.window_seconds,
            "min_calls": t.min_calls,
            "consecutive_failures": t.consecutive_failures,
            "open_seconds": t.open_seconds,
            "half_open_max_probes": t.half_open_max_probes,
            "half_open_successes": t.half_open_successes,
        }

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready state: ``{"circuit", "state", "changed_at", "opened_at", "config_version", ...counts}``."""
        return {
            "circuit": self.key,
            "state": self.state.value,
            "changed_at": self.changed_at.isoformat() if self.changed_at else None,
            "opened_at": self.opened_at.isoformat() if self.opened_at else None,
            "config_version": self.config_version,
            **self.counts(),
        }

    def dump_state(self, *, shared: bool = False) -> dict[str, Any]:
        """The breaker's whole state, JSON-ready and deterministic (times in epoch microseconds).

        ``{"state", "opened_at_us", "changed_at_us", "watermark_us", "consecutive", "calls_while_open",
        "probe": [admitted, succeeded], "window": [[bucket_start_us, calls, failures], ...]}``; the window
        holds the buckets of the last ``window_seconds`` of event time only (older ones are dropped as time
        advances). With ``shared`` the window's buckets are the breaker's own lists, not copies (no
        allocation per bucket): serialise the result before the breaker records another call.
        """
        return {
            "state": self.state.value,
            "opened_at_us": to_us(self.opened_at),
            "changed_at_us": to_us(self.changed_at),
            "watermark_us": to_us(self._watermark),
            "consecutive": self.consecutive,
            "calls_while_open": self.calls_while_open,
            "probe": [self._probe.admitted, self._probe.succeeded],
            "window": list(self._window) if shared else [list(b) for b in self._window],
        }

    @classmethod
    def load_state(
        cls, key: str, data: dict[str, Any], thresholds: HealingThresholds, config_version: int
    ) -> CircuitBreaker:
        """The breaker :meth:`dump_state` described.

        Raises:
            KeyError, TypeError, ValueError: ``data`` is not such a state.
        """
        b = cls(key, thresholds, config_version)
        b.state = CircuitState(data["state"])
        b.opened_at = from_us(data["opened_at_us"])
        b.changed_at = from_us(data["changed_at_us"])
        b._watermark = from_us(data["watermark_us"])
        b._watermark_us = 0 if data["watermark_us"] is None else int(data["watermark_us"])
        b.consecutive = int(data["consecutive"])
        b.calls_while_open = int(data["calls_while_open"])
        b._probe = _Probe(int(data["probe"][0]), int(data["probe"][1]))
        for entry in data["window"]:
            if len(entry) == 2:  # a state saved before the buckets: one [time_us, ok] per call
                t, ok = int(entry[0]), bool(entry[1])
                bucket = t // BUCKET_US * BUCKET_US
                if b._window and b._window[-1][0] == bucket:
                    b._window[-1][1] += 1
                    b._window[-1][2] += not ok
                else:
                    b._window.append([bucket, 1, int(not ok)])
            else:
                b._window.append([int(entry[0]), int(entry[1]), int(entry[2])])
        b._calls_in_window = sum(c for _, c, _ in b._window)
        b._failures_in_window = sum(f for _, _, f in b._window)
        return b


def _window_us(thresholds: HealingThresholds) -> int:
    """``window_seconds`` in whole microseconds, rounded as ``timedelta(seconds=window_seconds)`` rounds."""
    return timedelta(seconds=thresholds.window_seconds) // _ONE_US


_ONE_US = timedelta(microseconds=1)


def circuit_keys(provider: str | None, model: str | None = None, agent: str | None = None) -> list[str]:
    """The circuits a call belongs to: ``provider:P``, ``model:P/M`` and ``agent:A`` (those that are known).

    A call without a provider is filed under provider ``unknown``.
    """
    p = provider or "unknown"
    keys = [f"provider:{p}"]
    if model:
        keys.append(f"model:{p}/{model}")
    if agent:
        keys.append(f"agent:{agent}")
    return keys


class BreakerBoard:
    """Every circuit breaker, created on first sight of its target.

    Advancing event time only matters to an open breaker (its cool-down may end); for the others it
    only drops window buckets that have aged out. So :meth:`advance` advances the open breakers at once
    and a closed or half-open one lazily, when it is next used (:meth:`get`, :meth:`snapshot`,
    :meth:`dump_state`, :meth:`reconfigure`): its window is then pruned to the board's watermark, which
    leaves it in the state advancing it every time would have (pruning is monotone), at a cost per
    event that does not grow with the number of circuits.

    Args:
        thresholds: the healing configuration shared by every breaker.
        config_version: its version.
    """

    def __init__(self, thresholds: HealingThresholds, config_version: int = 0) -> None:
        self.thresholds = thresholds
        self.config_version = config_version
        self.breakers: dict[str, CircuitBreaker] = {}
        self._watermark: datetime | None = None  # the largest time advance() was given
        self._epoch = 0  # advances that raised the watermark
        self._open: set[str] = set()  # keys of the breakers that may be open (a superset)
        self._next_due: datetime | None = None  # no open breaker's cool-down ends before (None: unknown)

    def _opened(self, breaker: CircuitBreaker) -> None:
        self._open.add(breaker.key)
        if self._next_due is not None:
            self._next_due = min(self._next_due, breaker._due())  # type: ignore[type-var]

    def _sync(self, breaker: CircuitBreaker) -> CircuitBreaker:
        if breaker._epoch != self._epoch:
            breaker._tick(self._watermark)  # type: ignore[arg-type]
            breaker._epoch = self._epoch
        return breaker

    def _adopt(self, breaker: CircuitBreaker) -> CircuitBreaker:
        breaker._board = self
        breaker._epoch = self._epoch
        if breaker.state is CircuitState.OPEN:
            self._open.add(breaker.key)
            self._next_due = None
        return breaker

    def get(self, key: str) -> CircuitBreaker:
        """The breaker of ``key`` (advanced to the board's watermark), created closed when new."""
        breaker = self.breakers.get(key)
        if breaker is None:
            breaker = self.breakers[key] = self._adopt(
                CircuitBreaker(key, self.thresholds, self.config_version)
            )
            return breaker
        if breaker._epoch != self._epoch:
            self._sync(breaker)
        return breaker

    def reconfigure(self, thresholds: HealingThresholds, config_version: int) -> None:
        """Apply new thresholds to every breaker, present and future."""
        for breaker in self.breakers.values():
            self._sync(breaker)  # prune with the window the time passed under
        self.thresholds, self.config_version = thresholds, config_version
        for breaker in self.breakers.values():
            breaker.reconfigure(thresholds, config_version)
        self._next_due = None

    def advance(self, now: datetime | float) -> list[Decision]:
        """Advance every breaker to ``now`` (in key order, so the output order is deterministic)."""
        now = to_utc(now)
        out: list[Decision] = []
        if self._watermark is not None and now <= self._watermark:  # not a new watermark: every breaker now
            for key in sorted(self.breakers):
                out.extend(self.get(key).advance(now))
            return out
        self._watermark = now
        self._epoch += 1
        if self._open and (self._next_due is None or now >= self._next_due):
            for key in sorted(self._open):
                breaker = self.breakers[key]
                breaker._epoch = self._epoch  # advance() prunes it
                out.extend(breaker.advance(now))
            self._open = {k for k in self._open if self.breakers[k].state is CircuitState.OPEN}
            dues = [d for k in self._open if (d := self.breakers[k]._due()) is not None]
            self._next_due = min(dues) if dues else None
        return out

    def allow(self, now: datetime | float, keys: Iterable[str]) -> tuple[bool, list[Decision]]:
        """Whether every circuit in ``keys`` admits a call now (stops at the first that refuses)."""
        out: list[Decision] = []
        for key in keys:
            ok, transitions = self.get(key).allow(now)
            out.extend(transitions)
            if not ok:
                return False, out
        return True, out

    def record(
        self, now: datetime | float, keys: Iterable[str], ok: bool, *, admitted: bool = False
    ) -> list[Decision]:
        """Record one outcome on every circuit in ``keys``."""
        out: list[Decision] = []
        for key in keys:
            out.extend(self.get(key).record(now, ok, admitted=admitted))
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        """Every breaker's :meth:`CircuitBreaker.snapshot`, in key order."""
        return [self.get(k).snapshot() for k in sorted(self.breakers)]

    def dump_state(self, *, shared: bool = False) -> dict[str, Any]:
        """``{circuit key: CircuitBreaker.dump_state(shared=shared)}`` in key order."""
        return {k: self.get(k).dump_state(shared=shared) for k in sorted(self.breakers)}

    def load_state(self, data: dict[str, Any]) -> None:
        """Replace every breaker by those of :meth:`dump_state` (with this board's thresholds).

        Raises:
            KeyError, TypeError, ValueError: ``data`` is not such a state.
        """
        self._open = set()
        self.breakers = {
            k: self._adopt(CircuitBreaker.load_state(k, v, self.thresholds, self.config_version))
            for k, v in data.items()
        }
