"""The one record of an input an importer could not take: importers report it and go on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ImportProblem"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportProblem:
    """A file, line or record an importer could not import; the import goes on with the next one.

    Attributes:
        reason: what is wrong, in one line.
        path: the file, when the problem is a whole file (or the file of ``line``).
        line: 1-based line number, when the problem is one line of a file.
        sent: ``True`` when the input was still produced (to an explicit raw topic, where the
            consumer dead-letters it), ``False`` when it was left out.
    """

    reason: str
    path: Path | None = None
    line: int | None = None
    sent: bool = False

    def where(self) -> str:
        """``path:line``, ``path``, ``line N`` or ``-``: where the problem is, for a report."""
        if self.path is not None and self.line is not None:
            return f"{self.path}:{self.line}"
        if self.path is not None:
            return str(self.path)
        return f"line {self.line}" if self.line is not None else "-"
