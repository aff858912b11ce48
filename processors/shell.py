"""The one Faust worker shell that every processor configures instead of copying.

It holds the app's broker and store settings (:func:`make_faust_app`), its consumer (with three repairs of
Faust's seek around a rebalance, :class:`SeekingConsumer`, and by default each fetched record handed to the
streams without a task, :class:`EagerSeekingConsumer`), its monitor (by default without per-record
statistics when Faust's web server is off, :class:`QuietMonitor`), a topic's records handed to the processor
in lists straight from each fetch, with offsets committed from its own bookkeeping (:class:`BatchDelivery`,
which bypasses Faust's per-record conductor, queue, stream and ack), decoding a Faust message into an
:class:`~streams.envelope.Event` (:func:`decode_event`), sending an event and awaiting its delivery
(:func:`send_event`), dead letters of a Faust message (:class:`FaustDeadLetters`), creating the topics a
processor needs (:func:`ensure_processor_topics`), its counters as Prometheus metrics
(:class:`StatsCollector`), and the worker's lifecycle (:func:`run_processor_worker`: logging, ``/metrics``,
``/healthz`` and ``/readyz`` on ``Settings.metrics_host``, the Faust worker, stop-when-idle, clean shutdown,
``gc.freeze()`` of what exists once it is up).

Each processor (:mod:`processors.run_summary.app`, :mod:`processors.correlation.app`,
:mod:`processors.routing.app`, :mod:`processors.routing.policy_app`, :mod:`processors.healing.app`,
:mod:`processors.incidents.app`, :mod:`processors.incidents.anomaly_app`) declares its topics, tables and agents and keeps its decisions in plain
Python; its tables live in memory, recovered from their changelogs (:mod:`processors.tables`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import faust
import structlog
from confluent_kafka.admin import AdminClient, NewTopic
from faust.exceptions import ConsumerNotStarted
from faust.sensors import Monitor
from faust.tables import TableManager
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode.services import WaitResults

from core import tracing
from core.eventloop import event_loop_policy
from core.observability import REGISTRY, configure_logging, serve_metrics
from core.settings import KafkaSettings, Settings
from streams.catalogue import CATALOGUE, create_missing_topics
from streams.consumer import DeadLetterPublisher
from streams.envelope import CloudEvent, Event
from streams.producer import EventProducer
from streams.serde import AvroSerde

__all__ = [
    "FETCH_MAX_WAIT_MS",
    "ISOLATION_LEVEL",
    "SENTINEL_SECONDS",
    "BatchDelivery",
    "Checkpoints",
    "DrainTracker",
    "EagerSeekingConsumer",
    "FaustDeadLetters",
    "FetchEnds",
    "InOrderAcks",
    "PromptTableManager",
    "QuietMonitor",
    "SeekingConsumer",
    "StatsCollector",
    "TableCheckpoints",
    "broker_urls",
    "catalogue_partitions",
    "consumer_fetch_ends",
    "consumer_highwater",
    "credentials",
    "decode_event",
    "ensure_processor_topics",
    "make_faust_app",
    "message_headers",
    "pack_bodies",
    "partitions_with_records",
    "quiet_faust_monitor",
    "run_processor_worker",
    "send_event",
    "stop_when_idle",
    "traced_headers",
    "tracing_process",
]

log = structlog.get_logger(__name__)

ISOLATION_LEVEL = "read_committed"
"""aiokafka ``isolation_level`` of every processor's stream consumer (Faust's is ``read_uncommitted``
unless its processing guarantee is exactly-once), as of the projections' and replays' consumers
(``streams.offsets.make_consumer``): a worker reads the records of a transactional producer (Kafka
Streams or Kafka Connect with exactly-once, Debezium's exactly-once source) only once their transaction
committed, up to the partition's last stable offset, which is then the end a worker drains to
(:func:`consumer_highwater`). On Apache Kafka the records of aborted transactions are skipped too; Tansu
returns them to a ``read_committed`` consumer as well (docs/ARCHITECTURE.md), but keeps the records of an
open transaction from it, as Kafka does."""
FETCH_MAX_WAIT_MS = 20
"""aiokafka ``fetch_max_wait_ms`` of every processor's stream consumer (faust-streaming 0.15 hard-codes
1,500 ms). The Tansu broker of dev and tests does not answer a fetch early when records arrive, so a
record waits for the fetch in flight to time out: with 1,500 ms an event reached the run-summary agent
about 0.4 s (p50) to 0.75 s (p95) after its acknowledgement (``bench/bench_latency.py``, issue 16). On
Apache Kafka the wait only bounds an idle fetch. 20 ms: with 100 ms a run's FINISHED event reached the
SSE subscriber 54 / 100 ms (p50 / p95) after its acknowledgement at 100 events/s, with 20 ms 31 / 47 ms
(same ``--quick`` bench, one run each); an idle worker then sends about 50 fetch requests a second.
"""
PRODUCER_LINGER_SECONDS = 0.005
"""aiokafka ``linger_ms`` of every processor's producer (Faust's default is 0). With no linger, each
table update became a produce request of its own, awaited in turn through Faust's producer buffer, and
the run-summary worker was bound by the broker round trip: about 900 records/s on the 2-core machine
(30,000 real-shaped agent events). 5 ms lets aiokafka batch the changelog writes."""
CONSUMER_STOP_TIMEOUT_SECONDS = 5.0
"""Longest wait for the Kafka consumer to stop (leave its group, close its connections) at shutdown."""
SHUTDOWN_TIMEOUT_SECONDS = 15.0
"""Longest time from SIGTERM/SIGINT to the exit of a worker (:func:`run_processor_worker`); past it the
process exits with code 70 (``EX_SOFTWARE``) without finishing its shutdown."""


def broker_urls(kafka: KafkaSettings) -> list[str]:
    """Faust's ``kafka://host:port`` URLs of the settings' bootstrap servers.

    Raises:
        ValueError: no bootstrap servers are configured.
    """
    if not kafka.bootstrap_servers:
        raise ValueError(
            "no Kafka bootstrap servers: run `backbone dev up` or set BACKBONE_KAFKA__BOOTSTRAP_SERVERS"
        )
    return [f"kafka://{h.strip()}" for h in kafka.bootstrap_servers.split(",") if h.strip()]


def credentials(kafka: KafkaSettings) -> faust.types.auth.CredentialsT | None:
    """Faust's credentials for the settings' ``security.protocol`` (system CA store for TLS)."""
    if kafka.security_protocol == "PLAINTEXT":
        return None
    context = (
        ssl.create_default_context(cafile=kafka.ssl_ca_location)
        if kafka.security_protocol.endswith("SSL")
        else None
    )
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
        ssl_context=context,
        mechanism=kafka.sasl_mechanism or "PLAIN",
    )


def message_headers(raw: Any) -> list[tuple[str, bytes | None]]:
    """A Faust message's headers (a mapping or pairs) as ``[(name, value bytes or None), ...]``."""
    # a list of pairs is what aiokafka gives: checked first (the Mapping check is an ABC isinstance)
    items: Iterable[tuple[Any, Any]] = (
        raw if type(raw) is list else raw.items() if isinstance(raw, Mapping) else (raw or ())
    )
    return [(k if isinstance(k, str) else bytes(k).decode("utf-8", "replace"), v) for k, v in items]


class SeekingConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with three repairs that keep records from being skipped around a rebalance.

    Faust drops the records it fetches for a partition that is not active (paused, e.g. every stream
    partition while the tables recover) and relies on "seek to committed offsets" before the stream
    partitions resume to read them again. Three defects of faust-streaming 0.15 with aiokafka 0.14 break
    that (all seen in ``test_restarted_worker_decides_requests_pending_in_the_table``: a restarted routing
    worker skipped one or both of the embeddings it was waiting for, about 1 run in 6 of a loop here):

    1. **An empty set of active partitions fetched every partition.** Faust hands the consumer thread its
       live set of active partitions; aiokafka's ``fetched_records`` reads an empty set as "all
       partitions". When recovery pauses the changelog partitions (the set empties) while the thread waits
       in ``fetched_records``, it returns the buffered records of the paused stream partitions too, and
       Faust drops them. :meth:`_getmany` passes a view of the live set that is never "empty", so records
       are taken only for the partitions active at the moment they are taken.
    2. **A partition with no committed offset was not sought back.** aiokafka's ``seek_to_committed``
       leaves a partition whose committed offset is missing (or 0) where it is, so records Faust dropped
       there were never processed by this worker. :meth:`seek_to_committed` seeks such partitions to the
       start of the log, as ``auto.offset.reset=earliest`` (the apps' setting) means. Changelog partitions
       are left alone: recovery positions them itself.
    3. **Records fetched during the seek were cleared.** Recovery resumes the stream partitions, awaits the
       seek (up to a fetch's max wait, :data:`FETCH_MAX_WAIT_MS`, while aiokafka finishes the fetch in
       flight), then resumes Faust's flow control, which empties every stream's queue. Records the fetcher
       handed over in between were thrown away with their offsets already passed. From :meth:`perform_seek` until
       :meth:`resume_flow` (which recovery calls right after flow control resumes) :meth:`_getmany` leaves
       stream partitions in aiokafka's buffer.

    Re-reading from the committed position (or the start, when there is none) is Faust's at-least-once
    contract; the processors are deterministic and their outputs carry stable event ids.

    It also carries :class:`BatchDelivery`: :meth:`_getmany` hands the records of a batch-consumed topic to it
    (and keeps them from Faust's fetch loop), :meth:`_new_offset` and :meth:`_filter_tps_with_pending_acks`
    commit such a partition up to its delivered effects, :meth:`wait_empty` drains it before Faust's commit at
    a revocation and at stop, and :meth:`seek` / :meth:`perform_seek` drop what it buffered. These override
    faust-streaming 0.15.3's ``Consumer`` methods of those names (private ones included); re-check them on an
    upgrade.
    """

    #: Set by :meth:`perform_seek`, cleared by :meth:`resume_flow`: the changelog topics (the only ones
    #: whose records may be taken meanwhile), or ``None`` when nothing is held back.
    _held_to_changelogs: frozenset[str] | None = None

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _batch_deliveries(self) -> Mapping[str, BatchDelivery]:
        return getattr(self.app, "batch_deliveries", _NO_DELIVERIES)  # type: ignore[no-any-return]

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Mapping[TP, list[Any]]:
        deliveries = self._batch_deliveries()
        if deliveries:
            for delivery in deliveries.values():
                await delivery.wait_for_space(self)
        generation = self.app.consumer_generation_id
        if active_partitions is None:  # a client-only app: every partition
            records = await super()._getmany(None, timeout)
        else:
            records = await super()._getmany(_FetchablePartitions(self, active_partitions), timeout)  # type: ignore[arg-type]
        if not deliveries or not records:
            return records
        # the records of batch-consumed topics go to their BatchDelivery, in one list per partition, and never
        # reach Faust's per-record path; taken only where Faust would hand them to a stream: the consumer's flow
        # active in the same generation (otherwise its getmany drops them too, and the seek that follows reads
        # them again), the app's flow control resumed (Faust's streams' queues would hold them, and be cleared
        # when it resumes) and the tables' active partitions recovered (``actives_ready``: False from a
        # rebalance's start until recovery has completed, its ``on_recovery_completed`` callbacks run and the
        # streams were sought; without a table needing recovery Faust resumes the flow before those callbacks,
        # and records taken then were handled before a TailRecoveringTable read its tail over them)
        tables = self.app.tables
        take = (self.flow_active and self.app.flow_control.is_active() and not self.should_stop
                and generation == self.app.consumer_generation_id
                and (tables.actives_ready or not tables.data))  # fmt: skip
        rest: dict[TP, list[Any]] = {}
        fetched: dict[BatchDelivery, dict[TP, list[Any]]] = {}
        for tp, batch in records.items():
            delivery = deliveries.get(tp.topic)
            if delivery is None:
                rest[tp] = batch
            elif take and batch:
                if delivery.interleave:  # handed in the order of Faust's scheduler, below
                    fetched.setdefault(delivery, {})[tp] = batch
                else:
                    delivery.put(tp, batch)
        for delivery, batches in fetched.items():
            delivery.put_interleaved(batches, self.scheduler)
        return rest

    def _filter_tps_with_pending_acks(self, topics: Any = None) -> Iterator[TP]:
        yield from super()._filter_tps_with_pending_acks(topics)
        for delivery in self._batch_deliveries().values():
            for tp in list(delivery.done):
                if topics is None or tp in topics or tp.topic in topics:
                    yield tp

    def _new_offset(self, tp: TP) -> int | None:
        """The offset to commit for ``tp``: Faust's (acked messages) or, for a batch-consumed topic, the
        offset after the last record whose effects were delivered (:attr:`BatchDelivery.done`)."""
        delivery = self._batch_deliveries().get(tp.topic)
        if delivery is not None:
            return delivery.done.get(tp)
        return super()._new_offset(tp)  # type: ignore[no-any-return]

    async def wait_empty(self) -> None:
        """Faust's wait for the records in flight (at a revocation and at stop), after each
        :class:`BatchDelivery` is drained (its batch in hand finished, its effects written and delivered,
        the records not yet handed over dropped), so Faust's commit that follows covers what was handled."""
        for delivery in self._batch_deliveries().values():
            await delivery.drain()
        await super().wait_empty()

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        """Faust's revocation, then each :class:`BatchDelivery` forgets the revoked partitions."""
        await super().on_partitions_revoked(revoked)
        for delivery in self._batch_deliveries().values():
            delivery.forget(revoked)

    async def seek(self, partition: TP, offset: int) -> None:
        """Faust's seek; a batch-consumed partition takes the records from ``offset`` again."""
        await super().seek(partition, offset)
        delivery = self._batch_deliveries().get(partition.topic)
        if delivery is not None:
            delivery.reposition([partition])

    async def perform_seek(self) -> None:
        """Faust's seek of every assigned partition to its committed offset, after which stream records are
        held back until :meth:`resume_flow`; batch-consumed partitions take records from there again."""
        self._held_to_changelogs = frozenset(self.app.tables.changelog_topics)
        await super().perform_seek()
        for delivery in self._batch_deliveries().values():
            delivery.reposition(None)

    def resume_flow(self) -> None:
        """Let records through again (Faust calls it once its flow control has resumed)."""
        self._held_to_changelogs = None
        super().resume_flow()

    async def seek_to_committed(self) -> Mapping[TP, int]:
        """Seek every assigned partition to its committed offset, and those without one to the start of the
        log (``auto.offset.reset=earliest``); returns the committed offsets (``None`` where there is none)."""
        committed = await super().seek_to_committed()
        if self.app.conf.consumer_auto_offset_reset == "earliest":
            rewind = [tp for tp, offset in committed.items() if (offset is None or offset <= 0)
                      and not self._is_changelog_tp(tp)]  # fmt: skip
            if rewind:
                await self._thread.seek_to_beginning(*rewind)
                log.debug(
                    "faust_seek_uncommitted_to_start",
                    partitions=sorted((tp.topic, tp.partition) for tp in rewind),
                )
        return committed


class _Resumed:
    """The rest of a coroutine that was stepped once (and yielded ``first``, the future it waits on), as an
    awaitable: ``await _Resumed(coro, first)`` goes on exactly as ``await coro`` would have from there (what
    ``yield from`` does, started one step late), values and exceptions (a Task's cancellation) passed in."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Any:
        coro, pending = self.coro, self.first
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # noqa: BLE001 - thrown in by the Task: the coroutine gets it
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class EagerSeekingConsumer(SeekingConsumer):
    """:class:`SeekingConsumer` that hands each fetched record to Faust's conductor at once instead of
    through a task: for every record, faust-streaming 0.15's fetch loop (``Consumer._drain_messages``)
    awaits ``self.wait_first(callback(message), self.suspend_flow.wait())``, and mode's ``wait_first``
    wraps the conductor's callback, the wait for a suspended flow and the service's stopped and crashed
    events in four tasks and an ``asyncio.wait`` (about 15 % of the healer worker's main-thread samples
    under py-spy on a 30,000-record backlog), although the callback almost always completes without
    waiting (the conductor puts the event in the stream's queue and returns).

    Here :meth:`wait_first` recognises that call (two coroutines, no timeout, the second the flow's wait)
    and steps the callback's coroutine once in place: when it completes, the record is delivered and the
    flow's wait is closed unawaited; only when it waits (a full stream queue, a lock) does it go on, from
    where it stopped, under mode's ``wait_first`` with the flow's wait, so a suspension of the flow or a
    stop still ends the wait. Faust's callback task would also have run to completion in its first step,
    so a record is delivered, dropped or waited on as before; what changes is that the fetch loop yields to
    the event loop every 100 records (Faust's own ``yield_every``) and at each fetch rather than after every
    record, so the agent finds records already queued (longer batches). Every other ``wait_first`` call
    (and this one once the consumer is stopping or has crashed) is mode's. Checked against faust-streaming
    0.15.3 and mode-streaming's ``Service.wait_first``; re-check on an upgrade.
    """

    async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:
        """mode's ``Service.wait_first``, with the fetch loop's per-record call stepped in place (see the
        class); returns mode's ``WaitResults``."""
        if (
            len(coros) == 2
            and timeout is None
            and asyncio.iscoroutine(coros[0])
            and asyncio.iscoroutine(coros[1])
            and not self._stopped.is_set()
            and not self._crashed.is_set()
        ):
            delivery, flow_wait = coros
            try:
                first = delivery.send(None)
            except StopIteration as stop:  # delivered without waiting: the common case
                flow_wait.close()
                return WaitResults([delivery], [stop.value], False)
            return await super().wait_first(_Resumed(delivery, first), flow_wait)
        return await super().wait_first(*coros, timeout=timeout)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread, whose consumer waits at most :data:`FETCH_MAX_WAIT_MS` per fetch
    and whose stop always completes.

    When the broker has gone, aiokafka's ``Fetcher.close`` re-raises the ``CancelledError`` of the fetch
    task it cancels; mode's thread then skips telling the worker it has shut down (it only does so for an
    ``Exception``), and the worker waits for it forever: the process ignored SIGTERM until SIGKILL
    (issue 16). Here the consumer's stop is bounded (:data:`CONSUMER_STOP_TIMEOUT_SECONDS`) and its
    failure logged, so the shutdown goes on.
    """

    async def on_thread_stop(self) -> None:
        try:
            await asyncio.wait_for(super().on_thread_stop(), CONSUMER_STOP_TIMEOUT_SECONDS)
        except (asyncio.CancelledError, TimeoutError, Exception) as exc:  # noqa: BLE001 - stopping anyway
            log.warning("faust_consumer_stop_failed", error=repr(exc))

    fetch_ends: FetchEnds

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetch_ends = FetchEnds()

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts its fetcher
        consumer._isolation_level = ISOLATION_LEVEL  # likewise
        return consumer

    def highwater(self, tp: TP) -> int | None:  # type: ignore[override]
        """The partition's end as the last fetch answered: its last stable offset for a
        ``read_committed`` consumer (:data:`ISOLATION_LEVEL`; the end of what it can read, as Faust's
        own answer under exactly-once), else its high watermark. None when no fetch answered yet."""
        consumer = self._ensure_consumer()
        if consumer._isolation_level == "read_committed":
            stable = consumer.last_stable_offset(tp)
            if stable is not None and stable >= 0:  # -1: a broker that does not tell it
                return stable  # type: ignore[no-any-return]
        return consumer.highwater(tp)  # type: ignore[no-any-return]

    async def _fetch_records(
        self,
        consumer: Any,
        active_partitions: Any,
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Any:
        """Faust's fetch of one batch, noting where each assigned partition stands after it
        (:class:`FetchEnds`): the records returned are the ones Faust itself may still drop."""
        before = _consumer_positions(consumer)
        records = await super()._fetch_records(
            consumer, active_partitions, timeout=timeout, max_records=max_records
        )
        self.fetch_ends.update(before, _consumer_positions(consumer), records)
        return records


def _consumer_positions(consumer: Any) -> dict[Any, int]:
    """The fetch position (the next offset aiokafka will return) of each partition assigned to an
    aiokafka consumer that has one; aiokafka's ``highwater`` reads the same partition state."""
    subscription = consumer._subscription.subscription
    assignment = subscription.assignment if subscription is not None else None
    if assignment is None:
        return {}
    out = {}
    for tp in assignment.tps:
        state = assignment.state_value(tp)
        if state is not None and state.has_valid_position:
            out[tp] = state.position
    return out


class FetchEnds:
    """Per assigned partition, ``(data_end, position)`` after the consumer's last fetch: ``position`` is
    the next offset the consumer will fetch, and ``data_end`` the offset after the last record the
    fetches returned (or, when none was returned since the partition was positioned there, that
    position). Between the two lie only offsets that hold no record a consumer gets: the control records
    (commit and abort markers) of a transactional producer. aiokafka's position steps over them, the
    records do not, so the fetch high watermark of a partition written in transactions lies past its last
    record, and ``offset + 1 >= highwater`` never holds for it; ``data_end == offset + 1`` and
    ``position >= highwater`` does (:meth:`DrainTracker.at_end`).

    Written by the consumer's thread after each fetch (:meth:`update` swaps the whole map), read by the
    worker's loop (:meth:`get`), so a reader sees one fetch's pair, never half of two.

    Attributes:
        ends: ``TP`` → ``(data_end, position)``, both offsets; partitions not assigned, or without a
            position, after the last fetch are absent.
    """

    def __init__(self) -> None:
        self.ends: dict[Any, tuple[int, int]] = {}

    def update(
        self, before: Mapping[Any, int], after: Mapping[Any, int], records: Mapping[Any, Sequence[Any]]
    ) -> None:
        """Note one fetch: ``before`` and ``after`` are the partitions' positions around it (only those
        with one), ``records`` what it returned per partition (aiokafka records, offset order)."""
        ends: dict[Any, tuple[int, int]] = {}
        for tp, position in after.items():
            batch = records.get(tp)
            if batch:
                data_end = batch[-1].offset + 1
            else:
                start = before.get(tp)
                if start is None:  # positioned during this fetch: the next one tells
                    continue
                previous = self.ends.get(tp)
                # nothing returned from ``start`` on; the data end is kept only when nothing moved the
                # position between the two fetches (a seek), and never lies past the position
                data_end = previous[0] if previous is not None and previous[1] == start else start
                data_end = min(data_end, position)
            ends[tp] = (data_end, position)
        self.ends = ends

    def get(self, tp: Any) -> tuple[int, int] | None:
        """``(data_end, position)`` of ``tp`` after the last fetch, or None when not known."""
        return self.ends.get(tp)


class _FetchablePartitions(AbstractSet[TP]):
    """The partitions whose buffered records a fetch may take, decided when it takes them: those active in
    Faust's live set, and only changelog partitions while :class:`SeekingConsumer` holds records back.

    Read by aiokafka's ``fetched_records`` on the consumer thread (``tp in partitions``); truthy even when
    no partition qualifies, because aiokafka reads an empty set as "every partition".
    """

    __slots__ = ("_active", "_consumer")

    def __init__(self, consumer: SeekingConsumer, active: AbstractSet[TP]) -> None:
        self._consumer = consumer
        self._active = active

    def __contains__(self, tp: object) -> bool:
        held = self._consumer._held_to_changelogs
        return tp in self._active and (held is None or getattr(tp, "topic", None) in held)

    def __iter__(self) -> Iterator[TP]:
        return (tp for tp in list(self._active) if tp in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        return True


class _Transport(faust_aiokafka.Transport):
    Consumer = SeekingConsumer


class _EagerTransport(_Transport):
    Consumer = EagerSeekingConsumer


class _App(faust.App):
    """``faust.App`` whose consumer is :class:`SeekingConsumer` (the ``kafka://`` transport otherwise), with the
    :class:`BatchDelivery` of each topic consumed in batches (``batch_deliveries``, by topic name)."""

    transport_class: type[faust_aiokafka.Transport] = _Transport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_deliveries: dict[str, BatchDelivery] = {}

    def _new_transport(self) -> faust.types.TransportT:
        return self.transport_class(self.conf.broker_consumer, self)


class _EagerApp(_App):
    """``faust.App`` whose consumer is :class:`EagerSeekingConsumer`."""

    transport_class = _EagerTransport


def make_faust_app(
    settings: Settings,
    app_id: str,
    *,
    partitions: int,
    web_port: int | None,
    eager_delivery: bool = True,
    quiet_monitor: bool = True,
) -> faust.App:
    """A Faust app as every processor runs it: raw key and value serializers (decoding is ours),
    in-memory tables recovered from their changelogs, ``acks=all``, reading from the earliest offset
    of a new group, no autodiscovery, no standby replicas, :class:`EagerSeekingConsumer` as its consumer
    and, with Faust's web server off, :class:`QuietMonitor` as its monitor.

    Args:
        settings: broker settings (``session_timeout_ms`` included) from ``settings.kafka``; the data
            directory is ``<settings.state_dir>/faust/<app_id>``.
        app_id: app id, also the consumer group and the prefix of its internal topics.
        partitions: default partition count of its internal topics (changelogs, repartition topics).
        web_port: port of Faust's web server; ``None`` or ``0`` leaves it off.
        eager_delivery: :class:`EagerSeekingConsumer` as the consumer (records handed to the streams
            without a task each); ``False``: :class:`SeekingConsumer` (Faust's delivery, a task per record).
        quiet_monitor: :class:`QuietMonitor` as the monitor when the web server is off (no per-record
            stats; they are only read by Faust's web ``/stats`` page); ``False``: Faust's ``Monitor``.
            With the web server on, Faust's ``Monitor`` either way.

    Raises:
        ValueError: no Kafka bootstrap servers are configured.
    """
    session_timeout_seconds = settings.kafka.session_timeout_ms / 1000
    datadir = settings.state_dir / "faust" / app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)  # Faust makes the last level only
    app = (_EagerApp if eager_delivery else _App)(
        app_id,
        broker=broker_urls(settings.kafka),
        broker_credentials=credentials(settings.kafka),
        broker_client_id=settings.kafka.client_id,
        broker_session_timeout=session_timeout_seconds,
        broker_heartbeat_interval=max(0.5, session_timeout_seconds / 6),
        store="memory://",
        topic_partitions=partitions,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger=PRODUCER_LINGER_SECONDS,
        table_standby_replicas=0,
        # Faust checks, at each recovery, that the changelog offset it holds for a partition is not above the
        # partition's highwater from ListOffsets(latest). With in-memory tables the offset it holds is the one
        # this process last wrote, and Tansu answers ListOffsets with the last batch's base offset + 1 (see
        # processors.tables), so a rebalance that left a worker a partition whose last changelog batch held
        # several records crashed it with ConsistencyError (116 > 113, a run-summary worker in a chaos run of
        # two rebalance storms, 2026-12-06). TailRecoveringTable reads every changelog partition on from that
        # highwater to the end a fetch reports, so nothing is skipped without the check; on Kafka the check
        # could only catch a changelog truncated under a live worker, which acks=all rules out.
        recovery_consistency_check=False,
        TableManager=PromptTableManager,
        autodiscover=False,
        datadir=str(datadir),
        web_enabled=bool(web_port),
        web_port=web_port or 6066,
        web_bind=settings.metrics_host,
    )
    if quiet_monitor and not web_port:
        quiet_faust_monitor(app)
    return app


class FaustDeadLetters:
    """Dead letters of Faust messages: raw key, value and headers with the reason, made durable before
    the caller returns (so the input offset can never be committed past an unsent dead letter).

    The producer is made on the first dead letter.

    Args:
        settings: broker settings.
        serde: the serde (it must know ``sophia.dlq.DeadLetter``).
        processor: name of the processor, recorded in each dead letter.
        topic: the dead-letter topic.
    """

    def __init__(self, settings: Settings, serde: AvroSerde, processor: str, topic: str) -> None:
        self.settings = settings
        self.serde = serde
        self.processor = processor
        self.topic = topic
        self._dlq: DeadLetterPublisher | None = None

    async def publish(
        self, message: Any, exc: Exception, headers: list[tuple[str, bytes | None]] | None = None
    ) -> None:
        """Send ``message`` (a Faust ``Message``) with ``exc`` as the reason, and flush.

        Args:
            headers: the message's headers when the caller already has them as pairs.
        """
        if self._dlq is None:
            self._dlq = DeadLetterPublisher(
                EventProducer(self.settings.kafka, self.serde), self.processor, topic=self.topic
            )
        key, value = message.key, message.value
        self._dlq.publish(
            source_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=key if isinstance(key, bytes) or key is None else str(key).encode(),
            value=value if isinstance(value, bytes) or value is None else None,
            headers=headers if headers is not None else message_headers(message.headers),
            reason=str(exc),
            error_type=type(exc).__name__,
        )
        await asyncio.to_thread(self._dlq.producer.flush)  # durable before the offset can be committed

    def close(self) -> None:
        """Flush and release the producer, if one was made."""
        if self._dlq is not None:
            self._dlq.producer.close()


def stop_when_idle(
    app: faust.App,
    seconds: float,
    last_record: Callable[[], float | None],
    records: Callable[[], int],
    event: str,
    at_end: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Stop the worker (SIGTERM to this process: its clean shutdown path) once no record arrived for
    ``seconds``, counted from when timers start (after table recovery) at the earliest.

    Args:
        app: the app (a timer is added to it).
        seconds: idle time in seconds.
        last_record: ``time.monotonic()`` of the last record handled, ``None`` before the first.
        records: records handled so far (for the log line).
        event: name of the log event written when it stops.
        at_end: awaited once, before the stop, while the worker still runs (partitions assigned, producer
            up): the end of a bounded input (e.g. closing the windows still open); None: nothing.
    """
    idle_since: list[float] = []
    stopping: list[bool] = []

    @app.timer(interval=min(1.0, max(0.1, seconds / 4)))
    async def _stop_when_idle() -> None:
        now = time.monotonic()
        if not idle_since:
            idle_since.append(now)  # timers start once recovery has completed
        last = max(idle_since[0], last_record() or 0.0)
        if now - last >= seconds and not stopping:
            stopping.append(True)
            log.info(event, idle_seconds=round(now - last, 1), records=records())
            if at_end is not None:
                await at_end()
            os.kill(os.getpid(), signal.SIGTERM)


def decode_event(serde: AvroSerde, message: Any) -> tuple[Event, list[tuple[str, bytes | None]]]:
    """Decode a Faust message (raw serializers) into an :class:`~streams.envelope.Event` and its headers.

    Args:
        serde: the serde of the configured registry.
        message: ``event.message`` of a Faust stream.

    Returns:
        ``(event, headers)``; the event's key is the record key as text (``""`` when absent).

    Raises:
        streams.errors.EnvelopeError: the CloudEvents headers are missing or malformed.
        streams.errors.DeserializationError: the value is not a Confluent-framed Avro record we know.
    """
    headers = message_headers(message.headers)
    attributes = CloudEvent.from_headers(headers)
    schema, data = serde.decode(message.value)
    key = message.key.decode("utf-8", "replace") if isinstance(message.key, bytes) else message.key
    return Event(schema=schema, key=key or "", data=data, attributes=attributes), headers


def tracing_process(message: Any, group: str) -> contextlib.AbstractContextManager[Any]:
    """Around the handling of one Faust message (``event.message``): a ``process <topic>`` span
    (OpenTelemetry messaging conventions, consumer kind) continuing the record's ``ce_traceparent`` when
    tracing is on (:func:`core.tracing.configure_tracing`); nothing, at no cost, when it is off. What the
    handling emits inside it carries the span with :func:`traced_headers`.

    Args:
        message: the Faust message (``topic``, ``partition``, ``offset``, ``key``, ``headers``).
        group: the consumer group (the app id).
    """
    if not tracing.is_enabled():
        return contextlib.nullcontext()
    return tracing.process_span(
        message.topic, message_headers(message.headers), key=message.key, partition=message.partition,
        offset=message.offset, group=group,
    )  # fmt: skip


def traced_headers(headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """``headers`` (CloudEvents Kafka headers) with ``ce_traceparent`` set to the current span when tracing
    is on and a span is current, so an insight or decision joins the trace of the event that caused it;
    ``headers`` unchanged otherwise."""
    if not tracing.is_enabled():
        return headers
    traceparent = tracing.current_traceparent()
    if traceparent is None:
        return headers
    return [*((k, v) for k, v in headers if k != "ce_traceparent"), ("ce_traceparent", traceparent.encode())]


class InOrderAcks:
    """Ack a stream's events in their order, each once the outputs it waits for were delivered, so that
    an agent can send without awaiting each delivery (a broker round trip plus the producer's linger per
    output) while Faust, which commits acked offsets only, never commits past an event whose output is
    not on the broker.

    The agent's loop is :meth:`consume` (``stream.noack()``; each event handled, queued with the delivery
    future of its output, or None, then :meth:`settle`); :meth:`settle_every` adds a timer that settles
    too, so the last events are acked when no new one comes. Used by the policy-router agent
    (:mod:`processors.routing.policy_app`) and ``bench/shell_count.py``; the run-summary and anomaly workers
    used it before they moved to :class:`BatchDelivery` (their agent paths were removed on 2026-12-06).

    Args:
        ack: the stream's ``ack`` (``stream.noack().ack``); set later with :attr:`ack` when the stream is
            made inside the agent.
        max_inflight: events awaiting delivery before :meth:`settle` waits for the oldest.
        on_delivered: called with each event's ``item`` (what :meth:`add` was given) once acked.
    """

    def __init__(
        self, ack: Callable[[Any], Awaitable[Any]] | None = None, *, max_inflight: int = 1000,
        on_delivered: Callable[[Any], None] | None = None,
    ) -> None:  # fmt: skip
        self.ack = ack
        self.max_inflight = max_inflight
        self.on_delivered = on_delivered
        self.inflight: collections.deque[tuple[Any, Any, Any]] = collections.deque()
        self._lock = asyncio.Lock()

    def add(self, pending: asyncio.Future[Any] | None, event: Any, item: Any = None) -> None:
        """Queue ``event`` behind the ones before it; ``pending``: its output's delivery (None: nothing to
        wait for, e.g. a dead letter already delivered or a duplicate)."""
        self.inflight.append((pending, event, item))

    async def consume(
        self,
        stream: faust.StreamT,
        handle: Callable[[Any], Awaitable[tuple[asyncio.Future[Any] | None, Any]]],
    ) -> None:
        """The agent's loop over ``stream`` (acked by this object only): ``handle(event)`` returns the
        delivery future of the event's output (None: nothing to wait for) and the item given to
        ``on_delivered``; the event is queued and what was delivered is acked."""
        manual = stream.noack()
        self.ack = manual.ack
        async for event in manual.events():
            pending, item = await handle(event)
            self.add(pending, event, item)
            await self.settle()

    def settle_every(self, app: faust.App, interval_seconds: float) -> None:
        """Add a timer to ``app`` that settles every ``interval_seconds`` (acks what was delivered since
        the last event, when no new event came to do it)."""

        @app.timer(interval=interval_seconds)
        async def settle_in_order() -> None:
            if self.ack is not None:
                await self.settle()

    async def settle(self) -> None:
        """Ack, in order, the events whose outputs were delivered; wait for the oldest while more than
        ``max_inflight`` are queued.

        Raises:
            Exception: an output's delivery failed (the agent stops; its event is read again on restart).
        """
        async with self._lock:  # the agent and the timer: one pops at a time
            while self.inflight:
                pending, event, item = self.inflight[0]
                done = pending is None or pending.done()
                if not done and len(self.inflight) <= self.max_inflight:
                    return
                if pending is not None:
                    await pending  # raises when the delivery failed
                self.inflight.popleft()
                if self.on_delivered is not None:
                    self.on_delivered(item)
                assert self.ack is not None, "InOrderAcks.ack is not set"
                await self.ack(event)


class Checkpoints:
    """Handled records counted towards a checkpoint, with the future that their commit (or ack) waits for: the
    shape every checkpointing worker shares. What a checkpoint writes is the caller's ``write`` (the marked keys
    of a table, :class:`TableCheckpoints`; the healer's whole state); this class decides when, and completes
    the future of the records counted since the previous checkpoint once ``write`` returned.

    A checkpoint comes after ``every_records`` records (in :meth:`record`), when a timer finds the oldest
    record not yet checkpointed has waited ``every_seconds`` (:meth:`checkpoint_if_due`), or when asked
    (:meth:`checkpoint`: before a revocation or stop). Synchronous: a batch and a timer cannot interleave
    inside a checkpoint.

    Args:
        write: writes what the records counted so far changed; called by every checkpoint (also one with
            nothing counted: it may skip an unchanged state). An exception propagates to the caller and the
            future stays pending.
        every_records: records after which :meth:`record` checkpoints.
        every_seconds: the longest a record waits for its checkpoint when :meth:`checkpoint_if_due` is
            called by a timer.
    """

    def __init__(self, write: Callable[[], None], *, every_records: int, every_seconds: float) -> None:
        self.write = write
        self.every_records = every_records
        self.every_seconds = every_seconds
        self.batch: asyncio.Future[None] | None = None  # done when the records counted since are written
        self.records = 0
        self.started = 0.0  # time.monotonic() of the first record counted since the last checkpoint

    @property
    def pending(self) -> bool:
        """Whether records are counted that no checkpoint holds yet."""
        return self.batch is not None

    def record(self, count: int = 1) -> asyncio.Future[None] | None:
        """Count ``count`` handled records whose effects are ready to write; the future of the checkpoint that
        writes them (checkpointing now when ``every_records`` records are counted), or None when ``count`` is 0
        and nothing is pending."""
        if count:
            if self.batch is None:
                self.batch = asyncio.get_running_loop().create_future()
                self.started = time.monotonic()
            self.records += count
        batch = self.batch
        if self.records >= self.every_records:
            self.checkpoint()
        return batch

    def checkpoint(self) -> None:
        """Write (``write``) and complete the future of the records counted since the last checkpoint."""
        self.write()
        batch, self.batch, self.records = self.batch, None, 0
        if batch is not None and not batch.done():
            batch.set_result(None)

    def checkpoint_if_due(self) -> None:
        """Checkpoint when the oldest record not yet checkpointed waited ``every_seconds``."""
        if self.batch is not None and time.monotonic() - self.started >= self.every_seconds:
            self.checkpoint()

    def abandon(self, reason: BaseException) -> None:
        """Fail the future of the records counted and forget them (their effects will not be written: e.g.
        the state was recovered over them); a commit waiting on it fails instead of going past them."""
        batch, self.batch, self.records = self.batch, None, 0
        if batch is not None and not batch.done():
            batch.set_exception(reason)


class TableCheckpoints(Checkpoints):
    """Changed states of a Faust table written together at checkpoints instead of one changelog record per
    update, with the future that a record's ack waits for (:class:`InOrderAcks`) or a batch's commit
    (:class:`BatchDelivery`; ``record(count)`` counts a batch), so that Faust never commits an offset whose
    effect is not in the changelog. Used by the run-summary and anomaly workers.

    A record marks the keys it changed (:meth:`mark`: the state object, kept by reference, and the input
    partition of the record; the newest mark of a key wins) and then counts itself (:meth:`record`, which
    returns the checkpoint's future). A checkpoint (when, as :class:`Checkpoints`) writes each marked key once:
    the state's ``to_dict()`` through the table's ``send_changelog`` to the changelog partition of the key's
    last input partition (where ``table[key] = value`` inside the stream would write; that needs the current
    event, which Faust sets only while the stream iterates, so a timer could not) and into the table's
    ``data``; a state whose ``to_dict()`` is None deletes the key (a tombstone on the changelog).

    Args:
        table: the Faust table.
        every_records: records after which :meth:`record` checkpoints.
        every_seconds: the longest a record waits for its checkpoint when :meth:`checkpoint_if_due` is
            called by a timer.
    """

    def __init__(self, table: Any, *, every_records: int, every_seconds: float) -> None:
        super().__init__(self._write_marked, every_records=every_records, every_seconds=every_seconds)
        self.table = table
        self.dirty: dict[Any, tuple[int, Any]] = {}  # table key -> (input partition, state with to_dict())

    def mark(self, key: Any, partition: int, state: Any) -> None:
        """``key``'s state changed (to ``state``) by a record of input ``partition``."""
        self.dirty[key] = (partition, state)

    def record(self, count: int = 1) -> asyncio.Future[None]:
        """Count ``count`` handled records whose effects are marked; the future of the checkpoint that writes them
        (checkpointing now when ``every_records`` records are counted).

        Raises:
            ValueError: ``count`` is below 1.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        batch = super().record(count)
        assert batch is not None  # a record was counted
        return batch

    def _write_marked(self) -> None:
        for key, (partition, state) in self.dirty.items():
            value = state.to_dict()
            if value is None:  # a deletion: a tombstone, as ``del table[key]`` writes
                self.table.send_changelog(partition, key, None, value_serializer="raw")
                self.table.data.pop(key, None)
                continue
            self.table.send_changelog(partition, key, value)
            self.table.data[key] = value
        self.dirty.clear()


def pack_bodies(bodies: list[dict[str, Any]], max_bytes: int) -> list[tuple[bytes, int]]:
    """Merged bodies as compact JSON lists of at most ``max_bytes`` each (a list that is larger is halved,
    down to one body, which is sent whatever its size), in order: ``[(b"[{...},...]", count), ...]``;
    none for no bodies. One ``json.dumps`` per list, not per body."""
    if not bodies:
        return []
    packed = json.dumps(bodies, separators=(",", ":")).encode()
    if len(packed) <= max_bytes or len(bodies) == 1:
        return [(packed, len(bodies))]
    half = len(bodies) // 2
    return pack_bodies(bodies[:half], max_bytes) + pack_bodies(bodies[half:], max_bytes)


class BatchDelivery:
    """A topic consumed in batches: its records go from each fetch straight to ``handle`` in lists, without
    Faust's per-record path (a ``Message``, the conductor, a channel's queue, a stream event and an ack each),
    and its offsets are committed from this object's own "effects delivered up to" per partition.

    :class:`SeekingConsumer` hands each fetch's records of the topic's partitions to :meth:`put` (only where
    Faust would have delivered them: flow active, same consumer generation; otherwise Faust drops them too
    and reads them again after its seek), in one list per partition, and keeps them from Faust's fetch
    loop. A task of the app takes up to ``max_batch`` buffered records at a time, in the order they came
    (each partition's records in offset order), and awaits ``handle(records)``, which applies them and
    returns the future of their effects (e.g. :meth:`TableCheckpoints.record`'s checkpoint, or a gather of
    output deliveries), or None when they have none to wait for. Once that future is done, and every
    earlier batch's, the partitions' offsets after the batch's last records are in :attr:`done`, which the
    consumer commits (its ``_new_offset``) in Faust's commits (its commit timer, at a revocation and at
    stop, each after flushing the producer), so Faust never commits past a record whose effects are not
    written. A failed future or a ``handle`` that raises crashes the app (nothing after it is committed:
    the records are read again on restart).

    Revocation and stop: Faust's wait for the records in flight (``wait_empty``) first calls :meth:`drain`: the
    batch in hand finishes, ``flush`` runs (e.g. :meth:`TableCheckpoints.checkpoint`), every pending future
    is awaited, and the records not yet taken are dropped, so Faust's commit that follows is exactly what
    was handled; after the revocation the partitions are forgotten. A seek (Faust's ``perform_seek`` after
    every assignment and when a fetch returns while the flow is stopped, or a partition's ``seek``) drops
    the buffered records of the partitions sought, which are then read again from their new position.
    Records below a partition's next expected offset (read again without a seek) are dropped. While the
    table recovers, stream partitions are paused (:class:`SeekingConsumer`), so nothing arrives.

    Records are aiokafka's ``ConsumerRecord`` objects (``topic``, ``partition``, ``offset``, ``key``, ``value``
    bytes, ``headers`` as ``(name, bytes)`` pairs, ``timestamp`` in ms): :func:`message_headers` and
    :meth:`FaustDeadLetters.publish` take them as they take a Faust ``Message``.

    Args:
        app: an app of :func:`make_faust_app` (its consumer is a :class:`SeekingConsumer`).
        topic: the Faust topic (one or more names); it is subscribed here, and no agent may iterate it.
        handle: ``await handle(records)`` -> the future of their effects, or None.
        flush: called by :meth:`drain` before the pending futures are awaited (write what is held back).
        max_batch: most records per ``handle`` call.
        max_buffered: records taken from fetches and not yet handled at which the fetch loop waits.
        max_pending: batches whose futures are not done at which the task waits for the oldest.
        interleave: hand each fetch's records in the order Faust's agent would get them (the consumer's
            ``scheduler``: round robin over the topics, and over each topic's partitions, one record at a
            time) rather than partition by partition; for a job whose outcome depends on how the topics'
            records are merged (the healer).
    """

    def __init__(
        self,
        app: faust.App,
        topic: faust.TopicT,
        handle: Callable[[list[Any]], Awaitable[asyncio.Future[Any] | None]],
        *,
        flush: Callable[[], None] | None = None,
        max_batch: int = 1000,
        max_buffered: int = 20_000,
        max_pending: int = 64,
        interleave: bool = False,
    ) -> None:
        registry = getattr(app, "batch_deliveries", None)
        if registry is None:
            raise TypeError("BatchDelivery needs an app of make_faust_app")
        self.app = app
        self.handle = handle
        self.flush = flush
        self.max_batch = max_batch
        self.max_buffered = max_buffered
        self.max_pending = max_pending
        self.interleave = interleave
        self.chunks: collections.deque[tuple[TP, list[Any]]] = collections.deque()
        self.buffered = 0
        self.position: dict[TP, int] = {}  # next offset expected from a fetch, per partition
        self.pending: collections.deque[tuple[asyncio.Future[Any] | None, dict[TP, int]]] = (
            collections.deque()
        )
        self.done: dict[TP, int] = {}  # offset after the last record whose effects were delivered
        self.failure: BaseException | None = None
        self.records_handled = 0
        self._arrived = asyncio.Event()
        self._space = asyncio.Event()
        self._lock = asyncio.Lock()
        for name in topic.topics:
            registry[name] = self
        app.topics.add(topic)
        app.task(self._run)

    def put(self, tp: TP, records: list[Any]) -> None:
        """Buffer the records of ``tp`` from a fetch (offset order); those below its next expected offset are dropped."""
        records = self._unseen(tp, records)
        if not records:
            return
        self.chunks.append((tp, records))
        self.buffered += len(records)
        self._arrived.set()

    def _unseen(self, tp: TP, records: list[Any]) -> list[Any]:
        """``records`` of ``tp`` (offset order) less those below its next expected offset, which then moves
        past the last of them."""
        expected = self.position.get(tp)
        if expected is not None and records and records[0].offset < expected:
            records = [r for r in records if r.offset >= expected]
        if records:
            self.position[tp] = records[-1].offset + 1
        return records

    def put_interleaved(self, records: Mapping[TP, list[Any]], scheduler: Any) -> None:
        """Buffer one fetch's records of several partitions (offset order each) in ``scheduler``'s order
        (``iterate(records)`` -> ``(tp, record)`` pairs), as runs of consecutive records of one partition;
        those below a partition's next expected offset are dropped."""
        fresh = {tp: unseen for tp, batch in records.items() if (unseen := self._unseen(tp, batch))}
        if len(fresh) < 2:
            for tp, batch in fresh.items():
                self.chunks.append((tp, batch))
        else:
            run_tp: TP | None = None
            run: list[Any] = []
            for tp, record in scheduler.iterate(fresh):
                if tp != run_tp:
                    if run:
                        self.chunks.append((run_tp, run))  # type: ignore[arg-type]
                    run_tp, run = tp, []
                run.append(record)
            self.chunks.append((run_tp, run))  # type: ignore[arg-type]
        if fresh:
            self.buffered += sum(len(b) for b in fresh.values())
            self._arrived.set()

    async def wait_for_space(self, consumer: Any) -> None:
        """Wait while ``max_buffered`` records are buffered (the fetch loop calls it before each fetch),
        unless ``consumer``'s flow stops or it stops."""
        while (self.buffered >= self.max_buffered and consumer.flow_active and not consumer.should_stop
               and self.failure is None):  # fmt: skip
            self._space.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._space.wait(), 0.1)

    def reposition(self, tps: Iterable[TP] | None) -> None:
        """Drop the buffered records of ``tps`` (None: all) and their next expected offsets (after a seek)."""
        if tps is None:
            self.chunks.clear()
            self.position.clear()
        else:
            sought = set(tps)
            self.chunks = collections.deque((tp, r) for tp, r in self.chunks if tp not in sought)
            for tp in sought:
                self.position.pop(tp, None)
        self.buffered = sum(len(r) for _, r in self.chunks)
        self._space.set()

    def forget(self, tps: Iterable[TP]) -> None:
        """Forget revoked partitions (buffered records, positions, delivered offsets)."""
        tps = set(tps)
        self.reposition(tps)
        for tp in tps:
            self.done.pop(tp, None)

    async def drain(self) -> None:
        """Finish the batch in hand, drop the records not yet taken, run ``flush`` and wait for every pending
        batch's future, so :attr:`done` covers everything handled.

        Raises:
            BaseException: a batch's future failed (nothing after it is in :attr:`done`).
        """
        async with self._lock:
            self.reposition(None)
            if self.flush is not None:
                self.flush()
            while self.pending:
                head = self.pending[0][0]
                if head is not None and not head.done():
                    await asyncio.wait({head})
                self._settle()
                if self.failure is not None:
                    raise self.failure

    def _take(self) -> tuple[list[Any], dict[TP, int]]:
        records: list[Any] = []
        upto: dict[TP, int] = {}
        chunks = self.chunks
        while chunks and len(records) < self.max_batch:
            tp, chunk = chunks[0]
            room = self.max_batch - len(records)
            if len(chunk) <= room:
                chunks.popleft()
                part = chunk
            else:
                part, chunks[0] = chunk[:room], (tp, chunk[room:])
            records += part
            upto[tp] = part[-1].offset + 1
        self.buffered -= len(records)
        if self.buffered < self.max_buffered:
            self._space.set()
        return records, upto

    def _settle(self, *_: Any) -> None:
        """Move the offsets of the leading batches whose futures are done into :attr:`done`, in order; a failed
        one stays at the head (nothing after it is committed) and is kept in :attr:`failure`."""
        pending = self.pending
        while pending:
            future, upto = pending[0]
            if future is not None:
                if not future.done():
                    return
                exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
                if exc is not None:
                    if self.failure is None:
                        self.failure = exc
                        self._arrived.set()
                    return
            pending.popleft()
            self.done.update(upto)

    async def _run(self) -> None:
        try:
            while True:
                if self.failure is not None:
                    raise self.failure
                if not self.chunks:
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                async with self._lock:
                    records, upto = self._take()
                    if not records:
                        continue
                    future = await self.handle(records)
                    self.records_handled += len(records)
                    self.pending.append((future, upto))
                    if future is not None and not future.done():
                        future.add_done_callback(self._settle)
                    self._settle()
                if len(self.pending) > self.max_pending:
                    head = self.pending[0][0]
                    if head is not None:
                        await asyncio.wait({head})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("batch_delivery_failed", error=repr(exc))
            await self.app.crash(exc)
            raise


_NO_DELIVERIES: Mapping[str, BatchDelivery] = {}


class QuietMonitor(Monitor):
    """Faust's ``Monitor`` without its four callbacks per record (``on_message_in``, ``on_stream_event_in``,
    ``on_stream_event_out``, ``on_message_out``: counters, timings and offsets per topic, partition, stream
    and task, for Faust's web ``/stats`` page, which the workers do not serve; their metrics are the shell's
    Prometheus counters). Its other callbacks (sends, commits, end offsets, tables, rebalances) are
    Faust's. Install it with :func:`quiet_faust_monitor`."""

    def on_message_in(self, tp: TP, offset: int, message: Any) -> None:
        """Nothing per record."""

    def on_stream_event_in(self, tp: TP, offset: int, stream: Any, event: Any) -> dict[str, Any] | None:
        """Nothing per record (no state for :meth:`on_stream_event_out`)."""
        return None

    def on_stream_event_out(
        self, tp: TP, offset: int, stream: Any, event: Any, state: dict[str, Any] | None = None
    ) -> None:
        """Nothing per record."""

    def on_message_out(self, tp: TP, offset: int, message: Any) -> None:
        """Nothing per record."""


def quiet_faust_monitor(app: faust.App) -> None:
    """Make :class:`QuietMonitor` ``app``'s monitor (the sensor Faust adds when the app starts: call this
    before). About 4 µs of the healer worker's CPU per record (py-spy, 30,000 records)."""
    app.monitor = QuietMonitor()


async def send_event(
    topic: faust.TopicT, serde: AvroSerde, event: Event, *, wait: bool = True
) -> asyncio.Future[Any]:
    """Send ``event`` to ``topic`` (raw serializers) with its CloudEvents headers and event time as the
    record timestamp; with ``wait`` wait until the broker acknowledged it (``acks=all``). Returns the
    delivery future (done when ``wait``).

    Raises:
        streams.errors.SchemaValidationError: the datum does not match its schema.
        faust/aiokafka errors: the broker refused the record.
    """
    body = serde.encode(event.schema, event.data)
    pending = await topic.send(
        key=event.key.encode(),
        value=body,
        headers=event.attributes.to_headers(),
        timestamp=event.attributes.time.timestamp(),
        force=True,
    )
    if wait:
        await pending
    return pending  # type: ignore[no-any-return]


def ensure_processor_topics(
    kafka: KafkaSettings, wanted: Iterable[tuple[str, int]], *, timeout_seconds: float = 30.0
) -> list[str]:
    """Create the topics of ``wanted`` (``(name, partitions)``) that the broker lacks, with their final
    partition counts; return the names created.

    Raises:
        streams.errors.StreamsError: the broker did not answer, or refused a topic.
    """
    admin = AdminClient(kafka.librdkafka())
    topics = [NewTopic(name, num_partitions=partitions, replication_factor=1) for name, partitions in wanted]
    return create_missing_topics(admin, topics, timeout_seconds=timeout_seconds)


def topic_partitions(kafka: KafkaSettings, topic: str, *, timeout_seconds: float = 10.0) -> int | None:
    """How many partitions ``topic`` has on the broker (its metadata); None when it does not exist."""
    meta = AdminClient(kafka.librdkafka()).list_topics(topic, timeout=timeout_seconds).topics.get(topic)
    return len(meta.partitions) if meta is not None and meta.error is None and meta.partitions else None


def consumer_fetch_ends(app: faust.App) -> Callable[[Any], tuple[int, int] | None]:
    """A reader of ``app``'s consumer's :class:`FetchEnds`: ``TP`` → ``(data_end, position)`` after its
    last fetch, or None when unknown (another consumer than this module's, or not fetched yet)."""

    def fetch_ends(tp: Any) -> tuple[int, int] | None:
        ends = getattr(getattr(app.consumer, "_thread", None), "fetch_ends", None)
        return ends.get(tp) if isinstance(ends, FetchEnds) else None

    return fetch_ends


def consumer_highwater(app: faust.App) -> Callable[[Any], int | None]:
    """A reader of ``app``'s consumer's fetch high watermark per partition (``TP``): the offset after the
    partition's last record as the last fetch answered, or None when no fetch has answered since the
    partition was assigned, it is no longer assigned, or the consumer is not started (yet, or any more). A
    worker takes a partition whose last record read is the one before it as read to its end (``drained``:
    idle for an event-time watermark; see :class:`DrainTracker`)."""

    def highwater(tp: Any) -> int | None:
        try:
            return app.consumer.highwater(tp)  # type: ignore[no-any-return]
        except (AssertionError, ConsumerNotStarted):  # aiokafka: the partition is no longer assigned
            return None

    return highwater


class DrainTracker:
    """Which input partitions a worker has read to their end (*drained*: idle for an event-time watermark,
    see :class:`processors.correlation.watermark.SourceWatermark`), from the consumer's fetch high
    watermark. The incident and correlation workers share it.

    A record is its partition's last when ``offset + 1`` reaches the high watermark of the consumer's last
    fetch, or when the consumer's fetch position reached it and no record after this one was returned
    (:meth:`at_end`: a partition written in transactions ends with a commit marker, which the high
    watermark counts and no consumer gets); never while that is unknown (no fetch has answered since the
    assignment), since an unknown end taken for the end could make an input idle that has records to
    come. A partition whose last forwarded record was not known as its last is remembered (:meth:`note`),
    and :meth:`found_drained` returns it once the consumer shows it read to its end, so that the worker
    sends its ``drained`` marker after the records it already forwarded (a timer every second calls it).

    Args:
        highwater: ``TP`` → the offset after the partition's last record as the last fetch answered, or
            None when unknown (:func:`consumer_highwater` of the app; a test passes its own).
        fetch_ends: ``TP`` → ``(data_end, position)`` after the consumer's last fetch, or None when
            unknown (:func:`consumer_fetch_ends` of the app, see :class:`FetchEnds`; a test passes its
            own). Without it a partition whose high watermark lies past its last record (transaction
            markers) is never found read to its end.

    Attributes:
        pending: ``TP`` → (source ``topic/partition``, offset of its last record forwarded) for the
            partitions whose end was not known when that record was forwarded.
    """

    def __init__(
        self,
        highwater: Callable[[Any], int | None] | None = None,
        fetch_ends: Callable[[Any], tuple[int, int] | None] | None = None,
    ) -> None:
        self.highwater: Callable[[Any], int | None] = highwater or (lambda tp: None)
        self.fetch_ends: Callable[[Any], tuple[int, int] | None] = fetch_ends or (lambda tp: None)
        self.pending: dict[Any, tuple[str, int]] = {}

    def follow(self, app: faust.App) -> None:
        """Read ``app``'s consumer (:func:`consumer_highwater`, :func:`consumer_fetch_ends`)."""
        self.highwater = consumer_highwater(app)
        self.fetch_ends = consumer_fetch_ends(app)

    def at_end(self, tp: Any, offset: int) -> bool:
        """Whether the record at ``offset`` of ``tp`` is its partition's last as the last fetch knows it:
        ``offset + 1`` reaches the high watermark, or the fetch position does with nothing returned
        after this record (only control records between)."""
        highwater = self.highwater(tp)
        if highwater is None:
            return False
        if offset + 1 >= highwater:
            return True
        ends = self.fetch_ends(tp)
        return ends is not None and ends[0] == offset + 1 and ends[1] >= highwater

    def note(self, tp: Any, source: str, offset: int, drained: bool) -> None:
        """Where ``tp`` stands once its records up to ``offset`` were forwarded (skipped or dead-lettered
        alike): read to its end (``drained``, nothing to remember) or to be checked again."""
        if drained:
            self.pending.pop(tp, None)
        else:
            self.pending[tp] = (source, offset)

    def found_drained(self) -> Iterator[str]:
        """The sources of the remembered partitions now read to their end, each forgotten as it is yielded
        (told once). Lazy: a partition is checked when the iteration reaches it, so a caller that awaits a
        marker's send between two sources does not tell one whose newer record was forwarded meanwhile
        (:meth:`note` moved it); ``list()`` it to check all at once."""
        for tp, entry in list(self.pending.items()):
            if self.pending.get(tp) == entry and self.at_end(tp, entry[1]):
                del self.pending[tp]
                yield entry[0]


def partitions_with_records(
    kafka: KafkaSettings, topics: Sequence[str], group_id: str, *, timeout_seconds: float = 15.0
) -> list[str]:
    """The partitions (``topic/partition``) of ``topics`` holding records after ``group_id``'s committed
    offset: the records a worker of that consumer group will read at start. An event-time watermark waits
    for each; the others are read to their end already (idle until their next record).

    A partition whose end (``ListOffsets(latest)``) lies past the offset a worker starts from, or that is
    committed past its start, is read (``read_committed``, as the workers read, :data:`ISOLATION_LEVEL`)
    until a record at or past that offset or its end-of-partition event: offsets that hold only control
    records (the commit markers of a transactional producer, which a consumer's committed offset never
    passes) or the records of a transaction still open are not records to wait for. The read starts at
    that offset, or at the one before the end when the end lies at or before it: Tansu answers
    ``ListOffsets(latest)`` with the last batch's base offset + 1, so a commit inside the last batch
    reads as at or past the end, and a commit past the real end (a topic made again) must not be read
    from (librdkafka would wait for an offset that is not there). A partition that answers neither within
    ``timeout_seconds`` is listed. Asking for the committed offsets and reading with ``assign`` (no
    commit) neither joins nor moves the group.

    Raises:
        confluent_kafka.KafkaException: the broker did not answer within ``timeout_seconds``."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(kafka.librdkafka(extra={
        "group.id": group_id, "enable.auto.commit": False, "enable.auto.offset.store": False,
        "isolation.level": ISOLATION_LEVEL,  # what a worker reads
        "enable.partition.eof": True,
        # only a partition's first records are wanted: small fetches, a small prefetch queue
        # (and an empty fetch answered after 50 ms, so the end-of-partition event comes soon)
        "fetch.message.max.bytes": 65_536, "queued.max.messages.kbytes": 1_024, "fetch.wait.max.ms": 50,
    }))  # fmt: skip
    try:
        md = consumer.list_topics(timeout=timeout_seconds)
        tps = [
            TopicPartition(t, p)
            for t in topics
            for p in (sorted(md.topics[t].partitions) if t in md.topics else [])
        ]
        committed = (
            {(c.topic, c.partition): c.offset for c in consumer.committed(tps, timeout=timeout_seconds)}
            if tps
            else {}
        )
        # (topic, partition) -> (the offset to read from, the offset a worker starts from)
        ahead: dict[tuple[str, int], tuple[int, int]] = {}
        for tp in tps:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout_seconds)
            start = max(low, committed.get((tp.topic, tp.partition), -1))
            if high > start or start > low:  # from the offset before the end when it is not past start
                ahead[(tp.topic, tp.partition)] = (min(start, max(low, high - 1)), start)
        with_records = _first_records(consumer, ahead, timeout_seconds)
        return [f"{t}/{p}" for t, p in ahead if (t, p) in with_records]
    finally:
        consumer.close()


def _first_records(
    consumer: Any, ahead: Mapping[tuple[str, int], tuple[int, int]], timeout_seconds: float
) -> set[tuple[str, int]]:
    """Which of the partitions ``ahead`` (``(topic, partition)`` → ``(offset to read from, first offset
    wanted)``) return a record at or past the first offset wanted before their end-of-partition event
    (``consumer`` made with ``enable.partition.eof``), as against reaching their end with none (records
    before it, control records, or a transaction still open). Those that tell neither within
    ``timeout_seconds`` count as returning one."""
    from confluent_kafka import KafkaError, TopicPartition

    if not ahead:
        return set()
    consumer.assign([TopicPartition(t, p, read_from) for (t, p), (read_from, _) in ahead.items()])
    found: set[tuple[str, int]] = set()
    open_ = set(ahead)
    deadline = time.monotonic() + timeout_seconds
    try:
        while open_ and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.1):
                key = (message.topic(), message.partition())
                if key not in open_:
                    continue
                error = message.error()
                if error is None:
                    if message.offset() < ahead[key][1]:
                        continue  # before the group's commit, in the batch it lies in
                    found.add(key)
                    open_.discard(key)
                    consumer.pause([TopicPartition(*key)])  # nothing more is wanted from it
                elif error.code() == KafkaError._PARTITION_EOF:  # its end (read_committed: the last
                    open_.discard(key)  # stable offset) came first: nothing to read now
    finally:
        consumer.unassign()
    return found | open_


def catalogue_partitions(name: str, fallback: int) -> int:
    """The catalogue's partition count of topic ``name`` (:data:`streams.catalogue.CATALOGUE`), else ``fallback``."""
    spec = CATALOGUE.get(name)
    return spec.partitions if spec is not None else fallback


class StatsCollector:
    """A processor's counters (a dataclass of ints) as Prometheus counters, read at scrape time.

    Args:
        stats: the processor's counters object.
        app_id: the Faust app id (label ``app``).
        counters: ``(metric name, attribute, help)`` for each counter exported.
    """

    def __init__(self, stats: Any, app_id: str, counters: Sequence[tuple[str, str, str]]) -> None:
        self.stats = stats
        self.app_id = app_id
        self.counters = tuple(counters)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        for name, attr, doc in self.counters:
            c = CounterMetricFamily(name, doc, labels=["app"])
            c.add_metric([self.app_id], getattr(self.stats, attr))
            yield c


def _readiness(app: faust.App, started: list[float]) -> dict[str, Any]:
    """Ready once the worker has started (partitions assigned, tables recovered) and is not rebalancing.

    Runs on the metrics server's thread: it reads the consumer only once the worker made it (``app.consumer``
    would make one here, bound to this thread's event loop, and the worker would then fail to start).
    """
    consumer = getattr(app, "_consumer", None)
    try:
        assigned = len(consumer.assignment()) if consumer is not None else 0
    except Exception:  # noqa: BLE001 - not started yet
        assigned = 0
    rebalancing = bool(getattr(app, "rebalancing", False))
    return {"ok": bool(started) and not rebalancing, "started": bool(started), "rebalancing": rebalancing,
            "assigned_partitions": assigned}  # fmt: skip


class _Worker(faust.Worker):
    """Faust's worker, which exits within ``shutdown_timeout_seconds`` of SIGTERM or SIGINT whatever hangs.

    A clean stop (agents stopped, offsets committed, producer flushed) takes well under a second with a
    broker; a stop that hangs past the timeout (a client waiting on a broker that has gone) is logged
    and the process exits with code 70 (``os._exit``: nothing else runs).
    """

    def __init__(self, *args: Any, shutdown_timeout_seconds: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shutdown_timeout_seconds = shutdown_timeout_seconds
        self._watchdog: threading.Timer | None = None

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        """No terminal spinner: Faust's would set the root logger to DEBUG and spin for every record, so
        every debug call of aiokafka and Faust built a log record (about 7 % of a busy worker's time)."""
        self.spinner = None

    def _arm_watchdog(self, sig: signal.Signals) -> None:
        if self._watchdog is not None:
            return
        timeout = self._shutdown_timeout_seconds

        def expire() -> None:
            log.error("worker_shutdown_timed_out", signal=sig.name, timeout_seconds=timeout)
            sys.stderr.flush()
            os._exit(70)

        self._watchdog = threading.Timer(timeout, expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _on_sigint(self) -> None:
        self._arm_watchdog(signal.SIGINT)
        super()._on_sigint()

    def _on_sigterm(self) -> None:
        self._arm_watchdog(signal.SIGTERM)
        super()._on_sigterm()

    def disarm(self) -> None:
        """Cancel the watchdog (the worker has stopped)."""
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def _sentinel_task(self) -> None:
        """The last task mode runs on the stopped loop before closing it, so that callbacks scheduled by the
        stop run first; mode's sleeps a whole second, which every stop paid (a worker run of a test, a
        rolling restart). One short sleep lets those callbacks run as well."""
        await asyncio.sleep(SENTINEL_SECONDS)


SENTINEL_SECONDS = 0.1
"""How long the stopped worker's loop runs its last task before it is closed (mode's default: 1 s)."""


class PromptTableManager(TableManager):
    """Faust's table manager without its one-second pause at start.

    Faust's ``TableManager.on_start`` sleeps 1 s before it opens the changelog channels and starts the
    recovery, so that a table declared just after the app starts is still registered. Every table of ours
    is declared when its app is built, before the worker starts, so that second was dead time at every
    start: it delayed every worker's readiness, and each worker run of the tests, by a second. Faust's own
    ``_update_channels`` still finalises the tables, so a table declared after the start is refused as
    before (``Too late to add tables at this point``).
    """

    async def on_start(self) -> None:
        """Open the changelog channels and start the recovery at once."""
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


def run_processor_worker(
    settings: Settings,
    app: faust.App,
    *,
    processor: str,
    stats: Any,
    counters: Sequence[tuple[str, str, str]],
    close: Callable[[], None],
    stop_after_idle_seconds: float | None = None,
    loglevel: str | None = None,
    metrics_port: int | None = None,
    collectors: Sequence[Any] = (),
    health_fields: Callable[[], Mapping[str, Any]] | None = None,
    shutdown_timeout_seconds: float = SHUTDOWN_TIMEOUT_SECONDS,
    freeze_gc: bool = True,
    gc_young_threshold: int | None = None,
    at_idle_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run a processor's Faust app as a worker in this process until it is stopped (blocking).

    Owns the process's event loop and signal handlers (SIGTERM/SIGINT stop it cleanly: the agents stop,
    the offsets of what they finished are committed, ``close`` runs, the call returns, all within
    ``shutdown_timeout_seconds``, also when the broker has gone), so call it from a main thread. Around the worker: logging from the settings, the counters registered on
    :data:`core.observability.REGISTRY`, ``/metrics``, ``/healthz`` (liveness, with the counters) and
    ``/readyz`` (ready once started and not rebalancing) on ``settings.metrics_host:metrics_port``; the
    metrics server is shut down and ``close`` called when the worker stops. Faust's own web server is
    not needed for any of this (build the app with ``web_port=0``).

    Args:
        settings: the settings the app was built with.
        app: the processor's app.
        processor: the processor's name (log events ``<processor>_metrics``, ``<processor>_idle_stop``;
            ``processor`` in ``/healthz``).
        stats: its counters (a dataclass); needs ``last_record_monotonic`` and ``records_count`` for
            stop-when-idle; every field is in ``/healthz``.
        counters: ``(metric name, attribute, help)`` exported from ``stats`` as counters labelled ``app``.
        close: releases what the processor opened (its dead-letter producer), after the worker stopped.
        stop_after_idle_seconds: stop once started and no record arrived for this many seconds; ``None``
            runs until signalled.
        loglevel: Faust's log level; default ``settings.log_level``.
        metrics_port: port of ``/metrics``, ``/healthz`` and ``/readyz``; default
            ``settings.metrics_port`` (``0``: any free port, logged in ``<processor>_metrics``).
        collectors: further Prometheus collectors (metrics with other labels, gauges) registered on
            :data:`~core.observability.REGISTRY` for this process (one already registered is skipped).
        health_fields: more fields of ``/healthz`` (e.g. the version of a model the worker serves),
            read at each request.
        shutdown_timeout_seconds: longest time from SIGTERM/SIGINT to the exit; a shutdown still
            running then is abandoned and the process exits with code 70.
        freeze_gc: once the worker is up (tables recovered), collect and then ``gc.freeze()`` what exists
            (modules, Faust's and aiokafka's services, the recovered tables): it lives as long as the
            worker, and the collector's full collections no longer traverse it; unfrozen when the worker
            stops. ``False``: the collector as it is.
        gc_young_threshold: the collector's threshold of the youngest generation while the worker runs
            (Python's default 700; a worker making many short-lived containers per record collects less
            often with a higher one), restored when it stops; None leaves it.
        at_idle_stop: with ``stop_after_idle_seconds``, awaited once before the idle stop (see
            :func:`stop_when_idle`'s ``at_end``).

    Raises:
        SystemExit: the worker exited with a non-zero code.
    """
    started: list[float] = []

    @app.task
    async def _mark_started() -> None:  # tasks start once the worker is up (tables recovered)
        if freeze_gc:
            gc.collect()
            gc.freeze()
        started.append(time.monotonic())

    if stop_after_idle_seconds is not None:
        stop_when_idle(
            app, stop_after_idle_seconds, lambda: stats.last_record_monotonic, lambda: stats.records_count,
            f"{processor.replace('-', '_')}_idle_stop", at_end=at_idle_stop,
        )  # fmt: skip
    configure_logging(settings.log_level, settings.log_format)
    for collector in (StatsCollector(stats, app.conf.id, counters), *collectors):
        try:
            REGISTRY.register(collector)
        except ValueError:
            pass  # already registered in this process (a second worker run)

    def health() -> dict[str, Any]:
        return {"ok": True, "processor": processor, **dataclasses.asdict(stats),
                **(health_fields() if health_fields else {})}  # fmt: skip

    server = serve_metrics(
        settings.metrics_port if metrics_port is None else metrics_port,
        host=settings.metrics_host,
        health=health,
        ready=lambda: _readiness(app, started),
    )
    log.info(
        f"{processor.replace('-', '_')}_metrics",
        url=f"http://{settings.metrics_host}:{server.server_address[1]}/metrics",
    )
    # the worker's loops (its consumer thread's too) are made from here on: uvloop's unless
    # BACKBONE_EVENT_LOOP=asyncio (core.eventloop; the previous policy is restored when the worker stops)
    loop_policy = contextlib.ExitStack()
    loop_policy.enter_context(event_loop_policy(settings.event_loop))
    worker = _Worker(
        app,
        loglevel=(loglevel or settings.log_level).lower(),
        quiet=True,
        redirect_stdouts=False,
        stdout=sys.stderr,
        shutdown_timeout_seconds=shutdown_timeout_seconds,
    )
    thresholds = gc.get_threshold()
    if gc_young_threshold is not None:
        gc.set_threshold(gc_young_threshold, *thresholds[1:])
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        gc.set_threshold(*thresholds)
        if freeze_gc:
            gc.unfreeze()
        loop_policy.close()
        server.shutdown()
        server.server_close()
        try:
            close()
        finally:
            worker.disarm()
