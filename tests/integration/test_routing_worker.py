"""Integration test of the routing Faust worker on a real broker (the session's Tansu) with real MiniLM vectors."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from core.settings import Settings
from inference.records import RESULT_SCHEMA, EmbeddingResult, result_event_id
from processors.routing.client import DecisionReader, send_route_requests
from processors.routing.records import (
    DECISION_SCHEMA,
    RouteDecision,
    RouteRequest,
    request_event,
)
from processors.routing.router import EmbeddingInput, LabelledPrompts, Router, decide, fit_router
from streams.consumer import ConsumedEvent
from streams.envelope import Event
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.replay import read_range
from streams.serde import AvroSerde

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BAD_VALUE = b"\x00\x00\x00\x00\x07 not an avro record"
T0 = datetime(2025, 11, 18, 22, 55, 1, 250000, tzinfo=UTC)

TRAIN = [
    ("Calculate 17 * 23 + 4^3.\nA. 455\nB. 459\nC. 391\nD. 455.5", True, False),
    ("Find the derivative of x^3 + 2x at x = 2.\nA. 14\nB. 12\nC. 10\nD. 8", True, False),
    ("Compute the determinant of the matrix [[2, 1], [3, 4]].\nA. 5\nB. 11\nC. -5\nD. 8", True, False),
    ("Solve for x: 3x + 7 = 22.\nA. 5\nB. 3\nC. 7\nD. 15", True, False),
    ("Evaluate the integral of 2x from 0 to 3.\nA. 9\nB. 6\nC. 3\nD. 12", True, False),
    ("Which of the following is a mammal?\nA. shark\nB. whale\nC. trout\nD. eel", True, True),
    ("Who wrote the play Hamlet?\nA. Shakespeare\nB. Dickens\nC. Austen\nD. Joyce", True, True),
    ("Which city is the capital of France?\nA. Paris\nB. Rome\nC. Madrid\nD. Berlin", True, True),
    ("Which organ pumps blood through the body?\nA. heart\nB. liver\nC. lung\nD. kidney", True, True),
    (
        "Which colour do you get by mixing blue and yellow?\nA. green\nB. purple\nC. orange\nD. red",
        False,
        True,
    ),
]
ASKED = {
    "feat-1": "Compute 12 * 12 - 7.\nA. 137\nB. 144\nC. 151\nD. 131",
    "feat-2": "Which animal is known as the king of the jungle?\nA. lion\nB. mouse\nC. cow\nD. ant",
    "emb-before": "Find the value of x if 5x - 3 = 12.\nA. 3\nB. 2\nC. 5\nD. 4",
    "emb-after": "Who painted the Mona Lisa?\nA. Leonardo da Vinci\nB. Monet\nC. Picasso\nD. Dali",
    "emb-other-model": "Calculate the sum of the first 10 integers.\nA. 55\nB. 45\nC. 50\nD. 65",
    "emb-never": "Which planet is known as the red planet?\nA. Mars\nB. Venus\nC. Jupiter\nD. Saturn",
}


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2, loaded once for the module (offline, from its wheel)."""
    from inference.model import load_model

    return load_model("all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(scope="module")
def router_file(minilm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A router with both scorers, fitted on hand-written outcomes and their real MiniLM vectors."""
    data = LabelledPrompts.from_rows(TRAIN, subject="hand")
    vectors = minilm.embed(list(data.prompts))
    router = fit_router(
        data, vectors=vectors, embedding_model=minilm.name, embedding_model_version=minilm.version, k=3
    )
    return router.save(tmp_path_factory.mktemp("router") / "router.npz")


def _result_event(
    minilm, request_id: str, vector: np.ndarray, at: datetime, *, model_name: str | None = None
) -> Event:
    """An EmbeddingResult record as the inference actors produce it (inference.worker)."""
    name = model_name or minilm.name
    result = EmbeddingResult(
        request_id=request_id, model_name=name, model_version=minilm.version, vector=vector, normalized=True,
        batch_id="b-1", batch_size=1, latency_ms=3.0, model_latency_ms=2.0, source_partition=0, source_offset=0,
        answered_at=at + timedelta(seconds=1),
    )  # fmt: skip
    return Event.create(
        RESULT_SCHEMA, request_id, result.to_avro(), source=f"/inference/{name}", time=at,
        id=result_event_id(name, minilm.version, request_id),
    )  # fmt: skip


def _run_worker(
    settings: Settings,
    tmp_path: Path,
    router: Path,
    app_id: str,
    topics: dict[str, str],
    *,
    timeout: float = 90,
) -> dict:
    """``backbone processors route`` on ``topics`` until it has been idle 3 s (it stops); returns its counters."""
    env = {
        **os.environ,
        "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "BACKBONE_STATE_DIR": str(tmp_path),
        "BACKBONE_LOG_FORMAT": "json",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "backbone", "processors", "route", "--router", str(router), "--app-id", app_id,
         "--requests-topic", topics["requests"], "--embeddings-topic", topics["embeddings"],
         "--decisions-topic", topics["decisions"], "--dlq-topic", topics["dlq"],
         "--web-port", "0", "--stop-after-idle", "3", "--json"],
        env=env, check=False, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    counters = json.loads(proc.stdout[proc.stdout.rfind("\n{\n") + 1 :])  # --json: the last, indented object
    return {**counters, "stderr": proc.stderr}


def _decisions(settings: Settings, serde: AvroSerde, topic: str) -> list[ConsumedEvent]:
    return [r for r in read_range(settings.kafka, serde, topic) if isinstance(r, ConsumedEvent)]


def test_worker_routes_with_and_without_embeddings_and_a_replay_gives_the_same_decisions(
    settings: Settings,
    unique_name: Callable[[str], str],
    create_topic: Callable[..., str],
    tmp_path: Path,
    minilm,
    router_file: Path,
) -> None:
    """Requests without an embedding are routed on features, those with one on its real MiniLM vector (whether
    it came before or after the request), one whose embedding never comes stays pending, bad records are
    dead-lettered; a second worker (new group) replaying the same topics emits identical decisions."""
    serde = AvroSerde(EmbeddedRegistry())
    router = Router.load(router_file)
    topics = {
        "requests": create_topic(unique_name("route-req"), partitions=3),
        "embeddings": create_topic(unique_name("inference-results"), partitions=6),
        "decisions": create_topic(unique_name("route-dec"), partitions=3),
        "dlq": create_topic(unique_name("dlq"), partitions=1),
        "inference_requests": create_topic(unique_name("inference-requests"), partitions=3),
    }
    requests = {
        rid: RouteRequest(request_id=rid, prompt=ASKED[rid], requested_at=T0 + timedelta(seconds=i))
        for i, rid in enumerate(("feat-1", "feat-2"))
    }
    emb_ids = [rid for rid in ASKED if rid.startswith("emb")]
    vectors = dict(zip(ASKED, minilm.embed(list(ASKED.values())), strict=True))
    with EventProducer(settings.kafka, serde) as producer:
        producer.produce(
            topics["embeddings"], _result_event(minilm, "routing:emb-before", vectors["emb-before"], T0)
        )
        producer.produce(topics["embeddings"], _result_event(minilm, "not-routing-42", vectors["feat-1"], T0))
        producer.flush()
        for r in requests.values():
            producer.produce(topics["requests"], request_event(r))
        producer.flush()
    del producer
    sent = send_route_requests(  # the client's path: an embedding request, then the route request naming it
        settings.kafka, serde, [ASKED[rid] for rid in emb_ids], requests_topic=topics["requests"],
        embedding_topic=topics["inference_requests"], request_ids=emb_ids, requested_at=T0,
    )  # fmt: skip
    requests.update({r.request_id: r for r in sent})
    assert all(requests[rid].embedding_request_id == f"routing:{rid}" for rid in emb_ids)
    embedding_requests = [
        r
        for r in read_range(settings.kafka, serde, topics["inference_requests"])
        if isinstance(r, ConsumedEvent)
    ]
    assert sorted((r.data["request_id"], r.data["text"]) for r in embedding_requests) == sorted(
        (f"routing:{rid}", ASKED[rid]) for rid in emb_ids
    )
    with EventProducer(settings.kafka, serde) as producer:
        producer.produce(
            topics["requests"],
            request_event(
                RouteRequest(request_id="bad-policy", prompt="hi", requested_at=T0, policy="cheapest")
            ),
        )
        producer.produce_raw(topics["requests"], key=b"broken", value=BAD_VALUE, headers=[("ce_id", b"x")])
        producer.flush()
        producer.produce(
            topics["embeddings"], _result_event(minilm, "routing:emb-after", vectors["emb-after"], T0)
        )
        producer.produce(
            topics["embeddings"],
            _result_event(
                minilm, "routing:emb-other-model", vectors["emb-other-model"], T0, model_name="another-model"
            ),
        )
        producer.flush()
    del producer
    gc.collect()  # EventProducer <-> its librdkafka error callback is a cycle: free the handles while the broker runs

    _run_worker(settings, tmp_path, router_file, unique_name("routing"), topics)

    records = _decisions(settings, serde, topics["decisions"])
    by_request = {r.data["request_id"]: r for r in records}
    assert len(records) == 5 and set(by_request) == {
        "feat-1",
        "feat-2",
        "emb-before",
        "emb-after",
        "emb-other-model",
    }
    for rid, record in by_request.items():
        assert record.schema == DECISION_SCHEMA and record.key == rid
        name = "another-model" if rid == "emb-other-model" else minilm.name
        embedding = (
            None
            if rid.startswith("feat")
            else EmbeddingInput(model_name=name, model_version=minilm.version, vector=vectors[rid])
        )
        expected = decide(router, requests[rid], embedding)  # the pure function, computed here
        got = RouteDecision.from_avro(record.data)
        assert got == expected
        assert record.attributes.id == expected.decision_id
        assert record.attributes.causation_id == rid and record.attributes.time == requests[rid].requested_at
    assert {rid: by_request[rid].data["method"] for rid in by_request} == {
        "feat-1": "features", "feat-2": "features", "emb-before": "embedding", "emb-after": "embedding",
        "emb-other-model": "features",
    }  # fmt: skip
    assert by_request["emb-other-model"].data["embedding_status"] == "mismatch-model-another-model"
    assert by_request["emb-before"].data["embedding_model_version"] == minilm.version
    reader = DecisionReader(settings.kafka, serde, topics["decisions"], from_beginning=True)
    try:
        assert reader.collect(list(by_request), timeout_seconds=15) == {
            rid: RouteDecision.from_avro(r.data) for rid, r in by_request.items()
        }
    finally:
        reader.close()

    letters = [r for r in read_range(settings.kafka, serde, topics["dlq"]) if isinstance(r, ConsumedEvent)]
    assert sorted(letter.data["error_type"] for letter in letters) == [
        "EnvelopeError",
        "UnprocessableEventError",
    ]
    assert all(
        letter.data["processor"] == "routing" and letter.data["source_topic"] == topics["requests"]
        for letter in letters
    )
    bad = next(letter for letter in letters if letter.data["error_type"] == "UnprocessableEventError")
    assert "unknown policy 'cheapest'" in bad.data["reason"]
    assert (
        next(letter for letter in letters if letter.data["error_type"] == "EnvelopeError").data["value"]
        == BAD_VALUE
    )

    # replay: a new app (consumer group, join topic, table) over the same input topics
    replay_topics = {**topics, "decisions": create_topic(unique_name("route-dec-replay"), partitions=3),
                     "dlq": create_topic(unique_name("dlq-replay"), partitions=1)}  # fmt: skip
    _run_worker(settings, tmp_path, router_file, unique_name("routing-replay"), replay_topics)
    replayed = {r.data["request_id"]: r for r in _decisions(settings, serde, replay_topics["decisions"])}
    assert set(replayed) == set(by_request)
    for rid, record in replayed.items():
        assert record.data == by_request[rid].data  # byte-for-byte the same decision, id included
        assert record.attributes.id == by_request[rid].attributes.id


def test_restarted_worker_decides_requests_pending_in_the_table(
    settings: Settings,
    unique_name: Callable[[str], str],
    create_topic: Callable[..., str],
    tmp_path: Path,
    minilm,
    router_file: Path,
) -> None:
    """Requests read by one worker wait for their embeddings; a new worker (same app id) reads the embeddings and
    decides each request exactly once, with the embedding scorer.

    The new worker has nothing in memory (``memory://``): the waiting requests exist only in ``route_join``
    rebuilt from the changelog the first worker wrote. Three requests naming the same embedding update one
    key three times, so the first worker's last changelog batch holds several records: the case where Tansu's
    ``ListOffsets(latest)`` (the last batch's base offset + 1) stops Faust's recovery short of the end and a
    restarted worker sees fewer waiting requests.
    """
    serde = AvroSerde(EmbeddedRegistry())
    router = Router.load(router_file)
    topics = {
        "requests": create_topic(unique_name("route-req"), partitions=3),
        "embeddings": create_topic(unique_name("inference-results"), partitions=6),
        "decisions": create_topic(unique_name("route-dec"), partitions=3),
        "dlq": create_topic(unique_name("dlq"), partitions=1),
    }
    app_id = unique_name("routing")
    asked = {"r-alone": ("emb-before", "routing:one"), "r-1": ("emb-after", "routing:shared"),
             "r-2": ("feat-1", "routing:shared"), "r-3": ("feat-2", "routing:shared")}  # fmt: skip
    requests = {
        rid: RouteRequest(
            request_id=rid,
            prompt=ASKED[prompt],
            requested_at=T0 + timedelta(seconds=i),
            embedding_request_id=emb,
        )
        for i, (rid, (prompt, emb)) in enumerate(asked.items())
    }
    vectors = dict(
        zip(
            ("routing:one", "routing:shared"),
            minilm.embed([ASKED["emb-before"], ASKED["emb-after"]]),
            strict=True,
        )
    )
    with EventProducer(settings.kafka, serde) as producer:
        for r in requests.values():
            producer.produce(topics["requests"], request_event(r))
        producer.flush()
    del producer
    gc.collect()

    first = _run_worker(settings, tmp_path, router_file, app_id, topics, timeout=25)
    assert first["requests_count"] == 4 and first["pending_count"] == 4, first["stderr"][-3000:]
    assert _decisions(settings, serde, topics["decisions"]) == []

    with EventProducer(settings.kafka, serde) as producer:
        for emb, vector in vectors.items():
            producer.produce(topics["embeddings"], _result_event(minilm, emb, vector, T0))
        producer.flush()
    del producer
    gc.collect()
    second = _run_worker(settings, tmp_path, router_file, app_id, topics, timeout=25)
    assert second["requests_count"] == 0 and second["embeddings_count"] == 2, second["stderr"][-3000:]
    assert second["decisions_embedding_count"] == 4 and second["decisions_features_count"] == 0, second[
        "stderr"
    ][-3000:]

    records = _decisions(settings, serde, topics["decisions"])
    assert sorted(r.data["request_id"] for r in records) == sorted(requests)  # exactly one decision each
    for record in records:
        rid = record.data["request_id"]
        emb = requests[rid].embedding_request_id
        embedding = EmbeddingInput(model_name=minilm.name, model_version=minilm.version, vector=vectors[emb])
        expected = decide(router, requests[rid], embedding)
        assert RouteDecision.from_avro(record.data) == expected and expected.method == "embedding"
        assert record.attributes.id == expected.decision_id and record.attributes.causation_id == rid
    assert list(read_range(settings.kafka, serde, topics["dlq"])) == []
