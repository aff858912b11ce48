"""The event-time watermark of a correlation scope: the slowest active input's largest event time.

Plain Python, no Faust. One object is shared by :class:`processors.correlation.logic.Correlator` (which
drops what its retention has passed) and its
:class:`processors.correlation.masked.DiscussionLinker` (which decides messages), so both read one clock.

**Idleness.** A source read to its end (the worker: a partition of its events topic whose last record
reached the consumer's high watermark, or that held nothing to read when the worker started) is marked
idle and stops holding the watermark back, as a Flink source ``withIdleness`` or a Kafka Streams task
past ``max.task.idle.ms`` does; it is active again with its next event. Without it, one partition that
falls silent (or never speaks: a small workspace whose entities hash to two of three partitions) held
every discussion decision and the retention back for good. When every source heard from is idle, the
watermark is the largest of their event times: everything was read. An event of a source behind the
watermark when it speaks again is late (the linker counts it); the watermark never moves back.
"""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["IMPLICIT_SOURCE", "SourceWatermark"]

IMPLICIT_SOURCE = "-"
"""The source of events noted without one (an evaluation, a benchmark: one input in event-time order)."""


class SourceWatermark:
    """The smallest of the active sources' largest event times (epoch ms), never moving back.

    A source read far ahead of another (partitions of a replay consumed at different speeds) does not
    make the other's events late; a source seen once and then silent holds the watermark back until it
    speaks again or is marked idle (:meth:`mark_idle`).

    Args:
        sources: the inputs the watermark waits for (the worker: ``<topic>/<partition>`` of every partition
            of its events topic): no watermark before each has been noted or marked idle. None: the
            sources noted so far.
    """

    def __init__(self, sources: Collection[str] | None = None) -> None:
        self.sources = frozenset(sources) if sources is not None else None
        self.source_max_ms: dict[str, int] = {}  # per source: its largest event time noted, epoch ms
        self.idle: set[str] = set()  # sources read to their end since their last event
        self.watermark_ms: int | None = None  # None until every expected source was noted or is idle

    def note(self, source: str | None, time_ms: int) -> None:
        """Note an event time (epoch ms) of ``source`` (None: :data:`IMPLICIT_SOURCE`), which is active
        from now on, and move the watermark."""
        key = source if source is not None else IMPLICIT_SOURCE
        if key in self.idle:
            self.idle.discard(key)
            if time_ms <= self.source_max_ms.get(key, -(2**62)):
                return  # active again, with nothing newer: the watermark cannot move
        if time_ms > self.source_max_ms.get(key, -(2**62)):
            self.source_max_ms[key] = time_ms
            self._move()

    def mark_idle(self, source: str) -> None:
        """Note that ``source`` was read to its end: it no longer holds the watermark back (until its next
        :meth:`note`); move the watermark."""
        if source not in self.idle:
            self.idle.add(source)
            self._move()

    def restore(self, watermark_ms: int) -> None:
        """Take back a persisted watermark (epoch ms; a restarted worker's, which idleness may have moved
        past the sources' maxima): the watermark is at least ``watermark_ms`` from now on."""
        if self.watermark_ms is None or watermark_ms > self.watermark_ms:
            self.watermark_ms = watermark_ms

    def _move(self) -> None:
        if self.sources is not None and not self.sources <= self.source_max_ms.keys() | self.idle:
            return
        active = [ms for source, ms in self.source_max_ms.items() if source not in self.idle]
        if active:
            low = min(active)
        elif self.source_max_ms:
            low = max(self.source_max_ms.values())  # every source heard is idle: all was read
        else:
            return
        if self.watermark_ms is None or low > self.watermark_ms:
            self.watermark_ms = low
