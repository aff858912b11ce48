"""Agent health from the action stream: failing streaks, loops, stalls and runaway cost, on event time.

Reads the agent events of ``schemas/avro`` (``sophia.agent.ToolCall``, ``sophia.agent.LlmCall``,
``sophia.agent.RunLifecycle``; for imported runs these come from mini-swe-agent trajectories through
``connectors.agent_runs``) and raises ``agent_warning`` decisions, one per run, signal and level, the
first time the level is reached. Signals (thresholds from :class:`configuration.schemas.HealingThresholds`):

* ``failing_streak``: commands in a row that failed (non-zero return code or timed out); the final
  submit (no return code) neither breaks nor extends a streak. Levels at 1x, 2x, 3x ``failing_streak``.
* ``loop``: one command (whitespace-normalised) occurring ``loop_repeats`` times among the run's last
  ``loop_window`` commands; levels at ``loop_repeats``, +1, +2 occurrences (:data:`LOOP_STEP`).
* ``stall``: no progress (a command not run before in this run that succeeded) for ``stall_seconds``
  of event time; levels at 1x, 2x, 3x. Checked at each event of the run and whenever the watermark
  advances (:meth:`AgentHealth.advance`).
* ``runaway_tokens`` / ``runaway_cost`` / ``runaway_steps``: the run's cumulative tokens (prompt +
  completion), cost in USD or step count exceed ``runaway_factor`` times the median final total of the
  peer runs finished so far (once ``runaway_min_peers`` have finished); levels at 1x, 1.5x, 2x that
  factor.

The trouble gate: a ``loop`` or ``failing_streak`` at level ``warn`` is common in runs that go well (an
agent reruns its reproduce script or the tests after each edit, a few commands fail while it explores),
so it is held while the run is no longer than its peers: it is raised only once the run's step count
exceeds ``trouble_min_step_ratio`` times the median final step count of the finished peer runs, at the
first event of the run past that point (its details say when it was reached, ``seen_step``, and
``peer_median_steps``). A level above ``warn`` is raised at once. With ``trouble_min_step_ratio`` 0, or
fewer than ``runaway_min_peers`` finished peers, everything is raised at once. On the 120 shared runs
(default thresholds) the gate takes the precision of the warnings raised before a run's last step from
0.38 to 0.43 (recall 0.81 to 0.74) and of those raised by its midpoint from 0.50 to 0.67 (recall 0.39
to 0.32) (``backbone eval healing``; README, Quality on real data).

Levels and the action each recommends: ``warn``, ``recommend_restart``, ``escalate``.

Bounded state: a run (finished or not) with no event for ``3 * stall_seconds`` of event time is
forgotten when the watermark passes that point (:meth:`AgentHealth.advance`; by then every stall level
it could raise has been raised); a later event of it starts its health afresh. The runaway median is
taken over the final totals of the last :data:`PEER_HISTORY` finished runs.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from configuration.schemas import HealingThresholds
from processors.healing.decisions import Decision, from_us, to_us, to_utc

__all__ = ["LEVELS", "LOOP_STEP", "PEER_HISTORY", "AgentHealth", "RunHealth"]

LEVELS = ("warn", "recommend_restart", "escalate")
#: Finished runs whose final totals make the peer median of the runaway signals (the most recent ones).
PEER_HISTORY = 1000
#: Extra repeats from one ``loop`` level to the next.
LOOP_STEP = 1


@dataclass(slots=True)
class RunHealth:
    """What the monitor knows about one run."""

    run_id: str
    step: int = 0
    started_at: datetime | None = None
    last_time: datetime | None = None
    last_progress: datetime | None = None
    streak: int = 0
    recent: deque[str] = field(default_factory=deque)  # digests of the last commands
    seen_ok: set[str] = field(default_factory=set)  # digests of the commands that succeeded
    tokens: int = 0
    cost_usd: float = 0.0
    finished: bool = False
    levels: dict[str, int] = field(default_factory=dict)
    # signal -> [value, bounds, details] of the highest level reached while the trouble gate was shut
    held: dict[str, list[Any]] = field(default_factory=dict)


def _normalise(command: str) -> str:
    return " ".join(command.split())


def _reached(value: float, bounds: tuple[float, float, float], cap: int = 2) -> int:
    """The highest level index (0-2, at most ``cap``) whose bound ``value`` reaches; -1 for none."""
    level = -1
    for i, bound in enumerate(bounds):
        if value >= bound and i <= cap:
            level = i
    return level


def _digest(command: str) -> str:
    # what the run remembers of a (normalised) command: 64 bits of its SHA-256, enough to tell commands apart
    return hashlib.sha256(command.encode()).hexdigest()[:16]


class AgentHealth:
    """Watches agent runs and raises warnings.

    Args:
        thresholds: the healing configuration.
        config_version: recorded in each decision.
    """

    def __init__(self, thresholds: HealingThresholds, config_version: int = 0) -> None:
        self.thresholds = thresholds
        self.config_version = config_version
        self.runs: dict[str, RunHealth] = {}
        self._final_tokens: deque[int] = deque(maxlen=PEER_HISTORY)
        self._final_cost: deque[float] = deque(maxlen=PEER_HISTORY)
        self._final_steps: deque[int] = deque(maxlen=PEER_HISTORY)
        self._median_steps: float | None = None  # median of _final_steps, kept with it
        self._medians: tuple[float, float, float] | None = (
            None  # of the three finals deques, until one changes
        )
        # no run can stall or be forgotten before this event time (a lower bound; None: check at the next advance)
        self._quiet_until: datetime | None = None

    def reconfigure(self, thresholds: HealingThresholds, config_version: int) -> None:
        """Use new thresholds from now on."""
        self.thresholds, self.config_version = thresholds, config_version
        self._quiet_until = None

    def adopt_peers(self, other: AgentHealth) -> None:
        """Start from ``other``'s finished peers (their final totals), replacing this monitor's."""
        self._final_tokens = deque(other._final_tokens, maxlen=PEER_HISTORY)
        self._final_cost = deque(other._final_cost, maxlen=PEER_HISTORY)
        self._final_steps = deque(other._final_steps, maxlen=PEER_HISTORY)
        self._median_steps = other._median_steps
        self._medians = None

    def adopt_run(self, other: AgentHealth, run_id: str) -> None:
        """Move run ``run_id`` from ``other`` to this monitor (replacing one of that id here).

        Raises:
            KeyError: ``other`` has no run ``run_id``.
        """
        run = other.runs.pop(run_id)
        run.recent = deque(run.recent, maxlen=self.thresholds.loop_window)
        self.runs[run_id] = run
        self._quiet_until = None

    def _run(self, run_id: str) -> RunHealth:
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = RunHealth(
                run_id=run_id, recent=deque(maxlen=self.thresholds.loop_window)
            )
        return run

    def on_event(
        self, schema: str, data: Mapping[str, Any], *, causation_id: str | None = None
    ) -> list[Decision]:
        """Take one agent event (its Avro full name and decoded data) and return the warnings it raises.

        Raises:
            KeyError: the data lacks ``run_id`` or ``event_time``.
        """
        name = schema.rsplit(".", 1)[-1]
        run = self._run(str(data["run_id"]))
        at = to_utc(data["event_time"])
        if run.started_at is None:
            run.started_at = at
            run.last_progress = at
            if self._quiet_until is not None and at < self._quiet_until:
                self._quiet_until = None  # a new run (of a late event) may stall before the bound
        run.last_time = at if run.last_time is None or at > run.last_time else run.last_time
        if "step" in data and data["step"] is not None:
            run.step = max(run.step, int(data["step"]))
        out: list[Decision] = []
        if name in ("ToolCall", "LlmCall") and run.held and not run.finished and self._gate_open(run):
            out += self._release(run, at, causation_id)
        if name == "ToolCall":
            out += self._tool(run, data, at, causation_id)
        elif name == "LlmCall":
            out += self._llm(run, data, at, causation_id)
        elif name == "RunLifecycle" and data.get("phase") == "FINISHED":
            run.finished = True
            run.held = {}
            self._final_tokens.append(run.tokens)
            self._final_cost.append(run.cost_usd)
            self._final_steps.append(run.step)
            self._median_steps = float(statistics.median(self._final_steps))
            self._medians = None
            return out
        if not run.finished:
            out += self._stall(run, at, causation_id)
        return out

    def advance(self, now: datetime | float) -> list[Decision]:
        """Check every unfinished run for a stall at watermark ``now`` (in run-id order), then forget the
        runs with no event in the last ``3 * stall_seconds`` before ``now``.

        The runs are only looked at once ``now`` reaches the earliest time at which one of them could
        stall or be forgotten (kept as a lower bound; a look that finds nothing changes nothing)."""
        now = to_utc(now)
        if self._quiet_until is not None and now < self._quiet_until:
            return []
        out: list[Decision] = []
        s = self.thresholds.stall_seconds
        horizon = now - timedelta(seconds=3 * s)
        for run_id in sorted(self.runs):
            run = self.runs[run_id]
            if not run.finished:
                out += self._stall(run, now, None)
            if run.last_time is not None and run.last_time <= horizon:
                del self.runs[run_id]
        self._quiet_until = self._next_check()
        return out

    def _next_check(self) -> datetime | None:
        """A time before which no run can stall or be forgotten (1 ms early, so float rounding cannot
        make it late); None when a run has no times."""
        s = self.thresholds.stall_seconds
        soonest: datetime | None = None
        for run in self.runs.values():
            if run.last_time is None or run.last_progress is None:
                return None
            t = run.last_time + timedelta(seconds=3 * s)
            level = run.levels.get("stall", -1)
            if not run.finished and level < 2:
                t = min(t, run.last_progress + timedelta(seconds=s * (level + 2)))
            if soonest is None or t < soonest:
                soonest = t
        return None if soonest is None else soonest - timedelta(milliseconds=1)

    # -- signals --------------------------------------------------------------------------------
    def _tool(
        self, run: RunHealth, data: Mapping[str, Any], at: datetime, cause: str | None
    ) -> list[Decision]:
        t = self.thresholds
        command = _normalise(str(data.get("command") or ""))
        rc = data.get("return_code")
        failed = bool(data.get("timed_out")) or (rc is not None and rc != 0)
        out: list[Decision] = []
        if rc is not None or data.get("timed_out"):
            run.streak = run.streak + 1 if failed else 0
        digest = _digest(command)
        if not failed and rc == 0 and digest not in run.seen_ok:
            run.seen_ok.add(digest)
            if run.last_progress is not None and at < run.last_progress:
                self._quiet_until = None  # progress moved back (a late event): the run may stall sooner
            run.last_progress = at
        if run.recent.maxlen != t.loop_window:
            run.recent = deque(run.recent, maxlen=t.loop_window)
        run.recent.append(digest)
        # below its first bound a signal raises and holds nothing (_trouble returns []): not called then
        n = t.failing_streak
        if run.streak >= n:
            out += self._trouble(
                run, "failing_streak", run.streak, (n, 2 * n, 3 * n), at, cause, {"streak": run.streak}
            )
        repeats = run.recent.count(digest) if command else 0
        r = t.loop_repeats
        if repeats >= r:
            out += self._trouble(
                run,
                "loop",
                repeats,
                (r, r + LOOP_STEP, r + 2 * LOOP_STEP),
                at,
                cause,
                {"repeats": repeats, "window": t.loop_window, "command": command[:200]},
            )
        return out

    def _llm(
        self, run: RunHealth, data: Mapping[str, Any], at: datetime, cause: str | None
    ) -> list[Decision]:
        t = self.thresholds
        run.tokens += int(data.get("prompt_tokens") or 0) + int(data.get("completion_tokens") or 0)
        run.cost_usd += float(data.get("cost_usd") or 0.0)
        out: list[Decision] = []
        if len(self._final_tokens) < t.runaway_min_peers:
            return out
        f = t.runaway_factor
        medians = self._medians
        if medians is None:
            medians = self._medians = tuple(  # type: ignore[assignment]
                float(statistics.median(d)) if d else 0.0
                for d in (self._final_tokens, self._final_cost, self._final_steps)
            )
        finals_of: tuple[tuple[str, float, deque[Any], float], ...] = (
            ("runaway_tokens", float(run.tokens), self._final_tokens, medians[0]),  # type: ignore[index]
            ("runaway_cost", run.cost_usd, self._final_cost, medians[1]),  # type: ignore[index]
            ("runaway_steps", float(run.step), self._final_steps, medians[2]),  # type: ignore[index]
        )
        for signal, value, finals, median in finals_of:
            if len(finals) < t.runaway_min_peers:
                continue  # steps of peers finished before a restore from an older snapshot are unknown
            if median <= 0:
                continue
            ratio = value / median
            if ratio < f:
                continue  # below the first bound (runaway_factor > 1: the bounds rise): no level
            bounds = (f, 1.5 * f, 2 * f)
            if _reached(ratio, bounds) <= run.levels.get(signal, -1):
                continue  # no new level (what _level would find): its details are not built
            out += self._level(
                run, signal, ratio, bounds, at, cause,
                {"value": round(value, 6), "peer_median": round(median, 6), "ratio": round(ratio, 3), "peers": len(finals)},
            )  # fmt: skip
        return out

    def _gate_open(self, run: RunHealth) -> bool:
        """Whether ``loop`` and ``failing_streak`` may speak for ``run`` (see the module docstring)."""
        t = self.thresholds
        if t.trouble_min_step_ratio == 0 or self._median_steps is None:
            return True
        if len(self._final_steps) < t.runaway_min_peers:
            return True
        return run.step > t.trouble_min_step_ratio * self._median_steps

    def _trouble(
        self,
        run: RunHealth,
        signal: str,
        value: float,
        bounds: tuple[float, float, float],
        at: datetime,
        cause: str | None,
        details: dict[str, Any],
    ) -> list[Decision]:
        """A gated signal: raised at once when the gate is open or it is past ``warn``; else held."""
        if value >= bounds[1] or self._gate_open(run):
            return self._level(run, signal, value, bounds, at, cause, details)
        if value < bounds[0]:
            return []
        held = run.held.get(signal)
        if held is None or value > held[0]:
            run.held[signal] = [value, list(bounds), {**details, "seen_step": run.step}]
        return []

    def _release(self, run: RunHealth, at: datetime, cause: str | None) -> list[Decision]:
        """Raise what the gate held for ``run`` (in signal order), now that it is open."""
        out: list[Decision] = []
        median = self._median_steps
        for signal, (value, bounds, details) in sorted(run.held.items()):
            extra = {"peer_median_steps": round(median, 3)} if median is not None else {}
            out += self._level(run, signal, value, tuple(bounds), at, cause, {**details, **extra})
        run.held = {}
        return out

    def _stall(self, run: RunHealth, now: datetime, cause: str | None) -> list[Decision]:
        if run.last_progress is None:
            return []
        s = self.thresholds.stall_seconds
        idle = (now - run.last_progress).total_seconds()
        out: list[Decision] = []
        for i, mult in enumerate((1, 2, 3)):
            if idle >= s * mult and run.levels.get("stall", -1) < i:
                at = run.last_progress + timedelta(seconds=s * mult)
                out += self._level(
                    run,
                    "stall",
                    idle,
                    (s, 2 * s, 3 * s),
                    at,
                    cause,
                    {"seconds_without_progress": s * mult},
                    cap=i,
                )
        return out

    def _level(
        self,
        run: RunHealth,
        signal: str,
        value: float,
        bounds: tuple[float, float, float],
        at: datetime,
        cause: str | None,
        details: dict[str, Any],
        cap: int = 2,
    ) -> list[Decision]:
        level = _reached(value, bounds, cap)
        if level <= run.levels.get(signal, -1):
            return []
        run.levels[signal] = level
        return [
            Decision(
                kind="agent_warning",
                subject=f"run:{run.run_id}",
                event_time=at,
                config_version=self.config_version,
                causation_id=cause,
                details={
                    "run_id": run.run_id,
                    "signal": signal,
                    "level": LEVELS[level],
                    "step": run.step,
                    "threshold": bounds[level],
                    **details,
                },
            )
        ]

    def dump_state(self) -> dict[str, Any]:
        """The monitor's whole state, JSON-ready and deterministic (times in epoch microseconds).

        ``{"runs": {run_id: {"step", "started_at_us", "last_time_us", "last_progress_us", "streak",
        "recent", "seen_ok" (sorted), "tokens", "cost_usd", "finished", "levels", "held"}},
        "final_tokens", "final_cost", "final_steps"}``.
        """
        return {
            "runs": {
                rid: {
                    "step": r.step,
                    "started_at_us": to_us(r.started_at),
                    "last_time_us": to_us(r.last_time),
                    "last_progress_us": to_us(r.last_progress),
                    "streak": r.streak,
                    "recent": list(r.recent),
                    "seen_ok": sorted(r.seen_ok),
                    "tokens": r.tokens,
                    "cost_usd": r.cost_usd,
                    "finished": r.finished,
                    "levels": dict(sorted(r.levels.items())),
                    "held": {k: [v[0], list(v[1]), v[2]] for k, v in sorted(r.held.items())},
                }
                for rid, r in sorted(self.runs.items())
            },
            "final_tokens": list(self._final_tokens),
            "final_cost": list(self._final_cost),
            "final_steps": list(self._final_steps),
        }

    def load_state(self, data: dict[str, Any]) -> None:
        """Replace the state by :meth:`dump_state`'s (one of a healer before the trouble gate, without
        ``held`` and ``final_steps``, reads as nothing held and no peer step counts).

        Raises:
            KeyError, TypeError, ValueError: ``data`` is not such a state.
        """
        self.runs = {}
        for rid, r in data["runs"].items():
            self.runs[rid] = RunHealth(
                run_id=rid,
                step=int(r["step"]),
                started_at=from_us(r["started_at_us"]),
                last_time=from_us(r["last_time_us"]),
                last_progress=from_us(r["last_progress_us"]),
                streak=int(r["streak"]),
                recent=deque(r["recent"], maxlen=self.thresholds.loop_window),
                seen_ok=set(r["seen_ok"]),
                tokens=int(r["tokens"]),
                cost_usd=float(r["cost_usd"]),
                finished=bool(r["finished"]),
                levels={k: int(v) for k, v in r["levels"].items()},
                held={
                    k: [float(v[0]), [float(b) for b in v[1]], dict(v[2])]
                    for k, v in r.get("held", {}).items()
                },
            )
        self._final_tokens = deque((int(x) for x in data["final_tokens"]), maxlen=PEER_HISTORY)
        self._final_cost = deque((float(x) for x in data["final_cost"]), maxlen=PEER_HISTORY)
        self._final_steps = deque((int(x) for x in data.get("final_steps", ())), maxlen=PEER_HISTORY)
        self._median_steps = float(statistics.median(self._final_steps)) if self._final_steps else None
        self._medians = None
        self._quiet_until = None

    def snapshot(self) -> list[dict[str, Any]]:
        """Open warnings: ``[{"run_id", "signal", "level", "step"}]`` of unfinished runs, in run-id order."""
        out = []
        for run_id in sorted(self.runs):
            run = self.runs[run_id]
            if run.finished:
                continue
            for signal, level in sorted(run.levels.items()):
                out.append({"run_id": run_id, "signal": signal, "level": LEVELS[level], "step": run.step})
        return out
