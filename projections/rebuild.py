"""Rebuild a projection from history into fresh tables while the live one keeps serving, then swap.

Steps of :func:`rebuild`:

1. Drop what an interrupted earlier rebuild left (schema ``proj_<name>_rebuild``) and create it again.
2. **Archive backfill**: for each partition, the records below the log's start (the low watermark,
   i.e. what retention already deleted) are read from the event archive (``proj_archive``) and applied
   through the same runner path (same transaction, de-duplication, checkpoint).
3. **Replay**: a runner on the rebuild schema with a fresh consumer group reads the log from those
   checkpoints until it has caught up.
4. **Swap**, in ONE transaction that first takes an ``EXCLUSIVE`` lock on the live checkpoint table
   (so no live batch is half-way): ``ALTER SCHEMA proj_<name> RENAME TO proj_<name>_old_<ts>``,
   ``ALTER SCHEMA proj_<name>_rebuild RENAME TO proj_<name>``, ``DROP SCHEMA proj_<name>_old_<ts>``.
   The live runner's next batch is fenced (its first offsets no longer match the stored checkpoint)
   and it rewinds to the rebuilt checkpoint, so nothing is lost or applied twice. Readers may see the
   view step back by the few events the live runner had applied after the rebuild caught up.

With ``verify``, the swap happens only if, under that lock and at equal checkpoints, every table of
the rebuilt schema has the same row count and md5 (over its rows as text, sorted; bookkeeping
timestamps left out) as the live one; otherwise :class:`RebuildVerifyError` names the tables. If the
live projection is ahead, the rebuild catches up again first; if it is behind, the rebuild waits for it.

Interrupted at any point before the swap commits, a rebuild leaves the live schema untouched.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from confluent_kafka import TopicPartition

from core.settings import Settings
from projections.archive import ARCHIVE_TABLE, read_archive
from projections.base import Projection
from projections.errors import ProjectionError
from projections.registry import _partitions, get_projection, log_end_offsets
from projections.runner import DEFAULT_BATCH_SIZE, ProjectionRunner, RunnerStats, schema_name
from streams.serde import AvroSerde

__all__ = ["RebuildReport", "RebuildVerifyError", "rebuild", "schema_exists", "table_checksums"]

log = structlog.get_logger(__name__)

# bookkeeping columns left out of the checksums: when a row was written, not what it says
_EXCLUDED = {("projection_checkpoints", "updated_at"), ("projection_registry", "created_at")}
_EXCLUDED_TABLES = {"read_model_state"}  # the Redis read model's own health flag, not view data


class RebuildVerifyError(ProjectionError):
    """The rebuilt tables differ from the live ones (``differences``: table -> (live, rebuilt))."""

    def __init__(self, message: str, differences: dict[str, tuple[Any, Any]]) -> None:
        super().__init__(message)
        self.differences = differences


@dataclass(frozen=True, slots=True, kw_only=True)
class RebuildReport:
    """What a rebuild did.

    Attributes:
        name: the projection.
        events: records covered, from the archive and the log (the sum of the rebuilt checkpoints).
        from_archive: records read from the archive (below the log's start).
        applied: events applied to the rebuilt views.
        seconds: wall time from start to swap, in seconds.
        events_per_second: ``events / seconds``.
        verified: the tables were compared with the live ones and matched.
        checksums: table -> ``(rows, md5)`` of the swapped-in tables (with ``verify``).
    """

    name: str
    events: int
    from_archive: int
    applied: int
    seconds: float
    events_per_second: float
    verified: bool
    checksums: dict[str, tuple[int, str]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "name": self.name, "events": self.events, "from_archive": self.from_archive, "applied": self.applied,
            "seconds": round(self.seconds, 3), "events_per_second": round(self.events_per_second, 1),
            "verified": self.verified, "checksums": {k: list(v) for k, v in self.checksums.items()},
        }  # fmt: skip


def schema_exists(conn: psycopg.Connection, schema: str) -> bool:
    """True when the PostgreSQL schema exists."""
    return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is not None


def table_checksums(conn: psycopg.Connection, schema: str) -> dict[str, tuple[int, str]]:
    """Per table of ``schema`` (partitioned parents, not their partitions): ``(row count, md5)``.

    The md5 is over the rows as text, sorted, so equal tables give equal sums whatever their physical
    order; ``updated_at`` / ``created_at`` of the bookkeeping tables and the Redis read model's
    ``read_model_state`` are left out.
    """
    tables = [
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY c.relname",
            (schema,),
        ).fetchall()
    ]
    out = {}
    for t in tables:
        if t in _EXCLUDED_TABLES:
            continue
        cols = [
            r[0]
            for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                "AND NOT attisdropped ORDER BY attnum",
                (f'{schema}."{t}"',),
            ).fetchall()
            if (t, r[0]) not in _EXCLUDED
        ]
        row = ", ".join(f'"{c}"' for c in cols)
        n, digest = conn.execute(
            f"SELECT count(*), md5(coalesce(string_agg(r, E'\\n' ORDER BY r), '')) "
            f'FROM (SELECT ROW({row})::text AS r FROM {schema}."{t}") s'
        ).fetchone()
        out[t] = (n, digest)
    return out


def _checkpoints(conn: psycopg.Connection, schema: str, name: str) -> dict[tuple[str, int], int]:
    if not schema_exists(conn, schema):
        return {}
    return {
        (t, p): o
        for t, p, o in conn.execute(
            f"SELECT topic, partition, next_offset FROM {schema}.projection_checkpoints WHERE projection = %s",
            (name,),
        ).fetchall()
    }


def _low_watermarks(settings: Settings, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    from confluent_kafka import Consumer

    c = Consumer(settings.kafka.librdkafka(extra={"group.id": f"backbone-lwm-{uuid.uuid4()}"}))
    try:
        return {tp: c.get_watermark_offsets(TopicPartition(*tp), timeout=10)[0] for tp in tps}
    finally:
        c.close()


class _Progress:
    """A rich progress bar (events, events/s, ETA) on a TTY; silent otherwise."""

    def __init__(self, name: str, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.shown = enabled and console.is_terminal
        self.bar = Progress(
            TextColumn(f"rebuilding {name}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} events/s"), TimeRemainingColumn(),
            console=console, disable=not self.shown,
        )  # fmt: skip
        self.task = self.bar.add_task("rebuild", total=1, rate="0")
        self.start = time.perf_counter()

    def set_total(self, total: int) -> None:
        """The number of records the rebuild will cover (the bar's 100 %)."""
        self.bar.update(self.task, total=max(total, 1))

    def update(self, done: int) -> None:
        rate = done / max(time.perf_counter() - self.start, 1e-6)
        self.bar.update(self.task, completed=done, rate=f"{rate:,.0f}")


def rebuild(
    settings: Settings,
    serde: AvroSerde,
    name: str,
    *,
    verify: bool = False,
    projection: Projection | None = None,
    progress: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_wait_seconds: float = 3600.0,
    log_start: Callable[[str, int], int] | None = None,
    archive_schema: str = "proj_archive",
    on_batch: Callable[[RunnerStats], None] | None = None,
) -> RebuildReport:
    """Rebuild projection ``name`` from the archive and the log into a fresh schema, then swap it in.

    Args:
        settings: Kafka and PostgreSQL settings.
        serde: the Avro serde.
        name: the projection (a name of :data:`projections.registry.PROJECTIONS`, or any name with
            ``projection`` given).
        verify: compare rebuilt and live tables before the swap; refuse the swap on any difference.
        projection: the projection instance (default: the registry's).
        progress: show a progress bar on a TTY.
        batch_size: records per transaction.
        max_wait_seconds: give up (TimeoutError) when not caught up by then.
        log_start: ``(topic, partition) -> first offset the log still holds``; default: the broker's low
            watermark. Offsets below it are read from the archive.
        archive_schema: the archive's PostgreSQL schema.
        on_batch: called after each committed batch of the rebuild (tests use it to interrupt).

    Returns:
        a :class:`RebuildReport`.

    Raises:
        RebuildVerifyError: with ``verify``, the rebuilt tables differ from the live ones (no swap).
        TimeoutError: not caught up (or the live projection did not catch up) within ``max_wait_seconds``.
        KeyError: an unknown projection name.
    """
    started = time.perf_counter()
    projection = projection or get_projection(name)
    live, fresh = schema_name(name), schema_name(name, "rebuild")
    dsn = settings.postgres.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {fresh} CASCADE")  # leftovers of an interrupted rebuild
    tps = _partitions(settings.kafka, projection.topics)
    lows = {tp: log_start(*tp) for tp in tps} if log_start else _low_watermarks(settings, tps)
    bar = _Progress(name, progress)
    if bar.shown:  # the log ends are only the bar's total: no scan of the log without a bar
        ends = log_end_offsets(settings.kafka, {tp: 0 for tp in tps})
        bar.set_total(sum(ends.get(tp, 0) for tp in tps))

    def batch_done(stats: RunnerStats) -> None:
        bar.update(sum(stats.positions.values()))
        if on_batch is not None:
            on_batch(stats)

    runner = ProjectionRunner(
        settings, serde, projection, group_id=f"projection-{name}-rebuild-{uuid.uuid4().hex[:8]}", schema=fresh,
        batch_size=batch_size, on_batch=batch_done, seen_in_memory=True,
    )  # fmt: skip
    runner.setup()
    decoder = getattr(projection, "decode", None)  # a reader of JSON topics decodes them itself
    from_archive = 0
    with bar.bar, psycopg.connect(dsn) as aconn:
        has_archive = aconn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f"{archive_schema}.{ARCHIVE_TABLE}",)
        ).fetchone()[0]
        for tp in tps:
            if not has_archive or lows.get(tp, 0) <= 0:
                continue
            chunk = []
            for rec in read_archive(aconn, tp[0], tp[1], end_offset=lows[tp], schema=archive_schema):
                chunk.append(rec.decode(serde, decoder))
                if len(chunk) >= batch_size:
                    runner.apply_records(chunk)
                    from_archive += len(chunk)
                    batch_done(runner.stats)
                    chunk = []
            if chunk:
                runner.apply_records(chunk)
                from_archive += len(chunk)
                batch_done(runner.stats)
            aconn.rollback()
        runner.run(until_caught_up=True, max_wait_seconds=max_wait_seconds, assign_all=True)
        runner.create_seen_index()  # built once, after the replay (the replay de-duplicated in memory)
        checksums = _swap(
            settings, runner, name, live, fresh, verify=verify, deadline=started + max_wait_seconds
        )
    seconds = time.perf_counter() - started
    events = sum(runner.stats.positions.values())  # records covered, archive and log
    report = RebuildReport(
        name=name, events=events, from_archive=from_archive, applied=runner.stats.applied, seconds=seconds,
        events_per_second=events / seconds if seconds else 0.0, verified=verify, checksums=checksums,
    )  # fmt: skip
    log.info("projection rebuilt", **report.as_json())
    return report


def _swap(
    settings: Settings,
    runner: ProjectionRunner,
    name: str,
    live: str,
    fresh: str,
    *,
    verify: bool,
    deadline: float,
) -> dict[str, tuple[int, str]]:
    """Swap the rebuilt schema in (after verifying it, if asked); return the checksums compared."""
    while True:
        with psycopg.connect(settings.postgres.dsn()) as conn:
            with conn.transaction():
                has_live = schema_exists(conn, live)
                if has_live:
                    conn.execute(f"LOCK TABLE {live}.projection_checkpoints IN EXCLUSIVE MODE")
                checksums: dict[str, tuple[int, str]] = {}
                if verify and has_live:
                    live_cp, new_cp = _checkpoints(conn, live, name), _checkpoints(conn, fresh, name)
                    if live_cp != new_cp:
                        behind = any(new_cp.get(tp, 0) < o for tp, o in live_cp.items())
                        state = "behind" if behind else "ahead"
                        if time.perf_counter() > deadline:
                            raise TimeoutError(
                                f"rebuild of {name} and the live projection never met ({state})"
                            )
                        log.info(
                            "rebuild and live projection at different offsets", projection=name, rebuild=state
                        )
                        pending = "catch_up" if behind else "wait_live"
                    else:
                        pending = None
                        live_sums, new_sums = table_checksums(conn, live), table_checksums(conn, fresh)
                        diff = {
                            t: (live_sums.get(t), new_sums.get(t))
                            for t in sorted(set(live_sums) | set(new_sums))
                            if live_sums.get(t) != new_sums.get(t)
                        }
                        if diff:
                            raise RebuildVerifyError(
                                f"rebuild of {name} differs from the live projection in "
                                + ", ".join(f"{t} (live {a}, rebuilt {b})" for t, (a, b) in diff.items()),
                                diff,
                            )
                        checksums = new_sums
                else:
                    pending = None
                if pending is None:
                    if has_live:
                        old = f"{live}_old_{datetime.now(UTC):%Y%m%d%H%M%S}"
                        conn.execute(f"ALTER SCHEMA {live} RENAME TO {old}")
                        conn.execute(f"ALTER SCHEMA {fresh} RENAME TO {live}")
                        conn.execute(f"DROP SCHEMA {old} CASCADE")
                    else:
                        conn.execute(f"ALTER SCHEMA {fresh} RENAME TO {live}")
                    log.info("rebuilt projection swapped in", projection=name)
                    return checksums
        if pending == "catch_up":
            runner.run(
                until_caught_up=True,
                max_wait_seconds=max(1.0, deadline - time.perf_counter()),
                assign_all=True,
            )
            runner.create_seen_index()
        else:
            time.sleep(0.5)
