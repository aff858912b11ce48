"""Processors: the Faust app and its agents. Decision logic is plain Python (no Kafka in it); each
Faust agent is a thin shell around it.

* :mod:`processors.run_summary`: fold a run's agent events into totals, draw the ``run.summary`` insight.
* :mod:`processors.app`: the Faust app (``run_totals`` table, the run-summary agent), the worker runner.
* :mod:`processors.errors`: the errors of this package.
"""

from processors.app import (
    DEFAULT_APP_ID,
    PROCESSOR_NAME,
    ProcessorStats,
    ProcessorTopics,
    create_app,
    ensure_processor_topics,
    run_worker,
    wait_for_run_summaries,
)
from processors.errors import ProcessorError, RunMismatchError, UnprocessableEventError, UnsupportedEventError
from processors.run_summary import INSIGHT_KIND, RunTotals, apply, classify, insight_id

__all__ = [
    "DEFAULT_APP_ID",
    "INSIGHT_KIND",
    "PROCESSOR_NAME",
    "ProcessorError",
    "ProcessorStats",
    "ProcessorTopics",
    "RunMismatchError",
    "RunTotals",
    "UnprocessableEventError",
    "UnsupportedEventError",
    "apply",
    "classify",
    "create_app",
    "ensure_processor_topics",
    "insight_id",
    "run_worker",
    "wait_for_run_summaries",
]
