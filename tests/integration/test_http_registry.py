"""The HTTP schema-registry client against a server speaking Confluent's documented REST API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from schemas import AVRO_DIR
from streams.compat import check_compatibility
from streams.errors import DeserializationError, SchemaError, SchemaIncompatibleError
from streams.registry import HttpRegistry, make_registry
from streams.serde import AvroSerde
from tests.fakes.compat_verdicts import DOCUMENTED_PAIRS, DocumentedPair
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


def _pair(case: str) -> DocumentedPair:
    return next(p for p in DOCUMENTED_PAIRS if p.case == case)


def test_incompatible_change_is_refused_by_the_registry() -> None:
    """A new field without default fails BACKWARD: SchemaIncompatibleError, nothing registered; with one it passes."""
    required, optional = _pair("backward-add-field-without-default"), _pair("backward-add-field-with-default")
    assert required.old == optional.old
    with FakeSchemaRegistry() as sr:
        reg = HttpRegistry(sr.url)
        first = reg.register("example.avro.User", required.old)
        with pytest.raises(SchemaIncompatibleError):
            reg.register("example.avro.User", required.new)
        assert sr.subjects["example.avro.User"] == [first]
        assert reg.register("example.avro.User", optional.new) != first
        assert len(sr.subjects["example.avro.User"]) == 2


@pytest.fixture(scope="module")
def registry_server() -> Iterator[FakeSchemaRegistry]:
    with FakeSchemaRegistry() as sr:
        yield sr


@pytest.mark.parametrize("pair", DOCUMENTED_PAIRS, ids=lambda p: p.case)
def test_documented_verdicts_through_the_registry_and_our_checker(
    pair: DocumentedPair, registry_server: FakeSchemaRegistry
) -> None:
    """Each documented pair: the registry's answers through the client, and streams.compat's, are the verdict.

    The fake answers from the documented table, so the first half tests the client's conversation
    (POST /compatibility/..., 409 on a refused registration); the second half is the real check of our
    own checker against Confluent's and the Avro specification's verdicts.
    """
    sr = registry_server
    sr.compatibility = pair.level
    subject = f"documented-{pair.case}"
    reg = HttpRegistry(sr.url, compatibility=pair.level)
    first = reg.register(subject, pair.old)
    answer = httpx.post(
        f"{sr.url}/compatibility/subjects/{subject}/versions/latest?verbose=true",
        json={"schema": json.dumps(pair.new)},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["is_compatible"] is pair.compatible, answer.json()
    if pair.compatible:
        assert reg.register(subject, pair.new) == sr.subjects[subject][-1] != first
    else:
        with pytest.raises(SchemaIncompatibleError):
            reg.register(subject, pair.new)
        refused = httpx.post(f"{sr.url}/subjects/{subject}/versions", json={"schema": json.dumps(pair.new)})
        assert (refused.status_code, refused.json()["error_code"]) == (409, 409)
        assert sr.subjects[subject] == [first]
    problems = check_compatibility(pair.new, pair.old, pair.level)
    assert (not problems) is pair.compatible, f"{pair.rule} ({pair.source}); streams.compat said {problems}"


def test_an_undocumented_change_is_an_explicit_error_not_a_guess() -> None:
    """The fake has no verdict of its own: a change outside the table is a 422 naming the gap."""
    with FakeSchemaRegistry() as sr:
        reg = HttpRegistry(sr.url)
        schema = json.loads((AVRO_DIR / "sophia.agent.ToolCall.avsc").read_text())
        reg.register("sophia.agent.ToolCall", schema)
        assert reg.register("sophia.agent.ToolCall", schema) == sr.subjects["sophia.agent.ToolCall"][0]
        changed = {**schema, "fields": [*schema["fields"], {"name": "cwd", "type": "string"}]}
        with pytest.raises(SchemaError, match="422.*no documented verdict"):
            reg.register("sophia.agent.ToolCall", changed)
        direct = httpx.post(
            f"{sr.url}/subjects/sophia.agent.ToolCall/versions", json={"schema": json.dumps(changed)}
        )
        assert direct.status_code == 422 and "no documented verdict" in direct.json()["message"]
        assert len(sr.subjects["sophia.agent.ToolCall"]) == 1


def test_unreachable_registry_is_a_clear_error() -> None:
    """A registry nobody listens on raises SchemaError naming its URL, not a transport exception."""
    reg = HttpRegistry("http://127.0.0.1:1")
    with pytest.raises(SchemaError, match=r"schema registry at http://127\.0\.0\.1:1 is unreachable"):
        reg.id_for("sophia.agent.ToolCall")
