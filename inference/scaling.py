"""Scaling the actor pool by consumer lag.

:class:`ScalingPolicy` is the decision (pure, unit-tested): add an actor while the lag per actor is
above a threshold, remove one after the pool has been idle (zero lag, no batch) for a while, always
within ``[min_actors, max_actors]``, one step per decision. :class:`LagScaler` applies it to an
:class:`~inference.actors.InferencePool`: it reads each actor's lag (its partitions' fetched high
watermark minus its committed offset — the watermark a fetch reports, which is right on every broker)
and batch sizes, exports them as Prometheus metrics, and resizes the pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from inference.metrics import InferenceMetrics

if TYPE_CHECKING:
    from inference.actors import InferencePool

__all__ = ["LagScaler", "ScalingDecision", "ScalingPolicy"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScalingDecision:
    """What the policy decided.

    Attributes:
        actors: the target pool size.
        reason: why, for logs (``lag``, ``idle``, ``bounds``, ``steady``).
    """

    actors: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ScalingPolicy:
    """When to add and remove actors.

    Attributes:
        min_actors: fewest actors (>= 1).
        max_actors: most actors (>= min_actors).
        scale_up_lag_per_actor: add one when ``lag > scale_up_lag_per_actor * actors``.
        scale_down_idle_seconds: remove one after this many seconds with zero lag.
    """

    min_actors: int
    max_actors: int
    scale_up_lag_per_actor: int
    scale_down_idle_seconds: float

    def __post_init__(self) -> None:
        if self.min_actors < 1 or self.max_actors < self.min_actors:
            raise ValueError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}")

    def decide(self, actors: int, lag_messages: int | None, idle_seconds: float) -> ScalingDecision:
        """The next pool size.

        Args:
            actors: actors now.
            lag_messages: total consumer lag of the pool, None when unknown (no change then).
            idle_seconds: how long the lag has been zero.
        """
        if actors < self.min_actors or actors > self.max_actors:
            return ScalingDecision(actors=min(max(actors, self.min_actors), self.max_actors), reason="bounds")
        if lag_messages is None:
            return ScalingDecision(actors=actors, reason="steady")
        if lag_messages > self.scale_up_lag_per_actor * actors and actors < self.max_actors:
            return ScalingDecision(actors=actors + 1, reason="lag")
        if lag_messages == 0 and idle_seconds >= self.scale_down_idle_seconds and actors > self.min_actors:
            return ScalingDecision(actors=actors - 1, reason="idle")
        return ScalingDecision(actors=actors, reason="steady")


class LagScaler:
    """Resize a pool by its consumer lag, and export lag, actors and batch sizes.

    Args:
        pool: the pool to resize.
        policy: the decision rule.
        metrics: where the gauges and the batch-size histogram go.
        clock: monotonic seconds (injectable).
    """

    def __init__(
        self,
        pool: InferencePool,
        policy: ScalingPolicy,
        metrics: InferenceMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.metrics = metrics
        self._clock = clock
        self._idle_since: float | None = None
        self.last_lag_messages: int | None = None

    def step(self) -> ScalingDecision:
        """Read the actors' stats, export the metrics, decide and resize once."""
        model = self.pool.settings.model
        stats = self.pool.stats()
        lags = [s.lag_messages for s in stats if s.lag_messages is not None]
        lag = sum(lags) if lags else None
        self.last_lag_messages = lag
        for s in stats:
            for size in s.batch_sizes:
                self.metrics.batch_size.labels(model).observe(size)
        if lag is not None:
            self.metrics.consumer_lag.labels(model).set(lag)
        now = self._clock()
        if lag == 0:
            self._idle_since = self._idle_since if self._idle_since is not None else now
        else:
            self._idle_since = None
        idle = 0.0 if self._idle_since is None else now - self._idle_since
        decision = self.policy.decide(self.pool.size, lag, idle)
        if decision.actors != self.pool.size:
            log.info(
                "scaling",
                model=model,
                lag_messages=lag,
                frm=self.pool.size,
                to=decision.actors,
                reason=decision.reason,
            )
            self.pool.scale_to(decision.actors)
            self._idle_since = None  # a fresh idle period after each change
        self.metrics.actors.labels(model).set(self.pool.size)
        return decision

    def run(self, stop: threading.Event, interval_seconds: float) -> None:
        """Call :meth:`step` every ``interval_seconds`` until ``stop`` is set."""
        while not stop.wait(interval_seconds):
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the controller outlives a failed step
                log.warning("scaling_step_failed", error=repr(exc))
