"""The worker shell's batch path (:class:`processors.shell.BatchDelivery`) against real Tansu: every record is
handled exactly once and in per-partition order, no committed offset is ever beyond a record whose effects
(its table checkpoint) were written, a restarted worker resumes from the committed offsets without loss or
repetition (its table recovered from the changelog), a poison record goes to the dead-letter topic, and a second
worker joining mid-stream takes partitions over (revocation drains the first worker's batches before its commit)
with nothing lost and no commit past a written checkpoint in either worker; a worker killed (SIGKILL) mid-stream
is resumed from its committed offsets without loss; a batch that fails (its handler raises, or its effects'
future fails) crashes the worker without committing it, and a restart redoes it.

The worker is ``batch_delivery_probe.py`` (a subprocess: a Faust worker owns its process's event loop and
signals); see its docstring.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from core.settings import Settings
from streams.offsets import end_offsets
from tests.support import changelog_values, committed_offsets

PROBE = Path(__file__).with_name("batch_delivery_probe.py")


def _wait_for(condition: Callable[[], bool], timeout_seconds: float, what: str, procs: list[Any]) -> None:
    """Poll ``condition`` every 0.2 s until it holds; when ``timeout_seconds`` pass first, or a worker of
    ``procs`` exits first, kill the workers still running and fail with ``what``."""
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        exited = [p for p in procs if p.poll() is not None]
        if exited or time.monotonic() >= deadline:
            _kill(procs)
            detail = (
                f"a worker exited early (exit code {exited[0].returncode}): "
                + ((exited[0].stderr.read() if exited[0].stderr else "") or "")[-3000:]
                if exited
                else f"not within {timeout_seconds} s"
            )
            raise AssertionError(f"{what}: {detail}")
        time.sleep(0.2)


def _kill(procs: list[Any]) -> None:
    """SIGKILL the workers of ``procs`` still running (a failed test leaves none behind)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    """The probe's environment: this one, the broker and its session timeout, quiet logs, and ``extra``."""
    return {
        **os.environ,
        "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "BACKBONE_LOG_LEVEL": "WARNING",
        **extra,
    }


def _resumes_without_loss(
    settings: Settings, topic: str, app_id: str, dlq: str, tmp_path: Path,
    records: list[tuple[int, str, bytes]], committed: dict[int, int],
) -> None:  # fmt: skip
    """A worker started after an earlier one stopped at ``committed`` handles the rest of ``topic`` from
    those offsets, once each and in order, with no commit past a written checkpoint; the changelog counts
    every record of ``records`` at least once (what the earlier worker checkpointed after its last commit is
    counted again); everything ends committed."""
    ends = end_offsets(settings.kafka, topic)
    again = _run(settings, topic, app_id, dlq, tmp_path, tmp_path / "again.json")

    start = {p: max(o, 0) for p, o in committed.items()}
    _in_order(again["seen"], start, ends)  # from the committed offsets: the rest, once, in order
    assert again["violations"] == [], again["violations"]
    counts = _changelog(settings, f"{app_id}-counts-changelog")
    expected = Counter(k for _, k, _ in records)
    assert set(counts) == set(expected) and all(counts[k] >= n for k, n in expected.items()), (
        counts,
        expected,
    )
    assert _committed(settings, app_id, topic) == ends


def _run(
    settings: Settings, topic: str, app_id: str, dlq: str, state_dir: Path, result: Path
) -> dict[str, Any]:
    env = _env(settings, BACKBONE_STATE_DIR=str(state_dir))
    proc = subprocess.run([sys.executable, str(PROBE), topic, app_id, str(result), dlq], env=env, check=False,
                          capture_output=True, text=True, timeout=150)  # fmt: skip
    assert proc.returncode == 0 and result.exists(), proc.stderr[-3000:]
    return json.loads(result.read_text())  # type: ignore[no-any-return]


def _produce(settings: Settings, topic: str, records: list[tuple[int, str, bytes]]) -> None:
    producer = Producer(settings.kafka.librdkafka())
    for partition, key, value in records:
        producer.produce(topic, key=key.encode(), value=value, partition=partition)
    assert producer.flush(10) == 0


def _committed(settings: Settings, group: str, topic: str, partitions: int = 2) -> dict[int, int]:
    return committed_offsets(settings.kafka, group, topic, partitions)


def _changelog(settings: Settings, topic: str) -> dict[str, int]:
    """The table as its changelog holds it (the last value of each key, JSON keys and values): what a
    restarted worker recovers. (The worker's own table is not read at its stop: Faust's recovery applies the
    changelog records it still buffers when the partitions are revoked.)"""
    return {
        json.loads(key): json.loads(value)
        for key, value in changelog_values(settings.kafka, topic).items()
        if value is not None
    }


def _in_order(seen: list[list[int]], start: dict[int, int], end: dict[int, int]) -> None:
    for partition in (0, 1):
        offsets = [o for p, o in seen if p == partition]
        assert offsets == list(range(start[partition], end[partition])), (partition, offsets[:20])


def test_batches_are_handled_once_in_order_committed_after_their_effects_and_resumed_after_a_restart(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = create_topic(unique_name("batch-in"), partitions=2)
    dlq = create_topic(unique_name("batch-dlq"), partitions=1)
    app_id = unique_name("batch-app")
    # a key always in the same partition (a table's changelog partition is its input partition)
    first = [(i % 13 % 2, f"k{i % 13}", b"v") for i in range(403)]
    first[101] = (first[101][0], first[101][1], b"poison")
    _produce(settings, topic, first)

    one = _run(settings, topic, app_id, dlq, tmp_path, tmp_path / "one.json")

    ends = end_offsets(settings.kafka, topic)
    _in_order(one["seen"], {0: 0, 1: 0}, ends)
    assert one["violations"] == [] and one["commits"] > 0, one["violations"]
    expected = Counter(k for _, k, v in first if v != b"poison")
    assert _changelog(settings, f"{app_id}-counts-changelog") == dict(expected)
    assert _committed(settings, app_id, topic) == ends
    letters = end_offsets(settings.kafka, dlq)
    assert sum(letters.values()) == 1

    second = [(3 * i % 13 % 2, f"k{3 * i % 13}", b"v") for i in range(211)]
    _produce(settings, topic, second)
    two = _run(settings, topic, app_id, dlq, tmp_path, tmp_path / "two.json")

    new_ends = end_offsets(settings.kafka, topic)
    _in_order(two["seen"], ends, new_ends)  # from the committed offsets on: nothing lost, nothing repeated
    assert two["violations"] == [], two["violations"]
    expected.update(k for _, k, _ in second)
    # the table recovered from its changelog, then counted the new records
    assert _changelog(settings, f"{app_id}-counts-changelog") == dict(expected)
    assert _committed(settings, app_id, topic) == new_ends


def test_a_second_worker_joining_mid_stream_takes_over_partitions_without_loss_or_early_commits(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = create_topic(unique_name("batch-rebalance"), partitions=4)
    dlq = create_topic(unique_name("batch-rebalance-dlq"), partitions=1)
    app_id = unique_name("batch-rebalance-app")
    records = [(i % 17 % 4, f"k{i % 17}", b"v") for i in range(2400)]
    _produce(settings, topic, records)
    env = _env(settings)
    results = [tmp_path / "a.json", tmp_path / "b.json"]
    hold = tmp_path / "hold"
    hold.touch()  # 0.2 s after each batch of 7 while it exists: the first worker cannot finish 2,400 records in 60 s
    procs = []
    for name, result in zip("ab", results, strict=True):
        state = tmp_path / name
        state.mkdir()
        started = tmp_path / f"{name}.started"
        procs.append(subprocess.Popen([sys.executable, str(PROBE), topic, app_id, str(result), dlq, "0.2", "4"],
                                      env={**env, "BACKBONE_STATE_DIR": str(state), "BATCH_PROBE_HOLD": str(hold),
                                           "BATCH_PROBE_STARTED": str(started)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))  # fmt: skip
        # the first worker handles records before the second starts; the second has taken partitions over
        # (the rebalance done, records handled) before the hold is lifted and both finish
        _wait_for(started.exists, 90, f"worker {name} handled no record", procs)
    hold.unlink()
    try:
        outs = [p.communicate(timeout=150)[1] for p in procs]
    finally:
        _kill(procs)
    assert all(p.returncode == 0 for p in procs) and all(r.exists() for r in results), [
        o[-2000:] for o in outs
    ]
    a, b = (json.loads(r.read_text()) for r in results)

    assert a["violations"] == [] and b["violations"] == [], (a["violations"], b["violations"])
    assert a["seen"] and b["seen"], "the second worker took no partition"
    ends = end_offsets(settings.kafka, topic)
    every = {(p, o) for p, end in ends.items() for o in range(end)}
    assert {(p, o) for p, o in a["seen"] + b["seen"]} == every  # nothing lost
    for seen in (a["seen"], b["seen"]):  # each partition's records in order within each worker's run of it
        for partition in range(4):
            offsets = [o for p, o in seen if p == partition]
            assert all(y == x + 1 or y <= x for x, y in itertools.pairwise(offsets)), offsets[:50]
    assert _committed(settings, app_id, topic, partitions=4) == ends
    counts = _changelog(settings, f"{app_id}-counts-changelog")
    expected = Counter(k for _, k, _ in records)
    # at least once: a record handled by the first worker after its last commit is handled again by the second
    assert set(counts) == set(expected) and all(counts[k] >= n for k, n in expected.items()), (
        counts,
        expected,
    )


def test_a_worker_killed_mid_stream_is_resumed_from_its_committed_offsets_without_loss(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = create_topic(unique_name("batch-kill"), partitions=2)
    dlq = create_topic(unique_name("batch-kill-dlq"), partitions=1)
    app_id = unique_name("batch-kill-app")
    records = [(i % 11 % 2, f"k{i % 11}", b"v") for i in range(1500)]
    _produce(settings, topic, records)
    env = _env(settings, BACKBONE_STATE_DIR=str(tmp_path))
    hold = tmp_path / "hold"
    hold.touch()  # 0.2 s after each batch of 7 while it exists: over 40 s for the 1,500 records
    killed = subprocess.Popen([sys.executable, str(PROBE), topic, app_id, str(tmp_path / "killed.json"), dlq, "0.2"],
                              env={**env, "BATCH_PROBE_HOLD": str(hold)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    # killed (SIGKILL) once it has committed something, mid-stream
    _wait_for(lambda: sum(max(o, 0) for o in _committed(settings, app_id, topic).values()) > 0, 90,
              "the worker committed nothing", [killed])  # fmt: skip
    killed.kill()
    hold.unlink()
    killed.wait(10)
    committed = _committed(settings, app_id, topic)
    ends = end_offsets(settings.kafka, topic)
    assert 0 < sum(max(o, 0) for o in committed.values()) < sum(ends.values()), (committed, ends)

    _resumes_without_loss(settings, topic, app_id, dlq, tmp_path, records, committed)


@pytest.mark.parametrize("how", ["raise", "effect"])
def test_a_failed_batch_crashes_the_worker_without_committing_it_and_a_restart_redoes_it(
    settings: Settings,
    unique_name: Callable[[str], str],
    create_topic: Callable[..., str],
    tmp_path: Path,
    how: str,
) -> None:
    """A ``handle`` that raises, or a batch whose effects' future fails: the worker stops on its own with a
    non-zero exit (it does not hang), nothing from the failed batch on is committed (no commit past a written
    checkpoint), and a restarted worker handles the rest once each, from the committed offsets."""
    topic = create_topic(unique_name(f"batch-fail-{how}"), partitions=2)
    dlq = create_topic(unique_name(f"batch-fail-{how}-dlq"), partitions=1)
    app_id = unique_name(f"batch-fail-{how}-app")
    records = [(i % 11 % 2, f"k{i % 11}", b"v") for i in range(700)]
    _produce(settings, topic, records)
    env = _env(
        settings, BACKBONE_STATE_DIR=str(tmp_path), BATCH_PROBE_FAIL_AT="300", BATCH_PROBE_FAIL_HOW=how
    )
    # 0.01 s after each batch of 7: the checkpoints (every 50 records or 0.2 s) are written before the failure
    failing = subprocess.run([sys.executable, str(PROBE), topic, app_id, str(tmp_path / "failed.json"), dlq, "0.01"],
                             env=env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert failing.returncode != 0, failing.stderr[-3000:]
    assert "injected" in failing.stderr, failing.stderr[-3000:]
    # written at every stop, a crash's included (run_processor_worker's close)
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["violations"] == [], failed["violations"]
    committed = _committed(settings, app_id, topic)
    ends = end_offsets(settings.kafka, topic)
    # at most the records handled before the failing batch (300 to 306: batches of up to 7)
    assert sum(max(o, 0) for o in committed.values()) <= 306 < sum(ends.values()), (committed, ends)

    _resumes_without_loss(settings, topic, app_id, dlq, tmp_path, records, committed)
