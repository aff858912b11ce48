"""Errors of the processors (the Faust app and the decision logic of its agents).

The tree::

    BackboneError                      (backbone.errors)
    └── ProcessorError                          root of everything raised by :mod:`processors`
        └── UnprocessableEventError (ValueError) a decoded event a processor cannot take: a schema it does
            │                                    not handle, or data that contradicts its state
            ├── UnsupportedEventError            the event's schema is not one the processor handles
            └── RunMismatchError                 the event is about another run than the state it is applied to

An agent never lets these out of its loop: it dead-letters the record with the error as the reason
and goes on with the next record.
"""

from __future__ import annotations

from core.errors import BackboneError

__all__ = ["ProcessorError", "RunMismatchError", "UnprocessableEventError", "UnsupportedEventError"]


class ProcessorError(BackboneError):
    """Root of the errors raised by :mod:`processors`."""


class UnprocessableEventError(ProcessorError, ValueError):
    """A decoded event that a processor cannot take.

    Attributes:
        event_id: the CloudEvents id of the event, when known.
        reason: what is wrong, in one line.
    """

    def __init__(self, reason: str, *, event_id: str | None = None) -> None:
        super().__init__(reason if event_id is None else f"event {event_id}: {reason}")
        self.event_id = event_id
        self.reason = reason


class UnsupportedEventError(UnprocessableEventError):
    """The event's schema is not one the processor handles."""


class RunMismatchError(UnprocessableEventError):
    """The event belongs to another run than the state it was applied to."""
