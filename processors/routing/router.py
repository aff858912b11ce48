"""The two-model router, re-exported from the modules that hold its parts (kept for existing imports).

* :mod:`processors.routing.data`: labelled outcomes, RouteLLM readers, the fixed hash split.
* :mod:`processors.routing.scorers`: scikit-learn scorers (features logistic regressions, embedding
  k-NN, the N-model online learner) and thresholds.
* :mod:`processors.routing.artifact`: the saved router (``.npz`` + ``.json``, content-hashed version).
* :mod:`processors.routing.decision`: the pure two-model decision of a route request.
* :mod:`processors.routing.evaluation`: APGR, CPT, the share at 95 % quality, USD saved.
"""

from __future__ import annotations

from processors.routing.artifact import (
    ARTIFACT_FORMAT,
    POLICIES,
    SHARE_GRID,
    EmbeddingInput,
    Router,
    fit_router,
)
from processors.routing.data import (
    DEFAULT_TEST_PERCENT,
    PROVIDERS,
    STRONG_MODEL,
    WEAK_MODEL,
    LabelledPrompts,
    ModelOutcomes,
    is_test_prompt,
    read_mmlu,
    read_outcomes,
    read_responses_csv,
    split,
)
from processors.routing.decision import decide, needs_embedding, request_digest, validate_request
from processors.routing.evaluation import RoutingCurve, eval_offline, eval_online, evaluate, routing_curve
from processors.routing.scorers import Z_CLIP, FeatureScorer, KnnScorer, OnlineQuality, threshold_for_share

__all__ = [
    "ARTIFACT_FORMAT",
    "DEFAULT_TEST_PERCENT",
    "POLICIES",
    "PROVIDERS",
    "SHARE_GRID",
    "STRONG_MODEL",
    "WEAK_MODEL",
    "Z_CLIP",
    "EmbeddingInput",
    "FeatureScorer",
    "KnnScorer",
    "LabelledPrompts",
    "ModelOutcomes",
    "OnlineQuality",
    "Router",
    "RoutingCurve",
    "decide",
    "eval_offline",
    "eval_online",
    "evaluate",
    "fit_router",
    "is_test_prompt",
    "needs_embedding",
    "read_mmlu",
    "read_outcomes",
    "read_responses_csv",
    "request_digest",
    "routing_curve",
    "split",
    "threshold_for_share",
    "validate_request",
]
