"""Circuit breakers on event time: every transition, its evidence, and admission in half-open."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from configuration.schemas import HealingThresholds
from processors.healing.breaker import BreakerBoard, CircuitBreaker, CircuitState, circuit_keys

T0 = datetime(2025, 11, 18, 23, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def thresholds(**kw: object) -> HealingThresholds:
    base = dict(error_rate=0.5, window_seconds=60, min_calls=4, consecutive_failures=10, open_seconds=30,
                half_open_max_probes=2, half_open_successes=2)  # fmt: skip
    return HealingThresholds(**{**base, **kw})


def test_opens_on_failure_rate_only_with_min_calls_and_reports_the_window() -> None:
    b = CircuitBreaker("provider:Google", thresholds(), config_version=7)
    assert b.record(at(0), False) == []  # 1 call, below min_calls
    assert b.record(at(1), True) == []
    assert b.record(at(2), False) == []  # 3 calls, 2/3 failed but min_calls is 4
    [t] = b.record(at(3), False)
    assert b.state is CircuitState.OPEN
    assert t.kind == "circuit_opened" and t.subject == "circuit:provider:Google" and t.config_version == 7
    assert t.details["window_calls"] == 4 and t.details["window_failures"] == 3
    assert t.details["failure_rate"] == 0.75 and t.details["threshold"]["error_rate"] == 0.5
    assert t.details["from_state"] == "closed" and t.event_time == at(3)


def test_window_slides_in_event_time() -> None:
    b = CircuitBreaker("p", thresholds())
    for s in (0, 1, 2):
        b.record(at(s), False)
    # 61 s later the three failures have left the window: one more failure and 3 successes keep it closed
    assert b.record(at(63), True) == []
    assert b.counts()["window_calls"] == 1
    for s in (64, 65):
        assert b.record(at(s), True) == []
    assert b.record(at(66), False) == [] and b.state is CircuitState.CLOSED  # 1/4 failed


def test_opens_on_consecutive_failures_below_min_calls_rate() -> None:
    b = CircuitBreaker("p", thresholds(error_rate=0.99, min_calls=100, consecutive_failures=3))
    b.record(at(0), False)
    b.record(at(1), False)
    [t] = b.record(at(2), False)
    assert t.kind == "circuit_opened" and "3 consecutive failures" in t.details["reason"]


def test_open_half_open_closed_on_probe_success() -> None:
    b = CircuitBreaker("p", thresholds(consecutive_failures=2))
    b.record(at(0), False)
    b.record(at(1), False)
    assert b.allow(at(10)) == (False, [])
    assert b.peek(at(31)) is CircuitState.HALF_OPEN
    allowed, [t] = b.allow(at(40))
    assert allowed and t.kind == "circuit_half_open" and t.event_time == at(31)  # stamped at cool-down end
    assert b.allow(at(40))[0] is True  # second probe
    assert b.allow(at(40))[0] is False  # bounded: max 2 probes
    assert b.record(at(41), True, admitted=True) == []  # 1 of 2 successes
    [c] = b.record(at(42), True, admitted=True)
    assert c.kind == "circuit_closed" and c.details["probes_succeeded"] == 2
    assert b.state is CircuitState.CLOSED and b.counts()["window_calls"] == 0


def test_half_open_probe_failure_reopens_and_restarts_cooldown() -> None:
    b = CircuitBreaker("p", thresholds(consecutive_failures=1, half_open_max_probes=1, half_open_successes=1))
    b.record(at(0), False)
    [h, o] = b.record(at(35), False)  # an observed call after the cool-down is the probe
    assert (h.kind, o.kind) == ("circuit_half_open", "circuit_opened")
    assert o.details["reason"] == "half-open probe failed" and b.opened_at == at(35)
    assert b.advance(at(64)) == []
    [h2] = b.advance(at(66))
    assert h2.kind == "circuit_half_open" and h2.event_time == at(65)


def test_calls_while_open_do_not_transition() -> None:
    b = CircuitBreaker("p", thresholds(consecutive_failures=1))
    b.record(at(0), False)
    for s in range(1, 20):
        assert b.record(at(s), s % 2 == 0) == []
    assert b.state is CircuitState.OPEN and b.calls_while_open == 19


def test_board_creates_circuits_for_unknown_targets_and_keys_scopes() -> None:
    assert circuit_keys("Google", "gemini", "coder") == [
        "provider:Google",
        "model:Google/gemini",
        "agent:coder",
    ]
    assert circuit_keys(None) == ["provider:unknown"]
    board = BreakerBoard(thresholds(consecutive_failures=1), config_version=3)
    out = board.record(at(0), circuit_keys("NewCo", "m1"), False)
    assert [d.subject for d in out] == ["circuit:provider:NewCo", "circuit:model:NewCo/m1"]
    assert [s["state"] for s in board.snapshot()] == ["open", "open"]
    assert board.allow(at(1), circuit_keys("NewCo", "m1")) == (False, [])
    assert board.allow(at(1), circuit_keys("Other", "m1"))[0] is True


def test_reconfigure_records_the_new_version() -> None:
    board = BreakerBoard(thresholds(consecutive_failures=5), config_version=1)
    board.record(at(0), ["p"], False)
    board.reconfigure(thresholds(consecutive_failures=2), 2)
    [t] = board.record(at(1), ["p"], False)
    assert t.config_version == 2 and t.details["threshold"]["consecutive_failures"] == 2


def test_the_window_is_bucketed_and_bounded_at_a_high_call_rate() -> None:
    """1,000 calls/s for 90 s: the window holds at most window_seconds / 0.1 s buckets, counts every call of
    the last window_seconds, and a saved state (old per-call form included) loads to the same counts."""
    from datetime import UTC, datetime, timedelta

    from configuration.schemas import HealingThresholds
    from processors.healing.breaker import BUCKET_US, CircuitBreaker

    t0 = datetime(2025, 11, 19, 1, 0, tzinfo=UTC)
    b = CircuitBreaker("provider:P", HealingThresholds(window_seconds=60, error_rate=0.9, min_calls=5))
    for i in range(90_000):
        b.record(t0 + timedelta(milliseconds=i), ok=i % 50 != 0)
    state = b.dump_state()
    assert len(state["window"]) <= 60 * 1_000_000 // BUCKET_US
    counts = b.counts()
    assert (
        59_000 <= counts["window_calls"] <= 60_000
        and counts["window_failures"] == counts["window_calls"] // 50
    )
    again = CircuitBreaker.load_state("provider:P", state, b.thresholds, 0)
    assert again.counts() == counts and again.dump_state() == state
    old = {**state, "window": [[state["window"][0][0] + k, k % 2 == 0] for k in range(4)]}
    assert CircuitBreaker.load_state("provider:P", old, b.thresholds, 0).counts()["window_calls"] == 4
