"""Automatic rollback: the significance test and every guardrail."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest
from scipy import stats

from configuration.schemas import HealingThresholds
from processors.healing.rollback import (
    BINS_PER_DECADE,
    ZERO_BIN,
    CallStats,
    RollbackMonitor,
    bin_centre,
    bin_of,
    buckets_per_window,
    compare_windows,
    components_of,
    mann_whitney_binned,
)

T0 = datetime(2025, 11, 18, 23, 0, tzinfo=UTC)


def monitor(**kw: object) -> RollbackMonitor:
    base = dict(
        rollback_window_seconds=100, rollback_min_calls=20, rollback_alpha=0.01, rollback_max_per_hour=2
    )
    return RollbackMonitor(HealingThresholds(**{**base, **kw}), config_version=9)


def traffic(m: RollbackMonitor, start: float, fail_every: int, comp: str = "model:m1", n: int = 50) -> None:
    for i in range(n):
        m.on_call([comp], T0 + timedelta(seconds=start + i * 2), ok=(i % fail_every != 0) if fail_every else True,
                  latency_ms=100.0, cost_usd=0.01)  # fmt: skip


def change(
    m: RollbackMonitor, at: float, version: int = 2, key: str = "routing.policy.default", **kw: object
) -> None:
    m.on_change(event_id=f"chg-{key}-{version}", key=key, version=version, at=T0 + timedelta(seconds=at),
                value={"strategy": "cheapest", "models": ["m1"]}, **kw)  # fmt: skip


def bad_change_scenario(m: RollbackMonitor, at: float = 100, **kw: object) -> list:
    traffic(m, at - 100, 0)  # 50 ok calls before
    change(m, at, **kw)
    traffic(m, at, 2)  # half fail after
    return m.advance(T0 + timedelta(seconds=at + 100))


def test_compare_windows_says_why() -> None:
    ok = [(True, 100.0, 0.01)] * 40
    worse = [(i % 3 != 0, 100.0, 0.01) for i in range(40)]
    r = compare_windows(ok, worse, alpha=0.01, min_calls=20)
    assert r["significant"] and r["metrics"]["error_rate"]["p_value"] < 0.01 / 3
    assert r["why"].startswith("error_rate 0.0 -> 0.35") and "fisher_exact" in r["why"]
    same = compare_windows(worse, worse, alpha=0.01, min_calls=20)
    assert not same["significant"] and same["metrics"]["error_rate"]["p_value"] > 0.5
    slow = compare_windows(ok, [(True, 150.0 + i, 0.01) for i in range(40)], alpha=0.01, min_calls=20)
    assert [k for k, v in slow["metrics"].items() if v["significant"]] == ["latency_ms"]
    few = compare_windows(ok[:5], worse[:5], alpha=0.01, min_calls=20)
    assert not few["significant"] and "skipped" in few["metrics"]["error_rate"]


def test_components_of_keys() -> None:
    assert components_of("providers.google", {}) == ["provider:google"]
    assert components_of("routing.policy.x", {"models": ["a", "b"], "fallback_model": "a"}) == [
        "model:a",
        "model:b",
    ]
    assert components_of("agents.coder", {"model": "m"}) == ["agent:coder", "model:m"]
    assert components_of("other.thing", None) == ["key:other.thing"]


def test_auto_rollback_once_per_change_with_evidence_and_causation() -> None:
    m = monitor()
    [d] = bad_change_scenario(m)
    assert d.kind == "rollback" and d.causation_id == "chg-routing.policy.default-2"
    assert d.details["to_version"] == 1 and d.details["evidence"]["significant"] and d.config_version == 9
    assert m.advance(T0 + timedelta(seconds=1000)) == []  # evaluated once


def test_no_rollback_when_nothing_changed() -> None:
    m = monitor()
    traffic(m, 0, 5)
    change(m, 100)
    traffic(m, 100, 5)
    [d] = m.advance(T0 + timedelta(seconds=200))
    assert d.kind == "rollback_not_needed"


def test_dry_run_recommends_only() -> None:
    [d] = bad_change_scenario(monitor(rollback_mode="dry_run"))
    assert d.kind == "rollback_recommended" and d.details["mode"] == "dry_run"


def test_approval_mode_escalates_and_rolls_back_on_ack() -> None:
    m = monitor(rollback_mode="approval")
    [esc] = bad_change_scenario(m)
    assert esc.kind == "escalation" and esc.details["awaiting"] == "ack"
    acked, rb = m.ack(esc.id, by="ana", note="go", at=T0 + timedelta(seconds=300))
    assert acked.kind == "escalation_acked" and acked.details["by"] == "ana"
    assert rb.kind == "rollback" and rb.causation_id == esc.id
    with pytest.raises(KeyError):
        m.ack(esc.id, by="ana", note="again", at=T0 + timedelta(seconds=301))


def test_never_rolls_back_the_healers_own_rollback() -> None:
    [d] = bad_change_scenario(monitor(), change="ROLLED_BACK", author="healer", version=3)
    assert d.kind == "rollback_suppressed" and "healer" in d.details["reason"]
    [d2] = bad_change_scenario(monitor(), change="ROLLED_BACK", author="ana", version=3)
    assert d2.kind == "rollback"  # a person's rollback is watched like any change


def test_first_version_cannot_be_rolled_back() -> None:
    [d] = bad_change_scenario(monitor(), version=1)
    assert d.kind == "rollback_impossible"


def test_limit_per_hour() -> None:
    m = monitor(rollback_max_per_hour=1)
    [d1] = bad_change_scenario(m, at=100, key="routing.policy.a")
    [d2] = bad_change_scenario(m, at=500, key="routing.policy.b")
    assert d1.kind == "rollback" and d2.kind == "rollback_suppressed" and "per hour" in d2.details["reason"]
    [d3] = bad_change_scenario(m, at=4000, key="routing.policy.c")
    assert d3.kind == "rollback"


def test_at_a_high_call_rate_every_call_is_counted_and_tested() -> None:
    """200 calls/s: the error-rate test and the latency test see every call (in buckets: no sample), and the
    state survives a dump and a load and decides the same."""
    m = monitor()
    rate, window = 200, 100
    for s in range(window):  # the window before the change: 1 % failures
        for i in range(rate):
            m.on_call(["model:m1"], T0 + timedelta(seconds=s, microseconds=i * 4000), ok=i % 100 != 0,
                      latency_ms=100.0 + i % 7, cost_usd=0.01)  # fmt: skip
    change(m, window)
    for s in range(window, 2 * window):  # after: 5 % failures
        for i in range(rate):
            m.on_call(["model:m1"], T0 + timedelta(seconds=s, microseconds=i * 4000), ok=i % 20 != 0,
                      latency_ms=100.0 + i % 7, cost_usd=0.01)  # fmt: skip
    state = m.dump_state()
    assert m.bucket_seconds == 5 and len(state["buckets"]["model:m1"]) == 2 * window // 5
    assert sum(row[1] for row in state["buckets"]["model:m1"]) == 2 * window * rate
    again = monitor()
    again.load_state(json.loads(json.dumps(state)))
    assert again.dump_state() == state
    (d,) = m.advance(T0 + timedelta(seconds=2 * window))
    er = d.details["evidence"]["metrics"]["error_rate"]
    assert (er["n_before"], er["n_after"]) == (window * rate, window * rate)
    assert (er["before"], er["after"]) == (0.01, 0.05) and d.kind == "rollback"
    lat = d.details["evidence"]["metrics"]["latency_ms"]
    assert lat["n_before"] == lat["n_after"] == window * rate and not lat["significant"]
    assert lat["before"] == lat["after"] == pytest.approx(bin_centre(bin_of(103.0)), rel=1e-5)
    (d2,) = again.advance(T0 + timedelta(seconds=2 * window))
    assert d2.to_state() == d.to_state()  # the loaded state decides the same


def test_the_state_stays_small_whatever_the_rate_and_the_duration() -> None:
    """1,000 calls/s over three components for 2,500 s of event time with the default 600 s window (2.5
    million calls, lognormal latencies and costs): once the buckets span both windows (1,230 s) the dump
    stops growing, and it stays under 100 KB of JSON (about 13 KB per component)."""
    m = RollbackMonitor(HealingThresholds(), config_version=1)
    assert (m.bucket_seconds, buckets_per_window(HealingThresholds().rollback_window_seconds)) == (30, 20)
    rng = random.Random(5)
    lat = [rng.lognormvariate(7.0, 0.6) for _ in range(997)]
    cost = [rng.lognormvariate(-7.0, 0.8) for _ in range(991)]
    comps = [["model:a", "provider:p"], ["model:b", "provider:p"], ["model:c", "provider:q"]]
    t0 = T0.timestamp()
    sizes: dict[int, int] = {}
    n = 0
    for s in range(2500):
        m.advance(t0 + s)
        for i in range(1000):
            m.on_call(comps[n % 3], t0 + s + i / 1000, n % 97 != 0, lat[n % 997], cost[n % 991])
            n += 1
        if s in (600, 1300, 1900, 2499):
            sizes[s] = len(json.dumps(m.dump_state(), sort_keys=True, separators=(",", ":")))
    state = m.dump_state()
    assert all(len(rows) <= 2 * 20 + 2 for rows in state["buckets"].values())
    assert sizes[1900] <= sizes[1300] and sizes[2499] <= sizes[1300] < 100_000, sizes
    restored = RollbackMonitor(HealingThresholds(), config_version=1)
    restored.load_state(json.loads(json.dumps(state)))
    assert restored.dump_state() == state


def test_binned_mann_whitney_equals_scipy_on_the_bin_centres() -> None:
    """U and p of the histogram test equal scipy's asymptotic test on the values the bins stand for: random
    samples, heavy ties, small n, zeros, a shift that is significant and all values tied."""
    rng = random.Random(11)
    cases: list[tuple[list[float], list[float]]] = []
    for n1, n2 in [(2, 2), (3, 5), (7, 4), (20, 20), (50, 80), (400, 300)]:
        cases.append(
            ([rng.lognormvariate(5, 1) for _ in range(n1)], [rng.lognormvariate(5, 1) for _ in range(n2)])
        )
        cases.append(
            (
                [rng.choice([10.0, 11.0, 50.0]) for _ in range(n1)],
                [rng.choice([10.0, 50.0, 0.0]) for _ in range(n2)],
            )
        )
    cases.append(
        ([rng.lognormvariate(5.6, 0.5) for _ in range(80)], [rng.lognormvariate(5, 0.5) for _ in range(80)])
    )
    cases.append(([1e-4, 2e-4, 1e12], [3e-12, 0.0, 5e-4, 1e-4]))  # clamped at both ends
    for after, before in cases:
        ha, hb = (
            CallStats.of((True, x, None) for x in after).latency_ms,
            CallStats.of((True, x, None) for x in before).latency_ms,
        )
        u, p = mann_whitney_binned(ha, hb)
        xa = [bin_centre(b) for b, c in sorted(ha.items()) for _ in range(c)]
        xb = [bin_centre(b) for b, c in sorted(hb.items()) for _ in range(c)]
        ref = stats.mannwhitneyu(xa, xb, alternative="greater", method="asymptotic")
        assert u == pytest.approx(float(ref.statistic), rel=1e-12, abs=1e-9)
        assert p == pytest.approx(float(ref.pvalue), rel=1e-9, abs=1e-15)
    assert mann_whitney_binned({40: 5}, {40: 7}) == (17.5, 1.0)  # every value tied
    _, p_shift = mann_whitney_binned(
        CallStats.of((True, x, None) for x in cases[-2][0]).latency_ms,
        CallStats.of((True, x, None) for x in cases[-2][1]).latency_ms,
    )
    assert p_shift < 0.01


def test_bins_and_the_median_of_a_histogram() -> None:
    assert bin_of(100.0) == 2 * BINS_PER_DECADE and bin_of(99.999) == 2 * BINS_PER_DECADE - 1
    assert bin_of(0.0) == bin_of(-1.0) == ZERO_BIN and bin_centre(ZERO_BIN) == 0.0
    assert bin_of(1e-30) == -9 * BINS_PER_DECADE and bin_of(1e30) == 9 * BINS_PER_DECADE - 1
    assert bin_centre(bin_of(100.0)) == pytest.approx(10 ** (2 + 0.5 / BINS_PER_DECADE))
    r = compare_windows([(True, 100.0, 0.0)] * 3 + [(True, 1000.0, 0.0)] * 2, [(True, 100.0, 0.0)] * 2 + [(True, 1000.0, 0.0)] * 2,
                        alpha=0.01, min_calls=2)  # fmt: skip
    lat = r["metrics"]["latency_ms"]
    assert lat["before"] == round(bin_centre(bin_of(100.0)), 3) or lat["before"] == pytest.approx(
        bin_centre(bin_of(100.0)), rel=1e-5
    )
    assert lat["after"] == pytest.approx(
        (bin_centre(bin_of(100.0)) + bin_centre(bin_of(1000.0))) / 2, rel=1e-5
    )
    assert "bin centres" in lat["median_of"] and r["metrics"]["cost_usd"]["before"] == 0.0


def test_window_edges_follow_the_buckets() -> None:
    """Window 100 s, buckets of 5 s. A change on a bucket edge compares [at-100, at) with [at, at+100) and is
    decided at at+100; a change inside a bucket leaves that bucket out of both windows and is decided at
    the end of the 20 whole buckets after it."""
    m = monitor()
    for s in range(0, 400):
        m.on_call(["model:m1"], T0 + timedelta(seconds=s), ok=True, latency_ms=100.0, cost_usd=0.01)
    change(m, 100)
    assert m.advance(T0 + timedelta(seconds=199)) == []
    (d,) = m.advance(T0 + timedelta(seconds=200))
    ev = d.details["evidence"]
    assert d.event_time == T0 + timedelta(seconds=200) and ev["metrics"]["error_rate"]["n_before"] == 100
    assert ev["windows"]["before"] == [
        (T0 + timedelta(seconds=0)).isoformat(),
        (T0 + timedelta(seconds=100)).isoformat(),
    ]
    assert ev["windows"]["after"] == [
        (T0 + timedelta(seconds=100)).isoformat(),
        (T0 + timedelta(seconds=200)).isoformat(),
    ]
    change(m, 202.5, version=3)  # inside the bucket [200, 205)
    assert m.advance(T0 + timedelta(seconds=304)) == []
    (d,) = m.advance(T0 + timedelta(seconds=305))
    ev = d.details["evidence"]
    assert d.event_time == T0 + timedelta(seconds=305)
    assert ev["windows"]["before"][1] == (T0 + timedelta(seconds=200)).isoformat()
    assert ev["windows"]["after"][0] == (T0 + timedelta(seconds=205)).isoformat()
    assert ev["metrics"]["error_rate"]["n_before"] == ev["metrics"]["error_rate"]["n_after"] == 100


def test_a_state_of_the_earlier_layout_is_converted() -> None:
    """A dump with the calls kept whole ("calls", "counted" per second) loads into buckets and decides as the
    calls it held say."""
    m = monitor()
    change(m, 100)
    old = {k: v for k, v in m.dump_state().items() if k not in ("buckets", "bucket_seconds", "kept_from")}
    t0_us = int(T0.timestamp() * 1_000_000)
    old["calls"] = {"model:m1": [[t0_us + s * 1_000_000, True, 100.0, 0.01] for s in range(0, 100, 2)]
                    + [[t0_us + s * 1_000_000, s % 4 != 0, 100.0, 0.01] for s in range(100, 200, 2)]}  # fmt: skip
    old["counted"] = {"model:m1": [[int(T0.timestamp()) + 150, 10, 5]]}
    again = monitor()
    again.load_state(json.loads(json.dumps(old)))
    assert sum(row[1] for row in again.dump_state()["buckets"]["model:m1"]) == 110
    (d,) = again.advance(T0 + timedelta(seconds=200))
    er = d.details["evidence"]["metrics"]["error_rate"]
    assert d.kind == "rollback" and (er["n_before"], er["n_after"]) == (50, 60)
    assert d.details["evidence"]["metrics"]["latency_ms"]["n_after"] == 50


def test_a_new_window_length_rebuckets_the_calls_kept() -> None:
    """Window 100 s (5 s buckets) -> 600 s (30 s buckets): every call kept is still counted once, in the bucket
    its old bucket's start falls in, and the state still round-trips."""
    m = monitor()
    traffic(m, 0, 5, n=150)  # one call every 2 s for 300 s, a failure every fifth
    m.advance(T0 + timedelta(seconds=300))
    before = m.dump_state()["buckets"]["model:m1"]
    m.reconfigure(HealingThresholds(rollback_window_seconds=600, rollback_min_calls=20), config_version=10)
    after = m.dump_state()
    assert m.bucket_seconds == 30 and after["bucket_seconds"] == 30
    assert sum(r[1] for r in before) == 102  # kept from bucket 60 - 2 * 20 - 1 = 19 (95 s) on
    assert sum(r[1] for r in after["buckets"]["model:m1"]) == 102
    assert sum(r[2] for r in after["buckets"]["model:m1"]) == sum(r[2] for r in before) > 0
    assert [r[0] for r in after["buckets"]["model:m1"]] == sorted({r[0] * 5 // 30 for r in before})
    again = RollbackMonitor(
        HealingThresholds(rollback_window_seconds=600, rollback_min_calls=20), config_version=10
    )
    again.load_state(json.loads(json.dumps(after)))
    assert again.dump_state() == after
