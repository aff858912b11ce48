"""The composition root: settings, the ``backbone`` CLI, the embedded dev stack, observability."""

from backbone.errors import BackboneError, StackError
from backbone.settings import (
    KafkaSettings,
    PostgresSettings,
    RedisSettings,
    SchemaRegistrySettings,
    Settings,
    get_settings,
)

__all__ = [
    "BackboneError",
    "KafkaSettings",
    "PostgresSettings",
    "RedisSettings",
    "SchemaRegistrySettings",
    "Settings",
    "StackError",
    "get_settings",
]
