"""Errors of the log layer.

The tree::

    BackboneError                      (backbone.errors)
    └── StreamsError
        ├── EnvelopeError (ValueError)          a record lacks or has malformed CloudEvents headers
        ├── SchemaError
        │   ├── SchemaNotFoundError (LookupError)   unknown schema id or subject
        │   ├── SchemaIncompatibleError (ValueError) a change that would break readers of history
        │   └── SchemaValidationError (ValueError)   a datum does not match its schema (names the field)
        ├── DeserializationError (ValueError)   bytes that are not a Confluent-framed Avro record we know
        ├── DeliveryError                       the broker did not acknowledge a produced record
        └── BrokerUnavailableError (ConnectionError) the configured broker cannot be reached
"""

from __future__ import annotations

from core.errors import BackboneError

__all__ = [
    "BrokerUnavailableError",
    "DeliveryError",
    "DeserializationError",
    "EnvelopeError",
    "SchemaError",
    "SchemaIncompatibleError",
    "SchemaNotFoundError",
    "SchemaValidationError",
    "StreamsError",
    "UnacknowledgedError",
]


class StreamsError(BackboneError):
    """Root of the errors raised by :mod:`streams`."""


class EnvelopeError(StreamsError, ValueError):
    """A record's CloudEvents headers are missing or malformed."""


class SchemaError(StreamsError):
    """Root of the schema errors."""


class SchemaNotFoundError(SchemaError, LookupError):
    """A schema id or subject the registry does not know."""


class SchemaIncompatibleError(SchemaError, ValueError):
    """A schema change refused by the compatibility gate.

    Attributes:
        subject: the subject whose new version was refused.
        problems: one line per incompatibility, each naming the field path.
    """

    def __init__(self, subject: str, problems: list[str]) -> None:
        self.subject = subject
        self.problems = problems
        super().__init__(f"schema change for {subject} is incompatible: " + "; ".join(problems))


class SchemaValidationError(SchemaError, ValueError):
    """A datum does not match its schema.

    Attributes:
        schema: full name of the schema.
        field: dotted path of the offending field, or ``None`` when the whole datum is wrong.
    """

    def __init__(self, schema: str, field: str | None, message: str) -> None:
        self.schema = schema
        self.field = field
        where = f" field {field!r}" if field else ""
        super().__init__(f"{schema}{where}: {message}")


class DeserializationError(StreamsError, ValueError):
    """Bytes that cannot be decoded: no Confluent magic byte, unknown schema id, or a corrupt body."""


class DeliveryError(StreamsError):
    """The broker refused or failed to acknowledge produced records.

    Attributes:
        failures: ``(topic, key, error string)`` per failed record.
    """

    def __init__(self, failures: list[tuple[str, bytes | None, str]]) -> None:
        self.failures = failures
        first = failures[0]
        super().__init__(f"{len(failures)} record(s) not delivered; first: topic={first[0]} error={first[2]}")


class BrokerUnavailableError(StreamsError, ConnectionError):
    """The configured Kafka bootstrap servers cannot be reached."""


class UnacknowledgedError(StreamsError, ConnectionError):
    """Records were not acknowledged in time, or the producer's local queue is full: nothing is known
    to be stored, and the caller should retry after a delay (HTTP ingest answers 503 with Retry-After)."""
