"""The run-summary processor: fold a run's agent events into totals and draw its ``run.summary`` insight.

* :mod:`processors.run_summary.logic`: the decision logic, plain Python (no Kafka).
* :mod:`processors.run_summary.app`: the Faust app (``run_totals`` table, the agent) on the worker shell
  (:mod:`processors.shell`), and the worker runner. Imported on first use of its names, so that reading
  the logic does not load Faust.
"""

from typing import Any

from processors.run_summary.logic import (
    INSIGHT_KIND,
    INSIGHT_SCHEMA,
    LLM_CALL,
    RUN_LIFECYCLE,
    TOOL_CALL,
    RunTotals,
    apply,
    classify,
    insight_id,
    reissue,
    run_id_of,
)

_APP_NAMES = (
    "DEFAULT_APP_ID",
    "PROCESSOR_NAME",
    "ProcessorStats",
    "ProcessorTopics",
    "create_app",
    "ensure_run_summary_topics",
    "run_worker",
    "wait_for_run_summaries",
)

__all__ = [
    "DEFAULT_APP_ID",
    "INSIGHT_KIND",
    "INSIGHT_SCHEMA",
    "LLM_CALL",
    "PROCESSOR_NAME",
    "RUN_LIFECYCLE",
    "TOOL_CALL",
    "ProcessorStats",
    "ProcessorTopics",
    "RunTotals",
    "apply",
    "classify",
    "create_app",
    "ensure_run_summary_topics",
    "insight_id",
    "reissue",
    "run_id_of",
    "run_worker",
    "wait_for_run_summaries",
]


def __getattr__(name: str) -> Any:
    if name in _APP_NAMES:
        from processors.run_summary import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
