"""Durable retries: deterministic full-jitter backoff, due times, fallback along the chain, escalation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from configuration.schemas import HealingThresholds
from processors.healing.retry import RetryScheduler, backoff_seconds, fallback_chain

T0 = datetime(2025, 11, 18, 23, 0, tzinfo=UTC)


def sched(**kw: object) -> RetryScheduler:
    t = HealingThresholds(retry_max_attempts=3, retry_base_seconds=2, retry_max_seconds=5,
                          fallback_chains={"A": ["B", "C"]}, **kw)  # fmt: skip
    return RetryScheduler(t, config_version=4)


def test_backoff_is_full_jitter_capped_and_seeded_by_request_id() -> None:
    for attempt, cap in ((1, 2), (2, 4), (3, 5), (6, 5)):
        xs = [backoff_seconds(f"r{i}", attempt, 2, 5) for i in range(300)]
        assert all(0 <= x <= cap for x in xs)
        assert max(xs) > 0.8 * cap and min(xs) < 0.2 * cap  # spread over the whole range (full jitter)
    assert backoff_seconds("req-1", 2, 2, 5) == backoff_seconds("req-1", 2, 2, 5)
    assert backoff_seconds("req-1", 2, 2, 5) != backoff_seconds("req-2", 2, 2, 5)
    with pytest.raises(ValueError):
        backoff_seconds("r", 0, 1, 2)


def test_retry_then_fallback_then_escalation() -> None:
    s = sched()
    d1 = s.on_failure(request_id="q", target="A", attempt=1, error_kind="server_error", at=T0)
    wait = backoff_seconds("q", 1, 2, 5)
    assert d1.kind == "retry_scheduled" and d1.details["attempt"] == 2 and d1.config_version == 4
    assert d1.details["due_time"] == (T0 + timedelta(seconds=wait)).isoformat()
    assert s.due(T0 + timedelta(seconds=wait) - timedelta(microseconds=1)) == []
    [due] = s.due(T0 + timedelta(seconds=10))
    assert (
        due.kind == "retry_due"
        and due.event_time == T0 + timedelta(seconds=wait)
        and due.causation_id == d1.id
    )
    assert (
        s.on_failure(request_id="q", target="A", attempt=2, error_kind="rate_limited", at=T0).kind
        == "retry_scheduled"
    )
    fb = s.on_failure(request_id="q", target="A", attempt=3, error_kind="timeout", at=T0)
    assert fb.kind == "fallback" and fb.details["to_target"] == "B"
    fb2 = s.on_failure(request_id="q", target="B", attempt=1, error_kind="auth", at=T0)  # not retryable
    assert (
        fb2.kind == "fallback"
        and fb2.details["to_target"] == "C"
        and "not retryable" in fb2.details["reason"]
    )
    esc = s.on_failure(request_id="q", target="C", attempt=3, error_kind="server_error", at=T0)
    assert esc.kind == "escalation" and esc.details["tried"] == ["A", "B", "C"]


def test_restore_rebuilds_pending_retries_from_the_decision_log() -> None:
    s = sched()
    log = [
        s.on_failure(request_id=f"r{i}", target="A", attempt=1, error_kind="timeout", at=T0) for i in range(3)
    ]
    log += s.due(T0 + timedelta(seconds=min(backoff_seconds(f"r{i}", 1, 2, 5) for i in range(3))))
    again = sched()
    again.restore([d.as_json() for d in log])
    assert again.pending() == s.pending() and len(again.pending()) == 2


def test_fallback_chain_by_model_or_provider() -> None:
    chains = {"A": ["B"], "A/m": ["C"]}
    assert fallback_chain("A/m", chains) == ["C"]
    assert fallback_chain("A/x", chains) == ["B"]
    assert fallback_chain("Z", chains) == []
