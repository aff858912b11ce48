"""Processor throughput (issue 16): the run-summary processor on the shared Faust worker shell against the
peers users would pick instead, on the same input in one run.

The input: ``--events`` real-shaped agent events (:func:`bench.common.realistic_events`, the real runs of
``datasets/agent_runs`` under new run ids; Confluent-framed Avro with CloudEvents headers) on a 6-partition
topic of the embedded Tansu, produced once before anything is timed. Each reader consumes the whole topic
from the beginning, one process each:

* ``raw confluent-kafka``: a consumer with batch ``consume(1000)`` counting records per key (the floor of
  what a Python consumer costs);
* ``plain Faust agent``: ``faust.App`` with its defaults (raw serializers), one agent counting records per
  key in a dict, no table and no output;
* ``Faust agent + table``: the same agent counting per key in a changelogged table (a table update is
  what every stateful processor pays per record);
* ``run-summary worker``: ``backbone processors worker`` (the shared worker shell: Avro decode, CloudEvents,
  de-duplication, the run-totals table, a run-summary insight sent and acknowledged per finished run);
* ``healer worker``: ``backbone processors heal`` (breakers, retries, agent health and rollback guardrails
  on every event, its state checkpointed to a changelogged table, decisions sent and written to the
  PostgreSQL + Redis read model; no rollbacks, no webhook). Issue 11's target: 0.8 of the plain Faust agent.

Rates are counted from the first record handled to the last (startup and group join excluded), and shown as
ratios to the raw consumer. Quix Streams is not in the table: it requires confluent-kafka < 2.13 and the
backbone runs 2.16. Run: ``python bench/bench_processors.py [--events N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from bench.common import ROOT, bench_stack, print_table, realistic_events
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde

__all__ = ["main"]

PARTITIONS = 6

_FAUST = """
import json, os, sys, time, faust
boot, topic, n, app_id, with_table = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
app = faust.App(app_id, broker=f"kafka://{boot}", store="memory://", key_serializer="raw", value_serializer="raw",
                consumer_auto_offset_reset="earliest", web_enabled=False, topic_partitions=6,
                broker_session_timeout=6.0, broker_heartbeat_interval=1.0, table_standby_replicas=0)
src = app.topic(topic, partitions=6, key_serializer="raw", value_serializer="raw")
table = app.Table("counts", default=int, partitions=6) if with_table else None
counts, seen, first = {}, [0], [None]

@app.agent(src, concurrency=1)
async def count(stream):
    async for event in stream.events():
        if first[0] is None:
            first[0] = time.monotonic()
        key = event.key
        if table is not None:
            table[key.decode()] += 1
        else:
            counts[key] = counts.get(key, 0) + 1
        seen[0] += 1
        if seen[0] == n:
            print(json.dumps({"records": n, "first": first[0], "last": time.monotonic()}), flush=True)
            os._exit(0)

sys.argv = [sys.argv[0], "worker", "-l", "warn"]
app.main()
"""


def _raw(boot: str, topic: str, n: int) -> float:
    c = Consumer({"bootstrap.servers": boot, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    c.subscribe([topic])
    counts: dict[bytes | None, int] = {}
    seen, first = 0, None
    deadline = time.monotonic() + 120
    try:
        while seen < n and time.monotonic() < deadline:
            for m in c.consume(1000, 1.0):
                if m.error():
                    continue
                if first is None:
                    first = time.monotonic()
                k = m.key()
                counts[k] = counts.get(k, 0) + 1
                seen += 1
        last = time.monotonic()
    finally:
        c.close()
    if seen < n or first is None:
        raise RuntimeError(f"raw consumer read {seen} of {n} records")
    return (n - 1) / (last - first)


def _faust(boot: str, topic: str, n: int, with_table: bool, env: dict[str, str]) -> float:
    app_id = f"bench-faust-{uuid.uuid4().hex[:8]}"
    done = subprocess.run([sys.executable, "-c", _FAUST, boot, topic, str(n), app_id, "1" if with_table else "0"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    # Faust's worker redirects stdout into its log (stderr): find the line wherever it went
    found = re.search(r'\{"records": .*?\}', done.stdout + done.stderr)
    if found is None:
        raise RuntimeError(f"the Faust agent did not finish: {done.stderr[-2000:]}")
    r = json.loads(found.group(0))
    return float((n - 1) / (r["last"] - r["first"]))


def _worker(boot: str, topic: str, n: int, env: dict[str, str]) -> float:
    tag = uuid.uuid4().hex[:8]
    done = subprocess.run(
        [sys.executable, "-m", "backbone", "processors", "worker", "--app-id", f"bench-worker-{tag}",
         "--events-topic", topic, "--insights-topic", f"bench-insights-{tag}", "--dlq-topic", f"bench-dlq-{tag}",
         "--partitions", str(PARTITIONS), "--web-port", "0", "--stop-after-idle", "3", "--json"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    line = next((x for x in done.stdout.splitlines() if x.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"the worker did not finish: {done.stderr[-2000:]}")
    s = json.loads(line)
    if s["records_count"] < n:
        raise RuntimeError(f"the worker handled {s['records_count']} of {n} records")
    return float((s["records_count"] - 1) / (s["last_record_monotonic"] - s["first_record_monotonic"]))


def _healer(boot: str, topic: str, n: int, env: dict[str, str]) -> float:
    tag = uuid.uuid4().hex[:8]
    done = subprocess.run(
        [sys.executable, "-m", "backbone", "processors", "heal", "--app-id", f"bench-healer-{tag}",
         "--events-topic", topic, "--config-topic", f"bench-config-{tag}", "--decisions-topic",
         f"bench-decisions-{tag}", "--acks-topic", f"bench-acks-{tag}", "--dlq-topic", f"bench-dlq-{tag}",
         "--no-rollback", "--stop-after-idle", "5", "--json"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    found = re.search(r'\{\s*"records".*\}', done.stdout, re.S)
    if found is None:
        raise RuntimeError(f"the healer did not finish: {done.stderr[-2000:]}")
    s = json.loads(found.group(0))
    if s["records"] < n:
        raise RuntimeError(f"the healer handled {s['records']} of {n} records")
    return float((s["records"] - 1) / (s["last_record_monotonic"] - s["first_record_monotonic"]))


def main(argv: list[str] | None = None) -> list[tuple[str, float, str]]:
    """Run the comparison and print the table; return its rows."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--events", type=int, default=60_000)
    args = ap.parse_args(argv)
    events = realistic_events(args.events)
    with bench_stack() as settings:
        boot = settings.kafka.bootstrap_servers
        topic = f"bench-processors-{uuid.uuid4().hex[:8]}"
        admin = AdminClient(settings.kafka.librdkafka())
        for f in admin.create_topics([NewTopic(topic, PARTITIONS, 1)]).values():
            f.result(30)
        with EventProducer(settings.kafka, AvroSerde(EmbeddedRegistry())) as producer:
            producer.produce_many(topic, events)
        env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": boot, "BACKBONE_LOG_LEVEL": "WARNING",
               "BACKBONE_POSTGRES__URL": settings.postgres.dsn(), "BACKBONE_REDIS__URL": settings.redis.dsn(),
               "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": "6000",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
        n = len(events)
        rows = [
            ("raw confluent-kafka, consume(1000), count per key", _raw(boot, topic, n), "records/s"),
            ("plain Faust agent, count per key in a dict", _faust(boot, topic, n, False, env), "records/s"),
            (
                "Faust agent, count per key in a changelogged table",
                _faust(boot, topic, n, True, env),
                "records/s",
            ),
            (
                "run-summary worker (worker shell, Avro, table, insights)",
                _worker(boot, topic, n, env),
                "records/s",
            ),
            (
                "healer worker (breakers, health, guardrails, checkpoints)",
                _healer(boot, topic, n, env),
                "records/s",
            ),
        ]
    print_table(f"processor throughput, {n:,} real-shaped agent events, 6 partitions, one process each",
                rows, rows[0][0])  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
