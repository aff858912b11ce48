"""Processors: Faust workers that turn the log into insights and decisions. Decision logic is plain Python
(no Kafka in it); each Faust app is a thin configuration of the one worker shell.

* :mod:`processors.shell`: the worker shell every processor configures: the Faust app and its consumer,
  topics, dead letters, counters as Prometheus metrics, ``/metrics``, ``/healthz`` and ``/readyz``, the
  worker's lifecycle and stop-when-idle.
* :mod:`processors.tables`: Faust tables recovered to the real end of their changelogs.
* :mod:`processors.run_summary`: agent events -> run totals -> ``run.summary`` insights.
* :mod:`processors.correlation`: Slack messages <-> commits, by reference and by embeddings.
* :mod:`processors.routing`: which model serves a request.
* :mod:`processors.errors`: the errors of this package.
"""

from processors.errors import ProcessorError, RunMismatchError, UnprocessableEventError, UnsupportedEventError

__all__ = ["ProcessorError", "RunMismatchError", "UnprocessableEventError", "UnsupportedEventError"]
