"""Processor throughput (issue 16): the run-summary processor on the shared Faust worker shell against the
peers users would pick instead, on the same input in one run.

The input: ``--events`` real-shaped agent events (:func:`bench.common.realistic_events`, the real runs of
``datasets/agent_runs`` under new run ids; Confluent-framed Avro with CloudEvents headers) on a 6-partition
topic of the embedded Tansu, produced once before anything is timed. Each reader consumes the whole topic
from the beginning, one process each:

* ``raw confluent-kafka``: a consumer with batch ``consume(1000)`` counting records per key (the floor of
  what a Python consumer costs);
* ``Quix Streams``, twice (``bench/quix_count.py``, run by ``.venv-quix/bin/python``: Quix Streams pins
  confluent-kafka < 2.13 and the backbone runs 2.16, so it has a virtualenv of its own, made by ``make
  bench-quix-venv``, a prerequisite of ``make bench``): ``app.dataframe(topic).apply(...)`` counting per key in
  a dict, and counting per key in Quix's state (``apply(..., stateful=True)``: RocksDB with a changelog
  topic, the peer of a changelogged Faust table). Keys and values are read as bytes. Without the virtualenv
  the two rows say so and are skipped;
* ``plain Faust agent``: ``faust.App`` with its defaults (raw serializers), one agent counting records per
  key in a dict, no table and no output, on the workers' event loop (``BACKBONE_EVENT_LOOP``, uvloop by
  default: :mod:`core.eventloop`) and on the other; the column "to plain Faust (same loop)" divides by the
  first;
* ``Faust agent + table``: the same agent counting per key in a changelogged table (a table update is
  what every stateful processor pays per record);
* ``worker shell, count per key``, twice (``bench/shell_count.py``): the same job as ``Faust agent + table`` and
  Quix with state on the shared worker shell (:func:`processors.shell.make_faust_app` and its defaults, under
  :func:`processors.shell.run_processor_worker`), the counts written to a changelogged table by
  :class:`processors.shell.TableCheckpoints` (every 1,000 records or 0.2 s), a record done once the checkpoint
  holding its count is written, in order: ``per event`` through Faust's agent with
  :class:`processors.shell.InOrderAcks`, and ``BatchDelivery`` (:class:`processors.shell.BatchDelivery`: each
  fetch's records handed over in lists, offsets committed up to the written checkpoints). The second is issue
  16's "worker shell" figure. Its rate counts from the first record taken from a fetch; at 30,000 records
  aiokafka has prefetched most of the topic by then and the whole job takes some 50 ms, so the figure says
  how fast the records are handled, not how fast the broker delivers them: run ``--events 150000`` for a rate
  bound by the fetch;
* ``run-summary worker``: ``backbone processors worker`` (the shared worker shell: Avro decode, CloudEvents,
  de-duplication, the run-totals table, a run-summary insight sent and acknowledged per finished run; on
  :class:`processors.shell.BatchDelivery` since 2026-12-06);
* ``healer worker``: ``backbone processors heal`` (breakers, retries, agent health and rollback guardrails
  on every event, its state checkpointed to a changelogged table, decisions sent and written to the
  PostgreSQL + Redis read model; no rollbacks, no webhook). Issue 11's target: 0.8 of the plain Faust agent.

Rates are counted from the first record handled to the last (startup and group join excluded; the Quix rows
to the return of ``app.run()``, so that Quix's final checkpoint, where it writes its state and changelog, is
counted), and shown as ratios to the raw consumer and to both Quix Streams rows (issue 16's target: the worker
shell at 0.5 of Quix Streams on the same job).
The topic is created with an explicit ``retention.ms`` (Kafka's default, 7 days): Tansu's DescribeConfigs
answers only the configs a topic was created with, and Quix Streams' ``derive_topic_config`` needs
``retention.ms`` of the input topic to make a changelog topic (``KeyError: 'retention.ms'`` otherwise).
Run: ``python bench/bench_processors.py [--events N] [--quix-python PATH]``; issue 11's comparison alone, the
healer of each checkout against the plain Faust agent, round by round, with CPU µs per record:
``python bench/bench_processors.py --events 30000 --healer-rounds 3 [--healer-checkout PATH ...]``.

Last measured (``--events 60000``, three runs on 2026-12-04, 2 shared cores at load average 1.8–3.3, rows move
by up to 3x between runs), records/s per run: raw 147,474 / 251,419 / 187,892; Quix Streams in a dict 51,478 /
88,077 / 88,181, with state 26,347 / 26,100 / 47,733; plain Faust 6,483 / 2,422 / 7,252, with a table 1,823 /
1,701 / 1,127; run-summary worker 1,190 / 2,541 / 1,543 (0.045 / 0.097 / 0.032 of Quix with state: issue 16's
0.5 is not met, 5–16x short); healer 1,404 / 1,613 / 1,574 (0.053 / 0.062 / 0.033 of Quix with state).
Issue 11's comparison alone (``--events 30000 --healer-rounds 3``, the healer of main at d5f31c2 and of the
healer-speed2 branch, 2026-12-05, two runs, load average 0.8–2.1), per round: plain Faust 12,008 / 11,660 /
14,207 and 10,312 / 14,139 / 15,433 records/s (CPU 83 / 88 / 67 and 96 / 69 / 67 µs per record); healer
before 0.46 / 0.45 / 0.51 and 0.49 / 0.43 / 0.48 of Faust (175 / 183 / 139 and 180 / 159 / 137 µs), after
0.68 / 0.75 / 0.66 and 0.80 / 0.71 / 0.69 (118 / 111 / 104 and 112 / 94 / 91 µs). 0.8 is reached in one
round of six. Then (2026-12-05) ``make_faust_app`` gave every processor app the healer's
``EagerSeekingConsumer`` and ``QuietMonitor`` by default, and ``run_processor_worker`` ``gc.freeze()`` once the worker is up: the same
``--events 30000`` command from main's checkout (76f9a60) and from the branch's, alternating (main, branch,
four times, 22:28-22:49 UTC, load average 0.8-4.2, the branch's first run beside integration tests), run-summary
worker before 7,281 / 7,771 / 6,951 / 6,202 records/s against plain Faust at 8,624 / 14,216 / 12,845 / 12,444
(**0.84 / 0.55 / 0.54 / 0.50**), after 4,835 / 9,518 / 8,125 / 9,092 against 8,309 / 11,721 / 11,711 / 12,552
(**0.58 / 0.81 / 0.69 / 0.72**; 0.58 beside the tests, where Faust with a table also fell to 0.20).
2026-12-06, the shell's ``BatchDelivery`` (``--events 30000``, two runs, load average 1.1-2.2), records/s: Quix with
state 30,538 / 32,205; the shell's counting job per event 6,976 / 11,998, on ``BatchDelivery`` 587,763 / 909,138
(handling of prefetched records, see its row above); run-summary worker (on ``BatchDelivery``) 9,215 / 17,141
(**0.30 / 0.53 of Quix with state**); plain Faust 4,492 / 7,587. At 150,000 records (the same commands from a driver
script that is not committed, one topic): Quix with state 31,895, the counting job on ``BatchDelivery`` 83,162 (**2.6x Quix with state**), run-summary
worker of main 5,371 / 5,475 and of the branch 15,449 / 15,299 (0.48 / 0.48 of Quix with state).
``python bench/bench_processors.py --events 150000`` on main after the merge (2026-12-06 01:34 UTC, load average
1.8-2.3, other work running): Quix with state 31,523, the counting job on ``BatchDelivery`` 52,009 (**1.65x**), per
event 8,846 (0.28), run-summary worker 10,433 (0.33), plain Faust 7,113 (0.23).
2026-12-06, the healer on ``BatchDelivery`` (``--events 30000 --healer-rounds 3 --healer-checkout <main 95edd64>
--healer-checkout <healer-batch>``, two runs, 01:36 and 01:40 UTC, load average 1.7-8.7 and 1.7-2.8), per round:
plain Faust 5,927 / 5,689 / 5,230 and 7,451 / 7,712 / 7,801 records/s (CPU 133 / 138 / 134 and 138 / 128 / 125 µs
per record); main's healer (agent path) 0.52 / 0.58 / 0.69 and 0.68 / 0.71 / 0.70 of Faust (204 / 194 / 184 and
191 / 178 / 181 µs); the healer on ``BatchDelivery`` 9,152 / 7,496 / 5,756 and 12,947 / 12,966 / 13,406 records/s,
**1.54 / 1.32 / 1.10 and 1.74 / 1.68 / 1.72 of Faust** (77 / 77 / 78 and 72 / 70 / 71 µs): issue 11's 0.8 met in
all six rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from rich.console import Console
from rich.table import Table

from bench.common import ROOT, bench_stack, realistic_events
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde

__all__ = ["main"]

PARTITIONS = 6
QUIX_PYTHON = ROOT / ".venv-quix" / "bin" / "python"
"""The interpreter of the Quix Streams virtualenv (``make bench-quix-venv``)."""
RAW = "raw confluent-kafka, consume(1000), count per key"
QUIX_PLAIN = "Quix Streams, count per key in a dict"
QUIX_STATE = "Quix Streams, count per key in state (RocksDB + changelog)"
KAFKA_DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000

FAUST_COUNT = """
import json, os, sys, time, faust
boot, topics, n, app_id = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]
with_table, exit_delay = sys.argv[5] == "1", float(sys.argv[6])
app = faust.App(app_id, broker=f"kafka://{boot}", store="memory://", key_serializer="raw", value_serializer="raw",
                consumer_auto_offset_reset="earliest", web_enabled=False, topic_partitions=6,
                broker_session_timeout=6.0, broker_heartbeat_interval=1.0, table_standby_replicas=0)
src = app.topic(*topics, partitions=6 if len(topics) == 1 else None, key_serializer="raw", value_serializer="raw")
table = app.Table("counts", default=int, partitions=6) if with_table else None
counts, seen, first, first_cpu = {}, [0], [None], [None]

@app.agent(src, concurrency=1)
async def count(stream):
    async for event in stream.events():
        if first[0] is None:
            first[0], first_cpu[0] = time.monotonic(), time.process_time()
        key = event.key
        if table is not None:
            table[key.decode()] += 1
        else:
            counts[key] = counts.get(key, 0) + 1
        seen[0] += 1
        if seen[0] == n:
            print(json.dumps({"records": n, "first": first[0], "last": time.monotonic(), "first_cpu": first_cpu[0],
                              "last_cpu": time.process_time()}), flush=True)
            time.sleep(exit_delay)  # a parent sampling our memory takes its last sample
            os._exit(0)

sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]  # the worker CLI would bind port 6066
app.main()
"""
"""``python -c`` source of the plain Faust agent: argv ``boot topics(comma-separated) n app_id with_table(0/1)
exit_delay_seconds``; counts records per key (in a changelogged table when ``with_table``) and prints
``{"records", "first", "last", "first_cpu", "last_cpu"}`` (``time.monotonic()``, ``time.process_time()``) once it
has counted ``n``, then exits after the delay.
Also run by ``bench/bench_incidents.py``; :func:`faust_count_source` runs it on a chosen event loop."""

_UVLOOP_POLICY = "import asyncio, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())\n"


def faust_count_source(loop: str) -> str:
    """:data:`FAUST_COUNT` on ``loop``: ``"uvloop"`` sets uvloop's event loop policy first (as the workers'
    shell does under ``BACKBONE_EVENT_LOOP=uvloop``, :mod:`core.eventloop`), ``"asyncio"`` leaves asyncio's."""
    return (_UVLOOP_POLICY if loop == "uvloop" else "") + FAUST_COUNT


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


def _faust(
    boot: str, topic: str, n: int, with_table: bool, env: dict[str, str], loop: str = "asyncio"
) -> float:
    return _faust_run(boot, topic, n, with_table, env, loop)[0]


def _faust_run(
    boot: str, topic: str, n: int, with_table: bool, env: dict[str, str], loop: str = "asyncio"
) -> tuple[float, float]:
    """``(records/s, CPU microseconds per record)`` of the plain Faust agent on ``loop``, first to last record."""
    app_id = f"bench-faust-{uuid.uuid4().hex[:8]}"
    done = subprocess.run([sys.executable, "-c", faust_count_source(loop), boot, topic, str(n), app_id, "1" if with_table else "0", "0"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    # Faust's worker redirects stdout into its log (stderr): find the line wherever it went
    found = re.search(r'\{"records": .*?\}', done.stdout + done.stderr)
    if found is None:
        raise RuntimeError(f"the Faust agent did not finish: {done.stderr[-2000:]}")
    r = json.loads(found.group(0))
    return float((n - 1) / (r["last"] - r["first"])), 1e6 * (r["last_cpu"] - r["first_cpu"]) / (n - 1)


def _quix(boot: str, topic: str, n: int, mode: str, python: Path) -> float:
    """Records/s of ``bench/quix_count.py`` in MODE ``plain`` or ``state``, run by ``python`` (the Quix
    Streams virtualenv's interpreter).

    Raises:
        FileNotFoundError: no such interpreter (``make bench-quix-venv`` makes ``.venv-quix``).
        RuntimeError: the script did not count ``n`` records.
        subprocess.TimeoutExpired: it ran 600 s.
    """
    if not python.exists():
        raise FileNotFoundError(f"{python} missing: make bench-quix-venv")
    with tempfile.TemporaryDirectory(prefix="bench-quix-") as state_dir:
        done = subprocess.run(
            [str(python), str(ROOT / "bench" / "quix_count.py"), boot, topic, str(n),
             f"bench-quix-{uuid.uuid4().hex[:8]}", mode, state_dir, "300"],
            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    found = re.search(r'\{"records": .*?\}', done.stdout)
    r = json.loads(found.group(0)) if found else None
    if r is None or r["records"] < n or r["first"] is None:
        raise RuntimeError(
            f"Quix Streams ({mode}) did not count {n} records: {done.stdout[-500:]} {done.stderr[-2000:]}"
        )
    # to the return of app.run(): its final checkpoint (the state's RocksDB write and changelog) included
    return float((n - 1) / (r["done"] - r["first"]))


def _shell_count(boot: str, topic: str, n: int, env: dict[str, str], mode: str) -> float:
    """Records/s of ``bench/shell_count.py`` (the counting job on the worker shell) in MODE ``events`` (Faust's
    per-record path, acked in order) or ``batches`` (:class:`processors.shell.BatchDelivery`)."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "shell_count.py"), boot, topic, str(n),
                           f"bench-shell-{uuid.uuid4().hex[:8]}", mode],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    found = re.search(r'\{"records": .*?\}', done.stdout + done.stderr)
    if found is None:
        raise RuntimeError(f"the shell's counting job ({mode}) did not finish: {done.stderr[-2000:]}")
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
    return _healer_run(boot, topic, n, env)[0]


def _healer_run(
    boot: str, topic: str, n: int, env: dict[str, str], root: Path = ROOT
) -> tuple[float, float, int]:
    """``(records/s, CPU microseconds per record, decisions made)`` of ``backbone processors heal`` run from
    checkout ``root`` (its own code on ``PYTHONPATH``), first to last record."""
    tag = uuid.uuid4().hex[:8]
    env = {**env, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "backbone", "processors", "heal", "--app-id", f"bench-healer-{tag}",
         "--events-topic", topic, "--config-topic", f"bench-config-{tag}", "--decisions-topic",
         f"bench-decisions-{tag}", "--acks-topic", f"bench-acks-{tag}", "--dlq-topic", f"bench-dlq-{tag}",
         "--no-rollback", "--stop-after-idle", "5", "--json"],
        env=env, cwd=root, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    found = re.search(r'\{\s*"records".*\}', done.stdout, re.S)
    if found is None:
        raise RuntimeError(f"the healer did not finish: {done.stderr[-2000:]}")
    s = json.loads(found.group(0))
    if s["records"] < n:
        raise RuntimeError(f"the healer handled {s['records']} of {n} records")
    rate = float((s["records"] - 1) / (s["last_record_monotonic"] - s["first_record_monotonic"]))
    cpu = s.get("last_record_cpu"), s.get("first_record_cpu")  # None: a checkout from before these fields
    per_record = math.nan if None in cpu else 1e6 * (cpu[0] - cpu[1]) / (s["records"] - 1)
    return rate, per_record, int(s["decisions"])


def _ratio(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _print(title: str, rows: list[tuple[str, float, str]], faust: str | None = None) -> None:
    """The rows with their ratios to the raw consumer, to both Quix Streams rows ("-" where not run) and to
    row ``faust`` (the plain Faust agent on the workers' event loop) when given."""
    rate = {name: r for name, r, _ in rows}
    bases = [("ratio to raw", rate[RAW]), ("to Quix (state)", rate.get(QUIX_STATE, math.nan)),
             ("to Quix (dict)", rate.get(QUIX_PLAIN, math.nan))]  # fmt: skip
    if faust is not None:
        bases.append(("to plain Faust (same loop)", rate.get(faust, math.nan)))
    t = Table(title=title)
    for c in ("path", "rate", "unit", *(b for b, _ in bases)):
        t.add_column(c, justify="left" if c in ("path", "unit") else "right")
    for name, r, unit in rows:
        t.add_row(name, "-" if math.isnan(r) else f"{r:,.0f}", unit, *(_ratio(r / b) for _, b in bases))
    console = Console()
    console.width = max(console.width, 170)
    console.print(t)


def _healer_rounds(
    boot: str, topic: str, n: int, env: dict[str, str], rounds: int, checkouts: list[Path]
) -> list[tuple[str, float, str]]:
    """Issue 11's throughput target alone: ``rounds`` rounds, each the plain Faust agent (counting per key in
    a dict) then ``backbone processors heal`` of each checkout in ``checkouts`` (its own code: compare a
    change with the code before it, alternating, on the same topic), one process at a time. Printed per
    run: records/s, decisions made and CPU microseconds per record (``time.process_time()`` of the whole
    process, first to last record), and both as ratios to the plain Faust agent of the same round: records/s over Faust's,
    and Faust's CPU per record over the healer's (the rate ratio at equal CPU, steadier than wall rates
    when other work shares the cores). Returns ``(path, records/s, unit)`` rows."""
    rows: list[tuple[str, float, str]] = []
    t = Table(title=f"healer vs plain Faust, {n:,} real-shaped agent events, 6 partitions, {rounds} rounds")
    for c in (
        "round",
        "path",
        "records/s",
        "CPU µs/record",
        "rate / Faust",
        "Faust CPU / CPU",
        "decisions",
        "load",
    ):
        t.add_column(c, justify="left" if c == "path" else "right")
    from core.eventloop import resolve
    from core.settings import Settings

    loop = resolve(Settings().event_loop)  # the healer's loop (BACKBONE_EVENT_LOOP): Faust runs on it too
    for r in range(rounds):
        f_rate, f_cpu = _faust_run(boot, topic, n, False, env, loop)
        rows.append((f"round {r}: plain Faust agent", f_rate, "records/s"))
        t.add_row(
            str(r),
            "plain Faust agent",
            f"{f_rate:,.0f}",
            f"{f_cpu:.0f}",
            "1",
            "1",
            "-",
            f"{os.getloadavg()[0]:.1f}",
        )
        for root in checkouts:
            h_rate, h_cpu, made = _healer_run(boot, topic, n, env, root)
            rows.append((f"round {r}: healer {root}", h_rate, "records/s"))
            t.add_row(str(r), f"healer ({root})", f"{h_rate:,.0f}", f"{h_cpu:.0f}", _ratio(h_rate / f_rate),
                      _ratio(f_cpu / h_cpu), f"{made:,}", f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    console = Console()
    console.width = max(console.width, 170)
    console.print(t)
    return rows


def main(argv: list[str] | None = None) -> list[tuple[str, float, str]]:
    """Run the comparison and print the table; return its rows ``(path, records/s, unit)``, a rate of NaN
    for a Quix Streams row that could not run (the unit says why)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--quix-python", type=Path, default=QUIX_PYTHON,
                    help="the Quix Streams virtualenv's python (default: .venv-quix/bin/python)")  # fmt: skip
    ap.add_argument("--healer-rounds", type=int, default=0,
                    help="only issue 11's comparison: N rounds of the plain Faust agent then the healer of each "
                         "--healer-checkout, on the one topic (see _healer_rounds)")  # fmt: skip
    ap.add_argument(
        "--healer-checkout",
        type=Path,
        action="append",
        help="a checkout whose healer to run in --healer-rounds (repeat; default: this one)",
    )
    args = ap.parse_args(argv)
    events = realistic_events(args.events)
    with bench_stack() as settings:
        boot = settings.kafka.bootstrap_servers
        topic = f"bench-processors-{uuid.uuid4().hex[:8]}"
        admin = AdminClient(settings.kafka.librdkafka())
        # retention.ms given explicitly: Tansu reports only the configs a topic was created with, and Quix
        # Streams derives its changelog topic from the input topic's retention.ms
        new = NewTopic(topic, PARTITIONS, 1, config={"retention.ms": str(KAFKA_DEFAULT_RETENTION_MS)})
        for f in admin.create_topics([new]).values():
            f.result(30)
        with EventProducer(settings.kafka, AvroSerde(EmbeddedRegistry())) as producer:
            producer.produce_many(topic, events)
        env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": boot, "BACKBONE_LOG_LEVEL": "WARNING",
               "BACKBONE_POSTGRES__URL": settings.postgres.dsn(), "BACKBONE_REDIS__URL": settings.redis.dsn(),
               "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": "6000",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
        n = len(events)
        if args.healer_rounds:
            return _healer_rounds(boot, topic, n, env, args.healer_rounds, args.healer_checkout or [ROOT])
        rows: list[tuple[str, float, str]] = [(RAW, _raw(boot, topic, n), "records/s")]
        for name, mode in ((QUIX_PLAIN, "plain"), (QUIX_STATE, "state")):
            try:
                rows.append((name, _quix(boot, topic, n, mode, args.quix_python), "records/s"))
            except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"{name}: not run: {exc}", file=sys.stderr)
                reason = (
                    "not run: no venv (make bench-quix-venv)"
                    if isinstance(exc, FileNotFoundError)
                    else "failed (stderr)"
                )
                rows.append((name, math.nan, reason))
        # the workers run on BACKBONE_EVENT_LOOP's loop (uvloop by default): the Faust rows run on that loop too,
        # and the plain agent also on the other one
        from core.eventloop import resolve

        loop = resolve(settings.event_loop)
        other = "asyncio" if loop == "uvloop" else "uvloop"
        faust = f"plain Faust agent, count per key in a dict ({loop})"
        rows += [
            (
                faust,
                _faust(boot, topic, n, False, env, loop),
                "records/s",
            ),
            (
                f"plain Faust agent, count per key in a dict ({other})",
                _faust(boot, topic, n, False, env, other),
                "records/s",
            ),
            (
                f"Faust agent, count per key in a changelogged table ({loop})",
                _faust(boot, topic, n, True, env, loop),
                "records/s",
            ),
            (
                f"worker shell, count per key in a changelogged table, per event, acked in order ({loop})",
                _shell_count(boot, topic, n, env, "events"),
                "records/s",
            ),
            (
                f"worker shell, count per key in a changelogged table, BatchDelivery ({loop})",
                _shell_count(boot, topic, n, env, "batches"),
                "records/s",
            ),
            (
                f"run-summary worker (worker shell, Avro, table, insights; {loop})",
                _worker(boot, topic, n, env),
                "records/s",
            ),
            (
                f"healer worker (breakers, health, guardrails, checkpoints; {loop})",
                _healer(boot, topic, n, env),
                "records/s",
            ),
        ]
    _print(
        f"processor throughput, {n:,} real-shaped agent events, 6 partitions, one process each", rows, faust
    )
    return rows


if __name__ == "__main__":
    main()
