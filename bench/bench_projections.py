"""Projection bench: apply rate of the agent-run projection through the runner against a raw COPY of the
same rows, and the rebuild rate, in one run.

Usage::

    python bench/bench_projections.py [--events N] [--batch-size B] [--small-batch-size S]

Events: ``N`` (default 1,000,000) agent events made by repeating the real runs of
``datasets/agent_runs`` under new run ids (:func:`bench.common.realistic_events`), produced to a
6-partition topic of an embedded stack (or the servers named by ``BACKBONE_*`` URLs).

Rows of the table:

* ``raw COPY``: the baseline: one row per event (event id, run id, type, event time, model, tokens, cost)
  written with ``COPY`` into a plain table, rows prepared in advance (no Kafka, no decoding).
* ``runner apply``: the agent-run projection through :class:`projections.runner.ProjectionRunner`
  (consume, decode, de-duplicate by id, fold, upsert, checkpoint in one transaction per batch), timed
  from the first committed batch to caught up (the consumer-group join wait is left out); once with
  the per-record decoder (fastavro, a dict per event) and once column-wise (:mod:`streams.columnar`,
  polars reads each schema's bodies as one Avro block; the default for this projection), the
  latter with ``--batch-size`` (default: the runner's, 20,000) and with ``--small-batch-size`` (5,000)
  records per transaction, and once more column-wise with ``--batch-size`` and the garbage collector at
  CPython's default threshold (700; the runner raises it to 10,000 while it runs), to show what that
  setting is worth.
* ``rebuild``: :func:`projections.rebuild.rebuild` of the same projection, start to swap, everything in
  (columnar, manual partition assignment).

Targets (issue 3): at least 50,000 events/s per core applied, a rebuild of 1,000,000 events in < 30 s.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import bench_stack, print_table, realistic_events
from projections.agent_runs import AgentRunsProjection
from projections.rebuild import rebuild
from projections.runner import DEFAULT_BATCH_SIZE, ProjectionRunner, RunnerStats
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde

__all__ = ["main"]


def _copy_rows(events: list) -> list[tuple]:
    rows = []
    for e in events:
        d = e.data
        rows.append((e.attributes.id, d["run_id"], e.schema, d["event_time"], d.get("model"),
                     d.get("prompt_tokens"), d.get("completion_tokens"), d.get("cost_usd")))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the bench and print the table; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="events to produce (default 1,000,000)")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"records per runner transaction (default {DEFAULT_BATCH_SIZE:,}, the runner's)",
    )
    ap.add_argument("--small-batch-size", type=int, default=5000,
                    help="records per transaction of the second columnar run (default 5,000)")  # fmt: skip
    args = ap.parse_args(argv)
    n = args.events
    serde = AvroSerde(EmbeddedRegistry())
    events = realistic_events(n)
    with bench_stack() as settings:
        topic = "bench.projections.agent"
        admin = AdminClient(settings.kafka.librdkafka())
        admin.create_topics([NewTopic(topic, 6, 1)])[topic].result(30)
        t0 = time.perf_counter()
        with EventProducer(settings.kafka, serde) as p:
            p.produce_many(topic, events)
        produce_s = time.perf_counter() - t0

        # baseline: raw COPY of one row per event into a plain table
        rows = _copy_rows(events)
        del events  # a runner process does not hold a million events (the collector would walk them)
        with psycopg.connect(settings.postgres.dsn()) as c:
            c.execute("CREATE TABLE bench_raw (event_id text, run_id text, type text, event_time timestamptz, "
                      "model text, prompt_tokens bigint, completion_tokens bigint, cost_usd float8)")  # fmt: skip
            c.commit()
            t0 = time.perf_counter()
            with c.cursor() as cur, cur.copy("COPY bench_raw FROM STDIN") as copy:
                for r in rows:
                    copy.write_row(r)
            c.commit()
            copy_s = time.perf_counter() - t0
        del rows

        # the runner
        marks: dict[str, float] = {}

        def on_batch(stats: RunnerStats) -> None:
            if "first" not in marks:
                marks["first"], marks["first_n"] = time.perf_counter(), float(stats.applied)
            marks["last"] = time.perf_counter()

        rates = {}
        default_gc = gc.get_threshold()[0]
        runs = (("per-record", False, args.batch_size, {}), ("columnar", True, args.batch_size, {}),
                ("columnar-small", True, args.small_batch_size, {}),
                ("columnar-default-gc", True, args.batch_size, {"gc_threshold": None}))  # fmt: skip
        for label, columnar, batch_size, extra in runs:
            marks.clear()
            runner = ProjectionRunner(settings, serde, AgentRunsProjection([topic]), batch_size=batch_size,
                                      on_batch=on_batch, columnar=columnar, group_id=f"bench-{label}",
                                      schema=f"proj_agent_runs_{label.replace('-', '_')}", **extra)  # fmt: skip
            stats = runner.run(until_caught_up=True, max_wait_seconds=3600)
            assert stats.applied == n, f"{label}: applied {stats.applied} of {n}"
            rates[label] = (stats.applied - marks["first_n"]) / max(marks["last"] - marks["first"], 1e-9)

        report = rebuild(settings, serde, "agent_runs", projection=AgentRunsProjection([topic]), progress=False,
                         batch_size=args.batch_size)  # fmt: skip
    print_table(
        f"projections, {n:,} agent events (produce {n / produce_s:,.0f} events/s)",
        [
            ("raw COPY (baseline)", n / copy_s, "rows/s"),
            (
                f"runner apply, per-record decode (fastavro), {args.batch_size:,}-record batches",
                rates["per-record"],
                "events/s",
            ),
            (
                f"runner apply, columnar decode (polars), {args.batch_size:,}-record batches",
                rates["columnar"],
                "events/s",
            ),
            (
                f"runner apply, columnar decode (polars), {args.small_batch_size:,}-record batches",
                rates["columnar-small"],
                "events/s",
            ),
            (
                f"runner apply, columnar, {args.batch_size:,}-record batches, collector at {default_gc} (CPython's default)",
                rates["columnar-default-gc"],
                "events/s",
            ),
            ("rebuild (start to swap)", report.events_per_second, "events/s"),
        ],
        baseline="raw COPY (baseline)",
    )

    def verdict(rate: float) -> str:
        return f"{'met' if rate >= 50_000 else 'NOT met'} ({rate:,.0f} events/s)"

    print(f"rebuild of {report.events:,} events: {report.seconds:.1f} s "
          f"(target < 30 s per 1,000,000: {'met' if report.seconds * 1_000_000 / n < 30 else 'NOT met'}); "
          f"apply target 50,000 events/s per core: {args.batch_size:,}-record batches {verdict(rates['columnar'])}, "
          f"{args.small_batch_size:,}-record batches {verdict(rates['columnar-small'])}; "
          "the runner is one process and its decoding is bound to one core by the GIL")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
