"""The connector spec loader and linter, the shipped specs, the pure plan diff, and `connectors lint`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backbone.cli.connectors import EXIT_FINDINGS, EXIT_USAGE, app
from connectors.kafka_connect import PlanAction, RetryPolicy, plan
from connectors.lint import (
    DEFAULT_SPECS_DIR,
    ConnectorSpec,
    ConnectorSpecError,
    LintLevel,
    is_config_reference,
    lint_config,
    lint_spec,
    load_spec,
    load_specs,
)

PG = "io.debezium.connector.postgresql.PostgresConnector"
MYSQL = "io.debezium.connector.mysql.MySqlConnector"

CLEAN_PG = {
    "connector.class": PG,
    "plugin.name": "pgoutput",
    "topic.prefix": "h3",
    "database.hostname": "db",
    "database.user": "debezium",
    "database.password": "${env:H3_PG_PASSWORD}",
    "database.dbname": "platform",
}


def _keys(findings: list, level: LintLevel = LintLevel.ERROR) -> set[str]:
    return {f.key for f in findings if f.level is level}


def test_shipped_specs_are_clean() -> None:
    """Every spec in connectors/specs/ loads and lints with no finding."""
    specs = load_specs([DEFAULT_SPECS_DIR])
    assert [s.name for s in specs] == ["platform-postgres"]
    for spec in specs:
        assert lint_spec(spec) == []


def test_platform_postgres_spec_content() -> None:
    """The platform Postgres spec is a Debezium 2.x pgoutput source of the platform tables with Avro converters."""
    spec = load_spec(DEFAULT_SPECS_DIR / "platform-postgres.yaml")
    c = spec.config
    assert c["connector.class"] == PG and c["plugin.name"] == "pgoutput"
    assert set(c["table.include.list"].split(",")) >= {
        "public.agents",
        "public.agent_runs",
        "public.config_items",
    }
    assert is_config_reference(c["database.password"])
    assert c["value.converter"] == c["key.converter"] == "io.confluent.connect.avro.AvroConverter"
    assert c["tombstones.on.delete"] == "true" and c["name"] == "platform-postgres"
    assert not any(k.startswith("schema.history.internal") for k in c)


def test_clean_config_has_no_findings() -> None:
    """A complete Debezium 2.x Postgres config with an env reference for its password has no findings."""
    assert lint_config("h3-clean", CLEAN_PG) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("database.server.name", "topic.prefix"),
        ("table.whitelist", "table.include.list"),
        ("schema.whitelist", "schema.include.list"),
        ("column.blacklist", "column.exclude.list"),
        ("database.history.kafka.topic", "schema.history.internal.kafka.topic"),
        ("database.history.kafka.bootstrap.servers", "schema.history.internal.kafka.bootstrap.servers"),
        ("database.history", "schema.history.internal"),
    ],
)
def test_pre_2_0_names_are_refused_with_replacement(old: str, new: str) -> None:
    """A Debezium 1.x property name is an error whose message names the 2.x replacement."""
    findings = lint_config("h3-old", {**CLEAN_PG, old: "x"})
    [finding] = [f for f in findings if f.key == old]
    assert finding.level is LintLevel.ERROR
    assert f"use {new}" in finding.message


@pytest.mark.parametrize(
    ("key", "value", "bad"),
    [
        ("database.password", "hunter2", True),
        ("database.password", "${file:/opt/kafka/secrets/pg.properties:password}", False),
        ("database.password", "${directory:/opt/kafka/secrets:pg-password}", False),
        ("database.password", "prefix-${env:PW}", True),
        ("value.converter.basic.auth.user.info", "user:pass", True),
        ("ssl.truststore.password", "changeit", True),
        (
            "producer.override.sasl.jaas.config",
            'org.apache.kafka.common.security.plain.PlainLoginModule required username="u" password="p";',
            True,
        ),
        (
            "producer.override.sasl.jaas.config",
            (
                'org.apache.kafka.common.security.plain.PlainLoginModule required username="u" '
                'password="${file:/opt/kafka/secrets/sasl.properties:password}";'
            ),
            False,
        ),
        ("database.hostname", "db", False),
    ],
)
def test_literal_secrets_are_refused(key: str, value: str, bad: bool) -> None:
    """A secret-looking key with a literal value is an error; a config-provider reference is fine."""
    findings = lint_config("h3-secret", {**CLEAN_PG, key: value})
    assert (key in _keys(findings)) is bad
    if bad:
        assert value not in " ".join(f.message for f in findings)  # the secret is never echoed


def test_required_keys_per_connector_class() -> None:
    """A MySQL connector needs its server id and schema history; a Postgres one its host, user, db and plugin."""
    mysql = lint_config(
        "h3-mysql",
        {
            "connector.class": MYSQL,
            "topic.prefix": "h3",
            "database.hostname": "db",
            "database.user": "u",
            "database.password": "${env:PW}",
        },
    )
    assert _keys(mysql) == {
        "database.server.id",
        "schema.history.internal.kafka.bootstrap.servers",
        "schema.history.internal.kafka.topic",
    }
    pg = lint_config("h3-pg", {"connector.class": PG})
    assert _keys(pg) == {
        "topic.prefix",
        "database.hostname",
        "database.user",
        "database.dbname",
        "plugin.name",
    }
    assert _keys(lint_config("h3-none", {})) == {"connector.class"}


def test_schema_history_on_postgres_is_a_warning() -> None:
    """schema.history.internal.* on a Postgres connector is flagged as ignored (Postgres keeps no history)."""
    findings = lint_config("h3-pg", {**CLEAN_PG, "schema.history.internal.kafka.topic": "h"})
    assert _keys(findings, LintLevel.WARNING) == {"schema.history.internal.kafka.topic"}
    assert _keys(findings) == set()


def test_spec_loading_errors(tmp_path: Path) -> None:
    """Spec files that are not YAML, lack config, or nest values are refused naming the file."""
    cases = {
        "a.yaml": "name: [unclosed",
        "b.yaml": "name: h3-b\n",
        "c.yaml": "name: h3-c\nconfig:\n  x: {nested: 1}\n",
        "d.yaml": "name: h3-d\nconfig:\n  name: other\n",
    }
    for file, text in cases.items():
        (tmp_path / file).write_text(text)
        with pytest.raises(ConnectorSpecError, match=file):
            load_spec(tmp_path / file)


def test_yaml_scalars_become_connect_strings(tmp_path: Path) -> None:
    """YAML booleans and numbers become the strings Kafka Connect stores ("true", "5432")."""
    path = tmp_path / "h3.yaml"
    path.write_text("name: h3-s\nconfig:\n  tombstones.on.delete: true\n  database.port: 5432\n")
    assert load_spec(path).config == {"tombstones.on.delete": "true", "database.port": "5432", "name": "h3-s"}


def test_plan_diff_is_pure_and_complete() -> None:
    """plan() reports create, update with the changed keys, unchanged, and live-only delete candidates."""
    a = ConnectorSpec(name="h3-a", config={**CLEAN_PG, "name": "h3-a"})
    b = ConnectorSpec(name="h3-b", config={**CLEAN_PG, "name": "h3-b", "topic.prefix": "new"})
    c = ConnectorSpec(name="h3-c", config={**CLEAN_PG, "name": "h3-c"})
    live = {
        "h3-b": {**CLEAN_PG, "name": "h3-b", "snapshot.mode": "never"},
        "h3-c": {**CLEAN_PG, "name": "h3-c"},
        "h3-z": {"connector.class": PG, "name": "h3-z"},
    }
    diffs = {d.name: d for d in plan([a, b, c], live)}
    assert diffs["h3-a"].action is PlanAction.CREATE
    assert diffs["h3-b"].action is PlanAction.UPDATE
    assert diffs["h3-b"].changed_keys == ("snapshot.mode", "topic.prefix")
    assert [(ch.live, ch.desired) for ch in diffs["h3-b"].changes] == [("never", None), ("h3", "new")]
    assert diffs["h3-c"].action is PlanAction.UNCHANGED and diffs["h3-c"].changes == ()
    assert diffs["h3-z"].action is PlanAction.DELETE_CANDIDATE


def test_retry_policy_backoff_is_bounded() -> None:
    """Backoff doubles from the initial wait and stops at the cap."""
    policy = RetryPolicy(initial_backoff_seconds=0.5, max_backoff_seconds=3.0)
    assert [policy.backoff_seconds(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_cli_lint_exit_codes_and_json(tmp_path: Path) -> None:
    """`connectors lint` exits 0 on the shipped specs, 1 with findings (as JSON), 2 on an unreadable file."""
    runner = CliRunner()
    ok = runner.invoke(app, ["lint"])
    assert ok.exit_code == 0, ok.output
    bad = tmp_path / "h3-bad.yaml"
    bad.write_text(
        f"name: h3-bad\nconfig:\n  connector.class: {PG}\n  database.server.name: x\n"
        "  database.password: hunter2\n"
    )
    result = runner.invoke(app, ["lint", str(bad), "--json"])
    assert result.exit_code == EXIT_FINDINGS
    [entry] = json.loads(result.stdout)
    keys = {f["key"] for f in entry["findings"] if f["level"] == "error"}
    assert {"database.server.name", "database.password"} <= keys
    missing = runner.invoke(app, ["lint", str(tmp_path / "absent.yaml")])
    assert missing.exit_code == EXIT_USAGE
    assert "no such file" in missing.stderr and "Traceback" not in missing.output
