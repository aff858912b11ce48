"""The Avro contracts, the embedded registry's compatibility gate and the Confluent wire format."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import fastavro
import pytest

from schemas import AVRO_DIR, PINNED_IDS_FILE
from streams.compat import check_compatibility
from streams.errors import DeserializationError, SchemaError, SchemaIncompatibleError, SchemaValidationError
from streams.registry import EmbeddedRegistry, load_avsc_dir
from streams.serde import AvroSerde

SAMPLE = {
    "run_id": "django__django-11066",
    "step": 3,
    "event_time": datetime(2025, 11, 18, 22, 55, 7, tzinfo=UTC),
    "model": "google/gemini-3-pro-preview",
    "provider": "Google",
    "response_id": None,
    "prompt_tokens": 1590,
    "completion_tokens": 250,
    "cached_tokens": 0,
    "reasoning_tokens": 208,
    "cost_usd": 0.00618,
    "finish_reason": "stop",
    "latency_ms": None,
}
#: The sample as written by LlmCall version 1 (id 1), before the client's outcome fields existed.
PINNED_SAMPLE_V1_HEX = (
    "000000000128646a616e676f5f5f646a616e676f2d313130363606f0b3ee92d36636676f6f676c652f67656d696e692d332d70726f"
    "2d70726576696577020c476f6f676c6500ec18f40300a00302aa7d3a1e3350793f020873746f7000"
)
#: The sample as the latest LlmCall (id 13: outcome, error_kind, http_status, request_id, attempt, agent) writes it.
PINNED_SAMPLE_HEX = PINNED_SAMPLE_V1_HEX.replace("0000000001", "000000000d", 1) + "046f6b0000000200"
CLIENT_DEFAULTS = {
    "outcome": "ok",
    "error_kind": None,
    "http_status": None,
    "request_id": None,
    "attempt": 1,
    "agent": None,
}


@pytest.fixture
def serde() -> AvroSerde:
    return AvroSerde(EmbeddedRegistry())


@pytest.mark.parametrize("path", sorted(AVRO_DIR.glob("*.avsc")), ids=lambda p: p.name)
def test_every_avsc_parses_and_follows_the_house_rules(path: Path) -> None:
    """Each .avsc parses with fastavro, has a doc, is named after its full name, and union defaults match."""
    schema = json.loads(path.read_text())
    fastavro.parse_schema(schema)
    assert schema.get("doc"), f"{path.name} has no doc"
    assert path.name == f"{schema['namespace']}.{schema['name']}.avsc"
    for f in schema["fields"]:
        if isinstance(f["type"], list) and "default" in f:
            first = f["type"][0]
            assert (f["default"] is None) == (first == "null"), (
                f"{path.name}:{f['name']} default vs first branch"
            )


def test_every_avsc_is_pinned() -> None:
    """The committed registry.json pins the current text of every .avsc (else the embedded registry refuses)."""
    assert EmbeddedRegistry(strict=False).unpinned() == []
    assert set(load_avsc_dir()) <= set(json.loads(PINNED_IDS_FILE.read_text())["subjects"])


def test_sample_bytes_are_pinned(serde: AvroSerde) -> None:
    """An LlmCall encodes to the same Confluent-framed bytes on every machine (magic 0, id 13, body)."""
    raw = serde.encode("sophia.agent.LlmCall", SAMPLE)
    assert raw.hex() == PINNED_SAMPLE_HEX
    assert raw[0] == 0 and int.from_bytes(raw[1:5], "big") == 13
    name, back = serde.decode(raw)
    assert name == "sophia.agent.LlmCall" and back == {**SAMPLE, **CLIENT_DEFAULTS}


def test_history_written_by_llmcall_v1_still_decodes(serde: AvroSerde) -> None:
    """Bytes written with id 1 (imported history) decode with the writer's fields; readers default the rest."""
    name, back = serde.decode(bytes.fromhex(PINNED_SAMPLE_V1_HEX))
    assert name == "sophia.agent.LlmCall" and back == SAMPLE


def test_validation_names_the_field(serde: AvroSerde) -> None:
    """A datum with a wrong type is refused with the field's name."""
    with pytest.raises(SchemaValidationError) as exc:
        serde.encode("sophia.agent.LlmCall", {**SAMPLE, "prompt_tokens": "many"})
    assert exc.value.field == "prompt_tokens"
    with pytest.raises(SchemaValidationError) as exc:
        serde.check("sophia.agent.LlmCall", {k: v for k, v in SAMPLE.items() if k != "model"})
    assert exc.value.field == "model"
    with pytest.raises(SchemaValidationError) as exc:
        serde.check("sophia.agent.LlmCall", {**SAMPLE, "colour": "red"})
    assert exc.value.field == "colour"


def test_full_validation_refuses_what_the_writer_would_coerce(serde: AvroSerde) -> None:
    """With ``validate_on_encode`` (the whole record checked in one call, field by field only to name the
    culprit) a valid datum encodes to the same bytes, and an ``int`` past 32 bits is refused by name."""
    strict = AvroSerde(serde.registry, validate_on_encode=True)
    assert strict.encode("sophia.agent.LlmCall", SAMPLE) == serde.encode("sophia.agent.LlmCall", SAMPLE)
    with pytest.raises(SchemaValidationError) as exc:
        strict.encode("sophia.agent.LlmCall", {**SAMPLE, "step": 2**31})
    assert exc.value.field == "step"
    with pytest.raises(SchemaValidationError) as exc:
        strict.check("sophia.agent.LlmCall", {**SAMPLE, "cost_usd": "free"})
    assert exc.value.field == "cost_usd"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "too short"),
        (b"\x01\x00\x00\x00\x01abc", "magic byte"),
        (b"\x00\x00\x00\x03\xe7abc", "unknown schema id"),
        (b"\x00\x00\x00\x00\x01\xff", "corrupt"),
    ],
)
def test_undecodable_bytes_raise_deserialization_error(serde: AvroSerde, payload: bytes, reason: str) -> None:
    """Bytes that are not a Confluent-framed record of a known schema give DeserializationError with the reason."""
    with pytest.raises(DeserializationError, match=reason):
        serde.decode(payload)


def _copy_schemas(tmp_path: Path) -> tuple[Path, Path]:
    avro = tmp_path / "avro"
    shutil.copytree(AVRO_DIR, avro)
    reg = tmp_path / "registry.json"
    shutil.copy(PINNED_IDS_FILE, reg)
    return avro, reg


def test_incompatible_change_is_refused(tmp_path: Path) -> None:
    """Adding a field without a default to LlmCall is refused by the BACKWARD gate and nothing is pinned."""
    avro, reg = _copy_schemas(tmp_path)
    p = avro / "sophia.agent.LlmCall.avsc"
    schema = json.loads(p.read_text())
    schema["fields"].append({"name": "temperature", "type": "double"})
    p.write_text(json.dumps(schema))
    with pytest.raises(SchemaError, match="pin"):
        EmbeddedRegistry(reg, avro)
    before = reg.read_text()
    with pytest.raises(SchemaIncompatibleError, match="temperature"):
        EmbeddedRegistry(reg, avro, strict=False).pin()
    assert reg.read_text() == before


def test_compatible_change_gets_a_new_id(tmp_path: Path) -> None:
    """Adding an optional field passes the gate, gets the next id, and old bytes still decode."""
    avro, reg = _copy_schemas(tmp_path)
    old = AvroSerde(EmbeddedRegistry(reg, avro)).encode("sophia.agent.LlmCall", SAMPLE)
    p = avro / "sophia.agent.LlmCall.avsc"
    schema = json.loads(p.read_text())
    schema["fields"].append({"name": "temperature", "type": ["null", "double"], "default": None})
    p.write_text(json.dumps(schema))
    new_ids = EmbeddedRegistry(reg, avro, strict=False).pin()
    registry = EmbeddedRegistry(reg, avro)
    assert new_ids["sophia.agent.LlmCall"] == registry.id_for("sophia.agent.LlmCall") > 1
    serde = AvroSerde(registry)
    assert serde.decode(old)[1] == {**SAMPLE, **CLIENT_DEFAULTS}
    assert (
        serde.decode(serde.encode("sophia.agent.LlmCall", {**SAMPLE, "temperature": 0.5}))[1]["temperature"]
        == 0.5
    )


@pytest.mark.parametrize(
    ("old", "new", "level", "ok"),
    [
        ("int", "long", "BACKWARD", True),
        ("long", "int", "BACKWARD", False),
        ({"type": "enum", "name": "E", "symbols": ["A", "B"]}, {"type": "enum", "name": "E", "symbols": ["A"]}, "BACKWARD", False),
        ({"type": "enum", "name": "E", "symbols": ["A"]}, {"type": "enum", "name": "E", "symbols": ["A", "B"]}, "BACKWARD", True),
        ({"type": "enum", "name": "E", "symbols": ["A"]}, {"type": "enum", "name": "E", "symbols": ["A", "B"]}, "FORWARD", False),
        ({"type": "enum", "name": "E", "symbols": ["A"]}, {"type": "enum", "name": "F", "symbols": ["A"]}, "BACKWARD", False),
        ({"type": "fixed", "name": "X", "size": 4}, {"type": "fixed", "name": "Y", "size": 4}, "BACKWARD", False),
        ({"type": "fixed", "name": "X", "size": 4}, {"type": "fixed", "name": "Y", "size": 4, "aliases": ["X"]}, "BACKWARD", True),
        ("string", ["null", "string"], "BACKWARD", True),
        (["null", "string"], "string", "BACKWARD", False),
        ({"type": "array", "items": "int"}, {"type": "array", "items": "long"}, "FULL", False),
        ("string", "int", "NONE", True),
    ],
)  # fmt: skip
def test_compatibility_rules(old: object, new: object, level: str, ok: bool) -> None:
    """The gate follows Avro's schema-resolution rules for promotions, names, enums, unions and containers."""
    wrap = lambda t: {"type": "record", "name": "R", "fields": [{"name": "f", "type": t}]}
    assert (check_compatibility(wrap(new), wrap(old), level) == []) is ok


def test_removing_a_field_is_backward_compatible_but_not_forward() -> None:
    """Readers on the new schema ignore a removed field; readers on the old one miss it (no default)."""
    old = {
        "type": "record",
        "name": "R",
        "fields": [{"name": "a", "type": "int"}, {"name": "b", "type": "int"}],
    }
    new = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}
    assert check_compatibility(new, old, "BACKWARD") == []
    assert check_compatibility(new, old, "FORWARD") == [
        "$.b: new field has no default, so history cannot be read"
    ]
