"""What-if replay, A/B report and the routing CLI commands (typer CliRunner on the module's app)."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backbone.cli.routing_policy import app
from processors.routing.policy import Outcome, PolicyRequest, RoutingState, next_fallback
from processors.routing.simulate import ab_report, read_history, record, simulate, write_history
from tests.unit.test_routing_policy import CONFIG, QUALITY, T0, _learner

PROMPTS = [
    "Calculate 17 * 23.",
    "Which of the following is a mammal?\\nA. cat\\nB. eel",
    "Write a haiku.",
    "Solve x^2 = 4",
]


def _events() -> list[dict]:
    cfg = {**CONFIG, "ab": {"policy_a": "cheap", "policy_b": "best", "weight_a": 0.5}}
    events: list[dict] = [{"type": "config", "version": 1, "value": cfg}]
    for i in range(60):
        at = T0 + timedelta(seconds=i)
        req = PolicyRequest(request_id=f"req-{i}", requested_at=at, prompt=PROMPTS[i % 4] + f" ({i})")
        events.append({"type": "request", **req.to_json()})
        if i == 20:
            events.append({"type": "circuit", "model": "small", "state": "open"})
        if i == 35:
            events.append({"type": "circuit", "model": "small", "state": "closed"})
        if i == 40:  # a config change: cheap's quality target goes up
            events.append({"type": "config", "version": 2, "value": {**cfg, "policies": {
                **cfg["policies"], "cheap": {**cfg["policies"]["cheap"], "quality_target": 0.8}}}})  # fmt: skip
    return events


def _outcome(rid: str, model: str, i: int, ok: bool, ms: int, correct: bool | None, latency: float) -> dict:
    return {"type": "outcome", "request_id": rid, "model": model, "success": ok, "correct": correct,
            "latency_ms": latency, "cost_usd": 0.001,
            "occurred_at": (T0 + timedelta(seconds=i, milliseconds=ms)).isoformat()}  # fmt: skip


def _build(directory: Path) -> Path:
    """Run the state machine as the worker does, writing an outcome after each decision (the first try
    of every 7th request fails and its fallback serves); then record the decisions from the events."""
    state = RoutingState(learner=_learner(QUALITY))
    events: list[dict] = []
    for e in _events():
        events.append(e)
        if e["type"] == "config":
            state.on_config(e["value"], e["version"])
        elif e["type"] == "circuit":
            state.on_circuit(e["model"], e["state"])
        else:
            req = PolicyRequest.from_json(e)
            d = state.on_request(req)
            if d.model is None:
                continue
            i = int(req.request_id.split("-")[1])
            ok = i % 7 != 0
            out = _outcome(
                d.request_id, d.model, i, ok, 500, (i % 3 != 0) if ok else None, 100.0 + 10 * (i % 5)
            )
            events.append(out)
            state.on_outcome(Outcome.from_json(out))
            if not ok:
                fb = next_fallback(d, state.setup, req, state.health(), state.learner)
                out = _outcome(d.request_id, fb.model, i, True, 900, True, 150.0)
                events.append(out)
                state.on_outcome(Outcome.from_json(out))
    return write_history(directory, events, record(events, _learner(QUALITY)))


@pytest.fixture(scope="module")
def hist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("routing") / "hist")


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "hist"
    shutil.copytree(src, dst)
    return dst


def test_simulate_reproduces_the_live_decisions_and_compares_a_candidate(
    hist_dir: Path, tmp_path: Path
) -> None:
    hist = hist_dir
    live = [json.loads(x) for x in (hist / "decisions.jsonl").read_text().splitlines()]
    assert any(d["fallback_from"] for d in live)  # a fallback was taken after a failure
    assert {d["config_version"] for d in live} == {1, 2}
    learner = _learner(QUALITY)
    history = read_history(hist)
    history = type(history)(history.events, history.decisions, learner)
    same = simulate(history, "cheap")
    assert same["identical"] and same["mismatches"] == 0
    rule = tmp_path / "fast.json"
    rule.write_text(json.dumps({"kind": "lowest_latency", "models": ["big", "small", "tiny"]}))
    what_if = simulate(history, str(rule))
    assert what_if["policy"] == "what-if" and what_if["changed_decisions"] > 0
    assert what_if["candidate"]["est_cost_usd"] < what_if["live"]["est_cost_usd"]
    assert simulate(history, str(rule)) == what_if  # deterministic


def test_a_tampered_history_is_not_identical(hist_dir: Path, tmp_path: Path) -> None:
    hist = _copy(hist_dir, tmp_path)
    lines = (hist / "decisions.jsonl").read_text().splitlines()
    d = json.loads(lines[3])
    d["model"] = "tiny" if d["model"] != "tiny" else "big"
    lines[3] = json.dumps(d)
    (hist / "decisions.jsonl").write_text("\n".join(lines) + "\n")
    history = read_history(hist)
    out = simulate(type(history)(history.events, history.decisions, _learner(QUALITY)), "cheap")
    assert not out["identical"] and out["mismatches"] == 1


def test_ab_report_and_cli(hist_dir: Path) -> None:
    hist = hist_dir
    rows = ab_report(read_history(hist))
    assert [r["arm"] for r in rows] == ["a", "b"] and {r["policy"] for r in rows} == {"cheap", "best"}
    assert sum(r["requests"] for r in rows) == 60 and sum(r["fallbacks_taken"] for r in rows) >= 1
    runner = CliRunner()
    res = runner.invoke(app, ["ab", str(hist), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == rows
    res = runner.invoke(app, ["simulate", "--policy", "best", "--data", str(hist), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["policy"] == "best"
    res = runner.invoke(app, ["simulate", "--policy", "nope", "--data", str(hist)])
    assert res.exit_code == 2 and "neither a file nor a policy" in res.output


def test_eval_cli_on_a_responses_csv_offline_online_and_all(tmp_path: Path) -> None:
    """fit + eval on a RouteLLM-layout responses CSV (hand-written rows): the JSON has the issue's keys."""
    rows = ["prompt,gpt-4-1106-preview,gpt-4-1106-preview_response,mistralai/Mixtral-8x7B-Instruct-v0.1,"
            "mistralai/Mixtral-8x7B-Instruct-v0.1_response"]  # fmt: skip
    for i in range(300):
        hard = i % 3 == 0
        prompt = f"Calculate {i} * {i + 7} + {i % 11}." if hard else f"Which of the following is item {i}?"
        rows.append(f'"{prompt}",{"True" if i % 5 else "False"},"a",{"False" if hard else "True"},"b"')
    data = tmp_path / "gsm8k_responses.csv"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    runner = CliRunner()
    res = runner.invoke(app, ["fit", "--data", str(data), "--out", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    keys = {"prompts", "apgr", "cpt50", "strong_share_at_95pct", "usd_saved_at_95pct"}
    for extra in ([], ["--online"], ["--all"]):
        res = runner.invoke(
            app, ["eval", "--router", str(tmp_path / "r.npz"), "--data", str(data), "--json", *extra]
        )
        assert res.exit_code == 0, res.output
        report = json.loads(res.output)
        assert keys <= set(report)
        assert report["apgr"] > 0.8  # the features see "Calculate": strong wins exactly there
        assert report["prompts"] == (300 if extra == ["--all"] else report["prompts"])
