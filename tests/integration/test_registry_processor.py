"""One serde factory from settings: with a Confluent-compatible Schema Registry configured, the HTTP API
writes with the ids that registry assigns, and a Faust processor (a separate process, configured only by
the environment) reads them. Before the factory, the processors built an embedded registry of their own,
whose pinned ids differ from the server's, and could not decode what the API wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from backbone.http.app import ApiSettings, ServerThread, create_app
from core.settings import PostgresSettings, SchemaRegistrySettings, Settings
from processors.run_summary import wait_for_run_summaries
from streams.serde import serde_from_settings
from tests.fakes.schema_registry import FakeSchemaRegistry

pytestmark = pytest.mark.integration

RUN = "registry-run"
STARTED = {"run_id": RUN, "phase": "STARTED", "event_time": "2025-11-19T01:00:00Z", "agent": "mini-swe-agent"}
TOOL = {"run_id": RUN, "step": 1, "event_time": "2025-11-19T01:00:05Z", "tool": "bash", "command": "ls",
        "return_code": 0, "output_bytes": 3, "timed_out": False}  # fmt: skip
FINISHED = {"run_id": RUN, "phase": "FINISHED", "event_time": "2025-11-19T01:01:00Z", "agent": "mini-swe-agent",
            "outcome": "RESOLVED"}  # fmt: skip


def test_processor_reads_what_the_api_wrote_through_the_http_registry(
    settings: Settings, pg_url: str, create_topic, unique_name, tmp_path: Path
) -> None:
    # six partitions: the API keys agent events by run id on any topic (before, on a topic outside the catalogue,
    # each by its random event id, and a run's events spread over partitions: 3 of 9 runs failed)
    events = create_topic(unique_name("registry-events"), 6)
    insights = create_topic(unique_name("registry-insights"), 3)
    dlq = create_topic(unique_name("registry-dlq"), 1)
    with FakeSchemaRegistry() as sr:
        # a registry other teams already use: its ids are not the ones pinned in schemas/registry.json
        other = '{"type": "record", "name": "Other", "fields": [{"name": "x", "type": "int"}]}'
        httpx.post(f"{sr.url}/subjects/other-team-value/versions", json={"schema": other}).raise_for_status()
        configured = settings.model_copy(
            update={
                "schema_registry": SchemaRegistrySettings(url=sr.url),
                "postgres": PostgresSettings(url=SecretStr(pg_url)),
            }
        )
        serde = serde_from_settings(configured)
        pinned = serde_from_settings(SchemaRegistrySettings())  # the embedded registry's pinned ids
        server_ids = {n: sr.subjects[n][-1] for n in ("sophia.agent.RunLifecycle", "sophia.agent.ToolCall")}
        pinned_ids = {n: pinned.registry.id_for(n) for n in server_ids}
        # otherwise this test could not tell the registries apart
        assert all(server_ids[n] != pinned_ids[n] for n in server_ids)
        with (
            ServerThread(create_app(configured, ApiSettings(auth_required=False))) as api,
            httpx.Client(base_url=api.url, timeout=30) as http,
        ):
            for type_, body in (("sophia.agent.RunLifecycle", STARTED), ("sophia.agent.ToolCall", TOOL),
                                ("sophia.agent.RunLifecycle", FINISHED)):  # fmt: skip
                r = http.post(f"/events/{type_}", params={"topic": events}, json=body)
                assert r.status_code == 202, r.text
        env = {
            **os.environ,
            "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
            "BACKBONE_SCHEMA_REGISTRY__URL": sr.url,
            "BACKBONE_STATE_DIR": str(tmp_path),
        }
        worker = subprocess.run(
            [sys.executable, "-m", "backbone", "processors", "worker", "--app-id", unique_name("registry-proc"),
             "--events-topic", events, "--insights-topic", insights, "--dlq-topic", dlq, "--web-port", "0",
             "--stop-after-idle", "3", "--json"],
            env=env, capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip
        assert worker.returncode == 0, worker.stderr[-3000:]
        assert '"dead_letters_count": 0' in worker.stdout, worker.stdout
        found = wait_for_run_summaries(configured, [RUN], topic=insights, timeout_seconds=20, serde=serde)
        summary = found[RUN]
        assert summary.data["labels"]["outcome"] == "RESOLVED"
        assert summary.data["metrics"]["tool_calls_count"] == 1.0, (
            worker.stdout[-2000:] + worker.stderr[-6000:]
        )
