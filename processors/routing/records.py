"""Wire records of the routing topics and their Avro mapping.

``sophia.routing.RouteRequest`` (``routing.requests``) and ``sophia.routing.RouteDecision``
(``routing.decisions``) as frozen value objects, mapped by explicit ``to_avro`` / ``from_avro``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from streams.envelope import Event

__all__ = [
    "DECISION_SCHEMA",
    "EMBEDDING_ID_PREFIX",
    "REQUEST_SCHEMA",
    "RouteDecision",
    "RouteRequest",
    "decision_event",
    "embedding_request_id_for",
    "request_event",
]

REQUEST_SCHEMA = "sophia.routing.RouteRequest"
DECISION_SCHEMA = "sophia.routing.RouteDecision"
EMBEDDING_ID_PREFIX = "routing:"
"""Prefix of the embedding request ids of route requests: the processor reads only those results."""


def embedding_request_id_for(request_id: str) -> str:
    """The id of the ``EmbeddingRequest`` a client sends with route request ``request_id``."""
    return f"{EMBEDDING_ID_PREFIX}{request_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteRequest:
    """A request to choose the model for one prompt.

    Attributes:
        request_id: caller-chosen, unique per request.
        prompt: the prompt text.
        requested_at: aware UTC event time of the request.
        candidate_models: models the caller accepts; empty accepts the router's two.
        policy: ``cost``, ``balanced`` or ``quality``; None means ``balanced``.
        embedding_request_id: the embedding request sent for this prompt (``routing:<request_id>``),
            or None to route on features.
    """

    request_id: str
    prompt: str
    requested_at: datetime
    candidate_models: tuple[str, ...] = ()
    policy: str | None = None
    embedding_request_id: str | None = None

    def to_avro(self) -> dict[str, Any]:
        """The Avro datum of ``sophia.routing.RouteRequest``."""
        return {
            "request_id": self.request_id,
            "prompt": self.prompt,
            "candidate_models": list(self.candidate_models),
            "policy": self.policy,
            "embedding_request_id": self.embedding_request_id,
            "requested_at": self.requested_at,
        }

    @classmethod
    def from_avro(cls, datum: dict[str, Any]) -> RouteRequest:
        """Build from a decoded datum (missing optional fields take their schema defaults)."""
        return cls(
            request_id=datum["request_id"],
            prompt=datum["prompt"],
            requested_at=datum["requested_at"],
            candidate_models=tuple(datum.get("candidate_models") or ()),
            policy=datum.get("policy"),
            embedding_request_id=datum.get("embedding_request_id"),
        )


def request_event(request: RouteRequest, *, source: str = "/routing/client") -> Event:
    """The event to produce for ``request`` (key and CloudEvents id: the request id; time: requested_at)."""
    return Event.create(
        REQUEST_SCHEMA,
        request.request_id,
        request.to_avro(),
        source=source,
        time=request.requested_at,
        id=request.request_id,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteDecision:
    """The model chosen for one request (see ``sophia.routing.RouteDecision.avsc`` for every field).

    Attributes:
        decision_id: deterministic id (request id, request content digest, router version).
        request_id: the request decided.
        model, provider: the chosen model and its provider.
        strong_model, weak_model: the router's two models.
        score: estimated P(strong right) - P(weak right), unitless in [-1, 1].
        threshold: the policy's threshold for the method used (same scale as score).
        policy: the policy applied.
        method: ``embedding`` or ``features``.
        router_version: the router artifact's version.
        embedding_request_id: the embedding named by the request, or None.
        embedding_model_version: the version of the embedding used, or None for features.
        embedding_status: ``none``, ``used``, ``unused-no-embedding-scorer`` or ``mismatch-<reason>``.
        features: the prompt features by name.
        decided_at: the request's event time (aware UTC).
    """

    decision_id: str
    request_id: str
    model: str
    provider: str
    strong_model: str
    weak_model: str
    score: float
    threshold: float
    policy: str
    method: str
    router_version: str
    decided_at: datetime
    embedding_request_id: str | None = None
    embedding_model_version: str | None = None
    embedding_status: str = "none"
    features: dict[str, float] = field(default_factory=dict)

    def to_avro(self) -> dict[str, Any]:
        """The Avro datum of ``sophia.routing.RouteDecision``."""
        return {
            "decision_id": self.decision_id,
            "request_id": self.request_id,
            "model": self.model,
            "provider": self.provider,
            "strong_model": self.strong_model,
            "weak_model": self.weak_model,
            "score": float(self.score),
            "threshold": float(self.threshold),
            "policy": self.policy,
            "method": self.method,
            "router_version": self.router_version,
            "embedding_request_id": self.embedding_request_id,
            "embedding_model_version": self.embedding_model_version,
            "embedding_status": self.embedding_status,
            "features": {k: float(v) for k, v in self.features.items()},
            "decided_at": self.decided_at,
        }

    @classmethod
    def from_avro(cls, datum: dict[str, Any]) -> RouteDecision:
        """Build from a decoded datum."""
        return cls(**{**datum, "features": dict(datum.get("features") or {})})


def decision_event(
    decision: RouteDecision,
    *,
    causation_id: str | None = None,
    correlation_id: str | None = None,
    source: str = "/processors/routing",
) -> Event:
    """The event to produce for ``decision``: key request id, CloudEvents id = decision id, time = decided_at."""
    return Event.create(
        DECISION_SCHEMA,
        decision.request_id,
        decision.to_avro(),
        source=source,
        time=decision.decided_at,
        id=decision.decision_id,
        causation_id=causation_id,
        correlation_id=correlation_id,
    )
