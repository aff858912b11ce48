"""The ground floor: settings (:mod:`core.settings`), the root error (:mod:`core.errors`), logging and
metrics (:mod:`core.observability`), and reading a running dev stack into settings (:mod:`core.stack`).

It imports nothing else of the project; every other package may import it.
"""

from core.errors import BackboneError
from core.settings import (
    KafkaSettings,
    PostgresSettings,
    RedisSettings,
    SchemaRegistrySettings,
    Settings,
    get_settings,
)
from core.stack import StackInfo, load_settings, read_stack, resolve_settings

__all__ = [
    "BackboneError",
    "KafkaSettings",
    "PostgresSettings",
    "RedisSettings",
    "SchemaRegistrySettings",
    "Settings",
    "StackInfo",
    "get_settings",
    "load_settings",
    "read_stack",
    "resolve_settings",
]
