"""Inference on Ray: actors that consume the inference topics, batch, run a model, produce results and
commit only what they answered.

Importing this package needs neither Ray nor torch: the names that need them (the actors, the
worker, the models, the records with their numpy vectors) load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from inference.batching import BatchAccumulator, offsets_to_commit
from inference.config import DEFAULT_MODEL, REQUESTS_TOPIC, RESULTS_TOPIC, InferenceSettings
from inference.errors import (
    EmbedTimeoutError,
    InferenceDependencyError,
    InferenceError,
    ModelLoadError,
    RequestError,
)
from inference.metrics import InferenceMetrics
from inference.scaling import LagScaler, ScalingDecision, ScalingPolicy

__all__ = [
    "DEFAULT_MODEL",
    "REQUESTS_TOPIC",
    "RESULTS_TOPIC",
    "TOPICS",
    "BatchAccumulator",
    "CrashPoint",
    "EmbedTimeoutError",
    "EmbeddingActor",
    "EmbeddingClient",
    "EmbeddingRequest",
    "EmbeddingResult",
    "EventTextRef",
    "InferenceDependencyError",
    "InferenceError",
    "InferenceMetrics",
    "InferencePool",
    "InferenceSettings",
    "InferenceWorker",
    "LagScaler",
    "ModelLoadError",
    "RequestError",
    "ResultReader",
    "ScalingDecision",
    "ScalingPolicy",
    "ensure_inference_topics",
    "init_ray",
    "load_model",
    "offsets_to_commit",
]

_LAZY = {
    "CrashPoint": "inference.worker",
    "InferenceWorker": "inference.worker",
    "EmbeddingActor": "inference.actors",
    "InferencePool": "inference.actors",
    "init_ray": "inference.actors",
    "EmbeddingClient": "inference.client",
    "ResultReader": "inference.client",
    "TOPICS": "inference.client",
    "ensure_inference_topics": "inference.client",
    "EmbeddingRequest": "inference.records",
    "EmbeddingResult": "inference.records",
    "EventTextRef": "inference.records",
    "load_model": "inference.model",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'inference' has no attribute {name!r}")
    return getattr(import_module(module), name)
