"""``processors.shell.Checkpoints`` and ``TableCheckpoints``: a future per checkpoint, done only once the write
returned; written after ``every_records`` records, when due by time, or when asked; failed when abandoned."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from processors.shell import Checkpoints, TableCheckpoints


def test_the_future_is_done_only_after_the_write_of_its_records() -> None:
    writes: list[int] = []

    async def run() -> None:
        checkpoints = Checkpoints(
            lambda: writes.append(checkpoints.records), every_records=5, every_seconds=3600
        )
        assert checkpoints.record(0) is None and not checkpoints.pending  # nothing counted, nothing pending
        first = checkpoints.record(3)
        assert first is not None and not first.done() and writes == [] and checkpoints.pending
        assert checkpoints.record(0) is first  # nothing new: the pending future
        assert checkpoints.record(2) is first and first.done() and writes == [5]  # 5 counted: written
        second = checkpoints.record(1)
        assert second is not None and second is not first and not second.done()
        checkpoints.checkpoint_if_due()  # not due yet (1 hour)
        assert not second.done()
        checkpoints.checkpoint()  # before a revocation or stop
        assert second.done() and writes == [5, 1] and not checkpoints.pending

    asyncio.run(run())


def test_a_checkpoint_is_due_once_the_oldest_record_waited_every_seconds() -> None:
    async def run() -> None:
        checkpoints = Checkpoints(lambda: None, every_records=1000, every_seconds=0.05)
        future = checkpoints.record(1)
        assert future is not None
        checkpoints.checkpoint_if_due()
        assert not future.done()
        time.sleep(0.06)
        checkpoints.checkpoint_if_due()
        assert future.done()

    asyncio.run(run())


def test_a_failed_write_leaves_the_future_pending_and_abandon_fails_it() -> None:
    def fail() -> None:
        raise OSError("disk full")

    async def run() -> None:
        checkpoints = Checkpoints(fail, every_records=2, every_seconds=3600)
        future = checkpoints.record(1)
        assert future is not None
        with pytest.raises(OSError, match="disk full"):
            checkpoints.record(1)  # the second record: a checkpoint, whose write fails
        assert not future.done() and checkpoints.pending  # its records are not committable
        checkpoints.abandon(RuntimeError("state recovered over them"))
        assert future.done() and isinstance(future.exception(), RuntimeError) and not checkpoints.pending

    asyncio.run(run())


class _Table:
    def __init__(self) -> None:
        self.changelog: list[tuple[int, Any, Any]] = []
        self.data: dict[Any, Any] = {}

    def send_changelog(self, partition: int, key: Any, value: Any, **serializers: Any) -> None:
        self.changelog.append((partition, key, value))
        self.serializers = serializers


class _State:
    def __init__(self, n: int | None) -> None:
        self.n = n

    def to_dict(self) -> int | None:
        return self.n


def test_table_checkpoints_write_each_marked_key_once_to_its_last_input_partition() -> None:
    table = _Table()

    async def run() -> None:
        checkpoints = TableCheckpoints(table, every_records=3, every_seconds=3600)
        a = _State(1)
        checkpoints.mark("a", 0, a)
        first = checkpoints.record()
        a.n = 2
        checkpoints.mark("a", 1, a)  # the newest mark wins
        checkpoints.record()
        checkpoints.mark("b", 0, _State(7))
        assert not first.done() and table.changelog == []
        assert checkpoints.record() is first and first.done()
        assert table.changelog == [(1, "a", 2), (0, "b", 7)] and table.data == {"a": 2, "b": 7}
        with pytest.raises(ValueError, match="at least 1"):
            checkpoints.record(0)

    asyncio.run(run())


def test_a_state_of_none_is_written_as_a_tombstone() -> None:
    """``to_dict()`` None deletes the key: a raw None value on the changelog (a Kafka tombstone, not JSON
    ``null``) and the key gone from the table's data (the correlation worker's retention)."""
    table = _Table()
    table.data["a"] = 1

    async def run() -> None:
        checkpoints = TableCheckpoints(table, every_records=1, every_seconds=3600)
        checkpoints.mark("a", 2, _State(None))
        assert checkpoints.record().done()

    asyncio.run(run())
    assert table.changelog == [(2, "a", None)] and table.data == {}
    assert table.serializers == {"value_serializer": "raw"}
