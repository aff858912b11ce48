"""The Kafka Connect client and `backbone connectors` CLI over HTTP against the fake Connect worker.

The fake (tests/fakes/kafka_connect.py) follows the documented Connect REST API and serves it with
uvicorn on a free 127.0.0.1 port, so these tests exercise real HTTP, httpx and retries.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backbone.cli.connectors import EXIT_CONNECT_ERROR, EXIT_FINDINGS, EXIT_UNREACHABLE, app
from connectors.kafka_connect import (
    ConnectorConfigInvalidError,
    ConnectorNotFoundError,
    KafkaConnectClient,
    KafkaConnectHTTPError,
    KafkaConnectUnavailableError,
    PlanAction,
    RetryPolicy,
)
from connectors.lint import ConnectorSpec, lint_spec, load_specs
from tests.fakes.kafka_connect import POSTGRES_CONNECTOR_CLASS, FakeKafkaConnect

pytestmark = pytest.mark.integration

NAME = "platform-postgres"


@pytest.fixture
def fake() -> Iterator[FakeKafkaConnect]:
    with FakeKafkaConnect() as server:
        yield server


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(fake: FakeKafkaConnect, sleeps: list[float]) -> Iterator[KafkaConnectClient]:
    policy = RetryPolicy(max_attempts=4, initial_backoff_seconds=0.01, max_backoff_seconds=0.04)
    with KafkaConnectClient(fake.url, retry=policy, sleep=sleeps.append, timeout_seconds=5) as c:
        yield c


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_lint_plan_apply_status_pause_resume_restart_delete(
    fake: FakeKafkaConnect, client: KafkaConnectClient
) -> None:
    """The shipped spec goes through lint, plan (create), apply, status, pause, resume, restart and delete."""
    specs = load_specs()
    assert all(lint_spec(s) == [] for s in specs)
    [diff] = client.plan(specs)
    assert diff.action is PlanAction.CREATE and "topic.prefix" in diff.changed_keys
    [outcome] = client.apply(specs)
    assert outcome.done == "created"
    assert client.list_connectors() == [NAME]
    assert client.get_config(NAME) == specs[0].config
    status = client.get_status(NAME)
    assert status.healthy and status.type == "source" and [t.state for t in status.tasks] == ["RUNNING"]

    client.pause(NAME)
    assert client.get_status(NAME).state == "PAUSED"
    client.resume(NAME)
    assert client.get_status(NAME).state == "RUNNING"

    fake.fail_task(NAME, 0)
    failed = client.get_status(NAME)
    assert not failed.healthy and failed.tasks[0].trace
    restarting = client.restart(NAME, include_tasks=True, only_failed=True)
    assert restarting is not None and restarting.tasks[0].state == "RESTARTING"
    assert client.get_status(NAME).healthy
    assert client.restart(NAME, include_tasks=False, only_failed=False) is None  # 204, connector only

    client.delete(NAME)
    assert client.list_connectors() == []
    with pytest.raises(ConnectorNotFoundError) as info:
        client.get_config(NAME)
    assert info.value.status_code == 404 and info.value.connect_message == f"Connector {NAME} not found"


def test_apply_is_idempotent_and_updates_only_changed_keys(
    fake: FakeKafkaConnect, client: KafkaConnectClient
) -> None:
    """A second apply sends no PUT; a changed spec plans an update of exactly the changed key."""
    specs = load_specs()
    client.apply(specs)
    puts_before = [r for r in fake.requests if r[0] == "PUT"]
    [again] = client.apply(specs)
    assert again.done == "unchanged"
    assert [r for r in fake.requests if r[0] == "PUT"] == puts_before
    changed = ConnectorSpec(name=NAME, config={**specs[0].config, "heartbeat.interval.ms": "5000"})
    [diff] = client.plan([changed])
    assert diff.action is PlanAction.UPDATE and diff.changed_keys == ("heartbeat.interval.ms",)
    [outcome] = client.apply([changed])
    assert outcome.done == "updated"
    assert client.get_config(NAME)["heartbeat.interval.ms"] == "5000"


def test_delete_candidates_are_kept_unless_asked(fake: FakeKafkaConnect, client: KafkaConnectClient) -> None:
    """A live connector in no spec is a delete candidate, kept by default and deleted with delete_missing."""
    client.put_config("h3-orphan", {"connector.class": POSTGRES_CONNECTOR_CLASS, "topic.prefix": "h3"})
    outcomes = {o.name: o.done for o in client.apply(load_specs())}
    assert outcomes == {NAME: "created", "h3-orphan": "kept"}
    outcomes = {o.name: o.done for o in client.apply(load_specs(), delete_missing=True)}
    assert outcomes == {NAME: "unchanged", "h3-orphan": "deleted"}
    assert client.list_connectors() == [NAME]


@pytest.mark.parametrize("status", [409, 503])
def test_retries_on_rebalance_and_unavailable(
    fake: FakeKafkaConnect, client: KafkaConnectClient, sleeps: list[float], status: int
) -> None:
    """Three injected 409s or 503s are retried with growing, capped backoff and the call then succeeds."""
    fake.inject(status, 3)
    assert client.list_connectors() == []
    assert sleeps == [0.01, 0.02, 0.04]
    assert fake.requests.count(("GET", "/connectors")) == 4


def test_retries_are_bounded(fake: FakeKafkaConnect, client: KafkaConnectClient) -> None:
    """When every attempt gets 409 the client gives up after max_attempts with Connect's message."""
    fake.inject(409, 10)
    with pytest.raises(KafkaConnectHTTPError) as info:
        client.list_connectors()
    assert info.value.status_code == 409 and "rebalance" in info.value.connect_message
    assert fake.requests.count(("GET", "/connectors")) == 4


def test_client_errors_are_not_retried(
    fake: FakeKafkaConnect, client: KafkaConnectClient, sleeps: list[float]
) -> None:
    """A 400 (name mismatch) is raised at once with Connect's error body."""
    with pytest.raises(KafkaConnectHTTPError) as info:
        client.put_config("h3-a", {"connector.class": POSTGRES_CONNECTOR_CLASS, "name": "h3-b"})
    assert info.value.status_code == 400 and info.value.error_code == 400
    assert "doesn't match connector name in the URL" in info.value.connect_message
    assert sleeps == []


def test_validation_errors_stop_apply_of_that_connector(
    fake: FakeKafkaConnect, client: KafkaConnectClient
) -> None:
    """A spec Connect's validate endpoint rejects is reported key by key and not applied."""
    spec = ConnectorSpec(
        name="h3-invalid", config={"connector.class": POSTGRES_CONNECTOR_CLASS, "name": "h3-invalid"}
    )
    [outcome] = client.apply([spec])
    assert outcome.done == "invalid"
    assert {e.key for e in outcome.errors} == {
        "topic.prefix",
        "database.hostname",
        "database.user",
        "database.dbname",
    }
    assert "h3-invalid" not in fake.connectors
    with pytest.raises(ConnectorConfigInvalidError, match="4 errors"):
        client.validate_spec(spec)
    with pytest.raises(KafkaConnectHTTPError, match="Failed to find any class"):
        client.validate({"connector.class": "com.example.NoSuchConnector"})


def test_unreachable_server_names_the_url(sleeps: list[float]) -> None:
    """With nothing listening, the client retries then raises an error naming the Connect URL."""
    url = f"http://127.0.0.1:{_free_port()}"
    policy = RetryPolicy(max_attempts=3, initial_backoff_seconds=0.01)
    with (
        KafkaConnectClient(url, retry=policy, sleep=sleeps.append) as c,
        pytest.raises(KafkaConnectUnavailableError) as info,
    ):
        c.list_connectors()
    assert url in str(info.value) and "after 3 attempts" in str(info.value)
    assert len(sleeps) == 2


def test_cli_plan_apply_status_and_errors(fake: FakeKafkaConnect, tmp_path: Path) -> None:
    """The CLI plans, applies, shows status as JSON, operates, and fails cleanly with exit codes."""
    runner = CliRunner()
    env = {"BACKBONE_CONNECT_URL": fake.url}
    plan = runner.invoke(app, ["plan", "--json"], env=env)
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)[0]["action"] == "create"
    assert runner.invoke(app, ["plan", "--detailed-exitcode"], env=env).exit_code == EXIT_FINDINGS
    applied = runner.invoke(app, ["apply", "--json"], env=env)
    assert applied.exit_code == 0, applied.output
    assert json.loads(applied.stdout)[0]["done"] == "created"
    assert runner.invoke(app, ["plan", "--detailed-exitcode"], env=env).exit_code == 0
    status = runner.invoke(app, ["status", NAME, "--json"], env=env)
    assert json.loads(status.stdout)[0]["state"] == "RUNNING"
    for command in (["pause", NAME], ["resume", NAME], ["restart", NAME], ["status"]):
        result = runner.invoke(app, command, env=env)
        assert result.exit_code == 0, (command, result.output)
    missing = runner.invoke(app, ["pause", "h3-missing"], env=env)
    assert missing.exit_code == EXIT_CONNECT_ERROR
    assert "Connector h3-missing not found" in missing.stderr and "Traceback" not in missing.output
    assert runner.invoke(app, ["delete", NAME, "--yes"], env=env).exit_code == 0
    assert fake.connectors == {}

    bad = tmp_path / "h3-bad.yaml"
    bad.write_text("name: h3-bad\nconfig:\n  connector.class: x\n  database.password: hunter2\n")
    refused = runner.invoke(app, ["apply", str(bad)], env=env)
    assert refused.exit_code == EXIT_FINDINGS and "nothing applied" in refused.stderr
    assert fake.connectors == {}

    down = runner.invoke(app, ["status", "--connect-url", f"http://127.0.0.1:{_free_port()}"])
    assert down.exit_code == EXIT_UNREACHABLE
    assert "unreachable" in down.stderr and "Traceback" not in down.output
