"""What each backbone process exports on ``/metrics``, read from the code's own metric objects.

:func:`exported_by_process` maps a Prometheus job name (a compose service / scrape job of
``deploy/prometheus/prometheus.yml``) to ``{sample name: label names}`` as the process exposes them
(a counter ``x`` is exposed as ``x_total``, a histogram as ``x_bucket``/``x_sum``/``x_count`` with
``le`` on the buckets). It builds them from the modules each process runs, without a broker: the
module-level ``Counter``/``Gauge``/``Histogram`` objects of the global registry, the processors'
scrape-time collectors (with zeroed stats), and the relay's and inference's metric classes.

Metrics exported today (job: family, labels):

* processor-run-summary: backbone_processor_{records,events_applied,events_duplicate,events_late,insights,dead_letters}_total {app}
* processor-correlation: backbone_correlation_{records,events,vectors,skipped,embedding_requests,duplicates,
  reference_links,embedding_links,discussion_links,discussion_late,dead_letters}_total {app}
* processor-routing: backbone_routing_{records,requests,embeddings,dead_letters}_total {app},
  backbone_routing_decisions_total {app, method}, backbone_routing_pending {app}
* projections: backbone_projection_events_{applied,duplicate,dead_lettered}_total, backbone_projection_batch_seconds (histogram),
  backbone_projection_lag_events, all {projection}
* config-relay: backbone_config_relay_lag_events, backbone_config_relay_published_events_total, backbone_config_relay_errors_total {kind}
* cdc-normaliser: backbone_cdc_changes_normalised_total, backbone_cdc_tombstones_skipped_total, backbone_cdc_records_dead_lettered_total
* inference: backbone_inference_requests_total {model, outcome}, backbone_inference_batch_size_requests and
  backbone_inference_batch_duration_seconds (histograms) {model}, backbone_inference_consumer_lag_messages {model},
  backbone_inference_actors {model}
* api: backbone_api_requests_total {method, route, status}, backbone_api_request_seconds (histogram) {method, route}
* processor-healing: backbone_circuit_open {circuit}; backbone_healing_{records,decisions,dead_letters,rollbacks,replayed,state_writes,state_bytes}_total {app}
* processor-incidents: backbone_incidents_opened_total {priority};
  backbone_incidents_{records,forwarded,correlated,insights,late,dead_letters}_total {app}
* processor-anomalies: backbone_anomaly_{records,anomalies,out_of_order,dead_letters}_total {app}
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from prometheus_client.metrics import MetricWrapperBase

SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}


def _from_wrapper(m: MetricWrapperBase) -> dict[str, frozenset[str]]:
    labels = frozenset(m._labelnames)
    out = {}
    for suffix in SUFFIXES[m._type]:
        out[m._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def _from_families(families: Iterable) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for fam in families:
        for sample in fam.samples:
            out[sample.name] = out.get(sample.name, frozenset()) | frozenset(sample.labels)
    return out


def first_module(*names: str):
    """Import the first of ``names`` that exists (module paths before and after the restructure)."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue
            raise
    raise ModuleNotFoundError(f"none of {names}")


def _module_metrics(*modules: str) -> dict[str, frozenset[str]]:
    mod = first_module(*modules)
    module = mod.__name__
    out: dict[str, frozenset[str]] = {}
    for value in vars(mod).values():
        if isinstance(value, MetricWrapperBase):
            out.update(_from_wrapper(value))
    assert out, f"{module} defines no module-level metrics"
    return out


def _object_metrics(obj: object) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    names = getattr(obj, "__dataclass_fields__", None) or vars(obj)
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, MetricWrapperBase):
            out.update(_from_wrapper(value))
    return out


def _collector(modules: tuple[str, ...], stats_class: str) -> dict[str, frozenset[str]]:
    """The scrape-time collector of a processor, over zeroed stats.

    Reads the module's own ``_StatsCollector``, or its ``COUNTERS`` with the worker shell's
    ``processors.shell.StatsCollector`` (after the restructure), plus the extra collector it hands the
    shell (routing's ``_DecisionsCollector``); the first of ``modules`` that imports.
    """
    mod = first_module(*modules)
    stats = getattr(mod, stats_class)()
    if hasattr(mod, "_StatsCollector"):
        collector = mod._StatsCollector(stats, "app-id")
    else:
        from processors.shell import StatsCollector

        collector = StatsCollector(stats, "app-id", mod.COUNTERS)
    out = _from_families(collector.collect())
    if hasattr(mod, "_DecisionsCollector"):  # routing's decisions by method and its pending gauge
        out.update(_from_families(mod._DecisionsCollector(stats, "app-id").collect()))
    return out


def exported_by_process() -> dict[str, dict[str, frozenset[str]]]:
    """``{job: {sample name: label names}}`` for every backbone process (see the module docstring)."""
    from configuration.relay import RelayMetrics
    from inference.metrics import InferenceMetrics

    return {
        "processor-run-summary": _collector(
            ("processors.run_summary.app", "processors.app"), "ProcessorStats"
        ),
        "processor-correlation": _collector(("processors.correlation.app",), "CorrelationStats"),
        "processor-routing": _collector(("processors.routing.app",), "RoutingStats"),
        "projections": _module_metrics("projections.runner"),
        "config-relay": _object_metrics(RelayMetrics.create()),
        "cdc-normaliser": _module_metrics("connectors.cdc.normaliser"),
        "inference": _object_metrics(InferenceMetrics()),
        "api": _module_metrics("backbone.http.app", "backbone.api"),
        "processor-healing": {
            **_collector(("processors.healing.app",), "HealingStats"),
            **_module_metrics("processors.healing.app"),
        },
        "processor-incidents": {
            **_collector(("processors.incidents.app",), "IncidentStats"),
            **_module_metrics("processors.incidents.app"),
        },
        "processor-anomalies": _collector(("processors.incidents.anomaly_app",), "AnomalyStats"),
    }


# Which process must export a metric, by its name's prefix.
OWNER_BY_PREFIX = {
    "backbone_processor_": "processor-run-summary",
    "backbone_correlation_": "processor-correlation",
    "backbone_routing_": "processor-routing",
    "backbone_projection_": "projections",
    "backbone_config_relay_": "config-relay",
    "backbone_cdc_": "cdc-normaliser",
    "backbone_inference_": "inference",
    "backbone_api_": "api",
    "backbone_circuit_": "processor-healing",
    "backbone_healing_": "processor-healing",
    "backbone_incidents_": "processor-incidents",
    "backbone_anomaly_": "processor-anomalies",
}

# Metrics that the alert rules in deploy/prometheus/rules/pending-metrics.yml expect and that no
# process exports yet: none today (healing's backbone_circuit_open and the incidents processor's
# backbone_incidents_opened_total were the last; their rules are in backbone.yml).
PENDING: dict[str, str] = {}


def owner(sample: str) -> str:
    """The job that must export ``sample``; ``KeyError`` for a name with no known owner."""
    for prefix, job in OWNER_BY_PREFIX.items():
        if sample.startswith(prefix):
            return job
    raise KeyError(sample)
