"""The ``backbone`` command starts without importing what only some commands need (Faust, the
configuration store, the projections, PostgreSQL and Redis clients, scikit-learn, torch), and the defaults
the CLI writes out to stay light equal the library's."""

from __future__ import annotations

import inspect
import subprocess
import sys
from datetime import timedelta
from typing import Any

HEAVY = (
    "faust",
    "configuration",
    "projections",
    "eventsourcing",
    "psycopg",
    "redis",
    "sklearn",
    "torch",
    "numpy",
    "httpx",
)


def test_mounting_every_command_imports_none_of_the_heavy_modules() -> None:
    """Every ``backbone`` call mounts all commands; before 2026-12-07 that imported Faust, the configuration
    store and the projections (2.5 s a call, 0.9 s since)."""
    code = (
        "import sys\nfrom backbone.cli import app, mount\nmount(app)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == ""


def _default(fn: Any, name: str) -> Any:
    value = inspect.signature(fn).parameters[name].default
    return getattr(value, "default", value)  # typer.Option(...) as the default, or Annotated


def test_the_cli_defaults_are_the_librarys() -> None:
    from backbone.cli import cdc, config, connectors
    from backbone.cli.correlation import correlate
    from backbone.cli.processors import worker
    from configuration.relay import CONFIG_TOPIC
    from connectors import kafka_connect
    from connectors.cdc import CHANGES_TOPIC, DEFAULT_TOPIC_PREFIX
    from processors.correlation import app as correlation_app
    from processors.correlation.logic import (
        DEFAULT_COMMIT_RETENTION,
        DEFAULT_MIN_COSINE,
        DEFAULT_RETENTION,
        DEFAULT_WINDOW,
    )
    from processors.correlation.masked import MaskedConfig
    from processors.run_summary import app as run_summary_app

    assert _default(correlate, "app_id") == correlation_app.DEFAULT_APP_ID
    assert timedelta(hours=_default(correlate, "window_hours")) == DEFAULT_WINDOW
    assert _default(correlate, "min_cosine") == DEFAULT_MIN_COSINE
    assert _default(correlate, "discussion_min_history") == MaskedConfig().min_history
    assert timedelta(days=_default(correlate, "retention_days")) == DEFAULT_RETENTION
    assert timedelta(days=_default(correlate, "commit_retention_days")) == DEFAULT_COMMIT_RETENTION
    assert _default(worker, "app_id") == run_summary_app.DEFAULT_APP_ID
    assert config.CONFIG_TOPIC == CONFIG_TOPIC
    assert connectors.DEFAULT_CONNECT_URL == kafka_connect.DEFAULT_CONNECT_URL
    assert (cdc.CHANGES_TOPIC, cdc.DEFAULT_TOPIC_PREFIX) == (CHANGES_TOPIC, DEFAULT_TOPIC_PREFIX)
