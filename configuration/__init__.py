"""Configuration as event-sourced aggregates: versions, time travel, rollback, and every change on the log.

``ConfigStore`` (PostgreSQL, eventsourcing) writes and reads versions; ``OutboxRelay`` publishes every
stored event to ``config.changes``; ``ConfigProjection`` keeps the Redis current-value model;
``Config.current(KEY)`` reads it. The CLI is :data:`backbone.cli.config.app` (``backbone config ...``).
"""

from configuration.aggregate import ChangeKind, ConfigurationItem, aggregate_id_for
from configuration.errors import (
    ConcurrentChangeError,
    ConfigKeyError,
    ConfigNotFoundError,
    ConfigRetiredError,
    ConfigStoreUnavailableError,
    ConfigurationError,
    ConfigValueError,
    ConfigVersionNotFoundError,
    RelayError,
    StaleVersionError,
)
from configuration.projection import Config, ConfigProjection, CurrentValue
from configuration.relay import CONFIG_TOPIC, CONFIG_TOPICS, OutboxRelay, RelayMetrics
from configuration.schemas import ValueSchemaRegistry, default_schemas
from configuration.store import ConfigStore, ConfigurationApplication, ConfigVersion, KeyInfo, diff_values

__all__ = [
    "CONFIG_TOPIC",
    "CONFIG_TOPICS",
    "ChangeKind",
    "ConcurrentChangeError",
    "Config",
    "ConfigKeyError",
    "ConfigNotFoundError",
    "ConfigProjection",
    "ConfigRetiredError",
    "ConfigStore",
    "ConfigStoreUnavailableError",
    "ConfigValueError",
    "ConfigVersion",
    "ConfigVersionNotFoundError",
    "ConfigurationApplication",
    "ConfigurationError",
    "ConfigurationItem",
    "CurrentValue",
    "KeyInfo",
    "OutboxRelay",
    "RelayError",
    "RelayMetrics",
    "StaleVersionError",
    "ValueSchemaRegistry",
    "aggregate_id_for",
    "default_schemas",
    "diff_values",
]
