"""The two-model decision of a route request: a pure function of (request, embedding or None, router).

It uses the embedding scorer when the request's embedding is present and the router has one, else the
features scorer; routes to the strong model when ``score > threshold`` of the request's named policy.
The config-driven N-model router with policies, fallback chains and A/B splits is
:mod:`processors.routing.policy`.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from processors.errors import UnprocessableEventError
from processors.routing.artifact import POLICIES, EmbeddingInput, Router
from processors.routing.features import prompt_features
from processors.routing.records import EMBEDDING_ID_PREFIX, RouteDecision, RouteRequest
from streams.envelope import deterministic_id

__all__ = ["decide", "needs_embedding", "request_digest", "validate_request"]


def request_digest(request: RouteRequest) -> str:
    """SHA-256 prefix of the request's content (prompt, candidates, policy, embedding id, event time)."""
    body = json.dumps(
        [request.prompt, list(request.candidate_models), request.policy, request.embedding_request_id,
         request.requested_at.isoformat()],
        ensure_ascii=True,
    )  # fmt: skip
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def validate_request(router: Router, request: RouteRequest) -> str:
    """Check that ``router`` can take ``request``; return the policy name that applies.

    Raises:
        UnprocessableEventError: an unknown policy, candidates lacking the router's models, an empty
            request id, or an embedding request id without the ``routing:`` prefix.
    """
    if not request.request_id:
        raise UnprocessableEventError("empty request_id")
    policy = request.policy or "balanced"
    policies = router.metadata.get("policies", POLICIES)
    if policy not in policies:
        raise UnprocessableEventError(
            f"unknown policy {policy!r}; known: {', '.join(sorted(policies))}", event_id=request.request_id
        )
    if request.candidate_models:
        lacking = [m for m in (router.strong_model, router.weak_model) if m not in request.candidate_models]
        if lacking:
            raise UnprocessableEventError(
                f"candidate_models {list(request.candidate_models)} lack the router's {', '.join(lacking)}",
                event_id=request.request_id,
            )
    if request.embedding_request_id is not None and not request.embedding_request_id.startswith(
        EMBEDDING_ID_PREFIX
    ):
        raise UnprocessableEventError(
            f"embedding_request_id {request.embedding_request_id!r} does not start with {EMBEDDING_ID_PREFIX!r}",
            event_id=request.request_id,
        )
    return policy


def needs_embedding(router: Router, request: RouteRequest) -> bool:
    """Whether the decision of ``request`` must wait for its embedding (it names one and the router can use it)."""
    return request.embedding_request_id is not None and router.knn is not None


def decide(router: Router, request: RouteRequest, embedding: EmbeddingInput | None = None) -> RouteDecision:
    """Choose the model for ``request``: a pure function of (request, embedding, router).

    The embedding scorer is used when ``embedding`` is given, the router has one, and the embedding's
    model name and dimension are the router's; otherwise the features scorer (the decision's
    ``embedding_status`` says why). The threshold is the router's for the method and the policy's
    share; the decision time is the request's event time; the id is
    ``deterministic_id("routing.decision", request_id, request_digest, router version)``.

    Raises:
        UnprocessableEventError: see :func:`validate_request`.
    """
    policy = validate_request(router, request)
    feats = prompt_features(request.prompt)
    method, status, score, used_version = "features", "none", None, None
    if request.embedding_request_id is not None:
        status = "unused-no-embedding-scorer" if router.knn is None else "missing"
    if embedding is not None and router.knn is not None:
        vec = np.asarray(embedding.vector, dtype=np.float32)
        if embedding.model_name != router.metadata.get("embedding_model"):
            status = f"mismatch-model-{embedding.model_name}"
        elif vec.shape != (router.knn.dimension,):
            status = f"mismatch-dimension-{vec.shape[0] if vec.ndim == 1 else 'not-1d'}"
        else:
            method, status, used_version = "embedding", "used", embedding.model_version
            score = float(router.knn.score(vec)[0])
    if score is None:
        score = float(router.features.score(np.fromiter(feats.values(), dtype=np.float64)))
    threshold = router.threshold(method, float(router.metadata.get("policies", POLICIES)[policy]))
    model = router.route(score, threshold)
    version = router.version
    return RouteDecision(
        decision_id=deterministic_id(
            "routing.decision", request.request_id, request_digest(request), version
        ),
        request_id=request.request_id,
        model=model,
        provider=str(router.metadata["providers"].get(model, "unknown")),
        strong_model=router.strong_model,
        weak_model=router.weak_model,
        score=score,
        threshold=threshold,
        policy=policy,
        method=method,
        router_version=version,
        decided_at=request.requested_at,
        embedding_request_id=request.embedding_request_id,
        embedding_model_version=used_version,
        embedding_status=status,
        features=feats,
    )
