"""Faust tables whose changelog recovery reads to the real end of each partition (for Tansu).

Why: Faust recovers an in-memory table (``store="memory://"``) by reading its changelog topic
``<app id>-<table>-changelog`` and stops each partition at the highwater that ``ListOffsets(latest)``
reports, minus one. Tansu (the broker of dev and tests) answers ``ListOffsets(latest)`` with the base
offset of the partition's *last record batch* plus one, not the offset after its last record. So when
the last batch written to a changelog partition holds several records (Faust's producer batches table
updates), Faust leaves all but the first of them out, and a restarted (or rebalanced) worker runs on
old table state: the run-summary processor summarised runs with events missing, the routing processor
forgot requests waiting for their embedding (both seen in the integration tests). On Apache Kafka the
highwater is exact and the extra read below finds nothing.

What :class:`TailRecoveringTable` does: once Faust's recovery of the table's active partitions has
completed, and before the agents resume, :meth:`~TailRecoveringTable.on_recovery_completed` reads each
active changelog partition from the offset after the last one Faust applied (from the beginning if it
applied none) up to the end that a *fetch* reports (librdkafka's end-of-partition event, which follows
the fetch response's high watermark, not ``ListOffsets``), with a private consumer that joins no group,
decodes keys and values with the changelog topic's own schema (so the same serializers as Faust's
recovery), and applies them in offset order as Faust would have (a ``None`` value is a deletion).

If that read fails (a partition gives neither a record nor its end within
``tail_idle_timeout_seconds``, or a key or value does not decode), the error is logged
(``table_recovery_tail_failed``), the app is crashed (``app.crash``) and the error re-raised: the
worker stops rather than run on stale state. Standby partitions are not topped up (the apps run with
``table_standby_replicas=0``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Set
from typing import Any

import faust
import structlog
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition
from faust.types import TP

from core.settings import KafkaSettings
from streams.consumer import make_consumer

__all__ = ["TailRecoveringTable", "read_changelog_tail"]

log = structlog.get_logger(__name__)


def read_changelog_tail(
    kafka: KafkaSettings, starts: Mapping[TP, int], *, idle_timeout_seconds: float = 30.0
) -> list[Any]:
    """The records of each changelog partition from its start offset to the end a fetch reports.

    Reads with a private consumer that joins no group (``assign``, a fresh random group id that commits
    nothing) and reports the end of each partition (``enable.partition.eof``), not ``ListOffsets``.
    Blocking: call it from a thread inside an event loop.

    Args:
        kafka: broker settings.
        starts: ``{changelog partition: first offset to read}``; a negative offset means the beginning.
        idle_timeout_seconds: how long a partition may give neither a record nor its end.

    Returns:
        confluent-kafka ``Message`` objects (raw key and value bytes, headers), in offset order per
        partition; empty when ``starts`` is empty or every partition is already at its end.

    Raises:
        TimeoutError: some partition neither delivered a record nor reported its end for
            ``idle_timeout_seconds`` (the message names the partitions).
    """
    if not starts:
        return []
    c = make_consumer(
        kafka,
        f"backbone-changelog-tail-{uuid.uuid4()}",
        **{"enable.partition.eof": True, "fetch.wait.max.ms": 50},
    )
    try:
        c.assign(
            [
                TopicPartition(tp.topic, tp.partition, o if o >= 0 else OFFSET_BEGINNING)
                for tp, o in starts.items()
            ]
        )
        open_tps = {(tp.topic, tp.partition) for tp in starts}
        records: list[Any] = []
        idle = 0.0
        while open_tps:
            msgs = c.consume(1000, 0.1)
            if not msgs:
                idle += 0.1
                if idle >= idle_timeout_seconds:
                    raise TimeoutError(
                        f"changelog partitions {sorted(open_tps)}: no record and no end in {idle:.0f}s"
                    )
                continue
            idle = 0.0
            for m in msgs:
                tp = (m.topic(), m.partition())
                if tp not in open_tps:
                    continue
                if m.error() is not None:  # end of partition (or a broker error: the fetch will retry)
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        open_tps.discard(tp)
                        c.incremental_unassign([TopicPartition(*tp)])
                    continue
                records.append(m)
        return records
    finally:
        c.close()


class TailRecoveringTable(faust.Table):
    """A Faust table whose recovery goes on to the changelog's real end (see the module docstring).

    Use it in place of ``app.Table(...)``: ``app.tables.add(TailRecoveringTable(app, kafka=...,
    name=..., beacon=app.tables.beacon, ...))``; every other keyword is :class:`faust.Table`'s. Its
    keys and values are (de)serialized as Faust's would be: the serializer of ``key_type`` /
    ``value_type`` (``raw`` for ``bytes``, JSON when there is none; a ``schema``'s serializers are
    overridden by them), on the changelog and in the tail read alike.

    Args:
        app: the Faust app.
        kafka: broker settings of the tail read (the app's broker).
        tail_idle_timeout_seconds: see :func:`read_changelog_tail`.
        **kwargs: :class:`faust.Table`'s.
    """

    def __init__(
        self, app: faust.App, *, kafka: KafkaSettings, tail_idle_timeout_seconds: float = 30.0, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._kafka = kafka
        self._tail_idle_timeout_seconds = tail_idle_timeout_seconds

    async def on_recovery_completed(self, active_tps: Set[TP], standby_tps: Set[TP]) -> None:
        """Apply the changelog tail Faust left out, then Faust's own completion (and recover callbacks).

        Raises:
            Exception: whatever the tail read or its decoding raised, after crashing the app.
        """
        try:
            await self._apply_changelog_tail(active_tps)
        except Exception as exc:  # stale state would give wrong output: stop the worker
            log.error("table_recovery_tail_failed", table=self.name, error=repr(exc))
            await self.app.crash(exc)
            raise
        await super().on_recovery_completed(active_tps, standby_tps)

    async def _apply_changelog_tail(self, active_tps: Set[TP]) -> None:
        # Faust has applied every record at or below its highwater (None: it read nothing).
        highwaters = self.app.tables.recovery.active_highwaters
        starts = {tp: (-1 if highwaters.get(tp) is None else highwaters[tp]) + 1 for tp in active_tps}
        records = await asyncio.to_thread(
            read_changelog_tail, self._kafka, starts, idle_timeout_seconds=self._tail_idle_timeout_seconds
        )
        if not records:
            return
        schema = self.changelog_topic.schema
        events = []
        for m in records:
            message = faust.types.Message(
                m.topic(),
                m.partition(),
                m.offset(),
                m.timestamp()[1] / 1000,
                m.timestamp()[0],
                m.headers(),
                m.key(),
                m.value(),
                None,
                tp=TP(m.topic(), m.partition()),
            )
            key = schema.loads_key(self.app, message)
            value = None if m.value() is None else schema.loads_value(self.app, message)
            events.append(faust.Event(self.app, key, value, m.headers(), message))
        self.apply_changelog_batch(events)
        log.info(
            "table_recovery_tail_applied",
            table=self.name,
            records=len(events),
            partitions=sorted({(tp.partition, start) for tp, start in starts.items()}),
        )
