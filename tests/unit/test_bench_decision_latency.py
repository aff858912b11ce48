"""Pure parts of the decision-latency benches: the percentile summary, and the healer bench's load plan
checked against the real healer (each burst opens its own circuits on its last failing call, nothing else
opens)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from bench.bench_heal_latency import _datum, plan
from bench.decision_latency import summarise
from configuration.schemas import HealingThresholds
from processors.healing.healer import Healer


def test_summarise_takes_nearest_rank_percentiles_of_known_pairs_and_ratios_to_a_baseline() -> None:
    pairs: list[tuple[float | None, float | None]] = [(0.0, (i + 1) / 1000) for i in range(100)]  # 1..100 ms
    pairs += [(0.0, None), (None, 1.0)]
    r = summarise(pairs, baseline_ms=[10.0] * 5)
    assert (r["n"], r["missing"]) == (100, 2)
    assert [round(r[f"p{q}_ms"], 9) for q in (50, 95, 99)] == [50.0, 95.0, 99.0]
    assert [round(r[f"ratio_p{q}"], 9) for q in (50, 95, 99)] == [5.0, 9.5, 9.9]
    empty = summarise([(1.0, None)], baseline_ms=[])
    assert empty["n"] == 0 and math.isnan(empty["p95_ms"]) and math.isnan(empty["ratio_p95"])
    assert "ratio_p50" not in summarise(pairs)


def test_each_burst_opens_its_pair_on_its_last_failure_and_the_background_opens_nothing() -> None:
    th = HealingThresholds()
    rate = 1000
    calls = plan(4000, rate, 0.2, th.consecutive_failures, 40, seed=3)
    trips = [c for c in calls if c["trip"]]
    assert len(trips) == 20 and len(calls) == 4000
    background_failures = sum(
        not c["ok"] for c in calls if not c["trip"] and c["provider"] in ("openai", "google")
    )
    assert background_failures > 0
    healer = Healer()
    opened: dict[str, int] = {}
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    for c in calls:
        data = _datum(c, t0, rate, "r-")
        data["event_time"] = datetime.fromisoformat(data["event_time"])
        for d in healer.feed({"schema": "sophia.agent.LlmCall", "data": data, "id": None}):
            assert d.kind == "circuit_opened", d
            opened[d.subject] = c["i"]
    want = {}
    for c in trips:
        want[f"circuit:provider:{c['provider']}"] = c["i"]
        want[f"circuit:model:{c['provider']}/{c['model']}"] = c["i"]
    assert opened == want
