"""Settings of the inference actors (env prefix ``BACKBONE_INFERENCE_``).

Every field has an environment twin, e.g. ``BACKBONE_INFERENCE_MAX_BATCH_SIZE=64``; the CLI flags of
``backbone inference run`` override them.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.catalogue import DLQ_TOPIC

__all__ = ["DEFAULT_MODEL", "REQUESTS_TOPIC", "RESULTS_TOPIC", "InferenceSettings"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
REQUESTS_TOPIC = "inference.requests"
RESULTS_TOPIC = "inference.results"


class InferenceSettings(BaseSettings):
    """How the inference pool consumes, batches, runs and scales.

    Attributes:
        model: name of the model served (see :data:`inference.model.MODELS`).
        requests_topic: topic of ``sophia.inference.EmbeddingRequest`` records.
        results_topic: topic the ``sophia.inference.EmbeddingResult`` records go to.
        dlq_topic: dead-letter topic for requests that cannot be answered.
        group_id: consumer group of the actors; empty means ``inference-<model>``.
        max_batch_size: most requests per model call.
        max_wait_ms: longest time, in milliseconds, a batch waits to fill after its first request.
        actors: actors started by ``backbone inference run``.
        min_actors: fewest actors the lag-based scaler keeps.
        max_actors: most actors the lag-based scaler starts.
        num_cpus: Ray CPUs reserved per actor.
        num_gpus: Ray GPUs reserved per actor; with ``>0`` the model runs on the GPU Ray assigns.
        torch_threads: intra-op threads of torch per actor (0 = torch's default).
        max_restarts: how often Ray restarts a dead actor (-1 = without limit).
        scale_up_lag_per_actor: requests of consumer lag per actor above which the scaler adds one.
        scale_down_idle_seconds: seconds with zero lag after which the scaler removes one actor.
        scale_interval_seconds: seconds between two decisions of the scaler.
    """

    model_config = SettingsConfigDict(env_prefix="BACKBONE_INFERENCE_", extra="ignore", frozen=True)

    model: str = DEFAULT_MODEL
    requests_topic: str = REQUESTS_TOPIC
    results_topic: str = RESULTS_TOPIC
    dlq_topic: str = DLQ_TOPIC
    group_id: str = ""
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    max_wait_ms: int = Field(default=20, ge=0)
    actors: int = Field(default=1, ge=1)
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=4, ge=1)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    torch_threads: int = Field(default=0, ge=0)
    max_restarts: int = Field(default=-1, ge=-1)
    scale_up_lag_per_actor: int = Field(default=1000, ge=1)
    scale_down_idle_seconds: float = Field(default=60.0, ge=0)
    scale_interval_seconds: float = Field(default=5.0, gt=0)

    @property
    def consumer_group(self) -> str:
        """The consumer group of the actors: :attr:`group_id` or ``inference-<model>``."""
        return self.group_id or f"inference-{self.model}"
