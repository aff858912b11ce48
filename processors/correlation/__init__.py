"""The correlation processor: Slack messages ↔ commits, by explicit reference and by embedding.

* :mod:`processors.correlation.logic`: the decision logic (plain Python, unit-tested).
* :mod:`processors.correlation.app`: the Faust app (repartition by scope, table with changelog, worker).
* :mod:`backbone.cli.correlation`: ``backbone processors correlate``.
"""

from processors.correlation.app import (
    DEFAULT_APP_ID,
    PROCESSOR_NAME,
    CorrelationStats,
    CorrelationTopics,
    create_correlation_app,
    ensure_correlation_topics,
    run_correlation_worker,
)
from processors.correlation.logic import (
    DEFAULT_MIN_COSINE,
    DEFAULT_WINDOW,
    INSIGHT_KIND,
    CorrelationConfig,
    Correlator,
    Link,
    Observation,
    link_id,
    observe,
    parse_request_id,
    request_id_for,
    scope_of,
)

__all__ = [
    "DEFAULT_APP_ID",
    "DEFAULT_MIN_COSINE",
    "DEFAULT_WINDOW",
    "INSIGHT_KIND",
    "PROCESSOR_NAME",
    "CorrelationConfig",
    "CorrelationStats",
    "CorrelationTopics",
    "Correlator",
    "Link",
    "Observation",
    "create_correlation_app",
    "ensure_correlation_topics",
    "link_id",
    "observe",
    "parse_request_id",
    "request_id_for",
    "run_correlation_worker",
    "scope_of",
]
