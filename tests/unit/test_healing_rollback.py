"""Automatic rollback: the significance test and every guardrail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from configuration.schemas import HealingThresholds
from processors.healing.rollback import RollbackMonitor, compare_windows, components_of

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


def test_at_a_high_call_rate_the_state_stays_bounded_and_every_call_is_counted() -> None:
    """200 calls/s (ten times the calls kept whole per second): the error-rate test still counts every call,
    the kept calls stay within CALLS_KEPT_PER_SECOND per second, and the state survives a dump and a load."""
    from processors.healing.rollback import CALLS_KEPT_PER_SECOND

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
    assert len(state["calls"]["model:m1"]) <= CALLS_KEPT_PER_SECOND * (2 * window + 1)
    assert (
        sum(n for _, n, _ in state["counted"]["model:m1"]) + len(state["calls"]["model:m1"])
        == 2 * window * rate
    )
    again = monitor()
    again.load_state(state)
    assert again.dump_state() == state
    (d,) = m.advance(T0 + timedelta(seconds=2 * window))
    er = d.details["evidence"]["metrics"]["error_rate"]
    assert (er["n_before"], er["n_after"]) == (window * rate, window * rate)
    assert (er["before"], er["after"]) == (0.01, 0.05) and d.kind == "rollback"
    lat = d.details["evidence"]["metrics"]["latency_ms"]
    assert lat["n_before"] == lat["n_after"] == window * CALLS_KEPT_PER_SECOND
    (d2,) = again.advance(T0 + timedelta(seconds=2 * window))
    assert d2.to_state() == d.to_state()  # the loaded state decides the same
