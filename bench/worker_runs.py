"""Running a worker or a plain Faust agent as a child process for the worker benchmarks: wall time from
its start to its first and last record, CPU seconds from ``wait4``, memory sampled from ``/proc``.

Used by :mod:`bench.bench_incidents` and :mod:`bench.bench_correlation_worker`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.bench_processors import faust_count_source
from bench.common import ROOT

__all__ = [
    "Child",
    "Row",
    "faust_row",
    "json_after",
    "mib",
    "print_rows",
    "print_verdicts",
    "ratio",
    "run_child",
    "worker_env",
]


@dataclass(frozen=True, slots=True)
class Child:
    """One finished child process: its output, times (``time.monotonic()``) and memory (KiB)."""

    returncode: int
    stdout: str
    stderr: str
    started: float
    exited: float
    peak_rss_kib: int | None
    last_rss_kib: int | None
    cpu_seconds: float


@dataclass(frozen=True, slots=True)
class Row:
    """One process's figures.

    Attributes:
        name: what ran.
        records: input records handled.
        rate: records/s from the first record to the last.
        to_last_seconds: wall seconds from the process's start to its last record.
        to_exit_seconds: wall seconds from the process's start to its exit.
        peak_rss_kib: its last sampled ``VmHWM`` (KiB), None if none was sampled.
        last_rss_kib: its last sampled ``VmRSS`` (KiB), None if none was sampled.
        cpu_seconds: user + system CPU seconds of the whole process (start-up and shutdown included),
            from ``wait4``'s resource usage.
        insights: insights sent (None for the Faust agents).
        baseline: the name of the Faust row it is compared with (None for a baseline).
    """

    name: str
    records: int
    rate: float
    to_last_seconds: float
    to_exit_seconds: float
    peak_rss_kib: int | None
    last_rss_kib: int | None
    cpu_seconds: float
    insights: int | None = None
    baseline: str | None = None


def memory_kib(pid: int) -> tuple[int, int] | None:
    """``(VmHWM, VmRSS)`` of ``/proc/<pid>/status`` in KiB, or None (gone, or a zombie without them)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    rss = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return (int(hwm.group(1)), int(rss.group(1))) if hwm and rss else None


def run_child(cmd: list[str], env: dict[str, str], timeout_seconds: float) -> Child:
    """Run ``cmd`` to its exit, its output to temp files, sampling its ``VmHWM`` and ``VmRSS`` every 0.2 s
    and taking its CPU seconds from ``wait4``.

    Raises:
        subprocess.TimeoutExpired: it ran ``timeout_seconds`` (it is killed).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=err, text=True)
        last: list[tuple[int, int] | None] = [None]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                memory = memory_kib(proc.pid)
                if memory is not None:
                    last[0] = memory

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout_seconds, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            done.set()
            sampler.join()
        exited = time.monotonic()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        if exited - started >= timeout_seconds:
            raise subprocess.TimeoutExpired(cmd, timeout_seconds)
        out.seek(0)
        err.seek(0)
        hwm, rss = last[0] or (None, None)
        cpu = usage.ru_utime + usage.ru_stime
        return Child(proc.returncode, out.read(), err.read(), started, exited, hwm, rss, cpu)


def worker_env(settings: Any, state_dir: Path) -> dict[str, str]:
    return {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "BACKBONE_LOG_LEVEL": "WARNING", "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "BACKBONE_POSTGRES__URL": settings.postgres.dsn(), "BACKBONE_REDIS__URL": settings.redis.dsn(),
            "BACKBONE_STATE_DIR": str(state_dir), "BACKBONE_METRICS_PORT": "0",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip


def json_after(text: str, marker: str) -> dict[str, Any] | None:
    """The JSON object that starts at the last ``marker`` in ``text`` (after the log lines), or None."""
    at = text.rfind(marker)
    if at < 0:
        return None
    value, _ = json.JSONDecoder().raw_decode(text[at:])
    return value if isinstance(value, dict) else None


def faust_row(name: str, boot: str, topics: tuple[str, ...], n: int, env: dict[str, str], loop: str) -> Row:
    """The plain Faust agent over ``topics`` on event loop ``loop`` (``uvloop``, ``asyncio``) until it has counted
    ``n`` records.

    Raises:
        RuntimeError: it exited without counting them.
    """
    app_id = f"bench-faust-{uuid.uuid4().hex[:8]}"
    # exits 0.5 s after counting, so that the last memory sample is taken while it runs
    c = run_child(
        [sys.executable, "-c", faust_count_source(loop), boot, ",".join(topics), str(n), app_id, "0", "0.5"],
        env,
        900,
    )
    # Faust's worker redirects stdout into its log (stderr): find the line wherever it went
    found = re.search(r'\{"records": .*?\}', c.stdout + c.stderr)
    if found is None:
        raise RuntimeError(f"the Faust agent did not finish: {c.stderr[-2000:]}")
    r = json.loads(found.group(0))
    return Row(name, n, (n - 1) / (r["last"] - r["first"]), r["last"] - c.started, c.exited - c.started,
               c.peak_rss_kib, c.last_rss_kib, c.cpu_seconds)  # fmt: skip


def ratio(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.0f}"


def print_rows(title: str, rows: list[Row], target: float) -> None:
    rate = {r.name: r.rate for r in rows}
    t = Table(title=title)
    for col in ("process", "records", "records/s", f"to Faust (target {target})", "start to last record, s",
                "start to exit, s", "CPU, s", "CPU µs/record", "peak RSS, MiB", "RSS after, MiB",
                "insights"):  # fmt: skip
        t.add_column(col, justify="left" if col == "process" else "right")
    for r in rows:
        to_faust = ratio(r.rate / rate[r.baseline]) if r.baseline else "-"
        t.add_row(r.name, f"{r.records:,}", f"{r.rate:,.0f}", to_faust, f"{r.to_last_seconds:,.1f}",
                  f"{r.to_exit_seconds:,.1f}", f"{r.cpu_seconds:,.1f}",
                  f"{r.cpu_seconds / r.records * 1e6:,.0f}", mib(r.peak_rss_kib), mib(r.last_rss_kib),
                  "-" if r.insights is None else f"{r.insights:,}")  # fmt: skip
    console = Console()
    console.width = max(console.width, 200)
    console.print(t)


def print_verdicts(rows: list[Row], target: float) -> None:
    """One line per compared row: its rate as a share of its baseline's, and whether it meets ``target``."""
    for r in rows:
        if r.baseline:
            share = r.rate / next(b.rate for b in rows if b.name == r.baseline)
            verdict = "met" if share >= target else "not met"
            print(f"{r.name}: {ratio(share)} of the plain Faust agent, issue 12's {target} {verdict}")
