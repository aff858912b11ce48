"""Wire records of the inference topics and their Avro mapping.

``sophia.inference.EmbeddingRequest`` (``schemas/avro/sophia.inference.EmbeddingRequest.avsc``) and
``sophia.inference.EmbeddingResult`` as frozen value objects, mapped by explicit ``to_avro`` /
``from_avro`` functions. Vectors travel as little-endian float32 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from inference.config import DEFAULT_MODEL
from inference.errors import RequestError
from streams.envelope import Event, deterministic_id

__all__ = [
    "REQUEST_SCHEMA",
    "RESULT_SCHEMA",
    "EmbeddingRequest",
    "EmbeddingResult",
    "EventTextRef",
    "decode_vector",
    "encode_vector",
    "request_event",
    "result_event_id",
]

REQUEST_SCHEMA = "sophia.inference.EmbeddingRequest"
RESULT_SCHEMA = "sophia.inference.EmbeddingResult"
_F32 = np.dtype("<f4")


def encode_vector(vector: np.ndarray) -> bytes:
    """Little-endian float32 bytes of a 1-D vector.

    Args:
        vector: shape ``(dimension,)``, any float dtype (converted to float32).

    Raises:
        ValueError: the array is not one-dimensional.
    """
    if vector.ndim != 1:
        raise ValueError(f"a vector must be 1-D, got shape {vector.shape}")
    return np.ascontiguousarray(vector, dtype=_F32).tobytes()


def decode_vector(data: bytes, dimension: int) -> np.ndarray:
    """The float32 vector of shape ``(dimension,)`` encoded by :func:`encode_vector`.

    Raises:
        ValueError: ``len(data) != dimension * 4``.
    """
    if len(data) != dimension * 4:
        raise ValueError(f"vector has {len(data)} bytes, expected {dimension * 4} for dimension {dimension}")
    return np.frombuffer(data, dtype=_F32).astype(np.float32)


@dataclass(frozen=True, slots=True, kw_only=True)
class EventTextRef:
    """The string field ``field`` of the Avro event at ``topic``/``partition``/``offset``."""

    topic: str
    partition: int
    offset: int
    field: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddingRequest:
    """A request to embed one text (exactly one of ``text`` and ``text_ref``).

    Attributes:
        request_id: caller-chosen id, echoed by the result.
        requested_at: aware UTC time of the request (its event time).
        text: the text to embed.
        text_ref: where to read the text instead.
        model: the model name.
    """

    request_id: str
    requested_at: datetime
    text: str | None = None
    text_ref: EventTextRef | None = None
    model: str = DEFAULT_MODEL

    def __post_init__(self) -> None:
        if (self.text is None) == (self.text_ref is None):
            raise RequestError(f"request {self.request_id!r}: set exactly one of text and text_ref")

    def to_avro(self) -> dict[str, Any]:
        """The Avro datum of ``sophia.inference.EmbeddingRequest``."""
        ref = self.text_ref
        return {
            "request_id": self.request_id,
            "model": self.model,
            "text": self.text,
            "text_ref": None
            if ref is None
            else {"topic": ref.topic, "partition": ref.partition, "offset": ref.offset, "field": ref.field},
            "requested_at": self.requested_at,
        }

    @classmethod
    def from_avro(cls, datum: dict[str, Any]) -> EmbeddingRequest:
        """Build from a decoded datum.

        Raises:
            RequestError: both or neither of text and text_ref are set.
        """
        ref = datum.get("text_ref")
        return cls(
            request_id=datum["request_id"],
            model=datum.get("model", DEFAULT_MODEL),
            text=datum.get("text"),
            text_ref=None if ref is None else EventTextRef(**ref),
            requested_at=datum["requested_at"],
        )


def request_event(request: EmbeddingRequest, *, source: str = "/inference/client") -> Event:
    """The event to produce for ``request`` (key and CloudEvents id: the request id)."""
    return Event.create(
        REQUEST_SCHEMA,
        request.request_id,
        request.to_avro(),
        source=source,
        time=request.requested_at,
        id=request.request_id,
    )


def result_event_id(model_name: str, model_version: str, request_id: str) -> str:
    """CloudEvents id of a result: the same request and model version always give the same id."""
    return deterministic_id("inference", model_name, model_version, request_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddingResult:
    """The answer to one request.

    Attributes:
        request_id: the request answered.
        model_name, model_version: the exact model.
        vector: float32, shape ``(dimension,)``.
        normalized: whether the vector has unit L2 norm by construction.
        batch_id, batch_size: the model batch it ran in.
        latency_ms: request record timestamp to end of its batch, in milliseconds.
        model_latency_ms: model time of the batch, in milliseconds.
        source_partition, source_offset: where the request was read.
        answered_at: aware UTC wall-clock time the batch finished.
    """

    request_id: str
    model_name: str
    model_version: str
    vector: np.ndarray
    normalized: bool
    batch_id: str
    batch_size: int
    latency_ms: float
    model_latency_ms: float
    source_partition: int
    source_offset: int
    answered_at: datetime

    @property
    def dimension(self) -> int:
        """Number of components of the vector."""
        return int(self.vector.shape[0])

    def to_avro(self) -> dict[str, Any]:
        """The Avro datum of ``sophia.inference.EmbeddingResult``."""
        return {
            "request_id": self.request_id,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "dimension": self.dimension,
            "vector": encode_vector(self.vector),
            "normalized": self.normalized,
            "batch_id": self.batch_id,
            "batch_size": self.batch_size,
            "latency_ms": float(self.latency_ms),
            "model_latency_ms": float(self.model_latency_ms),
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
            "answered_at": self.answered_at,
        }

    @classmethod
    def from_avro(cls, datum: dict[str, Any]) -> EmbeddingResult:
        """Build from a decoded datum.

        Raises:
            ValueError: the vector's byte length does not match its dimension.
        """
        return cls(
            request_id=datum["request_id"],
            model_name=datum["model_name"],
            model_version=datum["model_version"],
            vector=decode_vector(datum["vector"], datum["dimension"]),
            normalized=datum.get("normalized", False),
            batch_id=datum["batch_id"],
            batch_size=datum["batch_size"],
            latency_ms=datum["latency_ms"],
            model_latency_ms=datum["model_latency_ms"],
            source_partition=datum["source_partition"],
            source_offset=datum["source_offset"],
            answered_at=datum["answered_at"],
        )
