"""Inference wire records: Avro mapping, vectors as float32 bytes, deterministic ids, settings, exports."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime

import pytest

np = pytest.importorskip("numpy", reason="the inference extra (numpy) is not installed")

from inference.config import InferenceSettings
from inference.errors import EmbedTimeoutError, InferenceError, RequestError
from inference.records import (
    REQUEST_SCHEMA,
    RESULT_SCHEMA,
    EmbeddingRequest,
    EmbeddingResult,
    EventTextRef,
    decode_vector,
    encode_vector,
    request_event,
    result_event_id,
)
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde

T0 = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    """A serde on the embedded registry (schemas pinned in schemas/registry.json)."""
    return AvroSerde(EmbeddedRegistry())


def test_vector_bytes_are_little_endian_float32() -> None:
    """A vector travels as '<f4' bytes and comes back bit-identical."""
    v = np.array([1.0, -0.5, 0.25], dtype=np.float64)
    data = encode_vector(v)
    assert data == b"\x00\x00\x80?\x00\x00\x00\xbf\x00\x00\x80>"
    back = decode_vector(data, 3)
    assert back.dtype == np.float32 and back.tolist() == [1.0, -0.5, 0.25]
    with pytest.raises(ValueError):
        decode_vector(data, 4)
    with pytest.raises(ValueError):
        encode_vector(np.zeros((2, 2)))


def test_request_needs_exactly_one_of_text_and_ref() -> None:
    """A request with both or neither of text and text_ref is a RequestError (a ValueError)."""
    ref = EventTextRef(topic="t", partition=0, offset=1, field="f")
    with pytest.raises(RequestError):
        EmbeddingRequest(request_id="r", requested_at=T0)
    with pytest.raises(ValueError):
        EmbeddingRequest(request_id="r", requested_at=T0, text="x", text_ref=ref)


def test_request_round_trips_through_avro(serde: AvroSerde) -> None:
    """A request with a text reference encodes, decodes and maps back equal, keyed and identified by its id."""
    req = EmbeddingRequest(
        request_id="r-1",
        requested_at=T0,
        text_ref=EventTextRef(topic="t", partition=2, offset=9, field="text"),
    )
    name, datum = serde.decode(serde.encode(REQUEST_SCHEMA, req.to_avro()))
    assert name == REQUEST_SCHEMA
    assert EmbeddingRequest.from_avro(datum) == req
    event = request_event(req)
    assert event.key == "r-1" and event.attributes.id == "r-1" and event.attributes.time == T0


def test_result_round_trips_and_pins_its_bytes(serde: AvroSerde) -> None:
    """A result's Avro bytes are pinned (schema id 8, float32 vector) and decode to the same values."""
    result = EmbeddingResult(
        request_id="r-1",
        model_name="all-MiniLM-L6-v2",
        model_version="0.1.0+sha256.53aa51172d142c89",
        vector=np.array([0.5, -1.0], dtype=np.float32),
        normalized=False,
        batch_id="w-1",
        batch_size=2,
        latency_ms=12.5,
        model_latency_ms=3.0,
        source_partition=1,
        source_offset=7,
        answered_at=T0,
    )
    data = serde.encode(RESULT_SCHEMA, result.to_avro())
    assert data[:5] == b"\x00\x00\x00\x00\x08"
    assert data.hex() == (
        "000000000806722d3120616c6c2d4d696e694c4d2d4c362d76323a302e312e302b7368613235362e3533616135313137"
        "326431343263383904100000003f000080bf0006772d310400000000000029400000000000000840020e808885b2c068"
    )
    back = EmbeddingResult.from_avro(serde.decode(data)[1])
    assert back.vector.tolist() == [0.5, -1.0] and back.dimension == 2
    assert back.answered_at == T0 and back.batch_id == "w-1" and back.latency_ms == 12.5


def test_result_id_is_deterministic_per_request_and_model_version() -> None:
    """The same request and model version give the same result id; another version gives another."""
    a = result_event_id("m", "1", "r")
    assert a == result_event_id("m", "1", "r")
    assert a != result_event_id("m", "2", "r") != result_event_id("m", "1", "s")


def test_settings_read_environment_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    """BACKBONE_INFERENCE_* variables set the settings, and the group defaults to inference-<model>."""
    monkeypatch.setenv("BACKBONE_INFERENCE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("BACKBONE_INFERENCE_REQUESTS_TOPIC", "my.requests")
    s = InferenceSettings()
    assert s.max_batch_size == 16 and s.requests_topic == "my.requests"
    assert s.consumer_group == "inference-all-MiniLM-L6-v2"
    assert InferenceSettings(group_id="g").consumer_group == "g"


def test_errors_share_the_package_root() -> None:
    """Inference errors derive from InferenceError and the builtin that matches their meaning."""
    err = EmbedTimeoutError("late", ["a"])
    assert isinstance(err, InferenceError) and isinstance(err, TimeoutError) and err.missing == ["a"]


@pytest.mark.parametrize(
    "module",
    [
        "inference",
        "inference.batching",
        "inference.config",
        "inference.errors",
        "inference.metrics",
        "inference.records",
        "inference.scaling",
        "inference.client",
        "inference.worker",
        "inference.model",
        "inference.actors",
        "backbone.cli.inference",
    ],
)
def test_all_is_exact(module: str) -> None:
    """Every name in each inference module's __all__ resolves, once."""
    mod = importlib.import_module(module)
    assert len(mod.__all__) == len(set(mod.__all__))
    assert [n for n in mod.__all__ if not hasattr(mod, n)] == []
