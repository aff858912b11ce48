"""The Faust app of the routing processor: route requests (+ their embeddings) -> route decisions.

Three agents, each a thin shell around :func:`processors.routing.router.decide`:

* ``route-requests`` reads ``routing.requests`` (``sophia.routing.RouteRequest``, key request id). A
  request that names no embedding (``embedding_request_id`` null), or any request when the router has
  no embedding scorer, is decided at once with the features scorer and its decision sent to
  ``routing.decisions``. A request that names an embedding is forwarded, unchanged (raw bytes and
  headers), to the join topic ``<app id>-route-join`` keyed by its embedding request id.
* ``route-embeddings`` reads ``inference.results`` (``sophia.inference.EmbeddingResult``, written by
  the Ray actors, key = embedding request id). Results whose key starts with ``routing:`` are
  forwarded unchanged to the join topic under that key; every other result is skipped undecoded
  (the topic is shared with other consumers).
* ``route-join`` reads the join topic. Both halves of a pair have the same key, so they meet in the
  same partition, in the order they were forwarded. The table ``route_join`` (changelog
  ``<app id>-route_join-changelog``) keeps per embedding request id the embedding (once it has come)
  and the requests waiting for it. When both are there, each waiting request is decided with the
  embedding scorer, its decision sent (delivery awaited) and only then the table updated. Requests
  arriving after their embedding are decided at once.

Decoding, dead letters, ``concurrency=1``, the in-memory table rebuilt from its changelog (a
:class:`processors.tables.TailRecoveringTable`, which reads each changelog partition to its real end
after Faust's recovery: Tansu's ``ListOffsets`` stops Faust one batch short, and a restarted worker
forgot requests waiting for their embedding), the ``stop_after_idle_seconds`` option and ``/metrics``
follow :mod:`processors.run_summary.app` (the shared worker shell, :func:`processors.shell.run_processor_worker`). Table keys are embedding request ids (``str``, JSON on the changelog),
values JSON. ``backbone_routing_pending`` is recounted from the table after every recovery. A request that does
not decode, has another schema, or that the router cannot take (unknown policy, candidate models
without the router's, an embedding id without the ``routing:`` prefix) is dead-lettered with its raw
bytes and the reason, and processing goes on.

What a replay guarantees
------------------------

The decision of a request is a pure function of (the request's data, the embedding vector its
``embedding_request_id`` names or none, the router artifact), computed by
:func:`~processors.routing.router.decide`; it never reads the wall clock (``decided_at`` is the
request's ``requested_at``) nor the order of arrival. Its ``decision_id`` is
``deterministic_id("routing.decision", request_id, digest of the request's content, router version)``.
Hence, replaying the same requests and embedding results through a worker with the same router
version (a new consumer group, or a reset one) emits, for every request, a decision with the same id
and the same data:

* a request that names **no embedding** is decided by the features scorer (``method=features``,
  ``embedding_status=none``);
* a request that **names one** waits for it however long it takes: it is decided by the embedding
  scorer (``method=embedding``) only once that embedding has been read, and is **never** decided by
  the features scorer as a fallback (whether the embedding arrived "in time" depends on wall-clock
  time and on how two topics interleave, which a replay does not reproduce). Until then it is pending
  (``backbone_routing_pending``) and no decision is emitted. If the embedding was made by another
  model, or has another dimension, than the router's, the decision uses features and says so in
  ``embedding_status`` (``mismatch-...``) — still a function of the inputs;
* a router **without an embedding scorer** decides every request by features at once
  (``embedding_status=unused-no-embedding-scorer``).

Not guaranteed: the order of decisions across requests, and exactly-once output — after a crash
between sending a decision and committing, the same decision (same id) is sent again; subscribers
de-duplicate on ``decision_id``. The first embedding result read for an id wins; the actors answer a
request again only with the same model version, so a second one carries the same vector.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust
import structlog
from confluent_kafka.admin import AdminClient, NewTopic

from core.settings import Settings
from inference.records import RESULT_SCHEMA, EmbeddingResult
from processors.errors import UnprocessableEventError, UnsupportedEventError
from processors.routing.records import (
    DECISION_SCHEMA,
    EMBEDDING_ID_PREFIX,
    REQUEST_SCHEMA,
    RouteDecision,
    RouteRequest,
    decision_event,
)
from processors.routing.router import EmbeddingInput, Router, decide, needs_embedding, validate_request
from processors.shell import (
    FaustDeadLetters,
    make_faust_app,
    message_headers,
    run_processor_worker,
    traced_headers,
    tracing_process,
)
from processors.tables import TailRecoveringTable
from streams.catalogue import CATALOGUE, create_missing_topics
from streams.consumer import DLQ_TOPIC
from streams.envelope import CloudEvent
from streams.errors import DeserializationError, EnvelopeError
from streams.serde import AvroSerde, serde_from_settings

__all__ = [
    "COUNTERS",
    "DEFAULT_APP_ID",
    "PROCESSOR_NAME",
    "RoutingStats",
    "RoutingTopics",
    "create_routing_app",
    "ensure_routing_topics",
    "run_routing_worker",
]

log = structlog.get_logger(__name__)

DEFAULT_APP_ID = "backbone-routing"
PROCESSOR_NAME = "routing"
TABLE_NAME = "route_join"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingTopics:
    """The topics of the routing processor (configurable for tests).

    Attributes:
        requests: input, ``sophia.routing.RouteRequest`` keyed by request id.
        embeddings: input, ``sophia.inference.EmbeddingResult`` keyed by embedding request id.
        decisions: output, ``sophia.routing.RouteDecision`` keyed by request id.
        dead_letters: where undecodable or invalid records go.
        join: the internal topic pairing requests with embeddings; None: ``<app id>-route-join``.
        partitions: partition count of ``requests`` and of the join topic (and the table's changelog).
    """

    requests: str = "routing.requests"
    embeddings: str = "inference.results"
    decisions: str = "routing.decisions"
    dead_letters: str = DLQ_TOPIC
    join: str | None = None
    partitions: int = CATALOGUE["routing.requests"].partitions

    def join_topic(self, app_id: str) -> str:
        """The join topic's name for app ``app_id``."""
        return self.join or f"{app_id}-route-join"


@dataclass(slots=True)
class RoutingStats:
    """Counters of one app instance (in memory, for logs, tests, idle detection and /metrics).

    Attributes:
        records_count: records handled by any agent (every outcome).
        requests_count: valid route requests read.
        embeddings_count: routing embeddings forwarded to the join topic.
        embeddings_skipped_count: results of other consumers skipped on ``inference.results``.
        decisions_features_count: decisions sent with method features.
        decisions_embedding_count: decisions sent with method embedding.
        pending_count: requests waiting for their embedding (in this instance's table partitions).
        duplicate_embeddings_count: embeddings for an id that already had one (ignored).
        dead_letters_count: records dead-lettered.
        last_record_monotonic: ``time.monotonic()`` when the last record was handled, ``None`` before.
    """

    records_count: int = 0
    requests_count: int = 0
    embeddings_count: int = 0
    embeddings_skipped_count: int = 0
    decisions_features_count: int = 0
    decisions_embedding_count: int = 0
    pending_count: int = 0
    duplicate_embeddings_count: int = 0
    dead_letters_count: int = 0
    last_record_monotonic: float | None = field(default=None)


def _request_to_json(request: RouteRequest) -> dict[str, Any]:
    ms = (request.requested_at - _EPOCH) // timedelta(milliseconds=1)
    return {**request.to_avro(), "requested_at": ms}


def _request_from_json(d: dict[str, Any]) -> RouteRequest:
    return RouteRequest.from_avro({**d, "requested_at": _EPOCH + timedelta(milliseconds=d["requested_at"])})


def _embedding_to_json(r: EmbeddingResult) -> dict[str, Any]:
    return {
        "model_name": r.model_name,
        "model_version": r.model_version,
        "vector": base64.b64encode(r.vector.astype("<f4").tobytes()).decode(),
        "dimension": r.dimension,
    }


def _embedding_from_json(d: dict[str, Any]) -> EmbeddingInput:
    from inference.records import decode_vector

    return EmbeddingInput(
        model_name=d["model_name"],
        model_version=d["model_version"],
        vector=decode_vector(base64.b64decode(d["vector"]), int(d["dimension"])),
    )


class _RoutingShell:
    """The agents' bodies: decode, validate, decide, send, forward, dead-letter. One per app."""

    def __init__(
        self,
        settings: Settings,
        router: Router,
        topics: RoutingTopics,
        serde: AvroSerde,
        table: faust.Table,
        decisions_topic: faust.TopicT,
        join_topic: faust.TopicT,
    ) -> None:
        self.settings = settings
        self.router = router
        self.topics = topics
        self.serde = serde
        self.table = table
        self.decisions_topic = decisions_topic
        self.join_topic = join_topic
        self.stats = RoutingStats()
        self.dead_letters = FaustDeadLetters(settings, serde, PROCESSOR_NAME, topics.dead_letters)

    def _touch(self) -> None:
        self.stats.records_count += 1
        self.stats.last_record_monotonic = time.monotonic()

    def _decode(
        self, message: Any, headers: list[tuple[str, bytes | None]]
    ) -> tuple[CloudEvent, str, dict[str, Any]]:
        attributes = CloudEvent.from_headers(headers)
        schema, data = self.serde.decode(message.value)
        return attributes, schema, data

    async def handle_request(self, message: Any) -> None:
        """A record of the requests topic: decide now, or forward to the join topic; never raises for a bad record."""
        self._touch()
        headers = message_headers(message.headers)
        bound = log.bind(topic=message.topic, partition=message.partition, offset=message.offset)
        try:
            attributes, schema, data = self._decode(message, headers)
            if schema != REQUEST_SCHEMA:
                raise UnsupportedEventError(
                    f"schema {schema} is not {REQUEST_SCHEMA}", event_id=attributes.id
                )
            request = RouteRequest.from_avro(data)
            validate_request(self.router, request)
            decision = None if needs_embedding(self.router, request) else decide(self.router, request, None)
        except (EnvelopeError, DeserializationError, UnprocessableEventError, KeyError) as exc:
            await self._dead_letter(message, headers, exc)
            bound.warning("route_request_dead_lettered", reason=str(exc), error_type=type(exc).__name__)
            return
        self.stats.requests_count += 1
        bound = bound.bind(
            event_id=attributes.id, correlation_id=attributes.correlation_id, request_id=request.request_id
        )
        if decision is not None:
            await self._send_decision(decision, attributes)
            bound.info(
                "route_decided", model=decision.model, method=decision.method, score=round(decision.score, 4)
            )
            return
        await self._forward(message, headers, str(request.embedding_request_id))
        bound.debug("route_request_waits_for_embedding", embedding_request_id=request.embedding_request_id)

    async def handle_embedding(self, message: Any) -> None:
        """A record of the embeddings topic: forward routing ones to the join topic, skip the others."""
        self._touch()
        key = (
            message.key.decode("utf-8", "replace") if isinstance(message.key, bytes) else (message.key or "")
        )
        if not key.startswith(EMBEDDING_ID_PREFIX):
            self.stats.embeddings_skipped_count += 1
            return
        headers = message_headers(message.headers)
        try:
            _, schema, data = self._decode(message, headers)
            if schema != RESULT_SCHEMA:
                raise UnsupportedEventError(f"schema {schema} is not {RESULT_SCHEMA}")
            EmbeddingResult.from_avro(data)  # the vector's length matches its dimension
        except (EnvelopeError, DeserializationError, UnprocessableEventError, ValueError, KeyError) as exc:
            await self._dead_letter(message, headers, exc)
            log.warning(
                "routing_embedding_dead_lettered", topic=message.topic, offset=message.offset, reason=str(exc)
            )
            return
        await self._forward(message, headers, key)
        self.stats.embeddings_count += 1

    async def handle_join(self, message: Any) -> None:
        """A record of the join topic (a waiting request or an embedding): pair, decide, update the table."""
        self._touch()
        headers = message_headers(message.headers)
        key = (
            message.key.decode("utf-8", "replace") if isinstance(message.key, bytes) else (message.key or "")
        )
        try:
            attributes, schema, data = self._decode(message, headers)
            if schema == REQUEST_SCHEMA:
                request = RouteRequest.from_avro(data)
                validate_request(self.router, request)
            elif schema == RESULT_SCHEMA:
                result = EmbeddingResult.from_avro(data)
            else:
                raise UnsupportedEventError(
                    f"schema {schema} is neither {REQUEST_SCHEMA} nor {RESULT_SCHEMA}"
                )
        except (EnvelopeError, DeserializationError, UnprocessableEventError, ValueError, KeyError) as exc:
            await self._dead_letter(message, headers, exc)
            log.warning("route_join_dead_lettered", offset=message.offset, reason=str(exc))
            return
        state = dict(self.table.get(key) or {"embedding": None, "pending": []})
        if schema == REQUEST_SCHEMA:
            if state["embedding"] is not None:
                decision = decide(self.router, request, _embedding_from_json(state["embedding"]))
                await self._send_decision(decision, attributes)
                return
            entry = {
                "request": _request_to_json(request),
                "event_id": attributes.id,
                "correlation_id": attributes.correlation_id,
            }
            if entry not in state["pending"]:
                state["pending"] = [*state["pending"], entry]
                self.stats.pending_count += 1
                self.table[key] = state
            return
        if state["embedding"] is not None:
            self.stats.duplicate_embeddings_count += 1
            return
        embedding = _embedding_to_json(result)
        for entry in state["pending"]:
            request = _request_from_json(entry["request"])
            decision = decide(self.router, request, _embedding_from_json(embedding))
            cause = CloudEvent(id=entry["event_id"], source="", type=REQUEST_SCHEMA, time=request.requested_at,
                               correlation_id=entry["correlation_id"])  # fmt: skip
            await self._send_decision(decision, cause)
            self.stats.pending_count = max(0, self.stats.pending_count - 1)
        self.table[key] = {"embedding": embedding, "pending": []}

    async def count_pending(self) -> None:
        """Set ``stats.pending_count`` from the table (its recovered partitions): a recover callback."""
        self.stats.pending_count = sum(
            len((state or {}).get("pending") or ()) for state in self.table.values()
        )
        log.info("route_join_recovered", pending=self.stats.pending_count, keys=len(self.table))

    async def _send_decision(self, decision: RouteDecision, cause: CloudEvent) -> None:
        event = decision_event(
            decision, causation_id=cause.id, correlation_id=cause.correlation_id or decision.request_id
        )
        pending = await self.decisions_topic.send(
            key=event.key.encode(),
            value=self.serde.encode(DECISION_SCHEMA, event.data),
            headers=traced_headers(event.attributes.to_headers()),
            timestamp=decision.decided_at.timestamp(),
            force=True,
        )
        await pending  # delivered (acks=all) before the table changes or the offset is committed
        if decision.method == "embedding":
            self.stats.decisions_embedding_count += 1
        else:
            self.stats.decisions_features_count += 1

    async def _forward(self, message: Any, headers: list[tuple[str, bytes | None]], key: str) -> None:
        pending = await self.join_topic.send(
            key=key.encode(),
            value=message.value,
            headers=[(k, v) for k, v in headers if v is not None],
            timestamp=message.timestamp,
            force=True,
        )
        await pending

    async def _dead_letter(
        self, message: Any, headers: list[tuple[str, bytes | None]], exc: Exception
    ) -> None:
        await self.dead_letters.publish(message, exc, headers)
        self.stats.dead_letters_count += 1

    def close(self) -> None:
        """Flush and release the dead-letter producer, if one was made."""
        self.dead_letters.close()


def create_routing_app(
    settings: Settings,
    router: Router,
    *,
    app_id: str | None = None,
    topics: RoutingTopics | None = None,
    web_port: int | None = 0,
    serde: AvroSerde | None = None,
) -> faust.App:
    """Build the routing Faust app: the three agents and the ``route_join`` table.

    Args:
        settings: broker settings from ``settings.kafka``; data dir ``<state_dir>/faust/<app id>``.
        router: the fitted router (see :meth:`Router.load`).
        app_id: Faust app id (consumer group, changelog and join topic prefix); default ``backbone-routing``.
        topics: topic names; default the catalogue's.
        web_port: Faust's own web server port; ``0`` or ``None`` (the default) leaves it off: the worker
            shell serves ``/metrics``, ``/healthz`` and ``/readyz`` (:func:`run_routing_worker`).
        serde: the Avro serde; default one on the embedded registry.

    Returns:
        The app; the counters are at ``app.routing_stats`` (a :class:`RoutingStats`) and
        ``app.routing_close()`` releases the dead-letter producer once the app has stopped.

    Raises:
        ValueError: no Kafka bootstrap servers are configured.
    """
    app_id = app_id or DEFAULT_APP_ID
    topics = topics or RoutingTopics()
    app = make_faust_app(settings, app_id, partitions=topics.partitions, web_port=web_port)
    serde = serde or serde_from_settings(settings)
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    requests_topic = app.topic(topics.requests, partitions=topics.partitions, **raw)
    embeddings_topic = app.topic(topics.embeddings, **raw)
    join_topic = app.topic(topics.join_topic(app_id), partitions=topics.partitions, **raw)
    decisions_topic = app.topic(topics.decisions, **raw)
    # Keys: the embedding request id (str), JSON on the changelog ('"routing:..."'); values: JSON. Faust
    # takes a table's key serializer from its key type (JSON when there is none) and that overrides the
    # schema's, so the schema only says what is used either way.
    table = app.tables.add(
        TailRecoveringTable(
            app,
            kafka=settings.kafka,
            name=TABLE_NAME,
            default=dict,
            beacon=app.tables.beacon,
            partitions=topics.partitions,
            schema=faust.Schema(key_serializer="json", value_serializer="json"),
            help="Per embedding request id: the embedding (once read) and the route requests waiting for it.",
        )
    )
    shell = _RoutingShell(settings, router, topics, serde, table, decisions_topic, join_topic)
    table.on_recover(shell.count_pending)  # after every recovery (start, rebalance), tail included

    @app.agent(requests_topic, name="route-requests", concurrency=1)
    async def route_requests(stream: faust.StreamT) -> None:
        """Decide requests that need no embedding; forward the others to the join topic."""
        async for event in stream.events():
            with tracing_process(event.message, app.conf.id):
                await shell.handle_request(event.message)

    @app.agent(embeddings_topic, name="route-embeddings", concurrency=1)
    async def route_embeddings(stream: faust.StreamT) -> None:
        """Forward the embeddings of route requests to the join topic."""
        async for event in stream.events():
            with tracing_process(event.message, app.conf.id):
                await shell.handle_embedding(event.message)

    @app.agent(join_topic, name="route-join", concurrency=1)
    async def route_join(stream: faust.StreamT) -> None:
        """Pair waiting requests with their embeddings and decide them."""
        async for event in stream.events():
            with tracing_process(event.message, app.conf.id):
                await shell.handle_join(event.message)

    app.routing_stats = shell.stats  # type: ignore[attr-defined]
    app.routing_close = shell.close  # type: ignore[attr-defined]
    log.debug(
        "routing_app_created", app_id=app_id, router_version=router.version, requests_topic=topics.requests
    )
    return app


def ensure_routing_topics(
    settings: Settings, topics: RoutingTopics, *, app_id: str = DEFAULT_APP_ID, timeout_seconds: float = 30.0
) -> list[str]:
    """Create the routing topics the broker lacks (final partition counts); return those created.

    Requests and the join topic get ``topics.partitions``; embeddings, decisions and dead letters the
    counts of the catalogue topics whose part they play. A catalogue name is made as the catalogue says
    whatever the count asked (:func:`streams.catalogue.create_missing_topics`), so these counts only
    apply to other names (a test's own topics).

    Raises:
        StreamsError: the broker did not answer, or refused a topic.
    """
    admin = AdminClient(settings.kafka.librdkafka())
    wanted = [
        NewTopic(topics.requests, num_partitions=topics.partitions, replication_factor=1),
        NewTopic(topics.join_topic(app_id), num_partitions=topics.partitions, replication_factor=1),
        NewTopic(
            topics.embeddings, num_partitions=CATALOGUE["inference.results"].partitions, replication_factor=1
        ),
        NewTopic(
            topics.decisions, num_partitions=CATALOGUE["routing.decisions"].partitions, replication_factor=1
        ),
        NewTopic(
            topics.dead_letters, num_partitions=CATALOGUE["backbone.dlq"].partitions, replication_factor=1
        ),
    ]
    return create_missing_topics(admin, wanted, timeout_seconds=timeout_seconds)


COUNTERS = (
    ("backbone_routing_records", "records_count", "Records handled by the routing agents (every outcome)"),
    ("backbone_routing_requests", "requests_count", "Valid route requests read"),
    ("backbone_routing_embeddings", "embeddings_count", "Routing embeddings forwarded to the join topic"),
    ("backbone_routing_dead_letters", "dead_letters_count", "Records dead-lettered by the routing agents"),
)
"""The routing processor's plain counters as Prometheus metrics (label ``app``); decisions by method and
the pending gauge come from :class:`_DecisionsCollector`."""


class _DecisionsCollector:
    """``backbone_routing_decisions{app,method}`` and the gauge ``backbone_routing_pending{app}`` of a
    :class:`RoutingStats` (read at scrape time)."""

    def __init__(self, stats: RoutingStats, app_id: str) -> None:
        self.stats = stats
        self.app_id = app_id

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        d = CounterMetricFamily(
            "backbone_routing_decisions", "Route decisions sent", labels=["app", "method"]
        )
        d.add_metric([self.app_id, "features"], self.stats.decisions_features_count)
        d.add_metric([self.app_id, "embedding"], self.stats.decisions_embedding_count)
        yield d
        g = GaugeMetricFamily(
            "backbone_routing_pending", "Route requests waiting for their embedding", labels=["app"]
        )
        g.add_metric([self.app_id], self.stats.pending_count)
        yield g


def run_routing_worker(
    router: Router | Path | str,
    settings: Settings | None = None,
    *,
    app_id: str | None = None,
    topics: RoutingTopics | None = None,
    stop_after_idle_seconds: float | None = None,
    web_port: int | None = None,
    loglevel: str | None = None,
) -> RoutingStats:
    """Run the routing worker in this process until it is stopped (blocking; call from a main thread).

    Creates the topics first (:func:`ensure_routing_topics`), then runs the app in the worker shell
    (:func:`processors.shell.run_processor_worker`): the counters of :data:`COUNTERS`, the decisions by
    method and the pending gauge on ``/metrics``; ``/healthz`` (with the router's version) and ``/readyz``
    on ``settings.metrics_host:metrics_port``; clean stop on SIGTERM/SIGINT.

    Args:
        router: a :class:`Router` or the path of its artifact.
        settings: default: the environment's, completed from a running dev stack.
        app_id: Faust app id; default ``backbone-routing``.
        topics: topic names; default the catalogue's.
        stop_after_idle_seconds: stop once started (partitions assigned, table recovered) and no
            record has arrived for this many seconds; None runs until SIGTERM/SIGINT.
        web_port: deprecated (Faust's web server is no longer started): the port of ``/metrics``,
            ``/healthz`` and ``/readyz`` instead of ``settings.metrics_port``; ``0`` or ``None`` keeps
            ``settings.metrics_port`` (``0`` used to turn Faust's web server off, as deployments still set).
        loglevel: Faust's log level; default ``settings.log_level``.

    Returns:
        The counters when the worker has stopped.

    Raises:
        RouterArtifactError: the router file is missing or does not match its version.
        ValueError: no Kafka bootstrap servers are configured.
        StreamsError: a topic cannot be created.
        SystemExit: the worker exited with a non-zero code.
    """
    if not isinstance(router, Router):
        router = Router.load(router)
    if settings is None:
        from core.stack import load_settings

        settings = load_settings()
    topics = topics or RoutingTopics()
    app_id = app_id or DEFAULT_APP_ID
    ensure_routing_topics(settings, topics, app_id=app_id)
    app = create_routing_app(settings, router, app_id=app_id, topics=topics)
    stats: RoutingStats = app.routing_stats  # type: ignore[attr-defined]
    if web_port:  # 0 meant "Faust's web server off", which it now always is: nothing to move
        log.warning("routing_web_port_deprecated", metrics_port=web_port,
                    hint="use BACKBONE_METRICS_PORT; /metrics, /healthz and /readyz are served there")  # fmt: skip
    log.info(
        "routing_worker_starting", router_version=router.version, embedding_scorer=router.knn is not None
    )
    version, knn = router.version, router.knn is not None
    run_processor_worker(
        settings, app, processor=PROCESSOR_NAME, stats=stats, counters=COUNTERS,
        close=app.routing_close,  # type: ignore[attr-defined]
        stop_after_idle_seconds=stop_after_idle_seconds, loglevel=loglevel, metrics_port=web_port or None,
        collectors=[_DecisionsCollector(stats, app.conf.id)],
        health_fields=lambda: {"router_version": version, "embedding_scorer": knn},
    )  # fmt: skip
    return stats
