"""Checking that the configured Kafka answers, with an error that names it."""

from __future__ import annotations

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from core.settings import KafkaSettings
from streams.errors import BrokerUnavailableError

__all__ = ["require_broker"]


def require_broker(kafka: KafkaSettings, timeout_seconds: float = 10.0) -> None:
    """Check that Kafka answers a metadata request within ``timeout_seconds``.

    Args:
        kafka: the Kafka client settings.
        timeout_seconds: how long to wait for the metadata answer.

    Raises:
        streams.errors.BrokerUnavailableError: naming the bootstrap servers.
        ValueError: no bootstrap servers configured (no dev stack running, nothing set).
    """
    conf = kafka.librdkafka(extra={"log_level": 2})  # the failure is ours to report, once
    try:
        AdminClient(conf).list_topics(timeout=timeout_seconds)
    except KafkaException as exc:
        raise BrokerUnavailableError(
            f"Kafka at {kafka.bootstrap_servers} did not answer within {timeout_seconds:.0f}s"
        ) from exc
