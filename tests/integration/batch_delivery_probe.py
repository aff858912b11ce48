"""A worker of the shell whose topic is consumed by :class:`processors.shell.BatchDelivery`, for
``test_batch_delivery.py``.

Run as ``python batch_delivery_probe.py TOPIC APP_ID RESULT_JSON DLQ_TOPIC [PAUSE_SECONDS [PARTITIONS]]`` (a pause
after each batch's handling, default none; TOPIC's partition count, default 2) with ``BACKBONE_KAFKA__BOOTSTRAP_SERVERS``
and ``BACKBONE_STATE_DIR`` set. The app (:func:`processors.shell.make_faust_app`, committing every 0.1 s) counts
the records per key in the changelogged table ``counts`` (a :class:`processors.tables.TailRecoveringTable`) through :class:`processors.shell.TableCheckpoints`
(every 50 records or 0.2 s), in batches of at most 7 records (so a fetch's list is split), and sends a record
whose value is ``b"poison"`` to DLQ_TOPIC (:class:`processors.shell.FaustDeadLetters`, flushed before the
batch returns). Every record's effects are delivered when its checkpoint is written.

Two optional environment variables let a test order events instead of timing them: while the file named by
``BATCH_PROBE_HOLD`` exists, the pause applies (without it, it always applies) and the worker does not count as idle (a rebalance
can take longer than the idle stop), so a worker neither finishes nor stops while the test holds it; ``BATCH_PROBE_STARTED`` names a file created once the first batch has been handled. ``BATCH_PROBE_FAIL_AT``
(a record count) makes the first batch taken once that many records were handled fail, as
``BATCH_PROBE_FAIL_HOW`` says: ``raise`` (the default: ``handle`` raises before touching the records) or
``effect`` (the records are applied, and the future of their effects fails: a checkpoint that could not be
written); either crashes the app.

Each commit the consumer makes is checked against what the probe knows was delivered: an offset committed for a
partition beyond the offset after its last record whose checkpoint was written is a violation. It stops once idle
for 3 s (a clean stop: SIGTERM) and writes ``{"seen": [[partition, offset], ...] in the order handled, "commits": number of commits checked, "violations": [...]}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust

from core.settings import Settings
from processors.shell import (
    BatchDelivery,
    FaustDeadLetters,
    TableCheckpoints,
    make_faust_app,
    run_processor_worker,
)
from processors.tables import TailRecoveringTable
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde


class _Count:
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def to_dict(self) -> int:
        return self.n


@dataclass
class _Stats:
    records_count: int = 0
    last_record_monotonic: float | None = None


def main() -> None:
    topic_name, app_id, result_path, dlq_topic = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    pause_seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    partitions = int(sys.argv[6]) if len(sys.argv) > 6 else 2
    hold = Path(os.environ["BATCH_PROBE_HOLD"]) if os.environ.get("BATCH_PROBE_HOLD") else None
    started = Path(os.environ["BATCH_PROBE_STARTED"]) if os.environ.get("BATCH_PROBE_STARTED") else None
    fail_at = int(os.environ.get("BATCH_PROBE_FAIL_AT", "0"))
    fail_how = os.environ.get("BATCH_PROBE_FAIL_HOW", "raise")
    settings = Settings()
    app = make_faust_app(settings, app_id, partitions=partitions, web_port=0)
    app.conf.broker_commit_interval = 0.1
    topic = app.topic(topic_name, partitions=partitions)
    # recovered to the changelog's real end (Tansu's ListOffsets would leave out the tail: processors.tables)
    table = app.tables.add(
        TailRecoveringTable(app, kafka=settings.kafka, name="counts", default=int, beacon=app.tables.beacon,
                            partitions=partitions, schema=faust.Schema(key_serializer="json", value_serializer="json"))
    )  # fmt: skip
    checkpoints = TableCheckpoints(table, every_records=50, every_seconds=0.2)
    dead_letters = FaustDeadLetters(settings, AvroSerde(EmbeddedRegistry()), "batch-probe", dlq_topic)
    stats = _Stats()
    cache: dict[str, _Count] = {}
    seen: list[tuple[int, int]] = []
    written: dict[int, int] = {}  # partition -> offset after its last record whose checkpoint was written
    commits: list[int] = [0]
    violations: list[Any] = []

    unwritten: dict[int, int] = {}  # partition -> offset after its last record counted, not yet written
    write = checkpoints.write

    def write_and_mark() -> None:
        """The checkpoint's write, then its records noted as written, synchronously: BatchDelivery settles a
        batch (and a revocation commits it) right after the write, before a future's callbacks run, so
        noting them in a done callback left ``written`` one batch behind such a commit (a violation
        reported where there was none: [3, 105, 98], a batch of 7, in a fresh-clone check)."""
        write()
        for partition, offset in unwritten.items():
            written[partition] = max(written.get(partition, 0), offset)
        unwritten.clear()

    checkpoints.write = write_and_mark  # type: ignore[method-assign]

    async def handle(records: list[Any]) -> Any:
        failing = fail_at > 0 and stats.records_count >= fail_at
        if failing and fail_how == "raise":
            raise RuntimeError("injected: the handler failed")
        upto: dict[int, int] = {}
        for record in records:
            seen.append((record.partition, record.offset))
            upto[record.partition] = record.offset + 1
            if record.value == b"poison":
                await dead_letters.publish(record, ValueError("poison record"))
                continue
            key = record.key.decode()
            state = cache.get(key)
            if state is None:
                state = cache[key] = _Count(table.data.get(key, 0))
            state.n += 1
            checkpoints.mark(key, record.partition, state)
        if started is not None and not started.exists():
            started.touch()
        # a slow job: records still in flight when the test acts
        if pause_seconds and (hold is None or hold.exists()):
            await asyncio.sleep(pause_seconds)
        stats.records_count += len(records)
        stats.last_record_monotonic = time.monotonic()
        if failing:  # effect: applied, but their effects were not written
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(OSError("injected: the effects could not be written"))
            return failed
        for partition, offset in upto.items():  # counted now: the next checkpoint's write holds them
            unwritten[partition] = max(unwritten.get(partition, 0), offset)
        return checkpoints.record(len(records))

    BatchDelivery(app, topic, handle, flush=checkpoints.checkpoint, max_batch=7)

    @app.timer(interval=0.05)
    async def checkpoint_when_due() -> None:
        checkpoints.checkpoint_if_due()

    if hold is not None:

        @app.timer(interval=0.5)
        async def not_idle_while_held() -> None:
            if hold.exists():
                stats.last_record_monotonic = time.monotonic()

    @app.task
    async def watch_commits() -> None:
        consumer = app.consumer
        commit = consumer._commit

        async def checked(offsets: Any) -> bool:
            commits[0] += 1
            for tp, offset in offsets.items():
                if tp.topic == topic_name and offset > written.get(tp.partition, 0):
                    violations.append([tp.partition, offset, written.get(tp.partition, 0)])
            return await commit(offsets)  # type: ignore[no-any-return]

        consumer._commit = checked  # type: ignore[method-assign]

    def close() -> None:
        dead_letters.close()
        result = {"seen": seen, "commits": commits[0], "violations": violations}
        result_path.write_text(json.dumps(result))

    run_processor_worker(settings, app, processor="batch-probe", stats=stats, counters=(), close=close,
                         stop_after_idle_seconds=3.0, metrics_port=0)  # fmt: skip


if __name__ == "__main__":
    main()
