"""The projection runner: batched consume, then the view rows and the checkpoint in one transaction.

Exactly-once in effect: for each batch the runner, in one PostgreSQL transaction, (1) records the
batch's event ids in ``projection_seen`` and keeps only those it had not seen (so a re-imported
history changes nothing), (2) lets the projection apply them, (3) upserts the
``(projection, topic, partition) -> next_offset`` checkpoint. On start and after any failure it seeks
to the stored checkpoint, never to Kafka's committed offsets (which it also commits, after the
transaction, for lag tooling only). Records that cannot be decoded, or that the view refuses, go to
the dead-letter topic (flushed before the transaction commits), and the runner goes on.

Everything a projection owns (its view tables, checkpoints, seen ids) lives in one PostgreSQL
schema, ``proj_<name>`` by default, so a rebuild can fill a fresh schema and swap it in atomically.
Each batch is fenced: it commits only if the stored checkpoint of every partition in it is where the
batch starts, so a stale runner (after a rebalance or a swap) rewinds instead of double-applying.

Optional projection attributes (read with ``getattr``, so a plain :class:`Projection` needs none):

* ``dedupe_by_id = False``: skip the ``projection_seen`` step (the archive keys rows by log position
  and keeps every record, duplicates included);
* ``apply_failures(cur, failures)``: the projection takes the undecodable records itself (in the same
  transaction) instead of the runner dead-lettering them (the archive keeps them; the other
  projections reading the topic still dead-letter them).
* ``decode(raw) -> ConsumedEvent | DecodeFailure``: the projection decodes its records itself from a
  :class:`streams.consumer.RawRecord` instead of :func:`streams.consumer.decode_message` (Confluent-framed
  Avro with CloudEvents headers); for topics of plain JSON (the routing projection). A
  :class:`~streams.consumer.DecodeFailure` it returns is dead-lettered like any other; such a projection
  is never applied column-wise.

``after_commit(events)`` (a constructor argument) is called with the applied events after each
commit, e.g. to refresh a Redis read model; it must not raise (an exception is logged and ignored:
PostgreSQL is the truth).
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from operator import is_not

import psycopg
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from core import tracing
from core.observability import REGISTRY
from core.settings import Settings
from projections.base import Projection
from projections.errors import ProjectionApplyError
from streams.columnar import ColumnarBatch, decode_columnar, polars_available
from streams.consumer import (
    DLQ_TOPIC,
    ConsumedEvent,
    DeadLetterPublisher,
    DecodeFailure,
    RawRecord,
    decode_message,
    make_consumer,
)
from streams.offsets import consume_ready
from streams.producer import EventProducer
from streams.serde import AvroSerde

__all__ = [
    "BOOKKEEPING_DDL",
    "DEFAULT_BATCH_SIZE",
    "ProjectionRunner",
    "RunnerStats",
    "run_projections",
    "schema_name",
]

#: Most records per transaction unless told otherwise (runner, rebuild, both CLIs). 20,000 rather than
#: 5,000: the runner is bound to one core by the GIL, and a larger batch spreads the per-batch polars
#: calls and round trips over more events; ``bench/bench_projections.py`` (part of ``make bench``)
#: measures both sizes side by side. Only after a full batch (a backlog) does the runner wait up to
#: ``batch_timeout_seconds`` (0.2 s) to fill the next one; otherwise it applies what has been fetched as soon
#: as it arrives (:func:`streams.offsets.consume_ready`), so a quiet topic is not delayed.
DEFAULT_BATCH_SIZE = 20_000

log = structlog.get_logger(__name__)

# method descriptors: map() calls them per message without a Python frame
_msg_error, _msg_topic, _msg_partition, _msg_offset = (
    Message.error,
    Message.topic,
    Message.partition,
    Message.offset,
)

_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.projection_seen'), hashtext(%s))"
_CHECKPOINTS_FOR_UPDATE_SQL = (
    "SELECT topic, partition, next_offset FROM projection_checkpoints WHERE projection = %s FOR UPDATE"
)

BOOKKEEPING_DDL = """
CREATE TABLE IF NOT EXISTS projection_checkpoints (
    projection  text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);
CREATE TABLE IF NOT EXISTS projection_seen (
    projection text NOT NULL,
    event_id   text NOT NULL
);
CREATE INDEX IF NOT EXISTS projection_seen_event_id ON projection_seen USING hash (event_id);
CREATE TABLE IF NOT EXISTS projection_registry (
    projection text PRIMARY KEY,
    version    integer     NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""

_applied = Counter(
    "backbone_projection_events_applied", "Events applied to a view", ["projection"], registry=REGISTRY
)
_duplicates = Counter(
    "backbone_projection_events_duplicate",
    "Events skipped as already applied",
    ["projection"],
    registry=REGISTRY,
)
_dead = Counter(
    "backbone_projection_events_dead_lettered",
    "Records sent to the dead-letter topic",
    ["projection"],
    registry=REGISTRY,
)
_batch_seconds = Histogram(
    "backbone_projection_batch_seconds",
    "Time to apply and commit one batch",
    ["projection"],
    registry=REGISTRY,
)
_lag = Gauge(
    "backbone_projection_lag_events",
    "Events behind the end of the log: over the runner's assigned partitions, high watermark minus the next "
    "offset to apply (set at most once a second, and when a run catches up)",
    ["projection"],
    registry=REGISTRY,
)


@dataclass(slots=True)
class RunnerStats:
    """Counters of one runner since it started (``columnar_batches``: batches applied column-wise;
    ``absent_topics``: the projection's topics that were not on the broker when a run until caught up
    started, so there was nothing to catch up on them)."""

    batches: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    db_retries: int = 0
    columnar_batches: int = 0
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    absent_topics: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Prepared:
    """A consumed batch ready for its transaction."""

    msgs: list
    batch: ColumnarBatch | None
    first: dict[tuple[str, int], int]
    last: dict[tuple[str, int], int]
    started: float


class _Fenced(Exception):
    """The stored checkpoint moved under this runner (another runner, or a rebuild swap)."""


def _ids_param(ids: list[str]) -> tuple[str, str | list[str]]:
    """SQL for a text array of ``ids`` and its parameter: one string split on the server on U+001F
    (cheap to send), or an array when an id holds that character or is empty."""
    joined = "\x1f".join(ids)
    if "" in ids or joined.count("\x1f") != len(ids) - 1:
        return "%s::text[]", ids
    return "string_to_array(%s, chr(31))", joined


_gc_lock = threading.Lock()
_gc_users = 0
_gc_saved: tuple[int, int, int] | None = None


@contextlib.contextmanager
def _collector_threshold(threshold: int | None) -> Iterator[None]:
    """Raise the collector's first-generation threshold to at least ``threshold`` while the block
    runs; the saved thresholds come back when the last such block (of any thread) exits."""
    global _gc_users, _gc_saved
    if threshold is None:
        yield
        return
    with _gc_lock:
        if _gc_users == 0:
            _gc_saved = gc.get_threshold()
        _gc_users += 1
        current = gc.get_threshold()
        if current[0] < threshold:
            gc.set_threshold(threshold, *current[1:])
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0 and _gc_saved is not None:
                gc.set_threshold(*_gc_saved)
                _gc_saved = None


def schema_name(projection_name: str, suffix: str = "") -> str:
    """The PostgreSQL schema of a projection: ``proj_<name>[_<suffix>]``.

    Raises:
        ValueError: a name that is not a lower-case identifier.
    """
    name = f"proj_{projection_name}" + (f"_{suffix}" if suffix else "")
    if not name.replace("_", "").isalnum() or not name.islower() or len(name) > 63:
        raise ValueError(f"{name!r} is not a valid projection schema name")
    return name


class ProjectionRunner:
    """Run one projection: consume its topics and keep its view and checkpoint in PostgreSQL.

    Args:
        settings: Kafka and PostgreSQL settings.
        serde: the Avro serde.
        projection: the view to maintain.
        group_id: consumer group (default ``projection-<name>``).
        batch_size: most records per batch.
        batch_timeout_seconds: longest wait to fill a batch after a full one (a backlog); when caught
            up, a batch is what has arrived and the wait is for its first record only.
        dlq_producer: the producer for dead letters (one is made from ``settings`` otherwise).
        dlq_topic: the dead-letter topic.
        schema: PostgreSQL schema of the projection's tables (default ``proj_<name>``).
        on_batch: called after each committed batch (tests use it to inject crashes).
        after_commit: called with the events applied by each committed batch (a read-model hook);
            its exceptions are logged, never raised. On the columnar path its
            ``after_commit_keys(keys)`` is called instead, with the keys of the applied records.
        columnar: decode batches column-wise (:mod:`streams.columnar`) and fold them with the
            projection's ``apply_columns``; ``None`` (default) does so when the projection has
            ``apply_columns`` and the hook (if any) has ``after_commit_keys``. A batch that does not
            decode column-wise, or that ``apply_columns`` refuses, is redone record by record.
        pipeline: run each batch's transaction on a database thread while the next batch is consumed
            and decoded (commits stay one at a time and in order; see :meth:`step`).
        seen_in_memory: keep the set of applied event ids in memory (loaded from ``projection_seen`` by
            :meth:`setup`) and only append new ids to the table, without the hash index. For a
            runner that is the only writer of its schema, i.e. a rebuild into a fresh schema, which
            creates the index before the swap (:meth:`create_seen_index`). Memory: about 120 bytes
            per id.
        gc_threshold: the cyclic garbage collector's first-generation threshold while :meth:`run`
            runs (``None``: leave the collector alone). A batch of 5,000 records allocates about
            100,000 container objects (header lists and tuples, dicts) that reference counting frees,
            so CPython's default of 700 runs the collector about 140 times a batch. In back-to-back
            runs of 500,000 events in one process (an ad-hoc script, not a bench) the threshold of
            10,000 gave 56,411 and 58,184 events/s against 52,476 and 52,645 at 700; ``make bench``
            (``bench/bench_projections.py``) compares the two with 20,000-record batches. The setting is
            process-wide; it is raised, never lowered, and restored when the last running runner
            returns.
        lag_interval_seconds: how often :meth:`run` sets ``backbone_projection_lag_events`` (see
            :meth:`lag`), and once more when it returns caught up. ``0``: after every consume call.

    Raises:
        ValueError: ``columnar=True`` for a projection (or hook) that cannot take it.
    """

    def __init__(
        self,
        settings: Settings,
        serde: AvroSerde,
        projection: Projection,
        *,
        group_id: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_timeout_seconds: float = 0.2,
        dlq_producer: EventProducer | None = None,
        dlq_topic: str = DLQ_TOPIC,
        schema: str | None = None,
        on_batch: Callable[[RunnerStats], None] | None = None,
        after_commit: Callable[[Sequence[ConsumedEvent]], None] | None = None,
        columnar: bool | None = None,
        pipeline: bool = True,
        seen_in_memory: bool = False,
        gc_threshold: int | None = 10_000,
        lag_interval_seconds: float = 1.0,
    ) -> None:
        self.settings = settings
        self.serde = serde
        self.projection = projection
        self.group_id = group_id or f"projection-{projection.name}"
        self.schema = schema or schema_name(projection.name)
        self.batch_size = batch_size
        self.batch_timeout_seconds = batch_timeout_seconds
        self._last_batch_full = False
        self.startup_retry_seconds = 60.0
        """How long :meth:`run` retries its setup while PostgreSQL is unreachable before raising."""
        self._owns_dlq_producer = dlq_producer is None
        self.dlq = DeadLetterPublisher(
            dlq_producer or EventProducer(settings.kafka, serde), projection.name, topic=dlq_topic
        )
        self.on_batch = on_batch
        self.after_commit = after_commit
        self._decode: Callable[[RawRecord], ConsumedEvent | DecodeFailure] | None = getattr(
            projection, "decode", None
        )
        can = (
            self._decode is None
            and hasattr(projection, "apply_columns")
            and (after_commit is None or hasattr(after_commit, "after_commit_keys"))
            and polars_available()
        )
        if columnar and not can:
            raise ValueError(
                f"projection {projection.name!r} cannot be applied column-wise (it needs apply_columns and "
                "no decode hook, and an after_commit hook needs after_commit_keys)"
            )
        self.columnar = can if columnar is None else columnar
        self.stats = RunnerStats()
        self._conn: psycopg.Connection | None = None
        self._assigned: set[tuple[str, int]] = set()
        self._at_end: set[tuple[str, int]] = set()
        # the next offset to apply of each assigned partition: its stored checkpoint when assigned
        # (None: none stored, the log's start), then each committed batch's end (for the lag gauge)
        self._next: dict[tuple[str, int], int | None] = {}
        self.lag_interval_seconds = lag_interval_seconds
        self._lag_at = float("-inf")
        self._consumer: Consumer | None = None
        self._need_rewind = False
        self.pipeline = pipeline
        self.seen_in_memory = seen_in_memory
        self._seen: set[str] = set()
        self._pending_seen: list[str] = []
        self._pool: ThreadPoolExecutor | None = None  # the database thread, while run() runs
        self._inflight: tuple[_Prepared, Future] | None = None
        self.gc_threshold = gc_threshold
        self.stop_event = threading.Event()

    # -- PostgreSQL -------------------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.settings.postgres.dsn(), autocommit=False, options=f"-c search_path={self.schema}"
            )
        return self._conn

    def setup(self) -> None:
        """Create the bookkeeping tables and the projection's tables (idempotent)."""
        conn = self._connect()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('backbone-projection-ddl'))")
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            conn.execute(BOOKKEEPING_DDL)
            self.projection.create(conn)
            conn.execute(
                "INSERT INTO projection_registry (projection, version) VALUES (%s, %s) "
                "ON CONFLICT (projection) DO UPDATE SET version = excluded.version",
                (self.projection.name, self.projection.version),
            )
            if self.seen_in_memory:
                conn.execute("DROP INDEX IF EXISTS projection_seen_event_id")
                self._seen = {
                    r[0]
                    for r in conn.execute(
                        "SELECT event_id FROM projection_seen WHERE projection = %s", (self.projection.name,)
                    )
                }

    def create_seen_index(self) -> None:
        """Create the hash index of ``projection_seen`` (after a run with ``seen_in_memory``)."""
        conn = self._connect()
        with conn.transaction():
            conn.execute(
                "CREATE INDEX IF NOT EXISTS projection_seen_event_id ON projection_seen USING hash (event_id)"
            )

    def checkpoints(self) -> dict[tuple[str, int], int]:
        """The stored ``(topic, partition) -> next offset`` of this projection."""
        conn = self._connect()
        with conn.transaction():
            rows = conn.execute(
                "SELECT topic, partition, next_offset FROM projection_checkpoints WHERE projection = %s",
                (self.projection.name,),
            ).fetchall()
        return {(t, p): o for t, p, o in rows}

    # -- Kafka ----------------------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drain()
        cps = self._checkpoints_with_retry()
        for tp in partitions:
            tp.offset = cps.get((tp.topic, tp.partition), OFFSET_BEGINNING)
            self._assigned.add((tp.topic, tp.partition))
            self._at_end.discard((tp.topic, tp.partition))
            self._next[(tp.topic, tp.partition)] = cps.get((tp.topic, tp.partition))
        consumer.assign(partitions)
        log.info("partitions assigned", projection=self.projection.name, partitions=len(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drain()  # the batch in flight commits (or fails) before the partitions go
        for tp in partitions:
            self._assigned.discard((tp.topic, tp.partition))
            self._at_end.discard((tp.topic, tp.partition))
            self._next.pop((tp.topic, tp.partition), None)
        consumer.unassign()

    def _checkpoints_with_retry(self) -> dict[tuple[str, int], int]:
        while True:
            try:
                return self.checkpoints()
            except psycopg.OperationalError as exc:
                self._db_backoff(exc)

    def _rewind(self) -> None:
        """Seek every assigned partition back to its stored checkpoint (after a failed transaction)."""
        assert self._consumer is not None
        cps = self._checkpoints_with_retry()
        for topic, partition in sorted(self._assigned):
            offset = cps.get((topic, partition), OFFSET_BEGINNING)
            self._consumer.seek(TopicPartition(topic, partition, offset))
            self._at_end.discard((topic, partition))
            self._next[(topic, partition)] = cps.get((topic, partition))
        self._need_rewind = False

    def _db_backoff(self, exc: Exception) -> None:
        self.stats.db_retries += 1
        delay = min(5.0, 0.2 * 2 ** min(self.stats.db_retries, 5))
        log.warning(
            "postgres unavailable, retrying", projection=self.projection.name, error=str(exc), delay=delay
        )
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
            self._conn = None
        if self.stop_event.wait(delay):
            raise KeyboardInterrupt

    # -- the batch --------------------------------------------------------------------------------------------

    def _apply_batch(
        self, events: list[ConsumedEvent], failures: list[DecodeFailure], first: dict, last: dict
    ) -> list[ConsumedEvent]:
        name = self.projection.name
        conn = self._connect()
        refused: list[tuple[ConsumedEvent, Exception]] = []
        self._pending_seen = []
        dedupe = bool(events) and getattr(self.projection, "dedupe_by_id", True)
        with conn.transaction():
            with conn.cursor() as cur, conn.cursor() as look:
                positions = self._open_batch(
                    cur, look, [e.attributes.id for e in events] if dedupe else [], first
                )
                keep_failures = getattr(self.projection, "apply_failures", None)
                if keep_failures is not None and failures:
                    keep_failures(cur, failures)
                    failures = []
                else:
                    for f in failures:
                        self.dlq.publish_failure(f)
                fresh = (
                    events if not dedupe or len(positions) == len(events) else [events[i] for i in positions]
                )
                if fresh:
                    try:
                        with conn.transaction():
                            self.projection.apply(cur, fresh)
                    except ProjectionApplyError:
                        refused = self._apply_one_by_one(conn, cur, fresh)
                self._checkpoint(cur, last)
            for e, exc in refused:
                self.dlq.publish(
                    source_topic=e.topic,
                    partition=e.partition,
                    offset=e.offset,
                    key=e.key.encode() if e.key is not None else None,
                    value=e.value,
                    headers=e.headers,
                    reason=str(exc),
                    error_type=type(exc).__name__,
                )
            if failures or refused:
                self.dlq.producer.flush()  # dead letters durable before the checkpoint moves past them
        self._seen_committed()
        n_fresh = len(fresh) - len(refused)
        self.stats.applied += n_fresh
        self.stats.duplicates += len(events) - len(fresh)
        self.stats.dead_lettered += len(failures) + len(refused)
        _applied.labels(name).inc(n_fresh)
        _duplicates.labels(name).inc(len(events) - len(fresh))
        _dead.labels(name).inc(len(failures) + len(refused))
        if refused:
            ids = {id(e) for e, _ in refused}
            return [e for e in fresh if id(e) not in ids]
        return fresh

    def _open_batch(
        self, cur: psycopg.Cursor, look: psycopg.Cursor, ids: list[str], first: dict
    ) -> list[int]:
        """The start of every batch's transaction, in one round trip: take the projection's advisory
        lock, lock its checkpoints (:class:`_Fenced` if one is not where the batch starts), and look
        up which of ``ids`` ``projection_seen`` already holds; then record the new ones.

        Returns the indexes of the first occurrence of each id not seen before, in order (empty when
        ``ids`` is: no de-duplication).

        A lookup through a hash index, then a plain insert of the new ids: about half the cost of a
        unique b-tree with ``ON CONFLICT`` (random ids touch a random leaf page each, and the b-tree
        grows deeper). There is no unique constraint: the advisory lock makes the batches of one
        projection de-duplicate one at a time, so no two find an id new. With ``seen_in_memory`` the
        lookup is in the in-memory set, and the new ids join it once the transaction has committed
        (:meth:`_seen_committed`). Inside an outer pipeline (the columnar path) the insert is queued
        with the rest of the transaction.
        """
        name = self.projection.name
        first_of = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1), strict=True))  # first occurrence wins
        with cur.connection.pipeline():
            cur.execute(_LOCK_SQL, (name,))
            cur.execute(_CHECKPOINTS_FOR_UPDATE_SQL, (name,))
            if ids and not self.seen_in_memory:
                ids_sql, ids_param = _ids_param(list(first_of))
                look.execute(
                    f"SELECT event_id FROM projection_seen WHERE projection = %s AND event_id = ANY({ids_sql})",
                    (name, ids_param),
                )
        self._check_fence(cur.fetchall(), first)
        if not ids:
            return []
        old = self._seen if self.seen_in_memory else {r[0] for r in look.fetchall()}
        new = [eid for eid in first_of if eid not in old] if old else list(first_of)
        if new:
            ids_sql, ids_param = _ids_param(new)
            cur.execute(
                f"INSERT INTO projection_seen (projection, event_id) SELECT %s, unnest({ids_sql})",
                (name, ids_param),
            )
        if self.seen_in_memory:
            self._pending_seen = new
        return list(range(len(ids))) if len(new) == len(ids) else sorted(map(first_of.__getitem__, new))

    def _seen_committed(self) -> None:
        if self._pending_seen:
            self._seen.update(self._pending_seen)
        self._pending_seen = []

    @staticmethod
    def _check_fence(rows: list[tuple[str, int, int]], first: dict) -> None:
        """Raise :class:`_Fenced` when a stored checkpoint is not where the batch starts."""
        stored = {(t, p): o for t, p, o in rows}
        moved = [tp for tp, o in first.items() if tp in stored and stored[tp] != o]
        if moved:
            raise _Fenced(f"checkpoint of {moved} moved under this runner")

    def _checkpoint(self, cur: psycopg.Cursor, last: dict) -> None:
        cur.execute(
            "INSERT INTO projection_checkpoints (projection, topic, partition, next_offset) "
            "SELECT %s, * FROM unnest(%s::text[], %s::int[], %s::bigint[]) "
            "ON CONFLICT (projection, topic, partition) DO UPDATE "
            "SET next_offset = excluded.next_offset, updated_at = now()",
            (
                self.projection.name,
                [t for t, _ in last],
                [p for _, p in last],
                [o + 1 for o in last.values()],
            ),
        )

    def _apply_columnar(self, batch: ColumnarBatch, first: dict, last: dict) -> ColumnarBatch | None:
        """Apply a column-wise decoded batch in one transaction of two round trips; ``None`` when the
        projection refused it (the transaction is rolled back and the caller redoes the batch record
        by record).

        Round trip 1 (one pipeline): ``BEGIN`` and :meth:`_open_batch` (the advisory lock, the
        checkpoints ``FOR UPDATE``, the seen-id lookup). Round trip 2: the new ids, the view's
        statements (:meth:`apply_columns` only queues them), the checkpoint and ``COMMIT``. Each round
        trip on the database thread also waits for the GIL when it comes back, which the consuming
        thread holds most of the time, so fewer round trips mean fewer such waits (it made eight a
        batch before; the gain was not measured apart from the other changes of that commit).
        """
        name = self.projection.name
        conn = self._connect()
        self._pending_seen = []
        dedupe = bool(len(batch)) and getattr(self.projection, "dedupe_by_id", True)
        try:
            with conn.pipeline(), conn.transaction(), conn.cursor() as cur, conn.cursor() as look:
                positions = self._open_batch(cur, look, batch.event_ids if dedupe else [], first)
                fresh = batch.select(positions) if dedupe else batch
                if len(fresh):
                    self.projection.apply_columns(cur, fresh)  # type: ignore[attr-defined]
                self._checkpoint(cur, last)
        except ProjectionApplyError as exc:
            log.info(
                "batch refused column-wise, redoing it record by record", projection=name, reason=str(exc)
            )
            return None
        self._seen_committed()
        self.stats.applied += len(fresh)
        self.stats.duplicates += len(batch) - len(fresh)
        self.stats.columnar_batches += 1
        _applied.labels(name).inc(len(fresh))
        _duplicates.labels(name).inc(len(batch) - len(fresh))
        return fresh

    def apply_records(
        self,
        records: Sequence[ConsumedEvent | DecodeFailure],
        *,
        first: dict[tuple[str, int], int] | None = None,
    ) -> int:
        """Apply records that did not come from this runner's consumer (a rebuild's archive backfill).

        Same transaction, fencing, de-duplication and checkpoint as a consumed batch.

        Args:
            records: records in offset order per partition.
            first: ``(topic, partition) -> the checkpoint the batch must start from``; default: each
                partition's first record offset (a fresh schema has no checkpoint, so any start passes).

        Returns:
            the number of events applied.

        Raises:
            psycopg.OperationalError: PostgreSQL is unreachable (no retry here).
            RuntimeError: the checkpoint moved under the caller (fenced).
        """
        events = [r for r in records if isinstance(r, ConsumedEvent)]
        failures = [r for r in records if isinstance(r, DecodeFailure)]
        starts: dict[tuple[str, int], int] = dict(first or {})
        last: dict[tuple[str, int], int] = {}
        for r in records:
            starts.setdefault((r.topic, r.partition), r.offset)
            last[(r.topic, r.partition)] = r.offset
        if not last:
            return 0
        try:
            fresh = self._apply_batch(events, failures, starts, last)
        except _Fenced as exc:
            raise RuntimeError(str(exc)) from exc
        self.stats.batches += 1
        self.stats.positions.update({k: v + 1 for k, v in last.items()})
        self._next.update({k: v + 1 for k, v in last.items()})
        self._notify(fresh)
        return len(fresh)

    def _notify(self, fresh: Sequence[ConsumedEvent] | ColumnarBatch) -> None:
        if self.after_commit is None or not len(fresh):
            return
        try:
            if isinstance(fresh, ColumnarBatch):
                self.after_commit.after_commit_keys(fresh.keys)  # type: ignore[attr-defined]
            else:
                self.after_commit(fresh)
        except Exception as exc:  # noqa: BLE001 - a read model must never stop the projection
            log.warning("after-commit hook failed", projection=self.projection.name, error=repr(exc))

    def _apply_one_by_one(
        self, conn: psycopg.Connection, cur: psycopg.Cursor, events: list[ConsumedEvent]
    ) -> list[tuple[ConsumedEvent, Exception]]:
        refused = []
        for e in events:
            try:
                with conn.transaction():
                    self.projection.apply(cur, [e])
            except ProjectionApplyError as exc:
                refused.append((e, exc))
        return refused

    def _sort_out(self, msgs: list) -> tuple[list, dict[tuple[str, int], int], dict[tuple[str, int], int]]:
        """Split a consumed batch that holds error messages: an end-of-partition event marks its
        partition caught up, a topic missing on the broker is logged, any other error raises
        ``KafkaException``. Returns the records and each partition's first and last offset."""
        good = []
        first: dict[tuple[str, int], int] = {}
        last: dict[tuple[str, int], int] = {}
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._at_end.add((m.topic(), m.partition()))
                    continue
                if err.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
                    log.warning(
                        "topic not on the broker (yet)", projection=self.projection.name, error=err.str()
                    )
                    continue
                raise KafkaException(err)
            tp = (m.topic(), m.partition())
            self._at_end.discard(tp)
            first.setdefault(tp, m.offset())
            last[tp] = m.offset()
            good.append(m)
        return good, first, last

    def step(self, consumer: Consumer) -> int:
        """Consume one batch and apply it; return the number of records read (0 when idle).

        With ``pipeline`` the batch is decoded here and its transaction runs on the runner's database
        thread while the next call consumes and decodes the next batch; batches still commit one at
        a time, in order, each fenced on its checkpoint. A batch that fails (database down, fenced)
        drops the batch decoded behind it, and the runner rewinds to the stored checkpoints.
        """
        if self._need_rewind:
            self._drain()
            self._rewind()
        if self._last_batch_full:  # a backlog: fill the batch (up to batch_timeout_seconds)
            msgs = consumer.consume(self.batch_size, self.batch_timeout_seconds)
        else:  # caught up: apply what arrived as soon as it is fetched, not after the batch timeout
            msgs = consume_ready(consumer, self.batch_size, self.batch_timeout_seconds)
        self._last_batch_full = len(msgs) >= self.batch_size
        if not msgs:
            return 0
        if not any(map(is_not, map(_msg_error, msgs), repeat(None))):
            # the common case, no error event in the batch: positions by C-level passes, without a
            # Python loop per record. (Not ``errors.count(None)``: comparing a KafkaError with None
            # leaves a TypeError set in confluent-kafka 2.16, which a later call raises as SystemError.)
            good = msgs
            topics = list(map(_msg_topic, msgs))
            partitions = list(map(_msg_partition, msgs))
            offsets = list(map(_msg_offset, msgs))
            tps = list(zip(topics, partitions, strict=True))
            last = dict(zip(tps, offsets, strict=True))  # the last offset of each partition wins
            first = dict(zip(reversed(tps), reversed(offsets), strict=True))
            self._at_end.difference_update(last)
            columns = {"topics": topics, "partitions": partitions, "offsets": offsets}
        else:
            good, first, last = self._sort_out(msgs)
            columns = {}
        if not last:
            return 0
        batch = decode_columnar(self.serde, good, **columns) if self.columnar else None
        prepared = _Prepared(good, batch, first, last, time.perf_counter())
        if self._pool is None:
            try:
                applied = self._commit_prepared(prepared)
            except Exception as exc:  # noqa: BLE001 - sorted out by _finish
                self._finish(consumer, prepared, None, exc)
            else:
                self._finish(consumer, prepared, applied, None)
            return len(msgs)
        self._drain()  # the previous batch commits before this one starts
        if self._need_rewind:
            return len(msgs)  # dropped: the rewind re-reads it
        self._inflight = (prepared, self._pool.submit(self._commit_prepared, prepared))
        return len(msgs)

    def _commit_prepared(self, p: _Prepared) -> Sequence[ConsumedEvent] | ColumnarBatch:
        """The batch's transaction (on the database thread when pipelined).

        With tracing on it is a ``process <topic>`` span linked to the records' ``ce_traceparent``
        contexts (:func:`core.tracing.batch_process_span`).
        """
        if not tracing.is_enabled():
            return self._commit_prepared_untraced(p)
        topics = sorted({t for t, _ in p.last})
        with tracing.batch_process_span(
            topics, (tracing.traceparent_of(m.headers()) for m in p.msgs), count=len(p.msgs),
            group=self.group_id, attributes={"backbone.projection": self.projection.name},
        ):  # fmt: skip
            return self._commit_prepared_untraced(p)

    def _commit_prepared_untraced(self, p: _Prepared) -> Sequence[ConsumedEvent] | ColumnarBatch:
        applied = self._apply_columnar(p.batch, p.first, p.last) if p.batch is not None else None
        if applied is None:
            events: list[ConsumedEvent] = []
            failures: list[DecodeFailure] = []
            decode = self._decode
            for m in p.msgs:
                r = decode_message(self.serde, m) if decode is None else decode(RawRecord.from_message(m))
                (events if isinstance(r, ConsumedEvent) else failures).append(r)
            applied = self._apply_batch(events, failures, p.first, p.last)
        return applied

    def _drain(self) -> None:
        """Wait for the batch in flight, if any, and account for it."""
        if self._inflight is None:
            return
        prepared, future = self._inflight
        self._inflight = None
        try:
            applied = future.result()
        except Exception as exc:  # noqa: BLE001 - sorted out by _finish
            self._finish(self._consumer, prepared, None, exc)
        else:
            self._finish(self._consumer, prepared, applied, None)

    def _finish(
        self,
        consumer: Consumer | None,
        p: _Prepared,
        applied: Sequence[ConsumedEvent] | ColumnarBatch | None,
        exc: BaseException | None,
    ) -> None:
        if isinstance(exc, psycopg.OperationalError):
            self._need_rewind = True
            self._db_backoff(exc)
            return
        if isinstance(exc, _Fenced):
            log.warning("batch fenced off, rewinding to the stored checkpoint", projection=self.projection.name,
                        reason=str(exc))  # fmt: skip
            self._need_rewind = True
            return
        if exc is not None:
            raise exc
        assert applied is not None
        _batch_seconds.labels(self.projection.name).observe(time.perf_counter() - p.started)
        self.stats.batches += 1
        self.stats.positions.update({k: v + 1 for k, v in p.last.items()})
        self._next.update({k: v + 1 for k, v in p.last.items()})
        if consumer is not None:
            consumer.commit(
                offsets=[TopicPartition(t, q, o + 1) for (t, q), o in p.last.items()], asynchronous=True
            )
        self._notify(applied)
        if self.on_batch is not None:
            self.on_batch(self.stats)

    def lag(self, consumer: Consumer) -> int:
        """Events behind the end of the log: over the assigned partitions, the high watermark minus the
        next offset to apply (the stored checkpoint or the end of the last committed batch; the log's
        start when there is neither; for a partition read to its end with nothing in flight, the
        consumer's position, which steps over control records). 0 when nothing is assigned.

        The high watermark is the consumer's cached one (updated by every fetch response, no request);
        a partition whose watermark is not cached yet, or whose next offset is the log's start, costs
        one request to the broker.
        """
        total = 0
        settled = self._inflight is None and not self._need_rewind
        for key in sorted(self._assigned):
            tp = TopicPartition(*key)
            nxt = self._next.get(key)
            if settled and nxt is not None and key in self._at_end:
                # read to its end with every record applied: the position, past any control records
                # (a transactional producer's commit marker, counted by the high watermark, never read)
                position = consumer.position([tp])[0].offset
                nxt = max(nxt, position)
            _, high = consumer.get_watermark_offsets(tp, cached=True) or (-1, -1)
            if high < 0 or nxt is None:
                watermarks = consumer.get_watermark_offsets(tp, timeout=2, cached=False)
                if watermarks is None:  # no answer in time: this partition counts next time
                    continue
                low, high = watermarks
                if nxt is None:
                    nxt = self._next[key] = max(low, 0)  # asked once, until a batch commits here
            total += max(0, high - nxt)
        return total

    def _set_lag(self, consumer: Consumer, *, force: bool = False) -> None:
        """Set ``backbone_projection_lag_events`` at most once per ``lag_interval_seconds`` (or now)."""
        now = time.monotonic()
        if not force and now - self._lag_at < self.lag_interval_seconds:
            return
        self._lag_at = now
        try:
            _lag.labels(self.projection.name).set(self.lag(consumer))
        except KafkaException as exc:  # the broker did not answer: keep the last value
            log.warning("projection lag not read", projection=self.projection.name, error=str(exc))

    def caught_up(self) -> bool:
        """True when partitions are assigned, every one has reached the end of the log, and no batch is
        in flight or waiting to be re-read."""
        return (
            bool(self._assigned)
            and self._assigned <= self._at_end
            and self._inflight is None
            and not self._need_rewind
        )

    def run(
        self,
        *,
        until_caught_up: bool = False,
        max_wait_seconds: float | None = None,
        assign_all: bool = False,
    ) -> RunnerStats:
        """Run until stopped (``stop_event``), or until caught up when ``until_caught_up``.

        Args:
            until_caught_up: return once every assigned partition reached its end.
            max_wait_seconds: give up (TimeoutError) if not caught up by then.
            assign_all: read every partition of the projection's topics by manual assignment instead of
                joining the consumer group (a rebuild is the only reader of its fresh schema, so it
                needs no group and does not wait for a group join; positions still come from the
                stored checkpoints).

        Raises:
            TimeoutError: not caught up within ``max_wait_seconds``.
            psycopg.OperationalError: PostgreSQL still unreachable ``startup_retry_seconds`` after the start.
        """
        try:
            self._setup_with_retry()
        except KeyboardInterrupt:
            if self.stop_event.is_set():  # stopped while waiting for PostgreSQL
                return self.stats
            raise
        with _collector_threshold(self.gc_threshold):
            return self._run(until_caught_up, max_wait_seconds, assign_all)

    def _setup_with_retry(self) -> None:
        """:meth:`setup`, retried with backoff while PostgreSQL is unreachable (a restart during the
        runner's start), for at most ``startup_retry_seconds``; then the connection error is raised, so a
        wrong URL is still a clear error. Found by the chaos harness: a runner started during a PostgreSQL
        restart exited instead of waiting for it."""
        deadline = time.monotonic() + self.startup_retry_seconds
        while True:
            try:
                self.setup()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise
                self._db_backoff(exc)  # KeyboardInterrupt when stopped meanwhile

    def _run(self, until_caught_up: bool, max_wait_seconds: float | None, assign_all: bool) -> RunnerStats:
        consumer = make_consumer(
            self.settings.kafka, self.group_id, **{"enable.partition.eof": True, "fetch.wait.max.ms": 100}
        )
        self._consumer = consumer
        if self.pipeline:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"projection-{self.projection.name}")
        topics = list(self.projection.topics)
        if until_caught_up or assign_all:
            # an absent topic has nothing to catch up on and no partition will ever be assigned for it:
            # say so instead of waiting forever (a topic is created by its first producer)
            meta = consumer.list_topics(timeout=10)
            present = {t for t, m in meta.topics.items() if m.error is None and m.partitions}
            self.stats.absent_topics = [t for t in topics if t not in present]
            if self.stats.absent_topics:
                log.warning(
                    "topics not on the broker, nothing to catch up on them",
                    projection=self.projection.name,
                    topics=self.stats.absent_topics,
                )
            topics = [t for t in topics if t in present]
        if until_caught_up and not topics:
            consumer.close()
            self._consumer = None
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            return self.stats
        if assign_all:
            tps = [TopicPartition(t, p) for t in topics for p in sorted(meta.topics[t].partitions)]
            self._on_assign(consumer, tps)
        else:
            consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        deadline = time.monotonic() + max_wait_seconds if max_wait_seconds else None
        try:
            while not self.stop_event.is_set():
                try:
                    self.step(consumer)
                    if until_caught_up and self._assigned and self._assigned <= self._at_end:
                        self._drain()
                except KeyboardInterrupt:
                    break
                if until_caught_up and self.caught_up():
                    self._set_lag(consumer, force=True)  # 0 unless records arrived meanwhile
                    break
                self._set_lag(consumer)
                if deadline and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"projection {self.projection.name} not caught up in {max_wait_seconds}s"
                    )
        finally:
            try:
                self._drain()
            except KeyboardInterrupt:
                pass
            finally:
                consumer.close()
                self._consumer = None
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                    self._pool = None
            self.dlq.producer.flush()
            if self._conn is not None:
                self._conn.close()
        return self.stats

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch."""
        self.stop_event.set()

    def close(self) -> None:
        """Release the runner's own dead-letter producer (one passed in stays the caller's) once
        :meth:`run` has returned for good.

        Raises:
            DeliveryError: dead letters were not delivered.
        """
        if self._owns_dlq_producer:
            self.dlq.producer.close()

    def __enter__(self) -> ProjectionRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_projections(
    runners: Sequence[ProjectionRunner], *, until_caught_up: bool = False
) -> list[RunnerStats]:
    """Run several runners in threads of one process; return their stats when all have returned."""
    results: list[RunnerStats | None] = [None] * len(runners)

    def target(i: int) -> None:
        results[i] = runners[i].run(until_caught_up=until_caught_up)

    threads = [
        threading.Thread(target=target, args=(i,), name=r.projection.name) for i, r in enumerate(runners)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]
