"""The N-model router: config schema, policies, fallback, A/B split, state machine, learner, eval figures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from configuration.errors import ConfigValueError
from configuration.schemas import default_schemas
from processors.errors import UnprocessableEventError
from processors.routing.data import ModelOutcomes, read_responses_csv
from processors.routing.evaluation import call_costs_usd, routing_curve
from processors.routing.features import FEATURE_NAMES, feature_matrix
from processors.routing.policy import (
    ModelHealth,
    Outcome,
    PolicyRequest,
    RoutingState,
    ab_arm,
    next_fallback,
    route,
    setup_from_config,
)
from processors.routing.scorers import OnlineQuality

T0 = datetime(2026, 1, 1, tzinfo=UTC)

CONFIG = {
    "providers": {"openai": {"requests_per_minute": 500}, "mistral": {"requests_per_minute": 900}},
    "models": {
        "big": {"provider": "openai", "capabilities": ["chat", "code"], "context_window_tokens": 128000,
                "usd_per_million_input_tokens": 10.0, "usd_per_million_output_tokens": 30.0, "latency_prior_ms": 2000},
        "small": {"provider": "mistral", "capabilities": ["chat"], "context_window_tokens": 32000,
                  "usd_per_million_input_tokens": 0.6, "usd_per_million_output_tokens": 0.6, "latency_prior_ms": 400},
        "tiny": {"provider": "mistral", "capabilities": ["chat"], "context_window_tokens": 300,
                 "usd_per_million_input_tokens": 0.1, "usd_per_million_output_tokens": 0.1, "latency_prior_ms": 200},
    },
    "policies": {
        "cheap": {"kind": "cheapest", "models": ["big", "small", "tiny"], "quality_target": 0.6},
        "best": {"kind": "best_quality", "models": ["big", "small", "tiny"], "budget_usd": 0.01},
        "fast": {"kind": "lowest_latency", "models": ["big", "small", "tiny"], "latency_target_ms": 1500},
        "learned": {"kind": "learned", "models": ["big", "small", "tiny"], "cost_weight": 0.2},
    },
    "default_policy": "cheap",
}  # fmt: skip


def _learner(q: dict[str, float]) -> OnlineQuality:
    """A learner whose P(right) is ``q[model]`` for every prompt (intercept only)."""
    f = len(FEATURE_NAMES)
    coef = np.zeros((len(q), f + 1))
    coef[:, 0] = [np.log(p / (1 - p)) for p in q.values()]
    return OnlineQuality.from_arrays(list(q), np.zeros(f), np.ones(f), coef)


def _req(i: int = 1, **kw: object) -> PolicyRequest:
    return PolicyRequest(
        request_id=f"r{i}",
        requested_at=T0 + timedelta(seconds=i),
        prompt=kw.pop("prompt", "What is 2+2?"),
        **kw,
    )


QUALITY = {"big": 0.9, "small": 0.65, "tiny": 0.4}


def test_schema_refuses_an_unknown_model_naming_the_field() -> None:
    reg = default_schemas()
    stored, name = reg.validate("routing.config", CONFIG)
    assert name == "RoutingConfig" and stored["policies"]["cheap"]["max_fallbacks"] == 2
    bad = {
        **CONFIG,
        "policies": {**CONFIG["policies"], "x": {"kind": "cheapest", "models": ["small", "gpt-9"]}},
    }
    with pytest.raises(ConfigValueError, match=r"policies\.x\.models\.1: unknown model 'gpt-9'"):
        reg.validate("routing.config", bad)
    with pytest.raises(ConfigValueError, match=r"usd_per_million_input_tokens"):
        reg.validate("routing.config", {**CONFIG, "models": {"m": {"provider": "openai", "context_window_tokens": 1,
                                                                    "usd_per_million_input_tokens": -1,
                                                                    "usd_per_million_output_tokens": 0}}})  # fmt: skip
    with pytest.raises(ConfigValueError, match=r"default_policy: unknown policy"):
        reg.validate("routing.config", {**CONFIG, "default_policy": "nope"})


def test_each_policy_kind_picks_its_model_with_a_fallback_chain() -> None:
    setup = setup_from_config(CONFIG, version=7)
    learner = _learner(QUALITY)
    d = route(setup, _req(), {}, learner)
    assert (
        d.model == "small" and d.fallbacks == ("big", "tiny") and d.config_version == 7
    )  # cheapest meeting 0.6
    assert d.learner_version == learner.version and d.policy == "cheap"
    tiny = next(c for c in d.candidates if c.model == "tiny")
    assert tiny.eligible and "below quality target 0.60" in tiny.reasons[0]
    assert route(setup, _req(policy="best"), {}, learner).model == "big"
    assert route(setup, _req(policy="fast"), {}, learner).model == "tiny"
    # observed latency replaces the prior: tiny slow at p95 now
    slow = {"tiny": ModelHealth(latency_ms={"p50": 100, "p95": 1800, "p99": 2000})}
    d = route(setup, _req(policy="fast"), slow, learner)
    assert d.model == "small" and "too slow" in next(c for c in d.candidates if c.model == "tiny").reasons[0]
    # the learned knob: quality only -> big; cost only -> tiny
    assert route(setup, _req(policy="learned"), {}, learner).model == "big"
    cfg = {
        **CONFIG,
        "policies": {**CONFIG["policies"], "learned": {**CONFIG["policies"]["learned"], "cost_weight": 1.0}},
    }
    assert route(setup_from_config(cfg), _req(policy="learned"), {}, learner).model == "tiny"


def test_constraints_and_a_request_nobody_can_serve() -> None:
    setup = setup_from_config(CONFIG)
    learner = _learner(QUALITY)
    d = route(setup, _req(required_capabilities=("code",)), {}, learner)
    assert d.model == "big" and d.fallbacks == ()
    d = route(setup, _req(prompt="x" * 2000), {}, learner)  # 500 tokens + 256 > tiny's 300-token window
    assert "context window 300" in next(c for c in d.candidates if c.model == "tiny").reasons[0]
    d = route(
        setup, _req(required_capabilities=("code",), budget_usd=1e-6), {"small": ModelHealth("open")}, learner
    )
    assert d.model is None and d.reason.startswith("no model can serve")
    assert "big: missing" not in d.reason and "over budget" in d.reason and "circuit open" in d.reason
    assert (
        route(setup, _req(policy="nope"), {}, learner).reason == "no model can serve: unknown policy 'nope'"
    )


def test_open_circuit_skips_and_half_open_ranks_last_and_fallback_excludes_the_failed() -> None:
    setup = setup_from_config(CONFIG)
    learner = _learner(QUALITY)
    d = route(setup, _req(), {"small": ModelHealth("open")}, learner)
    assert d.model == "big"
    assert next(c for c in d.candidates if c.model == "small").reasons[0] == "circuit open"
    assert route(setup, _req(), {"small": ModelHealth("half_open")}, learner).model == "big"
    first = route(setup, _req(), {}, learner)
    fb = next_fallback(first, setup, _req(), {}, learner)
    assert fb.model == "big" and fb.fallback_from == ("small",) and fb.decision_id != first.decision_id
    assert fb.reason.startswith("fallback after small failed")


def test_ab_split_is_deterministic_and_weighted() -> None:
    arms = [ab_arm(f"req-{i}", 0.3) for i in range(4000)]
    assert arms == [ab_arm(f"req-{i}", 0.3) for i in range(4000)]
    assert 0.27 < arms.count("a") / 4000 < 0.33
    cfg = {**CONFIG, "ab": {"policy_a": "cheap", "policy_b": "best", "weight_a": 0.5}}
    setup = setup_from_config(cfg)
    for i in range(20):
        d = route(setup, _req(i), {}, _learner(QUALITY))
        assert d.policy == ("cheap" if d.ab_arm == "a" else "best") and d.ab_arm == ab_arm(f"r{i}", 0.5)


def test_state_machine_learns_and_replays_identically() -> None:
    def run() -> list[dict]:
        state = RoutingState(learner=_learner(QUALITY))
        state.on_config(CONFIG, 1)
        out = []
        for i in range(30):
            d = state.on_request(_req(i, prompt=f"Compute {i} * 7 = ?"))
            out.append(d.to_json())
            state.on_outcome(Outcome(request_id=d.request_id, model=d.model, success=True, correct=False,
                                     latency_ms=100.0 + i, occurred_at=T0 + timedelta(seconds=i)))  # fmt: skip
            if i == 10:
                state.on_circuit("small", "open")
        return out

    a, b = run(), run()
    assert a == b
    assert len({d["learner_version"] for d in a}) == 30  # every outcome changed the learner
    assert a[11]["model"] != "small"  # the open circuit took effect from the next request
    assert a[0]["model"] == "small"
    with pytest.raises(UnprocessableEventError, match="without prompt or reference"):
        RoutingState(learner=None, setup=setup_from_config(CONFIG)).on_request(
            PolicyRequest(request_id="x", requested_at=T0)
        )


def test_online_learner_moves_towards_outcomes_and_round_trips() -> None:
    prompts = [("Calculate " if i % 2 else "Which of the following ") + str(i) for i in range(200)]
    x = feature_matrix(prompts)
    correct = np.stack([np.ones(200, bool), np.array([i % 2 == 0 for i in range(200)])], axis=1)
    q = OnlineQuality.fit(x, correct, ["a", "b"])
    p = q.predict(x)
    assert p[0, 1] > 0.6 and p[1, 1] < 0.4  # b right only on the "which" prompts
    again = OnlineQuality.from_arrays(q.models, q.mean, q.std, np.array(q.state()["coef"]))
    assert np.allclose(again.predict(x), p)
    before = q.predict(x[1])[1]
    for _ in range(50):
        q.update("b", x[1], True)
    assert q.predict(x[1])[1] > before
    q.update("c", x[0], True)  # a new model joins
    assert q.models == ("a", "b", "c")


def test_responses_csv_reader_and_curve_figures(tmp_path: Path) -> None:
    path = tmp_path / "gsm8k_responses.csv"
    path.write_text(
        "prompt,gpt-4-1106-preview,gpt-4-1106-preview_response,mistralai/Mixtral-8x7B-Instruct-v0.1,"
        "mistralai/Mixtral-8x7B-Instruct-v0.1_response,llama\n"
        '"q1, with comma",True,"ans",False,"x",9\n"q2",True,"a",True,"b",9\n"q3",False,"a",,"b",9\n"q4",False,"a",True,"b",9\n',
        encoding="utf-8",
    )
    o = read_responses_csv(path)
    assert o.models == ("gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert o.prompts == ("q1, with comma", "q2", "q4") and o.excluded_count == 1
    pair = o.pair()
    assert pair.strong_correct.tolist() == [True, True, False]
    curve = routing_curve(np.array([1.0, 0.0, -1.0]), pair.strong_correct, pair.weak_correct,
                          strong_cost_usd=np.array([3.0, 3.0, 3.0]), weak_cost_usd=np.array([1.0, 1.0, 1.0]))  # fmt: skip
    # weak 2/3, strong 2/3; top-1 strong gives 3/3
    assert curve.strong_share_at(0.95) == 0.0 and curve.cost_at(1 / 3) == pytest.approx(5.0)
    assert call_costs_usd(["abcd" * 10], (1e6, 1e6), output_tokens=5).tolist() == [15.0]
    with pytest.raises(Exception, match="no 'prompt' column"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n", encoding="utf-8")
        read_responses_csv(tmp_path / "bad.csv")
    assert ModelOutcomes.from_pair(pair).models[0] == "gpt-4-1106-preview"


def test_model_stats_percentiles_follow_outcomes_and_round_trip_the_table_format() -> None:
    from processors.routing.policy import ModelStats
    from processors.routing.policy_app import _stats_from_json, _stats_to_json

    s = ModelStats()
    assert s.percentiles() == {}
    for i in range(1, 101):
        s.add(Outcome(request_id=f"r{i}", model="m", success=i % 10 != 0, correct=i % 2 == 0, latency_ms=float(i),
                      cost_usd=0.01, occurred_at=T0))  # fmt: skip
    assert s.percentiles()["p50"] == pytest.approx(50.5) and s.percentiles()["p99"] == pytest.approx(99.01)
    s.add(Outcome(request_id="x", model="m", success=True, latency_ms=10_000.0, occurred_at=T0))
    assert s.percentiles()["p99"] > 99.01  # the cache was dropped on the new outcome
    back = _stats_from_json(_stats_to_json(s))
    assert back.to_json() == s.to_json() and back.to_json()["success_rate"] == pytest.approx(91 / 101)
