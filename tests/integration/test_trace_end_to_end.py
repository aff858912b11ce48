"""One trace from an HTTP ingest to the run-summary insight and its projected row (OpenTelemetry).

In this process: the SDK's ``InMemorySpanExporter`` (:func:`core.tracing.configure_tracing`) records the
API's spans (served by uvicorn on a thread) and the projection runner's. The run-summary worker runs as
``backbone processors worker`` in a subprocess with tracing configured by the standard variables
(``OTEL_EXPORTER_OTLP_ENDPOINT``), exporting OTLP/HTTP to a receiver in this test that decodes the
protobuf requests.
"""

from __future__ import annotations

import gzip
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import SecretStr

from backbone.client import Client
from backbone.http.app import ApiSettings, ServerThread, create_app
from core import tracing
from core.settings import PostgresSettings, Settings
from processors.run_summary import insight_id
from projections.agent_runs import InsightsProjection
from projections.runner import ProjectionRunner
from streams.consumer import ConsumedEvent
from streams.replay import read_range
from streams.serde import serde_from_settings

pytestmark = pytest.mark.integration

RUN = "sophia.agent.RunLifecycle"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class _Collected:
    """Spans an OTLP/HTTP receiver got: dicts with name, kind, ids (hex), attributes, links, service."""

    spans: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, _Collected]]:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``, protobuf) on a free port: ``(endpoint, collected)``."""
    collected = _Collected()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = ExportTraceServiceRequest.FromString(body)
            spans = []
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        spans.append({
                            "name": s.name, "kind": s.kind, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "attributes": {a.key: _value(a.value) for a in s.attributes},
                            "links": [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                            "service": resource.get("service.name"),
                        })  # fmt: skip
            with collected.lock:
                collected.spans.extend(spans)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", collected
    server.shutdown()
    server.server_close()


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, exported synchronously to memory; off again afterwards."""
    memory = InMemorySpanExporter()
    assert tracing.configure_tracing("backbone-test", exporter=memory, force=True)
    yield memory
    tracing.reset_tracing()


def _pg_settings(settings: Settings, pg_url: str) -> Settings:
    return settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(pg_url))})


@pytest.fixture
def api(settings: Settings, pg_url: str) -> Iterator[ServerThread]:
    """The HTTP API without token checks, on its own database."""
    api_settings = ApiSettings(auth_required=False, ack_timeout_seconds=5,
                               external_topic=f"external-tracing-{uuid.uuid4().hex[:8]}")  # fmt: skip
    with ServerThread(create_app(_pg_settings(settings, pg_url), api_settings)) as srv:
        yield srv


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def _ctx(span: ReadableSpan) -> tuple[str, str]:
    c = span.get_span_context()
    return _hex(c.trace_id, 32), _hex(c.span_id, 16)


def _parent(span: ReadableSpan) -> str | None:
    return _hex(span.parent.span_id, 16) if span.parent is not None else None


def _records(settings: Settings, topic: str) -> list[ConsumedEvent]:
    out = [
        r
        for r in read_range(settings.kafka, serde_from_settings(settings), topic)
        if isinstance(r, ConsumedEvent)
    ]
    return sorted(out, key=lambda r: (r.partition, r.offset))


def _run_worker(settings: Settings, state_dir: Path, app_id: str, events: str, insights: str, dlq: str,
                endpoint: str) -> None:  # fmt: skip
    """``backbone processors worker`` on the given topics, tracing to ``endpoint``, until idle 3 s."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "BACKBONE_STATE_DIR": str(state_dir),
        "BACKBONE_LOG_FORMAT": "json",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER"):  # fmt: skip
        env.pop(name, None)
    worker = subprocess.run(
        [sys.executable, "-m", "backbone", "processors", "worker", "--app-id", app_id, "--events-topic", events,
         "--insights-topic", insights, "--dlq-topic", dlq, "--web-port", "0", "--stop-after-idle", "3"],
        env=env, cwd=ROOT, check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr[-3000:]


def test_one_trace_from_ingest_to_the_projected_insight(
    settings: Settings,
    pg_url: str,
    api: ServerThread,
    exporter: InMemorySpanExporter,
    otlp_receiver: tuple[str, _Collected],
    create_topic: Callable[..., str],
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """The caller's trace runs through the ingest's server and send spans, the worker's process and send
    spans, the insight's ce_traceparent, and the projection batch span's link; the row is projected."""
    events_topic = create_topic(unique_name("agent-events"), 3)
    insights_topic = create_topic(unique_name("insights"), 3)
    dlq_topic = create_topic(unique_name("dlq"), 1)
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    body = [
        {"run_id": run_id, "phase": "STARTED", "event_time": "2025-03-01T12:00:00Z", "agent": "tracer"},
        {"run_id": run_id, "phase": "FINISHED", "event_time": "2025-03-01T12:05:00Z", "outcome": "RESOLVED"},
    ]

    # 1. HTTP ingest: the server span continues the caller's traceparent; each record's send span is its child
    with httpx.Client(base_url=api.url, timeout=30) as http:
        r = http.post(f"/events/{RUN}", params={"topic": events_topic, "key_field": "run_id"}, json=body,
                      headers={"traceparent": f"00-{trace_id}-{caller_span}-01", "X-Correlation-Id": "corr-1",
                               "X-Request-Id": "req-1"})  # fmt: skip
    assert r.status_code == 202, r.text
    assert r.headers["x-request-id"] == "req-1"
    event_ids = r.json()["ids"]
    # the server span ends once the response is sent, which can be just after the client has read it
    deadline = time.monotonic() + 10
    while (
        not any(s.kind == SpanKind.SERVER for s in exporter.get_finished_spans())
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert server.name == "POST /events/{type}"
    assert _ctx(server)[0] == trace_id and _parent(server) == caller_span and server.parent.is_remote
    assert server.attributes["http.response.status_code"] == 202
    sends = [s for s in spans if s.kind == SpanKind.PRODUCER]
    assert [s.name for s in sends] == [f"send {events_topic}"] * 2
    assert all(_ctx(s)[0] == trace_id and _parent(s) == _ctx(server)[1] for s in sends)
    assert [s.attributes["messaging.message.id"] for s in sends] == event_ids
    assert sends[0].attributes["messaging.system"] == "kafka"
    assert sends[0].attributes["messaging.destination.name"] == events_topic
    assert sends[0].attributes["messaging.operation.type"] == "send"
    assert sends[0].attributes["messaging.kafka.message.key"] == run_id

    records = _records(settings, events_topic)
    assert [rec.attributes.id for rec in records] == event_ids  # one key: one partition, in order
    for rec, send in zip(records, sends, strict=True):
        assert rec.attributes.traceparent == f"00-{trace_id}-{_ctx(send)[1]}-01"
        assert rec.attributes.correlation_id == "corr-1"
    finished_send = _ctx(sends[1])[1]

    # 2. the run-summary worker (a subprocess exporting OTLP): process <events> then send <insights>
    endpoint, collected = otlp_receiver
    app_id = unique_name("processors")
    _run_worker(settings, tmp_path, app_id, events_topic, insights_topic, dlq_topic, endpoint)
    with collected.lock:
        worker_spans = list(collected.spans)
    processes = [s for s in worker_spans if s["name"] == f"process {events_topic}"]
    assert len(processes) == 2, worker_spans
    assert all(s["trace_id"] == trace_id and s["kind"] == 5 for s in processes)  # SPAN_KIND_CONSUMER
    assert {s["parent_span_id"] for s in processes} == {_ctx(s)[1] for s in sends}
    (process,) = [s for s in processes if s["parent_span_id"] == finished_send]
    assert process["attributes"]["messaging.message.id"] == event_ids[1]
    assert process["attributes"]["messaging.operation.type"] == "process"
    assert process["attributes"]["messaging.consumer.group.name"] == app_id
    assert process["attributes"]["messaging.kafka.offset"] == records[1].offset
    assert process["service"] == "backbone-processors"
    (insight_send,) = [s for s in worker_spans if s["name"] == f"send {insights_topic}"]
    assert insight_send["kind"] == 4  # SPAN_KIND_PRODUCER
    assert insight_send["trace_id"] == trace_id and insight_send["parent_span_id"] == process["span_id"]
    assert insight_send["attributes"]["messaging.message.id"] == insight_id(run_id)

    (insight,) = _records(settings, insights_topic)
    assert insight.attributes.traceparent == f"00-{trace_id}-{insight_send['span_id']}-01"
    assert insight.attributes.correlation_id == "corr-1"
    assert insight.attributes.causation_id == event_ids[1]

    # 3. the projection runner: a batch span linked to the insight's context, and the row
    exporter.clear()
    s = _pg_settings(settings, pg_url)
    with ProjectionRunner(s, serde_from_settings(s), InsightsProjection([insights_topic]),
                          group_id=unique_name("insights")) as runner:  # fmt: skip
        stats = runner.run(until_caught_up=True, max_wait_seconds=60)
    assert stats.applied == 1
    (batch,) = [sp for sp in exporter.get_finished_spans() if sp.name == f"process {insights_topic}"]
    assert batch.kind == SpanKind.CONSUMER and batch.parent is None
    assert [(_hex(link.context.trace_id, 32), _hex(link.context.span_id, 16)) for link in batch.links] == [
        (trace_id, insight_send["span_id"])
    ]
    assert batch.attributes["messaging.batch.message_count"] == 1
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT insight_id FROM proj_insights.insights_latest WHERE entity = %s", (f"run:{run_id}",)
        ).fetchone()
    assert row == (insight_id(run_id),)


def test_request_ids_are_bound_in_the_api_logs(api: ServerThread, create_topic: Callable[..., str],
                                               unique_name: Callable[[str], str]) -> None:  # fmt: skip
    """A request's log lines carry its request id (generated when not sent) and correlation id."""
    topic = create_topic(unique_name("ingest"), 1)
    capture = structlog.testing.LogCapture()
    saved = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture],
                        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))  # fmt: skip
    try:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            r = http.post(f"/events/{RUN}", params={"topic": topic}, headers={"X-Correlation-Id": "corr-7"},
                          json={"run_id": "r", "phase": "STARTED", "event_time": "2025-03-01T12:00:00Z"})  # fmt: skip
    finally:
        structlog.configure(**saved)
    logs = capture.entries
    assert r.status_code == 202, r.text
    request_id = r.headers["x-request-id"]
    assert len(request_id) == 32
    accepted = [e for e in logs if e["event"] == "ingest.accepted"]
    assert accepted and accepted[0]["request_id"] == request_id and accepted[0]["correlation_id"] == "corr-7"


def test_tracing_off_passes_the_traceparent_through_and_makes_no_span(
    settings: Settings, api: ServerThread, create_topic: Callable[..., str], unique_name: Callable[[str], str]
) -> None:
    """With tracing off the ingest writes the caller's traceparent as it is, the client writes the current
    span's (a program's own provider), and the EventProducer starts no span of its own."""
    assert not tracing.is_enabled()
    topic = create_topic(unique_name("off"), 1)
    caller = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    with httpx.Client(base_url=api.url, timeout=30) as http:
        r = http.post(f"/events/{RUN}", params={"topic": topic}, headers={"traceparent": caller},
                      json={"run_id": "r", "phase": "STARTED", "event_time": "2025-03-01T12:00:00Z"})  # fmt: skip
    assert r.status_code == 202, r.text
    assert r.headers["x-request-id"]

    own = InMemorySpanExporter()  # a program tracing with its own provider, not through core.tracing
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(own))
    client = Client(settings)
    try:
        with provider.get_tracer("program").start_as_current_span("program-work") as span:
            ctx = span.get_span_context()
            client.produce(
                topic, RUN, [{"run_id": "r", "phase": "FINISHED", "event_time": "2025-03-01T12:01:00Z"}]
            )
        explicit = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        client.produce(topic, RUN, [{"run_id": "q", "phase": "STARTED", "event_time": "2025-03-01T12:02:00Z"}],
                       traceparent=explicit)  # fmt: skip
        client.produce(
            topic, RUN, [{"run_id": "s", "phase": "STARTED", "event_time": "2025-03-01T12:03:00Z"}]
        )
    finally:
        client.close()
    records = _records(settings, topic)
    assert [rec.attributes.traceparent for rec in records] == [
        caller,
        f"00-{_hex(ctx.trace_id, 32)}-{_hex(ctx.span_id, 16)}-{_hex(ctx.trace_flags, 2)}",
        explicit,
        None,
    ]
    assert [sp.name for sp in own.get_finished_spans()] == ["program-work"]  # no send span was made
    assert trace.get_current_span().get_span_context().is_valid is False
