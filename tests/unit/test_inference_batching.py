"""Dynamic batching by size and wait, and the offsets committed after a batch."""

from __future__ import annotations

import pytest

from inference.batching import BatchAccumulator, offsets_to_commit


class FakeClock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_batch_closes_when_full() -> None:
    """A batch is ready as soon as it holds max_batch_size items, whatever the wait."""
    acc: BatchAccumulator[int] = BatchAccumulator(4, 10.0, clock=FakeClock())
    acc.add(range(3))
    assert not acc.ready() and acc.room == 1
    acc.add([3])
    assert acc.ready()
    assert acc.take() == [0, 1, 2, 3]
    assert len(acc) == 0 and not acc.ready()


def test_batch_closes_after_max_wait_from_first_item() -> None:
    """A partial batch is ready once max_wait_seconds have passed since its first item, not its last."""
    clock = FakeClock()
    acc: BatchAccumulator[str] = BatchAccumulator(100, 0.05, clock=clock)
    assert acc.remaining_wait_seconds() == pytest.approx(0.05)
    acc.add(["a"])
    clock.now += 0.03
    acc.add(["b"])
    assert not acc.ready()
    assert acc.remaining_wait_seconds() == pytest.approx(0.02)
    clock.now += 0.02
    assert acc.ready()
    assert acc.take() == ["a", "b"]


def test_take_keeps_overflow_with_a_fresh_clock() -> None:
    """Items beyond max_batch_size stay for the next batch, whose wait starts at the take."""
    clock = FakeClock()
    acc: BatchAccumulator[int] = BatchAccumulator(2, 1.0, clock=clock)
    acc.add(range(5))
    assert acc.take() == [0, 1]
    assert acc.items == [2, 3, 4] and acc.ready()
    clock.now += 0.5
    assert acc.take() == [2, 3]
    assert not acc.ready() and acc.remaining_wait_seconds() == pytest.approx(1.0)


def test_empty_batch_is_never_ready_even_with_zero_wait() -> None:
    """With max_wait 0 an empty accumulator is not ready, and one item is."""
    acc: BatchAccumulator[int] = BatchAccumulator(8, 0.0, clock=FakeClock())
    assert not acc.ready()
    acc.add([1])
    assert acc.ready()


def test_drop_removes_items_of_revoked_partitions() -> None:
    """drop returns the items that fail the predicate and keeps the rest in order."""
    acc: BatchAccumulator[tuple[int, int]] = BatchAccumulator(10, 1.0, clock=FakeClock())
    acc.add([(0, 1), (1, 7), (0, 2), (2, 3)])
    dropped = acc.drop(lambda item: item[0] != 0)
    assert dropped == [(0, 1), (0, 2)]
    assert acc.items == [(1, 7), (2, 3)]


@pytest.mark.parametrize(("size", "wait"), [(0, 1.0), (1, -0.1)])
def test_invalid_bounds_are_refused(size: int, wait: float) -> None:
    """A batch size below 1 or a negative wait raises ValueError."""
    with pytest.raises(ValueError):
        BatchAccumulator(size, wait)


def test_offsets_to_commit_is_next_offset_per_partition() -> None:
    """The commit per partition is the highest processed offset plus one, whatever the order."""
    positions = [("t", 1, 5), ("t", 0, 9), ("t", 1, 3), ("u", 0, 0), ("t", 0, 2)]
    assert offsets_to_commit(positions) == [("t", 0, 10), ("t", 1, 6), ("u", 0, 1)]
    assert offsets_to_commit([]) == []
