"""Errors of the routing processor.

The tree::

    BackboneError                              (backbone.errors)
    └── ProcessorError                         (processors.errors)
        ├── UnprocessableEventError (ValueError)   (processors.errors) a route request the router cannot
        │                                          take (unknown policy, candidates without its models,
        │                                          an embedding id of the wrong form): dead-lettered
        └── RoutingError                           root of the errors of :mod:`processors.routing`
            ├── RouterArtifactError (ValueError)   a router file that is missing, unreadable, or whose
            │                                      content does not match its version
            └── RoutingDataError (ValueError)      labelled outcomes that do not parse (a missing column,
                                                   a value other than True/False, no prompt at all)
"""

from __future__ import annotations

from processors.errors import ProcessorError

__all__ = ["RouterArtifactError", "RoutingDataError", "RoutingError"]


class RoutingError(ProcessorError):
    """Root of the errors raised by :mod:`processors.routing`."""


class RouterArtifactError(RoutingError, ValueError):
    """A router artifact that is missing, unreadable, or whose content does not match its version."""


class RoutingDataError(RoutingError, ValueError):
    """Labelled outcomes (prompt, which models were right) that do not parse; the message names file and line."""
