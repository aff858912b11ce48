"""Send embedding requests through the topics and collect the answers (for users, the CLI and tests).

Answers are de-duplicated by ``request_id``: after a crash an actor may answer a request twice, with
the same result id and vector.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from core.settings import KafkaSettings, SchemaRegistrySettings
from inference.config import InferenceSettings
from inference.errors import EmbedTimeoutError
from inference.records import RESULT_SCHEMA, EmbeddingRequest, EmbeddingResult, request_event
from streams.catalogue import CATALOGUE, create_missing_topics
from streams.consumer import DecodeFailure, decode_message, make_consumer
from streams.producer import EventProducer
from streams.serde import AvroSerde, serde_from_settings

__all__ = ["TOPICS", "EmbeddingClient", "ResultReader", "ensure_inference_topics"]

TOPICS = [CATALOGUE["inference.requests"], CATALOGUE["inference.results"]]
"""The inference topics of the catalogue (for ``streams.catalogue.CATALOGUE``)."""


def ensure_inference_topics(
    admin: AdminClient, settings: InferenceSettings, *, partitions: int = 6, timeout_seconds: float = 30.0
) -> list[str]:
    """Create the requests and results topics of ``settings`` when missing; return those created.

    Args:
        admin: an AdminClient on the broker.
        settings: names the topics.
        partitions: partition count of new topics (final: some brokers cannot add partitions later).
        timeout_seconds: how long to wait for the broker and for the metadata to show them.

    Raises:
        streams.errors.StreamsError: the broker did not answer, or refused a topic.
        TimeoutError: a created topic did not appear in the metadata in time.
    """
    names = [settings.requests_topic, settings.results_topic]
    created = create_missing_topics(
        admin,
        [NewTopic(n, num_partitions=partitions, replication_factor=-1) for n in names],
        timeout_seconds=timeout_seconds,
    )
    deadline = time.monotonic() + timeout_seconds
    for name in created:
        while True:
            t = admin.list_topics(topic=name, timeout=5).topics.get(name)
            if t is not None and t.error is None and len(t.partitions) == partitions:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name!r} not in metadata after {timeout_seconds}s")
            time.sleep(0.1)
    return created


class ResultReader:
    """Read ``EmbeddingResult`` records from the results topic without a consumer group.

    Every partition is assigned from the offset the broker reports as its end when the reader is
    created (an earlier offset only costs reading and skipping older results).

    Args:
        kafka: broker settings.
        topic: the results topic.
        serde: the Avro serde.
        from_beginning: read the whole topic instead.
    """

    def __init__(
        self, kafka: KafkaSettings, topic: str, serde: AvroSerde, *, from_beginning: bool = False
    ) -> None:
        self.serde = serde
        self.consumer: Consumer = make_consumer(kafka, f"inference-reader-{uuid.uuid4()}")
        meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
        tps = []
        for p in sorted(meta.partitions):
            start = 0
            if not from_beginning:
                _, start = self.consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=10, cached=False
                )
            tps.append(TopicPartition(topic, p, max(0, start)))
        self.consumer.assign(tps)
        self.duplicates = 0
        self.all: list[EmbeddingResult] = []

    def poll(self, timeout_seconds: float = 0.5) -> list[EmbeddingResult]:
        """Results read in this call (duplicates included, also kept in :attr:`all`)."""
        out = []
        for m in self.consumer.consume(500, timeout_seconds):
            if m.error() is not None:
                continue
            decoded = decode_message(self.serde, m)
            if isinstance(decoded, DecodeFailure) or decoded.schema != RESULT_SCHEMA:
                continue
            out.append(EmbeddingResult.from_avro(decoded.data))
        self.all.extend(out)
        return out

    def collect(self, request_ids: Iterable[str], *, timeout_seconds: float) -> dict[str, EmbeddingResult]:
        """Read until every id in ``request_ids`` has an answer (results read earlier count); de-duplicate by request id.

        Raises:
            EmbedTimeoutError: some ids had no answer at the deadline (their list is attached).
        """
        wanted = set(request_ids)
        got: dict[str, EmbeddingResult] = {}
        for r in self.all:  # results read by earlier calls count too
            if r.request_id in wanted:
                got.setdefault(r.request_id, r)
        deadline = time.monotonic() + timeout_seconds
        while wanted - got.keys():
            if time.monotonic() > deadline:
                missing = sorted(wanted - got.keys())
                raise EmbedTimeoutError(
                    f"{len(missing)} of {len(wanted)} request(s) unanswered after {timeout_seconds}s "
                    "(is `backbone inference run` up?)",
                    missing,
                )
            for r in self.poll():
                if r.request_id not in wanted:
                    continue
                if r.request_id in got:
                    self.duplicates += 1
                else:
                    got[r.request_id] = r
        return got

    def close(self) -> None:
        """Close the consumer."""
        self.consumer.close()


class EmbeddingClient:
    """Produce embedding requests and wait for their results.

    Args:
        kafka: broker settings.
        settings: topics and model.
        serde: Avro serde; None takes :func:`streams.serde.serde_from_settings` of ``registry``.
        registry: the schema registry settings (``Settings.schema_registry``); None: the embedded one.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: InferenceSettings,
        serde: AvroSerde | None = None,
        *,
        registry: SchemaRegistrySettings | None = None,
    ) -> None:
        self.kafka = kafka
        self.settings = settings
        self.serde = serde or serde_from_settings(registry or SchemaRegistrySettings())
        self.producer = EventProducer(kafka, self.serde)

    def send(self, texts: Sequence[str], *, request_ids: Sequence[str] | None = None) -> list[str]:
        """Produce one request per text (acknowledged on return); return the request ids.

        Raises:
            streams.errors.DeliveryError: a request was not acknowledged.
        """
        ids = list(request_ids) if request_ids is not None else [str(uuid.uuid4()) for _ in texts]
        now = datetime.now(UTC)
        for rid, text in zip(ids, texts, strict=True):
            req = EmbeddingRequest(request_id=rid, text=text, model=self.settings.model, requested_at=now)
            self.producer.produce(self.settings.requests_topic, request_event(req))
        self.producer.flush()
        return ids

    def embed(self, texts: Sequence[str], *, timeout_seconds: float = 60.0) -> list[EmbeddingResult]:
        """Send ``texts`` and return their results in the same order.

        Raises:
            EmbedTimeoutError: not all answered within ``timeout_seconds``.
            streams.errors.DeliveryError: a request was not acknowledged.
        """
        reader = ResultReader(self.kafka, self.settings.results_topic, self.serde)
        try:
            ids = self.send(texts)
            got = reader.collect(ids, timeout_seconds=timeout_seconds)
        finally:
            reader.close()
        return [got[i] for i in ids]
