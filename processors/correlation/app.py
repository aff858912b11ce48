"""The correlation processor's Faust app: Slack messages ↔ commits, as ``correlation.link`` insights.

A thin shell around :mod:`processors.correlation.logic`; every decision is made there. Three stages (the
first and last read in batches by :class:`processors.shell.BatchDelivery`, past Faust's per-record path,
as the incident and anomaly workers do; a Faust agent each until 2026-12-06, when the worker ran at
0.20-0.29 of a plain Faust agent with references only and 1.16 after, ``bench/bench_correlation_worker.py``):

1. ``external.events`` (``sophia.external.ExternalEvent``, key = entity, 3 partitions), up to
   :data:`BATCH_RECORDS` records a batch: decodes the Confluent-framed Avro and the CloudEvents headers,
   keeps ``slack.message`` and ``git.commit`` events (others are counted and skipped), and forwards each
   as a compact JSON observation to the repartition topic, keyed by its correlation scope
   (:func:`~processors.correlation.logic.scope_of`): one record per scope and batch holding a JSON list of
   the bodies in the order read (:func:`processors.shell.pack_bodies`, split under
   :data:`SCOPE_MAX_BYTES`). With ``request_embeddings`` it also produces one
   ``sophia.inference.EmbeddingRequest`` per text to ``inference.requests``, carrying the text
   (``body_excerpt`` of a message, ``title`` of a commit; at most 280 characters) and the deterministic
   request id ``corr:<scope>:<entity>``.
2. The agent ``correlation-results`` (with ``embeddings``) reads ``inference.results``: results whose
   request id is not ``corr:...`` belong to someone else and are skipped; ours are forwarded as vectors
   (one body per record) to the repartition topic, keyed by the scope named in the request id.
3. The repartition topic, in batches, each record a list of bodies or one body: keeps a
   :class:`~processors.correlation.logic.Correlator` per scope, and sends every link it draws as a
   ``sophia.insight.Insight`` to ``insights.correlations`` (key = the commit's entity): by reference,
   by embedding, and (``CorrelationConfig.discussion``) by discussion, decided when the scope's
   event-time watermark passes a message's window.

**Why a repartition topic.** ``external.events`` is keyed by entity, so a message and the commit it names
sit on different partitions, and the embedding of a text arrives on a third topic keyed by request id.
A join needs every piece of a scope in one place. The first two agents re-key everything by scope onto
``<app id>-by-scope-repartition`` (what Faust's ``group_by`` does, written out so that a record is
decoded and dead-lettered once, at the edge, and only what the join needs travels on), so one partition
of that topic, and one task, sees a whole scope, in a total order, and its table partition holds the
whole scope's state. Scopes spread over the topic's partitions; one scope is not split (a workspace and
its organisation's repositories are small enough: a year of the Racket workspace and racket/racket is
about 11,000 items).

* **Decoding is ours** (``raw`` serializers) and bad records go to the dead-letter topic through
  :class:`streams.consumer.DeadLetterPublisher` with raw bytes, headers and the reason; processing goes
  on. Undecodable: not Avro, no CloudEvents headers. Unprocessable: another schema, a commit entity
  without a SHA, a malformed embedding.
* **State.** The table ``correlation_items`` (``store="memory://"``, changelog
  ``<app id>-correlation_items-changelog``, partitions = the repartition topic's) holds one item per
  entity, key ``b"<scope>|<entity>"`` (``bytes``, written raw, UTF-8, on the changelog): value
  ``{"obs": Observation.to_dict(), "vector": base64 float32, "source": "<events topic>/<partition>"}``
  (JSON on the changelog; ``source`` is where the event was read, for the discussion watermark). Items of
  entities the scope's retention dropped (``CorrelationConfig.retention``: messages 90 days, commits 365
  days behind the scope's watermark; a vector whose event never came, 90 days of watermark after it
  came) are deleted at the next checkpoint (a tombstone on the changelog), so the table holds what the
  correlators hold, not the whole history. The in-memory
  correlators are caches of it: dropped on every rebalance and rebuilt from the table's items of
  their scope on first use (the table is recovered from its changelog before agents run). The
  discussion linker's pending messages are rebuilt the same way: the restored watermark is the smallest of
  the source partitions' largest event times among the items, and every message whose deadline lies
  behind it counts as decided (its link was sent before the item that moved the watermark was written,
  see the order of effects below).
* **A scope's watermark per source partition** (it decides discussion links and moves the retention;
  with neither, ``--no-discussion --retention-days 0``, there is none). The repartition topic merges the partitions of
  ``external.events`` in whatever order the forwarder reads them, and a replay reads one partition far
  ahead of another (on the Racket year, 7,743 of 10,954 events arrived more than a day behind the largest
  event time seen). So each forwarded event carries its source partition, and the discussion watermark
  is the smallest of the active partitions' largest event times, waiting until every partition of the
  events topic (its count read from the broker at start) has been heard from or is idle. Every scope
  hears every partition: after each batch the first stage sends a progress marker (``{"type":
  "progress", "sources": {"<topic>/<partition>": largest event time read, ms}, "drained": [...]}``, over
  every scope's events of the batch) to every partition of the repartition topic, after the batch's
  bodies, and the scoped stage moves the watermark of each scope seen on that partition. Until
  2026-12-06 a scope heard only its own events, so a scope quiet on one partition (a small workspace, or
  one whose events hash to two of three partitions) never had its messages decided. Each partition must
  be in event-time order within the allowed lateness (an import should produce in time order).
  **Idleness** (2026-12-07; before, a partition that fell silent, or never held a record, held every
  discussion decision and the retention back for good): a partition whose last record read reached the
  consumer's fetch high watermark is ``drained`` (in the batch's marker, or in one sent by a timer every
  :data:`DRAIN_CHECK_SECONDS` once a partition is read to its end), and a partition with nothing to read
  past the group's committed offset at start is idle from the start
  (:func:`processors.shell.partitions_with_records`); an idle partition does not hold the watermark
  back until its next record (:class:`~processors.correlation.watermark.SourceWatermark`). On a replay
  of a fixed history a partition drains only after its last record, so the links do not depend on it;
  live, a partition that speaks again behind the watermark has its events counted late. The persisted
  progress keeps the scope's watermark too (``"watermark"``), which idleness may have moved past the
  partitions' maxima, so a restarted worker does not decide a message twice, and the idle partitions
  (``"idle"``), which the worker that next owns the repartition partition takes back. Each scope's read progress is persisted as the
  table item ``<scope>|#progress`` (written after the links the marker completed), so a restarted
  worker's watermark takes it back with the items' and does not decide again what it sent; the item
  names the scope's repartition partition, so a restarted worker follows the markers of a scope quiet
  since the restart too (its pending messages decided, its retention applied) instead of waiting for an
  event of its own (before 2026-12-07 it waited). It is a
  :class:`processors.tables.TailRecoveringTable`: after Faust's recovery it reads each changelog
  partition to its real end (Tansu's ``ListOffsets`` stops Faust one batch short), so a restarted
  worker finds every item; if that read fails the worker stops.
* **Order of effects per batch**: the batch's insights are sent and their delivery awaited (once) before
  its new items are marked for the table's next checkpoint (:class:`processors.shell.TableCheckpoints`,
  every :data:`CHECKPOINT_RECORDS` items or :data:`CHECKPOINT_SECONDS`, and before a rebalance), and the
  batch's offsets are committed only once that checkpoint is written; the first stage's offsets once its
  forwards and embedding requests are delivered. A crash in between re-reads the records after restart,
  draws the same links and sends them again with the same ids (subscribers de-duplicate by
  ``insight_id``).
* **Determinism**: event time only. The one wall-clock value is ``requested_at`` of an embedding request
  (the inference topics keep a week and measure latency from it); it decides nothing.
* One task per stage (the results agent ``concurrency=1``, faust-streaming #606); scale with partitions and
  workers.

Run it with ``backbone processors correlate`` (:mod:`backbone.cli.correlation`); with
``stop_after_idle_seconds`` it returns once no record has arrived for that long after recovery, and with
``close_at_end`` too it first decides the messages still waiting for their window, as at the end of event
time (a replay of a finished history; :meth:`_CorrelationShell.close_at_end`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import faust
import structlog
from faust.types import TP

from core.settings import KafkaSettings, Settings
from inference.records import RESULT_SCHEMA, EmbeddingRequest, EmbeddingResult, request_event
from processors.correlation.logic import (
    EXTERNAL_SCHEMA,
    CorrelationConfig,
    Correlator,
    Link,
    Observation,
    decode_vector_b64,
    encode_vector_b64,
    observe,
    parse_request_id,
    request_id_for,
    scope_of,
)
from processors.correlation.masked import DiscussionLinker
from processors.errors import UnprocessableEventError, UnsupportedEventError
from processors.shell import (
    BatchDelivery,
    DrainTracker,
    FaustDeadLetters,
    TableCheckpoints,
    catalogue_partitions,
    ensure_processor_topics,
    make_faust_app,
    message_headers,
    pack_bodies,
    partitions_with_records,
    run_processor_worker,
    topic_partitions,
    traced_headers,
    tracing_process,
)
from processors.tables import TailRecoveringTable
from streams.consumer import DLQ_TOPIC
from streams.envelope import CloudEvent
from streams.errors import DeserializationError, EnvelopeError
from streams.serde import AvroSerde, serde_from_settings

__all__ = [
    "DEFAULT_APP_ID",
    "PROCESSOR_NAME",
    "CorrelationStats",
    "CorrelationTopics",
    "create_correlation_app",
    "ensure_correlation_topics",
    "run_correlation_worker",
]

log = structlog.get_logger(__name__)

DEFAULT_APP_ID = "backbone-correlation"
GC_YOUNG_THRESHOLD = 10_000
BATCH_RECORDS = 1000
DRAIN_CHECK_SECONDS = 1.0
"""How often the worker looks for events partitions read to their end after their last record (``drained``
markers: the scopes' watermarks stop waiting for them)."""
PROGRESS_ENTITY = "#progress"
"""The table entity (``<scope>|#progress``) that persists a scope's read progress (no entity starts with ``#``)."""
"""Most records a batch of either stage hands to its handler (:class:`processors.shell.BatchDelivery`)."""
SCOPE_MAX_BYTES = 256 * 1024
"""Largest repartition record (a JSON list of bodies; a larger list is split, one body is sent whatever its
size), under the brokers' default 1 MiB message limit."""
CHECKPOINT_RECORDS = 1000
"""Items marked after which the table's changed items are written (:class:`processors.shell.TableCheckpoints`)."""
CHECKPOINT_SECONDS = 1.0
"""The longest a handled item waits for its checkpoint (a timer writes it when idle)."""
"""The collector's youngest-generation threshold while the worker runs (Python's default 700): the
worker makes many short-lived dicts and arrays per record (the anomaly worker uses the same)."""
PROCESSOR_NAME = "correlation"
TABLE_NAME = "correlation_items"


@dataclass(frozen=True, slots=True, kw_only=True)
class CorrelationTopics:
    """The topics of the correlation processor (configurable for tests).

    Attributes:
        events: input, ``sophia.external.ExternalEvent`` keyed by entity.
        results: input, ``sophia.inference.EmbeddingResult`` keyed by request id.
        requests: output, ``sophia.inference.EmbeddingRequest`` (when requesting embeddings).
        insights: output, ``sophia.insight.Insight`` keyed by entity.
        dead_letters: where undecodable or unprocessable records go.
        scope_partitions: partitions of the repartition topic and of the table's changelog.
        events_partitions: partitions of the events topic; a scope's watermark (its discussion decisions
            and its retention) waits for an event from each (:func:`run_correlation_worker` reads the count
            from the broker). None: it follows the partitions seen so far, so at start a partition read
            first can make another's events late, or older than the retention.
        events_idle: partitions of the events topic with nothing to read when the worker starts (read to
            their end past the group's committed offset; :func:`run_correlation_worker` asks the broker,
            :func:`processors.shell.partitions_with_records`): idle from the start, so the watermark does
            not wait for them, until their first record.
    """

    events: str = "external.events"
    results: str = "inference.results"
    requests: str = "inference.requests"
    insights: str = "insights.correlations"
    dead_letters: str = DLQ_TOPIC
    scope_partitions: int = 3
    events_partitions: int | None = None
    events_idle: frozenset[int] = frozenset()

    def scope_topic(self, app_id: str) -> str:
        """Name of the repartition topic of the app ``app_id``."""
        return f"{app_id}-by-scope-repartition"


@dataclass(slots=True)
class CorrelationStats:
    """Counters of one app instance (in memory, for logs, tests, metrics and idle detection).

    Attributes:
        records_count: records handled by any agent (every outcome).
        events_count: messages and commits forwarded by scope.
        vectors_count: embeddings of ours forwarded by scope.
        skipped_count: events of other kinds and results of other requesters.
        requests_count: embedding requests produced.
        duplicates_count: observations or vectors already known to their scope.
        reference_links_count: ``reference`` links sent.
        embedding_links_count: ``embedding`` links sent.
        discussion_links_count: ``discussion`` links sent (masked linker, see ``CorrelationConfig.discussion``).
        discussion_late_count: messages and commits that reached their scope's discussion linker more than
            ``allowed_lateness`` behind its watermark (their effect on decisions already made is not redone).
        expired_count: messages and commits the scopes' retention dropped (their table items deleted; see
            ``CorrelationConfig.retention``).
        too_old_count: messages and commits older than their scope's retention when they arrived (their
            reference links with what the scope holds were sent; they were not kept).
        dead_letters_count: records dead-lettered.
        drained_count: partitions of the events topic found read to their end after a record (each time),
            told to the scopes as idle (see :class:`~processors.correlation.watermark.SourceWatermark`).
        closed_at_end_count: messages decided at the end of a bounded input (``close_at_end``) before their
            window closed in event time, linked or not.
        first_record_monotonic: ``time.monotonic()`` of the first record handled, ``None`` before (with the
            last, a rate without the start-up; ``bench/bench_correlation_worker.py``).
        last_record_monotonic: ``time.monotonic()`` of the last record handled, ``None`` before.
    """

    records_count: int = 0
    events_count: int = 0
    vectors_count: int = 0
    skipped_count: int = 0
    requests_count: int = 0
    duplicates_count: int = 0
    reference_links_count: int = 0
    embedding_links_count: int = 0
    discussion_links_count: int = 0
    discussion_late_count: int = 0
    expired_count: int = 0
    too_old_count: int = 0
    dead_letters_count: int = 0
    drained_count: int = 0
    closed_at_end_count: int = 0
    first_record_monotonic: float | None = field(default=None)
    last_record_monotonic: float | None = field(default=None)


class _Item:
    """A table item for :class:`processors.shell.TableCheckpoints` (which writes ``to_dict()``); ``None``
    deletes the key (a tombstone on the changelog)."""

    __slots__ = ("value",)

    def __init__(self, value: dict[str, Any] | None) -> None:
        self.value = value

    def to_dict(self) -> dict[str, Any] | None:
        return self.value


def _source_of(body: dict[str, Any]) -> str | None:
    """``<topic>/<partition>`` of the ``external.events`` record a forwarded event came from (None for a
    body without one): the discussion watermark follows the slowest of these."""
    src = body.get("source")
    return f"{src[0]}/{src[1]}" if isinstance(src, list) and len(src) >= 2 else None


class _CorrelationShell:
    """The agents' bodies: decode, re-key, join, send, dead-letter. One per app."""

    def __init__(
        self,
        settings: Settings,
        topics: CorrelationTopics,
        config: CorrelationConfig,
        serde: AvroSerde,
        table: faust.Table,
        channels: dict[str, faust.TopicT],
        request_embeddings: bool,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.config = config
        self.serde = serde
        self.table = table
        self.channels = channels
        self.request_embeddings = request_embeddings
        self.stats = CorrelationStats()
        self.correlators: dict[str, Correlator] = {}
        self.scope_partitions: dict[str, int] = {}  # scope -> the repartition partition its records came on
        self._adopted: set[int] = set()  # repartition partitions whose quiet scopes were taken from the table
        # the table's items as of the first restore after an assignment, by the key's part before its first
        # "|", and its scopes' progress items: one scan for every scope it restores (see _scope_items)
        self._index: dict[bytes, list[tuple[bytes, Any]]] | None = None
        self._progress_items: list[tuple[bytes, Any]] = []
        self.dead_letters = FaustDeadLetters(settings, serde, PROCESSOR_NAME, topics.dead_letters)
        self.checkpoints = TableCheckpoints(
            table, every_records=CHECKPOINT_RECORDS, every_seconds=CHECKPOINT_SECONDS
        )
        self.handling = False  # True while a batch of the repartition topic is handled (no timer checkpoint)
        self.app_id = settings.kafka.client_id  # replaced by the app's id in create_correlation_app
        # the events partitions read to their end (the app sets its high-watermark reader)
        self.drains = DrainTracker()
        # the repartition partitions this worker owns now (set by the app from its consumer's assignment)
        self.owned_scope_partitions: Callable[[], set[int]] = lambda: set()
        # per repartition partition: the events sources its markers last said are idle (read to their end)
        idle = {f"{topics.events}/{p}" for p in topics.events_idle}
        self.idle_sources: dict[int, set[str]] = {p: set(idle) for p in range(topics.scope_partitions)}
        self._start_idle = idle  # idle at this worker's start; forgotten at its first rebalance mid-run

    def _touch(self) -> None:
        self.stats.records_count += 1
        self.stats.last_record_monotonic = time.monotonic()
        if self.stats.first_record_monotonic is None:
            self.stats.first_record_monotonic = self.stats.last_record_monotonic

    def forget(self, *_: Any, **__: Any) -> None:
        """On rebalance: write the items handled so far (their links were delivered), then drop the
        in-memory correlators; they are rebuilt from the table on next use."""
        self.checkpoints.checkpoint()
        self.correlators.clear()
        self._index = None  # the assignment changes what the table holds
        self._progress_items = []
        if self._adopted:  # a rebalance after markers were read: what was idle at start may have spoken
            self._start_idle = set()
        self._adopted.clear()

    def _adopt_quiet_scopes(self, partition: int) -> None:
        """Once per assignment of a repartition ``partition``: every scope whose persisted progress names it
        (``<scope>|#progress``, ``"partition"``) is followed by its markers from now on, not only the scopes
        whose records this process read. A scope quiet since a restart so still has its pending messages
        decided and its retention applied as the other scopes' events move its watermark (before, it waited
        for an event of its own). The partition's idle sources are taken back from that progress too
        (``"idle"``, as of the last marker checkpointed, which the partition's committed offset follows),
        with the sources idle at this worker's start until its first rebalance."""
        if partition in self._adopted:
            return
        self._adopted.add(partition)
        suffix = f"|{PROGRESS_ENTITY}".encode()
        persisted: set[str] | None = None
        for raw_key, value in self._scope_progress():
            if isinstance(value, dict) and value.get("partition") == partition:
                self.scope_partitions.setdefault(raw_key[: -len(suffix)].decode(), partition)
                if persisted is None and isinstance(value.get("idle"), list):
                    persisted = {str(source) for source in value["idle"]}
        if persisted is not None:
            self.idle_sources[partition] = persisted | self._start_idle

    def _decode(self, message: Any) -> tuple[CloudEvent, str, dict[str, Any], list[tuple[str, bytes | None]]]:
        headers = message_headers(message.headers)
        attributes = CloudEvent.from_headers(headers)
        schema, data = self.serde.decode(message.value)
        return attributes, schema, data, headers

    async def handle_event_records(self, records: list[Any]) -> asyncio.Future[Any] | None:
        """``external.events`` records of a :class:`~processors.shell.BatchDelivery` (aiokafka records, in
        order): forward the messages and commits by scope, each scope's in one repartition record holding
        a JSON list of bodies in the order read (split under :data:`SCOPE_MAX_BYTES`); dead-letter what
        cannot be read (delivered before the next record is handled). Never raises for bad input.

        Returns:
            The future of the forwards and embedding requests (the batch's offsets are committed once it is
            done), or None when nothing was forwarded."""
        by_scope: dict[str, list[dict[str, Any]]] = {}
        futures: list[Any] = []
        progress: dict[str, int] = {}  # source partition -> largest event time read in this batch (ms)
        last: dict[tuple[str, int], int] = {}  # (topic, partition) -> offset of its last record in the batch
        for message in records:
            with tracing_process(message, self.app_id):  # an embedding request carries the record's trace
                forwarded = await self._forward(message, futures, progress)
            if forwarded is not None:
                by_scope.setdefault(forwarded[0], []).append(forwarded[1])
            last[(message.topic, message.partition)] = message.offset
        scope_topic = self.channels["scope"]
        for scope, bodies in by_scope.items():
            for packed, _ in pack_bodies(bodies, SCOPE_MAX_BYTES):
                futures.append(await scope_topic.send(key=scope.encode(), value=packed))
        if self.config.keeps_watermark:
            drained: list[str] = []
            for (topic, partition), offset in last.items():
                tp, source = TP(topic, partition), f"{topic}/{partition}"
                at_end = self.drains.at_end(tp, offset)
                self.drains.note(tp, source, offset, at_end)
                if at_end:
                    drained.append(source)
            if progress or drained:
                futures += await self._send_marker(progress, drained)
        return asyncio.gather(*futures) if futures else None

    async def _send_marker(self, progress: dict[str, int], drained: list[str]) -> list[Any]:
        """A progress marker (``{"type": "progress", "sources": {source: largest event time read, ms},
        "drained": [source read to its end, ...]}``) to every partition of the repartition topic, after
        the bodies already sent: each scope's watermark follows every partition of the events topic, not
        only the partitions and times of its own events. Returns the sends' futures."""
        body: dict[str, Any] = {"type": "progress", "sources": progress}
        if drained:
            body["drained"] = drained
            self.stats.drained_count += len(drained)
        marker = json.dumps(body).encode()
        scope_topic = self.channels["scope"]
        return [
            await scope_topic.send(key=b"", value=marker, partition=partition)
            for partition in range(self.topics.scope_partitions)
        ]

    async def send_drain_markers(self) -> None:
        """Tell the scopes of each events partition now read to its end whose last record was not known as
        its last when it was forwarded (the high watermark was unknown, or more records were written
        since and are read now): a ``drained`` marker after the records already sent, so it never
        overtakes them."""
        drained = list(self.drains.found_drained())  # (nothing is noted without a watermark)
        if drained:
            await self._send_marker({}, drained)

    async def _forward(
        self, message: Any, futures: list[Any], progress: dict[str, int]
    ) -> tuple[str, dict[str, Any]] | None:
        """One ``external.events`` record: its scope and repartition body, or None (skipped or
        dead-lettered); its embedding request's future goes to ``futures``, and its event time (any kind)
        into ``progress`` (its partition's largest in the batch, epoch ms)."""
        self._touch()
        try:
            attributes, schema, data, _ = self._decode(message)
            if schema != EXTERNAL_SCHEMA:
                raise UnsupportedEventError(
                    f"schema {schema!r} is not {EXTERNAL_SCHEMA}", event_id=attributes.id
                )
            occurred = data.get("occurred_at")
            if isinstance(occurred, datetime) and occurred.tzinfo is not None:
                source = f"{message.topic}/{message.partition}"
                progress[source] = max(progress.get(source, -(2**62)), int(occurred.timestamp() * 1000))
            obs = observe(data, attributes.id)
            scope = scope_of(obs.entity, self.config.scopes) if obs is not None else ""
        except (EnvelopeError, DeserializationError, UnprocessableEventError) as exc:
            await self._dead_letter(message, exc)
            log.warning("record_dead_lettered", topic=message.topic, partition=message.partition,
                        offset=message.offset, reason=str(exc), error_type=type(exc).__name__)  # fmt: skip
            return None
        if obs is None:
            self.stats.skipped_count += 1
            return None
        body = {
            "type": "event",
            "obs": obs.to_dict(),
            "source": [message.topic, message.partition, message.offset],
        }
        self.stats.events_count += 1
        if self.request_embeddings and obs.text.strip():
            # the text itself, not a text_ref: the processor holds it already, and a reference makes every
            # inference actor read it back from the log
            request = EmbeddingRequest(
                request_id=request_id_for(scope, obs.entity), text=obs.text, requested_at=datetime.now(UTC)
            )
            event = request_event(request, source="/processors/correlation")
            futures.append(await self.channels["requests"].send(
                key=event.key.encode(), value=self.serde.encode(event.schema, event.data),
                headers=traced_headers(event.attributes.to_headers()),
            ))  # fmt: skip
            self.stats.requests_count += 1
        return scope, body

    async def handle_result(self, message: Any) -> None:
        """An ``inference.results`` record: forward one of our embeddings by scope; skip others'."""
        self._touch()
        bound = log.bind(topic=message.topic, partition=message.partition, offset=message.offset)
        try:
            attributes, schema, data, _ = self._decode(message)
            if schema != RESULT_SCHEMA:
                raise UnsupportedEventError(
                    f"schema {schema!r} is not {RESULT_SCHEMA}", event_id=attributes.id
                )
            owner = parse_request_id(str(data.get("request_id", "")))
            if owner is None:
                self.stats.skipped_count += 1
                return
            try:
                result = EmbeddingResult.from_avro(data)
            except (KeyError, ValueError) as exc:
                raise UnprocessableEventError(
                    f"malformed embedding result: {exc}", event_id=attributes.id
                ) from exc
        except (EnvelopeError, DeserializationError, UnprocessableEventError) as exc:
            await self._dead_letter(message, exc)
            bound.warning("record_dead_lettered", reason=str(exc), error_type=type(exc).__name__)
            return
        scope, entity = owner
        body = {"type": "vector", "entity": entity, "vector": encode_vector_b64(result.vector),
                "model": f"{result.model_name}@{result.model_version}"}  # fmt: skip
        await self.channels["scope"].send(key=scope.encode(), value=json.dumps(body).encode())
        self.stats.vectors_count += 1

    def _correlator(self, scope: str, partition: int | None = None) -> Correlator:
        """The scope's correlator, rebuilt from the table's items of the scope on first use: its watermark's
        sources idle as the last markers read on the scope's repartition ``partition`` said (default: the
        partition its records came on), and at least the persisted watermark."""
        corr = self.correlators.get(scope)
        if corr is None:
            sources = None
            if self.topics.events_partitions is not None:
                sources = [f"{self.topics.events}/{p}" for p in range(self.topics.events_partitions)]
            corr = Correlator(self.config, sources)
            prefix = f"{scope}|".encode()
            items = []
            progress: dict[str, datetime] = {}
            watermark: datetime | None = None
            for raw_key, value in self._scope_items(scope):
                if raw_key == prefix + PROGRESS_ENTITY.encode() and value:
                    progress = {
                        k: datetime.fromtimestamp(int(v) / 1000, UTC) for k, v in value["progress"].items()
                    }
                    if value.get("watermark") is not None:
                        watermark = datetime.fromtimestamp(int(value["watermark"]) / 1000, UTC)
                elif raw_key.startswith(prefix) and value:
                    obs = Observation.from_dict(value["obs"]) if value.get("obs") else None
                    vector = decode_vector_b64(value["vector"]) if value.get("vector") else None
                    items.append((obs, vector, raw_key[len(prefix) :].decode(), value.get("source")))
            at = partition if partition is not None else self.scope_partitions.get(scope)
            idle = self.idle_sources.get(at, set()) if at is not None else set()
            corr.restore(items, progress, watermark=watermark, idle=sorted(idle))
            self.correlators[scope] = corr
            log.info("correlation_scope_restored", scope=scope, items=len(items))
        return corr

    def _scope_index(self) -> dict[bytes, list[tuple[bytes, Any]]]:
        """The table's items by the key's part before its first ``|`` (and the ``#progress`` items in
        ``_progress_items``), from one scan on the first call after an assignment (:meth:`forget` drops
        it). Restoring S scopes of a table of N items so reads it once, O(N), instead of once per scope,
        O(S * N). The index needs no update while in use: a scope's items are written only once its
        correlator exists, and that correlator is not rebuilt before the next assignment."""
        if self._index is None:
            index: dict[bytes, list[tuple[bytes, Any]]] = {}
            suffix = f"|{PROGRESS_ENTITY}".encode()
            progress: list[tuple[bytes, Any]] = []
            for key, value in self.table.data.items():
                raw_key = key if isinstance(key, bytes) else str(key).encode()
                index.setdefault(raw_key.split(b"|", 1)[0], []).append((raw_key, value))
                if raw_key.endswith(suffix):
                    progress.append((raw_key, value))
            self._index, self._progress_items = index, progress
        return self._index

    def _scope_progress(self) -> list[tuple[bytes, Any]]:
        """The table's ``<scope>|#progress`` items (raw key, value) as of the scan of :meth:`_scope_index`
        (made now if this assignment has none yet)."""
        self._scope_index()
        return self._progress_items

    def _scope_items(self, scope: str) -> list[tuple[bytes, Any]]:
        """The table's items (raw key, value) of ``scope`` (keys ``<scope>|<entity>``; a scope holds no
        ``|``, see :func:`~processors.correlation.logic.scope_of`), taken out of the index: the scope's
        correlator holds them from now on."""
        return self._scope_index().pop(scope.encode(), [])

    async def handle_scoped_records(self, records: list[Any]) -> asyncio.Future[Any] | None:
        """Repartition records of a :class:`~processors.shell.BatchDelivery` (each a JSON list of bodies, or
        one body as the results agent and earlier versions write), in order: join each body with its
        scope's state, send the links the batch drew and wait for their delivery (once for the batch),
        then mark the new items for the table's next checkpoint. Never raises for bad input (a record
        that cannot be read is dead-lettered).

        Returns:
            The future of the checkpoint that writes the batch's items (its offsets are committed once it
            is done), or None when the batch changed no item."""
        self.handling = True
        try:
            links: list[Link] = []
            items: list[tuple[bytes, int, dict[str, Any]]] = []
            for message in records:
                self._touch()
                scope = (
                    message.key.decode("utf-8", "replace")
                    if isinstance(message.key, bytes)
                    else str(message.key)
                )
                try:
                    payload = json.loads(message.value)
                except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
                    await self._dead_letter_scoped(message, scope, exc)
                    continue
                bodies = payload if isinstance(payload, list) else [payload]
                for i, body in enumerate(bodies):
                    try:
                        if isinstance(body, dict) and body.get("type") == "progress":
                            moved, marks = self._progress(message.partition, body)
                            links += moved
                            items += marks
                            continue
                        done = self._join(scope, body, message.partition)
                    except (ValueError, KeyError, TypeError, OverflowError) as exc:
                        # the record (raw bytes) once per bad body, the body named; its other bodies go on
                        reason = UnprocessableEventError(
                            f"body {i + 1} of {len(bodies)}: {type(exc).__name__}: {exc}"
                        )
                        await self._dead_letter_scoped(message, scope, reason)
                        continue
                    if done is not None:
                        links += done[0]
                        if done[1] is not None:
                            items.append((done[1], message.partition, done[2]))
            await self._send_links(links)
            for link in links:
                log.info("correlation_link_sent", insight_id=link.insight_id, method=link.method,
                         message=link.message.entity, commit=link.commit.entity, cosine=link.cosine,
                         score=link.score)  # fmt: skip
            for key, partition, item in items:
                self.checkpoints.mark(key, partition, _Item(item))
            deleted = self._expired_items()
            for key, partition in deleted:
                self.checkpoints.mark(key, partition, _Item(None))
            changed = len(items) + len(deleted)
            return self.checkpoints.record(changed) if changed else None
        finally:
            self.handling = False

    def _expired_items(self) -> list[tuple[bytes, int]]:
        """The table keys (and repartition partitions) of the entities the scopes' retention dropped since
        the last call, to delete after the batch's items (counted in ``expired_count``)."""
        out: list[tuple[bytes, int]] = []
        for scope, corr in self.correlators.items():
            if not corr.expired:
                continue
            partition = self.scope_partitions.get(scope)
            if partition is not None:
                out += [(f"{scope}|{entity}".encode(), partition) for entity in corr.expired]
                self.stats.expired_count += len(corr.expired)
                corr.expired.clear()
        return out

    async def _dead_letter_scoped(self, message: Any, scope: str, exc: Exception) -> None:
        await self._dead_letter(message, exc)
        log.warning("record_dead_lettered", topic=message.topic, partition=message.partition, offset=message.offset,
                    scope=scope, reason=str(exc), error_type=type(exc).__name__)  # fmt: skip

    def _progress(
        self, partition: int, body: dict[str, Any]
    ) -> tuple[list[Link], list[tuple[bytes, int, dict[str, Any]]]]:
        """A progress marker (``{"type": "progress", "sources": {"<topic>/<partition>": epoch ms},
        "drained": ["<topic>/<partition>", ...]}``, sent to every partition after each batch of the first
        stage, and by its drain timer): move the watermark of every scope seen on this repartition
        ``partition`` (the drained sources idle until their next event). Returns the discussion links it
        completes and, per scope, the table item that persists the scope's read progress (key
        ``<scope>|#progress``, value ``{"progress": {source: epoch ms}, "watermark": epoch ms, "partition":
        this partition, "idle": [source, ...]}``), written after the links, so a restarted worker's watermark takes it back and
        does not decide again what was sent, and follows the scope's markers before it speaks again.

        Raises:
            ValueError, TypeError, OverflowError: a malformed marker.
        """
        sent = {str(k): int(v) for k, v in dict(body["sources"]).items()}
        drained = [str(d) for d in body.get("drained") or ()]
        sources = {k: datetime.fromtimestamp(v / 1000, UTC) for k, v in sent.items()}
        self._adopt_quiet_scopes(partition)
        idle = self.idle_sources.setdefault(partition, set())
        idle.difference_update(sent)
        idle.update(drained)
        links: list[Link] = []
        marks: list[tuple[bytes, int, dict[str, Any]]] = []
        for scope, at in list(self.scope_partitions.items()):
            if at != partition:
                continue
            corr = self._correlator(scope, partition)
            links += corr.progress(sources, drained)
            marks.append(self._progress_item(scope, partition, corr, sent))
        return links, marks

    def _progress_item(
        self, scope: str, partition: int, corr: Correlator, sent: Mapping[str, int]
    ) -> tuple[bytes, int, dict[str, Any]]:
        """The scope's ``#progress`` table item (see :meth:`_progress`) with the sources' progress of
        ``sent`` (epoch ms) folded into what it holds (pending or written)."""
        key = f"{scope}|{PROGRESS_ENTITY}".encode()
        pending = self.checkpoints.dirty.get(key)
        known = dict(
            (pending[1].value if pending is not None else self.table.data.get(key) or {}).get("progress")
            or {}
        )
        for source, ms in sent.items():
            known[source] = max(int(known.get(source, ms)), ms)
        item = {
            "progress": known,
            "watermark": corr.clock.watermark_ms,
            "partition": partition,
            "idle": sorted(corr.clock.idle),
        }
        return key, partition, item

    async def close_at_end(self) -> None:
        """The end of a bounded input (``close_at_end``, at the idle stop of a replay): every scope of the
        repartition partitions this worker owns decides the messages still waiting for their window
        (:meth:`Correlator.close`), their links are sent, and the scope's progress item, written at once,
        keeps the watermark moved past their deadlines. A restart of the same consumer group so does not
        decide them again; an event it reads later, older than that watermark by more than the allowed
        lateness, is counted late. What a live worker would have decided with events still to come may
        differ: use it for a replay of a finished history (an audit), not for a live group."""
        if not self.config.keeps_watermark:
            return
        owned = sorted(self.owned_scope_partitions())
        for partition in owned:
            self._adopt_quiet_scopes(partition)
        links: list[Link] = []
        marks = []
        closed = 0
        for scope, partition in sorted(self.scope_partitions.items()):
            if partition not in owned:
                continue
            corr = self._correlator(scope, partition)
            closed += corr.discussion.pending_count if corr.discussion is not None else 0
            links += corr.close()
            marks.append(self._progress_item(scope, partition, corr, {}))
        await self._send_links(links)
        for key, partition, item in marks:
            self.checkpoints.mark(key, partition, _Item(item))
        for key, partition in self._expired_items():
            self.checkpoints.mark(key, partition, _Item(None))
        self.checkpoints.checkpoint()
        self.stats.closed_at_end_count += closed
        log.info("correlation_closed_at_end", scopes=len(marks), decided=closed, links=len(links))

    def _join(
        self, scope: str, body: Any, partition: int
    ) -> tuple[list[Link], bytes | None, dict[str, Any]] | None:
        """Join one repartition body with its scope's correlator: ``(links, table key, new item)`` (key None
        for an event older than the scope's retention: its links, nothing kept), or None for a piece the
        scope already knows (counted as a duplicate).

        Raises:
            ValueError, KeyError, TypeError: a malformed body (UnprocessableEventError for an unknown type).
        """
        if not isinstance(body, dict):
            raise TypeError(f"a repartition body must be a JSON object, got {type(body).__name__}")
        self._adopt_quiet_scopes(partition)
        corr = self._correlator(scope, partition)
        self.scope_partitions[scope] = partition
        source = None
        if body.get("type") == "event":
            obs = Observation.from_dict(body["obs"])
            source = _source_of(body)
            entity, known = obs.entity, obs.entity in corr.observations
            late_before = corr.discussion.late_events if corr.discussion is not None else 0
            too_old_before = corr.too_old
            links = corr.add(obs, source)
            if corr.discussion is not None:
                self.stats.discussion_late_count += corr.discussion.late_events - late_before
            if corr.too_old > too_old_before:  # its links are sent; it is not kept, so no item
                self.stats.too_old_count += 1
                return links, None, {}
        elif body.get("type") == "vector":
            entity = str(body["entity"])
            vector = decode_vector_b64(body["vector"])
            known = entity in corr.vectors
            links = corr.add_vector(entity, vector)
        else:
            raise UnprocessableEventError(f"unknown repartition record type {body.get('type')!r}")
        if known:
            self.stats.duplicates_count += 1
            return None
        key = f"{scope}|{entity}".encode()
        pending = self.checkpoints.dirty.get(key)
        item = dict((pending[1].value if pending is not None else self.table.data.get(key)) or {})
        if body["type"] == "event":
            item["obs"] = body["obs"]
            item["source"] = source
        else:
            item["vector"] = body["vector"]
        return links, key, item

    async def _send_links(self, links: list[Link]) -> None:
        """Send every link a record completed, then wait until all are delivered (acks=all), before the
        table records the piece that completed them. One wait for all: a record that moves the
        discussion watermark can decide dozens of messages at once (46 at most on the Racket year)."""
        pending = []
        for link in links:
            insight = link.to_insight()
            pending.append(
                await self.channels["insights"].send(
                    key=insight.key.encode(),
                    value=self.serde.encode(insight.schema, insight.data),
                    headers=traced_headers(insight.attributes.to_headers()),
                    timestamp=insight.attributes.time.timestamp(),
                    force=True,
                )
            )
        for future in pending:
            await future
        for link in links:
            if link.method == "reference":
                self.stats.reference_links_count += 1
            elif link.method == "discussion":
                self.stats.discussion_links_count += 1
            else:
                self.stats.embedding_links_count += 1

    async def _dead_letter(self, message: Any, exc: Exception) -> None:
        await self.dead_letters.publish(message, exc)
        self.stats.dead_letters_count += 1

    def close(self) -> None:
        """Flush and release the dead-letter producer, if one was made."""
        self.dead_letters.close()


def create_correlation_app(
    settings: Settings,
    *,
    app_id: str | None = None,
    topics: CorrelationTopics | None = None,
    config: CorrelationConfig | None = None,
    embeddings: bool = True,
    request_embeddings: bool = True,
    web_port: int = 0,
    serde: AvroSerde | None = None,
) -> faust.App:
    """Build the correlation app: its three agents and the ``correlation_items`` table.

    Args:
        settings: broker settings (``settings.kafka``), data directory (``settings.state_dir``).
        app_id: Faust app id, also the consumer group and the prefix of the repartition and changelog
            topics; default ``backbone-correlation``. Tests pass a unique one.
        topics: the topic names; default the catalogue's.
        config: window, threshold, scope overrides.
        embeddings: read ``topics.results`` and draw embedding links; ``False``: explicit links only.
        request_embeddings: with ``embeddings``, produce an embedding request per message and commit.
        web_port: Faust's web server port; ``0`` leaves it off.
        serde: the Avro serde; default one on the embedded registry.

    Returns:
        The app; its counters are at ``app.correlation_stats`` and ``app.correlation_close()`` releases
        the dead-letter producer once the app has stopped.

    Raises:
        ValueError: no Kafka bootstrap servers are configured.
    """
    app_id = app_id or DEFAULT_APP_ID
    topics = topics or CorrelationTopics()
    config = config or CorrelationConfig()
    if config.discussion is not None:
        # imports scikit-learn and builds its analyzer now (about 3 s here), not while the first record waits
        DiscussionLinker(config.discussion)
    app = make_faust_app(settings, app_id, partitions=topics.scope_partitions, web_port=web_port)
    serde = serde or serde_from_settings(settings)
    raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
    events_topic = app.topic(topics.events, **raw)
    scope_topic = app.topic(topics.scope_topic(app_id), partitions=topics.scope_partitions, **raw)
    channels = {
        "scope": scope_topic,
        "requests": app.topic(topics.requests, **raw),
        "insights": app.topic(topics.insights, **raw),
    }
    # Keys: b"<scope>|<entity>" (bytes), raw UTF-8 on the changelog; values: JSON. Faust takes a table's
    # key serializer from its key type (``raw`` for ``bytes``; JSON when there is none, which could not
    # read these raw keys back on recovery) and that overrides any schema's, so the key type is what
    # makes it raw. The changelog's format is the one earlier versions wrote.
    table = app.tables.add(
        TailRecoveringTable(
            app,
            kafka=settings.kafka,
            name=TABLE_NAME,
            default=dict,
            key_type=bytes,
            beacon=app.tables.beacon,
            partitions=topics.scope_partitions,
            help="One item per entity of a scope: key b'<scope>|<entity>', value {obs, vector}.",
        )
    )
    shell = _CorrelationShell(
        settings, topics, config, serde, table, channels, request_embeddings=embeddings and request_embeddings
    )
    shell.app_id = app.conf.id
    scope_topic_name = topics.scope_topic(app.conf.id)
    shell.owned_scope_partitions = lambda: {
        tp.partition for tp in app.consumer.assignment() if tp.topic == scope_topic_name
    }
    app.on_partitions_revoked.connect(shell.forget)
    app.on_partitions_assigned.connect(shell.forget)

    BatchDelivery(app, events_topic, shell.handle_event_records, max_batch=BATCH_RECORDS)

    if embeddings:
        results_topic = app.topic(topics.results, **raw)

        @app.agent(results_topic, name=f"{PROCESSOR_NAME}-results", concurrency=1)
        async def correlation_results(stream: faust.StreamT) -> None:
            """Forward our embeddings by scope."""
            async for event in stream.events():
                with tracing_process(event.message, app.conf.id):
                    await shell.handle_result(event.message)

    BatchDelivery(
        app,
        scope_topic,
        shell.handle_scoped_records,
        flush=shell.checkpoints.checkpoint,
        max_batch=BATCH_RECORDS,
    )

    @app.timer(interval=CHECKPOINT_SECONDS / 4)
    async def correlation_checkpoint() -> None:
        if not shell.handling:
            shell.checkpoints.checkpoint_if_due()

    shell.drains.follow(app)

    @app.timer(interval=DRAIN_CHECK_SECONDS)
    async def correlation_drain_check() -> None:
        """Drained markers for events partitions read to their end since their last record (see the shell)."""
        await shell.send_drain_markers()

    app.correlation_stats = shell.stats  # type: ignore[attr-defined]
    app.correlation_close = shell.close  # type: ignore[attr-defined]
    app.correlation_close_at_end = shell.close_at_end  # type: ignore[attr-defined]
    return app


def ensure_correlation_topics(
    kafka: KafkaSettings, topics: CorrelationTopics, app_id: str, *, embeddings: bool = True,
    timeout_seconds: float = 30.0,
) -> list[str]:  # fmt: skip
    """Create the processor's topics that do not exist (final partition counts); return those created.

    Partitions: the catalogue's for catalogue topics (3 for a non-catalogue input or output, 6 for
    inference topics), ``topics.scope_partitions`` for the repartition topic.

    Raises:
        StreamsError: the broker did not answer, or refused a topic.
    """

    def spec(name: str, catalogue_name: str, fallback: int) -> tuple[str, int]:
        # a catalogue name is made as the catalogue says (create_missing_topics), another one with the
        # partitions of the catalogue topic whose part it plays
        return name, catalogue_partitions(catalogue_name, fallback)

    wanted = [
        spec(topics.events, "external.events", 3),
        spec(topics.insights, "insights.correlations", 3),
        spec(topics.dead_letters, DLQ_TOPIC, 1),
        (topics.scope_topic(app_id), topics.scope_partitions),
    ]
    if embeddings:
        wanted += [
            spec(topics.results, "inference.results", 6),
            spec(topics.requests, "inference.requests", 6),
        ]
    return ensure_processor_topics(kafka, wanted, timeout_seconds=timeout_seconds)


COUNTERS = (
    ("backbone_correlation_records", "records_count", "Records handled by the correlation agents"),
    ("backbone_correlation_events", "events_count", "Messages and commits forwarded by scope"),
    ("backbone_correlation_vectors", "vectors_count", "Embeddings forwarded by scope"),
    ("backbone_correlation_skipped", "skipped_count", "Events of other kinds, results of other requesters"),
    ("backbone_correlation_embedding_requests", "requests_count", "Embedding requests produced"),
    ("backbone_correlation_duplicates", "duplicates_count", "Pieces already known to their scope"),
    ("backbone_correlation_reference_links", "reference_links_count", "Reference links sent"),
    ("backbone_correlation_embedding_links", "embedding_links_count", "Embedding links sent"),
    (
        "backbone_correlation_discussion_links",
        "discussion_links_count",
        "Discussion (masked-linker) links sent",
    ),
    (
        "backbone_correlation_discussion_late",
        "discussion_late_count",
        "Events later than the discussion lateness",
    ),
    ("backbone_correlation_expired", "expired_count", "Messages and commits dropped by the retention"),
    ("backbone_correlation_too_old", "too_old_count", "Messages and commits older than the retention"),
    ("backbone_correlation_dead_letters", "dead_letters_count", "Records dead-lettered"),
    ("backbone_correlation_drained", "drained_count", "Events partitions found read to their end (idle)"),
    (
        "backbone_correlation_closed_at_end",
        "closed_at_end_count",
        "Messages decided at the end of a bounded input",
    ),
)
"""The correlation processor's counters as Prometheus metrics (label ``app``)."""


def run_correlation_worker(
    settings: Settings | None = None,
    *,
    app_id: str | None = None,
    topics: CorrelationTopics | None = None,
    config: CorrelationConfig | None = None,
    embeddings: bool = True,
    request_embeddings: bool = True,
    stop_after_idle_seconds: float | None = None,
    close_at_end: bool = False,
    web_port: int = 0,
    loglevel: str | None = None,
) -> CorrelationStats:
    """Run the correlation worker in this process until stopped (blocking; owns the event loop and the
    SIGTERM/SIGINT handlers, so call it from a main thread, e.g. ``backbone processors correlate``).

    Creates the topics first (:func:`ensure_correlation_topics`).

    Args:
        settings: default: the environment's, completed from a running dev stack.
        app_id: Faust app id; default ``backbone-correlation``.
        topics: topic names; default the catalogue's.
        config: window, threshold, scope overrides.
        embeddings: see :func:`create_correlation_app`.
        request_embeddings: see :func:`create_correlation_app`.
        stop_after_idle_seconds: stop once started (partitions assigned, table recovered) and no record
            has arrived for this many seconds; ``None`` runs until signalled.
        close_at_end: at that idle stop, decide the messages still waiting for their window, as at the end
            of event time (a replay of a finished history; see ``_CorrelationShell.close_at_end``).
        web_port: Faust's web port; 0 leaves it off.
        loglevel: Faust's log level; default ``settings.log_level``.

    Returns:
        The app's counters once the worker has stopped.

    Raises:
        ValueError: no Kafka bootstrap servers are configured, or ``close_at_end`` without
            ``stop_after_idle_seconds``.
        StreamsError: a topic cannot be created.
    """
    if close_at_end and stop_after_idle_seconds is None:
        raise ValueError("close_at_end needs stop_after_idle_seconds: the end of the input is the idle stop")
    if settings is None:
        from core.stack import load_settings

        settings = load_settings()
    app_id = app_id or DEFAULT_APP_ID
    topics = topics or CorrelationTopics()
    ensure_correlation_topics(settings.kafka, topics, app_id, embeddings=embeddings)
    if topics.events_partitions is None and (config or CorrelationConfig()).keeps_watermark:
        count = topic_partitions(settings.kafka, topics.events)
        reading = partitions_with_records(settings.kafka, [topics.events], app_id)
        idle = frozenset(p for p in range(count or 0) if f"{topics.events}/{p}" not in reading)
        topics = replace(topics, events_partitions=count, events_idle=idle)
    app = create_correlation_app(
        settings, app_id=app_id, topics=topics, config=config, embeddings=embeddings,
        request_embeddings=request_embeddings, web_port=web_port,
    )  # fmt: skip
    stats: CorrelationStats = app.correlation_stats  # type: ignore[attr-defined]
    run_processor_worker(
        settings, app, processor=PROCESSOR_NAME, stats=stats, counters=COUNTERS,
        close=app.correlation_close,  # type: ignore[attr-defined]
        stop_after_idle_seconds=stop_after_idle_seconds, loglevel=loglevel,
        gc_young_threshold=GC_YOUNG_THRESHOLD,
        at_idle_stop=app.correlation_close_at_end if close_at_end else None,  # type: ignore[attr-defined]
    )  # fmt: skip
    return stats
