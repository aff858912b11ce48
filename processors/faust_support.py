"""What the processors' Faust apps share: the app's broker and store settings, its consumer (with three
repairs of Faust's seek around a rebalance, below), Kafka headers of a Faust message, dead letters of a Faust
message, and the stop-when-idle timer.

Each app (:mod:`processors.app`, :mod:`processors.correlation.app`, :mod:`processors.routing.app`)
decodes its own records (raw serializers) and keeps its tables in memory, recovered from their
changelogs (:mod:`processors.tables`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import faust
import structlog
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from core.settings import KafkaSettings, Settings
from streams.consumer import DeadLetterPublisher
from streams.producer import EventProducer
from streams.serde import AvroSerde

__all__ = [
    "FaustDeadLetters",
    "SeekingConsumer",
    "broker_urls",
    "credentials",
    "make_faust_app",
    "message_headers",
    "stop_when_idle",
]

log = structlog.get_logger(__name__)


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
    context = ssl.create_default_context() if kafka.security_protocol.endswith("SSL") else None
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
    items: Iterable[tuple[Any, Any]] = raw.items() if isinstance(raw, Mapping) else (raw or ())
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
       seek (up to a fetch's max wait, 1.5 s, while aiokafka finishes the fetch in flight), then resumes
       Faust's flow control, which empties every stream's queue. Records the fetcher handed over in
       between were thrown away with their offsets already passed. From :meth:`perform_seek` until
       :meth:`resume_flow` (which recovery calls right after flow control resumes) :meth:`_getmany` leaves
       stream partitions in aiokafka's buffer.

    Re-reading from the committed position (or the start, when there is none) is Faust's at-least-once
    contract; the processors are deterministic and their outputs carry stable event ids.
    """

    #: Set by :meth:`perform_seek`, cleared by :meth:`resume_flow`: the changelog topics (the only ones
    #: whose records may be taken meanwhile), or ``None`` when nothing is held back.
    _held_to_changelogs: frozenset[str] | None = None

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Mapping[TP, list[Any]]:
        if active_partitions is None:  # a client-only app: every partition
            return await super()._getmany(None, timeout)
        return await super()._getmany(_FetchablePartitions(self, active_partitions), timeout)  # type: ignore[arg-type]

    async def perform_seek(self) -> None:
        """Faust's seek of every assigned partition to its committed offset, after which stream records are
        held back until :meth:`resume_flow`."""
        self._held_to_changelogs = frozenset(self.app.tables.changelog_topics)
        await super().perform_seek()

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
                log.debug("faust_seek_uncommitted_to_start", partitions=sorted((tp.topic, tp.partition) for tp in rewind))
        return committed


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


class _App(faust.App):
    """``faust.App`` whose consumer is :class:`SeekingConsumer` (the ``kafka://`` transport otherwise)."""

    def _new_transport(self) -> faust.types.TransportT:
        return _Transport(self.conf.broker_consumer, self)


def make_faust_app(settings: Settings, app_id: str, *, partitions: int, web_port: int | None) -> faust.App:
    """A Faust app as every processor runs it: raw key and value serializers (decoding is ours),
    in-memory tables recovered from their changelogs, ``acks=all``, reading from the earliest offset
    of a new group, no autodiscovery, no standby replicas, and :class:`SeekingConsumer` as its consumer.

    Args:
        settings: broker settings (``session_timeout_ms`` included) from ``settings.kafka``; the data
            directory is ``<settings.state_dir>/faust/<app_id>``.
        app_id: app id, also the consumer group and the prefix of its internal topics.
        partitions: default partition count of its internal topics (changelogs, repartition topics).
        web_port: port of Faust's web server; ``None`` or ``0`` leaves it off.

    Raises:
        ValueError: no Kafka bootstrap servers are configured.
    """
    session_timeout_seconds = settings.kafka.session_timeout_ms / 1000
    datadir = settings.state_dir / "faust" / app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)  # Faust makes the last level only
    return _App(
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
        table_standby_replicas=0,
        autodiscover=False,
        datadir=str(datadir),
        web_enabled=bool(web_port),
        web_port=web_port or 6066,
        web_bind="127.0.0.1",
    )


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
    app: faust.App, seconds: float, last_record: Callable[[], float | None], records: Callable[[], int], event: str
) -> None:
    """Stop the worker (SIGTERM to this process: its clean shutdown path) once no record arrived for
    ``seconds``, counted from when timers start (after table recovery) at the earliest.

    Args:
        app: the app (a timer is added to it).
        seconds: idle time in seconds.
        last_record: ``time.monotonic()`` of the last record handled, ``None`` before the first.
        records: records handled so far (for the log line).
        event: name of the log event written when it stops.
    """
    idle_since: list[float] = []

    @app.timer(interval=min(1.0, max(0.1, seconds / 4)))
    async def _stop_when_idle() -> None:
        now = time.monotonic()
        if not idle_since:
            idle_since.append(now)  # timers start once recovery has completed
        last = max(idle_since[0], last_record() or 0.0)
        if now - last >= seconds:
            log.info(event, idle_seconds=round(now - last, 1), records=records())
            os.kill(os.getpid(), signal.SIGTERM)
