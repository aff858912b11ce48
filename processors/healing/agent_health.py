"""Agent health from the action stream: failing streaks, loops, stalls and runaway cost, on event time.

Reads the agent events of ``schemas/avro`` (``sophia.agent.ToolCall``, ``sophia.agent.LlmCall``,
``sophia.agent.RunLifecycle``; for imported runs these come from mini-swe-agent trajectories through
``connectors.agent_runs``) and raises ``agent_warning`` decisions, one per run, signal and level, the
first time the level is reached. Signals (thresholds from :class:`configuration.schemas.HealingThresholds`):

* ``failing_streak``: commands in a row that failed (non-zero return code or timed out); the final
  submit (no return code) neither breaks nor extends a streak. Levels at 1x, 2x, 3x ``failing_streak``.
* ``loop``: one command (whitespace-normalised) occurring ``loop_repeats`` times among the run's last
  ``loop_window`` commands; levels at ``loop_repeats``, +2, +4 occurrences.
* ``stall``: no progress (a command not run before in this run that succeeded) for ``stall_seconds``
  of event time; levels at 1x, 2x, 3x. Checked at each event of the run and whenever the watermark
  advances (:meth:`AgentHealth.advance`).
* ``runaway_tokens`` / ``runaway_cost``: the run's cumulative tokens (prompt + completion) or cost in
  USD exceed ``runaway_factor`` times the median final total of the peer runs finished so far (once
  ``runaway_min_peers`` have finished); levels at 1x, 1.5x, 2x that factor.

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

__all__ = ["LEVELS", "PEER_HISTORY", "AgentHealth", "RunHealth"]

LEVELS = ("warn", "recommend_restart", "escalate")
#: Finished runs whose final totals make the peer median of the runaway signals (the most recent ones).
PEER_HISTORY = 1000


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


def _normalise(command: str) -> str:
    return " ".join(command.split())


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

    def reconfigure(self, thresholds: HealingThresholds, config_version: int) -> None:
        """Use new thresholds from now on."""
        self.thresholds, self.config_version = thresholds, config_version

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
        run.last_time = at if run.last_time is None or at > run.last_time else run.last_time
        if "step" in data and data["step"] is not None:
            run.step = max(run.step, int(data["step"]))
        out: list[Decision] = []
        if name == "ToolCall":
            out += self._tool(run, data, at, causation_id)
        elif name == "LlmCall":
            out += self._llm(run, data, at, causation_id)
        elif name == "RunLifecycle" and data.get("phase") == "FINISHED":
            run.finished = True
            self._final_tokens.append(run.tokens)
            self._final_cost.append(run.cost_usd)
            return out
        if not run.finished:
            out += self._stall(run, at, causation_id)
        return out

    def advance(self, now: datetime | float) -> list[Decision]:
        """Check every unfinished run for a stall at watermark ``now`` (in run-id order), then forget the
        runs with no event in the last ``3 * stall_seconds`` before ``now``."""
        now = to_utc(now)
        out: list[Decision] = []
        horizon = now - timedelta(seconds=3 * self.thresholds.stall_seconds)
        for run_id in sorted(self.runs):
            run = self.runs[run_id]
            if not run.finished:
                out += self._stall(run, now, None)
            if run.last_time is not None and run.last_time <= horizon:
                del self.runs[run_id]
        return out

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
            run.last_progress = at
        if run.recent.maxlen != t.loop_window:
            run.recent = deque(run.recent, maxlen=t.loop_window)
        run.recent.append(digest)
        n = t.failing_streak
        out += self._level(
            run, "failing_streak", run.streak, (n, 2 * n, 3 * n), at, cause, {"streak": run.streak}
        )
        repeats = sum(1 for c in run.recent if c == digest) if command else 0
        r = t.loop_repeats
        out += self._level(
            run,
            "loop",
            repeats,
            (r, r + 2, r + 4),
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
        for signal, value, finals in (
            ("runaway_tokens", float(run.tokens), self._final_tokens),
            ("runaway_cost", run.cost_usd, self._final_cost),
        ):
            median = float(statistics.median(finals))
            if median <= 0:
                continue
            ratio = value / median
            out += self._level(
                run, signal, ratio, (f, 1.5 * f, 2 * f), at, cause,
                {"value": round(value, 6), "peer_median": round(median, 6), "ratio": round(ratio, 3), "peers": len(finals)},
            )  # fmt: skip
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
        level = -1
        for i, bound in enumerate(bounds):
            if value >= bound and i <= cap:
                level = i
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
        "recent", "seen_ok" (sorted), "tokens", "cost_usd", "finished", "levels"}}, "final_tokens",
        "final_cost"}``.
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
                }
                for rid, r in sorted(self.runs.items())
            },
            "final_tokens": list(self._final_tokens),
            "final_cost": list(self._final_cost),
        }

    def load_state(self, data: dict[str, Any]) -> None:
        """Replace the state by :meth:`dump_state`'s.

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
            )
        self._final_tokens = deque((int(x) for x in data["final_tokens"]), maxlen=PEER_HISTORY)
        self._final_cost = deque((float(x) for x in data["final_cost"]), maxlen=PEER_HISTORY)

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
