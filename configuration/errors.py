"""Errors of the configuration store.

The tree::

    BackboneError                               (backbone.errors)
    └── ConfigurationError
        ├── ConfigKeyError (ValueError)              a malformed configuration key
        ├── ConfigNotFoundError (LookupError)        a key that was never set (or retired, for reads of the current value)
        ├── ConfigVersionNotFoundError (LookupError) a version or instant the key's history does not have
        ├── ConfigValueError (ValueError)            a value that is not a JSON object or fails its schema
        ├── ConfigRetiredError                       a change to a retired key
        ├── StaleVersionError                        ``expected_version`` is not the current version
        │   └── ConcurrentChangeError                another writer stored the same version first
        ├── ConfigStoreUnavailableError (ConnectionError)  PostgreSQL or Redis cannot be reached
        └── RelayError                               the outbox relay cannot go on
"""

from __future__ import annotations

from core.errors import BackboneError

__all__ = [
    "ConcurrentChangeError",
    "ConfigKeyError",
    "ConfigNotFoundError",
    "ConfigRetiredError",
    "ConfigStoreUnavailableError",
    "ConfigValueError",
    "ConfigVersionNotFoundError",
    "ConfigurationError",
    "RelayError",
    "StaleVersionError",
]


class ConfigurationError(BackboneError):
    """Root of the errors raised by :mod:`configuration`."""


class ConfigKeyError(ConfigurationError, ValueError):
    """A configuration key that does not match the key syntax."""


class ConfigNotFoundError(ConfigurationError, LookupError):
    """A key that has no configuration item.

    Attributes:
        key: the key asked for.
    """

    def __init__(self, key: str, message: str | None = None) -> None:
        self.key = key
        super().__init__(message or f"configuration key {key!r} does not exist")


class ConfigVersionNotFoundError(ConfigurationError, LookupError):
    """A version (or an instant) that the key's history does not have.

    Attributes:
        key: the key.
        current_version: the key's current version.
    """

    def __init__(self, key: str, current_version: int, message: str) -> None:
        self.key = key
        self.current_version = current_version
        super().__init__(message)


class ConfigValueError(ConfigurationError, ValueError):
    """A value that is not a JSON object, or that fails the schema registered for its key.

    Attributes:
        key: the key.
        schema_name: the schema the value failed, or ``None`` when the value is not a JSON object.
        problems: one line per problem, each naming the field path.
    """

    def __init__(self, key: str, schema_name: str | None, problems: list[str]) -> None:
        self.key = key
        self.schema_name = schema_name
        self.problems = problems
        against = f" against schema {schema_name}" if schema_name else ""
        super().__init__(f"invalid value for {key!r}{against}: " + "; ".join(problems))


class ConfigRetiredError(ConfigurationError):
    """A change asked of a retired key (history stays readable; the key takes no new versions)."""


class StaleVersionError(ConfigurationError):
    """The expected version given with a change is not the key's current version.

    Attributes:
        key: the key.
        expected_version: the version the caller expected.
        current_version: the key's current version.
    """

    def __init__(self, key: str, expected_version: int, current_version: int) -> None:
        self.key = key
        self.expected_version = expected_version
        self.current_version = current_version
        super().__init__(
            f"configuration key {key!r} is at version {current_version}, not the expected "
            f"version {expected_version}: re-read it and retry with --expected-version {current_version}"
        )


class ConcurrentChangeError(StaleVersionError):
    """Another writer stored the next version of the key between our read and our write."""


class ConfigStoreUnavailableError(ConfigurationError, ConnectionError):
    """PostgreSQL or Redis cannot be reached."""


class RelayError(ConfigurationError):
    """The outbox relay cannot go on (bad configuration, or an event it cannot map)."""
