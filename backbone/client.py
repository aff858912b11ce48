"""The public client: what a user's program imports to use the backbone (the CLI is built on it).

Connect from settings (or a running ``backbone dev up``), produce typed events (validated against their Avro
schema, acknowledged by the broker), subscribe to topics (an iterator, or an async iterator) from the
beginning, the latest offset or an event time, replay a bounded range, read configuration (current, at a
time, history) and roll it back, query a projection, and audit an entity::

    from backbone.client import Client

    with Client.connect() as bb:
        ids = bb.produce("agent.events", "sophia.agent.ToolCall",
                         [{"run_id": "r1", "step": 1, "event_time": "2025-11-19T01:00:00Z",
                           "command": "pytest -x", "return_code": 1}])
        for record in bb.replay("agent.events", start=0):
            print(record.offset, record.data)

Errors: every failure is a :class:`core.errors.BackboneError` subclass (:class:`streams.errors.SchemaValidationError`
naming the field and the index of the bad datum, :class:`streams.errors.BrokerUnavailableError` naming the
servers, :class:`streams.errors.DeliveryError` when the broker refused a record), or ``KeyError`` for an
unknown config key or event type.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

from core import tracing
from core.settings import Settings
from streams.catalogue import CATALOGUE
from streams.consumer import ConsumedEvent, DecodeFailure, Subscriber
from streams.envelope import Event
from streams.errors import SchemaValidationError
from streams.producer import EventProducer
from streams.replay import Bound, read_range
from streams.serde import AvroSerde, coerce_json_datum, serde_from_settings

__all__ = ["Client", "StartAt"]

StartAt = Literal["beginning", "latest", "committed"] | datetime
"""Where a subscription starts: the first offset, the end, the group's committed offsets, or an event time."""

_QUERIES = ("agent_runs", "models", "totals", "routing", "routing_models", "routing_request")


class Client:
    """A connection to the backbone's log, registry, configuration store and projections.

    Args:
        settings: servers and registry; build one with :meth:`connect`.
        serde: the serde (default: the one of ``settings``' registry, :func:`streams.serde.serde_from_settings`).
    """

    def __init__(self, settings: Settings, serde: AvroSerde | None = None) -> None:
        self.settings = settings
        self.serde = serde or serde_from_settings(settings)
        self._producer: EventProducer | None = None

    @classmethod
    def connect(cls, settings: Settings | None = None, *, check_broker: bool = True) -> Client:
        """A client from ``settings``, or from the environment completed from a running dev stack.

        Raises:
            streams.errors.BrokerUnavailableError: ``check_broker`` and Kafka did not answer within 5 s.
            ValueError: no bootstrap servers are configured and no dev stack runs.
        """
        from core.stack import load_settings
        from streams.broker import require_broker

        settings = settings or load_settings()
        if check_broker:
            require_broker(settings.kafka, timeout_seconds=5)
        return cls(settings)

    # -- produce ------------------------------------------------------------------------------------

    def validate(self, type_: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """``data`` (JSON values: ISO-8601 times, lists) as the Avro datum of schema ``type_``.

        Raises:
            KeyError: ``type_`` is not a schema the registry knows.
            streams.errors.SchemaValidationError: a field is missing or of the wrong type (its name is in
                ``.field``).
        """
        schema = self.serde.registry.schema_for(self.serde.registry.id_for(type_))
        datum = coerce_json_datum(schema, dict(data))
        self.serde.check(type_, datum)
        return datum

    def events(
        self,
        type_: str,
        data: Iterable[Mapping[str, Any]],
        *,
        topic: str | None = None,
        key_field: str | None = None,
        source: str = "/client",
        ids: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
        traceparent: str | None = None,
        correlation_id: str | None = None,
    ) -> list[Event]:
        """Validate every datum and wrap each in an :class:`~streams.envelope.Event` (CloudEvents attributes).

        The events' ``traceparent`` is ``traceparent`` when it is a valid W3C value, else the current
        span's (a program's own tracing, or ours), else none; ``correlation_id`` goes on every event.

        The key is ``data[key_field]`` (default: the catalogue key of ``topic`` when the schema has it), else
        ``keys[i]``, else the datum's index; the event time is the datum's ``event_time`` when it has one, else now (UTC); the id is ``ids[i]`` or a
        new UUID.

        Raises:
            streams.errors.SchemaValidationError: naming the index of the first bad datum and its field;
                nothing is returned.
        """
        schema = self.serde.registry.schema_for(self.serde.registry.id_for(type_))
        spec = CATALOGUE.get(topic) if topic else None
        names = {f["name"] for f in schema["fields"]}
        key_field = key_field or (spec.key if spec and spec.key in names else None)
        out: list[Event] = []
        traceparent = tracing.normalise_traceparent(traceparent) or tracing.current_traceparent()
        for i, raw in enumerate(data):
            try:
                datum = self.validate(type_, raw)
            except SchemaValidationError as exc:
                raise SchemaValidationError(type_, exc.field, f"datum {i}: {exc}") from exc
            event_time = datum.get("event_time")
            t = event_time if isinstance(event_time, datetime) else datetime.now(UTC)
            fallback = keys[i] if keys is not None else str(i)
            key = str(datum[key_field]) if key_field and datum.get(key_field) is not None else fallback
            eid = ids[i] if ids is not None else str(uuid.uuid4())
            out.append(
                Event.create(
                    type_, key, datum, source=source, time=t, id=eid, traceparent=traceparent,
                    correlation_id=correlation_id,
                )
            )  # fmt: skip
        return out

    def send(self, topic: str, events: Sequence[Event], *, traceparent: str | None = None) -> int:
        """Produce ``events`` to ``topic`` and return once the broker acknowledged all of them (``acks=all``).

        Trace context: an event without a ``traceparent`` gets ``traceparent`` (when valid), else the
        current span's. With tracing on (:func:`core.tracing.configure_tracing`) each record's ``send``
        span is a child of ``traceparent`` when given, else of the current span, else of the event's
        own ``traceparent``, and the record carries that span's context.

        Raises:
            streams.errors.DeliveryError: the broker refused a record or did not acknowledge in time.
        """
        if self._producer is None:
            self._producer = EventProducer(self.settings.kafka, self.serde)
        traceparent = tracing.normalise_traceparent(traceparent)
        fallback = traceparent or tracing.current_traceparent()
        if fallback is not None:
            events = [e if e.attributes.traceparent else e.with_traceparent(fallback) for e in events]
        with tracing.continued(traceparent):
            return self._producer.produce_many(topic, events)

    def produce(
        self,
        topic: str,
        type_: str,
        data: Iterable[Mapping[str, Any]],
        *,
        key_field: str | None = None,
        source: str = "/client",
        ids: Sequence[str] | None = None,
        traceparent: str | None = None,
        correlation_id: str | None = None,
    ) -> list[str]:
        """Validate, produce and wait for the acknowledgement of typed events; return their event ids.

        Nothing is sent when any datum is invalid. ``traceparent`` (W3C; default: the current span's)
        and ``correlation_id`` go on every event (see :meth:`send` for the spans).

        Raises:
            streams.errors.SchemaValidationError: a datum is invalid (index and field named).
            streams.errors.DeliveryError: the broker refused a record.
        """
        events = self.events(
            type_, data, topic=topic, key_field=key_field, source=source, ids=ids, traceparent=traceparent,
            correlation_id=correlation_id,
        )  # fmt: skip
        self.send(topic, events, traceparent=traceparent)
        return [e.attributes.id for e in events]

    # -- read the log -------------------------------------------------------------------------------

    def subscribe(
        self,
        topics: Sequence[str],
        *,
        start: StartAt = "beginning",
        group: str | None = None,
        follow: bool = False,
        limit: int | None = None,
        assign_timeout_seconds: float = 30.0,
    ) -> Iterator[ConsumedEvent | DecodeFailure]:
        """Records of ``topics`` from ``start``; with ``follow`` it waits for new ones, else it stops at the
        end. A record that does not decode comes as a :class:`~streams.consumer.DecodeFailure` with its
        bytes and the reason. With ``group``, offsets are committed after each batch is handed out.

        Raises:
            TimeoutError: no partition was assigned within ``assign_timeout_seconds`` (absent topic).
        """
        import time

        sub = Subscriber(self.settings.kafka, self.serde, list(topics), group_id=group, start=start)
        n = 0
        deadline = time.monotonic() + assign_timeout_seconds
        try:
            while True:
                batch = sub.poll_batch(500, 0.5)
                for r in batch:
                    yield r
                    n += 1
                    if limit and n >= limit:
                        sub.commit_batch(batch)
                        return
                sub.commit_batch(batch)
                if not follow and sub.caught_up():
                    return
                if not sub.assigned and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no partition of {', '.join(topics)} was assigned within {assign_timeout_seconds:.0f} s "
                        "(does the topic exist?)"
                    )
        finally:
            sub.close()

    async def asubscribe(
        self, topics: Sequence[str], *, start: StartAt = "beginning", group: str | None = None,
        follow: bool = True, limit: int | None = None,
    ) -> AsyncIterator[ConsumedEvent | DecodeFailure]:  # fmt: skip
        """:meth:`subscribe` as an async iterator (each poll runs in a worker thread)."""
        it = self.subscribe(topics, start=start, group=group, follow=follow, limit=limit)
        sentinel = object()
        while True:
            item = await asyncio.to_thread(next, it, sentinel)
            if item is sentinel:
                return
            yield item  # type: ignore[misc]

    def replay(
        self, topic: str, *, start: Bound = None, end: Bound = None
    ) -> Iterator[ConsumedEvent | DecodeFailure]:
        """The records of ``topic`` between ``start`` and ``end`` (offsets or aware event times; end
        exclusive), in offset order per partition.

        Raises:
            KeyError: the topic does not exist.
        """
        return read_range(self.settings.kafka, self.serde, topic, start=start, end=end)

    # -- configuration ------------------------------------------------------------------------------

    def _store(self) -> Any:
        from configuration.store import ConfigStore

        return ConfigStore(self.settings)

    def config(self, key: str, *, at: datetime | None = None, version: int | None = None) -> dict[str, Any]:
        """A config key's value, current or as it was at ``at`` (or at ``version``), with its version,
        author, reason and time (:meth:`configuration.store.ConfigVersion.as_json`).

        Raises:
            KeyError: the key was never set (or not yet at ``at``).
        """
        store = self._store()
        try:
            return dict(store.get(key, version=version, at=at).as_json())
        finally:
            store.close()

    def config_history(self, key: str) -> list[dict[str, Any]]:
        """Every version of a config key, oldest first."""
        store = self._store()
        try:
            return [v.as_json() for v in store.history(key)]
        finally:
            store.close()

    def rollback(
        self, key: str, *, to_version: int, author: str, reason: str, causation_id: str | None = None
    ) -> dict[str, Any]:
        """Append a version of ``key`` whose value is that of ``to_version`` (history is never rewritten).

        Raises:
            KeyError: the key or the version does not exist.
        """
        store = self._store()
        try:
            return dict(
                store.rollback(
                    key, author=author, reason=reason, to_version=to_version, causation_id=causation_id
                ).as_json()
            )
        finally:
            store.close()

    # -- projections --------------------------------------------------------------------------------

    def query(self, projection: str, **filters: Any) -> Any:
        """Rows of a projection: ``agent_runs`` (filters ``limit``, ``outcome``), ``models`` or ``totals``; the
        policy router's ``routing`` decisions (filters ``limit``, ``offset``, ``policy``, ``model``,
        ``request_id``; latest first), ``routing_models`` (per-model statistics) or ``routing_request``
        (filter ``request_id``: the request's audit, ``{"request_id", "decisions", "outcomes"}``).

        Raises:
            ValueError: an unknown projection name.
            psycopg.OperationalError: PostgreSQL is unreachable.
        """
        import psycopg

        from projections import queries, routing

        if projection not in _QUERIES:
            raise ValueError(f"unknown projection {projection!r}: one of {', '.join(_QUERIES)}")
        with psycopg.connect(self.settings.postgres.dsn(), connect_timeout=5) as conn:
            if projection == "agent_runs":
                return queries.agent_runs(conn, **filters)
            if projection == "models":
                return queries.model_usage(conn)
            if projection == "routing":
                return routing.decisions(conn, **filters)
            if projection == "routing_models":
                return routing.model_stats(conn)
            if projection == "routing_request":
                return routing.request_audit(conn, **filters).as_json()
            return queries.totals(conn)

    def audit(self, entity: str) -> list[dict[str, Any]]:
        """Every archived event about ``entity`` (``run:<id>``, ``config:<key>``, ...), in event-time order,
        with its causation chain and decoded data."""
        import dataclasses

        import psycopg

        from projections.audit import audit_trail

        with psycopg.connect(self.settings.postgres.dsn(), connect_timeout=5) as conn:
            return [dataclasses.asdict(e) for e in audit_trail(conn, entity, serde=self.serde)]

    # -- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the producer, if one was made."""
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
