"""core.tracing: when tracing turns on, and that it costs nothing and sets nothing while off."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from core import tracing
from processors.run_summary import apply
from streams.envelope import Event

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(autouse=True)
def _off() -> Iterator[None]:
    tracing.reset_tracing()
    yield
    tracing.reset_tracing()


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_tracing_stays_off_unless_an_exporter_is_asked_for(environ: dict[str, str]) -> None:
    """No endpoint and no exporter named (or the SDK disabled): off, and nothing is configured."""
    assert tracing.configure_tracing("backbone-test", environ=environ) is False
    assert not tracing.is_enabled()
    assert tracing._state.tracer is None and tracing._state.provider is None


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
    ],
)
def test_an_otlp_endpoint_or_exporter_turns_tracing_on(environ: dict[str, str]) -> None:
    """An OTLP endpoint, or OTEL_TRACES_EXPORTER=otlp, configures an OTLP/HTTP exporter."""
    assert tracing.configure_tracing("backbone-test", environ=environ) is True
    assert tracing.is_enabled()
    processors = tracing._state.provider._active_span_processor._span_processors
    assert [type(p._batch_processor._exporter).__name__ for p in processors] == ["OTLPSpanExporter"]
    assert tracing._state.provider.resource.attributes["service.name"] == "backbone-test"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "'zipkin' is not supported"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "http/protobuf",
        ),
    ],
)
def test_unsupported_exporters_are_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tracing.configure_tracing("backbone-test", environ=environ)
    assert not tracing.is_enabled()


def test_helpers_are_no_ops_while_off() -> None:
    """Off: the span helpers give a shared null context, a send span is refused, nothing is attached."""
    with tracing.process_span("t", [("ce_traceparent", TP.encode())]) as span:
        assert span is None
        assert tracing.current_traceparent() is None
    with tracing.batch_process_span(["t"], [TP], count=1) as span, tracing.server_span("GET", TP) as span2:
        assert span is None and span2 is None
    with tracing.continued(TP):
        assert tracing.current_traceparent() is None
    with pytest.raises(RuntimeError):
        tracing.start_send("t")


def test_traceparent_parsing() -> None:
    assert tracing.normalise_traceparent(TP) == TP
    assert tracing.normalise_traceparent(f" {TP} ") == TP
    for bad in (None, "", "00-xyz", "00-00000000000000000000000000000000-b7ad6b7169203331-01"):
        assert tracing.normalise_traceparent(bad) is None
    assert tracing.trace_id_of(TP) == "0af7651916cd43dd8448eb211c80319c"
    assert tracing.traceparent_of([("ce_id", b"1"), ("ce_traceparent", TP.encode())]) == TP
    assert tracing.traceparent_of(None) is None


def test_spans_continue_the_traceparent_when_on() -> None:
    """process <topic> is a child of the record's context; a send inside it is its child and yields its own
    context; a batch span is a root linked to the records' contexts."""
    memory = InMemorySpanExporter()
    tracing.configure_tracing("backbone-test", exporter=memory)
    headers = [("ce_id", b"e-1"), ("ce_traceparent", TP.encode())]
    with tracing.process_span("in", headers, key=b"k", partition=2, offset=7, group="g"):
        with tracing.send_span("out", message_id="i-1", key="k2", traceparent=None) as written:
            pass
    with tracing.batch_process_span(["out"], [written, written, None, "junk"], count=4, group="p"):
        pass
    process, send, batch = sorted(memory.get_finished_spans(), key=lambda s: s.start_time)
    assert (process.name, process.kind) == ("process in", SpanKind.CONSUMER)
    assert format(process.context.trace_id, "032x") == tracing.trace_id_of(TP)
    assert format(process.parent.span_id, "016x") == TP.split("-")[2]
    assert dict(process.attributes) == {
        "messaging.system": "kafka", "messaging.operation.type": "process", "messaging.operation.name": "process",
        "messaging.destination.name": "in", "messaging.message.id": "e-1", "messaging.kafka.message.key": "k",
        "messaging.destination.partition.id": "2", "messaging.kafka.offset": 7, "messaging.consumer.group.name": "g",
    }  # fmt: skip
    assert (send.name, send.kind, send.parent.span_id) == (
        "send out",
        SpanKind.PRODUCER,
        process.context.span_id,
    )
    assert written == f"00-{tracing.trace_id_of(TP)}-{format(send.context.span_id, '016x')}-01"
    assert batch.parent is None and batch.context.trace_id != process.context.trace_id
    assert [link.context.span_id for link in batch.links] == [send.context.span_id]
    assert batch.attributes["messaging.batch.message_count"] == 4


def test_the_run_summary_insight_carries_the_finished_events_traceparent() -> None:
    """The insight caused by a FINISHED event is in its trace (with tracing off, the value as it is)."""
    t = datetime(2025, 3, 1, 12, tzinfo=UTC)
    finished = Event.create("sophia.agent.RunLifecycle", "r1", {"run_id": "r1", "phase": "FINISHED",
                            "event_time": t, "outcome": "RESOLVED"}, source="/t", time=t, traceparent=TP)  # fmt: skip
    _, insight = apply(None, finished)
    assert insight is not None and insight.attributes.traceparent == TP
    assert insight.with_traceparent(None).attributes.traceparent is None
    assert insight.with_traceparent(TP) is insight


def test_the_worker_shell_continues_a_records_trace_and_stamps_what_it_emits() -> None:
    """``processors.shell.tracing_process`` (every processor's agent loop) continues the record's
    ``ce_traceparent``; ``traced_headers`` gives what the handling emits (a healing decision, an incident,
    a correlation link) the processing span's context. Off: nothing changes, no span."""
    from types import SimpleNamespace

    from processors.shell import traced_headers, tracing_process

    message = SimpleNamespace(topic="agent.events", partition=0, offset=3, key=b"run-1",
                              headers=[("ce_id", b"e-9"), ("ce_traceparent", TP.encode())])  # fmt: skip
    out = [("ce_id", b"d-1"), ("ce_traceparent", b"00-11111111111111111111111111111111-2222222222222222-01")]
    with tracing_process(message, "g"):
        assert traced_headers(out) is out  # off: untouched
    memory = InMemorySpanExporter()
    tracing.configure_tracing("backbone-test", exporter=memory)
    with tracing_process(message, "backbone-healing"):
        stamped = dict(traced_headers(out))
    [span] = memory.get_finished_spans()
    assert span.name == "process agent.events" and tracing.trace_id_of(TP) == format(
        span.context.trace_id, "032x"
    )
    assert stamped["ce_id"] == b"d-1"
    assert (
        stamped["ce_traceparent"].decode()
        == f"00-{tracing.trace_id_of(TP)}-{format(span.context.span_id, '016x')}-01"
    )
    assert traced_headers(out) is out  # no span current: untouched
