"""What a projection is: a named, versioned view of some topics, applied in batches inside the
runner's PostgreSQL transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import psycopg

from streams.consumer import ConsumedEvent

__all__ = ["Projection"]


class Projection(Protocol):
    """A view built from the log.

    Attributes:
        name: unique name, also the prefix of its tables and its consumer group.
        version: bumped when the view's shape or logic changes (a rebuild is then due).
        topics: the topics it reads.

    Optional (read with ``getattr`` by the runner, see :mod:`projections.runner`): ``dedupe_by_id``,
    ``apply_failures(cur, failures)``, ``apply_columns(cur, batch)`` and
    ``decode(raw: streams.consumer.RawRecord) -> ConsumedEvent | DecodeFailure``, the projection's own
    decoder for topics that are not Confluent-framed Avro with CloudEvents headers (plain JSON); it must
    give each event a deterministic id (the runner de-duplicates by it) and return a
    :class:`~streams.consumer.DecodeFailure` (dead-lettered) for a record of the wrong shape.
    """

    name: str
    version: int
    topics: tuple[str, ...]

    def create(self, conn: psycopg.Connection) -> None:
        """Create its tables if they do not exist (idempotent DDL)."""
        ...

    def apply(self, cur: psycopg.Cursor, events: Sequence[ConsumedEvent]) -> None:
        """Apply a batch of new (already de-duplicated) events inside the runner's transaction.

        Raises:
            projections.errors.ProjectionApplyError: a record the view cannot take; the runner then
                applies the batch record by record and dead-letters the refused one.
        """
        ...
