"""Soak (issue 16): the pipeline at a fixed rate for minutes, with SSE clients connecting and dropping all
the time, and the memory (RSS) and open file descriptors of every process sampled; growth after warm-up
is reported against the 10 % target. Not in CI: ``make soak`` (10 minutes), or
``python bench/soak.py [--minutes M] [--rate R] [--sse-clients N] [--json]``.

It starts the embedded dev stack (non-durable) in a temporary directory and, as child processes, the
run-summary worker (``backbone processors worker``), the projections (``backbone projections run
agent_runs insights archive``) and the API (uvicorn). The workload produces the real agent runs of
``datasets/agent_runs`` again and again under new run ids (:func:`bench.common.realistic_events`) at
``--rate`` events/s through :class:`streams.producer.EventProducer`. ``--sse-clients`` threads each open
``GET /subscribe/insights.runs?from=latest``, read for 0.5 to 5 s, drop the connection (sometimes in the
middle of an event) and connect again: the seeds' WebSocket leak, in our form.

Every ``--sample-seconds`` it records, per process (the children, Tansu, Redis, and PostgreSQL with all
its backends summed), the memory and the number of open file descriptors (``psutil``). Memory is the
resident set size, except for PostgreSQL, where it is the proportional set size (PSS) summed over the
postmaster and its backends: RSS would count the shared buffers once per backend.
Growth = (median of the last ``--window-seconds`` of samples) / (median of the first window after
``--warmup-seconds``) - 1. Judged against the 10 % target (exit 1 when one is over): the memory of the
backbone's own processes (worker, projections, API) and the open descriptors of every process. Shown but
not judged: the memory of the data stores, which holds the data by design and grows with it (Tansu's
storage engine is memory, so the log lives in its RSS; PostgreSQL's shared buffers fill with the growing
tables; Redis holds the read models of every run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import psutil
import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

__all__ = ["Growth", "growth", "main"]

ROOT = Path(__file__).resolve().parents[1]
EVENTS_TOPIC = "agent.events"
INSIGHTS_TOPIC = "insights.runs"
TARGET_GROWTH = 0.10
DATA_STORES = frozenset({"tansu", "postgres", "redis"})


@dataclass(frozen=True, slots=True)
class Growth:
    """Growth of one measure of one process.

    Attributes:
        process, measure: e.g. ``worker``, ``rss_mib``.
        baseline: median of the first window after warm-up.
        final: median of the last window.
        peak: the largest sample after warm-up.
        growth: ``final / baseline - 1`` (0.05 = 5 %); None when a window has no sample.
    """

    process: str
    measure: str
    baseline: float | None
    final: float | None
    peak: float | None
    growth: float | None

    @property
    def judged(self) -> bool:
        """Descriptors of every process; memory of the backbone's own (not of the data stores)."""
        return self.measure == "open_fds" or self.process not in DATA_STORES

    @property
    def ok(self) -> bool:
        """Below the target (a missing figure is not ok); True when not judged."""
        return not self.judged or (self.growth is not None and self.growth < TARGET_GROWTH)


def growth(
    samples: list[tuple[float, float]],
    *,
    warmup_seconds: float,
    window_seconds: float,
    process: str,
    measure: str,
) -> Growth:
    """Growth of ``samples`` (``(seconds since start, value)``, in time order) after warm-up.

    The baseline is the median of the samples in ``[warmup, warmup + window)``; the final value the median
    of those in ``(end - window, end]``; a baseline of 0 gives growth 0 when the final is 0 too, else None.
    """
    after = [(t, v) for t, v in samples if t >= warmup_seconds]
    if not after:
        return Growth(process, measure, None, None, None, None)
    base = [v for t, v in after if t < warmup_seconds + window_seconds]
    end = after[-1][0]
    last = [v for t, v in after if t > end - window_seconds]
    b = statistics.median(base) if base else None
    f = statistics.median(last) if last else None
    g: float | None = None
    if b is not None and f is not None:
        g = (f / b - 1.0) if b else (0.0 if f == 0 else None)
    return Growth(process, measure, b, f, max(v for _, v in after), g)


@dataclass
class _Sampler:
    pids: dict[str, int]
    interval: float
    samples: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _measure(self, pid: int, tree: bool) -> tuple[float, float]:
        procs = [psutil.Process(pid)]
        if tree:
            procs += procs[0].children(recursive=True)
        rss = fds = 0
        for p in procs:
            try:
                rss += p.memory_full_info().pss if tree else p.memory_info().rss
                fds += p.num_fds()
            except psutil.NoSuchProcess:  # a backend that just ended
                continue
        return rss / 2**20, float(fds)

    def run(self, t0: float) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic() - t0
            for name, pid in self.pids.items():
                try:
                    rss, fds = self._measure(pid, tree=name == "postgres")
                except psutil.Error as exc:
                    self.errors.append(f"{name}: {exc!r}")
                    continue
                self.samples.setdefault((name, "pss_mib" if name == "postgres" else "rss_mib"), []).append(
                    (now, rss)
                )
                self.samples.setdefault((name, "open_fds"), []).append((now, fds))

    def stop(self) -> None:
        self._stop.set()


class _SseChurn(threading.Thread):
    """Connect to the SSE stream, read for a random while, drop, again; counts connections and events."""

    def __init__(self, api: str, token: str, stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.api, self.token, self.stop_event, self.rng = api, token, stop, random.Random(seed)
        self.connections = 0
        self.events = 0
        self.errors = 0

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        while not self.stop_event.is_set():
            hold = self.rng.uniform(0.5, 5.0)
            try:
                with (
                    httpx.Client(base_url=self.api, timeout=httpx.Timeout(10, read=hold + 5)) as http,
                    http.stream(
                        "GET", f"/subscribe/{INSIGHTS_TOPIC}", params={"from": "latest"}, headers=headers
                    ) as r,
                ):
                    self.connections += 1
                    end = time.monotonic() + hold
                    for line in r.iter_lines():
                        if line.startswith("id:"):
                            self.events += 1
                        if time.monotonic() >= end or self.stop_event.is_set():
                            break  # drop in the middle of the stream
            except httpx.HTTPError:
                self.errors += 1
                time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    """Run the soak, print the table (or JSON); return 0 when every process stays under the target."""

    from backbone.devstack import DevStack
    from backbone.http.auth import TokenStore
    from bench.common import API_SERVE, free_port, realistic_events
    from core.settings import KafkaSettings, Settings
    from streams.catalogue import CATALOGUE, create_missing_topics
    from streams.producer import EventProducer
    from streams.registry import EmbeddedRegistry
    from streams.serde import AvroSerde

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=200.0, help="events/s produced")
    ap.add_argument("--sse-clients", type=int, default=4)
    ap.add_argument("--sample-seconds", type=float, default=5.0)
    ap.add_argument("--warmup-seconds", type=float, default=None, help="default: a fifth of the run")
    ap.add_argument("--window-seconds", type=float, default=None, help="default: a tenth of the run")
    ap.add_argument("--json", action="store_true", dest="as_json")
    args = ap.parse_args(argv)
    from core.observability import configure_logging

    configure_logging("WARNING")  # logs on stderr: stdout is the table or the JSON
    seconds = args.minutes * 60
    warmup = args.warmup_seconds if args.warmup_seconds is not None else seconds / 5
    window = args.window_seconds if args.window_seconds is not None else seconds / 10
    state_dir = Path(tempfile.mkdtemp(prefix="backbone-soak-"))
    out = Console(stderr=args.as_json)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with DevStack(Settings(state_dir=state_dir), state_dir=state_dir, durable=False) as info:
        out.print(
            f"soak: stack up in {state_dir} (durability off); {args.minutes:g} min at {args.rate:g} events/s"
        )
        database = f"soak_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(info.postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(database)))
        pg_url = urlunsplit(urlsplit(info.postgres_url)._replace(path=f"/{database}"))
        kafka = KafkaSettings(bootstrap_servers=info.kafka_bootstrap)
        from confluent_kafka.admin import AdminClient

        create_missing_topics(
            AdminClient(kafka.librdkafka()), [CATALOGUE[EVENTS_TOPIC], CATALOGUE[INSIGHTS_TOPIC]]
        )
        env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": info.kafka_bootstrap,
               "BACKBONE_POSTGRES__URL": pg_url, "BACKBONE_REDIS__URL": info.redis_url,
               "BACKBONE_API_RATE_PER_SECOND": "1000000", "BACKBONE_API_BURST": "1000000",
               "BACKBONE_LOG_LEVEL": "WARNING", "BACKBONE_STATE_DIR": str(state_dir),
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
        port = free_port()
        logs = open(state_dir / "children.log", "wb")  # noqa: SIM115 - closed in finally
        spawn = {
            "worker": [sys.executable, "-m", "backbone", "processors", "worker", "--web-port", "0"],
            "projections": [sys.executable, "-m", "backbone", "projections", "run", "agent_runs", "insights",
                            "archive", "--metrics-port", "0"],
            "api": [sys.executable, "-c", API_SERVE.format(port=port)],
        }  # fmt: skip
        stop = threading.Event()
        churn: list[_SseChurn] = []
        sampler: _Sampler | None = None
        sent = 0
        t_start = time.monotonic()
        try:
            for name, cmd in spawn.items():
                procs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=logs, stderr=logs)
            api = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while True:
                try:
                    if httpx.get(f"{api}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                    raise RuntimeError(f"a child process did not start; see {state_dir / 'children.log'}")
                time.sleep(0.3)
            from psycopg_pool import ConnectionPool

            with ConnectionPool(pg_url, min_size=1, max_size=1, open=True) as pool:
                token = TokenStore(pool).create("soak", [f"subscribe:{INSIGHTS_TOPIC}"])[0]
            pids = {name: p.pid for name, p in procs.items()}
            pids.update({n: pid for n, pid in info.pids.items()})
            pids = {("tansu" if n == "kafka" else n): pid for n, pid in pids.items()}
            t0 = time.monotonic()
            sampler = _Sampler(pids, args.sample_seconds)
            threading.Thread(target=sampler.run, args=(t0,), daemon=True).start()
            churn = [_SseChurn(api, token, stop, seed=i) for i in range(args.sse_clients)]
            for c in churn:
                c.start()
            serde = AvroSerde(EmbeddedRegistry())
            pool_events = realistic_events(20_000)
            with EventProducer(kafka, serde) as producer:
                while (elapsed := time.monotonic() - t0) < seconds:
                    due = int(elapsed * args.rate) - sent
                    for _ in range(max(0, due)):
                        copy, i = divmod(sent, len(pool_events))
                        e = _copy(pool_events[i], copy)
                        producer.produce(EVENTS_TOPIC, e)
                        sent += 1
                    producer.flush(30)
                    if any(p.poll() is not None for p in procs.values()):
                        raise RuntimeError(f"a child process exited; see {state_dir / 'children.log'}")
                    time.sleep(0.05)
        finally:
            stop.set()
            if sampler is not None:
                sampler.stop()
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            logs.close()
    assert sampler is not None
    rows = [
        growth(s, warmup_seconds=warmup, window_seconds=window, process=name, measure=measure)
        for (name, measure), s in sorted(sampler.samples.items())
    ]
    result = {
        "minutes": args.minutes, "rate_events_per_second": args.rate, "events_sent": sent,
        "sse_connections": sum(c.connections for c in churn), "sse_events": sum(c.events for c in churn),
        "sse_errors": sum(c.errors for c in churn), "warmup_seconds": warmup, "window_seconds": window,
        "target_growth": TARGET_GROWTH, "sampler_errors": sampler.errors[:5],
        "growth": [{"process": g.process, "measure": g.measure, "baseline": g.baseline, "final": g.final,
                    "peak": g.peak, "growth": g.growth, "judged": g.judged, "ok": g.ok} for g in rows],
        "ok": all(g.ok for g in rows), "elapsed_seconds": round(time.monotonic() - t_start, 1),
    }  # fmt: skip
    if args.as_json:
        print(json.dumps(result, indent=2))
    else:
        table = Table(title=f"soak: {args.minutes:g} min at {args.rate:g} events/s, {args.sse_clients} SSE clients "
                      f"churning ({result['sse_connections']} connections); growth after {warmup:g} s warm-up")  # fmt: skip
        for col in ("process", "measure", "after warm-up", "final", "peak", "growth", "< 10 %"):
            table.add_column(col, justify="left" if col in ("process", "measure") else "right")
        for g in rows:
            table.add_row(g.process, g.measure, _fmt(g.baseline), _fmt(g.final), _fmt(g.peak),
                          "-" if g.growth is None else f"{g.growth * 100:+.1f} %",
                          ("yes" if g.ok else "NO") if g.judged else "(data)")  # fmt: skip
        out.print(table)
        out.print(f"{sent:,} events sent; SSE: {result['sse_connections']} connections, "
                  f"{result['sse_events']} events, {result['sse_errors']} errors")  # fmt: skip
    return 0 if result["ok"] else 1


def _copy(e: Any, copy: int) -> Any:
    """The event under run id ``<run>~<copy>`` with a new id (copy 0 is the event itself)."""
    if not copy:
        return e
    run = f"{e.key}~{copy}"
    attrs = dataclasses.replace(e.attributes, id=f"{e.attributes.id}~{copy}", subject=run)
    return dataclasses.replace(e, key=run, data={**e.data, "run_id": run}, attributes=attrs)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


if __name__ == "__main__":
    sys.exit(main())
