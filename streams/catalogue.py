"""The topic catalogue: every topic the backbone owns, its partitions, key, schemas and retention.

Topics are created with their final partition count (adding partitions later moves keys between
partitions and breaks per-key order; Tansu does not support it at all).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CATALOGUE", "TopicSpec", "ensure_topics", "topic"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicSpec:
    """One topic of the catalogue.

    Attributes:
        name: topic name.
        partitions: partition count (final).
        key: what the key is (the entity order holds for).
        schemas: Avro full names of the records it carries.
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
            name="backbone.dlq",
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


def ensure_topics(admin: object, names: list[str] | None = None, *, timeout_seconds: float = 15.0) -> list[str]:
    """Create the catalogue's topics that do not exist yet; return the names created.

    Args:
        admin: a ``confluent_kafka.admin.AdminClient``.
        names: topics to ensure (default: the whole catalogue).
        timeout_seconds: how long to wait for the broker.

    Raises:
        streams.errors.BrokerUnavailableError: the broker did not answer in time.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    from streams.errors import BrokerUnavailableError

    assert isinstance(admin, AdminClient)
    try:
        existing = set(admin.list_topics(timeout=timeout_seconds).topics)
    except KafkaException as exc:
        raise BrokerUnavailableError(f"Kafka did not answer within {timeout_seconds}s: {exc}") from exc
    wanted = [CATALOGUE[n] for n in (names or list(CATALOGUE))]
    new = [
        NewTopic(t.name, num_partitions=t.partitions, replication_factor=-1, config=t.config())
        for t in wanted
        if t.name not in existing
    ]
    if not new:
        return []
    created = []
    for name, fut in admin.create_topics(new, request_timeout=timeout_seconds).items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    return created
