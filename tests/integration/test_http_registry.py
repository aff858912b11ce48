"""The HTTP schema-registry client against a server speaking Confluent's documented REST API."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from schemas import AVRO_DIR
from streams.errors import DeserializationError, SchemaError, SchemaIncompatibleError
from streams.registry import HttpRegistry, make_registry
from streams.serde import AvroSerde
from tests.fakes.schema_registry import FakeSchemaRegistry

TOOL = {"run_id": "r", "step": 1, "event_time": datetime(2025, 11, 18, 23, 0, tzinfo=UTC), "tool": "bash",
        "command": "ls", "return_code": 0, "output_bytes": 3, "timed_out": False}  # fmt: skip


def test_every_schema_registers_and_round_trips() -> None:
    """make_registry(url) registers every .avsc; encode/decode goes through ids the server assigned."""
    with FakeSchemaRegistry() as sr:
        reg = make_registry(sr.url)
        assert isinstance(reg, HttpRegistry)
        assert set(sr.subjects) == {p.name.removesuffix(".avsc") for p in AVRO_DIR.glob("*.avsc")}
        serde = AvroSerde(reg)
        raw = serde.encode("sophia.agent.ToolCall", TOOL)
        assert int.from_bytes(raw[1:5], "big") == sr.subjects["sophia.agent.ToolCall"][-1]
        fresh = AvroSerde(HttpRegistry(sr.url))  # a reader that knows nothing yet: GET /schemas/ids/{id}
        assert fresh.decode(raw) == ("sophia.agent.ToolCall", TOOL)
        assert ("GET", f"/schemas/ids/{int.from_bytes(raw[1:5], 'big')}") in sr.requests
        with pytest.raises(DeserializationError, match="unknown schema id 4242"):
            fresh.decode(b"\x00" + (4242).to_bytes(4, "big") + b"\x00")


def test_incompatible_change_is_refused_by_the_registry() -> None:
    """A new required field fails the compatibility check: SchemaIncompatibleError, nothing registered."""
    with FakeSchemaRegistry() as sr:
        reg = HttpRegistry(sr.url)
        schema = json.loads((AVRO_DIR / "sophia.agent.ToolCall.avsc").read_text())
        reg.register("sophia.agent.ToolCall", schema)
        changed = {**schema, "fields": [*schema["fields"], {"name": "cwd", "type": "string"}]}
        with pytest.raises(SchemaIncompatibleError):
            reg.register("sophia.agent.ToolCall", changed)
        assert len(sr.subjects["sophia.agent.ToolCall"]) == 1
        optional = {
            **schema,
            "fields": [*schema["fields"], {"name": "cwd", "type": ["null", "string"], "default": None}],
        }
        assert reg.register("sophia.agent.ToolCall", optional) != sr.subjects["sophia.agent.ToolCall"][0]


def test_unreachable_registry_is_a_clear_error() -> None:
    """A registry nobody listens on raises SchemaError naming its URL, not a transport exception."""
    reg = HttpRegistry("http://127.0.0.1:1")
    with pytest.raises(SchemaError, match=r"schema registry at http://127\.0\.0\.1:1 is unreachable"):
        reg.id_for("sophia.agent.ToolCall")
