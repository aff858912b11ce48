"""The root of every error the backbone raises.

The tree (each package's ``errors.py`` draws its own branch)::

    BackboneError
    ├── streams.errors.StreamsError          the log: envelope, schemas, serde, producer, broker
    ├── projections.errors.ProjectionError   projection runner and views
    ├── connectors.errors.ConnectorError     importers, Kafka Connect tooling, webhooks
    └── backbone.errors.StackError           the embedded dev stack
"""

from __future__ import annotations

__all__ = ["BackboneError", "StackError"]


class BackboneError(Exception):
    """Root of all backbone errors."""


class StackError(BackboneError, RuntimeError):
    """The embedded dev stack could not start, stop or be found."""
