"""processors.shell.DrainTracker, the read-to-end bookkeeping the incident and correlation workers share."""

from __future__ import annotations

from faust.types import TP

from processors.shell import DrainTracker


def test_a_partition_is_drained_only_once_its_known_end_is_reached_and_is_told_once() -> None:
    a, b = TP("events", 0), TP("events", 1)
    ends: dict[TP, int | None] = {a: None, b: 5}
    drains = DrainTracker(ends.get)
    assert not drains.at_end(a, 10)  # no fetch answered since the assignment: the end is unknown
    assert drains.at_end(b, 4) and not drains.at_end(b, 3)
    drains.note(a, "events/0", 10, drained=False)
    drains.note(b, "events/1", 3, drained=False)
    assert list(drains.found_drained()) == []  # a's end unknown, b has a record to come
    ends[a] = 11
    assert list(drains.found_drained()) == ["events/0"]
    assert list(drains.found_drained()) == []  # told once
    drains.note(b, "events/1", 4, drained=True)  # its last record was forwarded knowing it was the last
    assert drains.pending == {}
    drains.note(a, "events/0", 11, drained=False)  # a record produced since, read while ...
    ends[a] = 13  # ... more were written: not drained until the worker reads them
    assert list(drains.found_drained()) == [] and a in drains.pending


def test_without_a_high_watermark_reader_nothing_is_ever_drained() -> None:
    drains = DrainTracker()
    drains.note(TP("events", 0), "events/0", 0, drained=False)
    assert not drains.at_end(TP("events", 0), 0) and list(drains.found_drained()) == []


def test_a_partition_moved_while_the_caller_awaits_is_checked_again_before_it_is_told() -> None:
    """The incident worker sends one marker at a time: a record of the second partition forwarded while
    the first marker is sent (noted at a new offset, not its end) keeps the second from being told."""
    a, b = TP("events", 0), TP("events", 1)
    ends: dict[TP, int | None] = {a: 4, b: 8}
    drains = DrainTracker(ends.get)
    drains.note(a, "events/0", 3, drained=False)
    drains.note(b, "events/1", 7, drained=False)
    told = []
    for source in drains.found_drained():
        told.append(source)
        drains.note(b, "events/1", 8, drained=False)  # meanwhile: offset 8 forwarded, the end moved on
        ends[b] = 10
    assert told == ["events/0"] and drains.pending == {b: ("events/1", 8)}
