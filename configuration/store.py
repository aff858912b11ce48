"""The configuration store: versions, time travel, rollback and optimistic concurrency on PostgreSQL.

:class:`ConfigurationApplication` is an ``eventsourcing`` application whose persistence is
``eventsourcing.postgres``, configured from :class:`core.settings.Settings` (the libpq URI in
``settings.postgres.url`` is parsed with psycopg's conninfo, never from hand-read environment
variables). It snapshots each :class:`~configuration.aggregate.ConfigurationItem` every
``snapshot_interval`` versions, so reading the current value of a key with a long history reads one
snapshot and fewer than ``snapshot_interval`` events.

:class:`ConfigStore` is the API the CLI and services use: ``set``, ``get`` (by version or instant),
``history`` (with a diff to the previous version), ``rollback``, ``retire`` and ``keys``. Every
refused command (bad key, value failing its schema, unknown key or version, stale expected version,
retired key) raises before anything is written.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Self
from uuid import UUID

import psycopg
import structlog
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError
from eventsourcing.utils import get_topic
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from configuration.aggregate import ChangeKind, ConfigurationItem, aggregate_id_for
from configuration.errors import (
    ConcurrentChangeError,
    ConfigNotFoundError,
    ConfigRetiredError,
    ConfigStoreUnavailableError,
    ConfigVersionNotFoundError,
    StaleVersionError,
)
from configuration.schemas import ValueSchemaRegistry, check_key, default_schemas
from core.settings import PostgresSettings, Settings, get_settings
from streams.envelope import deterministic_id

__all__ = [
    "DEFAULT_SNAPSHOT_INTERVAL",
    "ConfigStore",
    "ConfigVersion",
    "ConfigurationApplication",
    "KeyInfo",
    "diff_values",
    "event_id_for",
    "eventsourcing_env",
]

log = structlog.get_logger(__name__)

#: Versions between two snapshots of a configuration item.
DEFAULT_SNAPSHOT_INTERVAL = 100
_WRITE_ATTEMPTS = 20
_RETRY_PAUSE_SECONDS = 0.002
_KEYS_PAGE = 500


def event_id_for(aggregate_id: UUID | str, version: int) -> str:
    """The event id of a stored configuration event: ``deterministic_id("config", aggregate id, version)``.

    The relay uses it as the CloudEvents ``id``, so a re-published event keeps its id and consumers
    de-duplicate by it.
    """
    return deterministic_id("config", str(aggregate_id), version)


def eventsourcing_env(
    postgres: PostgresSettings, *, snapshot_interval: int = DEFAULT_SNAPSHOT_INTERVAL, schema: str = ""
) -> dict[str, str]:
    """The ``eventsourcing`` environment for its PostgreSQL persistence module, from the settings.

    Args:
        postgres: the PostgreSQL settings; ``dsn()`` is a libpq URI or key/value string.
        snapshot_interval: versions between snapshots (> 0).
        schema: PostgreSQL schema of the tables; empty for the connection's default (``public``).

    Returns:
        ``PERSISTENCE_MODULE``, ``POSTGRES_DBNAME/HOST/PORT/USER/PASSWORD``, pool size and snapshotting keys.

    Raises:
        ValueError: no PostgreSQL URL is configured, or the URL names no database.
    """
    info = conninfo_to_dict(postgres.dsn())
    if not info.get("dbname"):
        raise ValueError("the PostgreSQL URL names no database (postgresql://user@host:port/DBNAME)")
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(info["dbname"]),
        "POSTGRES_HOST": str(info.get("host") or "127.0.0.1"),
        "POSTGRES_PORT": str(info.get("port") or "5432"),
        "POSTGRES_USER": str(info.get("user") or "postgres"),
        "POSTGRES_PASSWORD": str(info.get("password") or ""),
        "POSTGRES_POOL_SIZE": str(postgres.pool_max_size),
        "POSTGRES_CONNECT_TIMEOUT": str(info.get("connect_timeout") or 10),
        "IS_SNAPSHOTTING_ENABLED": "y",
        "CREATE_TABLE": "y",
    }
    if schema:
        env["POSTGRES_SCHEMA"] = schema
    return env


#: Key of the PostgreSQL advisory lock held while the tables are created (an arbitrary signed 64-bit
#: constant of this project).
CREATE_TABLES_LOCK_KEY = 5_349_180_417_202_612_061


@contextmanager
def _creating_tables(env: Mapping[str, str]) -> Iterator[None]:
    """Hold :data:`CREATE_TABLES_LOCK_KEY` (``pg_advisory_lock``, on a connection of its own, released when
    it closes) while the eventsourcing recorder creates its tables, when ``env`` asks it to
    (``CREATE_TABLE``) on PostgreSQL. Two processes opening the store at once on a database without the
    tables (the demo's healer and policy router) ran ``CREATE TABLE IF NOT EXISTS`` together, and one failed
    with PostgreSQL's "tuple concurrently updated"; serialised, the second finds the tables.

    Raises:
        OperationalError: (eventsourcing's) PostgreSQL cannot be reached.
    """
    if env.get("PERSISTENCE_MODULE") != "eventsourcing.postgres" or env.get("CREATE_TABLE", "").lower() not in (
        "y", "yes", "t", "true", "on", "1"
    ):  # fmt: skip
        yield
        return
    conninfo = make_conninfo(
        dbname=env["POSTGRES_DBNAME"], host=env.get("POSTGRES_HOST"), port=env.get("POSTGRES_PORT"),
        user=env.get("POSTGRES_USER"), password=env.get("POSTGRES_PASSWORD") or None,
        connect_timeout=env.get("POSTGRES_CONNECT_TIMEOUT", "10"),
    )  # fmt: skip
    try:
        conn = psycopg.connect(conninfo, autocommit=True)
    except psycopg.OperationalError as exc:
        raise OperationalError(str(exc)) from exc
    with conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (CREATE_TABLES_LOCK_KEY,))
        yield


class ConfigurationApplication(Application[UUID]):
    """The eventsourcing application of configuration items (tables ``configuration_events``,
    ``configuration_snapshots``), created when missing by one process at a time (:func:`_creating_tables`).

    Args:
        env: the eventsourcing environment (see :func:`eventsourcing_env`).
        snapshot_interval: versions between snapshots.
    """

    name = "Configuration"
    snapshotting_intervals: ClassVar[dict[type[Any], int]] = {ConfigurationItem: DEFAULT_SNAPSHOT_INTERVAL}

    def __init__(
        self, env: Mapping[str, str] | None = None, *, snapshot_interval: int = DEFAULT_SNAPSHOT_INTERVAL
    ):
        if snapshot_interval <= 0:
            raise ValueError(f"snapshot_interval must be > 0, got {snapshot_interval}")
        self.snapshotting_intervals = {ConfigurationItem: snapshot_interval}  # type: ignore[misc]
        env = dict(env or {})
        with _creating_tables(env):
            super().__init__(env)


#: Topics (eventsourcing class paths) of the item's events, used to filter the notification log.
CREATED_TOPIC = get_topic(ConfigurationItem.Created)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigVersion:
    """One version of a configuration key, as stored.

    Attributes:
        key: the key.
        version: the version (1 for the first).
        value: the value at this version (a JSON object); for a retirement, the last value.
        author: who made the change.
        reason: why.
        changed_at: when the change was stored (aware UTC).
        change: ``CREATED``, ``CHANGED``, ``ROLLED_BACK`` or ``RETIRED``.
        schema_name: name of the schema the value was validated against, or ``None``.
        causation_id: id of the command or decision that asked for it, or ``None``.
        restored_version: for a rollback, the version whose value it restored.
        rolled_back_from_version: for a rollback, the version that was current before it.
        retired: whether the key is retired at this version.
        event_id: id of the stored event (the CloudEvents id on ``config.changes``).
        diff: for history entries, the changes from the previous version's value (see :func:`diff_values`).
    """

    key: str
    version: int
    value: dict[str, Any]
    author: str
    reason: str
    changed_at: datetime
    change: str
    schema_name: str | None = None
    causation_id: str | None = None
    restored_version: int | None = None
    rolled_back_from_version: int | None = None
    retired: bool = False
    event_id: str = ""
    diff: tuple[dict[str, Any], ...] = field(default=())

    @classmethod
    def of(cls, item: ConfigurationItem) -> ConfigVersion:
        """The version an aggregate is at."""
        return cls(
            key=item.key,
            version=item.version,
            value=item.value,
            author=item.author,
            reason=item.reason,
            changed_at=item.modified_on.astimezone(UTC),
            change=item.change,
            schema_name=item.schema_name,
            causation_id=item.causation_id,
            restored_version=item.restored_version,
            rolled_back_from_version=item.rolled_back_from_version,
            retired=item.retired,
            event_id=event_id_for(item.id, item.version),
        )

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict (``changed_at`` as ISO 8601)."""
        d = {
            "key": self.key,
            "version": self.version,
            "value": self.value,
            "author": self.author,
            "reason": self.reason,
            "changed_at": self.changed_at.isoformat(),
            "change": self.change,
            "schema_name": self.schema_name,
            "causation_id": self.causation_id,
            "restored_version": self.restored_version,
            "rolled_back_from_version": self.rolled_back_from_version,
            "retired": self.retired,
            "event_id": self.event_id,
        }
        if self.diff:
            d["diff"] = list(self.diff)
        return d


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyInfo:
    """A key in the listing of ``backbone config keys``.

    Attributes:
        key: the key.
        version: its current version.
        schema_name: the schema registered for it now, or ``None``.
        retired: whether it is retired.
        changed_at: when its current version was stored.
    """

    key: str
    version: int
    schema_name: str | None
    retired: bool
    changed_at: datetime

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "key": self.key,
            "version": self.version,
            "schema_name": self.schema_name,
            "retired": self.retired,
            "changed_at": self.changed_at.isoformat(),
        }


def diff_values(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The differences between two JSON objects, field by field (nested objects by dotted path).

    Returns:
        ``[{"path": "a.b", "op": "added"|"removed"|"changed", "old": ..., "new": ...}]`` sorted by path.
    """
    out: list[dict[str, Any]] = []

    def walk(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str) -> None:
        for k in sorted(set(a) | set(b)):
            path = f"{prefix}{k}"
            if k not in a:
                out.append({"path": path, "op": "added", "old": None, "new": b[k]})
            elif k not in b:
                out.append({"path": path, "op": "removed", "old": a[k], "new": None})
            elif isinstance(a[k], Mapping) and isinstance(b[k], Mapping):
                walk(a[k], b[k], f"{path}.")
            elif a[k] != b[k] or type(a[k]) is not type(b[k]):
                out.append({"path": path, "op": "changed", "old": a[k], "new": b[k]})

    walk(old or {}, new or {}, "")
    return out


@contextmanager
def _database(what: str) -> Iterator[None]:
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        raise ConfigStoreUnavailableError(f"PostgreSQL unavailable while {what}: {exc}") from exc


class ConfigStore:
    """Configuration keys as event-sourced aggregates in PostgreSQL.

    Args:
        settings: the settings (PostgreSQL URL); default :func:`core.settings.get_settings`.
        schemas: value schemas by key or prefix; default :func:`configuration.schemas.default_schemas`.
        snapshot_interval: versions between snapshots.

    Raises:
        ValueError: no PostgreSQL URL configured.
        ConfigStoreUnavailableError: PostgreSQL cannot be reached.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        schemas: ValueSchemaRegistry | None = None,
        snapshot_interval: int = DEFAULT_SNAPSHOT_INTERVAL,
    ) -> None:
        self.settings = settings or get_settings()
        self.schemas = schemas if schemas is not None else default_schemas()
        env = eventsourcing_env(self.settings.postgres, snapshot_interval=snapshot_interval)
        with _database("opening the configuration store"):
            self.app = ConfigurationApplication(env, snapshot_interval=snapshot_interval)

    def close(self) -> None:
        """Release the connection pool."""
        self.app.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- reads

    def _load(self, key: str, version: int | None = None) -> ConfigurationItem:
        check_key(key)
        with _database(f"reading {key!r}"):
            try:
                return self.app.repository.get(aggregate_id_for(key), version=version)
            except AggregateNotFoundError as exc:
                raise ConfigNotFoundError(key) from exc

    def _timestamp_of(self, aggregate_id: UUID, version: int) -> datetime:
        events = list(self.app.events.get(aggregate_id, gt=version - 1, lte=version))
        return events[0].timestamp

    def _version_at(self, key: str, at: datetime) -> int:
        if at.tzinfo is None:
            raise ValueError("naive datetime: give the instant with a time zone (or Z for UTC)")
        current = self._load(key)
        if at >= current.modified_on:
            return current.version
        if at < current.created_on:
            raise ConfigVersionNotFoundError(
                key,
                current.version,
                f"configuration key {key!r} did not exist at {at.isoformat()} "
                f"(created {current.created_on.isoformat()})",
            )
        lo, hi = 1, current.version  # ts(lo) <= at < ts(hi)
        with _database(f"reading the history of {key!r}"):
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self._timestamp_of(current.id, mid) <= at:
                    lo = mid
                else:
                    hi = mid
        return lo

    def get(self, key: str, *, version: int | None = None, at: datetime | None = None) -> ConfigVersion:
        """The key's value now, at ``version``, or as it was at the instant ``at``.

        Args:
            key: the configuration key.
            version: a version number (1-based); exclusive with ``at``.
            at: an aware instant; the version current then is returned.

        Raises:
            ConfigKeyError: malformed key.
            ConfigNotFoundError: the key does not exist.
            ConfigVersionNotFoundError: the version does not exist, or the key did not exist yet at ``at``.
            ConfigStoreUnavailableError: PostgreSQL cannot be reached.
            ValueError: both ``version`` and ``at``, or a naive ``at``.
        """
        if version is not None and at is not None:
            raise ValueError("give a version or an instant, not both")
        if at is not None:
            version = self._version_at(key, at)
        if version is not None:
            current = self._load(key)
            if not 1 <= version <= current.version:
                raise ConfigVersionNotFoundError(
                    key,
                    current.version,
                    f"configuration key {key!r} has versions 1..{current.version}, not {version}",
                )
            if version == current.version:
                return ConfigVersion.of(current)
            return ConfigVersion.of(self._load(key, version))
        return ConfigVersion.of(self._load(key))

    def history(self, key: str) -> list[ConfigVersion]:
        """Every version of the key, oldest first, each with its diff to the previous value.

        Raises:
            ConfigKeyError, ConfigNotFoundError, ConfigStoreUnavailableError: as for :meth:`get`.
        """
        check_key(key)
        aid = aggregate_id_for(key)
        out: list[ConfigVersion] = []
        item: ConfigurationItem | None = None
        with _database(f"reading the history of {key!r}"):
            for event in self.app.events.get(aid):
                previous = item.value if item is not None else None
                item = event.mutate(item)  # type: ignore[attr-defined]
                assert item is not None
                v = ConfigVersion.of(item)
                out.append(
                    ConfigVersion(
                        **{
                            **{f: getattr(v, f) for f in ConfigVersion.__slots__ if f != "diff"},
                            "diff": tuple(diff_values(previous, item.value)),
                        }
                    )
                )
        if not out:
            raise ConfigNotFoundError(key)
        return out

    def keys(self) -> list[KeyInfo]:
        """Every key with its current version and schema, sorted by key.

        Raises:
            ConfigStoreUnavailableError: PostgreSQL cannot be reached.
        """
        keys: list[str] = []
        start: int | None = None
        with _database("listing configuration keys"):
            while True:
                page = self.app.recorder.select_notifications(
                    start, _KEYS_PAGE, topics=[CREATED_TOPIC], inclusive_of_start=False
                )
                for n in page:
                    keys.append(self.app.mapper.to_domain_event(n).key)  # type: ignore[attr-defined]
                if len(page) < _KEYS_PAGE:
                    break
                start = page[-1].id
        out = []
        for key in sorted(keys):
            item = self._load(key)
            out.append(
                KeyInfo(
                    key=key,
                    version=item.version,
                    schema_name=self.schemas.schema_name(key),
                    retired=item.retired,
                    changed_at=item.modified_on.astimezone(UTC),
                )
            )
        return out

    # --------------------------------------------------------------- writes

    def _write(
        self, key: str, expected_version: int | None, command: Any, *, create: Any | None = None
    ) -> ConfigVersion:
        """Load, check the expected version, apply ``command`` and save; retry on a lost race
        when no version was expected."""
        check_key(key)
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                item: ConfigurationItem | None = self._load(key)
            except ConfigNotFoundError:
                if create is None:
                    raise
                item = None
            current_version = item.version if item is not None else 0
            if expected_version is not None and expected_version != current_version:
                raise StaleVersionError(key, expected_version, current_version)
            if item is None:
                item = create()
            else:
                if item.retired:
                    raise ConfigRetiredError(f"configuration key {key!r} is retired (version {item.version})")
                command(item)
            try:
                with _database(f"writing {key!r}"):
                    self.app.save(item)
            except IntegrityError as exc:
                latest = self._current_version(key)
                if expected_version is not None:
                    raise ConcurrentChangeError(key, expected_version, latest) from exc
                log.info("config.write_retry", key=key, attempt=attempt + 1, current_version=latest)
                time.sleep(random.uniform(0, _RETRY_PAUSE_SECONDS * (attempt + 1)))
                continue
            version = ConfigVersion.of(item)
            log.info(
                "config.written",
                key=key,
                version=version.version,
                change=version.change,
                event_id=version.event_id,
                causation_id=version.causation_id,
            )
            return version
        raise ConcurrentChangeError(key, current_version, self._current_version(key))

    def _current_version(self, key: str) -> int:
        try:
            return self._load(key).version
        except ConfigNotFoundError:
            return 0

    def set(
        self,
        key: str,
        value: Any,
        *,
        author: str,
        reason: str,
        expected_version: int | None = None,
        causation_id: str | None = None,
    ) -> ConfigVersion:
        """Store a new version of ``key`` (creating the key when it does not exist).

        Args:
            key: the configuration key.
            value: a JSON object; validated against the key's schema when one is registered.
            author: who asks for the change (non-empty).
            reason: why (non-empty).
            expected_version: the version the caller read (0: the key must not exist yet);
                ``None`` for last-writer-wins.
            causation_id: id of the command or decision event that asked for it.

        Returns:
            the new version.

        Raises:
            ConfigKeyError: malformed key.
            ConfigValueError: not a JSON object, or fails its schema.
            StaleVersionError: ``expected_version`` is not the current version (its message names the current one).
            ConcurrentChangeError: another writer stored that version first.
            ConfigRetiredError: the key is retired.
            ConfigStoreUnavailableError: PostgreSQL cannot be reached.
            ValueError: empty author or reason.
        """
        check_key(key)
        _require_who_and_why(author, reason)
        stored, schema_name = self.schemas.validate(key, value)
        return self._write(
            key,
            expected_version,
            lambda item: item.change_value(
                stored, author=author, reason=reason, schema_name=schema_name, causation_id=causation_id
            ),
            create=lambda: ConfigurationItem.create(
                key, stored, author=author, reason=reason, schema_name=schema_name, causation_id=causation_id
            ),
        )

    def rollback(
        self,
        key: str,
        *,
        author: str,
        reason: str,
        to_version: int | None = None,
        to_time: datetime | None = None,
        expected_version: int | None = None,
        causation_id: str | None = None,
    ) -> ConfigVersion:
        """Append a version whose value is that of ``to_version`` (or of the version current at ``to_time``).

        The new version records the restored version and the version it rolled back from; nothing
        is deleted or rewritten. The restored value is checked against the key's schema of today.

        Raises:
            ConfigNotFoundError: the key does not exist.
            ConfigVersionNotFoundError: no such version, or the key did not exist at ``to_time``.
            ConfigValueError: the old value fails the key's current schema.
            StaleVersionError, ConcurrentChangeError, ConfigRetiredError, ConfigStoreUnavailableError:
                as for :meth:`set`.
            ValueError: neither or both of ``to_version`` and ``to_time``; empty author or reason.
        """
        if (to_version is None) == (to_time is None):
            raise ValueError("give exactly one of to_version and to_time")
        _require_who_and_why(author, reason)
        target = self.get(key, version=to_version, at=to_time)
        if target.change == ChangeKind.RETIRED:
            raise ConfigVersionNotFoundError(
                key,
                target.version,
                f"version {target.version} of {key!r} is a retirement; pick a version with a value",
            )
        stored, schema_name = self.schemas.validate(key, target.value)
        return self._write(
            key,
            expected_version,
            lambda item: item.roll_back(
                stored,
                restored_version=target.version,
                author=author,
                reason=reason,
                schema_name=schema_name,
                causation_id=causation_id,
            ),
        )

    def retire(
        self,
        key: str,
        *,
        author: str,
        reason: str,
        expected_version: int | None = None,
        causation_id: str | None = None,
    ) -> ConfigVersion:
        """Retire the key: a last version after which it takes no changes (its history stays).

        Raises:
            ConfigNotFoundError, StaleVersionError, ConcurrentChangeError, ConfigRetiredError,
            ConfigStoreUnavailableError: as for :meth:`set`.
        """
        _require_who_and_why(author, reason)
        return self._write(
            key,
            expected_version,
            lambda item: item.retire(author=author, reason=reason, causation_id=causation_id),
        )


def _require_who_and_why(author: str, reason: str) -> None:
    if not author or not author.strip():
        raise ValueError("a configuration change needs an author")
    if not reason or not reason.strip():
        raise ValueError("a configuration change needs a reason")


def value_from_json(text: str) -> Any:
    """Decode a JSON value given on the command line or in a file.

    Raises:
        ValueError: not JSON (the message has the position).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the value is not JSON: {exc}") from exc
