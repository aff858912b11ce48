"""The event-time watermark of a correlation scope: the slowest input's largest event time.

Plain Python, no Faust. One object is shared by :class:`processors.correlation.logic.Correlator` (which
drops what its retention has passed) and its
:class:`processors.correlation.masked.DiscussionLinker` (which decides messages), so both read one clock.
"""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["IMPLICIT_SOURCE", "SourceWatermark"]

IMPLICIT_SOURCE = "-"
"""The source of events noted without one (an evaluation, a benchmark: one input in event-time order)."""


class SourceWatermark:
    """The smallest of the sources' largest event times (epoch ms), never moving back.

    A source read far ahead of another (partitions of a replay consumed at different speeds) does not
    make the other's events late; a source seen once and then silent holds the watermark back until it
    speaks again.

    Args:
        sources: the inputs the watermark waits for (the worker: ``<topic>/<partition>`` of every partition
            of its events topic): no watermark before each has been noted. None: the sources noted so far.
    """

    def __init__(self, sources: Collection[str] | None = None) -> None:
        self.sources = frozenset(sources) if sources is not None else None
        self.source_max_ms: dict[str, int] = {}  # per source: its largest event time noted, epoch ms
        self.watermark_ms: int | None = None  # None until every expected source has been noted

    def note(self, source: str | None, time_ms: int) -> None:
        """Note an event time (epoch ms) of ``source`` (None: :data:`IMPLICIT_SOURCE`) and move the
        watermark."""
        key = source if source is not None else IMPLICIT_SOURCE
        if time_ms > self.source_max_ms.get(key, -(2**62)):
            self.source_max_ms[key] = time_ms
            self._move()

    def _move(self) -> None:
        if self.sources is not None and not self.sources <= self.source_max_ms.keys():
            return
        low = min(self.source_max_ms.values())
        if self.watermark_ms is None or low > self.watermark_ms:
            self.watermark_ms = low
