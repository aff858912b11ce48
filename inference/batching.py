"""Dynamic batching by size and wait time, and the offsets to commit after a batch (no Kafka here).

A batch opens with its first request and closes when it holds ``max_batch_size`` requests or when
``max_wait_seconds`` have passed since it opened, whichever comes first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

__all__ = ["BatchAccumulator", "offsets_to_commit"]

T = TypeVar("T")


class BatchAccumulator(Generic[T]):
    """Collect items into batches closed by size or by age.

    Args:
        max_batch_size: items that close a batch (>= 1).
        max_wait_seconds: age, in seconds since its first item, that closes a batch (>= 0).
        clock: monotonic clock in seconds (injectable for tests).

    Raises:
        ValueError: ``max_batch_size < 1`` or ``max_wait_seconds < 0``.
    """

    def __init__(
        self, max_batch_size: int, max_wait_seconds: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_seconds < 0:
            raise ValueError(f"max_wait_seconds must be >= 0, got {max_wait_seconds}")
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max_wait_seconds
        self._clock = clock
        self._items: list[T] = []
        self._opened_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> list[T]:
        """The items of the open batch (a copy)."""
        return list(self._items)

    def add(self, items: Iterable[T]) -> None:
        """Append items; the first item opens the batch's wait clock."""
        for item in items:
            if self._opened_at is None:
                self._opened_at = self._clock()
            self._items.append(item)

    @property
    def room(self) -> int:
        """How many more items fit before the batch is full."""
        return max(0, self.max_batch_size - len(self._items))

    def remaining_wait_seconds(self) -> float:
        """Seconds until the open batch is due; ``max_wait_seconds`` when no batch is open."""
        if self._opened_at is None:
            return self.max_wait_seconds
        return max(0.0, self._opened_at + self.max_wait_seconds - self._clock())

    def ready(self) -> bool:
        """True when the open batch is full or old enough to run."""
        if not self._items:
            return False
        return len(self._items) >= self.max_batch_size or self.remaining_wait_seconds() <= 0.0

    def take(self) -> list[T]:
        """Close the batch: return at most ``max_batch_size`` items and keep the rest (their clock restarts)."""
        batch, rest = self._items[: self.max_batch_size], self._items[self.max_batch_size :]
        self._items = []
        self._opened_at = None
        self.add(rest)
        return batch

    def drop(self, keep: Callable[[T], bool]) -> list[T]:
        """Remove and return the items for which ``keep`` is false (e.g. of revoked partitions)."""
        kept = [i for i in self._items if keep(i)]
        dropped = [i for i in self._items if not keep(i)]
        self._items = kept
        if not kept:
            self._opened_at = None
        return dropped


def offsets_to_commit(positions: Iterable[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """The offsets to commit after processing the records at ``positions``.

    Args:
        positions: ``(topic, partition, offset)`` of every processed record, any order.

    Returns:
        ``(topic, partition, next_offset)`` per partition, ``next_offset`` = highest offset + 1, sorted.
    """
    last: dict[tuple[str, int], int] = {}
    for topic, partition, offset in positions:
        key = (topic, partition)
        if offset > last.get(key, -1):
            last[key] = offset
    return sorted((t, p, o + 1) for (t, p), o in last.items())
