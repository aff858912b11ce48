"""Send route requests (with their embedding requests) and read route decisions (for the CLI and tests)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from confluent_kafka import TopicPartition

from core.settings import KafkaSettings
from inference.records import EmbeddingRequest
from inference.records import request_event as embedding_request_event
from processors.routing.records import (
    DECISION_SCHEMA,
    RouteDecision,
    RouteRequest,
    embedding_request_id_for,
    request_event,
)
from streams.consumer import DecodeFailure, decode_message, make_consumer
from streams.producer import EventProducer
from streams.serde import AvroSerde

__all__ = ["DecisionReader", "send_route_requests"]


def send_route_requests(
    kafka: KafkaSettings,
    serde: AvroSerde,
    prompts: Sequence[str],
    *,
    requests_topic: str = "routing.requests",
    embedding_topic: str | None = "inference.requests",
    embedding_model: str = "all-MiniLM-L6-v2",
    policy: str | None = None,
    request_ids: Sequence[str] | None = None,
    requested_at: datetime | None = None,
) -> list[RouteRequest]:
    """Produce one route request per prompt, each with its embedding request first (acknowledged on return).

    Args:
        kafka: broker settings.
        serde: the Avro serde.
        prompts: the prompts to route.
        requests_topic: where route requests go.
        embedding_topic: where the embedding requests go (the inference actors' input); None sends no
            embedding request and the route requests name none (they are routed on features).
        embedding_model: model named in the embedding requests.
        policy: the policy of every request (None: balanced).
        request_ids: the request ids; default new UUIDs.
        requested_at: the event time of the requests; default now (UTC).

    Returns:
        The requests sent, in order.

    Raises:
        streams.errors.DeliveryError: a record was not acknowledged.
    """
    ids = list(request_ids) if request_ids is not None else [str(uuid.uuid4()) for _ in prompts]
    at = requested_at or datetime.now(UTC)
    at = at.replace(microsecond=at.microsecond // 1000 * 1000)  # the wire keeps milliseconds
    sent = []
    with EventProducer(kafka, serde) as producer:
        for rid, prompt in zip(ids, prompts, strict=True):
            embedding_id = embedding_request_id_for(rid) if embedding_topic else None
            if embedding_topic and embedding_id:
                req = EmbeddingRequest(
                    request_id=embedding_id, requested_at=at, text=prompt, model=embedding_model
                )
                producer.produce(embedding_topic, embedding_request_event(req, source="/routing/client"))
            route = RouteRequest(
                request_id=rid,
                prompt=prompt,
                requested_at=at,
                policy=policy,
                embedding_request_id=embedding_id,
            )
            producer.produce(requests_topic, request_event(route))
            sent.append(route)
        producer.flush()
    return sent


class DecisionReader:
    """Read ``RouteDecision`` records from the decisions topic without a consumer group.

    Every partition is assigned from its end offset at creation (create the reader before sending the
    requests), or from the beginning.

    Args:
        kafka: broker settings.
        serde: the Avro serde.
        topic: the decisions topic (it must exist).
        from_beginning: read the whole topic.

    Raises:
        KeyError: the topic does not exist.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        serde: AvroSerde,
        topic: str = "routing.decisions",
        *,
        from_beginning: bool = False,
    ) -> None:
        self.serde = serde
        self.consumer = make_consumer(kafka, f"routing-reader-{uuid.uuid4()}")
        meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            self.consumer.close()
            raise KeyError(f"topic {topic!r} does not exist (is `backbone processors route` running?)")
        tps = []
        for p in sorted(meta.partitions):
            start = 0
            if not from_beginning:
                _, start = self.consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=10, cached=False
                )
            tps.append(TopicPartition(topic, p, max(0, start)))
        self.consumer.assign(tps)
        self.all: list[RouteDecision] = []

    def poll(self, timeout_seconds: float = 0.5) -> list[RouteDecision]:
        """Decisions read in this call (also kept in :attr:`all`); undecodable records are skipped."""
        out = []
        for m in self.consumer.consume(500, timeout_seconds):
            if m.error() is not None:
                continue
            decoded = decode_message(self.serde, m)
            if isinstance(decoded, DecodeFailure) or decoded.schema != DECISION_SCHEMA:
                continue
            out.append(RouteDecision.from_avro(decoded.data))
        self.all.extend(out)
        return out

    def collect(self, request_ids: Iterable[str], *, timeout_seconds: float) -> dict[str, RouteDecision]:
        """Read until every request in ``request_ids`` has a decision; the first per request is kept.

        Raises:
            TimeoutError: some requests had no decision at the deadline (the message says how many).
        """
        wanted = set(request_ids)
        got: dict[str, RouteDecision] = {}
        deadline = time.monotonic() + timeout_seconds
        for d in self.all:
            if d.request_id in wanted:
                got.setdefault(d.request_id, d)
        while wanted - got.keys():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(wanted - got.keys())} of {len(wanted)} route request(s) undecided after {timeout_seconds:.0f} s "
                    "(are `backbone processors route` and, for embeddings, `backbone inference run` up?)"
                )
            for d in self.poll():
                if d.request_id in wanted:
                    got.setdefault(d.request_id, d)
        return got

    def close(self) -> None:
        """Close the consumer."""
        self.consumer.close()
