"""The healer on partitioned input: agent health per input partition, independent of how partitions interleave.

A worker reads its input partitions interleaved in whatever order the fetches bring them. Records of one run
are on one partition (keyed by run id) and in order there; the interleaving of partitions is not part of the
history and changes from one replay to the next. These tests feed the same partitions in several
interleavings and check that the agent-health decisions are the same (they were not while agent health was
judged against one watermark over all partitions: round-robin input raised stall warnings that no
partition's own records justified).
"""

from __future__ import annotations

import json
import random
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import realistic_events
from configuration.schemas import HealingThresholds
from processors.healing.healer import Healer, HealingConfig

PARTITIONS = 3


def _partitions(copies: int = 2) -> dict[str, list[dict[str, Any]]]:
    """The real runs, ``copies`` times, as the benches make them (:func:`bench.common.realistic_events`: copy k
    under new run ids, k times their span plus an hour later), each run's events on partition
    crc32(run id) % 3 in the order the runs were produced."""
    parts: dict[str, list[dict[str, Any]]] = {f"agent.events:{p}": [] for p in range(PARTITIONS)}
    for e in realistic_events(copies=copies):
        p = f"agent.events:{zlib.crc32(e.key.encode()) % PARTITIONS}"
        parts[p].append({"schema": e.schema, "id": e.attributes.id, "data": e.data})
    return parts


def _round_robin(parts: dict[str, list[dict[str, Any]]], rng: random.Random | None) -> list[tuple[str, Any]]:
    """Interleave the partitions, each kept in its order: one record each in turn, or (``rng``) runs of
    1-200 records from a partition picked at random."""
    pos = dict.fromkeys(parts, 0)
    out: list[tuple[str, Any]] = []
    while True:
        live = [p for p in sorted(parts) if pos[p] < len(parts[p])]
        if not live:
            return out
        for p in [rng.choice(live)] if rng else live:
            n = rng.randint(1, 200) if rng else 1
            out += [(p, e) for e in parts[p][pos[p] : pos[p] + n]]
            pos[p] += n


def _decide(order: list[tuple[str, Any]], *, partitioned: bool) -> tuple[Counter[str], Healer]:
    healer = Healer()
    seen: Counter[str] = Counter()
    for p, e in order:
        for d in healer.feed({**e, "partition": p} if partitioned else e):
            seen[json.dumps(d.as_json(), sort_keys=True, default=str)] += 1
    return seen, healer


def test_agent_health_decisions_do_not_depend_on_how_the_partitions_interleave() -> None:
    parts = _partitions()
    one_by_one = [(p, e) for p in sorted(parts) for e in parts[p]]
    orders = {
        "round robin": _round_robin(parts, None),
        **{f"random runs, seed {s}": _round_robin(parts, random.Random(s)) for s in (1, 2, 3)},
    }
    want, healer = _decide(one_by_one, partitioned=True)
    signals = Counter(json.loads(d)["details"]["signal"] for d in want)
    assert sum(want.values()) > 40 and {"loop", "runaway_tokens", "runaway_cost"} <= set(signals), signals
    for name, order in orders.items():
        got, other = _decide(order, partitioned=True)
        assert got == want, name
        assert other.status()["warnings"] == healer.status()["warnings"], name
        a, b = other.snapshot(), healer.snapshot()
        for key in ("partition_health", "partition_watermarks_us"):
            assert json.dumps(a[key], sort_keys=True) == json.dumps(b[key], sort_keys=True), (name, key)
    # the same records without their partitions: one watermark over all, and the decisions change
    plain, _ = _decide(one_by_one, partitioned=False)
    skewed, _ = _decide(orders["round robin"], partitioned=False)
    assert sum(skewed.values()) > 5 * sum(plain.values())


T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _tool(run: str, s: float, step: int, command: str, partition: str | None) -> dict[str, Any]:
    e = {"schema": "sophia.agent.ToolCall", "id": f"{run}-{step}",
         "data": {"run_id": run, "step": step, "event_time": T0 + timedelta(seconds=s), "command": command,
                  "return_code": 0, "timed_out": False}}  # fmt: skip
    return e if partition is None else {**e, "partition": partition}


def test_a_run_stalls_on_its_own_partition_s_time_not_on_another_partition_s() -> None:
    t = HealingThresholds(stall_seconds=60)
    healer = Healer(HealingConfig(t, 1))
    assert healer.feed(_tool("a", 0, 1, "ls", "p:0")) == []
    # partition 1 runs far ahead: run a's partition has not moved, so a has not stalled
    for i in range(10):
        assert healer.feed(_tool("b", 100 + 30 * i, i + 1, f"step {i}", "p:1")) == []
    # partition 0's own records pass 60 s after a's last progress: a's stall, at that event time
    [warning] = healer.feed(_tool("c", 90, 1, "ls", "p:0"))
    assert warning.details["run_id"] == "a" and warning.details["signal"] == "stall"
    assert warning.event_time == T0 + timedelta(seconds=60)
    assert healer.status()["warnings"] == [{"run_id": "a", "signal": "stall", "level": "warn", "step": 1}]


def test_a_format_2_snapshot_s_runs_move_to_their_partition_at_their_next_event() -> None:
    t = HealingThresholds(stall_seconds=60, loop_repeats=3, loop_window=10, trouble_min_step_ratio=0)
    healer = Healer(HealingConfig(t, 1))
    healer.feed_all([_tool("a", s, s + 1, "pytest", None) for s in range(2)])  # "pytest" twice: no loop yet
    snap = json.loads(json.dumps(healer.snapshot()))
    old = {k: v for k, v in snap.items() if not k.startswith("partition_")} | {"format": 2}
    restored = Healer.restore(old)
    assert list(restored.health.runs) == ["a"] and restored.partition_health == {}
    # a's third "pytest", now read from a partition: the run's history came with it, so it is a loop
    [loop] = restored.feed(_tool("a", 2, 3, "pytest", "p:0"))
    assert (loop.details["signal"], loop.details["step"]) == ("loop", 3)
    assert restored.health.runs == {} and list(restored.partition_health["p:0"].runs) == ["a"]
    again = json.loads(json.dumps(restored.snapshot()))
    assert again["format"] == 3 and list(again["partition_health"]["p:0"]["runs"]) == ["a"]
    assert Healer.restore(again).snapshot() == restored.snapshot()


def test_a_partition_read_to_its_end_follows_the_healer_s_watermark_until_its_next_record() -> None:
    t = HealingThresholds(stall_seconds=60)
    healer = Healer(HealingConfig(t, 1))
    healer.feed(_tool("a", 0, 1, "ls", "p:0"))
    healer.feed(_tool("b", 10, 1, "ls", "p:1"))
    assert healer.caught_up(["p:0"]) == []  # the healer's watermark (10 s) is not 60 s past a's progress
    # p:0 has nothing more to read: a live partition with no traffic moves with the others
    assert healer.feed(_tool("b", 40, 2, "pwd", "p:1")) == []
    [warning] = healer.feed(_tool("b", 70, 3, "id", "p:1"))
    assert (warning.details["run_id"], warning.details["signal"], warning.details["level"]) == (
        "a",
        "stall",
        "warn",
    )
    assert warning.event_time == T0 + timedelta(seconds=60)
    # a record of p:0 again: its time is its own until the worker says it is read to its end again
    assert healer.feed(_tool("c", 75, 1, "ls", "p:0")) == []
    assert healer.feed(_tool("b", 100, 4, "who", "p:1")) == []
    assert healer.feed(_tool("b", 130, 5, "df", "p:1")) == []  # a's next level (at 120 s) waits for p:0
    [again] = healer.caught_up(["p:0", "p:1"])
    assert (again.details["run_id"], again.details["level"]) == ("a", "recommend_restart")
    assert again.event_time == T0 + timedelta(seconds=120)


def test_what_caught_up_decides_depends_on_when_it_was_called_which_is_why_the_worker_holds_by_default() -> (
    None
):
    """Run a (partition 0) progresses at 0 s and 50 s; run b (partition 1) goes on to 210 s (stall_seconds
    60). Without :meth:`Healer.caught_up` (the worker's default, ``hold``) every interleaving decides the same:
    nothing, partition 0's time staying at 50 s. A live worker that found partition 0 at its end before a's
    record at 50 s was fetched (``follow``) judges a stalled at 60 s (then restart-level at 170 s); one that
    fetched it first, as a replay of the same log may, judges a stalled at 110 s (and 170 s): a different
    decision for one log."""
    t = HealingThresholds(stall_seconds=60)
    p0 = [_tool("a", 0, 1, "ls", "p:0"), _tool("a", 50, 2, "pwd", "p:0")]
    p1 = [_tool("b", 30 * i, i + 1, f"step {i}", "p:1") for i in range(8)]  # 0 .. 210 s

    def run(order: list[Any]) -> list[tuple[str, datetime]]:
        healer = Healer(HealingConfig(t, 1))
        out = []
        for item in order:
            ds = healer.caught_up([item]) if isinstance(item, str) else healer.feed(item)
            out += [(d.details["run_id"], d.event_time) for d in ds]
        return out

    assert run([*p0, *p1]) == run([*p1, *p0]) == run([p0[0], *p1[:4], p0[1], *p1[4:]]) == []
    # follow: partition 0 at its end after a's first record, its second not fetched before b reached 90 s
    live = run([p0[0], "p:0", *p1[:4], p0[1], "p:0", *p1[4:]])
    replay = run([*p0, "p:0", *p1])  # the same log, partition 0 fetched whole first
    at = [T0 + timedelta(seconds=s) for s in (60, 110, 170)]
    assert live == [("a", at[0]), ("a", at[2])] and replay == [("a", at[1]), ("a", at[2])]
