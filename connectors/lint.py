"""Connector spec files and their linter.

A spec file (``connectors/specs/*.yaml``) holds one Kafka Connect connector::

    name: platform-postgres
    config:
      connector.class: io.debezium.connector.postgresql.PostgresConnector
      topic.prefix: platform
      ...

:func:`lint_spec` checks a spec against Debezium 2.x: the keys each connector class requires,
pre-2.0 property names (refused, with the 2.x name), ``schema.history.internal.*`` on a connector
that keeps no schema history, and literal secrets (any secret-looking key whose value is not a Kafka
config-provider reference ``${env:...}``, ``${file:...}`` or ``${directory:...}``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from connectors.errors import ConnectorError

__all__ = [
    "DEFAULT_SPECS_DIR",
    "REQUIRED_KEYS",
    "ConnectorSpec",
    "ConnectorSpecError",
    "LintFinding",
    "LintLevel",
    "is_config_reference",
    "is_secret_key",
    "lint_config",
    "lint_spec",
    "load_spec",
    "load_specs",
]

DEFAULT_SPECS_DIR = Path(__file__).parent / "specs"
"""The folder of this project's connector specs."""


class ConnectorSpecError(ConnectorError, ValueError):
    """A spec file that cannot be read: not YAML, no ``name``/``config``, or a non-scalar value.

    Attributes:
        path: the file.
        reason: what is wrong, in one line.
    """

    def __init__(self, path: Path | None, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path is not None else reason)


class LintLevel(StrEnum):
    """How bad a finding is: an ``error`` fails ``backbone connectors lint``, a ``warning`` does not."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True, kw_only=True)
class LintFinding:
    """One problem in a connector spec.

    Attributes:
        level: error or warning.
        key: the config key concerned (``"name"`` for the connector name).
        message: what is wrong and what to write instead.
    """

    level: LintLevel
    key: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectorSpec:
    """A connector as declared in a spec file.

    Attributes:
        name: the connector name (``name:`` in the file).
        config: the connector configuration, every value a string as Kafka Connect stores it (YAML
            booleans become ``"true"``/``"false"``, numbers their decimal text); ``name`` included.
        path: the file it was read from, or ``None``.
    """

    name: str
    config: dict[str, str]
    path: Path | None = None

    @property
    def connector_class(self) -> str | None:
        """``connector.class``, or ``None`` when absent."""
        return self.config.get("connector.class")


def _to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_spec(path: str | Path) -> ConnectorSpec:
    """Read one spec file.

    Args:
        path: a YAML file with ``name:`` and ``config:`` (a mapping of scalar values).

    Returns:
        The spec, with ``config["name"]`` set to the connector name.

    Raises:
        ConnectorSpecError: the file is unreadable or not YAML, lacks ``name``/``config``, has other
            top-level keys, a non-scalar config value, or a ``config.name`` different from ``name``.
    """
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConnectorSpecError(path, f"cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConnectorSpecError(path, f"not YAML: {exc}") from exc
    if not isinstance(document, Mapping):
        raise ConnectorSpecError(path, "expected a mapping with 'name' and 'config'")
    extra = set(document) - {"name", "config"}
    if extra:
        raise ConnectorSpecError(path, f"unknown top-level key(s): {', '.join(sorted(map(str, extra)))}")
    name = document.get("name")
    config = document.get("config")
    if not isinstance(name, str) or not name.strip():
        raise ConnectorSpecError(path, "'name' must be a non-empty string")
    if not isinstance(config, Mapping):
        raise ConnectorSpecError(path, "'config' must be a mapping of connector properties")
    text: dict[str, str] = {}
    for key, value in config.items():
        if value is None or isinstance(value, Mapping | list):
            raise ConnectorSpecError(path, f"config key {key!r} must have a scalar value, got {value!r}")
        text[str(key)] = _to_text(value)
    if "name" in text and text["name"] != name:
        raise ConnectorSpecError(path, f"config.name {text['name']!r} differs from name {name!r}")
    text["name"] = name
    return ConnectorSpec(name=name, config=text, path=path)


def load_specs(paths: Iterable[str | Path] = ()) -> list[ConnectorSpec]:
    """Read spec files; a folder stands for its ``*.yaml``/``*.yml`` files (sorted).

    Args:
        paths: files or folders; empty means :data:`DEFAULT_SPECS_DIR`.

    Raises:
        ConnectorSpecError: a path does not exist, a file cannot be read (see :func:`load_spec`), or two
            files declare the same connector name.
    """
    files: list[Path] = []
    for raw in list(paths) or [DEFAULT_SPECS_DIR]:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        elif path.exists():
            files.append(path)
        else:
            raise ConnectorSpecError(path, "no such file or folder")
    specs: list[ConnectorSpec] = []
    seen: dict[str, Path | None] = {}
    for file in files:
        spec = load_spec(file)
        if spec.name in seen:
            raise ConnectorSpecError(file, f"connector {spec.name!r} is also declared in {seen[spec.name]}")
        seen[spec.name] = spec.path
        specs.append(spec)
    return specs


# ------------------------------------------------------------------------------------------- rules

_REFERENCE = re.compile(r"\$\{(?:env|file|directory):[^}]+\}")

_SECRET_KEY = re.compile(
    r"(password|passwd|secret|token|credential|sasl\.jaas\.config|basic\.auth\.user\.info"
    r"|api[._-]?key|access[._-]?key|private[._-]?key|ssl\.keystore\.key$|ssl\.key\.password)",
    re.IGNORECASE,
)

_PG = "io.debezium.connector.postgresql.PostgresConnector"
_MYSQL = "io.debezium.connector.mysql.MySqlConnector"
_MARIADB = "io.debezium.connector.mariadb.MariaDbConnector"
_SQLSERVER = "io.debezium.connector.sqlserver.SqlServerConnector"
_ORACLE = "io.debezium.connector.oracle.OracleConnector"
_DB2 = "io.debezium.connector.db2.Db2Connector"
_MONGO = "io.debezium.connector.mongodb.MongoDbConnector"

_HISTORY = ("schema.history.internal.kafka.bootstrap.servers", "schema.history.internal.kafka.topic")

REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    _PG: ("topic.prefix", "database.hostname", "database.user", "database.dbname", "plugin.name"),
    _MYSQL: ("topic.prefix", "database.hostname", "database.user", "database.server.id", *_HISTORY),
    _MARIADB: ("topic.prefix", "database.hostname", "database.user", "database.server.id", *_HISTORY),
    _SQLSERVER: ("topic.prefix", "database.hostname", "database.user", "database.names", *_HISTORY),
    _ORACLE: ("topic.prefix", "database.user", "database.dbname", *_HISTORY),
    _DB2: ("topic.prefix", "database.hostname", "database.user", "database.dbname", *_HISTORY),
    _MONGO: ("topic.prefix", "mongodb.connection.string"),
}
"""Keys each Debezium 2.x connector class needs (the connector refuses to start or picks a poor
default without them; ``plugin.name`` defaults to ``decoderbufs``, which stock Postgres lacks)."""

_NO_SCHEMA_HISTORY = {_PG, _MONGO}

_RENAMED_EXACT: dict[str, str] = {
    "database.server.name": "topic.prefix",
    "mongodb.name": "topic.prefix",
    "table.whitelist": "table.include.list",
    "table.blacklist": "table.exclude.list",
    "schema.whitelist": "schema.include.list",
    "schema.blacklist": "schema.exclude.list",
    "database.whitelist": "database.include.list",
    "database.blacklist": "database.exclude.list",
    "column.whitelist": "column.include.list",
    "column.blacklist": "column.exclude.list",
    "collection.whitelist": "collection.include.list",
    "collection.blacklist": "collection.exclude.list",
    "database.history": "schema.history.internal",
    "database.history.store.only.monitored.tables.ddl": "schema.history.internal.store.only.captured.tables.ddl",
    "database.history.store.only.captured.tables.ddl": "schema.history.internal.store.only.captured.tables.ddl",
}
"""Debezium 1.x property names removed in 2.0, and their 2.x replacement."""


def is_config_reference(value: str) -> bool:
    """Whether ``value`` is exactly one Kafka config-provider reference (``${env:VAR}``,
    ``${file:/path:key}``, ``${directory:/path:file}``)."""
    return _REFERENCE.fullmatch(value.strip()) is not None


def is_secret_key(key: str) -> bool:
    """Whether a config key holds a credential (password, secret, token, JAAS config, API key, ...)."""
    return _SECRET_KEY.search(key) is not None


def _jaas_literal_passwords(value: str) -> list[str]:
    found = re.findall(r"""password\s*=\s*("[^"]*"|'[^']*'|\S+?)(?=\s|;|$)""", value, flags=re.IGNORECASE)
    return [v.strip("\"'") for v in found if not is_config_reference(v.strip("\"'"))]


def _renamed(key: str) -> str | None:
    if key in _RENAMED_EXACT:
        return _RENAMED_EXACT[key]
    if key.startswith("database.history."):
        return "schema.history.internal." + key.removeprefix("database.history.")
    return None


def lint_config(name: str, config: Mapping[str, str]) -> list[LintFinding]:
    """Lint one connector configuration.

    Args:
        name: the connector name.
        config: its properties (string values).

    Returns:
        The findings, errors first, each naming its key; empty when the config is clean.
    """
    findings: list[LintFinding] = []

    def add(level: LintLevel, key: str, message: str) -> None:
        findings.append(LintFinding(level=level, key=key, message=message))

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        add(LintLevel.ERROR, "name", f"connector name {name!r} should use letters, digits, '.', '_', '-'")
    connector_class = config.get("connector.class")
    if not connector_class:
        add(LintLevel.ERROR, "connector.class", "connector.class is required")
    elif connector_class in REQUIRED_KEYS:
        for key in REQUIRED_KEYS[connector_class]:
            if not str(config.get(key, "")).strip() and not any(_renamed(k) == key for k in config):
                add(LintLevel.ERROR, key, f"{key} is required by {connector_class.rsplit('.', 1)[-1]}")
    elif connector_class.startswith("io.debezium."):
        add(LintLevel.WARNING, "connector.class", f"unknown Debezium connector class {connector_class}")

    for key, value in config.items():
        replacement = _renamed(key)
        if replacement is not None:
            add(LintLevel.ERROR, key, f"{key} was removed in Debezium 2.0; use {replacement}")
        if connector_class in _NO_SCHEMA_HISTORY and key.startswith("schema.history.internal"):
            add(
                LintLevel.WARNING,
                key,
                f"{connector_class.rsplit('.', 1)[-1]} keeps no schema history; {key} is ignored",
            )
        if is_secret_key(key):
            text = str(value)
            if key.endswith("sasl.jaas.config"):
                if _jaas_literal_passwords(text):
                    add(
                        LintLevel.ERROR,
                        key,
                        f'{key} has a literal password; write password="${{file:...}}" or ${{env:...}}',
                    )
            elif text == "":
                add(LintLevel.WARNING, key, f"{key} is empty")
            elif not is_config_reference(text):
                add(
                    LintLevel.ERROR,
                    key,
                    f"{key} holds a literal secret; use a config provider reference such as "
                    "${env:VAR} or ${file:/opt/kafka/secrets/<file>.properties:<key>}",
                )
    if connector_class == _PG and config.get("tasks.max", "1") != "1":
        add(LintLevel.WARNING, "tasks.max", "the Postgres connector runs one task; tasks.max > 1 is ignored")
    findings.sort(key=lambda f: (f.level != LintLevel.ERROR, f.key))
    return findings


def lint_spec(spec: ConnectorSpec) -> list[LintFinding]:
    """Lint one spec (see :func:`lint_config`)."""
    return lint_config(spec.name, spec.config)
