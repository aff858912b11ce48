"""Just enough PromQL reading for the deployment checks: metric names and label names an expression uses."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))

_METRIC = re.compile(r"(?<![:\w])(backbone_[a-z0-9_]+|up)(?=\s*(\{|\[|\)|$|\s|/|>|<|=|\*|\+|-))")
_SELECTOR = re.compile(r"(?<![:\w])(backbone_[a-z0-9_]+|up)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)")
_RECORDED = re.compile(r"(?<![\w])(backbone:[a-z0-9_:]+)")


def metrics(expr: str) -> set[str]:
    """Sample names (``backbone_*`` and ``up``) the expression selects."""
    return {m.group(1) for m in _METRIC.finditer(expr)}


def selector_labels(expr: str) -> dict[str, set[str]]:
    """``{sample name: label names matched in its {...} selector}``."""
    out: dict[str, set[str]] = {}
    for m in _SELECTOR.finditer(expr):
        out.setdefault(m.group(1), set()).update(_MATCHER.findall(m.group(2)))
    return out


def grouping_labels(expr: str) -> set[str]:
    """Label names of every ``by``/``on``/``without``/``ignoring`` clause."""
    return {w.strip() for m in _GROUPING.finditer(expr) for w in m.group(1).split(",") if w.strip()}


def recorded(expr: str) -> set[str]:
    """Recording-rule series (``backbone:...``) the expression reads."""
    return set(_RECORDED.findall(expr))


def rule_groups() -> list[tuple[Path, dict]]:
    """Every rule of every rule file, with its file."""
    return [
        (path, rule)
        for path in RULES
        for g in yaml.safe_load(path.read_text())["groups"]
        for rule in g["rules"]
    ]


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """``(dashboard file, panel title, expr)`` of every panel target."""
    import json

    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((path.name, panel["title"], target["expr"]))
    return out
