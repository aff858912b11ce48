"""Reading a running dev stack into settings: ``state_dir/stack.json``, written by the launcher
(:mod:`backbone.devstack`), says where its Kafka, PostgreSQL and Redis run.

Every process of the backbone finds the stack through :func:`read_stack` and :func:`load_settings`; only
the launcher writes the file. This module is on the ground floor: it imports nothing of the project
but :mod:`core.settings`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import psutil
import structlog
from pydantic import SecretStr

from core.settings import Settings, get_settings

__all__ = [
    "StackInfo",
    "alive_pids",
    "load_settings",
    "load_stack_file",
    "pid_alive",
    "read_stack",
    "resolve_settings",
    "stack_file",
    "url_complete",
    "url_unset",
]

log = structlog.get_logger(__name__)

_STACK_FILE: Final = "stack.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class StackInfo:
    """Where each part of a running dev stack is, as recorded in ``state_dir/stack.json``.

    Attributes:
        kafka_bootstrap: Kafka bootstrap servers, ``host:port[,host:port]``.
        postgres_url: libpq URI including the database, e.g.
            ``postgresql://postgres@127.0.0.1:PORT/backbone``. In ``stack.json`` a configured URL
            with a password is stored with the password replaced by ``***``.
        redis_url: Redis URL, e.g. ``redis://127.0.0.1:PORT/0``.
        started_at: when the stack was up (aware UTC datetime).
        pids: component name (``kafka``, ``postgres``, ``redis``) -> pid, for the embedded servers
            only (the postmaster pid for PostgreSQL).
        embedded: component name -> ``True`` when the stack started the server, ``False`` when it
            was configured.
        state_dir: absolute directory holding ``stack.json``, ``logs/`` and the data directories.
    """

    kafka_bootstrap: str
    postgres_url: str
    redis_url: str
    started_at: datetime
    pids: dict[str, int] = field(default_factory=dict)
    embedded: dict[str, bool] = field(default_factory=dict)
    state_dir: Path

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict form (``started_at`` as ISO 8601, ``state_dir`` as a string)."""
        return {
            "kafka_bootstrap": self.kafka_bootstrap,
            "postgres_url": self.postgres_url,
            "redis_url": self.redis_url,
            "started_at": self.started_at.isoformat(),
            "pids": dict(self.pids),
            "embedded": dict(self.embedded),
            "state_dir": str(self.state_dir),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StackInfo:
        """Build a :class:`StackInfo` from :meth:`to_dict` output.

        Raises:
            ValueError: when a field is missing or malformed.
        """
        try:
            started_at = datetime.fromisoformat(str(data["started_at"]))
            if started_at.tzinfo is None:
                raise ValueError("started_at must carry a UTC offset")
            return cls(
                kafka_bootstrap=str(data["kafka_bootstrap"]),
                postgres_url=str(data["postgres_url"]),
                redis_url=str(data["redis_url"]),
                started_at=started_at,
                pids={str(k): int(v) for k, v in dict(data["pids"]).items()},
                embedded={str(k): bool(v) for k, v in dict(data["embedded"]).items()},
                state_dir=Path(str(data["state_dir"])),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed stack info: {exc!r}") from exc

    def to_json(self) -> str:
        """Return the JSON text written to ``stack.json``."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StackInfo:
        """Parse the JSON text of ``stack.json``.

        Raises:
            ValueError: when the text is not JSON or a field is missing or malformed.
        """
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------------
# stack.json


def stack_file(state_dir: Path) -> Path:
    """Return the path of ``stack.json`` in ``state_dir``."""
    return Path(state_dir) / _STACK_FILE


def load_stack_file(state_dir: Path) -> StackInfo | None:
    """Read ``stack.json`` whatever the state of its processes; a malformed file is removed."""
    path = stack_file(state_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return StackInfo.from_json(text)
    except ValueError:
        log.warning("devstack.stack_file_malformed", path=str(path))
        path.unlink(missing_ok=True)
        return None


def alive_pids(info: StackInfo) -> dict[str, bool]:
    """Return component -> whether its recorded process still runs (a zombie counts as gone)."""
    # A pid created after the stack started has been reused by an unrelated process.
    started = info.started_at.timestamp() + 1.0
    return {name: pid_alive(pid, created_before=started) for name, pid in info.pids.items()}


def read_stack(state_dir: Path) -> StackInfo | None:
    """Return the dev stack running from ``state_dir``, or ``None`` when none runs.

    A ``stack.json`` whose processes have all exited is stale and is removed.

    Args:
        state_dir: the stack's state directory (``Settings.state_dir``).

    Returns:
        The recorded :class:`StackInfo` when every embedded server it lists is alive, else ``None``
        (also when only some are alive: :func:`stop_stack` stops the rest).
    """
    info = load_stack_file(Path(state_dir))
    if info is None:
        return None
    alive = alive_pids(info)
    if all(alive.values()):
        return info
    if not any(alive.values()):
        stack_file(state_dir).unlink(missing_ok=True)
    return None


def resolve_settings(settings: Settings) -> Settings:
    """Fill empty server settings from the dev stack running from ``settings.state_dir``.

    Values set in ``settings`` (from the environment) always win. Only URLs recorded in full are
    used: a configured URL whose password ``stack.json`` redacted is not filled in.

    Args:
        settings: the settings to complete.

    Returns:
        A copy of ``settings`` with empty ``kafka.bootstrap_servers``, ``postgres.url`` and
        ``redis.url`` filled in, or ``settings`` itself when no stack runs or nothing is empty.
    """
    info = read_stack(settings.state_dir)
    if info is None:
        return settings
    update: dict[str, Any] = {}
    if not settings.kafka.bootstrap_servers and info.kafka_bootstrap:
        update["kafka"] = settings.kafka.model_copy(update={"bootstrap_servers": info.kafka_bootstrap})
    if url_unset(settings.postgres.url) and url_complete(info.postgres_url):
        update["postgres"] = settings.postgres.model_copy(update={"url": SecretStr(info.postgres_url)})
    if url_unset(settings.redis.url) and url_complete(info.redis_url):
        update["redis"] = settings.redis.model_copy(update={"url": SecretStr(info.redis_url)})
    return settings.model_copy(update=update) if update else settings


def load_settings() -> Settings:
    """Settings from the environment (``BACKBONE_*``), with empty server URLs taken from a running
    ``backbone dev up`` in ``state_dir``."""
    return resolve_settings(get_settings())


def url_unset(url: SecretStr | None) -> bool:
    return url is None or not url.get_secret_value()


def url_complete(url: str) -> bool:
    return bool(url) and "***" not in url


def pid_alive(pid: int, *, created_before: float | None = None) -> bool:
    """Return whether ``pid`` runs (not a zombie) and, if given, was created before that epoch time."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return created_before is None or proc.create_time() <= created_before
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
