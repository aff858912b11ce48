"""Tracing with OpenTelemetry: off unless configured; W3C trace context carried in the events.

One trace runs from a source event to what it causes: the ``traceparent`` (W3C Trace Context) of an
event travels in its CloudEvents header ``ce_traceparent``; each process continues it with a span of
its own and writes its span's context on what it produces. Spans follow the OpenTelemetry messaging
conventions for Kafka:

* ``send <topic>`` (kind PRODUCER), one per record produced; its context is the record's
  ``ce_traceparent``. Its parent is the current span when there is one (the HTTP request, the
  processing of the causing event), else the event's own ``traceparent``.
* ``process <topic>`` (kind CONSUMER), one per record a processor handles, child of the record's
  ``ce_traceparent``; what the processor sends inside it are its children.
* ``process <topic>`` (kind CONSUMER) for a batch (the projection runner): a root span with a link to
  the context of each record in the batch (at most :data:`MAX_LINKS` distinct ones).
* an HTTP server span per request of the API (its parent: the request's ``traceparent`` header).

Attributes: ``messaging.system="kafka"``, ``messaging.destination.name``, ``messaging.operation.type``
(``send``/``process``), ``messaging.operation.name``, ``messaging.message.id`` (the CloudEvents id),
``messaging.kafka.message.key``, ``messaging.destination.partition.id``, ``messaging.kafka.offset``,
``messaging.consumer.group.name``, ``messaging.batch.message_count``.

**Off by default, and then free.** :func:`configure_tracing` turns tracing on only when the standard
variables ask for an exporter (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
set, or ``OTEL_TRACES_EXPORTER=otlp|console``); otherwise nothing is imported from the SDK and every
helper here is a no-op that callers skip after one check of :func:`is_enabled`. The OTLP exporter is
OTLP/HTTP (protobuf) and reads its own ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers, timeout,
compression); the sampler reads ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``, the batch processor
``OTEL_BSP_*``, the resource ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``.

This module is on the ground floor: it imports nothing of the backbone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "MAX_LINKS",
    "TRACEPARENT_HEADER",
    "batch_process_span",
    "configure_tracing",
    "continued",
    "current_traceparent",
    "end_send",
    "is_enabled",
    "normalise_traceparent",
    "process_span",
    "reset_tracing",
    "send_span",
    "server_span",
    "start_send",
    "trace_id_of",
    "traceparent_of",
]

TRACEPARENT_HEADER = "ce_traceparent"
"""The Kafka header of an event's W3C ``traceparent`` (CloudEvents Kafka binding of the extension)."""

MAX_LINKS = 128
"""Most span links on a batch span (the SDK's default ``OTEL_SPAN_LINK_COUNT_LIMIT``)."""

_PROPAGATOR = TraceContextTextMapPropagator()
_INSTRUMENTATION = "sophia-backbone"
_NULL: AbstractContextManager[None] = nullcontext()


class _State:
    """What :func:`configure_tracing` set up (one per process)."""

    enabled = False
    tracer: Tracer | None = None
    provider: Any = None


_state = _State()


def is_enabled() -> bool:
    """True once :func:`configure_tracing` has turned tracing on in this process."""
    return _state.enabled


def configure_tracing(
    service_name: str,
    *,
    exporter: Any = None,
    environ: Mapping[str, str] | None = None,
    force: bool = False,
) -> bool:
    """Turn tracing on when the ``OTEL_*`` variables ask for it; return whether it is on.

    On when ``exporter`` is given (tests: the SDK's ``InMemorySpanExporter``, exported synchronously),
    or when ``OTEL_TRACES_EXPORTER`` names ``otlp`` or ``console``, or when it is unset and
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set. Off (nothing
    configured, nothing imported from the SDK) otherwise, and always with ``OTEL_SDK_DISABLED=true`` or
    ``OTEL_TRACES_EXPORTER=none``. A second call is a no-op unless ``force`` (which replaces the
    provider, shutting the old one down).

    The provider is also made the global one (``opentelemetry.trace.set_tracer_provider``) the first
    time, so a program's own spans join the same traces.

    Args:
        service_name: ``service.name`` of the resource, e.g. ``backbone-api``; ``OTEL_SERVICE_NAME``
            wins when set.
        exporter: a ``SpanExporter`` to use instead of what the variables say.
        environ: the variables (default ``os.environ``).
        force: configure again.

    Raises:
        ValueError: ``OTEL_TRACES_EXPORTER`` names an exporter other than ``otlp``, ``console`` or
            ``none``, or ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` is not ``http/protobuf`` (the only
            OTLP transport installed).
    """
    if _state.enabled and not force:
        return True
    env = os.environ if environ is None else environ
    exporters: list[Any] = []
    if exporter is None:
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return False
        names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not names:
            names = ["otlp"] if endpoint else []
        if not names or names == ["none"]:
            return False
        unknown = [n for n in names if n not in ("otlp", "console", "none")]
        if unknown:
            raise ValueError(f"OTEL_TRACES_EXPORTER={unknown[0]!r} is not supported: otlp, console or none")
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
        )
        if "otlp" in names and protocol.strip() not in ("", "http/protobuf"):
            raise ValueError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: only http/protobuf is installed"
            )
        for name in names:
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporters.append(OTLPSpanExporter())
            elif name == "console":
                from opentelemetry.sdk.trace.export import ConsoleSpanExporter

                exporters.append(ConsoleSpanExporter())
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    for e in exporters:
        provider.add_span_processor(BatchSpanProcessor(e))
    if _state.provider is not None:
        _state.provider.shutdown()
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    _state.provider = provider
    _state.tracer = provider.get_tracer(_INSTRUMENTATION)
    _state.enabled = True
    return True


def reset_tracing() -> None:
    """Turn tracing off again: flush and shut down the provider :func:`configure_tracing` made (tests)."""
    provider, _state.provider = _state.provider, None
    _state.enabled = False
    _state.tracer = None
    if provider is not None:
        provider.shutdown()


# -- trace context -------------------------------------------------------------------------------------


def _context_of(traceparent: str | None) -> otel_context.Context | None:
    if not traceparent:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": traceparent})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def _inject(span: Span) -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent")


def normalise_traceparent(value: str | None) -> str | None:
    """``value`` if it is a valid W3C ``traceparent`` (as the propagator writes it back), else ``None``
    (per the W3C spec an invalid header is ignored, not refused)."""
    ctx = _context_of(value.strip() if value else None)
    return None if ctx is None else _inject(trace.get_current_span(ctx))


def current_traceparent() -> str | None:
    """The ``traceparent`` of the current span (ours or a program's own), ``None`` when there is none.

    Works with tracing off too: a program that traces with its own provider gets its trace carried.
    """
    span = trace.get_current_span()
    return _inject(span) if span.get_span_context().is_valid else None


def trace_id_of(traceparent: str | None) -> str | None:
    """The 32 hex digits of the trace id of a valid ``traceparent``, else ``None``."""
    ctx = _context_of(traceparent)
    return None if ctx is None else format(trace.get_current_span(ctx).get_span_context().trace_id, "032x")


def traceparent_of(headers: Sequence[tuple[str, Any]] | None) -> str | None:
    """The ``ce_traceparent`` header's value (text) among Kafka ``headers``, ``None`` when absent."""
    for name, value in headers or ():
        if name == TRACEPARENT_HEADER and value is not None:
            return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
    return None


def _header(headers: Sequence[tuple[str, Any]] | None, wanted: str) -> str | None:
    for name, value in headers or ():
        if name == wanted and value is not None:
            return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
    return None


def continued(traceparent: str | None) -> AbstractContextManager[Any]:
    """Make ``traceparent`` the current (remote) parent while the block runs, so the spans started in it
    (``send`` spans included) are its children; a no-op for ``None``, an invalid value or tracing off."""
    if not _state.enabled:
        return _NULL
    ctx = _context_of(traceparent)
    return _NULL if ctx is None else _attached(ctx)


@contextmanager
def _attached(ctx: otel_context.Context) -> Iterator[None]:
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def _messaging(
    topic: str | None,
    operation: str,
    *,
    message_id: str | None = None,
    key: str | bytes | None = None,
    partition: int | None = None,
    offset: int | None = None,
    group: str | None = None,
) -> dict[str, Any]:
    a: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
    }
    if topic is not None:
        a["messaging.destination.name"] = topic
    if message_id is not None:
        a["messaging.message.id"] = message_id
    if key is not None:
        a["messaging.kafka.message.key"] = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    if partition is not None and partition >= 0:
        a["messaging.destination.partition.id"] = str(partition)
    if offset is not None and offset >= 0:
        a["messaging.kafka.offset"] = offset
    if group is not None:
        a["messaging.consumer.group.name"] = group
    return a


# -- spans ---------------------------------------------------------------------------------------------


def start_send(
    topic: str,
    *,
    message_id: str | None = None,
    key: str | bytes | None = None,
    partition: int | None = None,
    traceparent: str | None = None,
) -> tuple[Span, str | None]:
    """Start a ``send <topic>`` span (PRODUCER) for one record; end it with :func:`end_send`.

    Its parent is the current span when there is one, else ``traceparent`` (the event's own), else it
    starts a trace.

    Returns:
        ``(span, traceparent)``: the span and the ``traceparent`` to write on the record (its context).

    Raises:
        RuntimeError: tracing is off (check :func:`is_enabled` first).
    """
    tracer = _state.tracer
    if tracer is None:
        raise RuntimeError("tracing is off: check core.tracing.is_enabled() first")
    parent = None if trace.get_current_span().get_span_context().is_valid else _context_of(traceparent)
    span = tracer.start_span(
        f"send {topic}",
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes=_messaging(topic, "send", message_id=message_id, key=key, partition=partition),
    )
    return span, _inject(span)


def end_send(span: Span, error: BaseException | str | None = None) -> None:
    """End a span of :func:`start_send`; an ``error`` (the record was not acknowledged) marks it failed."""
    if error is not None:
        if isinstance(error, BaseException):
            span.record_exception(error)
            span.set_attribute("error.type", type(error).__name__)
        span.set_status(Status(StatusCode.ERROR, str(error)))
    span.end()


@contextmanager
def send_span(
    topic: str,
    *,
    message_id: str | None = None,
    key: str | bytes | None = None,
    partition: int | None = None,
    traceparent: str | None = None,
) -> Iterator[str | None]:
    """:func:`start_send` as a block that yields the ``traceparent`` to write; the span ends with the
    block, failed if the block raises (the exception propagates).

    Raises:
        RuntimeError: tracing is off (check :func:`is_enabled` first).
    """
    span, tp = start_send(topic, message_id=message_id, key=key, partition=partition, traceparent=traceparent)
    try:
        yield tp
    except BaseException as exc:
        end_send(span, exc)
        raise
    end_send(span)


def process_span(
    topic: str,
    headers: Sequence[tuple[str, Any]] | None,
    *,
    key: str | bytes | None = None,
    partition: int | None = None,
    offset: int | None = None,
    group: str | None = None,
) -> AbstractContextManager[Span | None]:
    """A ``process <topic>`` span (CONSUMER) around the handling of one record, made current so what
    the handler sends is its child; its parent is the record's ``ce_traceparent`` (a new trace when it
    has none). An exception leaving the block is recorded on the span and propagates. A no-op yielding
    ``None`` when tracing is off.

    Args:
        topic: the record's topic.
        headers: the record's Kafka headers (``ce_traceparent`` and ``ce_id`` are read from them).
        key: the record key.
        partition: the record's partition.
        offset: the record's offset.
        group: the consumer group (a Faust app id).
    """
    tracer = _state.tracer
    if tracer is None:
        return _NULL
    return tracer.start_as_current_span(
        f"process {topic}",
        context=_context_of(traceparent_of(headers)) or otel_context.Context(),
        kind=SpanKind.CONSUMER,
        attributes=_messaging(
            topic,
            "process",
            message_id=_header(headers, "ce_id"),
            key=key,
            partition=partition,
            offset=offset,
            group=group,
        ),
    )


def batch_process_span(
    topics: Sequence[str],
    traceparents: Iterable[str | None],
    *,
    count: int,
    group: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> AbstractContextManager[Span | None]:
    """A ``process <topic>`` span (CONSUMER) around a batch: a new trace, linked to the context of each
    record that has one (at most :data:`MAX_LINKS` distinct ones, in the batch's order), per the
    messaging conventions for batch processing. Named ``process`` alone for a batch of several
    topics. A no-op yielding ``None`` when tracing is off.

    Args:
        topics: the batch's topics.
        traceparents: each record's ``ce_traceparent`` (``None`` where it has none); read lazily, and
            no further than :data:`MAX_LINKS` distinct values.
        count: records in the batch (``messaging.batch.message_count``).
        group: the consumer group.
        attributes: more span attributes.
    """
    tracer = _state.tracer
    if tracer is None:
        return _NULL
    seen: set[str] = set()
    links: list[Link] = []
    for tp in traceparents:
        if tp is None or tp in seen:
            continue
        seen.add(tp)
        ctx = _context_of(tp)
        if ctx is not None:
            links.append(Link(trace.get_current_span(ctx).get_span_context()))
            if len(links) >= MAX_LINKS:
                break
    topic = topics[0] if len(topics) == 1 else None
    a = _messaging(topic, "process", group=group)
    a["messaging.batch.message_count"] = count
    if attributes:
        a.update(attributes)
    return tracer.start_as_current_span(
        f"process {topic}" if topic else "process",
        context=otel_context.Context(),
        kind=SpanKind.CONSUMER,
        links=links,
        attributes=a,
    )


def server_span(
    name: str, traceparent: str | None, attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[Span | None]:
    """An HTTP server span (SERVER) made current, child of the request's ``traceparent`` header (a new
    trace without one). A no-op yielding ``None`` when tracing is off.

    Args:
        name: the span name, ``<method> <route>`` (rename it once the route is known).
        traceparent: the request's ``traceparent`` header.
        attributes: e.g. ``http.request.method``, ``url.path``.
    """
    tracer = _state.tracer
    if tracer is None:
        return _NULL
    return tracer.start_as_current_span(
        name,
        context=_context_of(traceparent) or otel_context.Context(),
        kind=SpanKind.SERVER,
        attributes=dict(attributes or {}),
    )
