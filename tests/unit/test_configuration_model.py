"""Unit tests of the configuration model: keys, value schemas, diffs, the aggregate, upcasting and the wire record."""

from __future__ import annotations

import importlib
import json
from datetime import UTC, datetime

import pytest
from eventsourcing.application import Application
from eventsourcing.persistence import JSONTranscoder, Mapper, StoredEvent
from eventsourcing.utils import get_topic
from pydantic import SecretStr

from configuration.aggregate import ChangeKind, ConfigurationItem, aggregate_id_for
from configuration.errors import ConfigKeyError, ConfigValueError, StaleVersionError
from configuration.relay import CONFIG_CHANGE_SCHEMA, change_event
from configuration.schemas import ValueSchemaRegistry, check_key, default_schemas
from configuration.store import ConfigurationApplication, diff_values, event_id_for, eventsourcing_env
from core.settings import PostgresSettings
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde


def _mapper() -> Mapper:
    transcoder = JSONTranscoder()
    Application().register_transcodings(transcoder)
    return Mapper(transcoder=transcoder)


def test_check_key_accepts_dotted_lower_case_and_refuses_the_rest() -> None:
    """A dotted lower-case key is accepted; empty, upper-case, spaced or trailing-dot keys are refused."""
    assert check_key("routing.policy.default") == "routing.policy.default"
    for bad in ["", "Routing.policy", "a b", "a.", ".a", "a..b", "x" * 201]:
        with pytest.raises(ConfigKeyError):
            check_key(bad)


def test_schema_for_prefers_exact_key_then_longest_prefix() -> None:
    """An exact key's schema wins over prefixes, and the longest matching prefix wins among prefixes."""
    from configuration.schemas import AgentRole, ProviderLimits, RoutingPolicy

    reg = ValueSchemaRegistry({"a.": RoutingPolicy, "a.b.": ProviderLimits, "a.b.c": AgentRole})
    assert reg.schema_name("a.b.c") == "AgentRole"
    assert reg.schema_name("a.b.d") == "ProviderLimits"
    assert reg.schema_name("a.x") == "RoutingPolicy"
    assert reg.schema_name("b.x") is None


def test_validate_fills_defaults_and_names_failing_fields() -> None:
    """A valid value is stored as the model's dump; an invalid one raises naming each bad field."""
    reg = default_schemas()
    stored, name = reg.validate("providers.openai", {"requests_per_minute": 60})
    assert name == "ProviderLimits" and stored["timeout_seconds"] == 60.0
    with pytest.raises(ConfigValueError) as info:
        reg.validate("providers.openai", {"requests_per_minute": -1, "colour": "red"})
    text = str(info.value)
    assert "requests_per_minute" in text and "colour" in text and info.value.schema_name == "ProviderLimits"


def test_value_must_be_a_json_object_even_without_schema() -> None:
    """A list or scalar value is refused; any object is accepted for a key without a schema."""
    reg = default_schemas()
    assert reg.validate("misc.flag", {"on": True}) == ({"on": True}, None)
    with pytest.raises(ConfigValueError):
        reg.validate("misc.flag", [1, 2])


def test_diff_values_reports_added_removed_and_nested_changes() -> None:
    """The diff lists added, removed and changed fields with dotted paths for nested objects."""
    d = diff_values(
        {"a": 1, "n": {"x": 1, "y": 2}, "gone": True}, {"a": 2, "n": {"x": 1, "y": 3}, "new": "v"}
    )
    assert d == [
        {"path": "a", "op": "changed", "old": 1, "new": 2},
        {"path": "gone", "op": "removed", "old": True, "new": None},
        {"path": "n.y", "op": "changed", "old": 2, "new": 3},
        {"path": "new", "op": "added", "old": None, "new": "v"},
    ]


def test_aggregate_versions_rollback_and_retirement() -> None:
    """Each change adds one version; a rollback records the restored and the rolled-back-from versions."""
    item = ConfigurationItem.create("k.a", {"v": 1}, author="ann", reason="first")
    assert item.id == aggregate_id_for("k.a") and item.version == 1
    item.change_value({"v": 2}, author="bob", reason="second")
    item.roll_back({"v": 1}, restored_version=1, author="ann", reason="undo")
    assert (item.version, item.value, item.change) == (3, {"v": 1}, ChangeKind.ROLLED_BACK)
    assert (item.restored_version, item.rolled_back_from_version) == (1, 2)
    item.retire(author="ann", reason="gone")
    assert item.retired and item.version == 4
    assert [type(e).__name__ for e in item.collect_events()] == [
        "Created",
        "Changed",
        "RolledBack",
        "Retired",
    ]


def test_changed_v1_events_are_upcast_with_a_null_causation_id() -> None:
    """A stored version-1 Changed event (no causation_id, no class_version) reads back as version 2."""
    mapper = _mapper()
    item = ConfigurationItem.create("k.b", {"v": 1}, author="ann", reason="first")
    item.change_value({"v": 2}, author="bob", reason="second", causation_id="cmd-1")
    stored = mapper.to_stored_event(item.pending_events[1])
    state = json.loads(stored.state)
    assert state.pop("class_version") == 2 and state.pop("causation_id") == "cmd-1"
    v1 = StoredEvent(
        originator_id=stored.originator_id,
        originator_version=stored.originator_version,
        topic=get_topic(ConfigurationItem.Changed),
        state=json.dumps(state).encode(),
    )
    event = mapper.to_domain_event(v1)
    assert isinstance(event, ConfigurationItem.Changed) and event.causation_id is None
    assert event.value == {"v": 2}


def test_snapshot_v1_state_is_upcast() -> None:
    """A version-1 snapshot of the aggregate (without causation_id) reconstructs with causation_id None."""
    mapper = _mapper()
    item = ConfigurationItem.create("k.c", {"v": 1}, author="ann", reason="first")
    snap = ConfigurationItem.Snapshot.take(item)
    stored = mapper.to_stored_event(snap)
    state = json.loads(stored.state)
    state["state"].pop("class_version")
    state["state"].pop("causation_id")
    old = StoredEvent(
        originator_id=stored.originator_id,
        originator_version=1,
        topic=stored.topic,
        state=json.dumps(state).encode(),
    )
    restored = mapper.to_domain_event(old).mutate(None)
    assert restored.causation_id is None and restored.value == {"v": 1}


def test_eventsourcing_env_comes_from_the_postgres_url() -> None:
    """The eventsourcing environment is parsed from settings.postgres.url, password and port included."""
    env = eventsourcing_env(PostgresSettings(url=SecretStr("postgresql://u:p%40ss@db.example:6543/cfg")))
    assert env["PERSISTENCE_MODULE"] == "eventsourcing.postgres"
    assert (env["POSTGRES_DBNAME"], env["POSTGRES_HOST"], env["POSTGRES_PORT"]) == (
        "cfg",
        "db.example",
        "6543",
    )
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]) == ("u", "p@ss")
    with pytest.raises(ValueError):
        eventsourcing_env(PostgresSettings(url=SecretStr("postgresql://u@host:5432")))


def test_application_refuses_a_non_positive_snapshot_interval() -> None:
    """A snapshot interval of 0 is refused before any connection is made."""
    with pytest.raises(ValueError):
        ConfigurationApplication({}, snapshot_interval=0)


def test_stale_version_error_names_the_current_version() -> None:
    """The stale-version message tells the current version to retry with."""
    err = StaleVersionError("k.a", 3, 7)
    assert "version 7" in str(err) and "--expected-version 7" in str(err)


def test_change_event_maps_to_avro_with_cloudevents_and_pinned_bytes() -> None:
    """A rollback maps to a ConfigChange keyed by the config key with the stored event's id, and encodes to pinned bytes."""
    item = ConfigurationItem.create("k.d", {"v": 1}, author="ann", reason="first")
    item.roll_back({"v": 1}, restored_version=1, author="ann", reason="undo", causation_id="cmd-9")
    event = item.pending_events[1]
    object.__setattr__(event, "timestamp", datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC))
    ev = change_event(event, key="k.d", notification_id=42)
    assert ev.key == "k.d" and ev.attributes.id == event_id_for(item.id, 2)
    assert ev.attributes.causation_id == "cmd-9" and ev.attributes.type == CONFIG_CHANGE_SCHEMA
    assert ev.data["change"] == "ROLLED_BACK" and ev.data["restored_version"] == 1
    assert ev.data["rolled_back_from_version"] == 1
    serde = AvroSerde(EmbeddedRegistry())
    encoded = serde.encode(CONFIG_CHANGE_SCHEMA, ev.data)
    assert serde.decode(encoded)[1]["value_json"] == '{"v":1}'
    assert encoded[:5] == b"\x00" + serde.registry.id_for(CONFIG_CHANGE_SCHEMA).to_bytes(4, "big")
    assert encoded[5:].hex() == (
        "066b2e640404020e7b2276223a317d06616e6e08756e646fdc8cc3cf84650002020202020a636d642d3948"
        "38343731383936372d656338382d356162312d626361342d61386362363733343539623254"
    )


@pytest.mark.parametrize(
    "module",
    [
        "configuration",
        "configuration.aggregate",
        "configuration.errors",
        "configuration.schemas",
        "configuration.store",
        "configuration.relay",
        "configuration.projection",
        "backbone.cli.config",
    ],
)
def test_all_names_exist(module: str) -> None:
    """Every name in each configuration module's __all__ exists."""
    mod = importlib.import_module(module)
    assert mod.__all__ and all(hasattr(mod, name) for name in mod.__all__)
