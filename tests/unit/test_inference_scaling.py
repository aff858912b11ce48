"""The lag-based scaling policy and the controller that applies it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from inference.config import InferenceSettings
from inference.metrics import InferenceMetrics
from inference.scaling import LagScaler, ScalingPolicy
from inference.worker import WorkerStats

POLICY = ScalingPolicy(min_actors=1, max_actors=3, scale_up_lag_per_actor=100, scale_down_idle_seconds=30.0)


def test_lag_above_threshold_adds_one_actor() -> None:
    """Lag beyond the per-actor threshold adds exactly one actor."""
    assert POLICY.decide(1, 101, 0.0).actors == 2
    assert POLICY.decide(2, 250, 0.0).actors == 3
    assert POLICY.decide(2, 200, 0.0).actors == 2


def test_max_actors_is_never_exceeded() -> None:
    """At max_actors more lag changes nothing."""
    decision = POLICY.decide(3, 10_000, 0.0)
    assert decision.actors == 3 and decision.reason == "steady"


def test_idle_pool_shrinks_after_the_idle_period_down_to_min() -> None:
    """Zero lag for scale_down_idle_seconds removes one actor, never below min_actors."""
    assert POLICY.decide(3, 0, 29.9).actors == 3
    assert POLICY.decide(3, 0, 30.0).actors == 2
    assert POLICY.decide(1, 0, 3600.0).actors == 1


def test_unknown_lag_changes_nothing_and_bounds_are_enforced() -> None:
    """Unknown lag keeps the size; a size outside the bounds is brought back inside."""
    assert POLICY.decide(2, None, 100.0).actors == 2
    assert POLICY.decide(0, None, 0.0).actors == 1
    assert POLICY.decide(5, 0, 0.0).reason == "bounds"


def test_policy_refuses_inverted_bounds() -> None:
    """min_actors above max_actors is a ValueError."""
    with pytest.raises(ValueError):
        ScalingPolicy(min_actors=3, max_actors=2, scale_up_lag_per_actor=1, scale_down_idle_seconds=1)


@dataclass
class StandInPool:
    """The part of InferencePool the scaler uses, with the lags an actor would report."""

    lags: list[int | None]
    settings: InferenceSettings = field(default_factory=InferenceSettings)
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.lags)

    def stats(self) -> list[WorkerStats]:
        out = [
            WorkerStats(worker_id=str(i), model_name="m", model_version="v", device="cpu", lag_messages=lag)
            for i, lag in enumerate(self.lags)
        ]
        if out:
            out[0].batch_sizes = self.batch_sizes
            self.batch_sizes = []
        return out

    def scale_to(self, n: int) -> int:
        delta = n - self.size
        self.lags = (self.lags + [0] * max(0, delta))[:n]
        return delta


def test_scaler_adds_on_lag_removes_when_idle_and_exports_metrics() -> None:
    """The controller sums the actors' lag, grows the pool, shrinks it after the idle period, and exports lag, actors and batch sizes."""
    now = [0.0]
    metrics = InferenceMetrics(CollectorRegistry())
    pool = StandInPool(lags=[150], batch_sizes=[8, 8, 3])
    scaler = LagScaler(pool, POLICY, metrics, clock=lambda: now[0])  # type: ignore[arg-type]
    assert scaler.step().reason == "lag" and pool.size == 2
    reg = metrics.registry
    model = pool.settings.model
    assert reg.get_sample_value("backbone_inference_consumer_lag_messages", {"model": model}) == 150
    assert reg.get_sample_value("backbone_inference_actors", {"model": model}) == 2
    assert reg.get_sample_value("backbone_inference_batch_size_requests_count", {"model": model}) == 3
    assert reg.get_sample_value("backbone_inference_batch_size_requests_sum", {"model": model}) == 19
    pool.lags = [0, 0]
    assert scaler.step().reason == "steady"  # idle clock starts
    now[0] = 31.0
    assert scaler.step().reason == "idle" and pool.size == 1
    assert reg.get_sample_value("backbone_inference_actors", {"model": model}) == 1


def test_cli_run_help_shows_flags_and_environment_twins() -> None:
    """`backbone inference run --help` lists each flag of the issue with its BACKBONE_INFERENCE_* twin."""
    from typer.testing import CliRunner

    from backbone.cli.inference import app

    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    for flag, env in [
        ("--actors", "BACKBONE_INFERENCE_ACTORS"),
        ("--num-gpus", "BACKBONE_INFERENCE_NUM_GPUS"),
        ("--max-batch-size", "BACKBONE_INFERENCE_MAX_BATCH_SIZE"),
        ("--max-wait-ms", "BACKBONE_INFERENCE_MAX_WAIT_MS"),
    ]:
        assert flag in result.output and env in result.output
