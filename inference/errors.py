"""Errors of the inference layer.

The tree::

    BackboneError                               (backbone.errors)
    └── InferenceError
        ├── InferenceDependencyError (ImportError)  Ray, torch or the model package is not installed
        ├── ModelLoadError (RuntimeError)           the model's files are missing or do not load offline
        ├── RequestError (ValueError)               a request cannot be answered (empty text, bad reference);
        │                                            the actor dead-letters it with this message as the reason
        └── EmbedTimeoutError (TimeoutError)        ``backbone inference embed`` got no answer in time
"""

from __future__ import annotations

from core.errors import BackboneError

__all__ = [
    "EmbedTimeoutError",
    "InferenceDependencyError",
    "InferenceError",
    "ModelLoadError",
    "RequestError",
]


class InferenceError(BackboneError):
    """Root of the errors raised by :mod:`inference`."""


class InferenceDependencyError(InferenceError, ImportError):
    """An optional dependency of the ``inference`` extra is missing (``pip install -e '.[inference]'``)."""


class ModelLoadError(InferenceError, RuntimeError):
    """The model could not be loaded from its local files (nothing is ever downloaded)."""


class RequestError(InferenceError, ValueError):
    """One request cannot be answered; the reason goes to the dead-letter topic."""


class EmbedTimeoutError(InferenceError, TimeoutError):
    """Not every request was answered before the deadline.

    Attributes:
        missing: the request ids without an answer.
    """

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing
