"""The healer's Faust app: a thin shell around :class:`processors.healing.healer.Healer`.

The app reads ``agent.events`` (``sophia.agent.*``), ``config.changes`` (``sophia.config.ConfigChange``) and
``healing.acks`` (people's acks of escalations, ``sophia.healing.Decision`` of kind ``escalation_acked``,
published by ``backbone healing ack``), decodes the Confluent-framed Avro and the CloudEvents headers itself
(``raw`` serializers), and feeds each record to the healer, one at a time, in the order a Faust agent would
get them (each fetch's records round robin over the topics and their partitions). The records are not
iterated by a Faust agent: a :class:`processors.shell.BatchDelivery` (``interleave=True``: the fetch's order
above) hands them in lists of at most ``batch_records``, straight from each fetch, to
``_HealingShell.handle_batch`` (the agent ``healing``, with manual acks at checkpoints, was removed on
2026-12-06). Each record is decided at once and its decisions are sent at once (in order, key =
subject, CloudEvents id = the decision's deterministic id, as ``sophia.healing.Decision`` to
``healing.decisions``), without awaiting their delivery, inside the record's tracing span
(:func:`processors.shell.tracing_process`). Then, at the batch's end, for its decisions, in order:

1. their deliveries are awaited (together);
2. each is written to the read model (:class:`processors.healing.read_model.HealingReadModel`:
   PostgreSQL ``proj_healing`` + the Redis circuit hashes the client reads), one transaction per batch;
3. an ``escalation`` is posted to the webhook when a notifier is configured
   (:class:`processors.healing.notify.Notifier`); its outcome is itself a decision (sent, delivery
   awaited, then steps 2-4);
4. a ``rollback`` is carried out through the config store (``ConfigStore.rollback`` with author
   ``healer``, ``expected_version`` = the version it rolls back, causation id = the decision's id)
   when a store is given; a failure gives a ``rollback_failed`` decision (as in 3), never a crash.

Batching changes no decision (the healer is fed the same records in the same order); it moves the
delivery wait and the read-model write from once per record with decisions to once per batch
(``backbone_healing_batches`` counts them). Batches are as long as the backlog: with the agent path
(removed 2026-12-06) at 1,000 events/s the agent's queue was nearly always empty and a batch about one
record (13,204 batches for 15,100 records in ``bench/bench_heal_latency.py``); reading a backlog, 30,000
records took 1,761-6,987 batches with Faust's consumer, 31-33 with
:class:`processors.shell.EagerSeekingConsumer` (agent path). A circuit's
event is sent as soon as its record is decided, so the batch does not delay it on the topic, while its
read-model write waits for the batch's end. Follow-up decisions (3, 4) are sent after the batch's other
decisions, not right after their own record's, and outside its tracing span.

A record that does not decode, or that the healer cannot take (a required field missing), goes to
the dead-letter topic with its raw bytes and the reason, and processing goes on.

Per-record cost (issue 11: 0.8 of a plain Faust agent's rate). Met on input whose event time advances since
each input partition has its own agent-health monitor (2026-12-06 07:48, ``python bench/bench_processors.py
--events 30000 --healer-rounds 2 --healer-checkout <fe0666d> --healer-checkout <this>``: 2.42 / 2.33 of the
plain Faust agent, 404 decisions in both rounds, against 0.34 / 0.37 and 18,820 / 18,766 decisions before;
each record is fed with its ``"topic:partition"``, see :meth:`processors.healing.healer.Healer.feed`; the
README's "The healer under partition skew"). The figures below are older, on copies of the real runs that
all repeat the runs' times. The app's consumer is
:class:`processors.shell.EagerSeekingConsumer` and its monitor :class:`processors.shell.QuietMonitor`
(:func:`processors.shell.make_faust_app`'s defaults); :func:`processors.shell.run_processor_worker`
freezes (``gc.freeze()``) what exists once the worker is up, the restored state included (the agent's own
freeze at its start was removed: the shell's, after the tables recovered, covers what it froze); only the CloudEvents id is read from
the checked headers (:meth:`streams.envelope.CloudEvent.id_from_headers`); and the records skip
Faust's per-record path (message, conductor, stream queue, event, ack) through
:class:`processors.shell.BatchDelivery`. Last measured (2026-12-06, ``python bench/bench_processors.py
--events 30000 --healer-rounds 3 --healer-checkout <main> --healer-checkout <this>``, main at 95edd64 with the
agent path, removed since; see README for every round): on BatchDelivery 9,152 / 7,496 / 5,756 and 12,947 / 12,966 / 13,406 records/s, **1.54 / 1.32 / 1.10 and
1.74 / 1.68 / 1.72 of the plain Faust agent** in the same round (CPU 77 / 77 / 78 and 72 / 70 / 71 µs per
record, the agent's 125-138); main's agent path in the same rounds 0.52 / 0.58 / 0.69 and 0.68 / 0.71 / 0.70
(CPU 178-204 µs). Like the plain agent's, these rates count from the first record handled to the last, with
the records prefetched meanwhile. At 1,000 events/s (``bench/bench_heal_latency.py --seconds 15``, one run):
1,834 batches for 15,100 records, ack -> circuit opened seen 24.9 / 42.9 / 49.8 ms (p50 / p95 / p99).

Metrics (on ``/metrics`` of :func:`run_healing_worker`, :func:`processors.shell.run_processor_worker`):
``backbone_circuit_open{circuit}``, 1 while a circuit is open or half-open (probing), 0 once closed, set at
each transition the healer decides (label = the breaker's key, ``provider:P``, ``model:P/M`` or
``agent:A``; a circuit that never transitioned has no series), and the counters of :data:`COUNTERS`
(label ``app``).

State (the healer's circuits and their windows, pending retries, agent health, open escalations, the
rollback monitor's windows and guardrails) survives a restart, as Faust/Kafka Streams state does: it is
kept as one value in the Faust table ``healer_state`` (a :class:`processors.tables.TailRecoveringTable`,
in-memory store, changelog topic ``<app id>-healer_state-changelog``, one partition, key ``"healer"``),
and on start (and after a rebalance) it is read back from the changelog and the healer restored from it
(:meth:`Healer.restore`) before the first record is handled; a worker with no state yet starts from
its initial configuration. The value is zlib-compressed JSON: ``{"format": 1, "offsets":
{"<topic>:<partition>": offset}, "healer": Healer.snapshot()}``, the offsets being those of the last
input record of each input partition that the state holds.

Checkpoints, and what a crash does (at-least-once). Per batch: (1) the healer decides each record and its
decisions are sent, (2) at the batch's end their deliveries are awaited, then they are projected and acted
on (above), and only then are the batch's records noted as held by the state (their offsets). Every
``checkpoint_records`` records, or ``checkpoint_seconds`` after the first record not yet checkpointed (a
timer does it when no record comes), (3) the state and its offsets are written to the table (between
batches only), then (4) those records become committable: the future that ``handle_batch`` returned for them
is done and :class:`~processors.shell.BatchDelivery` moves their offsets into what Faust commits. Faust
commits those offsets only, after flushing the producer (the changelog included); before a
revocation and at stop, BatchDelivery finishes the batch in hand and checkpoints (``checkpoints``)
before Faust's commit. So the committed offset never passes
the stored state, nor a decision whose delivery was not acknowledged. A crash before (3) re-reads the records since the last
checkpoint from the committed offset, and the restored state (from that checkpoint) makes the same
decisions with the same deterministic ids: the read model keeps the first (``ON CONFLICT (id) DO
NOTHING``), readers of ``healing.decisions`` de-duplicate by id, and a rollback carried out already is
refused by the store's ``expected_version`` (a ``rollback_failed`` decision, not a second rollback). A
crash between (3) and Faust's commit re-reads records that the state already holds: their offsets are
not above the ones stored with it, so they are skipped (``backbone_healing_replayed``), not applied
twice. Both cases are exercised by ``tests/integration/test_healing_restart.py`` (SIGKILL mid-stream).
A state whose ``format`` this code does not read stops the worker (``healer_state_unreadable``) rather
than run on empty state; to start from empty state, use a new app id.

The state's configuration wins over the worker's initial ``config`` when it came from the config store
(version above 0); a state still on version 0 takes the worker's initial configuration (so changed
``--thresholds`` apply after a restart).

Limits: the inputs' partitions are merged in arrival order. Agent health is decided per input partition
(each record is fed with its partition), so its decisions are the same for any interleaving. A run on a
partition that gets no more records is judged at that partition's next record; with
``idle_partitions="follow"`` (``--idle-partitions follow``) the partitions read to their end after a batch
are named to :meth:`Healer.caught_up` and judged on the other partitions' time meanwhile, which finds
such stalls sooner but makes the decisions depend on when the worker found a partition at its end: with a
60-s stall threshold, a run that progressed at 0 s and 50 s is judged stalled at 60 s by a worker that
found its partition at its end before the 50-s record was fetched, and at 110 s by a replay that read
that record first: a decision of another id
(``tests/unit/test_healing_partitions.py``). ``hold`` has been the default since 2026-12-06, so that the
chaos harness can hold the worker's decisions to those of the pure healer over the log
(``decisions_equal`` in ``backbone/chaos_history.py``); circuits,
retries and rollbacks take the calls of every partition on one watermark, so theirs are those of one
event-time-ordered replay only when the inputs have one partition each (as in the tests and the demo) or
the partitions stay close in event time;
one worker holds the whole state (run one worker per app id: a second would split the input partitions
and the two would overwrite one state); each checkpoint writes the whole state (about 50 KB compressed,
210 KB of JSON at most on the shared agent runs), and where the broker does not compact the changelog
(not checked for Tansu) recovery reads every checkpoint ever written. The ``healing.decisions`` and
``healing.acks`` topics are in ``streams.catalogue`` (so the event archive keeps them) and are also
created here when missing.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import faust
import structlog
from confluent_kafka.admin import AdminClient, NewTopic
from faust.types import TP
from prometheus_client import Gauge

from core.observability import REGISTRY
from core.settings import Settings
from processors.errors import UnprocessableEventError
from processors.healing.decisions import DECISION_SCHEMA, Decision
from processors.healing.healer import Healer, HealingConfig, SnapshotError
from processors.healing.notify import Notifier
from processors.healing.read_model import HealingReadModel
from processors.healing.rollback import HEALER_AUTHOR
from processors.shell import (
    BatchDelivery,
    Checkpoints,
    DrainTracker,
    FaustDeadLetters,
    make_faust_app,
    message_headers,
    run_processor_worker,
    traced_headers,
    tracing_process,
)
from processors.tables import TailRecoveringTable
from streams.catalogue import create_missing_topics
from streams.consumer import DLQ_TOPIC
from streams.envelope import CloudEvent
from streams.errors import DeserializationError, EnvelopeError
from streams.serde import AvroSerde, serde_from_settings

__all__ = [
    "COUNTERS",
    "DEFAULT_APP_ID",
    "IDLE_PARTITIONS",
    "STATE_FORMAT",
    "STATE_KEY",
    "STATE_TABLE",
    "HealingStats",
    "HealingTopics",
    "IdlePartitions",
    "create_healing_app",
    "ensure_healing_topics",
    "record_circuit_transitions",
    "run_healing_worker",
]

log = structlog.get_logger(__name__)

DEFAULT_APP_ID = "backbone-healing"
PROCESSOR_NAME = "healing"
#: The Faust table of the healer's state (changelog ``<app id>-healer_state-changelog``).
STATE_TABLE = "healer_state"
#: Its one key.
STATE_KEY = "healer"
#: Layout version of the table's value (``{"format", "offsets", "healer"}``).
STATE_FORMAT = 1
#: What the worker does with an input partition read to its end (:func:`create_healing_app`'s ``idle_partitions``).
IdlePartitions = Literal["hold", "follow"]
IDLE_PARTITIONS: Final[tuple[IdlePartitions, ...]] = ("hold", "follow")

_circuit_open = Gauge(
    "backbone_circuit_open",
    "1 while the circuit breaker is open or half-open (probing), 0 once it closed",
    ["circuit"],
    registry=REGISTRY,
)
_CIRCUIT_KINDS = frozenset({"circuit_opened", "circuit_half_open", "circuit_closed"})
#: The state table's JSON (``json.dumps(..., sort_keys=True, separators=(",", ":"))``'s bytes) without the check
#: for reference cycles, which the snapshot has none of: about a sixth of the encoding's time (1.1 MB of state).
_STATE_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), check_circular=False)


def record_circuit_transitions(decisions: list[Decision]) -> None:
    """Set ``backbone_circuit_open`` from the circuit transitions among ``decisions`` (in their order)."""
    for d in decisions:
        if d.kind in _CIRCUIT_KINDS:
            _circuit_open.labels(d.details["circuit"]).set(0 if d.kind == "circuit_closed" else 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class HealingTopics:
    """Topics of the healer (configurable for tests)."""

    events: str = "agent.events"
    config: str = "config.changes"
    decisions: str = "healing.decisions"
    acks: str = "healing.acks"
    dead_letters: str = DLQ_TOPIC
    decisions_partitions: int = 3


@dataclass(slots=True)
class HealingStats:
    """Counters of one app instance."""

    records_count: int = 0
    decisions_count: int = 0
    dead_letters_count: int = 0
    rollbacks_done: int = 0
    replayed_count: int = 0
    state_writes_count: int = 0
    state_bytes: int = 0
    state_bytes_max: int = 0
    batches_count: int = 0
    restored: bool = False
    first_record_monotonic: float | None = field(default=None)
    last_record_monotonic: float | None = field(default=None)
    #: ``time.process_time()`` (CPU seconds of the whole process, every thread) at the first record, and at
    #: the end of the last batch (after the last record's decisions were delivered and projected)
    first_record_cpu: float | None = field(default=None)
    last_record_cpu: float | None = field(default=None)


COUNTERS = (
    ("backbone_healing_records", "records_count", "Records handled (every outcome)"),
    ("backbone_healing_decisions", "decisions_count", "Decisions sent to the decisions topic"),
    ("backbone_healing_dead_letters", "dead_letters_count", "Records dead-lettered"),
    ("backbone_healing_rollbacks", "rollbacks_done", "Configuration rollbacks carried out"),
    ("backbone_healing_replayed", "replayed_count", "Records skipped: already in the recovered state"),
    ("backbone_healing_state_writes", "state_writes_count", "Healer states written to the state table"),
    ("backbone_healing_state_bytes", "state_bytes", "Bytes of healer state written to the state table"),
    ("backbone_healing_batches", "batches_count", "Record batches whose decisions were awaited together"),
)
"""The healer's counters as Prometheus metrics (label ``app``)."""


class _HealingShell:
    def __init__(
        self,
        settings: Settings,
        topics: HealingTopics,
        serde: AvroSerde,
        healer: Healer,
        read_model: HealingReadModel | None,
        decisions_topic: faust.TopicT,
        notifier: Notifier | None,
        config_store: Any,
        table: Any = None,
        app: Any = None,
        idle_partitions: IdlePartitions = "hold",
    ) -> None:
        self.serde = serde
        self.idle_partitions = idle_partitions
        self.healer = healer
        self.initial_config = healer.config
        self.table = table
        self.app = app
        # read-to-end checks against the consumer's fetch high watermark (none without an app: unit tests)
        self.drains = DrainTracker()
        if app is not None:
            self.drains.follow(app)
        self.offsets: dict[str, int] = {}
        self.lock = asyncio.Lock()
        self.dirty = False
        # the records handled (handle_batch) since the last checkpoint, and the future their commit waits
        # for, done once a written checkpoint holds them
        self.checkpoints = Checkpoints(self._write_state, every_records=1000, every_seconds=1.0)
        self.read_model = read_model
        self.decisions_topic = decisions_topic
        self.notifier = notifier
        self.config_store = config_store
        self.stats = HealingStats()
        self.batch_decisions: list[Decision] = []
        self.batch_pending: list[Any] = []
        self.batch_messages: list[Any] = []
        self.dead_letters = FaustDeadLetters(settings, serde, PROCESSOR_NAME, topics.dead_letters)
        self.group = app.conf.id if app is not None else PROCESSOR_NAME

    async def recovered(self) -> None:
        """Restore the healer from the state table (Faust calls it once the table is recovered, before
        the streams resume; also after a rebalance, when the records since the last checkpoint, never
        committed, are read again from the committed offsets).

        Raises:
            SnapshotError: the stored state has another format or is not a healer's (the app is crashed).
        """
        async with self.lock:  # not in the middle of a record or a checkpoint
            await self._recovered()

    async def _recovered(self) -> None:
        raw = self.table.get(STATE_KEY)
        self.dirty = False
        # a batch not flushed is dropped: its records were never committed and are read again (their
        # decisions were sent, possibly delivered; the same ones, same ids, are sent again)
        self.batch_decisions, self.batch_pending, self.batch_messages = [], [], []
        # BatchDelivery drains (checkpoints) before every revocation, so nothing is pending here; if it
        # were, its records' state is dropped: fail their commit (the app crashes, they are read again)
        self.checkpoints.abandon(RuntimeError("healer state recovered over records not checkpointed"))
        if raw is None:  # nothing checkpointed, nothing committed: every record is read again
            self.healer, self.offsets = Healer(self.initial_config), {}
            self.app.healer = self.healer  # type: ignore[attr-defined]
            log.info("healer_state_empty", config_version=self.healer.config.version)
            return
        try:
            state = json.loads(zlib.decompress(raw))
            if state.get("format") != STATE_FORMAT:
                raise SnapshotError(
                    f"healer state table format {state.get('format')!r}, this worker reads {STATE_FORMAT}"
                )
            healer = Healer.restore(state["healer"])
            offsets = {str(k): int(v) for k, v in state["offsets"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, zlib.error) as exc:
            err = exc if isinstance(exc, SnapshotError) else SnapshotError(f"{type(exc).__name__}: {exc}")
            log.error("healer_state_unreadable", error=str(err))
            await self.app.crash(err)
            raise err from exc
        if healer.config.version == 0 and healer.config != self.initial_config:
            healer.reconfigure(self.initial_config)
        self.healer, self.offsets = healer, offsets
        self.app.healer = healer  # type: ignore[attr-defined]
        self.stats.restored = True
        for b in healer.breakers.breakers.values():
            if b.changed_at is not None:
                _circuit_open.labels(b.key).set(0 if b.state.value == "closed" else 1)
        log.info("healer_state_restored", bytes=len(raw), offsets=offsets, watermark=healer.status()["watermark"],
                 circuits_open=[b.key for b in healer.breakers.breakers.values() if b.state.value != "closed"],
                 escalations_open=len(healer.escalations), config_version=healer.config.version)  # fmt: skip

    def handled(self, message: Any) -> None:
        """Note that ``message`` is in the healer's state now (its decisions are out)."""
        self.offsets[f"{message.topic}:{message.partition}"] = int(message.offset)
        self.dirty = True

    async def handle_batch(self, records: list[Any]) -> asyncio.Future[None] | None:
        """Process records of a :class:`~processors.shell.BatchDelivery` (aiokafka records, in their order):
        each is decided and its decisions sent (:meth:`take`, in its tracing span), then the batch is
        completed (:meth:`flush`: deliveries awaited, projected, acted on, offsets noted in the state), and
        a checkpoint is written when due (:attr:`checkpoints`). Returns the future that the records' commit
        waits for: done once a checkpoint holds them (at once when this one did), or None when every record
        was one the state already held (replayed).

        Raises:
            Exception: as :meth:`flush` (BatchDelivery crashes the app; nothing after the last checkpoint is
                committed, and those records are read again on restart).
        """
        async with self.lock:  # not while the timer checkpoints or the table recovers
            group = self.group
            for record in records:
                with tracing_process(record, group):
                    await self.take(record)
            if self.batch_messages and self.idle_partitions == "follow":
                await self._note_read_to_end(records)
            handled = len(self.batch_messages)
            await self.flush()
            # the records' decisions are out and their offsets noted (flush): counted towards a checkpoint,
            # written once checkpoint_records are counted or the oldest waited checkpoint_seconds
            future = self.checkpoints.record(handled)
            self.checkpoints.checkpoint_if_due()
            return future

    async def _note_read_to_end(self, records: list[Any]) -> None:
        """Tell the healer which of its input partitions are read to their end (:meth:`Healer.caught_up`):
        those whose last record handled (this batch's included) is the one before the consumer's high
        watermark of the partition, as its last fetch answered it. What that decides (stalls of runs on a
        partition with no traffic) joins the batch. A partition no longer assigned, or not fetched yet, is
        not read to its end."""
        last = dict(self.offsets)
        for record in records:
            last[f"{record.topic}:{record.partition}"] = int(record.offset)
        done = []
        for key in self.healer.partition_health:
            topic, _, partition = key.rpartition(":")
            if key in last and self.drains.at_end(TP(topic, int(partition)), last[key]):
                done.append(key)
        decisions = self.healer.caught_up(done)
        if decisions:
            record_circuit_transitions(decisions)
            await self._send(decisions, self.batch_pending)
            self.batch_decisions.extend(decisions)

    def _write_state(self) -> None:
        """The checkpoint write (:attr:`checkpoints`; synchronous, between batches: the timer's,
        a full count's and BatchDelivery's ``flush`` before a revocation or stop): the state, when it changed.
        BatchDelivery then moves the records' offsets into what Faust commits, after flushing the producer,
        changelog included."""
        if self.dirty:
            self.save()

    def save(self) -> None:
        """Write the healer's state and the offsets it holds to the state table."""
        self.dirty = False
        body = {
            "format": STATE_FORMAT,
            "offsets": dict(sorted(self.offsets.items())),
            "healer": self.healer.snapshot(shared=True),  # serialised at once, before the healer is fed again
        }
        raw = zlib.compress(_STATE_JSON.encode(body).encode(), 1)
        self.table[STATE_KEY] = raw
        self.stats.state_writes_count += 1
        self.stats.state_bytes += len(raw)
        self.stats.state_bytes_max = max(self.stats.state_bytes_max, len(raw))

    async def handle(self, message: Any) -> None:
        """Process one record as a batch of its own (:meth:`take`, then :meth:`flush`), with no checkpoint;
        never raises for a bad record. Not used by the app (:meth:`handle_batch` is): the per-record
        reference that tests compare the batches with."""
        await self.take(message)
        await self.flush()

    async def take(self, message: Any) -> None:
        """Decide one record (an aiokafka record, or a Faust message) and start sending its decisions,
        without awaiting their delivery; the record joins the batch that :meth:`flush` completes. Never
        raises for a bad record (a dead letter is sent and flushed here, durable before the record can be
        committed)."""
        self.stats.records_count += 1
        self.stats.last_record_monotonic = now = time.monotonic()
        if self.stats.first_record_monotonic is None:
            self.stats.first_record_monotonic, self.stats.first_record_cpu = now, time.process_time()
        if int(message.offset) <= self.offsets.get(f"{message.topic}:{message.partition}", -1):
            self.stats.replayed_count += 1
            return
        headers = message_headers(message.headers)
        try:
            # checked as from_headers checks; the id is all the healer reads
            event_id = CloudEvent.id_from_headers(headers)
            schema, data = self.serde.decode(message.value)
            try:
                partition = f"{message.topic}:{message.partition}"
                decisions = self.healer.feed(
                    {"schema": schema, "data": data, "id": event_id, "partition": partition}
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise UnprocessableEventError(
                    f"{schema}: {type(exc).__name__}: {exc}", event_id=event_id
                ) from exc
        except (EnvelopeError, DeserializationError, UnprocessableEventError) as exc:
            await self.dead_letters.publish(message, exc, headers)
            self.stats.dead_letters_count += 1
            log.warning(
                "healing_record_dead_lettered", reason=str(exc), topic=message.topic, offset=message.offset
            )
            self.batch_messages.append(message)
            return
        if decisions:
            record_circuit_transitions(decisions)
            await self._send(decisions, self.batch_pending)
            self.batch_decisions.extend(decisions)
        self.batch_messages.append(message)

    async def flush(self) -> None:
        """Complete the batch: await the delivery of every decision sent since the last flush (in the order
        sent), then project and act on them (:meth:`emit`'s steps after the send), then note the batch's
        messages as held by the state (:meth:`handled`).

        Raises:
            Exception: a decision's delivery failed, or the read model (``psycopg.Error``); the app crashes
                and the records since the last checkpoint, never committed, are read again on restart.
        """
        if not self.batch_messages:
            return
        self.stats.batches_count += 1
        decisions, pending, messages = self.batch_decisions, self.batch_pending, self.batch_messages
        self.batch_decisions, self.batch_pending, self.batch_messages = [], [], []
        if pending:
            await asyncio.gather(*pending)
        if decisions:
            await self._act(decisions)
        for message in messages:
            self.handled(message)
        # once per batch, not per record: a system call (about 2 µs, more under load)
        self.stats.last_record_cpu = time.process_time()

    async def _send(self, decisions: list[Decision], pending: list[Any]) -> None:
        """Send ``decisions`` back to back (one partition's records stay in their order), adding each
        delivery future to ``pending``."""
        for d in decisions:
            event = d.to_event()
            pending.append(
                await self.decisions_topic.send(
                    key=d.subject.encode(),
                    value=self.serde.encode(DECISION_SCHEMA, event.data),
                    headers=traced_headers(event.attributes.to_headers()),
                    timestamp=d.event_time.timestamp(),
                    force=True,
                )
            )

    async def emit(self, decisions: list[Decision]) -> None:
        """Publish, project and act on decisions (see the module docstring), delivery awaited."""
        pending: list[Any] = []
        await self._send(decisions, pending)
        await asyncio.gather(*pending)
        await self._act(decisions)

    async def _act(self, decisions: list[Decision]) -> None:
        """Count and log delivered decisions, post escalations, carry out rollbacks, project them all (one
        read-model transaction), then emit the follow-up decisions (notified, rolled back or not)."""
        follow: list[Decision] = []
        for d in decisions:
            self.stats.decisions_count += 1
            log.info("healing_decision", kind=d.kind, subject=d.subject, id=d.id)
            if d.kind == "escalation" and self.notifier is not None:
                follow.append(await self.notifier.notify(d))
            if d.kind == "rollback" and self.config_store is not None:
                follow.append(await asyncio.to_thread(self._rollback, d))
        if self.read_model is not None:
            await asyncio.to_thread(self.read_model.apply, decisions)
        if follow:
            await self.emit(follow)

    def _rollback(self, d: Decision) -> Decision:
        det = d.details
        try:
            version = self.config_store.rollback(
                det["key"],
                author=HEALER_AUTHOR,
                reason=f"healer: {det['evidence']['why']}",
                to_version=int(det["to_version"]),
                expected_version=int(det["change_version"]),
                causation_id=d.id,
            )
        except Exception as exc:  # noqa: BLE001 - any refusal of the store is an event, not a crash
            return Decision(kind="rollback_failed", subject=d.subject, event_time=d.event_time, config_version=d.config_version,
                            causation_id=d.id, details={"key": det["key"], "reason": f"{type(exc).__name__}: {exc}"})  # fmt: skip
        self.stats.rollbacks_done += 1
        return Decision(kind="rollback_applied", subject=d.subject, event_time=d.event_time, config_version=d.config_version,
                        causation_id=d.id, details={"key": det["key"], "new_version": getattr(version, "version", None),
                                                    "restored_version": int(det["to_version"])})  # fmt: skip

    def close(self) -> None:
        self.dead_letters.close()
        if self.read_model is not None:
            self.read_model.close()


def create_healing_app(
    settings: Settings,
    *,
    app_id: str | None = None,
    topics: HealingTopics | None = None,
    config: HealingConfig | None = None,
    read_model: HealingReadModel | None = None,
    notifier: Notifier | None = None,
    config_store: Any = None,
    serde: AvroSerde | None = None,
    web_port: int | None = 0,
    checkpoint_records: int = 1000,
    checkpoint_seconds: float = 1.0,
    batch_records: int = 1000,
    idle_partitions: IdlePartitions = "hold",
) -> faust.App:
    """Build the healer's Faust app: the events, config and acks topics consumed through
    :class:`processors.shell.BatchDelivery` (each fetch's records handed in lists of at most
    ``batch_records`` to ``_HealingShell.handle_batch``, in the order a Faust agent would get them; offsets
    committed up to the records a written checkpoint holds).

    Args:
        settings: broker settings and state directory.
        app_id: Faust app id / consumer group; default ``backbone-healing``.
        topics: topic names.
        config: initial healing configuration (later ``healing.thresholds`` changes replace it).
        read_model: where decisions are projected; ``None``: not projected.
        notifier: where escalations are posted; ``None``: not posted.
        config_store: a ``configuration.store.ConfigStore`` to carry out rollbacks; ``None``: recommend only.
        serde: default :func:`streams.serde.serde_from_settings`.
        web_port: Faust's web server port; ``0`` or ``None``: off.
        checkpoint_records: records after which the state is written and their offsets can be committed.
        checkpoint_seconds: the longest a handled record waits for that (a timer checkpoints when idle).
        batch_records: most records decided before their decisions' deliveries are awaited together (a
            batch is at most what BatchDelivery has buffered, so it is smaller when records come slowly).
        idle_partitions: ``"hold"`` (default): an input partition's runs are judged on that partition's
            own time only, so the decisions are a function of the log (a replay, a restart or another
            worker decides the same ids); a run on a partition that gets no more records is judged at
            that partition's next record. ``"follow"``: after each batch the partitions read to their end
            are named to :meth:`Healer.caught_up` and judged on the healer's watermark (the time of the
            others) until their next record, as Flink's ``withIdleness`` does: stalls on a quiet
            partition are found as the other partitions move, but which ones depends on when the worker
            found the partition at its end, so a live run and a replay of its log can decide
            differently (a run judged stalled while its next record was on its way).

    Returns:
        The app; counters at ``app.healing_stats``, the healer at ``app.healer`` (replaced by the restored
        one once the state table is recovered),
        ``app.healing_close()`` releases the dead-letter producer.
    """
    topics = topics or HealingTopics()
    # make_faust_app's defaults: EagerSeekingConsumer, and QuietMonitor when Faust's web server is off
    app = make_faust_app(settings, app_id or DEFAULT_APP_ID, partitions=1, web_port=web_port)
    serde = serde or serde_from_settings(settings)
    source = app.topic(
        topics.events, topics.config, topics.acks, key_serializer="raw", value_serializer="raw"
    )
    decisions_topic = app.topic(topics.decisions, key_serializer="raw", value_serializer="raw")
    healer = Healer(config)
    # One partition, one key: the healer is one state machine over every input partition. use_partitioner:
    # the write goes to the key's partition (0), not to the input record's, so inputs of any partition
    # count can feed it (Faust's co-partitioning check does not apply).
    table = app.tables.add(
        TailRecoveringTable(
            app, kafka=settings.kafka, name=STATE_TABLE, default=None, beacon=app.tables.beacon, partitions=1,
            use_partitioner=True, value_type=bytes, help="The healer's state: {format, offsets, healer: Healer.snapshot()} (JSON).",
        )
    )  # fmt: skip
    shell = _HealingShell(
        settings,
        topics,
        serde,
        healer,
        read_model,
        decisions_topic,
        notifier,
        config_store,
        table,
        app,
        idle_partitions,
    )
    table.on_recover(shell.recovered)

    shell.checkpoints.every_records, shell.checkpoints.every_seconds = checkpoint_records, checkpoint_seconds

    BatchDelivery(
        app, source, shell.handle_batch, flush=shell.checkpoints.checkpoint, max_batch=batch_records,
        # records wait for a checkpoint (checkpoint_records or checkpoint_seconds), not for a batch count
        max_pending=checkpoint_records + 1,
        interleave=True,  # the topics merged as Faust's agent would merge them (README: partition skew)
    )  # fmt: skip

    @app.timer(interval=checkpoint_seconds)
    async def healer_checkpoint() -> None:
        """Checkpoint what arrived since the last one when no record came to do it."""
        async with shell.lock:
            if shell.checkpoints.pending:
                shell.checkpoints.checkpoint()

    app.healing_stats = shell.stats  # type: ignore[attr-defined]
    app.healer = healer  # type: ignore[attr-defined]
    app.healing_close = shell.close  # type: ignore[attr-defined]
    return app


def ensure_healing_topics(
    settings: Settings, topics: HealingTopics, *, timeout_seconds: float = 30.0
) -> None:
    """Create the decisions topic (and the inputs and dead-letter topic) when missing.

    A catalogue name (``agent.events``, ``config.changes``, ...) is made as the catalogue says whatever the
    count below (:func:`streams.catalogue.create_missing_topics`): the 1-partition counts only apply to
    other names, such as a test's own topics; the decisions topic gets ``topics.decisions_partitions``.

    Raises:
        StreamsError: the broker did not answer or refused a topic.
    """
    admin = AdminClient(settings.kafka.librdkafka())
    wanted = [
        NewTopic(topics.events, num_partitions=1, replication_factor=1),
        NewTopic(topics.config, num_partitions=1, replication_factor=1),
        NewTopic(topics.decisions, num_partitions=topics.decisions_partitions, replication_factor=1),
        NewTopic(topics.acks, num_partitions=1, replication_factor=1),
        NewTopic(topics.dead_letters, num_partitions=1, replication_factor=1),
    ]
    create_missing_topics(admin, wanted, timeout_seconds=timeout_seconds)


def run_healing_worker(
    settings: Settings,
    *,
    app_id: str | None = None,
    topics: HealingTopics | None = None,
    config: HealingConfig | None = None,
    read_model: HealingReadModel | None = None,
    notifier: Notifier | None = None,
    config_store: Any = None,
    stop_after_idle_seconds: float | None = None,
    idle_partitions: IdlePartitions = "hold",
) -> tuple[HealingStats, Healer]:
    """Run the healer worker in this process until stopped (blocking; owns the event loop and signals),
    with ``/metrics``, ``/healthz`` and ``/readyz`` on ``settings.metrics_host:metrics_port``
    (:func:`processors.shell.run_processor_worker`).

    Args:
        stop_after_idle_seconds: stop once no record arrived for this long after start.
        idle_partitions: as :func:`create_healing_app`'s.

    Returns:
        ``(counters, the healer)`` when the worker has stopped.
    """
    topics = topics or HealingTopics()
    ensure_healing_topics(settings, topics)
    if read_model is not None:
        read_model.ensure_schema()
    app = create_healing_app(settings, app_id=app_id, topics=topics, config=config, read_model=read_model,
                             notifier=notifier, config_store=config_store, idle_partitions=idle_partitions)  # fmt: skip
    stats: HealingStats = app.healing_stats  # type: ignore[attr-defined]
    run_processor_worker(
        settings, app, processor=PROCESSOR_NAME, stats=stats, counters=COUNTERS,
        close=app.healing_close,  # type: ignore[attr-defined]
        stop_after_idle_seconds=stop_after_idle_seconds,
    )  # fmt: skip
    return stats, app.healer  # type: ignore[attr-defined]
