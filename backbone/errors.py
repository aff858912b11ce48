"""Errors of the top floor: the embedded dev stack and the HTTP app (the root is :mod:`core.errors`)."""

from __future__ import annotations

from core.errors import BackboneError

__all__ = ["BackboneError", "StackError"]


class StackError(BackboneError, RuntimeError):
    """The embedded dev stack could not start, stop or be found."""
