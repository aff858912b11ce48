"""The Faust app of the processors and its first processor, the run-summary processor.

The worker reads ``agent.events`` (key = run id; Confluent-framed Avro with CloudEvents headers), folds
each run's events into a :class:`~processors.run_summary.RunTotals` kept in the table ``run_totals``,
and when a run finishes sends its ``run.summary`` insight to ``insights.runs`` (key = entity). It is a
thin shell around :func:`processors.run_summary.apply`; all decisions are made there.

* **Decoding is ours.** The app's serializers are ``raw``: the shell decodes the Confluent-framed
  Avro with :class:`streams.serde.AvroSerde` and the envelope with
  :meth:`streams.envelope.CloudEvent.from_headers`. A record that does not decode, or that the
  processor cannot take (another schema, malformed data), goes to the dead-letter topic through
  :class:`streams.consumer.DeadLetterPublisher` with its raw bytes, headers and the reason, and
  processing goes on.
* **State.** ``run_totals`` uses ``store="memory://"``: the table lives in memory and is rebuilt on
  start (and on rebalance) by reading its changelog topic ``<app id>-run_totals-changelog``, which
  Faust writes on every update and flushes before it commits the input offsets. So after a crash
  the table is at least as new as the committed offsets, and the events after them are re-read; the
  de-duplication rules of :mod:`processors.run_summary` make the re-read a no-op. Keys are run ids
  (``str``), JSON-encoded on the changelog (``"<run id>"``), so they come back as ``str``.
* **Recovery reads to the real end of the changelog.** Faust stops recovering a changelog partition
  at the high watermark that ``ListOffsets(latest)`` gives; Tansu answers the base offset of the
  last record batch plus one, so the rest of that batch (the newest totals of some runs) was left
  out, and a restarted worker summarised those runs with events missing (seen in
  ``tests/integration/test_faust_run_summary.py``). The table is therefore a
  :class:`processors.tables.TailRecoveringTable`: it reads each active changelog partition on from
  where Faust stopped to the end that a *fetch* reports, and applies those records before the
  streams resume (on Apache Kafka that tail is empty). If the tail cannot be read the worker crashes
  rather than run on stale totals.
* **State checkpoints.** The totals of the runs seen are kept as :class:`RunTotals` objects in memory (a
  cache of the table: dropped on rebalance and reloaded from the table on first use); an event changes
  its run's totals there, and the changed totals are written to the table (and so to its changelog)
  together every :data:`CHECKPOINT_RECORDS` records or :data:`CHECKPOINT_SECONDS` (a timer writes them
  when no record comes), one write per changed run. Writing the table on every event (a JSON changelog
  record produced per event, about 40 per run) cost about a third of the worker's time (py-spy,
  30,000 real-shaped events).
* **Batches**: the events are not iterated by a Faust agent but handed in lists, straight from each fetch,
  by :class:`processors.shell.BatchDelivery` (at most :data:`BATCH_RECORDS` at a time) to
  :meth:`_RunSummaryShell.handle_batch`, which handles each in order (:meth:`_RunSummaryShell.handle`).
  Faust's per-record path (message, conductor, stream queue, event, ack) cost more than the processor
  itself. The per-record Faust agent that acked each event in order
  (:class:`processors.shell.InOrderAcks`) was removed on 2026-12-06.
* **Order of effects per batch**: each event's insight is sent and its run's totals changed; a batch's
  offsets are committed only once every insight it sent was delivered *and* the checkpoint holding its
  totals was written, and every earlier batch's too (:class:`~processors.shell.BatchDelivery`; Faust
  flushes the changelog before it commits), so an offset is never committed before the totals it
  produced are in the changelog. The worker does not wait for each delivery: at 1,000 events/s (about
  170 finished runs a second) waiting for each insight (linger plus a broker round trip) held the
  worker most of each second. A crash after the table recorded the run as finished but before its
  insight was acknowledged leaves the FINISHED record uncommitted: it is read again, finds the run
  finished by that very event (``finished_event_id``), and :func:`processors.run_summary.reissue` sends
  the same insight again (same deterministic id; subscribers de-duplicate by ``insight_id``).
* **One batch in hand at a time** (BatchDelivery's one task), as the agent had ``concurrency=1``
  (faust-streaming #606: with more, an offset can be committed past a message still in flight). Scale
  with partitions and workers.
* **Web server**: :func:`create_app` starts Faust's own web server on ``web_port`` (else
  ``settings.metrics_port``; ``0`` leaves it off), for ``faust -A ... worker``; :func:`run_worker` leaves it
  off and serves ``/metrics``, ``/healthz`` and ``/readyz`` from the worker shell.

Run it with ``backbone processors worker`` (see :mod:`backbone.cli.processors`) or
``faust -A processors.run_summary.app worker -l info`` (the module attribute ``app`` is built on first access
from :func:`core.settings.get_settings`).

Knowing that the processor has caught up: the Tansu broker of dev and tests answers ``ListOffsets``
wrongly, so lag is not measured from offsets. Either run :func:`run_worker` with
``stop_after_idle_seconds`` (it returns once no record has arrived for that long, after recovery,
so every record produced before it was started has been processed), or wait for the effect with
:func:`wait_for_run_summaries` (one insight per finished run on the insights topic).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import faust
import structlog

from core import tracing
from core.settings import KafkaSettings, Settings, get_settings
from processors.errors import UnprocessableEventError
from processors.run_summary.logic import (
    INSIGHT_KIND,
    INSIGHT_SCHEMA,
    RunTotals,
    apply,
    classify,
    reissue,
    run_id_of,
)
from processors.shell import (
    BatchDelivery,
    FaustDeadLetters,
    TableCheckpoints,
    catalogue_partitions,
    decode_event,
    ensure_processor_topics,
    make_faust_app,
    message_headers,
    run_processor_worker,
    send_event,
    topic_partitions,
)
from processors.tables import TailRecoveringTable
from streams.catalogue import CATALOGUE
from streams.consumer import DLQ_TOPIC, ConsumedEvent
from streams.envelope import Event
from streams.errors import DeserializationError, EnvelopeError
from streams.replay import read_range
from streams.serde import AvroSerde, serde_from_settings

__all__ = [
    "DEFAULT_APP_ID",
    "PROCESSOR_NAME",
    "ProcessorStats",
    "ProcessorTopics",
    "create_app",
    "ensure_run_summary_topics",
    "run_worker",
    "wait_for_run_summaries",
]

log = structlog.get_logger(__name__)

CHECKPOINT_RECORDS = 1000
"""Records after which the changed run totals are written to the table (and those records can be committed)."""
CHECKPOINT_SECONDS = 0.2
"""The longest a handled record waits for the checkpoint that lets it be committed (a timer writes it when no
record comes); also the most work a crash makes the worker redo (those records are read again: the
de-duplication rules make that a no-op, and an insight is sent again with the same id)."""
BATCH_RECORDS = 500
"""Most events handed to :meth:`_RunSummaryShell.handle_batch` at once."""
MAX_BUFFERED_RECORDS = 20_000
"""Events taken from fetches and not yet handled at which the fetch loop waits."""

DEFAULT_APP_ID = "backbone-processors"
PROCESSOR_NAME = "run-summary"
TABLE_NAME = "run_totals"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessorTopics:
    """The topics the run-summary processor reads and writes (configurable for tests).

    Attributes:
        events: input, ``sophia.agent.*`` events keyed by run id.
        insights: output, ``sophia.insight.Insight`` keyed by entity.
        dead_letters: where undecodable or unprocessable records go.
        partitions: partition count of ``events`` (and of the table's changelog, which must match it).
    """

    events: str = "agent.events"
    insights: str = "insights.runs"
    dead_letters: str = DLQ_TOPIC
    partitions: int = CATALOGUE["agent.events"].partitions


@dataclass(slots=True)
class ProcessorStats:
    """Counters of one app instance (in memory, for logs, tests and idle detection).

    Attributes:
        records_count: records handled (every outcome).
        applied_count: events folded into a run's totals.
        duplicates_count: events skipped as already applied.
        late_count: events skipped because their run had finished.
        insights_count: insights sent.
        dead_letters_count: records dead-lettered.
        first_record_monotonic: ``time.monotonic()`` when the first record was handled, ``None`` before
            (with ``last_record_monotonic``, the processing rate without the startup).
        last_record_monotonic: ``time.monotonic()`` when the last record was handled, ``None`` before.
    """

    records_count: int = 0
    applied_count: int = 0
    duplicates_count: int = 0
    late_count: int = 0
    insights_count: int = 0
    dead_letters_count: int = 0
    first_record_monotonic: float | None = field(default=None)
    last_record_monotonic: float | None = field(default=None)


class _RunSummaryShell:
    """The processor's body: decode, de-duplicate, apply, send, dead-letter. One per app."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        topics: ProcessorTopics,
        serde: AvroSerde,
        table: faust.Table,
        insights_topic: faust.TopicT,
    ) -> None:
        self.app = app
        self.settings = settings
        self.topics = topics
        self.serde = serde
        self.table = table
        self.insights_topic = insights_topic
        self.stats = ProcessorStats()
        self.dead_letters = FaustDeadLetters(settings, serde, PROCESSOR_NAME, topics.dead_letters)
        self.states: dict[str, RunTotals] = {}  # cache of the table: run id -> its totals
        self.checkpoints = TableCheckpoints(
            table, every_records=CHECKPOINT_RECORDS, every_seconds=CHECKPOINT_SECONDS
        )

    def forget(self, *_: Any, **__: Any) -> None:
        """On rebalance: checkpoint what was handled (the cache is only ever ahead of the table by records
        already handled, which a new owner would skip as duplicates), then drop the cache; totals are
        reloaded from the table on next use."""
        self.checkpoints.checkpoint()
        self.states.clear()

    async def handle(self, message: Any) -> tuple[asyncio.Future[Any] | None, Event | None]:
        """Process one record (an aiokafka record of a batch: ``topic``, ``partition``, ``offset``, ``key``,
        ``value``, ``headers``); never raises for a bad record. Returns the future of its effects (the
        insight's delivery, not awaited, and the checkpoint that holds its totals) and the insight, or
        ``(None, None)``.

        With tracing on the handling is a ``process <topic>`` span continuing the record's
        ``ce_traceparent``, and the insight's ``send`` span is its child.
        """
        if not tracing.is_enabled():
            return await self._handle(message)
        with tracing.process_span(
            message.topic, message_headers(message.headers), key=message.key, partition=message.partition,
            offset=message.offset, group=self.app.conf.id,
        ):  # fmt: skip
            return await self._handle(message)

    async def _handle(self, message: Any) -> tuple[asyncio.Future[Any] | None, Event | None]:
        self.stats.records_count += 1
        self.stats.last_record_monotonic = now = time.monotonic()
        if self.stats.first_record_monotonic is None:
            self.stats.first_record_monotonic = now
        try:
            event, _ = decode_event(self.serde, message)
            attributes = event.attributes
            run_id = run_id_of(event)
            state = self.states.get(run_id)
            if state is None:
                raw_state = self.table.get(run_id)
                state = RunTotals.from_dict(raw_state) if raw_state else None
            disposition = classify(state, event) if state is not None else "apply"
            new_state, insight = apply(state, event)
        except (EnvelopeError, DeserializationError, UnprocessableEventError) as exc:
            await self._dead_letter(message, message_headers(message.headers), exc)
            log.warning("record_dead_lettered", topic=message.topic, partition=message.partition,
                        offset=message.offset, reason=str(exc), error_type=type(exc).__name__)  # fmt: skip
            return None, None
        if new_state is state:
            if disposition == "late":
                self.stats.late_count += 1
            else:
                self.stats.duplicates_count += 1
            again = reissue(state, event) if state is not None else None
            if again is None:
                return None, None
            log.info(
                "run_summary_reissued", run_id=run_id, event_id=attributes.id, insight_id=again.attributes.id
            )
            return await self._send_insight(again), again
        pending = await self._send_insight(insight) if insight is not None else None
        self.states[run_id] = new_state
        self.checkpoints.mark(run_id, message.partition, new_state)
        written = self.checkpoints.record()
        self.stats.applied_count += 1
        if pending is None:
            return written, insight
        both: asyncio.Future[Any] = asyncio.gather(pending, written)
        return both, insight

    async def _send_insight(self, insight: Event) -> asyncio.Future[Any]:
        """Send ``insight`` without waiting for its delivery; return the delivery future."""
        if tracing.is_enabled():
            with tracing.send_span(
                self.topics.insights, message_id=insight.attributes.id, key=insight.key,
                traceparent=insight.attributes.traceparent,
            ) as traceparent:  # fmt: skip
                return await send_event(
                    self.insights_topic, self.serde, insight.with_traceparent(traceparent), wait=False
                )
        return await send_event(self.insights_topic, self.serde, insight, wait=False)

    async def handle_batch(self, records: list[Any]) -> asyncio.Future[Any] | None:
        """Process records of a :class:`~processors.shell.BatchDelivery` (aiokafka records, each handled by
        :meth:`handle`, in their order); return the future of all their effects
        (insights delivered, checkpoints written), done when every one is, or None when they have none.
        The insights are counted and logged once it is done."""
        pending: dict[int, asyncio.Future[Any]] = {}  # by identity: records share a checkpoint's future
        insights: list[Event] = []
        for record in records:
            future, insight = await self.handle(record)
            if future is not None:
                pending[id(future)] = future
            if insight is not None:
                insights.append(insight)
        if not pending:
            for insight in insights:
                self._delivered(insight)
            return None
        together: asyncio.Future[Any] = asyncio.gather(*pending.values())
        if insights:

            def delivered(done: asyncio.Future[Any]) -> None:
                if not done.cancelled() and done.exception() is None:
                    for insight in insights:
                        self._delivered(insight)

            together.add_done_callback(delivered)
        return together

    def _delivered(self, insight: Event | None) -> None:
        if insight is not None:
            self.stats.insights_count += 1
            log.info("run_summary_sent", insight_id=insight.attributes.id, run_id=insight.key.removeprefix("run:"),
                     summary=insight.data["summary"])  # fmt: skip

    async def _dead_letter(
        self, message: Any, headers: list[tuple[str, bytes | None]], exc: Exception
    ) -> None:
        await self.dead_letters.publish(message, exc, headers)
        self.stats.dead_letters_count += 1

    def close(self) -> None:
        """Flush and release the dead-letter producer, if one was made."""
        self.dead_letters.close()


def create_app(
    settings: Settings,
    *,
    app_id: str | None = None,
    topics: ProcessorTopics | None = None,
    web_port: int | None = None,
    serde: AvroSerde | None = None,
) -> faust.App:
    """Build the Faust app with the ``run_totals`` table and the run-summary processor, whose input is
    consumed through :class:`processors.shell.BatchDelivery` (each fetch's records handled in lists, offsets
    committed up to the records whose insights were delivered and checkpoint written).

    Args:
        settings: broker settings come from ``settings.kafka`` (``session_timeout_ms`` included), the
            data directory from ``settings.state_dir`` (``<state_dir>/faust/<app id>``).
        app_id: Faust app id, also the consumer group and the changelog topic prefix; default
            ``backbone-processors``. Tests pass a unique one.
        topics: the topic names; default the catalogue's.
        web_port: port of Faust's web server; ``None`` takes ``settings.metrics_port``; ``0`` turns it off.
        serde: the Avro serde; default one on the embedded registry (``schemas/registry.json``).

    Returns:
        The app; the shell's counters are at ``app.run_summary_stats`` (a :class:`ProcessorStats`), and
        ``app.run_summary_close()`` releases its dead-letter producer once the app has stopped.

    Raises:
        ValueError: no Kafka bootstrap servers are configured.
    """
    app_id = app_id or DEFAULT_APP_ID
    topics = topics or ProcessorTopics()
    port = settings.metrics_port if web_port is None else web_port
    app = make_faust_app(settings, app_id, partitions=topics.partitions, web_port=port)
    serde = serde or serde_from_settings(settings)
    events_topic = app.topic(
        topics.events, partitions=topics.partitions, key_serializer="raw", value_serializer="raw"
    )
    insights_topic = app.topic(topics.insights, key_serializer="raw", value_serializer="raw")
    # Keys: the run id (str), JSON on the changelog. Faust derives a table's key serializer from its
    # key type (JSON when there is none) and that overrides the schema's, so "json" is what is used
    # either way; "raw" would hand recovered keys back as bytes, which the str lookups would miss.
    table = app.tables.add(
        TailRecoveringTable(
            app,
            kafka=settings.kafka,
            name=TABLE_NAME,
            default=dict,
            beacon=app.tables.beacon,
            partitions=topics.partitions,
            schema=faust.Schema(key_serializer="json", value_serializer="json"),
            help="RunTotals.to_dict() per run id (processors.run_summary).",
        )
    )
    shell = _RunSummaryShell(app, settings, topics, serde, table, insights_topic)

    BatchDelivery(
        app, events_topic, shell.handle_batch, flush=shell.checkpoints.checkpoint,
        max_batch=BATCH_RECORDS, max_buffered=MAX_BUFFERED_RECORDS,
    )  # fmt: skip

    app.on_partitions_revoked.connect(shell.forget)
    app.on_partitions_assigned.connect(shell.forget)

    @app.timer(interval=0.05)
    async def run_summary_settle() -> None:
        """Checkpoint when due (the records waiting for it are committed once it is written)."""
        shell.checkpoints.checkpoint_if_due()

    app.run_summary_stats = shell.stats  # type: ignore[attr-defined]
    app.run_summary_close = shell.close  # type: ignore[attr-defined]
    log.debug(
        "processors_app_created", app_id=app_id, events_topic=topics.events, insights_topic=topics.insights
    )
    return app


def _with_actual_partitions(kafka: KafkaSettings, topics: ProcessorTopics) -> ProcessorTopics:
    """``topics`` with ``partitions`` = the input topic's partition count on the broker when it already
    existed with another one: the run-totals table's changelog must match it, or every agent crashes
    with Faust's ``PartitionsMismatch`` (seen when the input was made with 3 partitions and the worker
    assumed the default 6)."""
    actual = topic_partitions(kafka, topics.events)
    if actual and actual != topics.partitions:
        log.warning("run_summary_partitions_from_topic", topic=topics.events, configured=topics.partitions,
                    actual=actual)  # fmt: skip
        return dataclasses.replace(topics, partitions=actual)
    return topics


def ensure_run_summary_topics(
    kafka: KafkaSettings, topics: ProcessorTopics, *, timeout_seconds: float = 30.0
) -> list[str]:
    """Create the input, insight and dead-letter topics if they do not exist (final partition counts).

    Partitions: ``topics.partitions`` for the input, the catalogue's counts for the others.

    Raises:
        StreamsError: the broker did not answer, or refused a topic (see
            :func:`streams.catalogue.create_missing_topics`).
    """
    return ensure_processor_topics(
        kafka,
        [
            (topics.events, topics.partitions),
            (topics.insights, catalogue_partitions("insights.runs", 3)),
            (topics.dead_letters, catalogue_partitions(DLQ_TOPIC, 1)),
        ],
        timeout_seconds=timeout_seconds,
    )


COUNTERS = (
    ("backbone_processor_records", "records_count", "Records handled (every outcome)"),
    ("backbone_processor_events_applied", "applied_count", "Events folded into a run's totals"),
    ("backbone_processor_events_duplicate", "duplicates_count", "Events skipped as already applied"),
    ("backbone_processor_events_late", "late_count", "Events skipped because their run had finished"),
    ("backbone_processor_insights", "insights_count", "Insights sent"),
    ("backbone_processor_dead_letters", "dead_letters_count", "Records dead-lettered"),
)
"""The run-summary processor's counters as Prometheus metrics (label ``app``)."""


def run_worker(
    settings: Settings | None = None,
    *,
    app_id: str | None = None,
    topics: ProcessorTopics | None = None,
    stop_after_idle_seconds: float | None = None,
    web_port: int | None = None,
    loglevel: str | None = None,
) -> ProcessorStats:
    """Run the processors' Faust worker in this process until it is stopped (blocking).

    Creates the topics first (:func:`ensure_run_summary_topics`) and runs the app in the worker shell
    (:func:`processors.shell.run_processor_worker`). It owns the process's event loop and
    signal handlers (SIGTERM/SIGINT stop it cleanly), so call it from a main thread, e.g. in a
    subprocess: ``backbone processors worker --stop-after-idle 5``.

    Args:
        settings: default: the environment's, completed from a running dev stack.
        app_id: Faust app id (consumer group, changelog prefix); default ``backbone-processors``.
        topics: topic names; default the catalogue's.
        stop_after_idle_seconds: stop once the worker is started (partitions assigned, table
            recovered) and no record has arrived for this many seconds. The demo uses it to know the
            processor has caught up with everything produced before it started. ``None``: run until
            signalled.
        web_port: deprecated (the worker runs without Faust's web server): the port of ``/metrics``,
            ``/healthz`` and ``/readyz`` instead of ``settings.metrics_port``; ``0`` or ``None`` keeps
            ``settings.metrics_port`` (``0`` used to turn Faust's web server off, as deployments still set).
        loglevel: Faust's log level; default ``settings.log_level``.

    Returns:
        The app's counters when the worker has stopped.

    Raises:
        ValueError: no Kafka bootstrap servers are configured.
        StreamsError: a topic cannot be created.
    """
    if settings is None:
        from core.stack import load_settings

        settings = load_settings()  # the environment, completed from a running `backbone dev up`
    topics = topics or ProcessorTopics()
    ensure_run_summary_topics(settings.kafka, topics)
    topics = _with_actual_partitions(settings.kafka, topics)
    app = create_app(settings, app_id=app_id, topics=topics, web_port=0)  # the shell serves /metrics
    stats: ProcessorStats = app.run_summary_stats  # type: ignore[attr-defined]
    if web_port:  # 0 meant "Faust's web server off", which it now always is: nothing to move
        log.warning("processors_web_port_deprecated", metrics_port=web_port,
                    hint="use BACKBONE_METRICS_PORT; /metrics, /healthz and /readyz are served there")  # fmt: skip
    run_processor_worker(
        settings, app, processor=PROCESSOR_NAME, stats=stats, counters=COUNTERS,
        close=app.run_summary_close,  # type: ignore[attr-defined]
        stop_after_idle_seconds=stop_after_idle_seconds, loglevel=loglevel, metrics_port=web_port or None,
    )  # fmt: skip
    return stats


def wait_for_run_summaries(
    settings: Settings,
    run_ids: Iterable[str],
    *,
    topic: str = "insights.runs",
    timeout_seconds: float = 60.0,
    poll_interval_seconds: float = 1.0,
    serde: AvroSerde | None = None,
) -> dict[str, ConsumedEvent]:
    """Wait until ``topic`` holds a ``run.summary`` insight for each run in ``run_ids``.

    Reads the whole topic each round (it is small: one record per finished run); a record that does
    not decode is skipped. Duplicates (same ``insight_id``) keep the first.

    Args:
        settings: broker settings.
        run_ids: the finished runs to wait for.
        topic: the insights topic.
        timeout_seconds: give up after this long.
        poll_interval_seconds: pause between reads.
        serde: default one on the embedded registry.

    Returns:
        ``{run_id: the insight record}`` for every run asked for.

    Raises:
        TimeoutError: some run has no summary after ``timeout_seconds`` (the message names how many).
    """
    wanted = set(run_ids)
    serde = serde or serde_from_settings(settings)
    deadline = time.monotonic() + timeout_seconds
    while True:
        found: dict[str, ConsumedEvent] = {}
        try:
            for record in read_range(
                settings.kafka, serde, topic, idle_timeout_seconds=min(10.0, timeout_seconds)
            ):
                if isinstance(record, ConsumedEvent) and record.schema == INSIGHT_SCHEMA:
                    data = record.data
                    if data.get("kind") == INSIGHT_KIND and str(data.get("entity", "")).startswith("run:"):
                        found.setdefault(data["entity"][len("run:") :], record)
        except KeyError:
            pass  # the topic does not exist yet
        if wanted <= found.keys():
            return {r: found[r] for r in wanted}
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{len(wanted - found.keys())} of {len(wanted)} run summaries missing from {topic!r} "
                f"after {timeout_seconds:.0f} s"
            )
        time.sleep(poll_interval_seconds)


def __getattr__(name: str) -> Any:
    """``processors.run_summary.app.app``: the app built from the environment, for ``faust -A processors.run_summary.app``."""
    if name == "app":
        global app
        app = create_app(get_settings())
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
