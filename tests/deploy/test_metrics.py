"""Every metric an alert rule or a Grafana panel uses is exported by the process that should export it,
with the labels the expression uses (read from the code's metric objects: tests/deploy/exported_metrics.py).

The scrape of real processes is tests/deploy/test_prometheus_live.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from exported_metrics import PENDING, exported_by_process, owner
from promql import (
    ROOT,
    dashboard_exprs,
    grouping_labels,
    metrics,
    recorded,
    rule_groups,
    selector_labels,
)

TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped sample
PENDING_FILE = "pending-metrics.yml"


@pytest.fixture(scope="module")
def exported() -> dict[str, dict[str, frozenset[str]]]:
    return exported_by_process()


def _uses() -> list[tuple[str, str]]:
    """``(where, expr)`` of every rule and panel expression, pending rules excluded."""
    out = [
        (f"{p.name}: {r.get('alert') or r.get('record')}", r["expr"])
        for p, r in rule_groups()
        if p.name != PENDING_FILE
    ]
    out += [(f"{f}: {t}", e) for f, t, e in dashboard_exprs()]
    return out


@pytest.mark.parametrize(("where", "expr"), _uses(), ids=[w for w, _ in _uses()])
def test_metric_is_exported_by_its_process_with_its_labels(where: str, expr: str, exported) -> None:
    names = metrics(expr)
    assert names or recorded(expr), f"{where}: reads no metric"
    available: set[str] = set(TARGET_LABELS)
    for name in names - {"up"}:
        job = owner(name)
        assert name in exported[job], (
            f"{where}: {name} is not exported by {job} (it exports {sorted(exported[job])})"
        )
        available |= exported[job][name]
        unknown = selector_labels(expr).get(name, set()) - exported[job][name] - TARGET_LABELS
        assert not unknown, f"{where}: {name} has no label(s) {unknown}"
    if not recorded(expr):  # recording rules add their own labels (consumer, source)
        unknown = grouping_labels(expr) - available
        assert not unknown, f"{where}: groups by label(s) {unknown} that no metric of the expression has"


def test_every_recorded_series_read_is_recorded() -> None:
    records = {r["record"] for _, r in rule_groups() if "record" in r}
    for where, expr in _uses():
        assert recorded(expr) <= records, f"{where}: reads {recorded(expr) - records}, which no rule records"


def test_every_alert_has_a_runbook_section() -> None:
    doc = (ROOT / "docs" / "PRODUCTION.md").read_text().lower()
    for _, rule in rule_groups():
        if "alert" in rule:
            anchor = rule["annotations"]["runbook_url"].split("#")[1]
            assert anchor == rule["alert"].lower()
            assert f"### {rule['alert'].lower()}" in doc, (
                f"docs/PRODUCTION.md has no section for {rule['alert']}"
            )


def test_pending_metrics_are_still_pending(exported) -> None:
    """The pending rules' metrics are exported by no process yet; when one is, move its rule to backbone.yml."""
    pending_rules = [r for p, r in rule_groups() if p.name == PENDING_FILE]
    used = set().union(*(metrics(r["expr"]) for r in pending_rules))
    assert used == set(PENDING)
    code = "\n".join(
        p.read_text()
        for pkg in (
            "core",
            "backbone",
            "streams",
            "processors",
            "projections",
            "connectors",
            "configuration",
            "inference",
        )
        for p in (ROOT / pkg).rglob("*.py")
    )
    for name in PENDING:
        family = name.removesuffix("_total")
        assert f'"{family}"' not in code, (
            f"{family} is now defined in the code: move its alert into backbone.yml"
        )
        assert all(name not in m for m in exported.values())


def test_dashboards_are_the_generator_output() -> None:
    sys.path.insert(0, str(ROOT / "deploy" / "grafana"))
    from gen_dashboards import render

    for name, text in render().items():
        assert (ROOT / "deploy" / "grafana" / "dashboards" / name).read_text() == text, (
            f"run deploy/grafana/gen_dashboards.py ({name})"
        )
