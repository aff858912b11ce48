"""The topic catalogue: every topic the backbone owns, its partitions, key, schemas and retention.

Topics are created with their final partition count (adding partitions later moves keys between
partitions and breaks per-key order; Tansu does not support it at all).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["CATALOGUE", "DLQ_TOPIC", "TopicSpec", "create_missing_topics", "ensure_topics", "topic"]

DLQ_TOPIC = "backbone.dlq"
"""The dead-letter topic: every consumer sends what it cannot decode or take here, with raw bytes and the reason."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicSpec:
    """One topic of the catalogue.

    Attributes:
        name: topic name.
        partitions: partition count (final).
        key: what the key is (the entity order holds for).
        schemas: Avro full names of the records it carries (empty: JSON records, named in ``doc``).
        retention_ms: ``retention.ms`` in production; -1 keeps forever.
        cleanup_policy: ``delete`` or ``compact``.
        doc: one line for ``backbone topics list``.
    """

    name: str
    partitions: int
    key: str
    schemas: tuple[str, ...]
    retention_ms: int
    cleanup_policy: str = "delete"
    doc: str = ""

    def config(self) -> dict[str, str]:
        """Topic configs for ``CreateTopics``."""
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}


_DAY_MS = 86_400_000

NewTopicLike = Any  # a confluent_kafka.admin.NewTopic or a TopicSpec

CATALOGUE: dict[str, TopicSpec] = {
    t.name: t
    for t in (
        TopicSpec(
            name="agent.events",
            partitions=6,
            key="run_id",
            schemas=("sophia.agent.RunLifecycle", "sophia.agent.LlmCall", "sophia.agent.ToolCall"),
            retention_ms=30 * _DAY_MS,
            doc="What agents do: run lifecycle, every LLM call and tool call, in order per run.",
        ),
        TopicSpec(
            name="insights.runs",
            partitions=6,
            key="entity",
            schemas=("sophia.insight.Insight",),
            retention_ms=-1,
            doc="Run summaries emitted by the run-summary processor when a run finishes.",
        ),
        TopicSpec(
            name="insights.correlations",
            partitions=3,
            key="entity",
            schemas=("sophia.insight.Insight",),
            retention_ms=-1,
            doc="Cross-platform links (Slack message <-> commit) found by the correlation processor.",
        ),
        TopicSpec(
            name="config.changes",
            partitions=3,
            key="config key",
            schemas=("sophia.config.ConfigChange",),
            retention_ms=-1,
            doc="Every stored configuration change, published by the outbox relay (de-duplicate by event id).",
        ),
        TopicSpec(
            name="cdc.changes",
            partitions=6,
            key="schema.table:primary key",
            schemas=("sophia.cdc.RowChanged",),
            retention_ms=-1,
            doc="Row changes captured by Debezium, normalised to sophia.cdc.RowChanged (de-duplicate by event id).",
        ),
        TopicSpec(
            name="external.events",
            partitions=3,
            key="entity",
            schemas=("sophia.external.ExternalEvent",),
            retention_ms=-1,
            doc="Webhook deliveries from GitHub, Slack and Linear, mapped to external events.",
        ),
        TopicSpec(
            name="inference.requests",
            partitions=6,
            key="request_id",
            schemas=("sophia.inference.EmbeddingRequest",),
            retention_ms=7 * _DAY_MS,
            doc="Embedding requests consumed by the inference actors.",
        ),
        TopicSpec(
            name="inference.results",
            partitions=6,
            key="request_id",
            schemas=("sophia.inference.EmbeddingResult",),
            retention_ms=7 * _DAY_MS,
            doc="Embeddings answered by the inference actors (de-duplicate on request_id).",
        ),
        TopicSpec(
            name="routing.requests",
            partitions=3,
            key="request_id",
            schemas=("sophia.routing.RouteRequest",),
            retention_ms=7 * _DAY_MS,
            doc="Route requests (which model serves a prompt), consumed by the routing processor.",
        ),
        TopicSpec(
            name="routing.decisions",
            partitions=3,
            key="request_id",
            schemas=("sophia.routing.RouteDecision",),
            retention_ms=-1,
            doc="Route decisions of the routing processor (de-duplicate on decision_id).",
        ),
        TopicSpec(
            name="routing.policy-requests",
            partitions=3,
            key="request_id",
            schemas=(),
            retention_ms=7 * _DAY_MS,
            doc="Route requests of the N-model policy router (JSON, processors.routing.policy.PolicyRequest).",
        ),
        TopicSpec(
            name="routing.policy-decisions",
            partitions=3,
            key="request_id",
            schemas=(),
            retention_ms=-1,
            doc="Decisions of the policy router (JSON PolicyDecision; projected by `routing`).",
        ),
        TopicSpec(
            name="routing.outcomes",
            partitions=3,
            key="request_id",
            schemas=(),
            retention_ms=-1,
            doc="What happened after each routing decision (JSON Outcome; the router learns from it).",
        ),
        TopicSpec(
            name="healing.decisions",
            partitions=3,
            key="subject",
            schemas=("sophia.healing.Decision",),
            retention_ms=-1,
            doc="The healer's decisions: circuit transitions, retries, fallbacks, warnings, escalations, rollbacks.",
        ),
        TopicSpec(
            name="healing.acks",
            partitions=1,
            key="subject",
            schemas=("sophia.healing.Decision",),
            retention_ms=-1,
            doc="People's acks of escalations (`backbone healing ack`), read by the healer.",
        ),
        TopicSpec(
            name="telemetry.metrics",
            partitions=6,
            key="pod",
            schemas=("sophia.telemetry.MetricSample", "sophia.telemetry.SeriesSample"),
            retention_ms=30 * _DAY_MS,
            doc="Per-pod metric samples (one per pod per minute), e.g. imported Nezha TrainTicket days.",
        ),
        TopicSpec(
            name="telemetry.logs",
            partitions=6,
            key="pod",
            schemas=("sophia.telemetry.LogLine",),
            retention_ms=30 * _DAY_MS,
            doc="Application log lines of pods (level, logger, message, trace and span ids).",
        ),
        TopicSpec(
            name="telemetry.spans",
            partitions=6,
            key="trace_id",
            schemas=("sophia.telemetry.Span",),
            retention_ms=30 * _DAY_MS,
            doc="Trace spans (a trace's spans on one partition); the call graph of the services.",
        ),
        TopicSpec(
            name="insights.incidents",
            partitions=1,
            key="entity",
            schemas=("sophia.insight.Insight",),
            retention_ms=-1,
            doc="Incidents with ranked root-cause candidates (pod, service) and their evidence.",
        ),
        TopicSpec(
            name="insights.anomalies",
            partitions=3,
            key="entity",
            schemas=("sophia.insight.Insight",),
            retention_ms=-1,
            doc="Anomalous metric samples (score, series, window, detector version) from the anomaly detector.",
        ),
        TopicSpec(
            name=DLQ_TOPIC,
            partitions=1,
            key="original key",
            schemas=("sophia.dlq.DeadLetter",),
            retention_ms=-1,
            doc="Dead letters: records no consumer could process, with raw bytes and the reason.",
        ),
    )
}


def topic(name: str) -> TopicSpec:
    """The catalogue entry of ``name``.

    Raises:
        KeyError: a topic that is not in the catalogue (message lists the known ones).
    """
    try:
        return CATALOGUE[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}; known: {', '.join(sorted(CATALOGUE))}") from None


def create_missing_topics(
    admin: object, topics: Iterable[NewTopicLike], *, timeout_seconds: float = 15.0
) -> list[str]:
    """Create those of ``topics`` the broker lacks (final partition counts); return the names created.

    The one place the backbone creates topics: a topic that appears meanwhile ("already exists") is
    not an error. A topic of the catalogue is made as the catalogue says (its partitions, ``retention.ms``
    and ``cleanup.policy``), whoever asks first and whatever the ``NewTopic`` asked for: a worker started
    before ``backbone topics create`` that asks for ``agent.events`` with 1 partition gets the catalogue's 6
    and its retention, not the broker's default. Other names are made as asked.

    Args:
        admin: a ``confluent_kafka.admin.AdminClient``.
        topics: ``confluent_kafka.admin.NewTopic`` objects or :class:`TopicSpec` entries.
        timeout_seconds: how long to wait for the broker.

    Raises:
        streams.errors.BrokerUnavailableError: the broker did not answer in time.
        streams.errors.StreamsError: the broker refused a topic for another reason (message names it).
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]  # re-exported from cimpl, not in __all__

    from streams.errors import BrokerUnavailableError, StreamsError

    def as_new_topic(t: NewTopicLike) -> Any:
        spec = t if isinstance(t, TopicSpec) else CATALOGUE.get(t.topic)
        if spec is None:
            return t
        return NewTopic(
            spec.name, num_partitions=spec.partitions, replication_factor=-1, config=spec.config()
        )

    wanted = [as_new_topic(t) for t in topics]
    try:
        existing = set(admin.list_topics(timeout=timeout_seconds).topics)  # type: ignore[attr-defined]
    except KafkaException as exc:
        raise BrokerUnavailableError(f"Kafka did not answer within {timeout_seconds}s: {exc}") from exc
    new = [t for t in wanted if t.topic not in existing]
    if not new:
        return []
    created = []
    futures = admin.create_topics(new, request_timeout=timeout_seconds)  # type: ignore[attr-defined]
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout_seconds)
            created.append(name)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise StreamsError(f"cannot create topic {name!r}: {exc}") from exc
    return created


def ensure_topics(
    admin: object, names: list[str] | None = None, *, timeout_seconds: float = 15.0
) -> list[str]:
    """Create the catalogue's topics that do not exist yet; return the names created.

    Args:
        admin: a ``confluent_kafka.admin.AdminClient``.
        names: topics to ensure (default: the whole catalogue).
        timeout_seconds: how long to wait for the broker.

    Raises:
        streams.errors.BrokerUnavailableError: the broker did not answer in time.
        streams.errors.StreamsError: the broker refused a topic.
    """
    return create_missing_topics(
        admin, [CATALOGUE[n] for n in (names or list(CATALOGUE))], timeout_seconds=timeout_seconds
    )
