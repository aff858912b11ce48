"""The composition root's shared pieces: settings completed from a running dev stack, the serde,
producers, and turning configuration/connection failures into clear one-line errors."""

from __future__ import annotations

from functools import lru_cache

from backbone.settings import Settings, get_settings
from streams.registry import make_registry
from streams.serde import AvroSerde

__all__ = ["load_settings", "make_serde", "require_broker"]


def load_settings() -> Settings:
    """Settings from the environment, with empty server URLs taken from a running ``backbone dev up``."""
    from backbone.devstack import resolve_settings

    return resolve_settings(get_settings())


@lru_cache(maxsize=4)
def make_serde(registry_url: str = "", compatibility: str = "BACKWARD") -> AvroSerde:
    """The Avro serde over the configured registry (embedded when ``registry_url`` is empty)."""
    return AvroSerde(make_registry(registry_url, compatibility=compatibility))


def require_broker(settings: Settings, timeout_seconds: float = 10.0) -> None:
    """Check that Kafka answers a metadata request.

    Raises:
        streams.errors.BrokerUnavailableError: naming the bootstrap servers.
        ValueError: no bootstrap servers configured and no dev stack running.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from streams.errors import BrokerUnavailableError

    conf = settings.kafka.librdkafka(extra={"log_level": 2})  # the failure is ours to report, once
    try:
        AdminClient(conf).list_topics(timeout=timeout_seconds)
    except KafkaException as exc:
        raise BrokerUnavailableError(
            f"Kafka at {settings.kafka.bootstrap_servers} did not answer within {timeout_seconds:.0f}s"
        ) from exc
