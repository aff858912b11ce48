"""The decision events of the healer, as plain data.

A :class:`Decision` is what every part of the healer returns: a kind (``circuit_opened``,
``retry_scheduled``, ``agent_warning``, ``rollback``, ``escalation`` ...), the subject it is about
(``circuit:provider:Google``, ``run:django__django-11066``, ``config:routing.policy.default``), the
event time it happened at, the version of the healing configuration it used, and details. Its id is
deterministic (a hash of kind, subject, event time and the discriminating details), so a replay of
the same history gives the same ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["DECISION_SCHEMA", "DECISION_SOURCE", "Decision", "decision_id", "from_us", "to_us", "to_utc"]

#: Avro full name of a decision event.
DECISION_SCHEMA = "sophia.healing.Decision"
#: CloudEvents source of the healer's events.
DECISION_SOURCE = "/processors/healing"


def to_utc(value: datetime | float | int) -> datetime:
    """An aware UTC datetime from a datetime (naive ones are read as UTC) or unix seconds.

    Raises:
        TypeError: neither a datetime nor a number.
    """
    if isinstance(value, datetime):
        if value.tzinfo is UTC:  # the common case: nothing to convert
            return value
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), UTC)
    raise TypeError(f"an event time is a datetime or unix seconds, not {type(value).__name__}")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(value: datetime | None) -> int | None:
    """Epoch microseconds of an aware datetime (exact: datetimes have microsecond resolution); ``None`` stays."""
    if value is None:
        return None
    delta = (value if value.tzinfo is UTC else to_utc(value)) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(value: int | None) -> datetime | None:
    """The UTC datetime of :func:`to_us`'s epoch microseconds; ``None`` stays."""
    return None if value is None else _EPOCH + timedelta(microseconds=int(value))


def decision_id(kind: str, subject: str, event_time: datetime, *parts: Any) -> str:
    """Deterministic id (32 hex chars) of a decision from its kind, subject, time and discriminators."""
    text = json.dumps([kind, subject, event_time.isoformat(), *[str(p) for p in parts]])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """One healing decision.

    Attributes:
        kind: what was decided, e.g. ``circuit_opened``, ``circuit_half_open``, ``circuit_closed``,
            ``retry_scheduled``, ``retry_due``, ``fallback``, ``escalation``, ``agent_warning``,
            ``rollback``, ``rollback_recommended``, ``rollback_suppressed``, ``escalation_acked``.
        subject: the thing it is about (``circuit:<scope>:<name>``, ``run:<id>``, ``request:<id>``,
            ``config:<key>``).
        event_time: when it happened, in event time (aware UTC).
        config_version: version of the healing configuration the decision used (0 = built-in defaults).
        details: JSON-ready details (window counts, thresholds, evidence, due time ...).
        causation_id: id of the event or decision that caused it, when there is one.
        id: deterministic id (see :func:`decision_id`); computed when not given.
    """

    kind: str
    subject: str
    event_time: datetime
    config_version: int
    details: dict[str, Any] = field(default_factory=dict)
    causation_id: str | None = None
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(
                self,
                "id",
                decision_id(
                    self.kind,
                    self.subject,
                    self.event_time,
                    json.dumps(self.details, sort_keys=True, default=str),
                ),
            )

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"id", "kind", "subject", "event_time" (ISO 8601), "config_version", "causation_id", "details"}``."""
        return {
            "id": self.id,
            "kind": self.kind,
            "subject": self.subject,
            "event_time": self.event_time.isoformat(),
            "config_version": self.config_version,
            "causation_id": self.causation_id,
            "details": self.details,
        }

    def to_avro(self) -> dict[str, Any]:
        """The ``sophia.healing.Decision`` datum (details as JSON text)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "subject": self.subject,
            "event_time": self.event_time,
            "config_version": self.config_version,
            "causation_id": self.causation_id,
            "details_json": json.dumps(self.details, sort_keys=True, default=str),
        }

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Decision:
        """A decision from its ``sophia.healing.Decision`` datum.

        Raises:
            KeyError: a field is missing. ValueError: ``details_json`` is not JSON.
        """
        return cls(
            kind=data["kind"],
            subject=data["subject"],
            event_time=to_utc(data["event_time"]),
            config_version=int(data["config_version"]),
            details=json.loads(data["details_json"]),
            causation_id=data.get("causation_id"),
            id=data["id"],
        )

    def to_state(self) -> dict[str, Any]:
        """The decision for a state snapshot: :meth:`to_avro` with ``event_time_us`` (epoch microseconds)
        in place of ``event_time``, JSON-ready; :meth:`from_state` gives it back equal, id included."""
        out = self.to_avro()
        out["event_time_us"] = to_us(out.pop("event_time"))
        return out

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Decision:
        """The decision :meth:`to_state` wrote.

        Raises:
            KeyError: a field is missing. ValueError: ``details_json`` is not JSON.
        """
        return cls.from_avro({**data, "event_time": from_us(int(data["event_time_us"]))})

    def to_event(self) -> Any:
        """The decision as a ``streams.envelope.Event`` (key = subject, CloudEvents id = decision id)."""
        from streams.envelope import Event

        return Event.create(
            DECISION_SCHEMA,
            self.subject,
            self.to_avro(),
            source=DECISION_SOURCE,
            time=self.event_time,
            id=self.id,
            causation_id=self.causation_id,
        )
