"""Prometheus metrics of the inference pool (explicit registry, base units).

Names: ``backbone_inference_<name>_<unit>``. Label sets are bounded: ``model`` (one per served model)
and ``outcome`` (``answered`` or ``dead_lettered``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["BATCH_SIZE_BUCKETS", "InferenceMetrics"]

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class InferenceMetrics:
    """The metrics of one process (an actor, or the driver that runs the scaler).

    Args:
        registry: where to register them (a fresh one per process or test).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "backbone_inference_requests",
            "Requests finished, by outcome (answered or dead_lettered).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "backbone_inference_batch_size_requests",
            "Requests per model batch.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batch_duration = Histogram(
            "backbone_inference_batch_duration_seconds",
            "Model time per batch, in seconds.",
            ["model"],
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "backbone_inference_consumer_lag_messages",
            "Requests not yet committed by the pool (high watermark minus committed offset, all partitions).",
            ["model"],
            registry=self.registry,
        )
        self.actors = Gauge(
            "backbone_inference_actors",
            "Actors running in the pool.",
            ["model"],
            registry=self.registry,
        )
