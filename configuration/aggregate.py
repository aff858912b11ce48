"""The configuration item: an eventsourcing aggregate whose events are the versions of one key.

Each key is one :class:`ConfigurationItem` aggregate. Its id is a UUIDv5 of the key, so two writers
that create the same key at once collide on ``(originator_id, originator_version)`` in PostgreSQL
and only one wins. Its version is the configuration version: ``Created`` is version 1, and every
``Changed``, ``RolledBack`` and ``Retired`` adds one. History is never rewritten; a rollback is a
new event that carries the restored value and records the version it rolled back from.

Event evolution: ``Changed`` is at ``class_version = 2``. Version 1 (before causation ids were
recorded) had no ``causation_id``; :meth:`ConfigurationItem.Changed.upcast_v1_v2` fills it with
``None`` when such an event is read. Snapshots of the aggregate are upcast the same way.
"""

from __future__ import annotations

import uuid
from typing import Any

from eventsourcing.domain import Aggregate

__all__ = ["CONFIG_NAMESPACE", "ChangeKind", "ConfigurationItem", "aggregate_id_for"]

#: UUIDv5 namespace of configuration item ids.
CONFIG_NAMESPACE = uuid.UUID("0b8f6a4e-9d2c-4c1e-8f7a-3e5d1c2b9a01")


def aggregate_id_for(key: str) -> uuid.UUID:
    """The aggregate id of ``key``: ``uuid5(CONFIG_NAMESPACE, key)``."""
    return uuid.uuid5(CONFIG_NAMESPACE, key)


class ChangeKind:
    """Names of the change kinds, as they appear on the wire (``sophia.config.ConfigChangeKind``)."""

    CREATED = "CREATED"
    CHANGED = "CHANGED"
    ROLLED_BACK = "ROLLED_BACK"
    RETIRED = "RETIRED"


class ConfigurationItem(Aggregate):
    """One configuration key and its current value.

    Attributes:
        key: the configuration key.
        value: the current value (a JSON object); the last value before retirement when retired.
        author: who made the change that produced this version.
        reason: why.
        schema_name: name of the value schema the value was validated against, or ``None``.
        causation_id: id of the command or decision that asked for the change, or ``None``.
        change: the :class:`ChangeKind` of the event that produced this version.
        restored_version: for a rollback, the version whose value was restored.
        rolled_back_from_version: for a rollback, the version that was current before it.
        retired: whether the key is retired (takes no new versions).
    """

    class_version = 2

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        """Snapshots of version 1 had no ``causation_id``."""
        state.setdefault("causation_id", None)

    @staticmethod
    def create_id(key: str, **_: Any) -> uuid.UUID:  # type: ignore[override]
        """Deterministic id of the key's aggregate."""
        return aggregate_id_for(key)

    class Event(Aggregate.Event):
        """Base of the configuration item's events."""

    class Created(Event, Aggregate.Created):
        """The key's first version was stored."""

        key: str
        value: dict[str, Any]
        author: str
        reason: str
        schema_name: str | None
        causation_id: str | None

    def __init__(
        self,
        key: str,
        value: dict[str, Any],
        author: str,
        reason: str,
        schema_name: str | None,
        causation_id: str | None,
    ) -> None:
        self.key = key
        self.value = value
        self.author = author
        self.reason = reason
        self.schema_name = schema_name
        self.causation_id = causation_id
        self.change = ChangeKind.CREATED
        self.restored_version: int | None = None
        self.rolled_back_from_version: int | None = None
        self.retired = False

    @classmethod
    def create(
        cls,
        key: str,
        value: dict[str, Any],
        *,
        author: str,
        reason: str,
        schema_name: str | None = None,
        causation_id: str | None = None,
    ) -> ConfigurationItem:
        """Version 1 of ``key`` (pending until the application saves it)."""
        return cls._create(
            cls.Created,
            key=key,
            value=value,
            author=author,
            reason=reason,
            schema_name=schema_name,
            causation_id=causation_id,
        )

    class Changed(Event):
        """A new value was stored.

        ``class_version`` 2 added ``causation_id``.
        """

        class_version = 2

        value: dict[str, Any]
        author: str
        reason: str
        schema_name: str | None
        causation_id: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """Version 1 events had no ``causation_id``."""
            state["causation_id"] = None

        def apply(self, aggregate: ConfigurationItem) -> None:
            aggregate.value = self.value
            aggregate.author = self.author
            aggregate.reason = self.reason
            aggregate.schema_name = self.schema_name
            aggregate.causation_id = self.causation_id
            aggregate.change = ChangeKind.CHANGED
            aggregate.restored_version = None
            aggregate.rolled_back_from_version = None

    def change_value(
        self,
        value: dict[str, Any],
        *,
        author: str,
        reason: str,
        schema_name: str | None = None,
        causation_id: str | None = None,
    ) -> None:
        """Trigger :class:`Changed` (a new version with ``value``)."""
        self.trigger_event(
            self.Changed,
            value=value,
            author=author,
            reason=reason,
            schema_name=schema_name,
            causation_id=causation_id,
        )

    class RolledBack(Event):
        """The value of an earlier version was restored as a new version."""

        value: dict[str, Any]
        restored_version: int
        rolled_back_from_version: int
        author: str
        reason: str
        schema_name: str | None
        causation_id: str | None

        def apply(self, aggregate: ConfigurationItem) -> None:
            aggregate.value = self.value
            aggregate.author = self.author
            aggregate.reason = self.reason
            aggregate.schema_name = self.schema_name
            aggregate.causation_id = self.causation_id
            aggregate.change = ChangeKind.ROLLED_BACK
            aggregate.restored_version = self.restored_version
            aggregate.rolled_back_from_version = self.rolled_back_from_version

    def roll_back(
        self,
        value: dict[str, Any],
        *,
        restored_version: int,
        author: str,
        reason: str,
        schema_name: str | None = None,
        causation_id: str | None = None,
    ) -> None:
        """Trigger :class:`RolledBack` restoring ``value`` (the value of ``restored_version``)."""
        self.trigger_event(
            self.RolledBack,
            value=value,
            restored_version=restored_version,
            rolled_back_from_version=self.version,
            author=author,
            reason=reason,
            schema_name=schema_name,
            causation_id=causation_id,
        )

    class Retired(Event):
        """The key was retired: it keeps its history and takes no new versions."""

        author: str
        reason: str
        causation_id: str | None

        def apply(self, aggregate: ConfigurationItem) -> None:
            aggregate.author = self.author
            aggregate.reason = self.reason
            aggregate.causation_id = self.causation_id
            aggregate.change = ChangeKind.RETIRED
            aggregate.restored_version = None
            aggregate.rolled_back_from_version = None
            aggregate.retired = True

    def retire(self, *, author: str, reason: str, causation_id: str | None = None) -> None:
        """Trigger :class:`Retired`."""
        self.trigger_event(self.Retired, author=author, reason=reason, causation_id=causation_id)
