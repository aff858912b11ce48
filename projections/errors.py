"""Errors of the projections.

The tree::

    BackboneError                      (backbone.errors)
    └── ProjectionError
        ├── ProjectionApplyError        a view could not apply a record (the record is dead-lettered)
        ├── CheckpointError             the checkpoint table disagrees with the log
        └── projections.cdc.TableNotFoundError (LookupError)   no captured rows for that table
"""

from __future__ import annotations

from core.errors import BackboneError

__all__ = ["CheckpointError", "ProjectionApplyError", "ProjectionError"]


class ProjectionError(BackboneError):
    """Root of the projection errors."""


class ProjectionApplyError(ProjectionError, ValueError):
    """A view refused a record (its data breaks the view's rules); the runner dead-letters it."""


class CheckpointError(ProjectionError):
    """A stored checkpoint is beyond the end of its partition (the log was reset under it)."""
