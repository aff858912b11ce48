"""The top floor, the only place that wires the packages together: the ``backbone`` CLI
(:mod:`backbone.cli`), the HTTP app (:mod:`backbone.http`), the embedded dev-stack launcher
(:mod:`backbone.devstack`) and the public client (:mod:`backbone.client`)."""

from backbone.errors import StackError

__all__ = ["StackError"]
