"""Logging (core.observability.configure_logging) writes to the standard error of the moment."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import structlog

from core.observability import configure_logging


def test_logging_outlives_a_swapped_and_closed_standard_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Configured while sys.stderr was a stand-in that is closed afterwards (what typer's CliRunner does
    around a command), a log call writes to the restored stream instead of raising "I/O operation on
    closed file" (a test running the command tree through CliRunner made the later tests of its pytest
    worker fail so)."""
    stand_in = io.StringIO()
    with contextlib.redirect_stderr(stand_in):
        configure_logging("INFO", "json", force=True)
        structlog.get_logger("test").info("while_swapped")
    stand_in.close()
    structlog.get_logger("test").info("after_restore", n=1)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line)["event"] == "after_restore"
    configure_logging(force=True)
