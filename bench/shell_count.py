"""The counting job of ``bench/bench_processors.py`` on the shared Faust worker shell (:mod:`processors.shell`).

The same job as the Quix Streams "with state" row and the "Faust agent + table" row: count the records per key
in a changelogged table. Here the app is :func:`processors.shell.make_faust_app` with the shell's defaults
(eager consumer, quiet monitor, ``gc.freeze()`` once up: it runs under :func:`processors.shell.run_processor_worker`),
the counts are written to the table ``counts`` (JSON keys and values) by :class:`processors.shell.TableCheckpoints`
(every :data:`CHECKPOINT_RECORDS` records or :data:`CHECKPOINT_SECONDS`), and a record counts as done once
the checkpoint that wrote its count is written, in order. MODE:

* ``events``: Faust's per-record path, an agent over ``stream.noack()`` whose events are acked in order by
  :class:`processors.shell.InOrderAcks` once their checkpoint is written (as the run-summary worker does);
* ``batches``: :class:`processors.shell.BatchDelivery`: the records go from each fetch to the job in lists,
  and the offsets committed are those whose checkpoint was written.

Usage: ``shell_count.py BOOTSTRAP TOPIC N APP_ID MODE`` (settings otherwise from ``BACKBONE_*``). Prints one JSON
line ``{"records", "first", "last", "first_cpu", "last_cpu"}`` (``time.monotonic()`` of the first record
handled and of the N-th record done, ``time.process_time()`` at both) once N records are done, then exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHECKPOINT_RECORDS = 1000
"""Records after which the changed counts are written (the run-summary worker's value)."""
CHECKPOINT_SECONDS = 0.2
"""The longest a record waits for its checkpoint (a timer writes it; the run-summary worker's value)."""


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


def main(argv: list[str]) -> None:
    boot, topic_name, n, app_id, mode = argv[0], argv[1], int(argv[2]), argv[3], argv[4]
    os.environ["BACKBONE_KAFKA__BOOTSTRAP_SERVERS"] = boot
    from core.settings import Settings
    from processors.shell import (
        BatchDelivery,
        InOrderAcks,
        TableCheckpoints,
        make_faust_app,
        run_processor_worker,
    )

    settings = Settings()
    app = make_faust_app(settings, app_id, partitions=6, web_port=0)
    source = app.topic(topic_name, partitions=6)
    import faust

    table = app.Table("counts", default=int, partitions=6,
                      schema=faust.Schema(key_serializer="json", value_serializer="json"))  # fmt: skip
    checkpoints = TableCheckpoints(table, every_records=CHECKPOINT_RECORDS, every_seconds=CHECKPOINT_SECONDS)
    cache: dict[str, _Count] = {}
    first: list[float] = []
    first_cpu: list[float] = []
    done = [0]

    def count(key: str, partition: int) -> None:
        state = cache.get(key)
        if state is None:
            state = cache[key] = _Count(table.data.get(key, 0))
        state.n += 1
        checkpoints.mark(key, partition, state)

    def delivered(k: int) -> None:
        done[0] += k
        if done[0] >= n:
            print(json.dumps({"records": done[0], "first": first[0], "last": time.monotonic(),
                              "first_cpu": first_cpu[0], "last_cpu": time.process_time()}), flush=True)  # fmt: skip
            os._exit(0)

    if mode == "events":
        acks = InOrderAcks(max_inflight=2 * CHECKPOINT_RECORDS + 10, on_delivered=lambda _: delivered(1))

        async def handle(event: Any) -> tuple[Any, None]:
            if not first:
                first.append(time.monotonic())
                first_cpu.append(time.process_time())
            message = event.message
            count(message.key.decode(), message.partition)
            return checkpoints.record(), None

        @app.agent(source, concurrency=1)
        async def counter(stream: Any) -> None:
            await acks.consume(stream, handle)

        acks.settle_every(app, 0.05)
    elif mode == "batches":

        async def handle_batch(records: list[Any]) -> Any:
            for record in records:
                count(record.key.decode(), record.partition)
            future = checkpoints.record(len(records))
            future.add_done_callback(lambda _, k=len(records): delivered(k))
            return future

        class _Timed(BatchDelivery):
            """Counts from the first record taken from a fetch (the fetch loop runs ahead of the job's task)."""

            def put(self, tp: Any, records: list[Any]) -> None:
                if not first:
                    first.append(time.monotonic())
                    first_cpu.append(time.process_time())
                super().put(tp, records)

        _Timed(app, source, handle_batch, flush=checkpoints.checkpoint)
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    @app.timer(interval=0.05)
    async def checkpoint_when_due() -> None:
        checkpoints.checkpoint_if_due()

    run_processor_worker(settings, app, processor="bench-shell-count", stats=_Stats(), counters=(),
                         close=lambda: None, metrics_port=0, loglevel="WARNING")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
