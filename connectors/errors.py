"""Errors of the connectors: source adapters, importers and Kafka Connect tooling.

The tree::

    BackboneError                      (backbone.errors)
    └── ConnectorError                          root of everything raised by :mod:`connectors`
        └── SourceDataError (ValueError)        input from a source system that cannot be read as it claims to be
            ├── TrajectoryError                 a file that is not a mini-swe-agent trajectory (names the file)
            └── ResultsFileError                an evaluation results file (``results.csv``) that does not parse

Errors of a single record are not raised out of a bulk import: the importer turns them into data
(:class:`connectors.agent_runs.ImportProblem`) and goes on with the next record.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import BackboneError

__all__ = ["ConnectorError", "ResultsFileError", "SourceDataError", "TrajectoryError"]


class ConnectorError(BackboneError):
    """Root of the errors raised by :mod:`connectors`."""


class SourceDataError(ConnectorError, ValueError):
    """Input from a source system that cannot be read as the format it claims to be.

    Attributes:
        path: the file the input came from, or ``None`` when it did not come from a file.
        reason: what is wrong, in one line.
    """

    def __init__(self, path: Path | None, reason: str) -> None:
        self.path = path
        self.reason = reason
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{reason}")


class TrajectoryError(SourceDataError):
    """A file that is not a mini-swe-agent trajectory: not JSON, not format ``mini-swe-agent-1``, or
    missing what every trajectory has (``messages``, ``info``, at least one timed LLM response)."""


class ResultsFileError(SourceDataError):
    """An evaluation results file (``results.csv``: ``instance_id,resolved,...``) that does not parse."""
