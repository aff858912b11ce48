"""Shared parts of the decision-latency benches (``bench_route_latency``, issue 13; ``bench_heal_latency``,
issue 11): an acknowledged input record to the decision it causes, as a Kafka subscriber sees it.

Both start the embedded dev stack (:class:`backbone.devstack.DevStack`) in a temporary directory with a
database of their own, run the worker under test and the bare relay of :mod:`bench.bench_latency` as
child processes, produce with one raw confluent-kafka producer (``linger.ms`` 0, ``acks=all``, each
5 ms tick's records flushed together, so ``ack`` is when the tick's flush returned) through
:func:`bench.bench_latency._generate`, and stamp arrivals with :class:`Subscriber` threads (assigned
partitions from the end, no group membership, ``fetch.wait.max.ms`` 10), all on one
``time.perf_counter`` clock. This module holds the stack, the children, the subscriber, the percentile
summary (:func:`summarise`) and the rich table.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console
from rich.table import Table

from bench.bench_latency import _RELAY as RELAY_SOURCE
from bench.bench_latency import Phase, Sample, _generate, _wait_done
from bench.common import stack_settings

__all__ = [
    "RELAY_SOURCE",
    "CounterPoller",
    "Phase",
    "Sample",
    "Stack",
    "Subscriber",
    "Tracker",
    "add_worker_options",
    "backbone_command",
    "create_topics",
    "diagnostic_note",
    "durations_ms",
    "generate",
    "metrics_url",
    "parse_metrics",
    "pct",
    "print_rows",
    "relay_command",
    "scrape_metrics",
    "stack",
    "summarise",
    "wait_done",
    "worker_prelude",
]

ROOT = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``; NaN when empty (same rule as bench_latency)."""
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def summarise(
    pairs: list[tuple[float | None, float | None]], baseline_ms: list[float] | None = None
) -> dict[str, Any]:
    """Percentiles of the durations ``end - start`` (seconds) of the pairs where both are known.

    Returns:
        ``{"n", "missing", "p50_ms", "p95_ms", "p99_ms"}`` and, with ``baseline_ms`` (durations of the
        baseline in ms), ``"ratio_p50"``, ``"ratio_p95"``, ``"ratio_p99"`` (this percentile over the
        baseline's; NaN when either side is empty). A negative duration is kept (it shows a clock or
        matching error rather than being hidden).
    """
    ms = [(e - s) * 1000 for s, e in pairs if s is not None and e is not None]
    out: dict[str, Any] = {"n": len(ms), "missing": len(pairs) - len(ms)}
    for q in (50, 95, 99):
        out[f"p{q}_ms"] = pct(ms, q)
        if baseline_ms is not None:
            b = pct(baseline_ms, q)
            out[f"ratio_p{q}"] = out[f"p{q}_ms"] / b if ms and baseline_ms and b > 0 else float("nan")
    return out


def durations_ms(pairs: list[tuple[float | None, float | None]]) -> list[float]:
    """``(end - start) * 1000`` of the pairs where both are known."""
    return [(e - s) * 1000 for s, e in pairs if s is not None and e is not None]


@dataclass(slots=True)
class Tracker:
    """What :func:`bench.bench_latency._generate` and the subscribers share: the phase being measured
    (``current``: sample key -> :class:`Sample`, whose ``kafka`` is the first arrival) and extra stamps
    by sample key and stage name (``extra``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    current: dict[str, Sample] = field(default_factory=dict)
    extra: dict[str, dict[str, float]] = field(default_factory=dict)

    def stamp(self, key: str, stage: str, now: float) -> None:
        """Stamp ``stage`` of ``key`` once (``kafka``: the sample's own field; others: :attr:`extra`)."""
        s = self.current.get(key)
        if s is None:
            return
        if stage == "kafka":
            if s.kafka is None:
                s.kafka = now
            return
        self.extra.setdefault(key, {}).setdefault(stage, now)


class Subscriber(threading.Thread):
    """A Kafka subscriber of ``topic``: every partition assigned from its end (no group membership,
    ``fetch.wait.max.ms`` 10); each record's ``match(key, value)`` gives the ``(sample key, stage)``
    pairs it stamps in ``tracker`` at its arrival (``time.perf_counter``)."""

    def __init__(
        self,
        boot: str,
        topic: str,
        tracker: Tracker,
        match: Callable[[bytes | None, bytes | None], list[tuple[str, str]]],
    ) -> None:
        super().__init__(daemon=True, name=f"subscriber-{topic}")
        self.boot, self.topic, self.tracker, self.match = boot, topic, tracker, match
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        c = Consumer({"bootstrap.servers": self.boot, "group.id": f"bench-decision-{uuid.uuid4()}",
                      "enable.auto.commit": False, "fetch.wait.max.ms": 10})  # fmt: skip
        try:
            parts = c.list_topics(self.topic, timeout=10).topics[self.topic].partitions
            c.assign([TopicPartition(self.topic, p, OFFSET_END) for p in parts])
            self.ready.set()
            while not self.stop.is_set():
                m = c.poll(0.05)
                if m is None or m.error():
                    continue
                now = time.perf_counter()
                for key, stage in self.match(m.key(), m.value()):
                    self.tracker.stamp(key, stage, now)
        except Exception as exc:  # noqa: BLE001 - reported in the output
            self.errors.append(f"{self.topic}: {exc}")
            self.ready.set()
        finally:
            c.close()


def generate(phase: Phase, items: list[tuple[Any, str | None]], producer: Producer, tracker: Tracker) -> None:
    """Produce ``items`` (``((topic, key, value, headers), sample key or None)``) at ``phase.rate``
    records/s in 5 ms ticks, each tick flushed (``acks=all``); ``sched`` and ``ack`` of each sample."""

    def send(batch: list[Any]) -> None:
        for topic, key, value, headers in batch:
            producer.produce(topic, key=key, value=value, headers=headers)
        producer.flush()

    tracker.extra = {}
    _generate(phase, items, send, tracker)  # type: ignore[arg-type]  # duck-typed: lock and current


def wait_done(phase: Phase, timeout_seconds: float) -> None:
    """Wait until every sample of ``phase`` was seen (``kafka``) or ``timeout_seconds`` passed."""
    _wait_done(phase, ("kafka",), timeout_seconds)


def create_topics(boot: str, topics: dict[str, int]) -> None:
    """Create ``{name: partitions}`` (replication 1) on the broker.

    Raises:
        confluent_kafka.KafkaException: the broker refused one (an existing one included).
    """
    admin = AdminClient({"bootstrap.servers": boot})
    for f in admin.create_topics([NewTopic(t, n, 1) for t, n in topics.items()]).values():
        f.result(30)


@dataclass(slots=True)
class Stack:
    """The running embedded stack: ``boot`` (Kafka bootstrap), ``pg_url`` (a fresh database),
    ``settings`` pointing at both and Redis, ``env`` for the children, ``state_dir``."""

    boot: str
    pg_url: str
    redis_url: str
    settings: Any
    env: dict[str, str]
    state_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[BinaryIO] = field(default_factory=list)

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``cmd`` (run in the repository root) with stdout in ``<state_dir>/<name>.out`` and stderr
        in ``<state_dir>/<name>.log``."""
        out = open(self.state_dir / f"{name}.out", "wb")  # noqa: SIM115 - closed by stack()
        err = open(self.state_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed by stack()
        self.logs += [out, err]
        p = subprocess.Popen(cmd, env=env or self.env, cwd=ROOT, stdout=out, stderr=err)
        self.procs.append(p)
        return p

    def check_children(self) -> None:
        """Raises RuntimeError when a child has exited."""
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"child {p.args!r} exited {p.returncode}; logs in {self.state_dir}")


@contextlib.contextmanager
def stack(prefix: str) -> Iterator[Stack]:
    """The embedded dev stack in a new temporary directory with a database of its own; its children are
    stopped (SIGTERM, then SIGKILL after 20 s) when the block ends, and the directory is removed unless
    the block raised (then it holds the children's logs)."""

    from backbone.devstack import DevStack
    from core.settings import Settings

    state_dir = Path(tempfile.mkdtemp(prefix=prefix))
    keep = False
    with DevStack(Settings(state_dir=state_dir), state_dir=state_dir, durable=False) as info:
        settings, pg_url = stack_settings(info, state_dir, prefix.strip("-").replace("-", "_"))
        env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": info.kafka_bootstrap, "BACKBONE_POSTGRES__URL": pg_url,
               "BACKBONE_REDIS__URL": info.redis_url, "BACKBONE_LOG_LEVEL": "WARNING", "BACKBONE_STATE_DIR": str(state_dir),
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
        s = Stack(info.kafka_bootstrap, pg_url, info.redis_url, settings, env, state_dir)
        try:
            yield s
        except BaseException:
            keep = True
            raise
        finally:
            for p in s.procs:
                if p.poll() is None:
                    p.terminate()
            for p in s.procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            for f in s.logs:
                f.close()
    if not keep:
        shutil.rmtree(state_dir, ignore_errors=True)


def relay_command(boot: str, src: str, dst: str, tag: str) -> list[str]:
    """The bare relay of :mod:`bench.bench_latency` (records with header ``bench-finished: 1`` from
    ``src`` republished to ``dst``, key and value only)."""
    return [sys.executable, "-c", RELAY_SOURCE, boot, src, dst, f"bench-relay-{tag}"]


def backbone_command(args: list[str], prelude: str | None = None) -> list[str]:
    """``python -m backbone <args>``; with ``prelude`` (Python statements), the same CLI run after them in
    that process (a diagnostic: e.g. ``processors.shell.PRODUCER_LINGER_SECONDS`` changed for that worker
    only; the shared code is not changed)."""
    if prelude is None:
        return [sys.executable, "-m", "backbone", *args]
    code = f"{prelude}\nimport runpy\nrunpy.run_module('backbone', run_name='__main__', alter_sys=True)"
    return [sys.executable, "-c", code, *args]


def worker_prelude(linger_ms: float | None = None, fetch_wait_ms: int | None = None) -> str | None:
    """The :func:`backbone_command` prelude of the diagnostic options: the workers' producer linger
    (``processors.shell.PRODUCER_LINGER_SECONDS``, shipped 5 ms) and their stream consumer's fetch wait
    (``processors.shell.FETCH_MAX_WAIT_MS``, shipped 100 ms) set for that worker; None when both are None."""
    lines = []
    if linger_ms is not None:
        lines.append(f"processors.shell.PRODUCER_LINGER_SECONDS = {linger_ms / 1000!r}")
    if fetch_wait_ms is not None:
        lines.append(f"processors.shell.FETCH_MAX_WAIT_MS = {int(fetch_wait_ms)!r}")
    return "\n".join(["import processors.shell", *lines]) if lines else None


def add_worker_options(ap: Any) -> None:
    """``--worker-linger-ms`` and ``--worker-fetch-wait-ms`` (diagnostics, see :func:`worker_prelude`)."""
    ap.add_argument(
        "--worker-linger-ms",
        type=float,
        default=None,
        help="diagnostic: the worker's producer linger (processors.shell.PRODUCER_LINGER_SECONDS; shipped 5 ms)",
    )
    ap.add_argument("--worker-fetch-wait-ms", type=int, default=None,
                    help="diagnostic: the worker's fetch wait (processors.shell.FETCH_MAX_WAIT_MS; shipped 100 ms)")  # fmt: skip


def diagnostic_note(args: Any) -> str:
    """``"; diagnostic: ..."`` naming the worker settings changed by :func:`add_worker_options`, or ``""``."""
    parts = [f"{name} {v:g} ms" for name, v in (("worker linger", args.worker_linger_ms),
                                                 ("worker fetch wait", args.worker_fetch_wait_ms)) if v is not None]  # fmt: skip
    if getattr(args, "checkpoint_seconds", None) is not None:
        parts.append(f"healer checkpoint every {args.checkpoint_seconds:g} s")
    if getattr(args, "batch_records", None) is not None:
        parts.append(f"healer batch_records {args.batch_records}")
    return f"; diagnostic: {', '.join(parts)}" if parts else ""


def metrics_url(log_path: Path, event: str) -> str | None:
    """The ``/metrics`` URL a worker logged (JSON log line with ``"event": event`` and ``"url"``), or None."""
    import json

    url = None
    for line in log_path.read_text(errors="replace").splitlines():
        if f'"{event}"' in line:
            with contextlib.suppress(ValueError):
                url = json.loads(line).get("url") or url
    return url


def parse_metrics(text: str, prefix: str) -> dict[str, float]:
    """``{sample name with labels: value}`` of the Prometheus text lines whose name starts with ``prefix``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def scrape_metrics(url: str | None, prefix: str) -> dict[str, float]:
    """The samples named ``prefix*`` at ``url`` (labels dropped from the names); empty when it did not answer."""
    import httpx

    if url is None:
        return {}
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return {}
    return {k.split("{")[0]: v for k, v in parse_metrics(text, prefix).items()}


class CounterPoller(threading.Thread):
    """Polls one counter (``name``, labels ignored) at ``url`` every ``interval_seconds``; :attr:`series`
    holds ``(time.perf_counter(), value)``."""

    def __init__(self, url: str, name: str, interval_seconds: float = 0.02) -> None:
        super().__init__(daemon=True, name=f"poll-{name}")
        self.url, self.name, self.interval = url, name, interval_seconds
        self.series: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=2) as c:
            while not self.stop.is_set():
                try:
                    text = c.get(self.url).text
                except httpx.HTTPError:
                    time.sleep(self.interval)
                    continue
                now = time.perf_counter()
                values = [
                    v for k, v in parse_metrics(text, self.name).items() if k.split("{")[0] == self.name
                ]
                if values:
                    self.series.append((now, sum(values)))
                time.sleep(self.interval)

    def first_at_least(self, value: float) -> float | None:
        """The first poll time whose counter was at least ``value`` (None: never)."""
        for t, v in self.series:
            if v >= value:
                return t
        return None


def print_rows(title: str, rows: list[dict[str, Any]], note: str = "") -> None:
    """A rich table of stage rows: ``path``, ``rate``, ``achieved``, ``samples``, ``stage``, ``n``,
    ``p50_ms``/``p95_ms``/``p99_ms`` and optional ``seen_per_s``, ``ratio_p50``/``ratio_p95``/``ratio_p99``."""
    t = Table(title=title, caption=note or None)
    seen = any("seen_per_s" in r for r in rows)
    for c in ("path", "offered/s", "achieved/s", *(("seen/s",) if seen else ()), "samples", "stage", "seen", "p50 ms", "p95 ms", "p99 ms",
              "p50 x bare", "p95 x bare", "p99 x bare"):  # fmt: skip
        t.add_column(c, justify="left" if c in ("path", "stage") else "right")

    def num(v: Any, fmt: str) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for r in rows:
        t.add_row(r["path"], f"{r['rate']:,}", num(r.get("achieved"), ",.0f"),
                  *((num(r.get("seen_per_s"), ",.0f"),) if seen else ()), str(r["samples"]), r["stage"],
                  str(r["n"]), num(r["p50_ms"], ",.1f"), num(r["p95_ms"], ",.1f"), num(r["p99_ms"], ",.1f"),
                  num(r.get("ratio_p50"), ".1f"), num(r.get("ratio_p95"), ".1f"), num(r.get("ratio_p99"), ".1f"))  # fmt: skip
    console = Console()
    if not console.is_terminal:  # piped: wide enough for one line a row
        console = Console(width=170)
    console.print(t)
