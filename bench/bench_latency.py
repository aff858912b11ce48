"""End-to-end latency (issue 16): a finished agent run's FINISHED event, acknowledged, to its run-summary
insight as a Kafka subscriber, an SSE client and PostgreSQL see it; against a bare relay in the same run.

Run: ``python -m bench --only bench_latency [--quick]`` or ``python bench/bench_latency.py [--seconds S]
[--rates 100,1000]``. It starts the embedded dev stack in a temporary directory (servers named by
``BACKBONE_*`` are used instead) and, as child processes, the run-summary worker (``backbone processors
worker``), the ``insights`` projection (``backbone projections run insights``) and the API (uvicorn). Then,
for each offered rate and each path, it produces synthetic agent runs (RunLifecycle STARTED, LlmCall,
ToolCall, LlmCall, ToolCall, RunLifecycle FINISHED; six events, a unique run id, event times set by the
bench) at that rate, in ticks of 5 ms, and times each run's FINISHED event:

* ``sched``: when the generator was due to send it (so a generator that falls behind shows as produce
  latency, not as a lower rate);
* ``ack``: when the send holding it returned (``acks=all``);
* ``kafka``: when a Kafka consumer on ``insights.runs`` (assigned, no group, ``fetch.wait.max.ms`` 10)
  received its insight;
* ``sse``: when ``GET /subscribe/insights.runs?from=latest`` delivered it (the client reads lines as
  they come);
* ``pg``: when its row in ``insights_latest`` was visible (a poll of the runs still missing every 5 ms,
  so this stage is late by up to 5 ms plus a query).

Paths: ``client``: :meth:`backbone.client.Client.send` of the tick's events (built and validated by
:meth:`Client.events` before the clock starts); ``http``: ``POST /events/{type}`` with the tick's
events (one request per run of same-type events, in order), each answered once acknowledged; ``bare``:
the baseline, raw confluent-kafka producer (linger.ms 0, acks=all) -> a bare relay process (a plain
consumer that republishes each FINISHED record, fetch.wait.max.ms 10, linger.ms 0) -> a raw consumer.
The end-to-end figure is ``ack -> sse`` for the backbone and ``ack -> relayed record seen`` for the
baseline; the ratio column divides each percentile by the baseline's at the same rate.

All observers run in this process (one clock, ``time.perf_counter``), on a 2-core shared machine with
everything else; figures are of that machine. The configured values that the stages wait on are read
from the code and printed with the shares.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import psycopg
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
EVENTS_TOPIC = "agent.events"
INSIGHTS_TOPIC = "insights.runs"
TICK_SECONDS = 0.005
PG_POLL_SECONDS = 0.005
RUN_EVENTS = 6
# The baseline's relay: a plain consumer that republishes each FINISHED record (header bench-finished).
_RELAY = """
import sys
from confluent_kafka import Consumer, Producer
boot, src, dst, group = sys.argv[1:5]
c = Consumer({"bootstrap.servers": boot, "group.id": group, "auto.offset.reset": "earliest",
              "fetch.wait.max.ms": 10, "enable.auto.commit": True})
p = Producer({"bootstrap.servers": boot, "linger.ms": 0, "acks": "all"})
c.subscribe([src])
print("relay ready", flush=True)
while True:
    m = c.poll(0.1)
    p.poll(0)
    if m is None or m.error():
        continue
    if dict(m.headers() or ()).get("bench-finished") == b"1":
        p.produce(dst, key=m.key(), value=m.value())
        p.poll(0)
"""


@dataclass(slots=True)
class Sample:
    """Times (``time.perf_counter`` seconds) of one run's FINISHED event and its insight."""

    sched: float = 0.0
    ack: float | None = None
    kafka: float | None = None
    sse: float | None = None
    pg: float | None = None


@dataclass(slots=True)
class Phase:
    """One path at one rate: its samples by run id (or entity) and what was achieved."""

    path: str
    rate: int
    samples: dict[str, Sample] = field(default_factory=dict)
    sent_events: int = 0
    send_seconds: float = 0.0


class Observers:
    """The subscribers: Kafka consumers (insights and the baseline's output), SSE, and a PostgreSQL poll.

    Each looks the key it sees up in :attr:`current` (the phase being measured, keyed by entity or by
    run id) and stamps the sample once.
    """

    def __init__(self, boot: str, pg_url: str, api: str, token: str, base_out: str) -> None:
        self.current: dict[str, Sample] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sse_ready = threading.Event()
        self.threads = [
            threading.Thread(target=self._kafka, args=(boot, INSIGHTS_TOPIC, "kafka"), daemon=True),
            threading.Thread(target=self._kafka, args=(boot, base_out, "kafka"), daemon=True),
            threading.Thread(target=self._sse, args=(api, token), daemon=True),
            threading.Thread(target=self._pg, args=(pg_url,), daemon=True),
        ]
        self.errors: list[str] = []

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(3)

    def _stamp(self, key: str, stage: str, now: float) -> None:
        s = self.current.get(key)
        if s is not None and getattr(s, stage) is None:
            setattr(s, stage, now)

    def _kafka(self, boot: str, topic: str, stage: str) -> None:
        c = Consumer({"bootstrap.servers": boot, "group.id": f"bench-latency-{uuid.uuid4()}",
                      "enable.auto.commit": False, "fetch.wait.max.ms": 10})  # fmt: skip
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_END) for p in parts])
        try:
            while not self.stop.is_set():
                m = c.poll(0.05)
                if m is None or m.error() or m.key() is None:
                    continue
                self._stamp(m.key().decode(), stage, time.perf_counter())
        finally:
            c.close()

    def _sse(self, api: str, token: str) -> None:
        try:
            with (
                httpx.Client(base_url=api, timeout=httpx.Timeout(10, read=None)) as c,
                c.stream(
                    "GET",
                    f"/subscribe/{INSIGHTS_TOPIC}",
                    params={"from": "latest"},
                    headers={"Authorization": f"Bearer {token}"},
                ) as r,  # fmt: skip
            ):
                if r.status_code != 200:
                    raise RuntimeError(f"subscribe answered {r.status_code}")
                self.sse_ready.set()
                for line in r.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith("data: "):
                        now = time.perf_counter()
                        entity = json.loads(line[6:]).get("data", {}).get("entity")
                        if entity:
                            self._stamp(entity, "sse", now)
        except Exception as exc:  # noqa: BLE001 - reported in the output
            self.errors.append(f"sse: {exc}")
            self.sse_ready.set()

    def _pg(self, pg_url: str) -> None:
        q = "SELECT entity FROM proj_insights.insights_latest WHERE kind = 'run.summary' AND entity = ANY(%s)"
        with psycopg.connect(pg_url, autocommit=True) as conn:
            while not self.stop.is_set():
                time.sleep(PG_POLL_SECONDS)
                missing = [k for k, s in list(self.current.items()) if s.ack is not None and s.pg is None]
                if not missing:
                    continue
                try:
                    rows = conn.execute(q, (missing,)).fetchall()
                except psycopg.errors.UndefinedTable:
                    continue
                now = time.perf_counter()
                for (entity,) in rows:
                    self._stamp(entity, "pg", now)


def _run_data(run_id: str, t0: datetime) -> list[tuple[str, dict[str, Any]]]:
    """The six events of one synthetic run: ``(schema, JSON datum)``; event times from ``t0`` on."""

    def at(ms: int) -> str:
        return (t0 + timedelta(milliseconds=ms)).isoformat()

    llm = {"model": "gpt-4o-mini", "prompt_tokens": 1200, "completion_tokens": 180, "cost_usd": 0.0003}
    return [
        ("sophia.agent.RunLifecycle", {"run_id": run_id, "phase": "STARTED", "event_time": at(0), "agent": "bench"}),
        ("sophia.agent.LlmCall", {"run_id": run_id, "step": 1, "event_time": at(1), **llm}),
        ("sophia.agent.ToolCall", {"run_id": run_id, "step": 1, "event_time": at(2), "command": "ls", "return_code": 0}),
        ("sophia.agent.LlmCall", {"run_id": run_id, "step": 2, "event_time": at(3), **llm}),
        ("sophia.agent.ToolCall", {"run_id": run_id, "step": 2, "event_time": at(4), "command": "pytest", "return_code": 1}),
        ("sophia.agent.RunLifecycle", {"run_id": run_id, "phase": "FINISHED", "event_time": at(5), "agent": "bench",
                                       "outcome": "RESOLVED", "exit_status": "Submitted"}),
    ]  # fmt: skip


def _generate(
    phase: Phase,
    items: list[tuple[Any, str | None]],
    send: Callable[[list[Any]], list[float] | None],
    observers: Observers,
) -> None:
    """Send ``items`` (payload, key of the sample when it is a FINISHED event) at ``phase.rate`` events/s
    in ticks of :data:`TICK_SECONDS`; stamp ``sched`` and ``ack`` of each FINISHED event (``send`` returns
    each item's acknowledgement time when it sends in several requests, else ``None``: all at its return)."""
    interval = 1.0 / phase.rate
    with observers.lock:
        observers.current = phase.samples
    start = time.perf_counter() + 0.01
    i = 0
    while i < len(items):
        now = time.perf_counter()
        due = min(len(items), int((now - start) / interval) + 1)
        if due <= i:
            time.sleep(min(TICK_SECONDS, start + i * interval - now))
            continue
        batch = items[i:due]
        acks = send([p for p, _ in batch])
        acked = time.perf_counter()
        for j, (_, key) in enumerate(batch, start=i):
            if key is not None:
                s = phase.samples[key]
                s.sched, s.ack = start + j * interval, acks[j - i] if acks else acked
        i = due
        spare = start + i * interval - time.perf_counter()
        if spare > 0:
            time.sleep(min(spare, TICK_SECONDS))
    phase.sent_events = len(items)
    phase.send_seconds = time.perf_counter() - start


def _wait_done(phase: Phase, stages: tuple[str, ...], timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if all(getattr(s, st) is not None for s in phase.samples.values() for st in stages):
            return
        time.sleep(0.05)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def _ms(values: list[float | None]) -> list[float]:
    return [v * 1000 for v in values if v is not None]


def configured_values() -> list[tuple[str, str, str]]:
    """``(stage, setting, value)`` of what each stage waits on, read from the code that sets it."""
    import faust.transport.drivers.aiokafka as drv

    from backbone.http import sse
    from core.settings import Settings
    from processors.shell import FETCH_MAX_WAIT_MS, make_faust_app
    from projections.runner import DEFAULT_BATCH_SIZE, ProjectionRunner
    from streams.producer import EventProducer

    fetch_wait = re.search(r"fetch_max_wait_ms=(\d+)", inspect.getsource(drv.AIOKafkaConsumerThread))

    with tempfile.TemporaryDirectory() as tmp:
        s = Settings(state_dir=Path(tmp))
        s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:9"})})
        conf = make_faust_app(s, "bench-conf", partitions=1, web_port=0).conf
    runner = inspect.signature(ProjectionRunner.__init__).parameters
    run_src = inspect.getsource(ProjectionRunner._run)
    pump_src = inspect.getsource(sse._Pump)
    sse_consume = re.search(r"consume_ready\(self\.consumer, (.*?)\):", pump_src)
    return [
        ("produce ack", "EventProducer linger.ms", str(inspect.signature(EventProducer.__init__).parameters["linger_ms"].default)),
        ("processor", "aiokafka fetch_max_wait_ms (faust's own)", fetch_wait.group(1) if fetch_wait else "?"),
        ("processor", "  as processors.shell sets it", str(FETCH_MAX_WAIT_MS)),
        ("processor", "faust producer_linger (s)", str(conf.producer_linger)),
        ("processor", "faust broker_commit_interval (s)", str(conf.broker_commit_interval)),
        ("processor", "faust producer_acks", str(conf.producer_acks)),
        ("projection", "runner batch_timeout_seconds (behind only)", str(runner["batch_timeout_seconds"].default)),
        ("projection", "runner batch size (CLI default)", f"{DEFAULT_BATCH_SIZE:,}"),
        ("projection", "runner fetch.wait.max.ms", _grab(run_src, r'"fetch\.wait\.max\.ms": (\d+)')),
        ("SSE", "pump consume_ready(n, first-record wait s)", sse_consume.group(1).removesuffix(")") if sse_consume else "?"),
        ("SSE", "pump fetch.wait.max.ms", str(sse.FETCH_MAX_WAIT_MS)),
    ]  # fmt: skip


def _grab(src: str, pattern: str) -> str:
    m = re.search(pattern, src)
    return m.group(1) if m else "?"


def _report(phases: list[Phase], config: list[tuple[str, str, str]], errors: list[str]) -> None:
    print(
        f"\nend-to-end latency ({os.cpu_count()} cores, Tansu, {RUN_EVENTS}-event runs, latency of each run's FINISHED event)"
    )
    base = {p.rate: p for p in phases if p.path == "bare"}
    head = f"{'path':<8}{'rate ev/s':>10}{'achieved':>10}{'runs':>6}{'seen':>6}  {'stage':<22}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'p50 x':>7}{'p95 x':>7}{'p99 x':>7}"  # fmt: skip
    print(head)
    for p in phases:
        ss = list(p.samples.values())
        achieved = p.sent_events / p.send_seconds if p.send_seconds else 0.0
        b = base.get(p.rate)
        b_e2e = _ms([s.kafka - s.ack for s in b.samples.values() if s.kafka and s.ack]) if b else []
        if p.path == "bare":
            stages = [("sched -> ack", [s.ack - s.sched for s in ss if s.ack]),
                      ("ack -> relayed seen", [s.kafka - s.ack for s in ss if s.kafka and s.ack])]  # fmt: skip
            seen = sum(1 for s in ss if s.kafka)
        else:
            stages = [
                ("sched -> ack", [s.ack - s.sched for s in ss if s.ack]),
                ("ack -> kafka insight", [s.kafka - s.ack for s in ss if s.kafka and s.ack]),
                ("ack -> SSE", [s.sse - s.ack for s in ss if s.sse and s.ack]),
                ("ack -> PG row", [s.pg - s.ack for s in ss if s.pg and s.ack]),
                ("kafka -> SSE", [s.sse - s.kafka for s in ss if s.sse and s.kafka]),
                ("kafka -> PG row", [s.pg - s.kafka for s in ss if s.pg and s.kafka]),
            ]
            seen = sum(1 for s in ss if s.sse)
        for k, (name, vals) in enumerate(stages):
            v = _ms(vals)  # type: ignore[arg-type]
            lead = f"{p.path:<8}{p.rate:>10,}{achieved:>10,.0f}{len(ss):>6}{seen:>6}" if k == 0 else " " * 40
            ratio = ""
            if name in ("ack -> SSE", "ack -> relayed seen") and b_e2e:
                ratio = "".join(f"{_pct(v, q) / _pct(b_e2e, q):>7.1f}" for q in (50, 95, 99))
            print(f"{lead}  {name:<22}{_pct(v, 50):>8.1f}{_pct(v, 95):>8.1f}{_pct(v, 99):>8.1f}{ratio}")
    print("\nshares of the mean sched -> SSE time (means add up; percentiles do not)")
    print(f"{'path':<8}{'rate':>7}{'mean ms':>9}{'produce ack':>13}{'processor':>11}{'SSE delivery':>14}   {'projection commit (kafka -> PG), mean ms':>40}")  # fmt: skip
    for p in phases:
        if p.path == "bare":
            continue
        ss = [s for s in p.samples.values() if s.ack and s.kafka and s.sse]
        if not ss:
            continue
        prod = statistics.fmean(s.ack - s.sched for s in ss)
        proc = statistics.fmean(s.kafka - s.ack for s in ss)
        deliver = statistics.fmean(s.sse - s.kafka for s in ss)
        total = prod + proc + deliver
        pgs = [s.pg - s.kafka for s in p.samples.values() if s.pg and s.kafka]
        pg_mean = f"{statistics.fmean(pgs) * 1000:.1f}" if pgs else "-"
        print(f"{p.path:<8}{p.rate:>7,}{total * 1000:>9.1f}{prod / total:>13.0%}{proc / total:>11.0%}{deliver / total:>14.0%}   {pg_mean:>40}")  # fmt: skip
    print("\nconfigured values the stages wait on")
    for stage, name, value in config:
        print(f"  {stage:<12}{name:<44}{value}")
    for e in errors:
        print(f"observer error: {e}")


def main(argv: list[str] | None = None) -> list[Phase]:
    """Run the benchmark and print the tables; return the phases measured."""

    from backbone.client import Client
    from backbone.devstack import DevStack
    from backbone.http.auth import TokenStore
    from bench.common import API_SERVE, free_port, stack_settings
    from core.settings import Settings
    from streams.catalogue import CATALOGUE

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds of load per path and rate")
    ap.add_argument("--rates", default="100,1000,5000", help="offered rates, events/s, comma-separated")
    ap.add_argument("--paths", default="bare,client,http", help="paths to measure, comma-separated")
    ap.add_argument(
        "--http-max-rate",
        type=int,
        default=100,
        help="highest rate of the http path (one sequential client holds about 140 events/s)",
    )
    args = ap.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    paths = args.paths.split(",")
    state_dir = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    procs: list[subprocess.Popen[bytes]] = []
    phases: list[Phase] = []
    with DevStack(Settings(state_dir=state_dir), state_dir=state_dir, durable=False) as info:
        settings, pg_url = stack_settings(info, state_dir, "bench_latency")
        boot = info.kafka_bootstrap
        tag = uuid.uuid4().hex[:8]
        base_in, base_out = f"bench-relay-in-{tag}", f"bench-relay-out-{tag}"
        admin = AdminClient({"bootstrap.servers": boot})
        wanted = [NewTopic(t, CATALOGUE[t].partitions, 1) for t in (EVENTS_TOPIC, INSIGHTS_TOPIC)]
        wanted += [NewTopic(base_in, CATALOGUE[EVENTS_TOPIC].partitions, 1),
                   NewTopic(base_out, CATALOGUE[INSIGHTS_TOPIC].partitions, 1)]  # fmt: skip
        for f in admin.create_topics(wanted).values():
            f.result(30)
        env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": boot, "BACKBONE_POSTGRES__URL": pg_url,
               "BACKBONE_REDIS__URL": info.redis_url, "BACKBONE_API_RATE_PER_SECOND": "1000000",
               "BACKBONE_API_BURST": "1000000", "BACKBONE_LOG_LEVEL": "WARNING", "BACKBONE_STATE_DIR": str(state_dir),
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
        port = free_port()
        logs = open(state_dir / "children.log", "wb")  # noqa: SIM115 - closed in finally
        spawn = [
            [sys.executable, "-m", "backbone", "processors", "worker", "--web-port", "0"],
            [sys.executable, "-m", "backbone", "projections", "run", "insights", "--no-read-models", "--metrics-port", "0"],
            [sys.executable, "-c", API_SERVE.format(port=port)],
            [sys.executable, "-c", _RELAY, boot, base_in, base_out, f"bench-relay-{tag}"],
        ]  # fmt: skip
        observers: Observers | None = None
        try:
            for cmd in spawn:
                procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=logs, stderr=logs))
            api = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while True:
                try:
                    if httpx.get(f"{api}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"a child process did not start; see {state_dir / 'children.log'}")
                time.sleep(0.3)
            from psycopg_pool import ConnectionPool

            pool = ConnectionPool(pg_url, min_size=1, max_size=1, open=True)
            token = TokenStore(pool).create(
                "bench", [f"produce:{EVENTS_TOPIC}", f"subscribe:{INSIGHTS_TOPIC}"]
            )[0]
            pool.close()
            observers = Observers(boot, pg_url, api, token, base_out)
            observers.start()
            observers.sse_ready.wait(30)
            client = Client(settings)
            http = httpx.Client(base_url=api, timeout=60, headers={"Authorization": f"Bearer {token}"})
            raw = Producer({"bootstrap.servers": boot, "linger.ms": 0, "acks": "all"})
            t0 = datetime(2025, 3, 1, tzinfo=UTC)

            def client_items(prefix: str, runs: int) -> list[tuple[Any, str | None]]:
                out: list[tuple[Any, str | None]] = []
                for r in range(runs):
                    rid = f"{prefix}-{r}"
                    for k, (schema, datum) in enumerate(_run_data(rid, t0 + timedelta(seconds=r))):
                        ev = client.events(schema, [datum], topic=EVENTS_TOPIC)[0]
                        out.append((ev, f"run:{rid}" if k == RUN_EVENTS - 1 else None))
                return out

            def http_items(prefix: str, runs: int) -> list[tuple[Any, str | None]]:
                return [((schema, datum), f"run:{prefix}-{r}" if k == RUN_EVENTS - 1 else None)
                        for r in range(runs)
                        for k, (schema, datum) in enumerate(_run_data(f"{prefix}-{r}", t0 + timedelta(seconds=r)))]  # fmt: skip

            def bare_items(prefix: str, runs: int) -> list[tuple[Any, str | None]]:
                serde = client.serde
                out: list[tuple[Any, str | None]] = []
                for e, key in client_items(prefix, runs):
                    rid = e.key
                    hdrs = [*e.attributes.to_headers(), ("bench-finished", b"1" if key else b"0")]
                    out.append(((rid.encode(), serde.encode(e.schema, e.data), hdrs), rid if key else None))
                return out

            def send_client(batch: list[Any]) -> None:
                client.send(EVENTS_TOPIC, batch)

            def send_http(batch: list[Any]) -> list[float]:
                acks: list[float] = []
                k = 0
                while k < len(batch):
                    schema = batch[k][0]
                    j = k
                    while j < len(batch) and batch[j][0] == schema:
                        j += 1
                    r = http.post(
                        f"/events/{schema}", params={"topic": EVENTS_TOPIC}, json=[d for _, d in batch[k:j]]
                    )
                    if r.status_code != 202:
                        raise RuntimeError(f"ingest answered {r.status_code}: {r.text[:200]}")
                    acks += [time.perf_counter()] * (j - k)
                    k = j
                return acks

            def send_bare(batch: list[Any]) -> None:
                for key, value, hdrs in batch:
                    raw.produce(base_in, key=key, value=value, headers=hdrs)
                raw.flush()

            makers = {"client": (client_items, send_client, ("sse", "pg")),
                      "http": (http_items, send_http, ("sse", "pg")),
                      "bare": (bare_items, send_bare, ("kafka",))}  # fmt: skip
            # warm-up: every path end to end once (the worker joins its group, the relay subscribes)
            for path in paths:
                make, send, stages = makers[path]
                warm = Phase(path, 50)
                items = make(f"warm-{path}-{tag}", 3)
                warm.samples = {k: Sample() for _, k in items if k}
                _generate(warm, items, send, observers)
                _wait_done(warm, stages, 90)
            for rate in rates:
                runs = max(1, int(rate * args.seconds) // RUN_EVENTS)
                for path in paths:
                    if path == "http" and rate > args.http_max_rate:
                        continue
                    make, send, stages = makers[path]
                    phase = Phase(path, rate)
                    items = make(f"{path}-{rate}-{tag}", runs)
                    phase.samples = {k: Sample() for _, k in items if k}
                    _generate(phase, items, send, observers)
                    _wait_done(phase, stages, 30)
                    phases.append(phase)
                    print(f"  measured {path} at {rate:,} events/s", flush=True)
            observers.close()
            client.close()
            http.close()
        finally:
            if observers is not None:
                observers.stop.set()
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            logs.close()
    _report(phases, configured_values(), observers.errors if observers else [])
    return phases


if __name__ == "__main__":
    main()
