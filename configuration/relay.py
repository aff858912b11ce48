"""The outbox relay: every stored configuration event, in order, onto the ``config.changes`` topic.

The relay follows the configuration application's notification log (``eventsourcing`` assigns each
stored event a ``notification_id``, and its PostgreSQL recorder commits them in id order under a
table lock, so reading ids above the last published one never skips an event). For each batch it
produces every event (Avro ``sophia.config.ConfigChange``, CloudEvents headers, key = the
configuration key, CloudEvents id = :func:`~configuration.store.event_id_for` of the stored event),
waits for the broker to acknowledge all of them, and only then records the batch's last
notification id in the PostgreSQL table ``config_relay_position``. A crash (even ``SIGKILL``)
therefore re-publishes at most the last batch, with the same event ids; consumers de-duplicate by
event id. Broker and PostgreSQL outages are retried with a capped back-off and the relay resumes
from the recorded position, so the topic has no gaps.

Run it as a process with ``python -m configuration.relay`` or ``backbone config relay``.

Metrics (explicit registry): ``backbone_config_relay_lag_events`` (stored events not yet
published), ``backbone_config_relay_published_events_total``, ``backbone_config_relay_errors_total``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
import structlog
from eventsourcing.persistence import InterfaceError, Notification, OperationalError
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from configuration.aggregate import ChangeKind, ConfigurationItem
from configuration.errors import ConfigStoreUnavailableError, RelayError
from configuration.store import ConfigurationApplication, event_id_for, eventsourcing_env
from core.settings import Settings, get_settings
from streams.catalogue import CATALOGUE, TopicSpec
from streams.envelope import Event
from streams.errors import BrokerUnavailableError, DeliveryError
from streams.producer import EventProducer
from streams.serde import AvroSerde, serde_from_settings

__all__ = [
    "CONFIG_CHANGE_SCHEMA",
    "CONFIG_TOPIC",
    "CONFIG_TOPICS",
    "EVENT_SOURCE",
    "OutboxRelay",
    "RelayMetrics",
    "change_event",
    "main",
]

log = structlog.get_logger(__name__)

CONFIG_TOPIC = "config.changes"
CONFIG_CHANGE_SCHEMA = "sophia.config.ConfigChange"
EVENT_SOURCE = "/configuration"

#: Topics of this package, from the catalogue (``streams.catalogue``).
CONFIG_TOPICS: tuple[TopicSpec, ...] = (CATALOGUE[CONFIG_TOPIC],)

_POSITION_DDL = """
create table if not exists config_relay_position (
    relay_name text primary key,
    notification_id bigint not null,
    updated_at timestamptz not null default now()
)
"""
_KINDS = {
    ConfigurationItem.Created: ChangeKind.CREATED,
    ConfigurationItem.Changed: ChangeKind.CHANGED,
    ConfigurationItem.RolledBack: ChangeKind.ROLLED_BACK,
    ConfigurationItem.Retired: ChangeKind.RETIRED,
}


@dataclass(frozen=True, slots=True)
class RelayMetrics:
    """The relay's Prometheus metrics, on an explicit registry."""

    registry: CollectorRegistry
    lag_events: Gauge
    published_events: Counter
    errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> RelayMetrics:
        """Register the metrics on ``registry`` (a new one when ``None``)."""
        registry = registry if registry is not None else CollectorRegistry()
        return cls(
            registry=registry,
            lag_events=Gauge(
                "backbone_config_relay_lag_events",
                "Stored configuration events not yet published to Kafka.",
                registry=registry,
            ),
            published_events=Counter(
                "backbone_config_relay_published_events",
                "Configuration events published and acknowledged (re-publications included).",
                registry=registry,
            ),
            errors=Counter(
                "backbone_config_relay_errors",
                "Relay iterations that failed on a broker or PostgreSQL error and were retried.",
                ["kind"],
                registry=registry,
            ),
        )


def change_event(event: Any, *, key: str, notification_id: int) -> Event:
    """Map a stored configuration domain event to the ``sophia.config.ConfigChange`` event.

    Args:
        event: a ``ConfigurationItem`` ``Created``, ``Changed``, ``RolledBack`` or ``Retired`` event.
        key: the configuration key of its aggregate.
        notification_id: its position in the notification log.

    Raises:
        RelayError: an event type the relay does not know.
    """
    kind = _KINDS.get(type(event))
    if kind is None:
        raise RelayError(f"no mapping for stored event type {type(event).__qualname__}")
    value = getattr(event, "value", None)
    data = {
        "key": key,
        "version": event.originator_version,
        "change": kind,
        "value_json": json.dumps(value, sort_keys=True, separators=(",", ":")) if value is not None else None,
        "author": event.author,
        "reason": event.reason,
        "changed_at": event.timestamp,
        "schema_name": getattr(event, "schema_name", None),
        "restored_version": getattr(event, "restored_version", None),
        "rolled_back_from_version": getattr(event, "rolled_back_from_version", None),
        "causation_id": event.causation_id,
        "aggregate_id": str(event.originator_id),
        "notification_id": notification_id,
    }
    return Event.create(
        CONFIG_CHANGE_SCHEMA,
        key,
        data,
        source=EVENT_SOURCE,
        time=event.timestamp,
        id=event_id_for(event.originator_id, event.originator_version),
        subject=key,
        causation_id=event.causation_id,
    )


class OutboxRelay:
    """Publish the configuration notification log to Kafka, recording progress in PostgreSQL.

    Args:
        settings: Kafka, PostgreSQL and schema registry settings.
        topic: the destination topic.
        name: the relay's name (its row in ``config_relay_position``); two relays with one name must not
            run at once.
        batch_size: notifications per batch (at most this many are re-published after a crash).
        metrics: the metrics (a new registry when ``None``).
        serde: the Avro serde (built from ``settings.schema_registry`` when ``None``).

    Raises:
        ValueError: missing Kafka or PostgreSQL settings, or ``batch_size`` < 1.
        ConfigStoreUnavailableError: PostgreSQL cannot be reached (the store's tables are made at start;
            :meth:`when_reachable` waits for it instead).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        topic: str = CONFIG_TOPIC,
        name: str = "config-relay",
        batch_size: int = 100,
        metrics: RelayMetrics | None = None,
        serde: AvroSerde | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.settings = settings or get_settings()
        self.topic = topic
        self.name = name
        self.batch_size = batch_size
        self.metrics = metrics or RelayMetrics.create()
        self.serde = serde or serde_from_settings(self.settings)
        self._dsn = self.settings.postgres.dsn()
        self.settings.kafka.librdkafka()  # fail early without bootstrap servers
        try:
            self.app = ConfigurationApplication(eventsourcing_env(self.settings.postgres))
        except (OperationalError, InterfaceError, psycopg.OperationalError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigStoreUnavailableError(f"PostgreSQL unavailable: {first}") from exc
        self._producer: EventProducer | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._keys: dict[UUID, str] = {}
        self._log = log.bind(relay=name, topic=topic)

    # ------------------------------------------------------------- plumbing

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
            with self._conn.transaction():  # two relays starting together take turns (as the store's tables)
                self._conn.execute("SELECT pg_advisory_xact_lock(hashtext('backbone-config-relay-ddl'))")
                self._conn.execute(_POSITION_DDL)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def producer(self) -> EventProducer:
        """The Kafka producer (created on first use, and again after a failed delivery)."""
        if self._producer is None:
            self._producer = EventProducer(self.settings.kafka, self.serde, linger_ms=5)
        return self._producer

    def position(self) -> int:
        """The last notification id published and acknowledged (0 when none).

        Raises:
            psycopg.OperationalError: PostgreSQL cannot be reached.
        """
        row = (
            self._connection()
            .execute("select notification_id from config_relay_position where relay_name = %s", (self.name,))
            .fetchone()
        )
        return int(row[0]) if row else 0

    def _record_position(self, notification_id: int) -> None:
        self._connection().execute(
            "insert into config_relay_position (relay_name, notification_id) values (%s, %s) "
            "on conflict (relay_name) do update set notification_id = excluded.notification_id, updated_at = now()",
            (self.name, notification_id),
        )

    def _key_of(self, aggregate_id: UUID) -> str:
        key = self._keys.get(aggregate_id)
        if key is None:
            created = list(self.app.events.get(aggregate_id, lte=1))
            if not created:
                raise RelayError(f"aggregate {aggregate_id} has no Created event")
            key = created[0].key  # type: ignore[attr-defined]
            self._keys[aggregate_id] = key
        return key

    def _to_event(self, notification: Notification) -> Event:
        event = self.app.mapper.to_domain_event(notification)
        key = event.key if isinstance(event, ConfigurationItem.Created) else self._key_of(event.originator_id)
        if isinstance(event, ConfigurationItem.Created):
            self._keys[event.originator_id] = key
        return change_event(event, key=key, notification_id=notification.id)

    # ----------------------------------------------------------------- work

    def lag(self) -> int:
        """Stored events not yet published (max notification id minus the position); also sets the gauge."""
        lag = max(0, (self.app.recorder.max_notification_id() or 0) - self.position())
        self.metrics.lag_events.set(lag)
        return lag

    def run_once(self) -> int:
        """Publish the next batch, wait for the acknowledgements, record the position.

        Returns:
            how many events were published (0 when caught up).

        Raises:
            DeliveryError, BrokerUnavailableError: the broker did not acknowledge the batch (position unchanged).
            ConfigStoreUnavailableError: PostgreSQL cannot be reached.
            RelayError: a stored event the relay cannot map.
        """
        try:
            start = self.position()
            batch: Sequence[Notification] = self.app.recorder.select_notifications(
                start, self.batch_size, inclusive_of_start=False
            )
        except (psycopg.OperationalError, OperationalError, InterfaceError) as exc:
            self._drop_connection()
            raise ConfigStoreUnavailableError(
                f"PostgreSQL unavailable while reading the outbox: {exc}"
            ) from exc
        if not batch:
            self.metrics.lag_events.set(0)
            return 0
        producer = self.producer()
        for notification in batch:
            producer.produce(self.topic, self._to_event(notification))
        producer.flush(30.0)  # every record of the batch acknowledged (acks=all) before the position moves
        last = batch[-1].id
        try:
            self._record_position(last)
        except psycopg.OperationalError as exc:
            self._drop_connection()
            raise ConfigStoreUnavailableError(
                f"PostgreSQL unavailable while recording position {last}: {exc}"
            ) from exc
        self.metrics.published_events.inc(len(batch))
        self._log.info("config_relay.published", count=len(batch), first=batch[0].id, last=last)
        return len(batch)

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        idle_seconds: float = 0.2,
        max_backoff_seconds: float = 5.0,
    ) -> None:
        """Relay until ``stop`` is set, surviving broker and PostgreSQL outages.

        Args:
            stop: set it to stop after the current batch.
            idle_seconds: pause when caught up.
            max_backoff_seconds: ceiling of the pause between retries after an error.
        """
        stop = stop or threading.Event()
        backoff = 0.2
        self._log.info("config_relay.started", batch_size=self.batch_size)
        while not stop.is_set():
            try:
                published = self.run_once()
                backoff = 0.2
                if published == 0:
                    self.lag()
                    stop.wait(idle_seconds)
            except (DeliveryError, BrokerUnavailableError) as exc:
                self.metrics.errors.labels(kind="broker").inc()
                self._log.warning("config_relay.broker_error", error=str(exc), retry_in_seconds=backoff)
                self._producer = None  # a fresh idempotent producer after a failed batch
                stop.wait(backoff)
                backoff = min(max_backoff_seconds, backoff * 2)
            except ConfigStoreUnavailableError as exc:
                self.metrics.errors.labels(kind="postgres").inc()
                self._log.warning("config_relay.postgres_error", error=str(exc), retry_in_seconds=backoff)
                stop.wait(backoff)
                backoff = min(max_backoff_seconds, backoff * 2)
        self._log.info("config_relay.stopped", position=self.position())

    @classmethod
    def when_reachable(
        cls,
        stop: threading.Event,
        settings: Settings | None = None,
        *,
        max_backoff_seconds: float = 5.0,
        **kwargs: Any,
    ) -> OutboxRelay | None:
        """Build the relay once PostgreSQL answers: a relay started while PostgreSQL is down (a restart, a
        machine booting) waits for it, as :meth:`run` does once running, instead of exiting.

        Args:
            stop: set (by SIGTERM or SIGINT) to give up waiting.
            settings: as for the constructor.
            max_backoff_seconds: longest wait between two attempts (the first after 0.2 s, doubling), each
                failed one logged as ``config_relay.postgres_error`` with ``at="start"``.
            **kwargs: the constructor's other arguments (``topic``, ``name``, ``batch_size``, ...).

        Returns:
            The relay, or ``None`` when ``stop`` was set before PostgreSQL answered.
        """
        backoff = 0.2
        while True:
            try:
                return cls(settings, **kwargs)
            except ConfigStoreUnavailableError as exc:
                log.warning("config_relay.postgres_error", relay=kwargs.get("name", "config-relay"),
                            topic=kwargs.get("topic", CONFIG_TOPIC), error=str(exc), retry_in_seconds=backoff,
                            at="start")  # fmt: skip
                if stop.wait(backoff):
                    return None
                backoff = min(max_backoff_seconds, backoff * 2)

    def close(self) -> None:
        """Flush nothing further; release the producer, the connection and the application's pool."""
        self._producer = None
        self._drop_connection()
        self.app.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m configuration.relay [--topic T] [--name N] [--batch-size N] [--metrics-port P]``.

    Settings come from the environment (``BACKBONE_KAFKA__BOOTSTRAP_SERVERS``, ``BACKBONE_POSTGRES__URL``).
    Waits for PostgreSQL when it is down at start (:meth:`OutboxRelay.when_reachable`). Stops cleanly on
    SIGTERM or SIGINT.
    """
    parser = argparse.ArgumentParser(prog="python -m configuration.relay", description=main.__doc__)
    parser.add_argument("--topic", default=CONFIG_TOPIC)
    parser.add_argument("--name", default="config-relay")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port")
    args = parser.parse_args(argv)
    from core.stack import resolve_settings

    settings = resolve_settings(get_settings())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    relay = OutboxRelay.when_reachable(
        stop, settings, topic=args.topic, name=args.name, batch_size=args.batch_size
    )
    if relay is None:
        return 0
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, registry=relay.metrics.registry)
    try:
        relay.run(stop)
    finally:
        relay.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
