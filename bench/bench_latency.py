"""End-to-end latency (issue 16): a finished agent run's FINISHED event, acknowledged, to its run-summary
insight as a Kafka subscriber, an SSE client and PostgreSQL see it; against a bare relay in the same run.

Run: ``python -m bench --only bench_latency [--quick]`` or ``python bench/bench_latency.py [--seconds S]
[--rates 100,1000] [--json]``; the highest rate held: ``python bench/bench_latency.py --max-rate
[--ladder 500,1000,2000,...] [--hold-seconds 60] [--json]`` (below). It starts the embedded dev stack in a temporary directory (servers named by
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
* ``pg``: when its row in ``insights_latest`` was visible (a poll, every 5 ms, of the runs acked and not
  yet seen, so this stage is late by up to 5 ms plus a query).

Paths: ``client``: :meth:`backbone.client.Client.send` of the tick's events (built and validated by
:meth:`Client.events` before the clock starts); ``http``: ``POST /events/{type}``, one event per request,
each answered once acknowledged, from ``--http-clients`` (16) concurrent clients (threads, one HTTP
connection each; run ``r`` on client ``r % 16``, which sends its events in order, each when due or as soon as
its previous request was answered; until 2026-12-06 one sequential client, which held about 140 events/s,
so the path was measured at 100 events/s only); ``bare``:
the baseline, raw confluent-kafka producer (linger.ms 0, acks=all) -> a bare relay process (a plain
consumer that republishes each FINISHED record, fetch.wait.max.ms 10, linger.ms 0) -> a raw consumer.
The end-to-end figure is ``ack -> sse`` for the backbone and ``ack -> relayed record seen`` for the
baseline; the ratio column divides each percentile by the baseline's at the same rate.

``--max-rate``: the highest rate held for ``--hold-seconds`` (60) with lag bounded, on the ``client``
path and on the bare relay (the baseline; ``http`` is not stepped). For each rate of ``--ladder``, in
order, alternating the two paths, each path stops at its first step not held; every step runs on a fresh
stack and children (``--same-stack``: one for all, so each step starts on the earlier steps' log). During
the hold the consumer group's lag (the run-summary worker's group ``backbone-processors`` on
``agent.events``; the relay's group, auto commit every 1 s, on its input) is sampled every
``--lag-sample-seconds`` (3): the log end from :func:`streams.offsets.end_offsets` minus the committed
offsets. :func:`judge_hold` decides from what was measured; a step is held when (1) the achieved produce
rate is at least 97 % of the offered one, (2) no lag sample in the hold's second half exceeds 5 s of input
(``lag events / offered rate``; Faust commits every 2.8 s, so a worker that keeps up reads up to that),
(3) the p95 of the end-to-end latency (``ack -> sse``; the bare relay's ``ack -> relayed seen``) of the
runs acked in the hold's last third exceeds that of its first third by at most 100 ms (a growing queue
shows as a latency that trends up), and (4) every run was seen end to end within ``--drain-seconds`` (60)
after the hold (``--rate-tolerance``, ``--max-lag-seconds``, ``--latency-growth-ms`` change the bounds).
It prints each step (with the load average, and the CPU of each process over the hold as % of a core:
Tansu, PostgreSQL with its backends, Redis, the worker, the projection, the API, the relay and this
process), the highest rate held per path and their ratio.

With ``--json`` stdout is one JSON object: ``phases`` (per path and rate: achieved rate, runs, seen, load
average, each stage's p50/p95/p99 in ms, ratios to the bare relay), ``shares``, ``config``, ``errors`` and,
with ``--max-rate``, ``max_rate`` (the criteria, each step's verdict and figures with its lag samples,
``highest_held`` per path and ``ratio``); the progress lines go to stderr. The garbage collector is frozen
over each phase (its pre-built events are not walked).

Measured 2026-12-06 (2 shared cores, the embedded stack, load average 3–5; README, "End-to-end latency"):
the highest rate held for 60 s was 1,000 events/s on the client path in two runs (2,000 not held) and 500
on the bare relay (1,000 not held), with Tansu's CPU, which grows with the log, the largest share; with the
run-summary worker on ``BatchDelivery`` (04:13–04:30, nothing else running) the client path again held 1,000
(not 2,000) for a minute, and a 15-s step at 5,000 events/s kept up (ack -> SSE p95 155 ms, 1.1x the relay).

All observers run in this process (one clock, ``time.perf_counter``), on a 2-core shared machine with
everything else; figures are of that machine. The configured values that the stages wait on are read
from the code and printed with the shares.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
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
from collections import deque
from collections.abc import Callable, Iterator, Sequence
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
              "fetch.wait.max.ms": 10, "enable.auto.commit": True,
              "auto.commit.interval.ms": 1000})
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
    start: float = 0.0  # time.perf_counter() of the first send's due time
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)  # os.getloadavg() when the phase ended


class Observers:
    """The subscribers: Kafka consumers (insights and the baseline's output), SSE, and a PostgreSQL poll.

    Each looks the key it sees up in :attr:`current` (the phase being measured, keyed by entity or by
    run id) and stamps the sample once.
    """

    def __init__(self, boot: str, pg_url: str, api: str, token: str, base_out: str) -> None:
        self.current: dict[str, Sample] = {}
        self.acked: deque[str] = deque()  # keys acked by the generator, for the PostgreSQL poll
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
        pending: dict[str, Sample] = {}
        phase: dict[str, Sample] | None = None
        with psycopg.connect(pg_url, autocommit=True) as conn:
            while not self.stop.is_set():
                time.sleep(PG_POLL_SECONDS)
                current = self.current
                if current is not phase:  # a new phase: the previous one's missing rows are given up
                    phase, pending = current, {}
                while self.acked:
                    key = self.acked.popleft()
                    s = current.get(key)
                    if s is not None and s.pg is None:
                        pending[key] = s
                if not pending:
                    continue
                try:
                    rows = conn.execute(q, (list(pending),)).fetchall()
                except psycopg.errors.UndefinedTable:
                    continue
                now = time.perf_counter()
                for (entity,) in rows:
                    self._stamp(entity, "pg", now)
                    pending.pop(entity, None)


class LagSampler:
    """A consumer group's lag on a topic, sampled in a thread: ``(time.perf_counter(), lag_events)``.

    The lag is the sum over the partitions of the log end (:func:`streams.offsets.end_offsets`: Tansu's
    ListOffsets answers too low) minus the group's committed offset (0 where it has none: the bench's
    topics are new). It samples every ``every_seconds`` from :meth:`start` and once more in :meth:`stop`.
    """

    def __init__(self, kafka: Any, group: str, topic: str, every_seconds: float) -> None:
        from streams.offsets import make_consumer

        self.kafka, self.topic, self.every = kafka, topic, every_seconds
        self.consumer = make_consumer(kafka, group)  # never subscribes: reads the group's commits only
        self.samples: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        from streams.offsets import end_offsets

        try:
            ends = end_offsets(self.kafka, self.topic, timeout_seconds=10)
            tps = self.consumer.committed([TopicPartition(self.topic, p) for p in ends], timeout=10)
        except Exception as exc:  # noqa: BLE001 - reported in the output; a missed sample is judged as such
            self.errors.append(f"lag of {self.topic}: {exc}")
            return
        committed = {tp.partition: max(tp.offset, 0) for tp in tps}
        self.samples.append(
            (time.perf_counter(), sum(max(0, end - committed.get(p, 0)) for p, end in ends.items()))
        )

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[tuple[float, int]]:
        """Stop sampling, take the last sample, close the consumer; return the samples."""
        self._stop.set()
        self._thread.join(30)
        self.sample()
        self.consumer.close()
        return self.samples


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
    phase.start = start
    acked = observers.acked if phase.path != "bare" else None  # the relay writes no PostgreSQL row
    i = 0
    while i < len(items):
        now = time.perf_counter()
        due = min(len(items), int((now - start) / interval) + 1)
        if due <= i:
            time.sleep(min(TICK_SECONDS, start + i * interval - now))
            continue
        batch = items[i:due]
        acks = send([p for p, _ in batch])
        t_acked = time.perf_counter()
        for j, (_, key) in enumerate(batch, start=i):
            if key is not None:
                s = phase.samples[key]
                s.sched, s.ack = start + j * interval, acks[j - i] if acks else t_acked
                if acked is not None:
                    acked.append(key)
        i = due
        spare = start + i * interval - time.perf_counter()
        if spare > 0:
            time.sleep(min(spare, TICK_SECONDS))
    phase.sent_events = len(items)
    phase.send_seconds = time.perf_counter() - start
    phase.load = os.getloadavg()


def _generate_lanes(
    phase: Phase,
    items: list[tuple[Any, str | None]],
    post: Callable[[Any, Any], float],
    observers: Observers,
    lanes: list[Any],
    run_events: int,
) -> None:
    """Send ``items`` (the events of consecutive runs, ``run_events`` each) at ``phase.rate`` events/s over
    ``len(lanes)`` concurrent lanes (threads, one HTTP client each, ``post(lane, payload)`` -> the time its
    answer came): run ``r`` goes to lane ``r % len(lanes)``, which sends its events one request each, in order,
    each when due (``start + j / rate`` for item ``j``) or as soon as the lane's previous request was answered
    (a lane that falls behind shows as produce latency). Stamps ``sched`` and ``ack`` of each FINISHED event.

    Raises:
        RuntimeError: a request failed (the first failure, after every lane stopped).
    """
    interval = 1.0 / phase.rate
    with observers.lock:
        observers.current = phase.samples
    start = time.perf_counter() + 0.01
    phase.start = start
    acked = observers.acked
    failures: list[BaseException] = []

    def lane_loop(k: int) -> None:
        try:
            for j in range(len(items)):
                if (j // run_events) % len(lanes) != k:
                    continue
                due = start + j * interval
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                payload, key = items[j]
                t_ack = post(lanes[k], payload)
                if key is not None:
                    sample = phase.samples[key]
                    sample.sched, sample.ack = due, t_ack
                    acked.append(key)
                if failures:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported once every lane stopped
            failures.append(exc)

    threads = [threading.Thread(target=lane_loop, args=(k,), daemon=True) for k in range(len(lanes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"an HTTP lane failed: {failures[0]}") from failures[0]
    phase.sent_events = len(items)
    phase.send_seconds = time.perf_counter() - start
    phase.load = os.getloadavg()


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


@dataclass(frozen=True, slots=True)
class HoldCriteria:
    """When a rate counts as held for a step of ``--max-rate`` (see :func:`judge_hold`).

    Attributes:
        rate_tolerance: the achieved produce rate must be at least ``offered * (1 - rate_tolerance)``.
        max_lag_seconds: bound of the consumer group's lag (log end minus committed offsets, summed over
            the partitions), in seconds of input (``lag_events / offered rate``), at every sample of the
            hold's second half. Commits come every 2.8 s (Faust's ``broker_commit_interval``) or 1 s (the
            relay's auto commit), so a group that keeps up reads up to that much.
        latency_growth_seconds: bound of (p95 of the end-to-end latency of the runs acked in the hold's
            last third) minus (the same over its first third): a queue that grows shows as a latency
            that trends up.
    """

    rate_tolerance: float = 0.03
    max_lag_seconds: float = 5.0
    latency_growth_seconds: float = 0.1


@dataclass(frozen=True, slots=True)
class HoldVerdict:
    """The decision on one step and the figures it was made on.

    Attributes:
        held: every criterion met (``reasons`` empty).
        achieved_rate: events/s the generator sent (events / seconds from the first due send to the last ack).
        lag_max_seconds: the largest lag sample of the hold's second half, seconds of input (None: no sample).
        lag_end_seconds: the last lag sample of the hold, seconds of input (None: no sample).
        p95_first_ms, p95_last_ms: p95 of the end-to-end latency (ms) of the runs acked in the first and
            the last third of the hold (nan: none).
        seen, runs: runs whose end-to-end stamp was seen, of those sent.
        reasons: one line per criterion not met.
    """

    held: bool
    achieved_rate: float
    lag_max_seconds: float | None
    lag_end_seconds: float | None
    p95_first_ms: float
    p95_last_ms: float
    seen: int
    runs: int
    reasons: tuple[str, ...]


def judge_hold(
    offered_rate: float,
    achieved_rate: float,
    hold_seconds: float,
    lag_samples: Sequence[tuple[float, int]],
    latencies: Sequence[tuple[float, float]],
    runs: int,
    criteria: HoldCriteria = HoldCriteria(),
) -> HoldVerdict:
    """Whether ``offered_rate`` was held for ``hold_seconds``, from what was measured (a pure function).

    Held when all of: (1) ``achieved_rate >= offered_rate * (1 - criteria.rate_tolerance)``; (2) at least
    one lag sample lies in the hold's second half and none there exceeds ``criteria.max_lag_seconds`` of
    input; (3) the runs acked in the first and in the last third of the hold both have latencies and the
    last third's p95 exceeds the first third's by at most ``criteria.latency_growth_seconds``; (4) every
    run sent was seen (``len(latencies) == runs``).

    Args:
        offered_rate: events/s offered (> 0).
        achieved_rate: events/s sent.
        hold_seconds: the hold's length (> 0); times below are seconds from its start.
        lag_samples: ``(t_seconds, lag_events)`` of the group, sampled during the hold.
        latencies: ``(t_ack_seconds, latency_seconds)`` of each run seen end to end.
        runs: runs sent.
        criteria: the bounds.

    Raises:
        ValueError: ``offered_rate`` or ``hold_seconds`` not positive.
    """
    if offered_rate <= 0 or hold_seconds <= 0:
        raise ValueError(
            f"offered_rate and hold_seconds must be positive, got {offered_rate}, {hold_seconds}"
        )
    reasons: list[str] = []
    floor = offered_rate * (1 - criteria.rate_tolerance)
    if achieved_rate < floor:
        reasons.append(
            f"achieved {achieved_rate:,.0f} events/s < {floor:,.0f} ({1 - criteria.rate_tolerance:.0%} of offered)"
        )
    lags = sorted(lag_samples)
    late = [lag / offered_rate for t, lag in lags if t >= hold_seconds / 2]
    lag_max = max(late) if late else None
    lag_end = lags[-1][1] / offered_rate if lags else None
    if lag_max is None:
        reasons.append("no lag sample in the hold's second half")
    elif lag_max > criteria.max_lag_seconds:
        reasons.append(
            f"lag {lag_max:.1f} s of input > {criteria.max_lag_seconds:g} s in the hold's second half"
        )
    first = [v for t, v in latencies if t < hold_seconds / 3]
    last = [v for t, v in latencies if t >= hold_seconds * 2 / 3]
    p95_first, p95_last = _pct(first, 95) * 1000, _pct(last, 95) * 1000
    if not first or not last:
        reasons.append("no latency seen in the hold's first or last third")
    elif p95_last - p95_first > criteria.latency_growth_seconds * 1000:
        reasons.append(
            f"p95 latency grew {p95_first:,.0f} -> {p95_last:,.0f} ms (first -> last third), "
            f"more than {criteria.latency_growth_seconds * 1000:g} ms"
        )
    if len(latencies) < runs:
        reasons.append(f"{runs - len(latencies)} of {runs} runs not seen")
    return HoldVerdict(not reasons, achieved_rate, lag_max, lag_end, p95_first, p95_last, len(latencies), runs,
                       tuple(reasons))  # fmt: skip


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


def _stages(p: Phase) -> list[tuple[str, list[float]]]:
    """``(stage, latencies in ms)`` of a phase, in the order of the table."""
    ss = list(p.samples.values())
    if p.path == "bare":
        raw = [("sched -> ack", [s.ack - s.sched for s in ss if s.ack]),
               ("ack -> relayed seen", [s.kafka - s.ack for s in ss if s.kafka and s.ack])]  # fmt: skip
    else:
        raw = [
            ("sched -> ack", [s.ack - s.sched for s in ss if s.ack]),
            ("ack -> kafka insight", [s.kafka - s.ack for s in ss if s.kafka and s.ack]),
            ("ack -> SSE", [s.sse - s.ack for s in ss if s.sse and s.ack]),
            ("ack -> PG row", [s.pg - s.ack for s in ss if s.pg and s.ack]),
            ("kafka -> SSE", [s.sse - s.kafka for s in ss if s.sse and s.kafka]),
            ("kafka -> PG row", [s.pg - s.kafka for s in ss if s.pg and s.kafka]),
        ]
    return [(name, _ms(vals)) for name, vals in raw]  # type: ignore[arg-type]


def phase_rows(phases: list[Phase]) -> list[dict[str, Any]]:
    """One dict per phase: ``path``, ``rate``, ``achieved`` (events/s), ``runs``, ``seen`` (end-to-end),
    ``load`` (1/5/15-minute load average at its end), ``stages`` (``{stage: {"p50_ms", "p95_ms", "p99_ms"}}``)
    and ``vs_bare`` (the end-to-end stage's percentiles over the bare relay's at the same rate, or None)."""
    base = {p.rate: p for p in phases if p.path == "bare"}
    rows = []
    for p in phases:
        ss = list(p.samples.values())
        b = base.get(p.rate)
        b_e2e = _ms([s.kafka - s.ack for s in b.samples.values() if s.kafka and s.ack]) if b else []
        stages = _stages(p)
        e2e = dict(stages)["ack -> relayed seen" if p.path == "bare" else "ack -> SSE"]
        rows.append({
            "path": p.path, "rate": p.rate,
            "achieved": round(p.sent_events / p.send_seconds, 1) if p.send_seconds else 0.0,
            "runs": len(ss), "seen": sum(1 for s in ss if (s.kafka if p.path == "bare" else s.sse)),
            "load": [round(x, 2) for x in p.load],
            "stages": {name: {f"p{q}_ms": round(_pct(v, q), 2) for q in (50, 95, 99)} for name, v in stages},
            "vs_bare": {f"p{q}": round(_pct(e2e, q) / _pct(b_e2e, q), 2) for q in (50, 95, 99)} if b_e2e else None,
        })  # fmt: skip
    return rows


def share_rows(phases: list[Phase]) -> list[dict[str, Any]]:
    """Per backbone phase, the shares of the mean sched -> SSE time: ``produce_ack`` (sched -> ack),
    ``processor`` (ack -> Kafka insight), ``sse_delivery`` (Kafka insight -> SSE), as fractions, with
    ``mean_ms`` and the projection's ``kafka_to_pg_mean_ms`` (None: no row seen)."""
    rows = []
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
        rows.append({"path": p.path, "rate": p.rate, "mean_ms": round(total * 1000, 2),
                     "produce_ack": round(prod / total, 3), "processor": round(proc / total, 3),
                     "sse_delivery": round(deliver / total, 3),
                     "kafka_to_pg_mean_ms": round(statistics.fmean(pgs) * 1000, 2) if pgs else None})  # fmt: skip
    return rows


def _report(phases: list[Phase], config: list[tuple[str, str, str]], errors: list[str]) -> None:
    print(
        f"\nend-to-end latency ({os.cpu_count()} cores, Tansu, {RUN_EVENTS}-event runs, latency of each run's FINISHED event)"
    )
    head = f"{'path':<8}{'rate ev/s':>10}{'achieved':>10}{'runs':>6}{'seen':>6}  {'stage':<22}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'p50 x':>7}{'p95 x':>7}{'p99 x':>7}  load"  # fmt: skip
    print(head)
    for row in phase_rows(phases):
        for k, (name, pc) in enumerate(row["stages"].items()):
            lead = f"{row['path']:<8}{row['rate']:>10,}{row['achieved']:>10,.0f}{row['runs']:>6}{row['seen']:>6}" if k == 0 else " " * 40  # fmt: skip
            ratio = ""
            if name in ("ack -> SSE", "ack -> relayed seen") and row["vs_bare"]:
                ratio = "".join(f"{row['vs_bare'][f'p{q}']:>7.1f}" for q in (50, 95, 99))
            load = f"  {' '.join(f'{x:.2f}' for x in row['load'])}" if k == 0 else ""
            print(
                f"{lead}  {name:<22}{pc['p50_ms']:>8.1f}{pc['p95_ms']:>8.1f}{pc['p99_ms']:>8.1f}{ratio:<21}{load}"
            )
    print("\nshares of the mean sched -> SSE time (means add up; percentiles do not)")
    print(f"{'path':<8}{'rate':>7}{'mean ms':>9}{'produce ack':>13}{'processor':>11}{'SSE delivery':>14}   {'projection commit (kafka -> PG), mean ms':>40}")  # fmt: skip
    for r in share_rows(phases):
        pg_mean = f"{r['kafka_to_pg_mean_ms']:.1f}" if r["kafka_to_pg_mean_ms"] is not None else "-"
        print(f"{r['path']:<8}{r['rate']:>7,}{r['mean_ms']:>9.1f}{r['produce_ack']:>13.0%}{r['processor']:>11.0%}{r['sse_delivery']:>14.0%}   {pg_mean:>40}")  # fmt: skip
    print("\nconfigured values the stages wait on")
    for stage, name, value in config:
        print(f"  {stage:<12}{name:<44}{value}")
    for e in errors:
        print(f"observer error: {e}")


def _report_max_rate(result: dict[str, Any]) -> None:
    c = result["criteria"]
    print(
        f"\nhighest rate held for {result['hold_seconds']:g} s (held: achieved >= {1 - c['rate_tolerance']:.0%} of offered, "
        f"group lag <= {c['max_lag_seconds']:g} s of input over the second half, p95 of the last third <= the first "
        f"third's + {c['latency_growth_seconds'] * 1000:g} ms, every run seen)"
    )  # fmt: skip
    print(f"{'path':<8}{'offered':>9}{'achieved':>10}{'held':>6}{'lag max s':>10}{'lag end s':>10}{'p95 1st ms':>11}{'p95 3rd ms':>11}{'seen/runs':>14}{'drain s':>9}  {'e2e p50 / p95 / p99 ms':<26}load 1/5/15 min")  # fmt: skip
    for st in result["steps"]:
        e2e = st["stages"]["ack -> relayed seen" if st["path"] == "bare" else "ack -> SSE"]
        pcts = " / ".join(f"{e2e[f'p{q}_ms']:.1f}" for q in (50, 95, 99))
        lm = "-" if st["lag_max_seconds"] is None else f"{st['lag_max_seconds']:.2f}"
        le = "-" if st["lag_end_seconds"] is None else f"{st['lag_end_seconds']:.2f}"
        print(f"{st['path']:<8}{st['rate']:>9,}{st['achieved']:>10,.0f}{'yes' if st['held'] else 'no':>6}{lm:>10}{le:>10}"
              f"{st['p95_first_ms']:>11.1f}{st['p95_last_ms']:>11.1f}{st['seen']:>7}/{st['runs']:<6}{st['drain_seconds']:>9.1f}  "
              f"{pcts:<26}{' '.join(f'{x:.2f}' for x in st['load'])}")  # fmt: skip
        if st.get("cpu_percent"):
            print(
                f"{'':<8}  CPU % of a core over the hold: "
                + ", ".join(
                    f"{k} {v:.0f}" for k, v in sorted(st["cpu_percent"].items(), key=lambda kv: -kv[1])
                )
            )
        for reason in st["reasons"]:
            print(f"{'':<8}  not held: {reason}")
    for path, h in result["highest_held"].items():
        top = " (the ladder's top: higher was not tried)" if h is not None and result["capped"][path] else ""
        print(f"highest held, {path}: {'none' if h is None else f'{h:,} events/s'}{top}")
    if result["ratio"] is not None:
        print(f"client / bare relay: {result['ratio']:.2f}")


@contextlib.contextmanager
def _frozen() -> Iterator[None]:
    """The objects made so far (a phase's pre-built events and samples) moved out of the garbage
    collector's reach while the phase runs, so no collection walks them (pauses of the generator and
    the observers, which would read as latency)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _step(phase: Phase, lag: list[tuple[float, int]], criteria: HoldCriteria) -> dict[str, Any]:
    """A ``--max-rate`` step's verdict (:func:`judge_hold`) and figures, as a JSON-ready dict."""
    e2e = "kafka" if phase.path == "bare" else "sse"
    latencies = [(s.ack - phase.start, getattr(s, e2e) - s.ack) for s in phase.samples.values()
                 if s.ack is not None and getattr(s, e2e) is not None]  # fmt: skip
    achieved = phase.sent_events / phase.send_seconds if phase.send_seconds else 0.0
    hold = phase.send_seconds or 1.0
    v = judge_hold(phase.rate, achieved, hold, [(t - phase.start, n) for t, n in lag], latencies,
                   len(phase.samples), criteria)  # fmt: skip
    (row,) = phase_rows([phase])
    return {"path": phase.path, "rate": phase.rate, "held": v.held, "achieved": round(achieved, 1),
            "hold_seconds": round(hold, 1),
            "lag_max_seconds": None if v.lag_max_seconds is None else round(v.lag_max_seconds, 3),
            "lag_end_seconds": None if v.lag_end_seconds is None else round(v.lag_end_seconds, 3),
            "lag_samples": [[round(t - phase.start, 2), n] for t, n in lag],
            "p95_first_ms": round(v.p95_first_ms, 2), "p95_last_ms": round(v.p95_last_ms, 2),
            "seen": v.seen, "runs": v.runs, "reasons": list(v.reasons), "load": row["load"],
            "stages": row["stages"]}  # fmt: skip


def main(argv: list[str] | None = None) -> list[Phase]:
    """Run the benchmark and print the tables (``--json``: one JSON object); return the phases measured."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds of load per path and rate")
    ap.add_argument("--rates", default="100,1000,5000", help="offered rates, events/s, comma-separated")
    ap.add_argument("--paths", default="bare,client,http", help="paths to measure, comma-separated")
    ap.add_argument("--http-max-rate", type=int, default=5000, help="highest rate of the http path")
    ap.add_argument(
        "--http-clients",
        type=int,
        default=16,
        help="concurrent HTTP clients of the http path (runs spread over them, each run's events in order)",
    )
    ap.add_argument(
        "--max-rate",
        action="store_true",
        help="instead of --rates: step the offered rate up --ladder on the client path and the bare relay "
        "(alternating), hold each step --hold-seconds, stop a path at its first step not held",
    )
    ap.add_argument(
        "--ladder", default="500,1000,2000,3000,5000,7500,10000", help="--max-rate's offered rates, events/s"
    )
    ap.add_argument(
        "--same-stack",
        action="store_true",
        help="--max-rate: every step on one stack (the log grows from step to step) instead of a fresh stack per step",
    )
    ap.add_argument("--hold-seconds", type=float, default=60.0, help="--max-rate: seconds of load per step")
    ap.add_argument(
        "--lag-sample-seconds", type=float, default=3.0, help="--max-rate: seconds between lag samples"
    )
    ap.add_argument(
        "--drain-seconds",
        type=float,
        default=60.0,
        help="longest wait after a phase or step for its last runs to be seen",
    )
    held = HoldCriteria()
    ap.add_argument(
        "--rate-tolerance", type=float, default=held.rate_tolerance, help="--max-rate: see HoldCriteria"
    )
    ap.add_argument(
        "--max-lag-seconds", type=float, default=held.max_lag_seconds, help="--max-rate: see HoldCriteria"
    )
    ap.add_argument(
        "--latency-growth-ms",
        type=float,
        default=held.latency_growth_seconds * 1000,
        help="--max-rate: see HoldCriteria",
    )
    ap.add_argument(
        "--json", action="store_true", help="print the results as JSON (stdout) instead of tables"
    )
    args = ap.parse_args(argv)
    # with --json, stdout is the JSON only (progress lines go to stderr)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        phases, steps, errors = _run(args)
    config = configured_values()
    if args.json:
        out: dict[str, Any] = {"cores": os.cpu_count(), "phases": phase_rows(phases), "shares": share_rows(phases),
                               "config": [list(c) for c in config], "errors": errors}  # fmt: skip
        if args.max_rate:
            out["max_rate"] = _max_rate_result(args, steps)
        print(json.dumps(out, indent=1))
        return phases
    if phases:
        _report(phases, config, errors)
    if args.max_rate:
        _report_max_rate(_max_rate_result(args, steps))
        for e in errors:
            print(f"error: {e}")
    return phases


def _criteria(args: argparse.Namespace) -> HoldCriteria:
    return HoldCriteria(args.rate_tolerance, args.max_lag_seconds, args.latency_growth_ms / 1000)


def _max_rate_result(args: argparse.Namespace, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The steps with, per path, the highest rate held below its first step not held."""
    ladder = [int(r) for r in args.ladder.split(",")]
    highest: dict[str, int | None] = {}
    capped: dict[str, bool] = {}
    for path in dict.fromkeys(st["path"] for st in steps):
        held = None
        for st in (st for st in steps if st["path"] == path):
            if not st["held"]:
                break
            held = st["rate"]
        highest[path], capped[path] = held, held == max(ladder)
    c, b = highest.get("client"), highest.get("bare")
    return {"hold_seconds": args.hold_seconds, "criteria": dataclasses.asdict(_criteria(args)), "steps": steps,
            "highest_held": highest, "capped": capped, "ratio": round(c / b, 3) if c and b else None}  # fmt: skip


def _run(args: argparse.Namespace) -> tuple[list[Phase], list[dict[str, Any]], list[str]]:
    """Measure what ``args`` asks for; return the phases (``--rates``), the ``--max-rate`` steps and the
    errors seen. ``--max-rate`` starts a fresh stack for each step unless ``--same-stack``."""
    paths = args.paths.split(",")
    if not args.max_rate:
        return _session(args, paths, [int(r) for r in args.rates.split(",")], [])
    skipped = [p for p in paths if p not in ("bare", "client")]
    paths = [p for p in ("bare", "client") if p in paths]
    if skipped:
        print(f"--max-rate measures the bare and client paths only; not {', '.join(skipped)}")
    ladder = [int(r) for r in args.ladder.split(",")]
    if args.same_stack:
        return _session(args, paths, [], ladder)
    steps: list[dict[str, Any]] = []
    errors: list[str] = []
    active = list(paths)
    for rate in ladder:
        for path in list(active):
            _, got, errs = _session(args, [path], [], [rate])
            steps += got
            errors += errs
            if not got or not got[-1]["held"]:
                active.remove(path)
        if not active:
            break
    return [], steps, errors


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds of each named process (PostgreSQL's with its backends); 0.0 for one
    that is gone."""
    import psutil

    out: dict[str, float] = {}
    for name, pid in pids.items():
        total = 0.0
        try:
            root = psutil.Process(pid)
            for proc in (root, *(root.children(recursive=True) if name == "postgres" else ())):
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    total += t.user + t.system
        except psutil.Error:
            pass
        out[name] = total
    return out


def _session(
    args: argparse.Namespace, paths: list[str], rates: list[int], ladder: list[int]
) -> tuple[list[Phase], list[dict[str, Any]], list[str]]:
    """One stack and its children: the ``rates`` phases on ``paths``, then the ``ladder`` steps (each path
    stops at its first step not held); return the phases, the steps and the errors seen."""
    from backbone.client import Client
    from backbone.devstack import DevStack
    from backbone.http.auth import TokenStore
    from bench.common import API_SERVE, free_port, stack_settings
    from core.settings import Settings
    from processors.run_summary.app import DEFAULT_APP_ID
    from streams.catalogue import CATALOGUE

    steps: list[dict[str, Any]] = []
    errors: list[str] = []
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
            http_lanes = [httpx.Client(base_url=api, timeout=60, headers={"Authorization": f"Bearer {token}"})
                          for _ in range(args.http_clients)]  # fmt: skip
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
                # one run's six records (the client path's bytes and headers), sent under each run's key:
                # the relay reads only the key and the bench-finished header
                template = [(client.serde.encode(e.schema, e.data),
                             [*e.attributes.to_headers(), ("bench-finished", b"1" if key else b"0")])
                            for e, key in client_items(f"{prefix}-template", 1)]  # fmt: skip
                out: list[tuple[Any, str | None]] = []
                for r in range(runs):
                    rid = f"{prefix}-{r}"
                    k = rid.encode()
                    out += [((k, value, hdrs), rid if j == RUN_EVENTS - 1 else None)
                            for j, (value, hdrs) in enumerate(template)]  # fmt: skip
                return out

            def send_client(batch: list[Any]) -> None:
                client.send(EVENTS_TOPIC, batch)

            def post_http(lane: httpx.Client, payload: tuple[str, dict[str, Any]]) -> float:
                schema, datum = payload
                r = lane.post(f"/events/{schema}", params={"topic": EVENTS_TOPIC}, json=[datum])
                if r.status_code != 202:
                    raise RuntimeError(f"ingest answered {r.status_code}: {r.text[:200]}")
                return time.perf_counter()

            def send(path: str, phase: Phase, items: list[tuple[Any, str | None]]) -> None:
                if path == "http":
                    _generate_lanes(phase, items, post_http, observers, http_lanes, RUN_EVENTS)
                else:
                    _generate(phase, items, makers[path][1], observers)

            def send_bare(batch: list[Any]) -> None:
                for key, value, hdrs in batch:
                    raw.produce(base_in, key=key, value=value, headers=hdrs)
                raw.flush()

            makers = {"client": (client_items, send_client, ("sse", "pg")),
                      "http": (http_items, None, ("sse", "pg")),
                      "bare": (bare_items, send_bare, ("kafka",))}  # fmt: skip
            # warm-up: every path end to end once (the worker joins its group, the relay subscribes)
            for path in paths:
                make, _, stages = makers[path]
                warm = Phase(path, 50)
                items = make(f"warm-{path}-{tag}", 3)
                warm.samples = {k: Sample() for _, k in items if k}
                send(path, warm, items)
                _wait_done(warm, stages, 90)
            for rate in rates:
                runs = max(1, int(rate * args.seconds) // RUN_EVENTS)
                for path in paths:
                    if path == "http" and rate > args.http_max_rate:
                        continue
                    make, _, stages = makers[path]
                    phase = Phase(path, rate)
                    items = make(f"{path}-{rate}-{tag}", runs)
                    phase.samples = {k: Sample() for _, k in items if k}
                    with _frozen():
                        send(path, phase, items)
                        _wait_done(phase, stages, args.drain_seconds)
                    phases.append(phase)
                    print(f"  measured {path} at {rate:,} events/s", flush=True)
            if ladder:
                groups = {"client": (DEFAULT_APP_ID, EVENTS_TOPIC), "bare": (f"bench-relay-{tag}", base_in)}
                pids = {**dict(zip(("worker", "projection", "api", "relay"), (p.pid for p in procs), strict=True)),
                        "tansu": info.pids.get("kafka", 0), "postgres": info.pids.get("postgres", 0),
                        "redis": info.pids.get("redis", 0), "bench": os.getpid()}  # fmt: skip
                pids = {k: v for k, v in pids.items() if v}
                active = list(paths)
                for rate in ladder:
                    for path in list(active):
                        make, _, stages = makers[path]
                        phase = Phase(path, rate)
                        t_build = time.perf_counter()
                        items = make(
                            f"max-{path}-{rate}-{tag}", max(1, int(rate * args.hold_seconds) // RUN_EVENTS)
                        )
                        phase.samples = {k: Sample() for _, k in items if k}
                        build_seconds = time.perf_counter() - t_build
                        load_before = os.getloadavg()
                        with _frozen():
                            sampler = LagSampler(settings.kafka, *groups[path], args.lag_sample_seconds)
                            sampler.start()
                            cpu0 = _cpu_seconds(pids)
                            send(path, phase, items)
                            cpu1 = _cpu_seconds(pids)
                            lag = sampler.stop()
                            t_drain = time.monotonic()
                            _wait_done(phase, stages, args.drain_seconds)
                            drain = time.monotonic() - t_drain
                        del items
                        errors += sampler.errors
                        step = _step(phase, lag, _criteria(args))
                        step.update(build_seconds=round(build_seconds, 1), drain_seconds=round(drain, 1),
                                    load_before=[round(x, 2) for x in load_before],
                                    cpu_percent={k: round(100 * (cpu1[k] - cpu0.get(k, 0.0)) / phase.send_seconds, 1)
                                                 for k in cpu1})  # fmt: skip
                        steps.append(step)
                        print(f"  {path} at {rate:,} events/s for {phase.send_seconds:.0f} s: "
                              f"{'held' if step['held'] else 'not held: ' + '; '.join(step['reasons'])} "
                              f"(load {' '.join(f'{x:.2f}' for x in phase.load)})", flush=True)  # fmt: skip
                        if not step["held"]:
                            active.remove(path)
                    if not active:
                        break
            observers.close()
            client.close()
            for lane in http_lanes:
                lane.close()
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
    return phases, steps, errors + (observers.errors if observers else [])


if __name__ == "__main__":
    main()
