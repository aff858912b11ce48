"""The root of every error the backbone raises.

The tree (each package's ``errors.py`` draws its own branch)::

    BackboneError
    ├── streams.errors.StreamsError              the log: envelope, schemas, serde, producer, broker
    ├── projections.errors.ProjectionError       projection runner and views
    ├── processors.errors.ProcessorError         the Faust processors and their logic
    ├── connectors.errors.ConnectorError         importers, Kafka Connect tooling, webhook mappers
    ├── configuration.errors.ConfigurationError  the config store and its relay
    ├── inference.errors.InferenceError          the Ray inference workers
    └── backbone.errors.StackError / ApiError    the embedded dev stack, the HTTP app
"""

from __future__ import annotations

__all__ = ["BackboneError"]


class BackboneError(Exception):
    """Root of all backbone errors."""
