"""The chaos harness: a seeded workload, faults at seeded random points, then one history checker.

:func:`run_chaos` starts its own PostgreSQL (embedded, so that it may stop and start it; Kafka and
Redis come from the settings when configured, else embedded too), creates fresh topics, and starts
three real processes as the CLI would:

* the run-summary Faust worker (``python -m backbone processors worker``),
* a projection runner (``python -m backbone project``, agent-run views; a new consumer group on each
  start, since the checkpoint in PostgreSQL, not the group's offsets, decides where it resumes),
* the healer worker (``python -m backbone processors heal``, on the same events; its config and acks
  topics its own and empty, rollbacks off; its read model in the harness's PostgreSQL and Redis), whose
  decisions must equal those of the pure :class:`processors.healing.healer.Healer` fed the final log
  (``decisions_equal``); it is SIGKILLed and SIGSTOPped too, and goes down with the broker,
* the incident processor (``python -m processors.incidents.app``) on the Nezha TrainTicket slice of
  ``datasets/nezha`` (metrics, logs and a quarter of the traces, :func:`telemetry_events`), which a second
  producer thread replays over the same seconds as the agent runs, in event-time order with 3 % of its
  records sent again later (redeliveries); the telemetry topics are archived (re-seeded by a broker
  restart) and the worker's insights must equal those of the pure
  :class:`processors.incidents.incident.IncidentEngine` over the final telemetry (``incidents_equal``,
  :func:`expected_incidents`); SIGKILLed and SIGSTOPped too,
* with :attr:`Profile.inference` (the full profile; ``--inference``), the inference worker (``python -m
  backbone inference run``: a local Ray, one all-MiniLM-L6-v2 actor on the CPU) on embedding requests made of
  the agent runs' tool-call commands (:func:`inference_requests`), which a third producer thread sends over
  the same seconds; its requests topic is archived and re-seeded like the others, and every acknowledged
  request must be answered with the model's own embedding of its text (``inference_equal``, within
  :data:`backbone.chaos_history.INFERENCE_TOLERANCE`); SIGKILLed (its process group: the driver and its Ray)
  and SIGSTOPped too.

A producer thread sends the agent runs of ``datasets/agent_runs`` (their events interleaved across
runs by the seed, each run in step order) at a steady rate through :class:`streams.producer.EventProducer`
and records which sends were acknowledged; a few already-sent events are sent again (at-least-once
redeliveries the consumers must de-duplicate). Meanwhile a fault thread injects, one after the other
at times drawn from the seed: SIGKILL (then a restart) and SIGSTOP/SIGCONT of each process, and
PostgreSQL stopped (``pg_ctl stop -m fast``) and started again. When the workload and the faults are
over it measures how long the processor and the projection take to catch up, reads the topics and the
views, builds the views a second time from scratch into another database, and hands the collected
:class:`backbone.chaos_history.ChaosHistory` to :func:`backbone.chaos_history.check_history`.

PostgreSQL also gets its client connections terminated (``pg_terminate_backend``, aimed at a backend
caught in ``COMMIT``: :func:`kill_backends`) and a stall, the slow sink (every PostgreSQL process
SIGSTOPped for a few seconds: :func:`stall_postgres`). The broker is restarted and re-seeded from the
event archive (see ``broker_restart``).

Configuration changes are part of the workload: a thread changes five keys through the real
:class:`configuration.store.ConfigStore` (PostgreSQL, the outbox) a few times a second; the outbox relay
(``backbone config relay``) and the Redis current-value read model (``backbone config project``) run as
two more processes; Redis is flushed (``FLUSHALL``) and restarted empty (SIGKILL, same port). The checker
asks that every acknowledged change reached the config topic and that the read model holds each key's
current version afterwards.

A rebalance storm adds a second run-summary worker (same consumer group, its own state dir) and removes
it again (SIGTERM), twice: the group rebalances four times while the workload runs. In the same rounds a
second incident worker (same app id) joins, the first one leaves while it is up and comes back, and then
the second leaves: the incident worker's one-partition correlate stage, and its engine state, move to the
new member and back (the incident check holds its insights to the pure engine's all the same).

HTTP ingest is part of the workload: the API (``python -m backbone api``) runs as one more process,
with a token of the harness's own, and a seeded share of the workload's chunks (``Profile.http_fraction``)
goes through ``POST /events/{type}?topic=<events topic>`` instead of the producer (see :class:`_HttpIngest`):
a chunk is split into runs of consecutive events of one type, one request each, in order, each with an
``Idempotency-Key`` of its own; 2xx is acknowledged; a failed request (refused, timed out, 4xx/5xx) is not,
and is sent again, with the same key, before anything else. Its events are recorded with the ids the API
derives from that key (:func:`streams.envelope.deterministic_id`), so the checker holds them to the same
guarantees. Some acknowledged requests are sent again later with their key (a client that lost the
answer): the API replays its stored answer, or, after Redis lost its idempotency keys, produces the same
ids again. The API is SIGKILLed and SIGSTOPped like the other processes.

The checker is itself tested on real runs broken on purpose (``sabotage`` of :func:`run_chaos`, ``--sabotage``
of ``backbone chaos``, :data:`SABOTAGE_KINDS`): an acknowledged event deleted from the archive before a broker
restart's re-seed (:func:`lose_archived_record`), and the projection's committed checkpoint and de-duplication
rows edited while it is down (:func:`sabotage_projection`). ``fault_counts`` replaces the profile's fault
counts (``--fault KIND=N``), e.g. for storms alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal, get_args

import httpx
import psycopg
import redis
import structlog
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from psycopg import sql
from psycopg_pool import ConnectionPool
from pydantic import SecretStr

from backbone.chaos_history import (
    GUARANTEES,
    ChaosHistory,
    ConfigWrite,
    InsightRecord,
    OutputRecord,
    ProducedEvent,
    RunFigures,
    TopicRecord,
    Violation,
    acknowledged_by_path,
    check_history,
    config_lost_in_window,
    lost_in_window,
    violation_counts,
)
from backbone.devstack import DevStack
from backbone.errors import StackError
from backbone.http.auth import TokenStore
from backbone.probes import postgres_answers
from backbone.processes import free_port, pg_ctl_stop, postgres_bin_dir, send_signal
from configuration.aggregate import aggregate_id_for
from configuration.projection import REDIS_PREFIX as CONFIG_REDIS_PREFIX
from configuration.store import ConfigStore, event_id_for
from connectors.agent_runs import ParsedRun, iter_runs
from connectors.nezha import iter_day
from core.settings import PostgresSettings, Settings
from processors.healing.healer import Healer
from processors.incidents.app import TELEMETRY_KINDS, engine_record
from processors.incidents.incident import IncidentEngine
from processors.run_summary import LLM_CALL, TOOL_CALL, RunTotals, apply
from projections.agent_runs import AgentRunsProjection
from projections.runner import ProjectionRunner
from streams.consumer import ConsumedEvent
from streams.envelope import Event, deterministic_id
from streams.errors import StreamsError
from streams.offsets import end_offsets, make_consumer
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.replay import read_range
from streams.serde import AvroSerde

__all__ = [
    "FAULT_KINDS",
    "GUARANTEES",
    "GUARANTEE_TITLES",
    "PROFILES",
    "SABOTAGE_KINDS",
    "ChaosReport",
    "FaultRecord",
    "Profile",
    "expected_decisions",
    "expected_incidents",
    "expected_insights",
    "run_chaos",
    "run_figures",
    "sabotage_projection",
]

log = structlog.get_logger(__name__)

FaultKind = Literal[
    "sigkill_processor",
    "sigkill_projection",
    "sigkill_api",
    "sigkill_healer",
    "sigkill_incidents",
    "sigstop_processor",
    "sigstop_projection",
    "sigstop_api",
    "sigstop_healer",
    "sigstop_incidents",
    "sigkill_inference",
    "sigstop_inference",
    "postgres_restart",
    "postgres_backend_kill",
    "postgres_stall",
    "redis_flush",
    "redis_restart",
    "rebalance_storm",
    "broker_restart",
]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = get_args(FaultKind)
SabotageKind = Literal["dropped-record", "skipped-commit", "lost-record"]
SABOTAGE_KINDS: Final[tuple[SabotageKind, ...]] = get_args(SabotageKind)
"""Deliberate breakages that the checker must catch. Of the agent-run projection (:func:`sabotage_projection`):
``dropped-record``, its checkpoint moved past records it never applied; ``skipped-commit``, rows applied in a
commit that did not record its checkpoint and de-duplication ids, so that they are applied again. Of the log
(:func:`lose_archived_record`): ``lost-record``, an acknowledged event gone from the archive when a broker
restart re-seeds the log from it."""
_PROJECTION_SABOTAGE: Final = ("dropped-record", "skipped-commit")
_INFERENCE_FAULTS: Final[tuple[FaultKind, ...]] = ("sigkill_inference", "sigstop_inference")
_INFERENCE_PARTITIONS: Final = 3
_DROPPED_RECORDS: Final = 5
_SKIPPED_COMMIT_RECORDS: Final = 40
DEFAULT_DATA: Final = Path(__file__).resolve().parents[1] / "datasets" / "agent_runs"
#: The Nezha TrainTicket slice the incident processor's workload replays (metrics, logs, traces).
DEFAULT_TELEMETRY: Final = Path(__file__).resolve().parents[1] / "datasets" / "nezha"
_TELEMETRY_PARTITIONS: Final = 3
_PARTITIONS: Final = 6
_SESSION_TIMEOUT_MS: Final = 6000
_CONFIG_PARTITIONS: Final = 3
_CONFIG_KEYS: Final = tuple(f"chaos.k{i}" for i in range(5))
_HTTP_COUNTS: Final = ("events", "requests", "failed_requests", "retried_events", "replayed_requests",
                       "redelivered_events", "abandoned_events", "id_mismatches")  # fmt: skip
_PROJECTION_TABLES: Final = {
    "agent_runs": "SELECT * FROM proj_agent_runs.agent_runs ORDER BY run_id",
    "agent_run_models": "SELECT * FROM proj_agent_runs.agent_run_models ORDER BY run_id, model, provider",
}


@dataclass(frozen=True, slots=True)
class Profile:
    """How long and how hard a chaos run is.

    Attributes:
        name: ``quiet`` (no fault), ``short`` or ``full``.
        produce_seconds: the workload's length; the dataset is spread evenly over it.
        faults: how many faults of each kind.
        kill_down_seconds: (min, max) time a killed process stays down before its restart.
        stop_hold_seconds: (min, max) time a process stays stopped (SIGSTOP) before SIGCONT.
        postgres_down_seconds: (min, max) time PostgreSQL stays down.
        broker_down_seconds: (min, max) time the broker stays down (SIGKILL: its in-memory log is lost and
            re-seeded from the event archive when it comes back).
        stall_seconds: (min, max) time every PostgreSQL process stays stopped (SIGSTOP; the slow sink:
            connections stay open, statements and commits hang, nothing fails).
        redis_down_seconds: (min, max) time the embedded Redis stays down (SIGKILL; it comes back empty).
        storm_rounds: how many times a rebalance storm adds a second run-summary worker to the consumer
            group and removes it again (SIGTERM: it leaves the group), and adds a second incident worker,
            stops and restarts the first while it is up, then stops the second.
        storm_member_seconds: (min, max) time the added worker stays in the group each round (and the first
            incident worker stays out).
        config_interval_seconds: time between two configuration changes of the config workload.
        redelivery_fraction: share of events sent a second time (over HTTP: share of a chunk's events for
            each of which an earlier acknowledged request is sent again with its key).
        lag_bound_seconds: how long the processes may take to catch up after the last fault.
        http_fraction: share of the workload's chunks sent over HTTP ingest instead of the producer
            (each chunk drawn by the seed).
        http_timeout_seconds: the HTTP client's timeout per request (connect, read); a request that
            takes longer is not acknowledged and is sent again.
        api_kill_between_requests: a ``sigkill_api`` waits until no request of the workload is in
            flight. Otherwise a request the API dies in leaves its Idempotency-Key claimed ("pending",
            409 to the retries) for ``api_pending_ttl_seconds``, and its retries wait that out.
        api_pending_ttl_seconds: the API's ``idempotency_pending_ttl_seconds`` in the run (its default,
            120 s, is longer than a short run); above its ``ack_timeout_seconds`` (10 s), as the API
            requires.
        http_give_up_seconds: a request that has failed for this long is abandoned (its events stay
            unacknowledged, and the checker's counts show them missing) so that the run ends.
        inference: run the inference worker (``backbone inference run``: Ray, one all-MiniLM-L6-v2 actor on
            the CPU) on embedding requests made of the agent runs' tool-call commands, and inject the
            ``*_inference`` faults; off in ``short`` and ``quiet`` (from the worker's start to its actor's model
            loaded took 16 s in one run's log, 2026-12-06).
    """

    name: str
    produce_seconds: float
    faults: dict[FaultKind, int]
    kill_down_seconds: tuple[float, float] = (0.5, 2.0)
    stop_hold_seconds: tuple[float, float] = (1.0, 4.0)
    postgres_down_seconds: tuple[float, float] = (2.0, 5.0)
    broker_down_seconds: tuple[float, float] = (1.0, 3.0)
    stall_seconds: tuple[float, float] = (2.0, 6.0)
    redis_down_seconds: tuple[float, float] = (1.0, 3.0)
    storm_rounds: int = 2
    storm_member_seconds: tuple[float, float] = (3.0, 6.0)
    config_interval_seconds: float = 0.25
    redelivery_fraction: float = 0.03
    lag_bound_seconds: float = 90.0
    http_fraction: float = 1 / 3
    http_timeout_seconds: float = 10.0
    api_kill_between_requests: bool = False
    api_pending_ttl_seconds: int = 15
    http_give_up_seconds: float = 150.0
    inference: bool = False


PROFILES: Final[dict[str, Profile]] = {
    # no fault: the workload, the processes and the checker alone (with ``sabotage``, the checker's own test)
    "quiet": Profile(name="quiet", produce_seconds=12.0, faults={}, lag_bound_seconds=60.0),
    "short": Profile(
        name="short",
        produce_seconds=35.0,
        faults={
            "sigkill_processor": 1,
            "sigkill_projection": 2,
            "sigkill_api": 1,
            "sigkill_healer": 1,
            "sigkill_incidents": 1,
            "sigstop_processor": 1,
            "sigstop_projection": 1,
            "sigstop_api": 1,
            "sigstop_healer": 1,
            "sigstop_incidents": 1,
            "postgres_restart": 1,
            "postgres_backend_kill": 1,
            "postgres_stall": 1,
            "redis_flush": 1,
            "redis_restart": 1,
            "rebalance_storm": 1,
            "broker_restart": 1,
        },
    ),
    "full": Profile(
        name="full",
        produce_seconds=150.0,
        faults={
            "sigkill_processor": 3,
            "sigkill_projection": 5,
            "sigkill_api": 2,
            "sigkill_healer": 3,
            "sigkill_incidents": 2,
            "sigstop_processor": 3,
            "sigstop_projection": 4,
            "sigstop_api": 2,
            "sigstop_healer": 2,
            "sigstop_incidents": 2,
            "sigkill_inference": 2,
            "sigstop_inference": 2,
            "postgres_restart": 3,
            "postgres_backend_kill": 3,
            "postgres_stall": 2,
            "redis_flush": 2,
            "redis_restart": 2,
            "rebalance_storm": 2,
            "broker_restart": 2,
        },
        stop_hold_seconds=(1.0, 10.0),  # beyond the 6 s session timeout: the member is evicted
        postgres_down_seconds=(2.0, 8.0),
        lag_bound_seconds=120.0,
        # shorter than the longest stops and stalls: requests time out and are retried while the API
        # still holds them
        http_timeout_seconds=5.0,
        http_give_up_seconds=200.0,
        inference=True,
    ),
}


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """One injected fault: its kind, when it began (seconds since the workload started), how long the
    process or server stayed down or stopped, and what it hit (``postgres_backend_kill``: whether a
    backend was caught in ``COMMIT``, and how many were terminated)."""

    kind: FaultKind
    at_seconds: float
    duration_seconds: float
    detail: str = ""


@dataclass(slots=True)
class ChaosReport:
    """The outcome of :func:`run_chaos` (see :meth:`as_json`)."""

    seed: int
    profile: str
    faults: dict[str, int]
    fault_log: list[FaultRecord]
    violations: list[Violation]
    unexpected_exits: dict[str, int]
    events: dict[str, int]
    durations_seconds: dict[str, float | None]
    work_dir: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    reseeds: list[dict[str, Any]] = field(default_factory=list)
    http_errors: dict[str, int] = field(default_factory=dict)
    sabotage: list[dict[str, Any]] = field(default_factory=list)

    @property
    def violation_counts(self) -> dict[str, int]:
        return violation_counts(self.violations)

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_json(self) -> dict[str, Any]:
        """``seed``, ``profile``, ``faults`` (count per kind), ``violations`` (count per guarantee),
        ``details`` (each violation), ``fault_log``, ``unexpected_exits``, ``events``,
        ``durations_seconds``, ``work_dir`` (the logs, kept when something went wrong), ``skipped``
        (fault kinds not injected, with why), ``reseeds`` (each broker restart's re-seed report) and
        ``http_errors`` (why HTTP requests of the workload failed: status code or client exception, and
        how often).

        ``events`` holds, besides the dataset's size and the sends: ``acknowledged_ids_producer`` and
        ``acknowledged_ids_http`` (distinct event ids acknowledged by each path: what the checker looks
        for on the topic), and ``http_events`` (dataset events acknowledged over HTTP), ``http_requests``,
        ``http_failed_requests``, ``http_retried_events`` (events of requests sent again after a
        failure), ``http_replayed_requests`` (2xx answers replayed from the API's idempotency store),
        ``http_redelivered_events`` (events of acknowledged requests sent again, answered 2xx),
        ``http_abandoned_events`` and ``http_id_mismatches`` (both 0 in a sound run).

        ``sabotage`` (empty unless the run was deliberately broken): each breakage of
        :func:`sabotage_projection` and :func:`lose_archived_record`, with ``kind``, ``at_seconds`` (since
        the workload started), ``partition``, ``from_offset`` and ``to_offset`` (the records it concerns,
        end exclusive; ``lost-record``: the offset before the re-seed renumbered the partition),
        ``event_id`` (``lost-record`` only) and ``keys`` (their runs: where the checker should report
        ``counted_once`` and ``rebuild_equal``)."""
        return {
            "seed": self.seed,
            "profile": self.profile,
            "faults": self.faults,
            "violations": self.violation_counts,
            "details": [v.as_json() for v in self.violations],
            "fault_log": [asdict(f) for f in self.fault_log],
            "unexpected_exits": self.unexpected_exits,
            "events": self.events,
            "durations_seconds": self.durations_seconds,
            "work_dir": self.work_dir,
            "skipped": self.skipped,
            "reseeds": self.reseeds,
            "http_errors": self.http_errors,
            "sabotage": self.sabotage,
        }


# ---------------------------------------------------------------------------------------------------
# processes under test


class _Managed:
    """A child process in its own session, signalled as a group, restartable; exits it did not cause
    are counted."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.name, self._argv, self._env, self._log_path, self._cwd = name, argv, env, log_path, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.unexpected_exits = 0
        self._lock = threading.Lock()

    def argv(self) -> list[str]:
        return [a.replace("{start}", str(self.starts)) for a in self._argv]

    def twin(self, name: str, cwd: Path) -> _Managed:
        """Another process with the same command line (the same consumer group), in ``cwd``."""
        cwd.mkdir(parents=True, exist_ok=True)
        env = {**self._env, "BACKBONE_STATE_DIR": str(cwd / "state")}
        return _Managed(name, self._argv, env, self._log_path.with_name(f"{name}.log"), cwd)

    def start(self) -> None:
        with self._lock:
            with self._log_path.open("ab") as fh:
                fh.write(f"\n--- start {self.starts}: {' '.join(self.argv())}\n".encode())
                fh.flush()
                self.proc = subprocess.Popen(
                    self.argv(), env=self._env, cwd=self._cwd, stdin=subprocess.DEVNULL, stdout=fh,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            self.starts += 1

    def signal(self, signum: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        with self._lock:
            self.signal(signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait(30)

    def restart_if_exited(self) -> bool:
        """Restart a process that exited on its own; ``True`` when it had."""
        if self.proc is not None and self.proc.poll() is not None:
            self.unexpected_exits += 1
            log.warning("chaos.unexpected_exit", process=self.name, returncode=self.proc.returncode)
            self.start()
            return True
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(15)


def _start_postgres(pgdata: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start the embedded PostgreSQL again on its data dir and port (as the dev stack does); wait until
    it answers.

    Raises:
        StackError: it did not answer within 60 s.
    """
    user = "embedded_postgres" if os.geteuid() == 0 else None
    argv = [str(postgres_bin_dir() / "postgres"), "-D", str(pgdata), "-h", "127.0.0.1", "-p", str(port), "-k", "",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "wal_level=logical", "-c", "max_connections=200"]  # fmt: skip
    with log_path.open("ab") as fh:
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            argv, cwd=pgdata, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True, **({"user": user} if user else {}),
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(psycopg.OperationalError):
            if postgres_answers(f"postgresql://postgres@127.0.0.1:{port}/postgres"):
                return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            raise StackError(f"the embedded PostgreSQL did not come back on port {port} (see {log_path})")
        time.sleep(0.1)


def _terminate(conn: psycopg.Connection[Any], pids: list[int]) -> int:
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM unnest(%s::int[]) AS pid", (pids,)
    ).fetchone()
    return int(row[0]) if row else 0


def kill_backends(url: str, *, hunt_seconds: float = 3.0) -> str:
    """Terminate the client connections of ``url``'s database (``pg_terminate_backend``), aiming at a
    ``COMMIT``: for up to ``hunt_seconds`` it watches ``pg_stat_activity`` for a backend running
    ``COMMIT`` and terminates that one; when none was caught, every client backend in a transaction
    (``active`` or ``idle in transaction``), else every client backend. Returns what it hit, e.g.
    ``"COMMIT: 1 backend"`` or ``"in transaction: 2 backends"``.

    Raises:
        psycopg.Error: PostgreSQL did not answer.
    """
    others = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
              " AND backend_type = 'client backend'")  # fmt: skip
    with psycopg.connect(url, autocommit=True) as conn:
        deadline = time.monotonic() + hunt_seconds
        while time.monotonic() < deadline:
            pids = [r[0] for r in conn.execute(others + " AND state = 'active' AND query ILIKE 'COMMIT%%'")]
            n = _terminate(conn, pids) if pids else 0
            if n:
                return f"COMMIT: {n} backend{'s' * (n != 1)}"
        for what, where in (
            ("in transaction", " AND state IN ('active', 'idle in transaction')"),
            ("idle", ""),
        ):
            pids = [r[0] for r in conn.execute(others + where)]
            if pids:
                n = _terminate(conn, pids)
                return f"{what}: {n} backend{'s' * (n != 1)}"
    return "no client backend"


def stall_postgres(pgdata: Path, seconds: float) -> None:
    """The slow sink: stop every process of the PostgreSQL on ``pgdata`` (SIGSTOP to its process group,
    the postmaster's, read from ``postmaster.pid``) for ``seconds``, then continue them (SIGCONT).
    Connections stay open; statements and commits hang until then.

    Raises:
        OSError: the postmaster's process group could not be signalled.
    """
    pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    pgid = os.getpgid(pid)
    os.killpg(pgid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.killpg(pgid, signal.SIGCONT)


# ---------------------------------------------------------------------------------------------------
# the workload


def _interleave(runs: list[ParsedRun], rng: random.Random) -> list[Event]:
    """All events of ``runs``, runs interleaved at random, each run's events in their own order."""
    cursors = {r.run_id: 0 for r in runs}
    by_id = {r.run_id: r.events for r in runs}
    out: list[Event] = []
    live = [r.run_id for r in runs]
    while live:
        weights = [len(by_id[r]) - cursors[r] for r in live]
        run_id = rng.choices(live, weights=weights)[0]
        out.append(by_id[run_id][cursors[run_id]])
        cursors[run_id] += 1
        if cursors[run_id] == len(by_id[run_id]):
            live.remove(run_id)
    return out


class _ConfigWorkload(threading.Thread):
    """Configuration changes through the real store (PostgreSQL, the outbox) every ``interval_seconds``
    while the event workload runs, on :data:`_CONFIG_KEYS` (a key drawn by ``rng``). A change whose
    ``set`` returned is recorded with its version; one that failed (PostgreSQL down, stalled past the
    statement, its connection terminated) is counted in ``errors`` and the store opened again."""

    def __init__(self, settings: Settings, interval_seconds: float, rng: random.Random) -> None:
        super().__init__(name="chaos-config-workload", daemon=True)
        self._settings, self._interval, self._rng = settings, interval_seconds, rng
        self._halt = threading.Event()
        self.writes: list[ConfigWrite] = []
        self.errors = 0

    def stop(self) -> None:
        self._halt.set()
        self.join(60)

    def run(self) -> None:
        store: ConfigStore | None = None
        i = 0
        while not self._halt.is_set():
            key = self._rng.choice(_CONFIG_KEYS)
            i += 1
            try:
                if store is None:
                    store = ConfigStore(self._settings)
                v = store.set(key, {"seq": i}, author="chaos", reason=f"change {i}")
                self.writes.append(
                    ConfigWrite(key, v.version, event_id_for(aggregate_id_for(key), v.version))
                )
            except Exception as exc:  # noqa: BLE001 - every failure of a faulted store is counted, then retried
                self.errors += 1
                log.info("chaos.config_write_failed", key=key, error=str(exc)[:200])
                if store is not None:
                    with contextlib.suppress(Exception):
                        store.close()
                store = None
            self._halt.wait(self._interval)
        if store is not None:
            store.close()


def _config_state(
    settings: Settings, redis_url: str
) -> tuple[dict[str, list[tuple[int, str]]], dict[str, int | None]]:
    """``(key -> [(version, event id)] in the store, key -> version in the Redis read model)`` of :data:`_CONFIG_KEYS`.

    Raises:
        psycopg.Error, redis.RedisError: a server did not answer.
    """
    store_versions: dict[str, list[tuple[int, str]]] = {}
    read_model: dict[str, int | None] = {}
    with (
        ConfigStore(settings) as store,
        contextlib.closing(redis.Redis.from_url(redis_url, socket_timeout=5)) as r,
    ):
        for key in _CONFIG_KEYS:
            try:
                latest = store.get(key).version
            except LookupError:
                continue
            store_versions[key] = [(v, event_id_for(aggregate_id_for(key), v)) for v in range(1, latest + 1)]
            got = r.hget(f"{CONFIG_REDIS_PREFIX}current:{key}", "version")
            read_model[key] = int(got) if got is not None else None
    return store_versions, read_model


def _config_caught_up(settings: Settings, redis_url: str, topic: str, kafka: Any) -> bool:
    """The relay has published every stored change and the read model has applied the whole config topic
    (its positions in Redis at the topic's high watermarks)."""
    try:
        with (
            ConfigStore(settings) as store,
            contextlib.closing(redis.Redis.from_url(redis_url, socket_timeout=2)) as r,
        ):
            relay_row = store.app.recorder.max_notification_id() or 0
            with psycopg.connect(settings.postgres.dsn()) as conn:
                row = conn.execute(
                    "SELECT max(notification_id) FROM config_relay_position WHERE relay_name LIKE 'chaos-relay-%%'"
                ).fetchone()
            if (row[0] if row else None) != relay_row:
                return False
            positions = {
                int(p): int(o) for p, o in r.hgetall(f"{CONFIG_REDIS_PREFIX}__position__:{topic}").items()
            }
    except Exception:  # noqa: BLE001 - not caught up while a server does not answer
        return False
    try:
        ends = end_offsets(kafka, topic, list(range(_CONFIG_PARTITIONS)), timeout_seconds=5)
    except (KafkaException, TimeoutError):
        return False
    return all(positions.get(p, 0) >= end for p, end in ends.items() if end > 0)


@dataclass(slots=True)
class _HttpGroup:
    """One ``POST /events/{schema}`` of the workload: consecutive events of one type, the request's
    Idempotency-Key, the ids the API gives them (derived from the key), the JSON body, and how often it was
    sent and since when it has been failing (monotonic seconds; ``None`` while it has not failed)."""

    key: str
    schema: str
    events: tuple[Event, ...]
    ids: tuple[str, ...]
    body: bytes
    attempts: int = 0
    failing_since: float | None = None


class _HttpIngest:
    """The workload's client of the API's HTTP ingest (one connection, one request at a time).

    Args:
        base_url: ``http://127.0.0.1:<port>`` of the API.
        token: the Bearer token; ``token_id`` its public id (the API derives event ids from it).
        topic: the events topic (``?topic=``).
        key_prefix: prefix of every Idempotency-Key (unique to the run: the API's idempotency store is
            the harness's Redis).
        timeout_seconds: connect and read timeout of a request.
    """

    def __init__(
        self, base_url: str, token: str, token_id: str, topic: str, key_prefix: str, timeout_seconds: float
    ) -> None:
        self.base_url, self.token_id, self.topic, self._prefix = base_url, token_id, topic, key_prefix
        self._client = httpx.Client(
            base_url=base_url, timeout=timeout_seconds, headers={"Authorization": f"Bearer {token}"}
        )
        self.lock = threading.Lock()
        """Held while a request is in flight (a ``sigkill_api`` between requests takes it)."""

    def groups(self, chunk_no: int, chunk: list[Event]) -> list[_HttpGroup]:
        """``chunk`` as requests: each run of consecutive events of one type is one request, in order, its
        Idempotency-Key ``<prefix>-c<chunk_no>-g<i>`` and its ids those the API derives from it
        (``deterministic_id("api", token id, key, index)``, as :mod:`backbone.http.ingest` does)."""
        out: list[_HttpGroup] = []
        i = 0
        while i < len(chunk):
            j = i
            while j < len(chunk) and chunk[j].schema == chunk[i].schema:
                j += 1
            key = f"{self._prefix}-c{chunk_no}-g{len(out)}"
            events = tuple(chunk[i:j])
            ids = tuple(deterministic_id("api", self.token_id, key, n) for n in range(len(events)))
            body = json.dumps([_json_safe(dict(e.data)) for e in events]).encode()
            out.append(_HttpGroup(key, chunk[i].schema, events, ids, body))
            i = j
        return out

    def post(self, group: _HttpGroup) -> tuple[int | None, bool, str]:
        """Send ``group`` once: ``(status code or None when no answer came, whether the API replayed a
        stored answer, an error text when it was not 2xx)``. A 2xx whose ids differ from ``group.ids``
        is returned with the difference as its error text."""
        headers = {"Idempotency-Key": group.key, "Content-Type": "application/json"}
        with self.lock:
            try:
                r = self._client.post(f"/events/{group.schema}", params={"topic": self.topic},
                                      content=group.body, headers=headers)  # fmt: skip
            except httpx.HTTPError as exc:
                return None, False, f"{type(exc).__name__}: {exc}"[:300]
        if not 200 <= r.status_code < 300:
            return r.status_code, False, f"{r.status_code}: {r.text[:200]}"
        replayed = r.headers.get("idempotent-replayed") == "true"
        try:
            ids = r.json().get("ids")
        except ValueError:
            ids = None
        if ids != list(group.ids):
            return r.status_code, replayed, f"ids {ids} != {list(group.ids)}"[:300]
        return r.status_code, replayed, ""

    def close(self) -> None:
        self._client.close()


class _Workload(threading.Thread):
    """Send the events at a steady rate in chunks, each chunk flushed (acknowledged) before the next.

    With ``http``, a share ``http_fraction`` of the chunks (drawn by ``rng``) goes over HTTP ingest
    instead (:meth:`_post`): a request that failed, and the ones after it in its chunk, are sent again,
    same keys, before any new chunk, so a run's events keep their order. Redeliveries of an HTTP chunk are
    earlier acknowledged requests sent again with their key; those of a producer chunk are earlier events
    the producer sent.

    :meth:`pause` holds it between chunks (nothing in flight) while the harness restarts the broker, as
    ``backbone dev up`` holds clients off until the log is re-seeded; :meth:`resume` lets it go on with a
    new producer (the restarted broker knows nothing of the old one's idempotent producer id).
    """

    def __init__(
        self, kafka_settings: Any, serde: AvroSerde, topic: str | Callable[[Event], str], events: list[Event], seconds: float,
        redelivery_fraction: float, rng: random.Random, http: _HttpIngest | None = None,
        http_fraction: float = 0.0, http_give_up_seconds: float = 150.0,
    ) -> None:  # fmt: skip
        super().__init__(name="chaos-workload", daemon=True)
        self._kafka, self._serde = kafka_settings, serde
        self._topic_of: Callable[[Event], str] = topic if callable(topic) else (lambda _e: topic)
        self._events, self._seconds = events, seconds
        self._redelivery, self._rng = redelivery_fraction, rng
        self._http, self._http_fraction, self._give_up = http, http_fraction, http_give_up_seconds
        self.produced: list[ProducedEvent] = []
        self.redelivered = 0
        self.errors: list[str] = []
        self.delivered_as: dict[str, str] = {}
        """Dataset event id -> the id it was acknowledged under (its own, or the one the API gave it)."""
        self.http: Counter[str] = Counter()
        """Over HTTP: ``events`` acknowledged (each dataset event once), ``requests``, ``failed_requests``,
        ``retried_events`` (events of requests sent again after a failure), ``replayed_requests`` (2xx
        answers the API replayed from its idempotency store), ``redelivered_events`` (events of
        acknowledged requests sent again and answered 2xx), ``abandoned_events``, ``id_mismatches``."""
        self.http_errors: Counter[str] = Counter()
        """Why HTTP requests failed: status code, or the client's exception name, and how often."""
        self._http_acked: list[_HttpGroup] = []
        self.withheld: set[str] = set()
        """Event ids never sent again (the ``lost-record`` sabotage's: a redelivery would bring it back)."""
        self._gate = threading.Event()
        self._gate.set()
        self._idle = threading.Event()
        self._renew = False
        self._paused_seconds = 0.0

    def pause(self, timeout_seconds: float = 60.0) -> None:
        """Hold the workload before its next chunk; return once no chunk is in flight."""
        self._idle.clear()
        self._gate.clear()
        if self.is_alive():
            self._idle.wait(timeout_seconds)

    def resume(self, *, new_producer: bool = False) -> None:
        """Let the workload go on (with a new producer when ``new_producer``)."""
        self._renew = self._renew or new_producer
        self._gate.set()

    def _post(self, groups: list[_HttpGroup]) -> int:
        """Send ``groups`` in order until one fails; remove the acknowledged ones from the front of
        ``groups`` and return how many events they held. A group failing for ``http_give_up_seconds`` is
        abandoned (removed, its events never acknowledged)."""
        assert self._http is not None
        done = 0
        while groups:
            g = groups[0]
            if g.attempts:
                self.http["retried_events"] += len(g.events)
            g.attempts += 1
            code, replayed, error = self._http.post(g)
            ok = code is not None and 200 <= code < 300
            self.http["requests"] += 1
            self.produced.extend(
                ProducedEvent(i, e.key, ok, "http") for i, e in zip(g.ids, g.events, strict=True)
            )
            if not ok:
                now = time.monotonic()
                g.failing_since = g.failing_since or now
                self.http["failed_requests"] += 1
                self.http_errors[str(code) if code is not None else error.split(":", 1)[0]] += 1
                if now - g.failing_since > self._give_up:
                    self.http["abandoned_events"] += len(g.events)
                    self.errors.append(f"HTTP request {g.key} abandoned after {g.attempts} attempts: {error}")
                    groups.pop(0)
                    continue
                return done
            if error:  # acknowledged, but under other ids than derived here: the checker will miss them
                self.http["id_mismatches"] += 1
                self.errors.append(f"HTTP request {g.key}: {error}")
            self.http["replayed_requests"] += replayed
            self.http["events"] += len(g.events)
            self.delivered_as.update((e.attributes.id, i) for e, i in zip(g.events, g.ids, strict=True))
            self._http_acked.append(g)
            groups.pop(0)
            done += len(g.events)
        return done

    def _redeliver_http(self, n_events: int) -> None:
        """For each of ``n_events`` with probability ``redelivery_fraction``, send an earlier acknowledged
        request again with its key (each at most once here): a client that lost the answer."""
        assert self._http is not None
        picks = {
            g.key: g
            for g in (
                self._rng.choice(self._http_acked)
                for _ in range(n_events)
                if self._http_acked and self._rng.random() < self._redelivery
            )
        }
        for g in picks.values():
            code, replayed, _ = self._http.post(g)
            ok = code is not None and 200 <= code < 300
            self.http["requests"] += 1
            self.produced.extend(
                ProducedEvent(i, e.key, ok, "http") for i, e in zip(g.ids, g.events, strict=True)
            )
            if ok:
                self.http["redelivered_events"] += len(g.events)
                self.http["replayed_requests"] += replayed
            else:
                self.http["failed_requests"] += 1

    def run(self) -> None:
        rate = len(self._events) / self._seconds
        pending = list(self._events)
        sent: list[Event] = []
        retry: list[_HttpGroup] = []  # HTTP requests not acknowledged yet, in order: sent before the rest
        t0 = time.monotonic()
        done = 0
        chunk_no = 0
        # events at the head of ``pending`` whose producer send failed: sent by the producer again (same
        # ids), never over HTTP, which would give them other ids while the failed records may still land
        producer_owed = 0
        producer = EventProducer(self._kafka, self._serde)
        try:
            while pending or retry:
                if not self._gate.is_set():
                    held = time.monotonic()
                    self._idle.set()
                    self._gate.wait()
                    t0 += time.monotonic() - held  # the rate does not catch up on the pause in a burst
                if self._renew:
                    with contextlib.suppress(StreamsError):
                        producer.close()
                    producer, self._renew = EventProducer(self._kafka, self._serde), False
                if retry:
                    done += self._post(retry)
                    time.sleep(0.25 if retry else 0.1)
                    continue
                due = min(len(pending), max(1, int(rate * (time.monotonic() - t0)) - done))
                chunk, pending = pending[:due], pending[due:]
                chunk_no += 1
                if self._http is not None and not producer_owed and self._rng.random() < self._http_fraction:
                    retry = self._http.groups(chunk_no, chunk)
                    done += self._post(retry)
                    if not retry:
                        self._redeliver_http(len(chunk))
                    time.sleep(0.25 if retry else 0.1)
                    continue
                extra = [
                    self._rng.choice(sent) for _ in chunk if sent and self._rng.random() < self._redelivery
                ]
                extra = [e for e in extra if e.attributes.id not in self.withheld]
                batch = chunk + extra
                try:
                    for e in batch:
                        producer.produce(self._topic_of(e), e)
                    producer.flush(30)
                    acked = True
                except StreamsError as exc:
                    acked = False
                    self.errors.append(repr(exc))
                    pending = chunk + pending  # send again; this attempt's records are not acknowledged
                    producer_owed = max(producer_owed, len(chunk))
                self.produced.extend(ProducedEvent(e.attributes.id, e.key, acked) for e in batch)
                if acked:
                    producer_owed = max(0, producer_owed - len(chunk))
                    done += len(chunk)
                    sent.extend(chunk)
                    self.redelivered += len(extra)
                time.sleep(0.1)
        finally:
            self._idle.set()
            with contextlib.suppress(StreamsError):
                producer.close()
            if self._http is not None:
                self._http.close()


# ---------------------------------------------------------------------------------------------------
# the run


def _json_safe(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    return v


def run_figures(events: list[Event] | list[ConsumedEvent]) -> dict[str, RunFigures]:
    """Per run id (the event key's run, ``data["run_id"]``), LLM calls, tool calls and known cost in USD,
    each distinct event id counted once."""
    seen: set[str] = set()
    acc: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for e in events:
        if e.attributes.id in seen:
            continue
        seen.add(e.attributes.id)
        a = acc[str(e.data["run_id"])]
        if e.schema == LLM_CALL:
            a[0] += 1
            a[2] += e.data.get("cost_usd") or 0.0
        elif e.schema == TOOL_CALL:
            a[1] += 1
    return {r: RunFigures(int(a[0]), int(a[1]), round(a[2], 9)) for r, a in acc.items()}


def expected_insights(records: list[ConsumedEvent]) -> dict[str, dict[str, Any]]:
    """Per run id, the run-summary insight datum (JSON-safe) of the pure logic
    (:func:`processors.run_summary.apply`) folded over the records in offset order per partition."""
    states: dict[str, RunTotals | None] = {}
    found: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        run_id = str(r.data["run_id"])
        state, insight = apply(states.get(run_id), r)
        states[run_id] = state
        if insight is not None and run_id not in found:
            found[run_id] = _json_safe(dict(insight.data))
    return found


def expected_decisions(records: list[ConsumedEvent]) -> dict[str, dict[str, Any]]:
    """Per decision id, the decision datum (JSON-safe ``sophia.healing.Decision``) of the pure healer with its
    default configuration fed ``records`` as the worker feeds them (each with its ``"topic:partition"``),
    each partition whole in offset order: what a worker that lost and skipped nothing decides, whatever the
    interleaving of its partitions (agent health is judged per partition)."""
    healer = Healer()
    found: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        event = {
            "schema": r.schema,
            "data": r.data,
            "id": r.attributes.id,
            "partition": f"{r.topic}:{r.partition}",
        }
        for d in healer.feed(event):
            found.setdefault(d.id, _json_safe(dict(d.to_event().data)))
    return found


def telemetry_events(path: Path) -> list[tuple[str, Event]]:
    """The workload's telemetry: ``(topic, event)`` of the Nezha slice at ``path`` in event-time order
    (:func:`connectors.nezha.iter_day`), the traces cut to a quarter (whole traces, chosen by a hash of the
    trace id, as ``tests/integration/test_incidents_replay.py`` does) to keep the run light."""
    return [
        (t, e) for t, e in iter_day(path) if t != "telemetry.spans" or zlib.crc32(e.key.encode()) % 4 == 0
    ]


def expected_incidents(records: list[ConsumedEvent]) -> dict[str, dict[str, Any]]:
    """Per insight id, the insight (JSON-safe ``sophia.insight.Insight`` data, as the worker publishes it) of
    the pure :class:`processors.incidents.incident.IncidentEngine` fed ``records`` as the incident worker
    decodes them (kind, record with times in epoch ms and its CloudEvents id), in event-time order, each
    from its source ``topic/partition``, and then every source marked read to its end (no flush: a live
    worker never ends its input). The engine's insights are the same for any interleaving within its
    allowed lateness, so this is what a worker that lost, skipped and re-learnt nothing publishes."""
    sources = sorted({f"{r.topic}/{r.partition}" for r in records})
    engine = IncidentEngine(sources=sources)
    out: list[dict[str, Any]] = []
    for r in sorted(records, key=lambda r: (r.attributes.time, r.topic, r.partition, r.offset)):
        kind = TELEMETRY_KINDS[r.schema]
        out += engine.feed(
            kind, engine_record(kind, r.data, r.attributes.id), source=f"{r.topic}/{r.partition}"
        )
    for source in sources:
        out += engine.mark_drained(source)
    found: dict[str, dict[str, Any]] = {}
    for insight in out:
        when = datetime.fromtimestamp(insight["event_time"] / 1000, UTC)
        found.setdefault(insight["insight_id"], _json_safe({**insight, "event_time": when}))
    return found


def _incidents_caught_up(kafka: Any, group: Any, telemetry_ends: list[TopicPartition], merged: str) -> bool:
    """The incident worker's group has committed every telemetry record and every record of its merged
    topic (which it forwards them to)."""
    if not _group_caught_up(group, telemetry_ends):
        return False
    with contextlib.suppress(StreamsError, KafkaException):
        end = end_offsets(kafka, merged, [0], timeout_seconds=5).get(0, 0)
        [done] = group.committed([TopicPartition(merged, 0)], timeout=5)
        return bool(done.offset >= end)
    return False


def _group_caught_up(group: Any, ends: list[TopicPartition]) -> bool:
    """``group`` has committed every partition of ``ends`` up to its end offset (``ends`` empty: True)."""
    if not ends:
        return True
    committed = group.committed([TopicPartition(tp.topic, tp.partition) for tp in ends], timeout=5)
    return all(c.offset >= tp.offset for c, tp in zip(committed, ends, strict=True))


def inference_requests(runs: list[ParsedRun], *, every: int = 3, max_chars: int = 160) -> dict[str, Event]:
    """The inference workload: one ``sophia.inference.EmbeddingRequest`` per ``every``-th tool call of ``runs``
    (the shell command the agent ran, its first ``max_chars`` characters), request id derived from the tool
    call's event id, event time the tool call's, in the runs' order. Keyed by request id; empty commands are
    skipped. The defaults keep the model's work within the run on this 2-core machine: all-MiniLM-L6-v2 on
    the CPU embedded the whole commands (up to 1,000 characters, 824 of them) at about 18 a second, and the
    worker had not answered them all 60 s after the workload."""
    from inference.records import EmbeddingRequest, request_event

    out: dict[str, Event] = {}
    calls = [e for run in runs for e in run.events if e.schema == TOOL_CALL]
    for e in calls[::every]:
        command = str(e.data.get("command") or "").strip()
        if command:
            rid = deterministic_id("chaos-inference", e.attributes.id)
            out[rid] = request_event(
                EmbeddingRequest(request_id=rid, requested_at=e.attributes.time, text=command[:max_chars])
            )
    return out


def _embeddings(requests: dict[str, Event], ids: set[str]) -> dict[str, list[float]]:
    """The model's own embedding of each request of ``ids`` (one batch per 64 texts, in this process)."""
    from inference.config import DEFAULT_MODEL
    from inference.model import load_model

    wanted = sorted(ids & set(requests))
    if not wanted:
        return {}
    model = load_model(DEFAULT_MODEL)
    texts = [str(requests[rid].data["text"]) for rid in wanted]
    vectors = [v for i in range(0, len(texts), 64) for v in model.embed(texts[i : i + 64]).tolist()]
    return dict(zip(wanted, vectors, strict=True))


def _dump(url: str) -> dict[str, list[list[str]]]:
    with psycopg.connect(url) as c:
        return {
            t: [[str(v) for v in row] for row in c.execute(q).fetchall()]
            for t, q in _PROJECTION_TABLES.items()
        }


def _projected_runs(url: str) -> dict[str, RunFigures]:
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT run_id, llm_calls, tool_calls, cost_usd FROM proj_agent_runs.agent_runs"
        ).fetchall()
    return {r: RunFigures(int(llm), int(tools), float(cost)) for r, llm, tools, cost in rows}


def _checkpoints(url: str) -> dict[int, int]:
    try:
        with psycopg.connect(url, connect_timeout=2) as c:
            rows = c.execute(
                "SELECT partition, next_offset FROM proj_agent_runs.projection_checkpoints"
            ).fetchall()
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        return {}
    return {int(p): int(o) for p, o in rows}


def _archived_ids(url: str, topic: str) -> set[str]:
    """Event ids of ``topic`` in the event archive now."""
    try:
        with psycopg.connect(url, connect_timeout=5) as c:
            rows = c.execute(
                "SELECT event_id FROM proj_archive.archived_events WHERE topic = %s AND event_id IS NOT NULL",
                [topic],
            ).fetchall()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        return set()
    return {r[0] for r in rows}


def _drop_schema(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _with_db(url: str, database: str) -> str:
    return url.rsplit("/", 1)[0] + f"/{database}"


def _delivered(workload: _Workload, e: Event) -> str:
    """The id dataset event ``e`` was acknowledged under (the API's id when it went over HTTP)."""
    return workload.delivered_as.get(e.attributes.id, e.attributes.id)


def sabotage_projection(
    url: str,
    kafka: Any,
    serde: AvroSerde,
    topic: str,
    kinds: list[str],
    rng: random.Random,
    *,
    wait_seconds: float = 15.0,
) -> list[dict[str, Any]]:
    """Break the agent-run projection's committed state, one partition per kind, while its process is down.

    It is how the checker is tested on a real run: each kind is a defect that exactly-once projections must
    not have, made by editing ``proj_agent_runs.projection_checkpoints`` and ``projection_seen`` in
    PostgreSQL (the product's code is not changed), and :func:`run_chaos` must then report the runs it
    touched under ``counted_once`` and ``rebuild_equal``.

    * ``dropped-record``: the checkpoint of a partition moved :data:`_DROPPED_RECORDS` (5) records ahead
      (a consumer that committed its position before it applied the records, and crashed): those records are
      never applied. It waits up to ``wait_seconds`` for them to be on the log, so that the runner's seek
      lands inside the partition.
    * ``skipped-commit``: the checkpoint of another partition moved :data:`_SKIPPED_COMMIT_RECORDS` (40)
      records back and their event ids removed from the de-duplication table (rows committed without the
      checkpoint and the ids that belong in the same transaction): those records are applied a second time.

    Args:
        url: the harness's PostgreSQL (the projection's database).
        kafka: broker settings (:class:`core.settings.KafkaSettings`).
        serde: decodes the records whose ids ``skipped-commit`` removes.
        topic: the events topic the projection reads.
        kinds: which breakages (``dropped-record``, ``skipped-commit``), each on its own partition.
        rng: draws the partitions (among those with a checkpoint above 0).

    Returns:
        One dict per kind: ``kind``, ``partition``, ``from_offset``, ``to_offset`` (end exclusive).

    Raises:
        ValueError: an unknown kind.
        RuntimeError: fewer partitions have a checkpoint above 0 than ``kinds`` needs.
    """
    if not set(kinds) <= set(_PROJECTION_SABOTAGE):
        raise ValueError(f"sabotage {kinds}: choose among {', '.join(_PROJECTION_SABOTAGE)}")
    table = "proj_agent_runs.projection_checkpoints"
    move = f"UPDATE {table} SET next_offset = %s WHERE projection = %s AND topic = %s AND partition = %s"
    name = AgentRunsProjection.name
    with psycopg.connect(url) as c:
        rows = c.execute(f"SELECT partition, next_offset FROM {table} WHERE projection = %s AND topic = %s",
                         (name, topic)).fetchall()  # fmt: skip
    checkpoints = {int(p): int(o) for p, o in rows if int(o) > 0}
    if len(checkpoints) < len(kinds):
        raise RuntimeError(f"sabotage: {len(checkpoints)} partitions checkpointed, {len(kinds)} needed")
    done = []
    for kind, partition in zip(kinds, rng.sample(sorted(checkpoints), len(kinds)), strict=True):
        at = checkpoints[partition]
        if kind == "dropped-record":
            deadline = time.monotonic() + wait_seconds
            while end_offsets(kafka, topic, [partition])[partition] < at + _DROPPED_RECORDS:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            with psycopg.connect(url) as c:
                c.execute(move, (at + _DROPPED_RECORDS, name, topic, partition))
            span = (at, at + _DROPPED_RECORDS)
        else:
            start = max(0, at - _SKIPPED_COMMIT_RECORDS)
            ids = [r.attributes.id
                   for r in read_range(kafka, serde, topic, start=start, end=at, partitions=[partition])
                   if isinstance(r, ConsumedEvent)]  # fmt: skip
            with psycopg.connect(url) as c:
                c.execute("DELETE FROM proj_agent_runs.projection_seen WHERE projection = %s AND event_id = ANY(%s)",
                          (name, ids))  # fmt: skip
                c.execute(move, (start, name, topic, partition))
            span = (start, at)
        done.append({"kind": kind, "partition": partition, "from_offset": span[0], "to_offset": span[1]})
        log.warning("chaos.sabotage", kind=kind, partition=partition, from_offset=span[0], to_offset=span[1])
    return done


def lose_archived_record(url: str, topic: str, candidates: set[str], rng: random.Random) -> dict[str, Any]:
    """Delete every archived copy of one event of ``topic`` from the event archive (while the broker is down,
    after the harness noted what the archive held): the re-seed then leaves it out, as an archive that lost a
    row would, and renumbers its partition past the gap (:mod:`projections.reseed`).

    Args:
        url: the harness's PostgreSQL (``proj_archive.archived_events``).
        topic: the events topic.
        candidates: event ids it may choose among (the harness passes those the producer had acknowledged, and
            keeps them from being sent again, so that a redelivery cannot bring the event back).
        rng: draws the event.

    Returns:
        ``kind`` (``lost-record``), ``event_id``, ``partition``, ``from_offset``, ``to_offset`` (its first
        copy's offset, end exclusive) and ``keys`` (its run).

    Raises:
        RuntimeError: the archive holds no candidate of ``topic``.
    """
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT event_id, partition, \"offset\", convert_from(key, 'UTF8') FROM proj_archive.archived_events "
            'WHERE topic = %s AND event_id IS NOT NULL ORDER BY partition, "offset"',
            [topic],
        ).fetchall()
        archived = [r for r in rows if r[0] in candidates]
        if not archived:
            raise RuntimeError(f"sabotage lost-record: no acknowledged event of {topic} archived yet")
        event_id, partition, offset, key = rng.choice(archived)
        c.execute(
            "DELETE FROM proj_archive.archived_events WHERE topic = %s AND event_id = %s", (topic, event_id)
        )
    log.warning("chaos.sabotage", kind="lost-record", event_id=event_id, partition=partition, offset=offset)
    return {"kind": "lost-record", "event_id": event_id, "partition": int(partition), "from_offset": int(offset),
            "to_offset": int(offset) + 1, "keys": [key]}  # fmt: skip


def _api_token(url: str, topic: str) -> tuple[str, str]:
    """A new API token allowed to produce to ``topic`` (no rate limit to speak of): ``(token, token id)``.

    Raises:
        psycopg.Error: PostgreSQL did not answer.
    """
    with ConnectionPool(url, min_size=1, max_size=1, open=True) as pool:
        store = TokenStore(pool)
        store.ensure_schema()
        token, info = store.create("chaos", [f"produce:{topic}"], rate_per_second=100_000.0, burst=100_000)
    return token, info.token_id


def _wait_api(base_url: str, api: _Managed, log_path: Path, seconds: float = 90.0) -> None:
    """Wait until the API answers ``GET /healthz`` with 200.

    Raises:
        StackError: it exited, or did not answer within ``seconds``.
    """
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        if (api.proc is not None and api.proc.poll() is not None) or time.monotonic() > deadline:
            raise StackError(f"the API did not answer on {base_url} (see {log_path})")
        time.sleep(0.2)


def run_chaos(
    settings: Settings,
    *,
    profile: str = "short",
    seed: int = 1,
    data: Path = DEFAULT_DATA,
    keep_work_dir: bool = False,
    sabotage: tuple[str, ...] = (),
    fault_counts: dict[str, int] | None = None,
    inference: bool | None = None,
) -> ChaosReport:
    """Run the chaos harness once and check the history it collected.

    Args:
        settings: Kafka (and Redis) to use when configured; otherwise embedded ones are started.
            PostgreSQL is always the harness's own embedded one (it is stopped and started).
        profile: a key of :data:`PROFILES`.
        seed: every random choice (interleaving, redeliveries, fault times, kinds, durations) derives from it.
        data: a folder of mini-swe-agent runs.
        keep_work_dir: keep the logs and data dirs even when nothing went wrong (the logs are always
            kept when something did, or a process exited on its own; :attr:`ChaosReport.work_dir`
            names them).
        sabotage: break the run on purpose (:data:`SABOTAGE_KINDS`): ``lost-record`` at a third of the workload
            (a broker restart, counted as a ``broker_restart`` fault, with :func:`lose_archived_record` before
            the re-seed), ``dropped-record`` and ``skipped-commit`` at two thirds (:func:`sabotage_projection`,
            the projection SIGKILLed first and started again after): the checker must report each.
        fault_counts: how many faults of each kind (:data:`FAULT_KINDS`) instead of the profile's; the profile still
            sets the workload's length, fault durations and bounds (``quiet`` with ``{"rebalance_storm": 2}``:
            storms and nothing else).
        inference: run the inference worker and its workload (:attr:`Profile.inference`); ``None``: as the
            profile says. With it, and without ``fault_counts``, at least one ``sigkill_inference`` and one
            ``sigstop_inference``; without it, none.

    Returns:
        The report: faults injected, violations per guarantee with details, durations.

    Raises:
        KeyError: an unknown profile.
        ValueError: an unknown or repeated sabotage kind, an unknown fault kind or a negative count.
        StackError: the embedded servers could not be started.
    """
    prof = PROFILES[profile]
    if fault_counts is not None:
        if not set(fault_counts) <= set(FAULT_KINDS) or any(n < 0 for n in fault_counts.values()):
            raise ValueError(f"faults {fault_counts}: counts of {', '.join(FAULT_KINDS)}, each 0 or more")
        prof = replace(prof, faults={k: fault_counts[k] for k in FAULT_KINDS if fault_counts.get(k)})
    use_inference = prof.inference if inference is None else inference
    if use_inference and fault_counts is None:
        prof = replace(
            prof, faults={**prof.faults, **{k: prof.faults.get(k) or 1 for k in _INFERENCE_FAULTS}}
        )
    elif not use_inference:
        prof = replace(prof, faults={k: n for k, n in prof.faults.items() if k not in _INFERENCE_FAULTS})
    if len(set(sabotage)) != len(sabotage) or not set(sabotage) <= set(SABOTAGE_KINDS):
        raise ValueError(f"sabotage {list(sabotage)}: each of {', '.join(SABOTAGE_KINDS)} at most once")
    rng = random.Random(seed)
    t_begin = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"backbone-chaos-{seed}-"))
    work.chmod(0o711)  # the embedded PostgreSQL runs as its own system user when we are root
    (work / "logs").mkdir()
    own = Settings(kafka=settings.kafka, postgres=PostgresSettings(), redis=settings.redis,
                   state_dir=work)  # fmt: skip
    devstack = DevStack(own, state_dir=work, durable=False)  # faults are process faults, not OS crashes
    info = devstack.start()
    durations: dict[str, float | None] = {"stack_start": round(time.monotonic() - t_begin, 2)}
    kafka = settings.kafka.model_copy(
        update={"bootstrap_servers": info.kafka_bootstrap, "session_timeout_ms": _SESSION_TIMEOUT_MS}
    )
    run_settings = settings.model_copy(
        update={
            "kafka": kafka,
            "postgres": PostgresSettings(url=SecretStr(info.postgres_url)),
            "state_dir": work,
        }
    )
    serde = AvroSerde(EmbeddedRegistry())
    token = f"{seed}-{uuid.uuid4().hex[:6]}"
    topics = {
        "events": f"chaos-events-{token}",
        "insights": f"chaos-insights-{token}",
        "dlq": f"chaos-dlq-{token}",
        "config": f"chaos-config-{token}",
        "decisions": f"chaos-decisions-{token}",
        # the healer's config and acks topics: its own, empty (the workload's config keys are not healing's,
        # and the healer would otherwise watch them for rollbacks)
        "healing_config": f"chaos-healing-config-{token}",
        "acks": f"chaos-acks-{token}",
        # the incident processor: the Nezha slice's telemetry in, incident insights out; its change
        # topics its own and empty
        "metrics": f"chaos-metrics-{token}",
        "logs": f"chaos-logs-{token}",
        "spans": f"chaos-spans-{token}",
        "incident_config": f"chaos-incident-config-{token}",
        "external": f"chaos-external-{token}",
        "incidents": f"chaos-incidents-{token}",
        # the inference worker: embedding requests in (archived and re-seeded), results out
        "inference_requests": f"chaos-inference-requests-{token}",
        "inference_results": f"chaos-inference-results-{token}",
    }
    # what the event archive keeps, with partitions: what a broker restart re-seeds (the archive process reads
    # them; the dead-letter topic is re-seeded but its ids are not events the workload sent)
    archived_topics = {topics["events"]: _PARTITIONS, topics["dlq"]: 1, topics["config"]: _CONFIG_PARTITIONS,
                       **{topics[t]: _TELEMETRY_PARTITIONS for t in ("metrics", "logs", "spans")},
                       topics["inference_requests"]: _INFERENCE_PARTITIONS}  # fmt: skip
    pg_port = int(info.postgres_url.rsplit(":", 1)[1].split("/")[0])
    pg_procs: list[subprocess.Popen[bytes]] = []
    processes: list[_Managed] = []
    report_dir: str | None = None
    try:
        admin = AdminClient(kafka.librdkafka())
        futures = admin.create_topics(
            [
                NewTopic(topics["events"], _PARTITIONS, 1),
                NewTopic(topics["insights"], _PARTITIONS, 1),
                NewTopic(topics["dlq"], 1, 1),
                NewTopic(topics["config"], _CONFIG_PARTITIONS, 1),
                NewTopic(topics["decisions"], 1, 1),
                NewTopic(topics["healing_config"], 1, 1),
                NewTopic(topics["acks"], 1, 1),
                *(NewTopic(topics[t], _TELEMETRY_PARTITIONS, 1) for t in ("metrics", "logs", "spans")),
                NewTopic(topics["incident_config"], 1, 1),
                NewTopic(topics["external"], 1, 1),
                NewTopic(topics["incidents"], 1, 1),
                NewTopic(topics["inference_requests"], _INFERENCE_PARTITIONS, 1),
                NewTopic(topics["inference_results"], _INFERENCE_PARTITIONS, 1),
            ]
        )
        for f in futures.values():
            f.result(30)

        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
            ),
            "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": info.kafka_bootstrap,
            "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(_SESSION_TIMEOUT_MS),
            "BACKBONE_POSTGRES__URL": info.postgres_url,
            "BACKBONE_REDIS__URL": info.redis_url,
            "BACKBONE_STATE_DIR": str(work / "state"),
            "BACKBONE_LOG_LEVEL": "WARNING",
            "BACKBONE_LOG_FORMAT": "json",
        }
        py = [sys.executable, "-m", "backbone"]
        app_id = f"chaos-processors-{token}"
        processor = _Managed(
            "processor",
            [*py, "processors", "worker", "--app-id", app_id, "--events-topic", topics["events"],
             "--insights-topic", topics["insights"], "--dlq-topic", topics["dlq"],
             "--partitions", str(_PARTITIONS), "--web-port", "0"],
            env, work / "logs" / "processor.log", work,
        )  # fmt: skip
        projection = _Managed(
            "projection",
            [*py, "project", "--topic", topics["events"], "--group", f"chaos-projection-{token}-{{start}}",
             "--batch-size", "50", "--dlq-topic", topics["dlq"], "--metrics-port", "0"],
            env, work / "logs" / "projection.log", work,
        )  # fmt: skip
        # the healer worker on the same agent events (its decisions checked against the pure healer's)
        healer_id = f"chaos-healing-{token}"
        healer = _Managed(
            "healer",
            [*py, "processors", "heal", "--app-id", healer_id, "--events-topic", topics["events"],
             "--config-topic", topics["healing_config"], "--acks-topic", topics["acks"],
             "--decisions-topic", topics["decisions"], "--dlq-topic", topics["dlq"], "--no-rollback"],
            env, work / "logs" / "healer.log", work,
        )  # fmt: skip
        # the incident processor on the telemetry (its insights checked against the pure engine's)
        incidents_id = f"chaos-incidents-{token}"
        incidents = _Managed(
            "incidents",
            [sys.executable, "-m", "processors.incidents.app", "--app-id", incidents_id,
             "--metrics-topic", topics["metrics"], "--logs-topic", topics["logs"], "--spans-topic", topics["spans"],
             "--config-topic", topics["incident_config"], "--external-topic", topics["external"],
             "--insights-topic", topics["incidents"], "--dlq-topic", topics["dlq"]],
            env, work / "logs" / "incidents.log", work,
        )  # fmt: skip
        # the event archive of the events and dead-letter topics: what a broker restart re-seeds from
        archive = _Managed(
            "archive",
            [*py, "projections", "run", "archive", *(a for t in archived_topics for a in ("--topic", t)),
             "--no-read-models", "--batch-size", "50", "--metrics-port", "0"],
            env, work / "logs" / "archive.log", work,
        )  # fmt: skip
        # configuration: the outbox relay (store -> config topic) and the Redis current-value read model
        ConfigStore(run_settings).close()  # its tables exist before the relay and the workload start
        relay = _Managed(
            "config-relay",
            [*py, "config", "relay", "--topic", topics["config"], "--name", f"chaos-relay-{token}", "--batch-size", "20"],
            env, work / "logs" / "config-relay.log", work,
        )  # fmt: skip
        config_projection = _Managed(
            "config-projection",
            [*py, "config", "project", "--topic", topics["config"], "--group", f"chaos-config-{token}"],
            env, work / "logs" / "config-projection.log", work,
        )  # fmt: skip
        # HTTP ingest: the API, on a port of its own (kept across restarts), with a token of the harness's
        api_token, api_token_id = _api_token(info.postgres_url, topics["events"])
        api_port = free_port()
        api = _Managed(
            "api",
            [*py, "api", "--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning"],
            {**env, "BACKBONE_API_IDEMPOTENCY_PENDING_TTL_SECONDS": str(prof.api_pending_ttl_seconds)},
            work / "logs" / "api.log", work,
        )  # fmt: skip
        processes = [processor, projection, archive, relay, config_projection, api, healer, incidents]
        inference_id = f"chaos-inference-{token}"
        inference_worker = _Managed(
            "inference",
            [*py, "inference", "run", "--actors", "1", "--no-autoscale", "--ray-num-cpus", "1", "--max-wait-ms", "20",
             "--metrics-port", "0"],
            {**env, "BACKBONE_INFERENCE_REQUESTS_TOPIC": topics["inference_requests"],
             "BACKBONE_INFERENCE_RESULTS_TOPIC": topics["inference_results"],
             "BACKBONE_INFERENCE_DLQ_TOPIC": topics["dlq"], "BACKBONE_INFERENCE_GROUP_ID": inference_id},
            work / "logs" / "inference.log", work,
        )  # fmt: skip
        if use_inference:
            processes.append(inference_worker)
        for p in processes:
            p.start()
        http = _HttpIngest(f"http://127.0.0.1:{api_port}", api_token, api_token_id, topics["events"],
                           f"chaos-{token}", prof.http_timeout_seconds)  # fmt: skip
        _wait_api(http.base_url, api, work / "logs" / "api.log")
        durations["api_ready"] = round(time.monotonic() - t_begin, 2)

        runs = [r for r in iter_runs(data) if isinstance(r, ParsedRun)]
        events = _interleave(runs, rng)
        workload = _Workload(kafka, serde, topics["events"], events, prof.produce_seconds,
                             prof.redelivery_fraction, rng, http, prof.http_fraction,
                             prof.http_give_up_seconds)  # fmt: skip
        telemetry_topics = {"telemetry.metrics": topics["metrics"], "telemetry.logs": topics["logs"],
                            "telemetry.spans": topics["spans"]}  # fmt: skip
        telemetry = telemetry_events(DEFAULT_TELEMETRY)
        telemetry_topic = {e.attributes.id: telemetry_topics[t] for t, e in telemetry}
        telemetry_workload = _Workload(kafka, serde, lambda e: telemetry_topic[e.attributes.id],
                                       [e for _, e in telemetry], prof.produce_seconds, prof.redelivery_fraction,
                                       random.Random(seed + 2))  # fmt: skip
        config_workload = _ConfigWorkload(run_settings, prof.config_interval_seconds, random.Random(seed + 1))
        requests = inference_requests(runs) if use_inference else {}
        inference_workload = _Workload(kafka, serde, topics["inference_requests"], list(requests.values()),
                                       prof.produce_seconds, prof.redelivery_fraction, random.Random(seed + 4))  # fmt: skip
        workloads = [workload, telemetry_workload, *([inference_workload] if use_inference else [])]
        skipped: dict[str, str] = {}
        if not info.embedded.get("redis"):
            for kind in ("redis_flush", "redis_restart"):
                if prof.faults.get(kind):
                    skipped[kind] = (
                        f"Redis is configured ({info.redis_url}), not embedded: the harness flushes and restarts only its own"
                    )
        if not info.embedded.get("kafka") and prof.faults.get("broker_restart"):
            skipped["broker_restart"] = (
                f"the broker is configured ({info.kafka_bootstrap}), not embedded: the harness restarts only its own"
            )
        plan = [k for k in FAULT_KINDS for _ in range(prof.faults.get(k, 0)) if k not in skipped]
        rng.shuffle(plan)
        # one fault in each of len(plan) equal slots of the workload (after 3 s), at a random point of it
        slot = (prof.produce_seconds - 3.0) / max(1, len(plan))
        times = [3.0 + (i + rng.uniform(0.0, 0.8)) * slot for i in range(len(plan))]
        schedule: list[tuple[FaultKind | Literal["sabotage", "sabotage_log"], float]] = [
            *zip(plan, times, strict=True)
        ]
        # the sabotage at its own times, with its own draws, so that a seed's faults are the same without it
        projection_sabotage = [k for k in sabotage if k in _PROJECTION_SABOTAGE]
        if "lost-record" in sabotage:
            schedule.append(("sabotage_log", prof.produce_seconds / 3))
        if projection_sabotage:
            schedule.append(("sabotage", prof.produce_seconds * 2 / 3))
        schedule.sort(key=lambda kt: kt[1])
        sabotage_rng = random.Random(seed + 3)
        sabotaged: list[dict[str, Any]] = []
        t0 = time.monotonic()
        for w in workloads:
            w.start()
        config_workload.start()
        fault_log: list[FaultRecord] = []
        detail = ""
        archived_at_restart: set[str] = set()
        reseeds: list[dict[str, Any]] = []
        rebuilt_after_restart: list[float] = []
        targets = {"processor": processor, "projection": projection, "api": api, "healer": healer,
                   "incidents": incidents, "inference": inference_worker}  # fmt: skip

        def restart_broker(down: float, tamper: Callable[[], None] | None = None) -> None:
            """SIGKILL the broker and every process, re-seed the log from the archive, start them again (with
            ``tamper``, the sabotage, called once the harness has noted what the archive holds)."""
            for w in workloads:  # between two chunks: nothing in flight, as dev up holds clients off
                w.pause()

            def while_down() -> None:
                for p in processes:  # the whole stack goes down, as in a crash of the machine
                    p.kill()
                for t in archived_topics:
                    if t != topics["dlq"]:
                        archived_at_restart.update(_archived_ids(info.postgres_url, t))
                if tamper is not None:
                    tamper()

            report = devstack.restart_broker(
                down_seconds=down, while_down=while_down, partitions=archived_topics
            )
            assert report is not None
            reseeds.append(report.as_json())
            if any(c.projection == "agent_runs" and c.lost_events for c in report.checkpoints_moved):
                # the documented remedy: the projection applied events the log lost; rebuild it
                _drop_schema(info.postgres_url, "proj_agent_runs")
                rebuilt_after_restart.append(round(time.monotonic() - t0, 2))
            for p in processes:
                p.start()
            for w in workloads:
                w.resume(new_producer=True)

        for kind, at in schedule:
            while time.monotonic() - t0 < at:
                for p in processes:
                    p.restart_if_exited()
                time.sleep(0.1)
            began = time.monotonic() - t0
            if kind == "sabotage":
                deadline = time.monotonic() + 30  # after a broker restart the projection may be starting over
                while sum(1 for o in _checkpoints(info.postgres_url).values() if o > 0) < len(
                    projection_sabotage
                ):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                projection.kill()
                for done in sabotage_projection(info.postgres_url, kafka, serde, topics["events"],
                                                projection_sabotage, sabotage_rng):  # fmt: skip
                    sabotaged.append({"at_seconds": round(began, 2), **done})
                projection.start()
                continue
            if kind == "sabotage_log":  # a broker restart whose archive lost an acknowledged event
                down = sabotage_rng.uniform(*prof.broker_down_seconds)

                def lose(at_seconds: float = round(began, 2)) -> None:
                    acked = {p.event_id for p in workload.produced if p.acknowledged and p.via == "producer"}
                    done = lose_archived_record(info.postgres_url, topics["events"], acked, sabotage_rng)
                    workload.withheld.add(done["event_id"])
                    sabotaged.append({"at_seconds": at_seconds, **done})

                restart_broker(down, lose)
                fault_log.append(FaultRecord("broker_restart", round(began, 2), round(down, 2),
                                             "sabotage lost-record: an archived event deleted before the re-seed"))  # fmt: skip
                continue
            if kind.startswith("sigkill_"):
                target = targets[kind.removeprefix("sigkill_")]
                down = rng.uniform(*prof.kill_down_seconds)
                if target is api and prof.api_kill_between_requests:
                    with http.lock:  # no request of the workload in flight
                        target.kill()
                    detail = "between two requests"
                else:
                    target.kill()
                time.sleep(down)
                target.start()
            elif kind.startswith("sigstop_"):
                target = targets[kind.removeprefix("sigstop_")]
                down = rng.uniform(*prof.stop_hold_seconds)
                target.signal(signal.SIGSTOP)
                time.sleep(down)
                target.signal(signal.SIGCONT)
            elif kind == "broker_restart":
                down = rng.uniform(*prof.broker_down_seconds)
                restart_broker(down)
            elif kind == "postgres_backend_kill":
                t_kill = time.monotonic()
                detail = kill_backends(info.postgres_url)
                down = time.monotonic() - t_kill
            elif kind == "postgres_stall":
                down = rng.uniform(*prof.stall_seconds)
                stall_postgres(work / "postgres", down)
            elif kind == "rebalance_storm":
                t_storm = time.monotonic()
                # a second member of each group: the run-summary worker's joins and leaves; the incident worker's
                # joins, the first one leaves while it is up (so the one-partition correlate stage, and its state,
                # move to it) and comes back, and then the second leaves (so they move back)
                extra = processor.twin("processor-extra", work / "processor-extra")
                extra_incidents = incidents.twin("incidents-extra", work / "incidents-extra")
                # the groups rebalance when a member joins and when it leaves
                for _ in range(prof.storm_rounds):
                    extra.start()
                    extra_incidents.start()
                    time.sleep(rng.uniform(*prof.storm_member_seconds))
                    incidents.stop()
                    time.sleep(rng.uniform(*prof.storm_member_seconds))
                    incidents.start()
                    extra.stop()
                    time.sleep(1.0)
                    extra_incidents.stop()
                    time.sleep(1.0)
                down = time.monotonic() - t_storm
                detail = (f"{prof.storm_rounds} rounds of a second run-summary worker joining and leaving, and of a"
                          " second incident worker joining, the first leaving and coming back, the second leaving")  # fmt: skip
            elif kind == "redis_flush":
                down = 0.0
                with contextlib.closing(redis.Redis.from_url(info.redis_url, socket_timeout=5)) as rc:
                    rc.flushall()
            elif kind == "redis_restart":
                down = rng.uniform(*prof.redis_down_seconds)
                devstack.restart_redis(down_seconds=down)
            else:
                down = rng.uniform(*prof.postgres_down_seconds)
                pg_ctl_stop(work / "postgres", 15)
                time.sleep(down)
                pg_procs.append(_start_postgres(work / "postgres", pg_port, work / "logs" / "postgres.log"))
            fault_log.append(FaultRecord(kind, round(began, 2), round(down, 2), detail))
            detail = ""
            log.info("chaos.fault", kind=kind, at_seconds=round(began, 2), duration_seconds=round(down, 2))
        while any(w.is_alive() for w in workloads):
            for p in processes:
                p.restart_if_exited()
            for w in workloads:
                w.join(0.2 if w is workload else 0.01)
        config_workload.stop()
        faults_over = time.monotonic()
        durations["workload_and_faults"] = round(faults_over - t0, 2)

        # lag: the log end of each partition (read back), against the projection's checkpoints and
        # the processor group's committed offsets
        records = [r for r in read_range(kafka, serde, topics["events"]) if isinstance(r, ConsumedEvent)]
        log_end: dict[int, int] = Counter()
        for r in records:
            log_end[r.partition] = max(log_end[r.partition], r.offset + 1)
        group = make_consumer(kafka, app_id)
        healer_group = make_consumer(kafka, healer_id)
        incidents_group = make_consumer(kafka, incidents_id)
        inference_group = make_consumer(kafka, inference_id)
        request_ends = (
            [TopicPartition(topics["inference_requests"], p, end)
             for p, end in end_offsets(kafka, topics["inference_requests"]).items()]
            if use_inference else []
        )  # fmt: skip
        merged = f"{incidents_id}-telemetry-repartition"  # processors.incidents.app.IncidentTopics.merged
        telemetry_ends = [
            TopicPartition(topics[t], p, end)
            for t in ("metrics", "logs", "spans")
            for p, end in end_offsets(kafka, topics[t]).items()
        ]
        recovered: float | None = None
        try:
            while time.monotonic() - faults_over <= prof.lag_bound_seconds:
                for p in processes:
                    p.restart_if_exited()
                cps = _checkpoints(info.postgres_url)
                tps = [TopicPartition(topics["events"], p) for p in range(_PARTITIONS)]
                committed = {tp.partition: tp.offset for tp in group.committed(tps, timeout=5)}
                healer_committed = {tp.partition: tp.offset for tp in healer_group.committed(tps, timeout=5)}
                if (
                    all(
                        cps.get(p, 0) >= end
                        and committed.get(p, -1) >= end
                        and healer_committed.get(p, -1) >= end
                        for p, end in log_end.items()
                    )
                    and _incidents_caught_up(kafka, incidents_group, telemetry_ends, merged)
                    and _config_caught_up(run_settings, info.redis_url, topics["config"], kafka)
                    and _group_caught_up(inference_group, request_ends)
                ):
                    recovered = round(time.monotonic() - faults_over, 2)
                    break
                time.sleep(0.5)
        finally:
            group.close()
            healer_group.close()
            incidents_group.close()
            inference_group.close()
        durations["lag_recovered"] = recovered
        for p in processes:
            p.stop()

        t_collect = time.monotonic()
        insights = [
            InsightRecord((r.key or "").removeprefix("run:"), r.attributes.id, _json_safe(r.data))
            for r in read_range(kafka, serde, topics["insights"])
            if isinstance(r, ConsumedEvent)
        ]
        decisions = [
            OutputRecord(r.attributes.id, _json_safe(dict(r.data)))
            for r in read_range(kafka, serde, topics["decisions"])
            if isinstance(r, ConsumedEvent)
        ]
        incident_insights = [
            OutputRecord(r.attributes.id, _json_safe(dict(r.data)))
            for r in read_range(kafka, serde, topics["incidents"])
            if isinstance(r, ConsumedEvent)
        ]
        telemetry_records = [
            r
            for t in ("metrics", "logs", "spans")
            for r in read_range(kafka, serde, topics[t])
            if isinstance(r, ConsumedEvent)
        ]
        rebuild_db = f"chaos_rebuild_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(_with_db(info.postgres_url, "postgres"), autocommit=True) as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(rebuild_db)))
        rebuild_url = _with_db(info.postgres_url, rebuild_db)
        rebuild_settings = run_settings.model_copy(
            update={"postgres": PostgresSettings(url=SecretStr(rebuild_url))}
        )
        with ProjectionRunner(rebuild_settings, serde, AgentRunsProjection([topics["events"]]),
                              group_id=f"chaos-rebuild-{token}", dlq_topic=topics["dlq"]) as runner:  # fmt: skip
            runner.run(until_caught_up=True, max_wait_seconds=120)
        topic_records = [TopicRecord(r.partition, r.offset, r.key or "", r.attributes.id) for r in records]
        broker_restarts = sum(1 for f in fault_log if f.kind == "broker_restart")
        window = lost_in_window(workload.produced, topic_records, archived_at_restart, broker_restarts)
        # the telemetry is held to the same guarantees (no acknowledged record lost, order per key); its
        # keys are prefixed with their topic, a pod's metrics and its log lines being two keys
        telemetry_produced = [
            ProducedEvent(p.event_id, f"{telemetry_topic[p.event_id]}|{p.key}", p.acknowledged, p.via)
            for p in telemetry_workload.produced
        ]
        telemetry_topic_records = [
            TopicRecord(r.partition, r.offset, f"{r.topic}|{r.key or ''}", r.attributes.id)
            for r in telemetry_records
        ]
        telemetry_window = lost_in_window(telemetry_produced, telemetry_topic_records, archived_at_restart,
                                          broker_restarts)  # fmt: skip
        inference_results: dict[str, list[list[float]]] = defaultdict(list)
        expected_embeddings: dict[str, list[float]] = {}
        inference_window: set[str] = set()
        if use_inference:
            from inference.records import EmbeddingResult

            request_records = [TopicRecord(r.partition, r.offset, r.key or "", r.attributes.id)
                               for r in read_range(kafka, serde, topics["inference_requests"])
                               if isinstance(r, ConsumedEvent)]  # fmt: skip
            inference_window = lost_in_window(inference_workload.produced, request_records, archived_at_restart,
                                              broker_restarts)  # fmt: skip
            for rec in read_range(kafka, serde, topics["inference_results"]):
                if isinstance(rec, ConsumedEvent):
                    answer = EmbeddingResult.from_avro(dict(rec.data))
                    inference_results[answer.request_id].append([float(x) for x in answer.vector])
            acked = {p.event_id for p in inference_workload.produced if p.acknowledged} - inference_window
            expected_embeddings = _embeddings(requests, acked)
        config_store, config_read_model = _config_state(run_settings, info.redis_url)
        config_topic_ids = frozenset(
            r.attributes.id
            for r in read_range(kafka, serde, topics["config"])
            if isinstance(r, ConsumedEvent)
        )
        history = ChaosHistory(
            produced=[*workload.produced, *telemetry_produced],
            topic=[*topic_records, *telemetry_topic_records],
            # the dataset, less the acknowledged events a broker restart lost in the documented window
            expected_runs=run_figures(
                [e for r in runs for e in r.events if _delivered(workload, e) not in window]
            ),
            projected_runs=_projected_runs(info.postgres_url),
            live_rows=_dump(info.postgres_url),
            rebuilt_rows=_dump(rebuild_url),
            insights=insights,
            expected_insights=expected_insights(records),
            lag_recovered_seconds=recovered,
            lag_bound_seconds=prof.lag_bound_seconds,
            archived_before_restart=frozenset(archived_at_restart),
            broker_restarts=broker_restarts,
            config_writes=list(config_workload.writes),
            config_store=config_store,
            config_topic_ids=config_topic_ids,
            config_read_model=config_read_model,
            decisions=decisions,
            expected_decisions=expected_decisions(records),
            incidents=incident_insights,
            expected_incidents=expected_incidents(telemetry_records),
            inference_results=dict(inference_results),
            expected_embeddings=expected_embeddings,
        )
        violations = check_history(history)
        for entry in sabotaged:
            if entry["kind"] == "lost-record":  # not on the topic any more: its key came from the archive
                continue
            entry["keys"] = sorted({r.key for r in topic_records if r.partition == entry["partition"]
                                    and entry["from_offset"] <= r.offset < entry["to_offset"]})  # fmt: skip
        by_path = acknowledged_by_path(workload.produced)
        durations["collect_and_check"] = round(time.monotonic() - t_collect, 2)
        unexpected = {p.name: p.unexpected_exits for p in processes}
        faults: dict[str, int] = {k: sum(1 for f in fault_log if f.kind == k) for k in FAULT_KINDS}
        if violations or any(unexpected.values()) or keep_work_dir:
            report_dir = str(work)
        return ChaosReport(
            seed=seed,
            profile=prof.name,
            faults=faults,
            fault_log=fault_log,
            violations=violations,
            unexpected_exits=unexpected,
            events={
                "dataset": len(events),
                "sent": len(workload.produced),
                "acknowledged": sum(p.acknowledged for p in workload.produced),
                "redelivered": workload.redelivered,
                "acknowledged_ids_producer": by_path["producer"],
                "acknowledged_ids_http": by_path["http"],
                **{f"http_{k}": workload.http[k] for k in _HTTP_COUNTS},
                "on_topic": len(records),
                "insight_records": len(insights),
                "decision_records": len(decisions),
                "decisions": len({d.output_id for d in decisions}),
                "telemetry_dataset": len(telemetry),
                "telemetry_on_topics": len(telemetry_records),
                "telemetry_acknowledged": sum(p.acknowledged for p in telemetry_workload.produced),
                "telemetry_lost_in_window": len(telemetry_window),
                "incident_insight_records": len(incident_insights),
                "incident_insights": len({d.output_id for d in incident_insights}),
                "inference_requests": len(requests),
                "inference_acknowledged": len(
                    {p.event_id for p in inference_workload.produced if p.acknowledged}
                ),
                "inference_result_records": sum(len(v) for v in inference_results.values()),
                "inference_answered": len(inference_results),
                "inference_lost_in_window": len(inference_window),
                "send_errors": len(workload.errors),
                "lost_in_window": len(window),
                "broker_restarts": broker_restarts,
                "restored_from_archive": sum(r["records"] for r in reseeds),
                "projection_rebuilt_after_restart": len(rebuilt_after_restart),
                "config_changes": len(config_workload.writes),
                "config_write_errors": config_workload.errors,
                "config_lost_in_window": len(config_lost_in_window(history)),
            },
            durations_seconds={**durations, "total": round(time.monotonic() - t_begin, 2)},
            work_dir=report_dir,
            skipped=skipped,
            reseeds=reseeds,
            http_errors=dict(workload.http_errors),
            sabotage=sabotaged,
        )
    except BaseException:
        report_dir = str(work)
        raise
    finally:
        for p in processes:
            with contextlib.suppress(Exception):
                p.stop()
        try:
            devstack.stop()
        finally:
            for proc in pg_procs:
                if proc.poll() is None:
                    send_signal(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            if report_dir is None:
                shutil.rmtree(work, ignore_errors=True)
            elif not keep_work_dir:  # keep the logs, not the servers' data
                for data_dir in ("postgres", "redis", "state"):
                    shutil.rmtree(work / data_dir, ignore_errors=True)


GUARANTEE_TITLES: Final[dict[str, str]] = {
    "acknowledged_lost": "no acknowledged event lost",
    "counted_once": "projection counts each event once",
    "order_per_key": "order per key on the topic",
    "rebuild_equal": "projection == from-scratch rebuild",
    "insights_equal": "insights == pure logic over the log",
    "decisions_equal": "healer decisions == pure healer over the log",
    "incidents_equal": "incident insights == pure engine over the telemetry",
    "inference_equal": "embeddings served == the model over the requests",
    "lag_recovered": "lag back to zero within the bound",
    "config_current": "config changes published, Redis read model current",
}
"""A title per guarantee of :data:`backbone.chaos_history.GUARANTEES`, for the report's table."""
