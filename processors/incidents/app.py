"""The incident processor's Faust app: telemetry -> ``incident.*`` insights with ranked root causes.

A thin shell around :class:`processors.incidents.incident.IncidentEngine`; every decision is made
there. Modelled on :mod:`processors.correlation.app` (``processors/shell.py`` did not exist on main
when this was written) and built with :func:`processors.shell.make_faust_app`.

Two stages (each one batch or record in hand at a time):

1. The input stage reads ``telemetry.metrics``, ``telemetry.logs`` and ``telemetry.spans``
   (``sophia.telemetry.MetricSample`` / ``LogLine`` / ``Span``), and the changes: ``config.changes``
   (``sophia.config.ConfigChange``) and ``external.events`` (``sophia.external.ExternalEvent``: commits,
   pushes, deploys and releases; other kinds are skipped and counted), as change records
   (:mod:`processors.incidents.changes`) that become the insights' suspect changes. It decodes the
   Confluent-framed Avro and the CloudEvents headers and forwards the records as compact JSON bodies (only
   the fields the engine reads, :func:`processors.incidents.incident.engine_fields`; times in epoch ms, the
   source ``topic/partition``, ``drained``) to the one-partition topic
   ``<app id>-telemetry-repartition``, a batch at a time, the batch's bodies in the order read as one JSON
   list per merged message (:func:`pack_bodies`, split under :data:`MERGED_MAX_BYTES`). The batches come
   straight from each fetch (:class:`processors.shell.BatchDelivery`, up to :data:`BATCH_RECORDS` records,
   :meth:`_IncidentShell.handle_records`; ``interleave=True``: in the order Faust's agent got a fetch, round
   robin over topics and partitions), past Faust's per-record path (the agent ``incidents-telemetry``,
   ``stream.noack_take``, was removed on 2026-12-06). Correlating
   incidents needs every pod's telemetry in one place; that topic is the place, in one total order (each
   partition's records keep their order). Undecodable records and other schemas go to the dead-letter
   topic with raw bytes and the reason (delivered before the next record is handled); the batch goes on.
   ``drained`` (the record is its partition's last as far as the consumer knows: its fetch high watermark)
   is taken as the batch is handled, for each partition's last record in it (the high watermark then is
   at least the one at the fetch, so a record is never drained unless it was its partition's last at some
   moment after it was read). A partition's known-last record that is not forwarded (dead-lettered,
   skipped) puts a ``drained`` marker in the batch in its place. Commits: a batch's offsets are committed
   (its future is None, done at once) once its merged messages were handed to the producer; Faust
   flushes the producer before it commits offsets, so a committed record's forward is on the broker (at
   least once: a crash before the commit forwards the batch again; the engine drops a record it already
   took in the same window, by its event id). One merged message per input record (before 2026-12-04)
   cost a Faust send and receive per record: the worker ran at 0.11-0.29 of a plain Faust agent
   (``bench/bench_incidents.py``). With BatchDelivery (2026-12-06, main's checkout and the branch's
   alternating three times): 1.15 / 1.18 / 1.15 of plain Faust over the three topics (8,479 / 8,580 / 8,532
   records/s, CPU 134-136 µs a record) against 0.72 / 0.74 / 0.70 on main (5,178 / 5,170 / 5,106, 213-218
   µs); with ``interleave=True`` 1.35 / 0.71 / 2.06 against 0.74 / 1.25 / 0.71 on main (loaded runs, README:
   CPU 143-151 µs a record against 214-219); the same 23 incidents opened, 44 updated, 23 closed, late 0.
2. ``incidents-correlate`` reads that topic through a second :class:`processors.shell.BatchDelivery` (up to
   :data:`CORRELATE_BATCH_RECORDS` merged messages a batch, :meth:`_IncidentShell.handle_merged_batch`; the
   Faust agent of that name, with ``concurrency=1``, was replaced on 2026-12-06, see State below), each
   message a JSON list of bodies (one body alone, as written before batching and by the drain timer, is read
   too), and feeds the engine body by body; the engine's
   watermark follows the
   slowest active input partition (every partition of the three inputs and of the two change topics that
   holds records after the group's commit is declared), so a partition read later than another does not
   make its records late (a change partition read after a fetch of telemetry did, when BatchDelivery handed
   over each fetch one partition after another; Faust's round robin only makes that unlikely: declared
   since, a change source holds the watermark until it is heard from, and, being sparse, nothing once
   drained): only an input partition that was
   drained (its record reached the consumer's fetch high watermark) can turn idle. A record read while
   that high watermark is not known (right after an assignment) is not drained; a timer checks such
   partitions every :data:`DRAIN_CHECK_SECONDS` and, once one is read to its end, sends a ``drained``
   marker after its records on the merged topic (only partitions whose records were already handed to
   the producer are checked, so a marker never overtakes them; an unknown end once counted as drained could let the
   watermark pass records not read yet). Late records are counted per source with the first one's
   times (:class:`IncidentStats`). Insights are sent to
   ``insights.incidents`` (``sophia.insight.Insight``, key ``incident:<id>``, CloudEvents id = the
   deterministic ``insight_id``, record timestamp = its event time) and their delivery awaited.

Metrics (on ``/metrics`` of :func:`run_incidents_worker`, :func:`processors.shell.run_processor_worker`):
``backbone_incidents_opened_total{priority}``, one per ``incident.opened`` insight sent, by the priority
the engine derives (``p1``/``p2``/``p3``, :func:`processors.incidents.incident.priority`: the telemetry has
no severity), and the counters of :data:`COUNTERS` (label ``app``).

Determinism: event time only; the same events within the allowed lateness give the same insights in
any interleaving (checked by ``tests/integration/test_incidents_replay.py`` on real Tansu).

Duplicates: a record whose CloudEvents id was already taken in its window (a redelivery, a second
import of the same file: the importers' ids are deterministic) is counted (``duplicates_count``) and
not used.

State (the engine's buffered windows and their event ids, watermark and per-source maxima, declared,
drained and sparse sources, detector histories, log templates, span memory, call graph, recent anomalies and
error edges, the open incident, kept changes, counters: :meth:`IncidentEngine.snapshot`) survives a restart,
as the healer's does (:mod:`processors.healing.app`): it is kept in the Faust table ``incident_state`` (a
:class:`processors.tables.TailRecoveringTable`, in-memory store, changelog ``<app id>-incident_state-changelog``,
one partition, key ``"engine"``), and on start (and after a rebalance) it is read back from the changelog and
the engine restored from it (:meth:`IncidentEngine.restore`) before the first merged message is handled; a
worker with no state yet starts from a fresh engine (its declared sources: the input partitions holding
records after the group's committed offsets). The value is zlib-compressed JSON ``{"format": 1, "offsets":
{"<app id>-telemetry-repartition:0": offset}, "engine": IncidentEngine.snapshot()}``, the offset being that of
the last merged message the state holds. A compressed state above :data:`STATE_PART_BYTES` (512 KiB; the
producer refuses messages above 1 MB) is written as parts (keys ``engine/<offset>/<byte offset>``) followed by a
head under ``"engine"`` naming them (``b"parts:"`` + JSON ``{"format", "parts"}``); the changelog is one
partition, so a recovered head's parts were recovered before it, and the previous write's parts are deleted
after the new head. On the Nezha slice (a quarter of the traces, ``tests/unit/test_incidents_state.py``) the
state is 1 KB to 886 KB compressed (4.4 MB of JSON at its largest, while the slowest source holds the
watermark and windows stay buffered): about 86 ms to snapshot, encode and compress, 40 ms to restore. Since the
engine keeps only the fields it reads, sampled every 500 records of the same input: at most 518 KB compressed
(2.8 MB of JSON) against 735 KB (4.5 MB) before (2026-12-06, a one-off measurement with a script, not kept; the
bench below prints the worker's own largest state).
Cost on a whole Nezha day (``bench/bench_incidents.py``, 85,562 records, 2026-12-06, two shared cores, noisy):
8 checkpoints, 10.3 MB compressed written in all, the largest 4.1 MB (8 parts), 1.23 s writing; the worker at
5,519 and 8,356 records/s (0.53 and 0.57 of plain Faust, CPU 134 and 129 µs a record) against main's 11,190
(0.70, 99 µs) in between; the same 23 incidents opened, 44 updated, 23 closed, late 0. In one helper run
with the interval edited to 5 s it was not better (5 checkpoints, 19.3 MB, the largest 8.2 MB, 2.64 s: the
state's size when it is written dominates; one run on a noisy machine), so the healer's 1 s is kept. Since the engine keeps only the fields it reads (its buffered
windows are most of a large state; a Nezha metric record's JSON from 794 to 325 bytes on average, a log line's
from 583 to 277), the same bench, alternating with the code before (2026-12-06 14:13-14:30, three pairs, noisy): the
worker at 0.82 / 0.78 / 0.74 of plain Faust (9,355 / 12,080 / 11,357 records/s, CPU 132 / 106 / 104 µs a record;
6 / 5 / 5 checkpoints, 12.4 / 6.0 / 6.0 MB, 1.58 / 0.63 / 0.75 s writing) against 0.58 / 0.58 / 0.53 before
(8,572 / 7,299 / 8,376, CPU 140 / 158 / 130 µs; 8 / 6 / 8 checkpoints, 12.7 / 17.3 / 12.5 MB, 1.42 / 2.27 / 1.46
s); the same 90 insights in every run. Then the checkpoint encodes each buffered record once
(:meth:`~processors.incidents.incident.IncidentEngine.snapshot_json`), alternating with the lean-fields code
(14:41-14:55, two pairs, noisy): 0.82 / 1.37 of plain Faust (10,576 / 14,865 records/s, CPU 143 / 110 µs; 7 / 6
checkpoints, 19.5 / 14.4 MB, 1.54 / 1.07 s writing; the 1.37 where the Faust row ran slow) against 0.68 / 0.65
(7,567 / 9,193, CPU 161 / 135 µs; 5 / 5 checkpoints, 8.8 / 9.1 MB, 1.61 / 1.45 s writing).

Checkpoints, and what a crash does (at-least-once). The correlate stage feeds each merged message's bodies and
sends the insights they complete, each delivery awaited, then notes the message's offset as held by the
state. Every ``checkpoint_records`` bodies (:data:`CHECKPOINT_RECORDS`), or ``checkpoint_seconds``
(:data:`CHECKPOINT_SECONDS`) after the first body not yet checkpointed (a timer does it when no message
comes), the state and its offset are written to the table (between batches only; :class:`processors.shell.
Checkpoints`), and only then are those messages committable (the future ``handle_merged_batch`` returned for
them is done, and BatchDelivery moves their offsets into what Faust commits, after flushing the producer,
changelog included); before a revocation and at stop BatchDelivery finishes the batch in hand and
checkpoints. So the committed merged offset never passes the stored state, nor an insight whose delivery
was not acknowledged. A crash before a checkpoint re-reads the merged messages since the committed offset,
and the restored engine (from the last checkpoint) sends the same insights with the same ids (readers
de-duplicate by ``insight_id``, the CloudEvents id); a crash between a checkpoint and Faust's commit re-reads
messages the state already holds: their offsets are not above the stored one, so they are skipped
(``replayed_count``, ``backbone_incidents_replayed``), not fed twice. The input stage is at least once too
(above): inputs forwarded again after a crash are dropped by the engine as duplicates (same window) or
counted late (a closed window), never used twice. Checked by ``tests/integration/test_incidents_restart.py``
(real Tansu, SIGKILL after the slice's first incident and the opening of a second, and while the fault's
windows are buffered in a state written in two parts: the restarted worker's de-duplicated insights equal an
uninterrupted worker's; a cold restart, the code before, lost the open incident and the buffered fault) and ``tests/unit/test_incidents_checkpoints.py`` (skipped replays, parts). A state whose
``format`` this code does not read stops the worker (``incident_state_unreadable``, the app crashed) rather
than run on empty state; to start from empty state, use a new app id. The restored engine keeps its stored
configuration and declared sources (the worker's ``config`` applies to a fresh state only). Limits: one
worker per app id (the merged topic has one partition and the state one key); each checkpoint writes the
whole state, and where the broker does not compact the changelog (not checked for Tansu) recovery reads
every checkpoint ever written.
One batch in hand at a time in each stage (each BatchDelivery's one task). A second worker of the same app id
shares the input stage's partitions, but the correlate stage (one merged partition, one state key) runs on one
worker at a time: a second member adds no correlating throughput; it takes the correlate stage over, with the
engine's state, when the first one leaves. Checked by the chaos harness's rebalance storm (``backbone.chaos``:
a second worker joins, the first leaves while it is up and comes back, the second leaves; 2026-12-06, short
profile's workload with two storms and no other fault, seed 1: the correlate stage moved to the new member and
back twice, 0 violations, the 5 insights of the pure engine; short profile, seeds 1-3, with every fault: 0). An
earlier experiment of the same kind, on code before the state table and the engine's fix for a source whose
last record is a redelivery, had given 3 of the 5 insights.

Run: ``python -m processors.incidents.app [--stop-after-idle S] ...`` (prints its counters as JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import faust
import structlog
from confluent_kafka.admin import AdminClient, NewTopic
from faust.types import TP
from prometheus_client import Counter

from core.observability import REGISTRY
from core.settings import Settings
from processors.incidents.changes import change_from_config, change_from_external
from processors.incidents.incident import EngineConfig, IncidentEngine, SnapshotError, engine_fields
from processors.shell import (
    BatchDelivery,
    Checkpoints,
    DrainTracker,
    FaustDeadLetters,
    make_faust_app,
    message_headers,
    pack_bodies,
    partitions_with_records,
    run_processor_worker,
    traced_headers,
    tracing_process,
)
from processors.tables import TailRecoveringTable
from streams.catalogue import CATALOGUE, create_missing_topics
from streams.consumer import DLQ_TOPIC
from streams.envelope import CloudEvent, Event
from streams.errors import DeserializationError, EnvelopeError
from streams.producer import epoch_ms
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde

__all__ = [
    "COUNTERS",
    "DEFAULT_APP_ID",
    "STATE_FORMAT",
    "STATE_KEY",
    "STATE_TABLE",
    "TELEMETRY_KINDS",
    "IncidentStats",
    "IncidentTopics",
    "create_incidents_app",
    "engine_record",
    "pack_bodies",
    "run_incidents_worker",
]

log = structlog.get_logger(__name__)

DEFAULT_APP_ID = "backbone-incidents"
#: The Faust table of the engine's state (changelog ``<app id>-incident_state-changelog``).
STATE_TABLE = "incident_state"
#: Its one key.
STATE_KEY = "engine"
#: Layout version of the table's value (``{"format", "offsets", "engine"}``).
STATE_FORMAT = 1
CHECKPOINT_RECORDS = 20_000
"""Merged bodies correlated after which the correlate stage checkpoints (the engine's state written to the state
table, then their offsets committable)."""
CHECKPOINT_SECONDS = 1.0
"""The longest a correlated body waits for its checkpoint (a timer checkpoints when no record comes)."""
CORRELATE_BATCH_RECORDS = 50
"""Merged messages (each a list of up to :data:`BATCH_RECORDS` bodies) handed to the correlate stage at most
per batch."""
STATE_PART_BYTES = 512 * 1024
"""Largest table value the state is written as: a compressed state above it is split into parts of this size
(the producer refuses a message above 1 MB, ``max_request_size``)."""
#: The head of a state written in parts starts with these bytes (a zlib stream starts with 0x78), then JSON.
_PARTS_MAGIC = b"parts:"
#: The keys of the parts: ``engine/<merged offset>/<byte offset>``.
_PART_PREFIX = "engine/"
#: The state's JSON without the check for reference cycles (the snapshot has none), engine order kept.
_STATE_JSON = json.JSONEncoder(separators=(",", ":"), check_circular=False)
DRAIN_CHECK_SECONDS = 1.0
"""How often the worker looks for inputs read to their end after their last record (``drained`` markers)."""
PROCESSOR_NAME = "incidents"
INSIGHT_SCHEMA = "sophia.insight.Insight"
TELEMETRY_KINDS: Final = {
    "sophia.telemetry.MetricSample": "metric",
    "sophia.telemetry.LogLine": "log",
    "sophia.telemetry.Span": "span",
}
"""Telemetry schema (Avro full name) -> the engine's record kind."""


_opened = Counter(
    "backbone_incidents_opened",
    "Incidents opened (incident.opened insights sent), by the priority the engine derives (p1, p2, p3)",
    ["priority"],
    registry=REGISTRY,
)


BATCH_RECORDS = 500
"""Input records forwarded at most per batch (:class:`processors.shell.BatchDelivery`'s ``max_batch``): their
usable records are forwarded together as one merged message (or a few, :data:`MERGED_MAX_BYTES`)."""
MAX_BUFFERED_RECORDS = 20_000
"""Input records taken from fetches and not yet forwarded at which the fetch loop waits."""
MERGED_MAX_BYTES = 256 * 1024
"""Largest merged message (JSON bytes) the input stage sends, well under the producer's 1 MB request
limit; a larger batch is split, in order (a single body above it is sent alone)."""


_CHANGE_SCHEMAS = ("sophia.config.ConfigChange", "sophia.external.ExternalEvent")


class UnexpectedSchemaError(ValueError):
    """A record on an input topic whose schema is neither a telemetry nor a change schema."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IncidentTopics:
    """Topic names (configurable for tests)."""

    metrics: str = "telemetry.metrics"
    logs: str = "telemetry.logs"
    spans: str = "telemetry.spans"
    config: str = "config.changes"
    external: str = "external.events"
    insights: str = "insights.incidents"
    dead_letters: str = DLQ_TOPIC

    def merged(self, app_id: str) -> str:
        """The one-partition topic every record is forwarded to."""
        return f"{app_id}-telemetry-repartition"

    def inputs(self) -> tuple[str, str, str]:
        """The three telemetry topics."""
        return (self.metrics, self.logs, self.spans)

    def changes(self) -> tuple[str, str]:
        """The two change topics (sparse: they never hold the watermark back once read to their end)."""
        return (self.config, self.external)


@dataclass(slots=True)
class IncidentStats:
    """Counters of one app instance.

    Attributes:
        late_sources: late records per input (``topic/partition``), the engine's
            :attr:`~processors.incidents.incident.IncidentEngine.late_sources`.
        first_late: the first late record (kind, source, event time, the watermark and the closed-window
            bound then, epoch ms), ``None`` while none was late.
        drain_markers_count: ``drained`` markers sent on the merged topic: an input read to its end whose
            last record was not forwarded (dead-lettered, or a change kind that is skipped), or was not known
            to be its last when it was read (no high watermark known yet, e.g. right after an assignment).
            Without them such a partition would hold the engine's watermark back for good.
        first_record_monotonic: ``time.monotonic()`` when the first record was handled (by either stage),
            ``None`` before (with ``last_record_monotonic``, the processing rate without the startup).
        last_record_monotonic: ``time.monotonic()`` when the last record was handled, ``None`` before.
        replayed_count: merged messages skipped because the restored engine state already holds them (their
            offset is at or below the one stored with it).
        state_writes_count: checkpoints that wrote the engine's state; ``state_bytes`` their compressed bytes
            in all, ``state_bytes_max`` the largest, ``state_write_seconds`` the time they took in all
            (snapshot, JSON, zlib, the table write).
        restored: the engine was restored from the state table (not started empty).
        closed_at_end_count: insights decided at the idle stop of a bounded input (``close_at_end``): the
            windows the watermark had not passed, and the incident still open, closed.
    """

    records_count: int = 0
    forwarded_count: int = 0
    changes_count: int = 0
    changes_skipped_count: int = 0
    correlated_count: int = 0
    insights_count: int = 0
    late_count: int = 0
    late_sources: dict[str, int] = field(default_factory=dict)
    first_late: dict[str, Any] | None = None
    drain_markers_count: int = 0
    duplicates_count: int = 0
    dead_letters_count: int = 0
    replayed_count: int = 0
    state_writes_count: int = 0
    state_bytes: int = 0
    state_bytes_max: int = 0
    state_write_seconds: float = 0.0
    restored: bool = False
    closed_at_end_count: int = 0
    first_record_monotonic: float | None = field(default=None)
    last_record_monotonic: float | None = field(default=None)


COUNTERS = (
    ("backbone_incidents_records", "records_count", "Records handled by either stage (every outcome)"),
    (
        "backbone_incidents_forwarded",
        "forwarded_count",
        "Records (telemetry and changes) forwarded to the merged topic",
    ),
    (
        "backbone_incidents_changes",
        "changes_count",
        "Changes (config, commits, deploys) forwarded to the merged topic",
    ),
    (
        "backbone_incidents_changes_skipped",
        "changes_skipped_count",
        "External events that change nothing (comments, stars), skipped",
    ),
    ("backbone_incidents_correlated", "correlated_count", "Merged records fed to the engine"),
    ("backbone_incidents_insights", "insights_count", "Incident insights sent (opened, updated, closed)"),
    ("backbone_incidents_late", "late_count", "Records too late for their window (counted, not used)"),
    (
        "backbone_incidents_duplicates",
        "duplicates_count",
        "Records whose event id was already taken in their window (counted, not used)",
    ),
    ("backbone_incidents_dead_letters", "dead_letters_count", "Records dead-lettered"),
    (
        "backbone_incidents_closed_at_end",
        "closed_at_end_count",
        "Insights decided at the idle stop of a bounded input (--close-at-end)",
    ),
    (
        "backbone_incidents_replayed",
        "replayed_count",
        "Merged messages skipped: already in the recovered engine state",
    ),
    ("backbone_incidents_state_writes", "state_writes_count", "Engine states written to the state table"),
    ("backbone_incidents_state_bytes", "state_bytes", "Bytes of engine state written to the state table"),
)
"""The incident processor's counters as Prometheus metrics (label ``app``)."""


def engine_record(
    kind: str, data: Mapping[str, Any], event_id: str | None, config: EngineConfig | None = None
) -> dict[str, Any]:
    """A decoded datum of ``kind`` as the engine takes it and the merged topic carries it: only the fields the
    engine reads (:func:`processors.incidents.incident.engine_fields`, for ``config``'s workload metric; default
    :class:`~processors.incidents.incident.EngineConfig`), times as epoch ms, and, for telemetry (not a change,
    which has its own ``change_id``), its CloudEvents id as ``event_id`` (the engine drops a record seen twice in
    its window)."""
    record = engine_fields(kind, data, config)  # first: only the kept fields are converted
    for k, v in record.items():
        if isinstance(v, datetime):
            record[k] = epoch_ms(v)
    if kind != "change":
        record["event_id"] = event_id
    return record


class _IncidentShell:
    def __init__(self, settings: Settings, topics: IncidentTopics, serde: AvroSerde, engine: IncidentEngine,
                 channels: dict[str, Any], *, table: Any = None, app: Any = None, merged_key: str = "",
                 sources: list[str] | None = None) -> None:  # fmt: skip
        self.topics, self.serde, self.engine, self.channels = topics, serde, engine, channels
        self.stats = IncidentStats()
        # the correlate stage's state: the table (None: a shell driven directly, nothing persisted), the merged
        # partition's key in the stored offsets ("<topic>:0"), the offset of the last merged message the engine
        # holds, and what an empty state starts from (the engine's configuration and declared sources)
        self.table, self.app, self.merged_key = table, app, merged_key
        self.initial_sources = list(sources or ())
        self.offset = -1
        self.dirty = False
        self.part_bytes = STATE_PART_BYTES
        # the table keys of the parts of the state written last (none: it was written whole)
        self._parts: list[str] = []
        self.lock = asyncio.Lock()
        self.checkpoints = Checkpoints(
            self._write_state, every_records=CHECKPOINT_RECORDS, every_seconds=CHECKPOINT_SECONDS
        )
        self.group = DEFAULT_APP_ID  # the consumer group (the app's id; set by the app), for tracing spans
        # the input partitions read to their end (the app sets its high-watermark reader)
        self.drains = DrainTracker()
        self.dead_letters = FaustDeadLetters(settings, serde, PROCESSOR_NAME, topics.dead_letters)

    def _touch(self) -> None:
        self.stats.records_count += 1
        self.stats.last_record_monotonic = now = time.monotonic()
        if self.stats.first_record_monotonic is None:
            self.stats.first_record_monotonic = now

    async def handle_records(self, records: list[Any]) -> None:
        """Input records of a :class:`~processors.shell.BatchDelivery` (aiokafka records in the order Faust's
        agent would get them, ``interleave=True``: each partition's in offset order), forwarded by
        :meth:`_forward`. Returns None (nothing to wait for: the forwards were handed to the producer, which
        Faust flushes before it commits the offsets). ``drained`` is taken as the records are handled, for
        each partition's last record among them (``DrainTracker.at_end``: ``offset + 1 >=`` the partition's
        fetch end, or the fetch position past it with only control records between; never when that is
        unknown: no fetch answered since the assignment; an earlier record is not its partition's last): the
        end then is at least the one when the record was fetched, so a record is taken as drained only when
        it was its partition's last as far as the consumer knew at a moment after it was read."""
        last: dict[tuple[str, int], int] = {}
        for i, record in enumerate(records):
            last[(record.topic, record.partition)] = i
        ends = {i: TP(topic, partition) for (topic, partition), i in last.items()}
        items: list[tuple[Any, bool, Any]] = []
        for i, record in enumerate(records):
            tp = ends.get(i)
            if tp is None:
                items.append((record, False, None))
            else:
                items.append((record, self.drains.at_end(tp, record.offset), tp))
        await self._forward(items, self.group)

    async def _forward(self, items: list[tuple[Any, bool, Any]], group: str) -> None:
        """Input records in the order read, as ``(message, drained, tp)``: decode each (dead-lettering what
        cannot be read, delivered before the next is handled); forward their bodies, and the ``drained``
        markers of partitions whose known last record is not forwarded, in that order, as JSON lists
        (:func:`pack_bodies`, at most :data:`MERGED_MAX_BYTES` each) to the merged topic. Returns once they
        were handed to the producer (Faust flushes it before it commits offsets); only then is each
        partition's last record in ``items`` noted (its ``tp``; None for an earlier record of its partition
        in ``items``): one not known as its partition's last is recorded for :meth:`send_drain_markers`, so
        that a marker never overtakes its partition's records."""
        bodies: list[dict[str, Any]] = []
        notes: dict[Any, tuple[str, int, bool]] = {}
        for message, drained, tp in items:
            with tracing_process(message, group):
                body = await self.decode_input(message, drained)
            if body is not None:
                bodies.append(body)
            if tp is not None:
                notes[tp] = (f"{message.topic}/{message.partition}", message.offset, drained)
        for packed, _ in pack_bodies(bodies, MERGED_MAX_BYTES):
            await self.channels["merged"].send(key=b"telemetry", value=packed)
        markers = sum(1 for b in bodies if b["kind"] == "drained")
        self.stats.forwarded_count += len(bodies) - markers
        self.stats.drain_markers_count += markers
        # where each partition stands, for every record (forwarded, skipped or dead-lettered alike): a
        # partition whose last records are not forwarded must still be able to turn idle (a drained marker)
        for tp, (source, offset, drained) in notes.items():
            self.drains.note(tp, source, offset, drained)

    async def decode_input(self, message: Any, drained: bool) -> dict[str, Any] | None:
        """A telemetry record or a change: its merged body (JSON-ready); for a record not forwarded (an
        external event that changes nothing, or a dead letter: delivered before this returns) a
        ``drained`` marker of its partition when it is known as the partition's last (``drained``), else
        None."""
        self._touch()
        source = f"{message.topic}/{message.partition}"
        marker = {"kind": "drained", "source": source} if drained else None
        try:
            attributes = CloudEvent.from_headers(message_headers(message.headers))
            schema, data = self.serde.decode(message.value)
            kind = TELEMETRY_KINDS.get(schema)
            if schema == "sophia.config.ConfigChange":
                kind, data = "change", change_from_config(data, attributes.id)
            elif schema == "sophia.external.ExternalEvent":
                change = change_from_external(data, attributes.id)
                if change is None:
                    self.stats.changes_skipped_count += 1
                    return marker
                kind, data = "change", change
            if kind is None:
                raise UnexpectedSchemaError(
                    f"schema {schema!r} is neither a telemetry schema nor a change schema "
                    f"({', '.join(_CHANGE_SCHEMAS)}) (event {attributes.id})"
                )
        except (EnvelopeError, DeserializationError, UnexpectedSchemaError, KeyError) as exc:
            await self.dead_letters.publish(message, exc)
            self.stats.dead_letters_count += 1
            log.warning("record_dead_lettered", topic=message.topic, offset=message.offset, reason=str(exc))
            return marker
        record = engine_record(kind, data, attributes.id, self.engine.config)
        self.stats.changes_count += kind == "change"
        return {"kind": kind, "source": source, "drained": drained, "record": record}

    async def send_drain_markers(self) -> None:
        """Tell the engine, through the merged topic (after the records already forwarded), of each input
        partition now read to its end whose last record was not known to be its last when it was read.
        (A partition whose last record was dead-lettered or skipped, and known to be its last, is told
        with its batch by :meth:`handle_records`.)"""
        for source in self.drains.found_drained():
            await self._send_drain_marker(source)

    async def _send_drain_marker(self, source: str) -> None:
        body = {"kind": "drained", "source": source}
        await self.channels["merged"].send(key=b"telemetry", value=json.dumps(body).encode())
        self.stats.drain_markers_count += 1

    async def handle_merged_batch(self, records: list[Any]) -> asyncio.Future[None] | None:
        """Merged messages of the correlate stage's :class:`~processors.shell.BatchDelivery` (aiokafka records of
        the one merged partition, in offset order): each one the engine does not hold yet is correlated
        (:meth:`handle_merged`, insights' deliveries awaited, in its tracing span) and its offset noted as held
        by the state; one at or below the offset stored with the restored state is skipped (``replayed_count``).
        Then a checkpoint is written when due (:attr:`checkpoints`, counted in bodies). Returns the future that
        the messages' commit waits for: done once a written checkpoint holds them; None when every message
        was replayed and nothing is pending.

        Raises:
            Exception: an insight's delivery failed (BatchDelivery crashes the app; nothing after the last
                checkpoint is committed, and those messages are read again on restart).
        """
        async with self.lock:  # not while the timer checkpoints or the table recovers
            bodies_before = self.stats.correlated_count
            for record in records:
                if int(record.offset) <= self.offset:
                    self.stats.replayed_count += 1
                    continue
                with tracing_process(record, self.group):
                    await self.handle_merged(record)
                self.offset = int(record.offset)
                self.dirty = True
            future = self.checkpoints.record(self.stats.correlated_count - bodies_before)
            self.checkpoints.checkpoint_if_due()
            return future

    async def recovered(self) -> None:
        """Restore the engine from the state table (Faust calls it once the table is recovered, before the
        streams resume; also after a rebalance, when the merged messages since the last checkpoint, never
        committed, are read again from the committed offset).

        Raises:
            SnapshotError: the stored state has another format or is not an engine's (the app is crashed).
        """
        async with self.lock:  # not in the middle of a batch or a checkpoint
            await self._recovered()

    async def _recovered(self) -> None:
        head = self.table.get(STATE_KEY)
        self.dirty = False
        # BatchDelivery drains (checkpoints) before every revocation, so nothing is pending here; if it were,
        # the engine's state over those messages is dropped: fail their commit (they are read again)
        self.checkpoints.abandon(RuntimeError("incident state recovered over records not checkpointed"))
        if head is None:  # nothing checkpointed, nothing committed on the merged topic: all is read again
            self._use(IncidentEngine(self.engine.config, sources=self.initial_sources), -1)
            self._parts = []
            self._drop_parts()
            log.info("incident_state_empty", sources=len(self.initial_sources))
            return
        try:
            raw, parts = self._assemble(head)
            state = json.loads(zlib.decompress(raw))
            if state.get("format") != STATE_FORMAT:
                raise SnapshotError(
                    f"incident state table format {state.get('format')!r}, this worker reads {STATE_FORMAT}"
                )
            engine = IncidentEngine.restore(state["engine"])
            offset = int(state["offsets"].get(self.merged_key, -1))
        except (ValueError, KeyError, TypeError, AttributeError, zlib.error) as exc:
            err = exc if isinstance(exc, SnapshotError) else SnapshotError(f"{type(exc).__name__}: {exc}")
            log.error("incident_state_unreadable", error=str(err))
            await self.app.crash(err)
            raise err from exc
        self._use(engine, offset)
        self._parts = parts
        self._drop_parts()  # parts of a write that a crash cut short before its head was written
        self.stats.restored = True
        log.info("incident_state_restored", bytes=len(raw), parts=len(parts), offset=offset,
                 watermark_ms=engine.watermark_ms, open_incident=engine._open is not None,
                 processed_windows=engine.processed_windows)  # fmt: skip

    def _assemble(self, head: bytes) -> tuple[bytes, list[str]]:
        """The compressed state that the head value stands for, and the keys of its parts: the head itself when
        the state was written whole, else its parts (head ``b"parts:"`` + JSON ``{"format", "parts": [key,
        ...]}``) joined in order.

        Raises:
            KeyError: a part is missing; ``ValueError``: the head's JSON does not read.
        """
        if not head.startswith(_PARTS_MAGIC):
            return head, []
        keys = [str(k) for k in json.loads(head[len(_PARTS_MAGIC) :])["parts"]]
        parts = [self.table.get(k) for k in keys]
        missing = [k for k, p in zip(keys, parts, strict=True) if p is None]
        if missing:
            raise KeyError(f"incident state parts missing: {missing}")
        return b"".join(parts), keys

    def _drop_parts(self) -> None:
        """Delete the state parts in the table that the head does not name (:attr:`_parts`), a tombstone each."""
        kept = set(self._parts)
        for key in [k for k in list(self.table.keys()) if str(k).startswith(_PART_PREFIX) and k not in kept]:
            del self.table[key]

    def _use(self, engine: IncidentEngine, offset: int) -> None:
        self.engine, self.offset = engine, offset
        if self.app is not None:
            self.app.incident_engine = engine

    def _write_state(self) -> None:
        """The checkpoint write (:attr:`checkpoints`; synchronous, between batches: the timer's, a full count's
        and BatchDelivery's ``flush`` before a revocation or stop): the state, when it changed. BatchDelivery
        then moves the messages' offsets into what Faust commits, after flushing the producer, changelog
        included."""
        if self.dirty and self.table is not None:
            self.save()

    def save(self) -> None:
        """Write the engine's state and the merged offset it holds to the state table: zlib-compressed JSON
        ``{"format": STATE_FORMAT, "offsets": {"<merged topic>:0": offset}, "engine": IncidentEngine.snapshot()}``
        under :data:`STATE_KEY`; when that is above :data:`STATE_PART_BYTES`, its bytes are written in parts
        (keys ``engine/<offset>/<byte offset>``) and then the head under :data:`STATE_KEY` naming them (the
        changelog is one partition, so a recovered head's parts were recovered before it); the previous
        write's parts are deleted after the head."""
        started = time.perf_counter()
        self.dirty = False
        # the engine's JSON as it encodes it (each buffered record encoded once, IncidentEngine.snapshot_json)
        head = _STATE_JSON.encode({"format": STATE_FORMAT, "offsets": {self.merged_key: self.offset}})
        raw = zlib.compress(head[:-1].encode() + b',"engine":' + self.engine.snapshot_json() + b"}", 1)
        old = self._parts
        if len(raw) <= self.part_bytes:
            self._parts = []
            self.table[STATE_KEY] = raw
        else:
            starts = range(0, len(raw), self.part_bytes)
            self._parts = [f"{_PART_PREFIX}{self.offset}/{i}" for i in starts]
            for key, i in zip(self._parts, starts, strict=True):
                self.table[key] = raw[i : i + self.part_bytes]
            head = {"format": STATE_FORMAT, "parts": self._parts}
            self.table[STATE_KEY] = _PARTS_MAGIC + json.dumps(head).encode()
        for key in old:  # the previous write's parts, once the head no longer names them
            if key not in self._parts:
                del self.table[key]
        self.stats.state_writes_count += 1
        self.stats.state_bytes += len(raw)
        self.stats.state_bytes_max = max(self.stats.state_bytes_max, len(raw))
        self.stats.state_write_seconds += time.perf_counter() - started

    async def handle_merged(self, message: Any) -> None:
        """A merged message (a JSON list of bodies, or one body, as written before batching and for a
        timer's ``drained`` marker): feed the engine each body in order, send the insights each completes
        (delivery awaited) before the next."""
        value = json.loads(message.value)
        for body in value if isinstance(value, list) else (value,):
            await self.correlate(body)

    async def correlate(self, body: dict[str, Any]) -> None:
        """One merged body (a record or a ``drained`` marker): feed the engine, send the insights it
        completes."""
        self._touch()
        engine = self.engine
        late_before, duplicates_before = engine.late.total(), engine.duplicates.total()
        if body["kind"] == "drained":
            insights = engine.mark_drained(body["source"])
        else:
            insights = engine.feed(  # engine_record trimmed the record before forwarding it
                body["kind"], body["record"], source=body["source"], drained=body["drained"], trimmed=True
            )
        self.stats.late_count += engine.late.total() - late_before
        if self.stats.late_count:
            self.stats.late_sources = dict(engine.late_sources)
            self.stats.first_late = engine.first_late
        self.stats.duplicates_count += engine.duplicates.total() - duplicates_before
        self.stats.correlated_count += 1
        await self._send_insights(insights)

    async def close_at_end(self) -> None:
        """The end of a bounded input (``close_at_end``, at the idle stop of a replay): the engine processes
        the windows the watermark has not passed and closes the open incident
        (:meth:`~processors.incidents.incident.IncidentEngine.flush`), the insights are sent (deliveries
        awaited) and the state is written at once, so a restart of the same consumer group does not decide
        them again: a record it reads later for one of those windows is counted late. What a live worker
        would have decided with telemetry still to come may differ (an incident the end closed could have
        grown): use it for a replay of a finished history (an audit, an evaluation), not for a live group."""
        async with self.lock:  # not while the timer checkpoints or the table recovers
            insights = self.engine.flush()
            await self._send_insights(insights)
            self.stats.closed_at_end_count += len(insights)
            self.dirty = True  # the windows it processed are closed now, insights or not
            self.checkpoints.checkpoint()
        log.info("incidents_closed_at_end", insights=len(insights))

    async def _send_insights(self, insights: list[dict[str, Any]]) -> None:
        """Send ``insights`` to the insights topic in order, each delivery awaited before the next."""
        for insight in insights:
            when = datetime.fromtimestamp(insight["event_time"] / 1000, UTC)
            event = Event.create(INSIGHT_SCHEMA, insight["entity"], {**insight, "event_time": when},
                                 source="/processors/incidents", time=when, id=insight["insight_id"])  # fmt: skip
            pending = await self.channels["insights"].send(
                key=event.key.encode(), value=self.serde.encode(event.schema, event.data),
                headers=traced_headers(event.attributes.to_headers()), timestamp=when.timestamp(), force=True,
            )  # fmt: skip
            await pending
            self.stats.insights_count += 1
            if insight["kind"] == "incident.opened":
                _opened.labels(insight["labels"]["priority"]).inc()
            log.info("incident_insight_sent", kind=insight["kind"], entity=insight["entity"],
                     top1=insight["labels"]["top1_pod"])  # fmt: skip


def create_incidents_app(
    settings: Settings, *, app_id: str | None = None, topics: IncidentTopics | None = None,
    config: EngineConfig | None = None, serde: AvroSerde | None = None,
    checkpoint_records: int = CHECKPOINT_RECORDS, checkpoint_seconds: float = CHECKPOINT_SECONDS,
    state_part_bytes: int = STATE_PART_BYTES,
) -> faust.App:  # fmt: skip
    """Build the app (the five input topics consumed in batches through
    :class:`processors.shell.BatchDelivery`, each fetch's records handed in lists to
    :meth:`_IncidentShell.handle_records`; the merged topic consumed through another, the correlate stage
    ``incidents-correlate``, :meth:`_IncidentShell.handle_merged_batch`, its offsets committed up to the
    messages a written checkpoint of the state table ``incident_state`` holds); counters at
    ``app.incident_stats``, the engine at ``app.incident_engine`` (replaced by the restored one once the state
    table is recovered), ``app.incident_close()`` releases the dead-letter producer.

    Args:
        checkpoint_records: merged bodies correlated after which the engine's state is written.
        checkpoint_seconds: the longest a correlated body waits for that (a timer checkpoints when idle).
        state_part_bytes: the largest table value the compressed state is written as; above it, in parts of
            this size (:data:`STATE_PART_BYTES`).

    Raises:
        ValueError: no Kafka bootstrap servers are configured, or ``state_part_bytes`` is not in
            [1 KiB, :data:`STATE_PART_BYTES`].
    """
    if not 1024 <= state_part_bytes <= STATE_PART_BYTES:
        raise ValueError(f"state_part_bytes must lie in [1024, {STATE_PART_BYTES}], got {state_part_bytes}")
    app_id = app_id or DEFAULT_APP_ID
    topics = topics or IncidentTopics()
    app = make_faust_app(settings, app_id, partitions=1, web_port=0)
    serde = serde or AvroSerde(EmbeddedRegistry())
    raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
    merged = app.topic(topics.merged(app_id), partitions=1, **raw)
    channels = {"merged": merged, "insights": app.topic(topics.insights, **raw)}
    # the change topics' partitions too: a change read after telemetry that moved the watermark past it would be
    # late (its source is sparse, so once drained it holds nothing back)
    sources = partitions_with_records(settings.kafka, [*topics.inputs(), *topics.changes()], app_id)
    engine = IncidentEngine(config, sources=sources)
    # One partition, one key: the engine is one state machine over the one merged partition. use_partitioner:
    # the write goes to the key's partition (0), whatever record is in hand (the timer writes with none).
    table = app.tables.add(
        TailRecoveringTable(
            app, kafka=settings.kafka, name=STATE_TABLE, default=None, beacon=app.tables.beacon, partitions=1,
            use_partitioner=True, value_type=bytes,
            help="The incident engine's state: {format, offsets, engine: IncidentEngine.snapshot()} (JSON).",
        )
    )  # fmt: skip
    shell = _IncidentShell(settings, topics, serde, engine, channels, table=table, app=app,
                           merged_key=f"{topics.merged(app_id)}:0", sources=sources)  # fmt: skip
    table.on_recover(shell.recovered)
    shell.checkpoints.every_records, shell.checkpoints.every_seconds = checkpoint_records, checkpoint_seconds
    shell.part_bytes = state_part_bytes

    shell.group = app.conf.id
    inputs = app.topic(*topics.inputs(), *topics.changes(), **raw)
    # interleave: a fetch in the order Faust's agent got it (round robin over topics and partitions), so the
    # merged topic's order is the agent's
    BatchDelivery(
        app, inputs, shell.handle_records, max_batch=BATCH_RECORDS, max_buffered=MAX_BUFFERED_RECORDS,
        interleave=True,
    )  # fmt: skip

    # the correlate stage (incidents-correlate): one batch of merged messages in hand at a time; BatchDelivery's
    # drain before a revocation or stop checkpoints (flush) before Faust commits
    BatchDelivery(
        app, merged, shell.handle_merged_batch, flush=shell.checkpoints.checkpoint,
        max_batch=CORRELATE_BATCH_RECORDS, max_pending=checkpoint_records + 1,
    )  # fmt: skip

    @app.timer(interval=checkpoint_seconds)
    async def incidents_checkpoint() -> None:
        """Checkpoint what was correlated since the last one when no message came to do it."""
        async with shell.lock:
            if shell.checkpoints.pending:
                shell.checkpoints.checkpoint()

    shell.drains.follow(app)

    @app.timer(interval=DRAIN_CHECK_SECONDS)
    async def incidents_drain_check() -> None:
        """Drained markers for inputs read to their end since their last record (see the shell)."""
        await shell.send_drain_markers()

    app.incident_stats = shell.stats  # type: ignore[attr-defined]
    app.incident_engine = engine  # type: ignore[attr-defined]
    app.incident_close = shell.dead_letters.close  # type: ignore[attr-defined]
    app.incident_close_at_end = shell.close_at_end  # type: ignore[attr-defined]
    return app


def ensure_incident_topics(settings: Settings, topics: IncidentTopics, app_id: str) -> list[str]:
    """Create the inputs, the output, the dead-letter and the merged topic when missing."""

    def spec(name: str, catalogue_name: str) -> NewTopic:
        # a catalogue name is made as the catalogue says (create_missing_topics); another name gets the
        # partitions of the catalogue topic whose part it plays
        return NewTopic(name, num_partitions=CATALOGUE[catalogue_name].partitions, replication_factor=1)

    wanted = [
        spec(topics.metrics, "telemetry.metrics"), spec(topics.logs, "telemetry.logs"),
        spec(topics.spans, "telemetry.spans"), spec(topics.insights, "insights.incidents"),
        spec(topics.config, "config.changes"), spec(topics.external, "external.events"),
        spec(topics.dead_letters, "backbone.dlq"), NewTopic(topics.merged(app_id), num_partitions=1, replication_factor=1),
    ]  # fmt: skip
    return create_missing_topics(AdminClient(settings.kafka.librdkafka()), wanted, timeout_seconds=30)


def run_incidents_worker(
    settings: Settings | None = None, *, app_id: str | None = None, topics: IncidentTopics | None = None,
    stop_after_idle_seconds: float | None = None, loglevel: str | None = None,
    state_part_bytes: int = STATE_PART_BYTES, close_at_end: bool = False,
) -> IncidentStats:  # fmt: skip
    """Run the worker in this process until stopped (blocking; call from a main thread), with ``/metrics``,
    ``/healthz`` and ``/readyz`` on ``settings.metrics_host:metrics_port``
    (:func:`processors.shell.run_processor_worker`); ``state_part_bytes`` as in :func:`create_incidents_app`.
    With ``close_at_end`` (and ``stop_after_idle_seconds``), the idle stop is the end of the input: the
    windows still open are processed and the open incident closed first (``_IncidentShell.close_at_end``).

    Raises:
        ValueError: no Kafka bootstrap servers are configured, ``state_part_bytes`` is out of range, or
            ``close_at_end`` without ``stop_after_idle_seconds``.
        StreamsError: a topic cannot be created.
    """
    if close_at_end and stop_after_idle_seconds is None:
        raise ValueError("close_at_end needs stop_after_idle_seconds: the end of the input is the idle stop")
    if settings is None:
        from core.stack import load_settings

        settings = load_settings()
    app_id = app_id or DEFAULT_APP_ID
    topics = topics or IncidentTopics()
    ensure_incident_topics(settings, topics, app_id)
    app = create_incidents_app(settings, app_id=app_id, topics=topics, state_part_bytes=state_part_bytes)
    stats: IncidentStats = app.incident_stats  # type: ignore[attr-defined]
    run_processor_worker(
        settings, app, processor=PROCESSOR_NAME, stats=stats, counters=COUNTERS,
        close=app.incident_close,  # type: ignore[attr-defined]
        stop_after_idle_seconds=stop_after_idle_seconds, loglevel=loglevel,
        at_idle_stop=app.incident_close_at_end if close_at_end else None,  # type: ignore[attr-defined]
    )  # fmt: skip
    return stats


def main(argv: list[str] | None = None) -> None:
    """``python -m processors.incidents.app``: run the worker, print its counters as JSON at the end
    (:class:`IncidentStats`, ``first_record_monotonic`` and ``last_record_monotonic`` included)."""
    p = argparse.ArgumentParser(description="The incident processor (Faust worker).")
    p.add_argument("--app-id", default=DEFAULT_APP_ID)
    for name in ("metrics", "logs", "spans", "config", "external", "insights"):
        p.add_argument(f"--{name}-topic", default=getattr(IncidentTopics(), name))
    p.add_argument("--dlq-topic", default=DLQ_TOPIC)
    p.add_argument("--stop-after-idle", type=float, default=None, help="Stop after this many idle seconds.")
    p.add_argument("--close-at-end", action="store_true",
                   help="At the idle stop, process the windows still open and close the open incident (a replay).")  # fmt: skip
    p.add_argument("--state-part-bytes", type=int, default=STATE_PART_BYTES,
                   help=f"Largest state table value, bytes; a larger state is written in parts (default {STATE_PART_BYTES}).")  # fmt: skip
    a = p.parse_args(argv)
    topics = IncidentTopics(metrics=a.metrics_topic, logs=a.logs_topic, spans=a.spans_topic,
                            config=a.config_topic, external=a.external_topic, insights=a.insights_topic,
                            dead_letters=a.dlq_topic)  # fmt: skip
    stats = run_incidents_worker(app_id=a.app_id, topics=topics, stop_after_idle_seconds=a.stop_after_idle,
                                 state_part_bytes=a.state_part_bytes, close_at_end=a.close_at_end)  # fmt: skip
    sys.stdout.write(json.dumps(dataclasses.asdict(stats)) + "\n")


if __name__ == "__main__":
    main()
