"""What-if replay of recorded routing history, and the A/B comparison of outcomes.

A history folder holds (JSON Lines, one object a line, in the order the worker applied them):

* ``events.jsonl``: ``{"type": "config", "version": N, "value": {...routing.config...}}``,
  ``{"type": "circuit", "model": M, "state": "open"}``, ``{"type": "request", ...}`` (a
  :class:`~processors.routing.policy.PolicyRequest` as JSON) and ``{"type": "outcome", ...}`` (an
  :class:`~processors.routing.policy.Outcome` as JSON);
* ``decisions.jsonl``: the live decisions (:meth:`PolicyDecision.to_json`), first decision of each
  request first, fallback decisions after it;
* optionally ``router.npz`` + ``router.json``: the router artifact whose online learner the worker
  started from (without it the learner is absent and every quality is 0.5).

:func:`simulate` replays the events through :class:`~processors.routing.policy.RoutingState` (outcomes
teach the learner exactly as they did live) and decides each request twice on the same state: with the
live rule (the request's policy, else the A/B split, else the default) and with the candidate policy.
With the live rule it reproduces the live decisions exactly (``identical``). Cost and latency of a
decision are the router's estimates; quality is the real outcome when the decision's model is the one
that served live, else the learner's estimate (counted apart as ``estimated_quality_share``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from processors.routing.errors import RoutingDataError
from processors.routing.policy import (
    Outcome,
    PolicyDecision,
    PolicyRequest,
    RoutingState,
    next_fallback,
    route,
    setup_from_config,
)
from processors.routing.scorers import OnlineQuality

__all__ = ["WHAT_IF_POLICY", "ab_report", "read_history", "record", "simulate", "write_history"]

WHAT_IF_POLICY = "what-if"
"""Name under which a policy read from a file joins every configuration version during a replay."""


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        raise RoutingDataError(f"{path}: no such file")
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise RoutingDataError(f"{path}:{lineno}: not JSON: {exc}") from exc
            if not isinstance(item, dict):
                raise RoutingDataError(f"{path}:{lineno}: not a JSON object")
            yield item


@dataclass(frozen=True, slots=True)
class History:
    """A history folder read back: ``events`` and live ``decisions`` (dicts) and the learner (or None)."""

    events: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    learner: OnlineQuality | None


def read_history(directory: Path | str) -> History:
    """Read a history folder (see the module docstring).

    Raises:
        RoutingDataError: a missing file, a line that is not a JSON object, an unknown event type.
        RouterArtifactError: an unreadable ``router.npz``.
    """
    directory = Path(directory)
    events = list(_jsonl(directory / "events.jsonl"))
    for i, e in enumerate(events, 1):
        if e.get("type") not in ("config", "circuit", "request", "outcome"):
            raise RoutingDataError(f"{directory / 'events.jsonl'}:{i}: unknown event type {e.get('type')!r}")
    decisions = (
        list(_jsonl(directory / "decisions.jsonl")) if (directory / "decisions.jsonl").is_file() else []
    )
    learner = None
    if (directory / "router.npz").is_file():
        from processors.routing.artifact import Router

        learner = Router.load(directory / "router.npz").quality()
    return History(events, decisions, learner)


def _apply(state: RoutingState, event: Mapping[str, Any]) -> None:
    kind = event["type"]
    if kind == "config":
        state.on_config(event["value"], int(event["version"]))
    elif kind == "circuit":
        state.on_circuit(str(event["model"]), str(event["state"]))
    elif kind == "outcome":
        state.on_outcome(Outcome.from_json(event))


def record(events: Iterable[Mapping[str, Any]], learner: OnlineQuality | None) -> list[PolicyDecision]:
    """Run events through a fresh state as the worker does and return the decisions (first decisions;
    a failed outcome of the decided model adds the fallback decision right after it)."""
    state = RoutingState(learner=learner.copy() if learner is not None else None)
    out: list[PolicyDecision] = []
    last: dict[str, tuple[PolicyDecision, PolicyRequest]] = {}
    for e in events:
        if e["type"] == "request":
            req = PolicyRequest.from_json(e)
            d = state.on_request(req)
            last[req.request_id] = (d, req)
            out.append(d)
        else:
            _apply(state, e)
            if e["type"] == "outcome" and not e.get("success", True) and e["request_id"] in last:
                prev, req = last[e["request_id"]]
                if prev.model == e["model"]:
                    fb = next_fallback(prev, state.setup, req, state.health(), state.learner)  # type: ignore[arg-type]
                    last[req.request_id] = (fb, req)
                    out.append(fb)
    return out


def write_history(
    directory: Path | str, events: Iterable[Mapping[str, Any]], decisions: Iterable[PolicyDecision]
) -> Path:
    """Write ``events.jsonl`` and ``decisions.jsonl`` under ``directory``; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "events.jsonl").write_text(
        "".join(json.dumps(e, default=str) + "\n" for e in events), encoding="utf-8"
    )
    (directory / "decisions.jsonl").write_text(
        "".join(json.dumps(d.to_json()) + "\n" for d in decisions), encoding="utf-8"
    )
    return directory


def _policy_source(
    spec: str, live_policies: set[str]
) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
    """(policy name to force, a policy rule to inject, a whole config to use) from KEY_OR_FILE."""
    path = Path(spec)
    if path.is_file():
        value = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(value, dict):
            raise RoutingDataError(f"{path}: a JSON object (a policy rule or a routing.config value)")
        if "policies" in value:
            setup_from_config(value)  # raises with the field named
            return str(value["default_policy"]), None, value
        if "kind" in value:
            return WHAT_IF_POLICY, value, None
        raise RoutingDataError(
            f"{path}: neither a policy rule (kind, models) nor a routing.config (policies)"
        )
    name = spec.removeprefix("routing.config.policies.").removeprefix("routing.policy.")
    if name not in live_policies:
        raise RoutingDataError(
            f"{spec}: neither a file nor a policy of the live config ({', '.join(sorted(live_policies))})"
        )
    return name, None, None


def _summary(decisions: list[PolicyDecision], outcomes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    served = [d for d in decisions if d.model is not None]
    cost = sum(next(c.est_cost_usd for c in d.candidates if c.chosen) for d in served)
    lat = [next(c.est_latency_ms for c in d.candidates if c.chosen) for d in served]
    quality, estimated = [], 0
    for d in served:
        o = outcomes.get(d.request_id)
        if o is not None and o["model"] == d.model and o.get("correct") is not None:
            quality.append(float(bool(o["correct"])))
        elif o is not None and o["model"] == d.model:
            quality.append(float(bool(o["success"])))
        else:
            estimated += 1
            quality.append(next(c.learned_quality for c in d.candidates if c.chosen))
    models: dict[str, int] = {}
    for d in served:
        models[d.model] = models.get(d.model, 0) + 1  # type: ignore[index]
    return {
        "requests": len(decisions),
        "served": len(served),
        "unservable": len(decisions) - len(served),
        "est_cost_usd": round(cost, 6),
        "quality": round(float(np.mean(quality)), 4) if quality else None,
        "estimated_quality_share": round(estimated / len(served), 4) if served else None,
        "est_latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if lat else None,
        "models": dict(sorted(models.items())),
    }


def simulate(history: History, policy: str) -> dict[str, Any]:
    """Replay ``history`` with the live rule and with ``policy`` (a live policy name, or a JSON file of a
    policy rule or of a whole ``routing.config``) side by side.

    Returns:
        ``{"live": summary, "candidate": summary, "policy": name, "identical": bool, "mismatches": n,
        "changed_decisions": n}``: ``identical`` compares the replayed live-rule decisions with the
        recorded ones field by field; ``changed_decisions`` counts requests where the candidate chose
        another model than the live rule.

    Raises:
        RoutingDataError: a policy that is neither a file nor a live policy.
        RoutingConfigError: a policy or config file that does not parse (the field named).
    """
    live_names: set[str] = set()
    for e in history.events:
        if e["type"] == "config":
            live_names |= set(e["value"].get("policies", {}))
    name, rule, whole = _policy_source(policy, live_names)
    live_state = RoutingState(learner=history.learner.copy() if history.learner is not None else None)
    cand_setup_state = RoutingState()
    replayed: list[PolicyDecision] = []
    candidate: list[PolicyDecision] = []
    outcomes: dict[str, dict[str, Any]] = {}
    live_value: dict[str, Any] = {}
    for e in history.events:
        if e["type"] == "request":
            req = PolicyRequest.from_json(e)
            replayed.append(live_state.on_request(req))
            if whole is not None:
                cand_setup_state.setup = setup_from_config(whole, 0)
            elif rule is not None:
                value = {**live_value, "policies": {**live_value["policies"], WHAT_IF_POLICY: rule}}
                cand_setup_state.setup = setup_from_config(value, live_state.setup.config_version)  # type: ignore[union-attr]
            else:
                cand_setup_state.setup = live_state.setup
            candidate.append(
                route(
                    cand_setup_state.setup, replace(req, policy=name), live_state.health(), live_state.learner
                )
            )  # type: ignore[arg-type]
        else:
            if e["type"] == "config":
                live_value = e["value"]
            if e["type"] == "outcome":
                outcomes.setdefault(str(e["request_id"]), e)
            _apply(live_state, e)
    firsts: dict[str, dict[str, Any]] = {}
    for d in history.decisions:
        firsts.setdefault(str(d["request_id"]), d)
    recorded = [firsts.get(d.request_id) for d in replayed]
    mismatches = sum(1 for d, r in zip(replayed, recorded, strict=True) if r != d.to_json())
    return {
        "policy": name,
        "live": _summary(replayed, outcomes),
        "candidate": _summary(candidate, outcomes),
        "identical": bool(history.decisions) and mismatches == 0,
        "mismatches": mismatches,
        "changed_decisions": sum(1 for a, b in zip(replayed, candidate, strict=True) if a.model != b.model),
    }


def ab_report(history: History) -> list[dict[str, Any]]:
    """Outcomes per A/B arm of the recorded decisions (first decision per request) and outcomes.

    Returns:
        One row per arm (``a``, ``b``; requests with no arm are left out): policy, requests, served,
        unservable, fallbacks taken, success rate, accuracy (labelled outcomes), real cost in USD
        (sum and per request), latency p50/p95 in ms.
    """
    first: dict[str, dict[str, Any]] = {}
    fallbacks: dict[str, int] = {}
    for d in history.decisions:
        rid = str(d["request_id"])
        if rid in first:
            fallbacks[rid] = fallbacks.get(rid, 0) + 1
        else:
            first[rid] = d
    outs: dict[str, list[dict[str, Any]]] = {}
    for e in history.events:
        if e["type"] == "outcome":
            outs.setdefault(str(e["request_id"]), []).append(e)
    rows = []
    for arm in ("a", "b"):
        ds = [d for d in first.values() if d.get("ab_arm") == arm]
        if not ds:
            continue
        os_ = [o for d in ds for o in outs.get(str(d["request_id"]), [])]
        final = [outs[str(d["request_id"])][-1] for d in ds if outs.get(str(d["request_id"]))]
        labelled = [o for o in final if o.get("correct") is not None]
        lat = [float(o["latency_ms"]) for o in os_ if o.get("latency_ms") is not None]
        cost = sum(float(o.get("cost_usd") or 0.0) for o in os_)
        rows.append({
            "arm": arm,
            "policy": ds[0]["policy"],
            "requests": len(ds),
            "served": sum(1 for d in ds if d.get("model")),
            "unservable": sum(1 for d in ds if not d.get("model")),
            "fallbacks_taken": sum(fallbacks.get(str(d["request_id"]), 0) for d in ds),
            "success_rate": round(sum(bool(o["success"]) for o in final) / len(final), 4) if final else None,
            "accuracy": round(sum(bool(o["correct"]) for o in labelled) / len(labelled), 4) if labelled else None,
            "cost_usd": round(cost, 6),
            "cost_usd_per_request": round(cost / len(ds), 8),
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if lat else None,
            "latency_ms_p95": round(float(np.percentile(lat, 95)), 1) if lat else None,
        })  # fmt: skip
    return rows
