"""The routing processor: which model (strong or weak) serves a prompt.

* :mod:`processors.routing.features`: prompt features computed without a model.
* :mod:`processors.routing.router`: re-exports the two-model router, split along its jobs:
  :mod:`~processors.routing.data` (RouteLLM readers, the hash split), :mod:`~processors.routing.scorers`
  (scikit-learn scorers and the N-model online learner), :mod:`~processors.routing.artifact` (the saved
  router), :mod:`~processors.routing.decision` (the pure decision), :mod:`~processors.routing.evaluation`
  (APGR, CPT, share at 95 %, USD saved).
* :mod:`processors.routing.policy`: the N-model router (policies, fallback chains, A/B split, circuit
  states, the state machine the worker and ``simulate`` share); :mod:`processors.routing.simulate`:
  what-if replay and the A/B report; :mod:`processors.routing.policy_app`: its Faust worker.
* :mod:`processors.routing.records`: ``sophia.routing.RouteRequest`` / ``RouteDecision`` value objects.
* :mod:`processors.routing.embedding`: MiniLM embeddings of many prompts for fitting (cached).
* :mod:`processors.routing.app`: the Faust app (route requests + embeddings -> route decisions).
* :mod:`backbone.cli.routing`: ``backbone routing fit|eval|request`` and ``backbone processors route``.

Only the Kafka-free parts are imported here; import :mod:`processors.routing.app` for the worker.
"""

from processors.routing.errors import RouterArtifactError, RoutingDataError, RoutingError
from processors.routing.features import FEATURE_NAMES, feature_vector, prompt_features
from processors.routing.policy import (
    Outcome,
    PolicyDecision,
    PolicyRequest,
    RoutingSetup,
    RoutingState,
    ab_arm,
    route,
    setup_from_config,
)
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
    ModelOutcomes,
    OnlineQuality,
    Router,
    decide,
    eval_offline,
    eval_online,
    evaluate,
    fit_router,
    read_mmlu,
    read_outcomes,
    read_responses_csv,
    split,
)
from processors.routing.simulate import ab_report, read_history, simulate

__all__ = [
    "DECISION_SCHEMA",
    "FEATURE_NAMES",
    "REQUEST_SCHEMA",
    "EmbeddingInput",
    "LabelledPrompts",
    "ModelOutcomes",
    "OnlineQuality",
    "Outcome",
    "PolicyDecision",
    "PolicyRequest",
    "RouteDecision",
    "RouteRequest",
    "Router",
    "RouterArtifactError",
    "RoutingDataError",
    "RoutingError",
    "RoutingSetup",
    "RoutingState",
    "ab_arm",
    "ab_report",
    "decide",
    "embedding_request_id_for",
    "eval_offline",
    "eval_online",
    "evaluate",
    "feature_vector",
    "fit_router",
    "prompt_features",
    "read_history",
    "read_mmlu",
    "read_outcomes",
    "read_responses_csv",
    "route",
    "setup_from_config",
    "simulate",
    "split",
]
