"""The log: topic catalogue, CloudEvents envelope, Avro serde in the Confluent wire format, schema
registries, the typed producer, consuming with dead letters, and range reads by offset or time."""

from streams.catalogue import CATALOGUE, TopicSpec, ensure_topics
from streams.consumer import (
    DLQ_TOPIC,
    ConsumedEvent,
    DeadLetterPublisher,
    DecodeFailure,
    Subscriber,
    decode_message,
)
from streams.envelope import CloudEvent, Event, deterministic_id
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry, HttpRegistry, SchemaRegistry, make_registry
from streams.replay import offset_for_time, read_range
from streams.serde import AvroSerde

__all__ = [
    "CATALOGUE",
    "DLQ_TOPIC",
    "AvroSerde",
    "CloudEvent",
    "ConsumedEvent",
    "DeadLetterPublisher",
    "DecodeFailure",
    "EmbeddedRegistry",
    "Event",
    "EventProducer",
    "HttpRegistry",
    "SchemaRegistry",
    "Subscriber",
    "TopicSpec",
    "decode_message",
    "deterministic_id",
    "ensure_topics",
    "make_registry",
    "offset_for_time",
    "read_range",
]
