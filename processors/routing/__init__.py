"""The routing processor: which model (strong or weak) serves a prompt.

* :mod:`processors.routing.features`: prompt features computed without a model.
* :mod:`processors.routing.router`: the router (features and embedding k-NN scorers, thresholds, the
  artifact, the pure decision function, evaluation). Plain Python and numpy.
* :mod:`processors.routing.records`: ``sophia.routing.RouteRequest`` / ``RouteDecision`` value objects.
* :mod:`processors.routing.embedding`: MiniLM embeddings of many prompts for fitting (cached).
* :mod:`processors.routing.app`: the Faust app (route requests + embeddings -> route decisions).
* :mod:`processors.routing.cli`: ``backbone routing fit|eval|request`` and ``backbone processors route``.

Only the Kafka-free parts are imported here; import :mod:`processors.routing.app` for the worker.
"""

from processors.routing.errors import RouterArtifactError, RoutingDataError, RoutingError
from processors.routing.features import FEATURE_NAMES, feature_vector, prompt_features
from processors.routing.records import (
    DECISION_SCHEMA,
    REQUEST_SCHEMA,
    RouteDecision,
    RouteRequest,
    embedding_request_id_for,
)
from processors.routing.router import (
    EmbeddingInput,
    LabelledPrompts,
    Router,
    decide,
    evaluate,
    fit_router,
    read_mmlu,
    split,
)

__all__ = [
    "DECISION_SCHEMA",
    "FEATURE_NAMES",
    "REQUEST_SCHEMA",
    "EmbeddingInput",
    "LabelledPrompts",
    "RouteDecision",
    "RouteRequest",
    "Router",
    "RouterArtifactError",
    "RoutingDataError",
    "RoutingError",
    "decide",
    "embedding_request_id_for",
    "evaluate",
    "feature_vector",
    "fit_router",
    "prompt_features",
    "read_mmlu",
    "split",
]
