"""Write the Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel lists below.

Run from the repository root: ``python deploy/grafana/gen_dashboards.py``. tests/deploy/test_metrics.py
checks that the JSON files are this script's output and that every metric a panel queries is exported
by the process that owns it. Units are Grafana's unit ids (``s``, ``ops``, ``short``).
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# dashboard uid -> (title, [(panel title, unit, [(expr, legend)])])
DASHBOARDS: dict[str, tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = {
    "backbone-pipeline": (
        "Sophia backbone: pipeline",
        [
            (
                "Processes up",
                "short",
                [
                    (
                        'up{job=~"processor-.+|projections|config-relay|cdc-normaliser|inference|api"}',
                        "{{job}}",
                    )
                ],
            ),
            ("Consumer lag (seconds to drain)", "s", [("backbone:consumer_lag_seconds", "{{consumer}}")]),
            (
                "Projection lag (events behind the log)",
                "short",
                [("max by (projection) (backbone_projection_lag_events)", "{{projection}}")],
            ),
            (
                "Projection events applied /s",
                "ops",
                [
                    (
                        "sum by (projection) (rate(backbone_projection_events_applied_total[5m]))",
                        "{{projection}}",
                    )
                ],
            ),
            (
                "Projection batch time p95",
                "s",
                [
                    (
                        "histogram_quantile(0.95, sum by (projection, le) (rate(backbone_projection_batch_seconds_bucket[5m])))",
                        "{{projection}}",
                    )
                ],
            ),
            ("Dead letters /s by process", "ops", [("backbone:dead_letters:rate5m", "{{job}}")]),
            (
                "Config relay: unpublished events",
                "short",
                [
                    ("max(backbone_config_relay_lag_events)", "lag"),
                    ("sum(rate(backbone_config_relay_published_events_total[5m]))", "published /s"),
                ],
            ),
            (
                "Config relay errors /s",
                "ops",
                [("sum by (kind) (rate(backbone_config_relay_errors_total[5m]))", "{{kind}}")],
            ),
            (
                "CDC changes normalised /s",
                "ops",
                [
                    ("sum(rate(backbone_cdc_changes_normalised_total[5m]))", "RowChanged"),
                    ("sum(rate(backbone_cdc_tombstones_skipped_total[5m]))", "tombstones"),
                ],
            ),
            (
                "API requests /s by status",
                "ops",
                [("sum by (status) (rate(backbone_api_requests_total[5m]))", "{{status}}")],
            ),
            (
                "API latency p95 by route",
                "s",
                [
                    (
                        "histogram_quantile(0.95, sum by (route, le) (rate(backbone_api_request_seconds_bucket[5m])))",
                        "{{route}}",
                    )
                ],
            ),
        ],
    ),
    "backbone-processors": (
        "Sophia backbone: processors",
        [
            (
                "Run summary: records /s",
                "ops",
                [("sum by (app) (rate(backbone_processor_records_total[5m]))", "{{app}}")],
            ),
            (
                "Run summary: applied, duplicate, late /s",
                "ops",
                [
                    ("sum(rate(backbone_processor_events_applied_total[5m]))", "applied"),
                    ("sum(rate(backbone_processor_events_duplicate_total[5m]))", "duplicate"),
                    ("sum(rate(backbone_processor_events_late_total[5m]))", "late"),
                ],
            ),
            (
                "Run summary: insights /s",
                "ops",
                [("sum(rate(backbone_processor_insights_total[5m]))", "insights")],
            ),
            (
                "Correlation: records and links /s",
                "ops",
                [
                    ("sum(rate(backbone_correlation_records_total[5m]))", "records"),
                    ("sum(rate(backbone_correlation_reference_links_total[5m]))", "reference links"),
                    ("sum(rate(backbone_correlation_embedding_links_total[5m]))", "embedding links"),
                    ("sum(rate(backbone_correlation_discussion_links_total[5m]))", "discussion links"),
                    ("sum(rate(backbone_correlation_embedding_requests_total[5m]))", "embedding requests"),
                ],
            ),
            (
                "Routing: decisions /s by method",
                "ops",
                [("sum by (method) (rate(backbone_routing_decisions_total[5m]))", "{{method}}")],
            ),
            (
                "Routing: requests waiting for their embedding",
                "short",
                [("sum(backbone_routing_pending)", "pending")],
            ),
            (
                "Dead letters /s by processor",
                "ops",
                [
                    ("sum(rate(backbone_processor_dead_letters_total[5m]))", "run summary"),
                    ("sum(rate(backbone_correlation_dead_letters_total[5m]))", "correlation"),
                    ("sum(rate(backbone_routing_dead_letters_total[5m]))", "routing"),
                    ("sum(rate(backbone_healing_dead_letters_total[5m]))", "healing"),
                    ("sum(rate(backbone_incidents_dead_letters_total[5m]))", "incidents"),
                ],
            ),
            (
                "Healing: circuits open or half-open",
                "short",
                [("max by (circuit) (backbone_circuit_open)", "{{circuit}}")],
            ),
            (
                "Healing: decisions /s",
                "ops",
                [("sum(rate(backbone_healing_decisions_total[5m]))", "decisions")],
            ),
            (
                "Incidents opened (last hour) by priority",
                "short",
                [("sum by (priority) (increase(backbone_incidents_opened_total[1h]))", "{{priority}}")],
            ),
        ],
    ),
    "backbone-inference": (
        "Sophia backbone: inference",
        [
            (
                "Requests /s by outcome",
                "ops",
                [
                    (
                        "sum by (model, outcome) (rate(backbone_inference_requests_total[5m]))",
                        "{{model}} {{outcome}}",
                    )
                ],
            ),
            (
                "Batch time p50 / p95",
                "s",
                [
                    (
                        "histogram_quantile(0.5, sum by (model, le) (rate(backbone_inference_batch_duration_seconds_bucket[5m])))",
                        "{{model}} p50",
                    ),
                    (
                        "histogram_quantile(0.95, sum by (model, le) (rate(backbone_inference_batch_duration_seconds_bucket[5m])))",
                        "{{model}} p95",
                    ),
                ],
            ),
            (
                "Batch size p50 / p95 (requests)",
                "short",
                [
                    (
                        "histogram_quantile(0.5, sum by (model, le) (rate(backbone_inference_batch_size_requests_bucket[5m])))",
                        "{{model}} p50",
                    ),
                    (
                        "histogram_quantile(0.95, sum by (model, le) (rate(backbone_inference_batch_size_requests_bucket[5m])))",
                        "{{model}} p95",
                    ),
                ],
            ),
            (
                "Consumer lag (requests)",
                "short",
                [("max by (model) (backbone_inference_consumer_lag_messages)", "{{model}}")],
            ),
            ("Actors", "short", [("max by (model) (backbone_inference_actors)", "{{model}}")]),
        ],
    ),
}


def dashboard(uid: str, title: str, panels: list[tuple[str, str, list[tuple[str, str]]]]) -> dict:
    """One Grafana dashboard (schema version 39): time-series panels two to a row, 8 units high."""
    out = []
    for i, (ptitle, unit, targets) in enumerate(panels):
        out.append({
            "id": i + 1,
            "type": "timeseries",
            "title": ptitle,
            "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [
                {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + j)}
                for j, (expr, legend) in enumerate(targets)
            ],
        })  # fmt: skip
    return {
        "uid": uid,
        "title": title,
        "tags": ["sophia-backbone"],
        "schemaVersion": 39,
        "editable": False,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "utc",
        "panels": out,
    }


def render() -> dict[str, str]:
    """``{file name: JSON text}`` of every dashboard."""
    return {
        f"{uid}.json": json.dumps(dashboard(uid, t, p), indent=2) + "\n" for uid, (t, p) in DASHBOARDS.items()
    }


if __name__ == "__main__":
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name)
