"""The anomaly processor's Faust app: metric samples in, ``anomaly.detected`` insights out.

A thin shell around :class:`processors.incidents.anomaly.AnomalyProcessor`; every decision is made there.
Modelled on :mod:`processors.correlation.app` (``processors/shell.py`` did not exist on main when this was
written) with :func:`processors.shell.make_faust_app`, :class:`~processors.shell.FaustDeadLetters`
and :class:`processors.tables.TailRecoveringTable`.

* One consumer of ``telemetry.metrics`` (``sophia.telemetry.SeriesSample``, key = series;
  ``sophia.telemetry.MetricSample``, key = pod, one series per pod and metric), one batch in hand at a time
  (:class:`processors.shell.BatchDelivery`'s task): the key already
  puts every sample of a series on one partition in order, so no repartition is needed and one task owns a
  series' state.
* **Decoding is ours** (``raw`` serializers). Undecodable records (not Avro, no CloudEvents headers),
  another schema, and samples the logic refuses (a value that is not a finite number, no series) go to
  the dead-letter topic with raw bytes, headers and the reason; processing goes on.
* **State**: table ``anomaly_series`` (changelog ``<app id>-anomaly_series-changelog``), key
  ``b"<series>"`` (raw UTF-8; ``pod:<pod>/<metric>`` for a pod's metric), value the JSON state of :class:`~processors.incidents.anomaly.SeriesState`
  (detector, gate, last event time). The in-memory states are caches: dropped on rebalance and reloaded
  from the table on first use.
* **State checkpoints**: a sample changes its series' states in memory; the changed states are written
  to the table together every :data:`CHECKPOINT_RECORDS` records or :data:`CHECKPOINT_SECONDS`, and a
  record's offset is committed only once the checkpoint after it was written (:class:`processors.shell.BatchDelivery`
  commits up to the records whose checkpoint future is done, in order), so Faust never
  commits an offset whose effect is not in the changelog. Writing every touched
  state per sample (a Nezha pod sample touches about 19 series, 13 KB of JSON each) made the changelog
  about 11 GB for one Nezha day and the worker 0.006 of a plain Faust agent. A checkpoint still writes
  each changed state whole (on the Nezha day nearly all 879 series change between two checkpoints), so
  its cost was cut twice (2026-12-04, with the ``likelihood`` detector then the default): that detector's
  two 1,000-value histories are written as base64 of their doubles (``hist_b64``,
  :meth:`processors.incidents.anomaly.LikelihoodDetector.to_dict`; exact, about 22 KB a state, several
  times cheaper to encode than JSON lists of floats), and checkpoints come every 5,000 records or 2 s
  instead of 1,000 or 1 s (py-spy put the checkpoints, with their produce requests, at about a quarter of
  the worker's time before; with the smaller states of ``seasonal-likelihood``, the default since, the
  gain of the longer interval was within the benchmark's noise: README).
* **Batches** (2026-12-05): the records are handled in batches (up to :data:`BATCH_RECORDS`; first the
  agent's, which waited at most 2 ms for the next record with ``InOrderAcks.consume_batches`` (removed 2026-12-06), then
  BatchDelivery's, below) by :meth:`_AnomalyShell._handle`: each is decoded and checked (a bad one dead-lettered at
  once), the good ones are scored together
  (:meth:`processors.incidents.anomaly.AnomalyProcessor.process_many`: the default detector's steady state
  as numpy steps over all series, the same states and insights bit for bit as one record at a time), their
  insights sent together and their deliveries awaited together, and each changed state marked once per
  batch. Before, one record at a time: 0.30 / 0.30 / 0.23 of plain Faust (``bench/bench_incidents.py``,
  main, 2026-12-05); after, with :data:`GC_YOUNG_THRESHOLD` too, 0.46 / 0.51 / 0.60 in the runs
  alternating with those (README). Then the app got :class:`processors.shell.EagerSeekingConsumer` and
  :class:`processors.shell.QuietMonitor` (:func:`processors.shell.make_faust_app`'s defaults since): 0.50 /
  0.65 / 0.68 against 0.52 / 0.37 / 0.48 on main in alternating runs (the first pair beside tests), CPU 137-196
  µs a record against 188-274.
* **BatchDelivery** (since 2026-12-06; the agent above was removed the same day): the records no longer go
  through Faust's per-record path (message, conductor, stream queue, event, ack) but from each fetch, in
  lists of up to :data:`BATCH_RECORDS`, to
  :meth:`_AnomalyShell.handle_records` (the same handling, :meth:`_AnomalyShell._handle`), which returns
  the future of the checkpoint that writes their states; their offsets are committed once it is done.
  ``bench/bench_incidents.py``, main's checkout and the branch's alternating three times (2026-12-06):
  1.23 / 1.29 / 1.29 of plain Faust (9,212 / 9,405 / 9,494 records/s, CPU 160-164 µs a record) against
  0.70 / 0.54 / 0.72 on main (5,030 / 3,894 / 5,287, 236-250 µs), and 1.13 / 1.09 / 1.31 against 0.70 /
  0.64 / 0.69 in three more pairs (163-173 µs against 243-245); the same 368 anomalies (README).
* **Order of effects per batch**: the insights (if any) are sent and their deliveries awaited before the
  batch's states are marked for the checkpoint (and no timer checkpoint is written while a batch is
  handled, :attr:`_AnomalyShell.handling`); a crash in between replays the records after restart and sends
  the same insight ids (a replayed sample at or before its series' checkpointed last event time is
  ignored). Dead letters of a batch are sent before the insights of the records ahead of them in it (other
  topics; the commits stay in record order).
* **Determinism**: event time only; a sample at or before the series' last event time is counted and
  ignored (a redelivery changes nothing).
* **Worker**: :func:`run_anomaly_worker` runs it in the shared worker shell
  (:func:`processors.shell.run_processor_worker`): the counters of :data:`COUNTERS` on ``/metrics``,
  ``/healthz`` and ``/readyz``, stop-when-idle, clean stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import faust
import structlog
from confluent_kafka.admin import AdminClient, NewTopic

from core.settings import Settings
from processors.errors import UnprocessableEventError, UnsupportedEventError
from processors.incidents.anomaly import AnomalyProcessor, DetectorConfig
from processors.shell import (
    BatchDelivery,
    FaustDeadLetters,
    TableCheckpoints,
    make_faust_app,
    message_headers,
    run_processor_worker,
    topic_partitions,
    traced_headers,
    tracing_process,
)
from processors.tables import TailRecoveringTable
from streams.catalogue import create_missing_topics
from streams.consumer import DLQ_TOPIC
from streams.envelope import CloudEvent, Event
from streams.errors import DeserializationError, EnvelopeError
from streams.serde import AvroSerde, serde_from_settings

__all__ = [
    "COUNTERS",
    "DEFAULT_APP_ID",
    "AnomalyStats",
    "AnomalyTopics",
    "create_anomaly_app",
    "run_anomaly_worker",
]

log = structlog.get_logger(__name__)

DEFAULT_APP_ID = "backbone-anomalies"
PROCESSOR_NAME = "anomalies"
TABLE_NAME = "anomaly_series"
METRIC_SCHEMAS = ("sophia.telemetry.SeriesSample", "sophia.telemetry.MetricSample")


@dataclass(frozen=True, slots=True, kw_only=True)
class AnomalyTopics:
    """Topics of the processor: ``metrics`` (input), ``insights`` (output), ``dead_letters``."""

    metrics: str = "telemetry.metrics"
    insights: str = "insights.anomalies"
    dead_letters: str = DLQ_TOPIC
    partitions: int = 6


@dataclass(slots=True)
class AnomalyStats:
    """Counters: records, anomalies sent, out-of-order samples ignored, dead letters.

    Attributes:
        first_record_monotonic: ``time.monotonic()`` when the first record was handled, ``None`` before
            (with ``last_record_monotonic``, the processing rate without the startup).
        last_record_monotonic: ``time.monotonic()`` when the last record was handled, ``None`` before.
    """

    records_count: int = 0
    anomalies_count: int = 0
    out_of_order_count: int = 0
    dead_letters_count: int = 0
    first_record_monotonic: float | None = field(default=None)
    last_record_monotonic: float | None = field(default=None)


COUNTERS = (
    ("backbone_anomaly_records", "records_count", "Metric samples handled (every outcome)"),
    ("backbone_anomaly_anomalies", "anomalies_count", "anomaly.detected insights sent"),
    (
        "backbone_anomaly_out_of_order",
        "out_of_order_count",
        "Samples at or before their series' last event time (ignored)",
    ),
    ("backbone_anomaly_dead_letters", "dead_letters_count", "Records dead-lettered"),
)
"""The anomaly processor's counters as Prometheus metrics (label ``app``)."""


CHECKPOINT_RECORDS = 5000
"""Records after which the changed series states are written to the table (and the records can be committed). A
checkpoint writes every series touched since the last one, whole (a Nezha day: nearly all 879 series
every checkpoint), so its cost per record falls with the records between checkpoints: with the
``likelihood`` detector (about 22 KB a state) 1,000 (and 1 s) made the checkpoints and their produce
requests about a quarter of the worker's time on the Nezha day (py-spy)."""

BATCH_RECORDS = 1000
"""The most records scored together (:meth:`_AnomalyShell.handle_records`); a batch is what
:class:`processors.shell.BatchDelivery` has buffered, so it is smaller when records come slowly."""
MAX_BUFFERED_RECORDS = 20_000
"""Records taken from fetches and not yet handled at which the fetch loop waits."""
GC_YOUNG_THRESHOLD = 10_000
"""The worker's ``gc`` threshold of the youngest generation (Python's default: 700), given to
:func:`processors.shell.run_processor_worker`, which also ``gc.freeze()``s what start-up made. Each record makes many short-lived containers (Faust's
event and message, the decoded sample, its datetimes), so the default collected every few records: on the
Nezha day 2,366 young, 215 middle and 14 full collections took 1.07 s of the worker's CPU (``gc.callbacks``),
with these settings 120, 10 and 1 took 0.29 s. Cycles are still collected, only less often."""
CHECKPOINT_SECONDS = 2.0
"""The longest a handled record waits for the checkpoint that lets it be committed (a timer writes it when idle); also
the most event handling a crash can make the worker redo (its records are read again, their insights
sent again with the same ids)."""


class _AnomalyShell:
    def __init__(self, settings: Settings, topics: AnomalyTopics, config: DetectorConfig, serde: AvroSerde,
                 table: faust.Table, insights: faust.TopicT) -> None:  # fmt: skip
        self.serde, self.table, self.insights = serde, table, insights
        self.processor = AnomalyProcessor(config)
        self.stats = AnomalyStats()
        self.dead_letters = FaustDeadLetters(settings, serde, PROCESSOR_NAME, topics.dead_letters)
        self.checkpoints = TableCheckpoints(
            table, every_records=CHECKPOINT_RECORDS, every_seconds=CHECKPOINT_SECONDS
        )
        self.app_id = settings.kafka.client_id  # replaced by the app's id in create_anomaly_app
        self.handling = False  # True while _handle runs (no timer checkpoint then)
        self._keys: dict[str, bytes] = {}  # series -> table key

    def forget(self, *_: Any, **__: Any) -> None:
        """On rebalance: checkpoint what was handled (a state is only ever ahead of the table by records
        already handled, which a new owner would ignore as replays), then drop the cached states; they
        are reloaded from the table on next use."""
        self.checkpoints.checkpoint()
        self.processor.states.clear()

    async def handle_records(self, records: list[Any]) -> asyncio.Future[None] | None:
        """Records of a :class:`~processors.shell.BatchDelivery` (aiokafka records, in order), handled as
        :meth:`_handle` does; returns the future of the checkpoint that writes their states (their offsets
        are committed once it is done), or None when none of them has a state to write (all dead-lettered:
        delivered already)."""
        with_samples = await self._handle(records)
        if not with_samples:
            return None
        return self.checkpoints.record(len(with_samples))

    async def _handle(self, messages: list[Any]) -> list[int]:
        """Several ``telemetry.metrics`` records (aiokafka records), in order; never raises
        for bad input. Returns the indexes of the records that changed series states (their future is the
        next checkpoint's, :meth:`processors.shell.TableCheckpoints.record`, which the caller takes).

        Each record is decoded and checked (:meth:`~processors.incidents.anomaly.AnomalyProcessor.prepare`;
        a bad one is dead-lettered at once); the good ones are scored together
        (:meth:`~processors.incidents.anomaly.AnomalyProcessor.process_many`: the same states and
        insights as one at a time); their insights are sent in record order and all their deliveries awaited;
        only then are the changed states marked for the next checkpoint and the records counted
        (:class:`processors.shell.TableCheckpoints`). No timer checkpoint is written meanwhile
        (:attr:`handling`): it could write states whose insights are not delivered yet.
        """
        stats, processor, states = self.stats, self.processor, self.processor.states
        now = time.monotonic()
        if stats.first_record_monotonic is None:
            stats.first_record_monotonic = now
        stats.records_count += len(messages)
        self.handling = True
        try:
            prepared: list[tuple[int, Any, datetime, list[tuple[str, float]], str]] = []
            for i, message in enumerate(messages):
                try:
                    attributes = CloudEvent.from_headers(message_headers(message.headers))
                    schema, data = self.serde.decode(message.value)
                    if schema not in METRIC_SCHEMAS:
                        raise UnsupportedEventError(
                            f"schema {schema!r} is not one of {METRIC_SCHEMAS}", event_id=attributes.id
                        )
                    observed_at, samples = processor.prepare(data, attributes.id)
                except (EnvelopeError, DeserializationError, UnprocessableEventError) as exc:
                    await self.dead_letters.publish(message, exc)
                    stats.dead_letters_count += 1
                    log.warning("record_dead_lettered", topic=message.topic, partition=message.partition,
                                offset=message.offset, reason=str(exc), error_type=type(exc).__name__)  # fmt: skip
                    continue
                for series, _ in samples:
                    if series not in states:
                        stored = self.table.get(series.encode())
                        if stored:
                            processor.restore(series, stored)
                prepared.append((i, message, observed_at, samples, attributes.id))
            outcomes = processor.process_many([(at, samples, eid) for _, _, at, samples, eid in prepared])
            # a series' newest record decides its changelog partition (as one mark per record would); the
            # states are taken now, before the awaits below (a rebalance meanwhile empties ``states``)
            marks: dict[str, int] = {}
            for _, message, _, samples, _ in prepared:
                partition = message.partition
                for series, _ in samples:
                    marks[series] = partition
            changed = [(series, partition, states[series]) for series, partition in marks.items()]
            sent: list[tuple[asyncio.Future[Any], Any, Event]] = []
            for (_, message, _, _, _), (insights, out_of_order) in zip(prepared, outcomes, strict=True):
                if out_of_order:
                    stats.out_of_order_count += 1
                for insight in insights:
                    with tracing_process(message, self.app_id):
                        pending = await self.insights.send(
                            key=insight.key.encode(), value=self.serde.encode(insight.schema, insight.data),
                            headers=traced_headers(insight.attributes.to_headers()),
                            timestamp=insight.attributes.time.timestamp(), force=True,
                        )  # fmt: skip
                    sent.append((pending, message, insight))
            for pending, message, insight in sent:
                await pending  # delivered before the state that raised it is recorded
                stats.anomalies_count += 1
                log.info("anomaly_sent", topic=message.topic, partition=message.partition, offset=message.offset,
                         insight_id=insight.attributes.id, entity=insight.key)  # fmt: skip
            keys = self._keys
            for series, partition, state in changed:
                key = keys.get(series)
                if key is None:
                    key = keys[series] = series.encode()
                self.checkpoints.mark(key, partition, state)
            return [i for i, _, _, samples, _ in prepared if samples]
        finally:
            self.handling = False
            stats.last_record_monotonic = time.monotonic()


def create_anomaly_app(
    settings: Settings,
    *,
    app_id: str | None = None,
    topics: AnomalyTopics | None = None,
    config: DetectorConfig | None = None,
    serde: AvroSerde | None = None,
) -> faust.App:
    """Build the app: the ``anomaly_series`` table and the metrics topic consumed in batches through
    :class:`processors.shell.BatchDelivery` (each fetch's records handed in lists to
    :meth:`_AnomalyShell.handle_records`, offsets committed up to the records whose checkpoint was written).

    Returns:
        The app; counters at ``app.anomaly_stats``; ``app.anomaly_close()`` releases the dead-letter producer.

    Raises:
        ValueError: no Kafka bootstrap servers are configured.
    """
    app_id = app_id or DEFAULT_APP_ID
    topics = topics or AnomalyTopics()
    app = make_faust_app(settings, app_id, partitions=topics.partitions, web_port=None)
    serde = serde or serde_from_settings(settings)
    raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
    table = app.tables.add(
        TailRecoveringTable(
            app, kafka=settings.kafka, name=TABLE_NAME, default=dict, key_type=bytes, beacon=app.tables.beacon,
            partitions=topics.partitions, help="One detector state per series: key b'<series>', value JSON.",
        )
    )  # fmt: skip
    shell = _AnomalyShell(
        settings, topics, config or DetectorConfig(), serde, table, app.topic(topics.insights, **raw)
    )
    shell.app_id = app.conf.id
    app.on_partitions_revoked.connect(shell.forget)
    app.on_partitions_assigned.connect(shell.forget)

    metrics = app.topic(topics.metrics, **raw)
    BatchDelivery(
        app, metrics, shell.handle_records, flush=shell.checkpoints.checkpoint, max_batch=BATCH_RECORDS,
        max_buffered=MAX_BUFFERED_RECORDS,
    )  # fmt: skip

    @app.timer(interval=CHECKPOINT_SECONDS / 4)
    async def anomaly_checkpoint() -> None:
        if not shell.handling:
            shell.checkpoints.checkpoint_if_due()

    app.anomaly_stats = shell.stats  # type: ignore[attr-defined]
    app.anomaly_close = shell.dead_letters.close  # type: ignore[attr-defined]
    return app


def run_anomaly_worker(
    settings: Settings,
    *,
    app_id: str | None = None,
    topics: AnomalyTopics | None = None,
    config: DetectorConfig | None = None,
    stop_after_idle_seconds: float | None = None,
    loglevel: str | None = None,
) -> AnomalyStats:
    """Run the worker in this process until stopped (blocking; call it from a main thread), in the worker
    shell (:func:`processors.shell.run_processor_worker`: ``/metrics``, ``/healthz`` and ``/readyz`` on
    ``settings.metrics_host:metrics_port``, stop-when-idle, clean stop on SIGTERM/SIGINT).

    Creates the topics first (the metrics topic with ``topics.partitions``; insights and dead letters with
    the catalogue's counts when listed, else 3 and 1); the table gets the metrics topic's real partition
    count (Faust requires a changelog partitioned like its source).

    Returns:
        The counters once the worker has stopped.

    Raises:
        ValueError: no Kafka bootstrap servers are configured.
        StreamsError: a topic cannot be created.
    """
    topics = topics or AnomalyTopics()
    app_id = app_id or DEFAULT_APP_ID

    # a catalogue name is made as the catalogue says (create_missing_topics), another one as asked
    def spec(name: str, partitions: int) -> NewTopic:
        return NewTopic(name, num_partitions=partitions, replication_factor=1)

    admin = AdminClient(settings.kafka.librdkafka())
    create_missing_topics(admin, [spec(topics.metrics, topics.partitions), spec(topics.insights, 3),
                                  spec(topics.dead_letters, 1)])  # fmt: skip
    # the table's changelog must have the partitions of the input topic, whatever they are
    found = topic_partitions(settings.kafka, topics.metrics)
    if found:
        topics = dataclasses.replace(topics, partitions=found)
    app = create_anomaly_app(settings, app_id=app_id, topics=topics, config=config)
    stats: AnomalyStats = app.anomaly_stats  # type: ignore[attr-defined]
    run_processor_worker(
        settings, app, processor=PROCESSOR_NAME, stats=stats, counters=COUNTERS,
        close=app.anomaly_close,  # type: ignore[attr-defined]
        stop_after_idle_seconds=stop_after_idle_seconds, loglevel=loglevel,
        gc_young_threshold=GC_YOUNG_THRESHOLD,  # and the shell's gc.freeze() once the worker is up
    )  # fmt: skip
    log.info(
        "anomaly_worker_stopped",
        **{k: v for k, v in dataclasses.asdict(stats).items() if not k.endswith("_record_monotonic")},
    )
    return stats
