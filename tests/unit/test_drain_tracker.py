"""processors.shell.DrainTracker, the read-to-end bookkeeping the incident and correlation workers share."""

from __future__ import annotations

from faust.types import TP

from processors.shell import DrainTracker, FetchEnds


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


class _Record:
    def __init__(self, offset: int) -> None:
        self.offset = offset


def test_a_partition_written_in_transactions_drains_once_the_position_passes_its_commit_marker() -> None:
    """Records 0-2 then a commit marker at 3: the high watermark is 4, so ``offset + 1 >= highwater`` never
    holds for the last record; the fetch position steps over the marker and nothing after 2 was returned."""
    tp = TP("cdc", 0)
    ends = FetchEnds()
    highwater: dict[TP, int | None] = {tp: 4}
    drains = DrainTracker(highwater.get, ends.get)
    ends.update({tp: 0}, {tp: 3}, {tp: [_Record(0), _Record(1), _Record(2)]})  # the marker not fetched yet
    assert ends.get(tp) == (3, 3) and not drains.at_end(tp, 2)
    drains.note(tp, "cdc/0", 2, drained=False)
    ends.update({tp: 3}, {tp: 4}, {})  # a fetch returning nothing moved the position over the marker
    assert ends.get(tp) == (3, 4) and drains.at_end(tp, 2) and not drains.at_end(tp, 1)
    assert list(drains.found_drained()) == ["cdc/0"]
    # the next transaction: records 4-5 returned, its marker at 6; a record not yet handled (5) keeps
    # the partition from being told at 4
    highwater[tp] = 7
    ends.update({tp: 4}, {tp: 7}, {tp: [_Record(4), _Record(5)]})
    assert not drains.at_end(tp, 4) and drains.at_end(tp, 5)


def test_fetch_ends_follow_seeks_and_forget_unassigned_partitions() -> None:
    a, b = TP("cdc", 0), TP("cdc", 1)
    ends = FetchEnds()
    ends.update({a: 10}, {a: 12}, {})  # a worker restarted at its committed offset 10: a marker at 10-11
    assert ends.get(a) == (10, 12)
    ends.update({a: 12, b: 0}, {a: 12, b: 1}, {b: [_Record(0)]})
    assert ends.get(a) == (10, 12) and ends.get(b) == (1, 1)
    ends.update({a: 5}, {a: 5}, {})  # sought back to 5 (a rebalance): the data end is not past it
    assert ends.get(a) == (5, 5) and ends.get(b) is None  # b no longer assigned
    ends.update({}, {a: 9}, {})  # positioned during the fetch: unknown until the next one
    assert ends.get(a) is None
