"""The evaluation tables on the real mini-swe-agent runs (skipped when ../shared/data is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.healing.evaluation import LiteLLMCooldown, evaluate_early_warnings, evaluate_outage

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "agent_runs"
needs_data = pytest.mark.skipif(
    not (DATA / "results.csv").is_file(), reason=f"real agent runs not found at {DATA}"
)


@needs_data
def test_early_warnings_table_shape_and_facts() -> None:
    r = evaluate_early_warnings(DATA)
    assert {"runs", "unresolved", "precision", "recall", "median_lead_steps", "baseline"} <= set(r)
    assert {"precision", "recall"} <= set(r["baseline"])
    assert (r["runs"], r["unresolved"]) == (120, 31)  # 89 of the 120 runs resolved (data README)
    assert 0 < r["recall"] <= 1 and 0 < r["precision"] <= 1 and r["median_lead_steps"] > 0
    assert r["midpoint"]["flagged"] <= r["flagged"]
    assert evaluate_early_warnings(DATA) == r  # a replay gives the same table
    with pytest.raises(ValueError, match="min_level"):
        evaluate_early_warnings(DATA, min_level="panic")
    p, rec = r["precision"], r["recall"]
    assert r["f1"] == pytest.approx(2 * p * rec / (p + rec), abs=1e-3)
    for signal, n in r["signals"].items():
        assert r["signal_precision"][signal]["flagged"] == n
    assert sum(s["true_positives"] for s in r["signal_precision"].values()) >= r["true_positives"]
    # the point of the warnings: earlier than the step-count baseline, at least as precise
    assert r["midpoint"]["f1"] > r["baseline"]["midpoint"]["f1"]


@needs_data
def test_early_warnings_on_two_folds_each_replayed_alone() -> None:
    for split in ("time", "id"):
        r = evaluate_early_warnings(DATA, split=split)
        a, b = r["folds"]
        assert (
            r["split"] == split and a["runs"] + b["runs"] == 120 and a["unresolved"] + b["unresolved"] == 31
        )
        assert abs(a["runs"] - b["runs"]) <= 20 and "config" not in a
    with pytest.raises(ValueError, match="split"):
        evaluate_early_warnings(DATA, split="random")


@needs_data
def test_outage_table_shape_and_the_breaker_sends_less_to_the_failing_provider() -> None:
    r = evaluate_outage(DATA)
    keys = {"calls_to_failing_provider_while_down", "time_to_open_seconds", "time_to_close_after_recovery_seconds",
            "requests_failed_to_caller"}  # fmt: skip
    assert keys <= set(r["healer"]) and keys <= set(r["baseline"])
    assert r["outage"]["provider"] == "Google" and r["healer"]["requests"] == 4623
    assert (
        r["healer"]["calls_to_failing_provider_while_down"]
        < r["baseline"]["calls_to_failing_provider_while_down"]
    )
    assert (
        r["healer"]["time_to_open_seconds"] is not None
        and r["healer"]["time_to_close_after_recovery_seconds"] is not None
    )
    none = evaluate_outage(DATA, failure_rate=0.0)
    assert none["healer"]["time_to_open_seconds"] is None and none["healer"]["served_by_fallback"] == 0
    with pytest.raises(ValueError, match="no call"):
        evaluate_outage(DATA, provider="Nobody")


def test_litellm_cooldown_semantics() -> None:
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    c = LiteLLMCooldown()
    for s in range(3):
        c.record(t0 + timedelta(seconds=s), False)
        assert c.allow(t0 + timedelta(seconds=s))  # 3 failures are allowed
    c.record(t0 + timedelta(seconds=3), False)
    assert not c.allow(t0 + timedelta(seconds=7.9)) and c.allow(
        t0 + timedelta(seconds=8)
    )  # 5 s, no half-open
    c.record(t0 + timedelta(seconds=9), False)  # still the same minute: straight back into cooldown
    assert not c.allow(t0 + timedelta(seconds=10))
    c2 = LiteLLMCooldown()
    for s in (0, 1, 2, 61):
        c2.record(t0 + timedelta(seconds=s), False)
    assert c2.allow(t0 + timedelta(seconds=62))  # the count restarts after a minute
