"""Healer.snapshot / Healer.restore: JSON round trips mid-window that decide what an uninterrupted healer decides."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from configuration.schemas import HealingThresholds
from processors.healing import healer as healer_module
from processors.healing.healer import (
    SNAPSHOT_FORMAT,
    Healer,
    HealingConfig,
    SnapshotError,
)
from processors.healing.retry import REQUEST_RETENTION_SECONDS

T0 = datetime(2025, 11, 18, 23, 0, tzinfo=UTC)
THRESHOLDS = HealingThresholds(consecutive_failures=3, open_seconds=20, window_seconds=30, fallback_chains={"G": ["S"]},
                               retry_max_attempts=2, stall_seconds=40, rollback_window_seconds=60, rollback_min_calls=10,
                               rollback_mode="approval", runaway_min_peers=2, loop_repeats=3)  # fmt: skip


def _llm(s: float, provider: str, outcome: str, request_id: str, attempt: int, run: str) -> dict[str, Any]:
    return {"schema": "sophia.agent.LlmCall", "id": f"llm-{s}-{provider}-{request_id}-{attempt}",
            "data": {"run_id": run, "step": int(s), "event_time": T0 + timedelta(seconds=s), "model": "m",
                     "provider": provider, "prompt_tokens": 10 + int(s) % 7, "completion_tokens": 5, "cost_usd": 0.001 * (1 + int(s) % 3),
                     "latency_ms": 800 + (int(s) * 37) % 400, "outcome": outcome,
                     "error_kind": None if outcome == "ok" else outcome, "request_id": request_id, "attempt": attempt}}  # fmt: skip


def _change(s: float, key: str, version: int, value: dict[str, Any]) -> dict[str, Any]:
    return {"schema": "sophia.config.ConfigChange", "id": f"cfg-{key}-{version}",
            "data": {"key": key, "version": version, "change": "CHANGED", "value_json": json.dumps(value),
                     "author": "ana", "reason": "r", "changed_at": T0 + timedelta(seconds=s)}}  # fmt: skip


def history(seed: int = 3) -> list[dict[str, Any]]:
    """Every part busy: an outage of G (circuits, retries, fallbacks, escalations), runs that loop, stall
    and finish, a bad config change of providers.G (approval escalation), a healing config change."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = [_change(-3600, "providers.G", 1, {"requests_per_minute": 60})]
    for i in range(300):
        s = i * 1.0
        run = f"r{i % 5}"
        if i == 90:
            events.append(_change(s, "providers.G", 2, {"requests_per_minute": 600}))
        if i == 200:
            events.append(_change(s, "healing.thresholds", 7, THRESHOLDS.model_dump() | {"open_seconds": 10}))
        bad = 90 <= s < 170 and rng.random() < 0.7
        provider = "G" if i % 3 else "S"
        outcome = rng.choice(["server_error", "rate_limited", "auth"]) if bad and provider == "G" else "ok"
        events.append(_llm(s, provider, outcome, f"q{i // 2}", 1 + i % 2, run))
        if run != "r4" or s < 60:  # r4 goes quiet: it stalls
            events.append({"schema": "sophia.agent.ToolCall", "id": f"t{i}", "data": {"run_id": run, "step": i,
                           "event_time": T0 + timedelta(seconds=s), "command": "pytest" if i % 5 == 1 else f"c{i}",
                           "return_code": 1 if i % 5 == 1 else 0, "timed_out": False}})  # fmt: skip
        if i in (120, 150, 180):
            events.append({"schema": "sophia.agent.RunLifecycle", "id": f"fin-{i}", "data": {
                "run_id": f"r{(i // 30) % 4}", "event_time": T0 + timedelta(seconds=s), "phase": "FINISHED"}})  # fmt: skip
    return events


def _roundtrip(healer: Healer) -> Healer:
    return Healer.restore(json.loads(json.dumps(healer.snapshot(), sort_keys=True)))


def _run(events: list[dict[str, Any]], cut: int | None) -> tuple[list[dict[str, Any]], Healer]:
    healer = Healer(HealingConfig(THRESHOLDS, 1))
    out = []
    for i, e in enumerate(events):
        if i == cut:
            healer = _roundtrip(healer)
        out += [d.as_json() for d in healer.feed(e)]
    return out, healer


def test_restoring_at_any_point_decides_what_an_uninterrupted_healer_decides() -> None:
    events = history()
    whole, end = _run(events, None)
    kinds = {d["kind"] for d in whole}
    assert {"circuit_opened", "circuit_half_open", "circuit_closed", "retry_scheduled", "retry_due", "fallback",
            "escalation", "agent_warning", "config_applied"} <= kinds, kinds  # fmt: skip
    for cut in range(1, len(events), 7):
        out, restored = _run(events, cut)
        assert out == whole, f"cut at event {cut}"
        assert json.dumps(restored.snapshot(), sort_keys=True) == json.dumps(end.snapshot(), sort_keys=True)


def test_a_shared_snapshot_serialises_as_a_copied_one_and_a_copy_does_not_change_when_fed_on() -> None:
    """``snapshot(shared=True)`` (the worker's checkpoint: no copy of the breakers' buckets) gives the same
    JSON as ``snapshot()`` at every point; a copied snapshot keeps its JSON while the healer is fed on."""
    events = history()
    healer = Healer(HealingConfig(THRESHOLDS, 1))
    held: list[tuple[dict[str, Any], str]] = []
    for i, e in enumerate(events):
        healer.feed(e)
        if i % 5 == 0:
            copied = healer.snapshot()
            text = json.dumps(copied, sort_keys=True)
            assert json.dumps(healer.snapshot(shared=True), sort_keys=True) == text, f"after event {i}"
            held.append((copied, text))
    assert any(b["window"] for b in healer.snapshot()["breakers"].values())
    for copied, text in held:
        assert json.dumps(copied, sort_keys=True) == text


def test_a_snapshot_taken_mid_window_holds_the_open_circuit_the_pending_retry_and_the_change() -> None:
    events = history()
    healer = Healer(HealingConfig(THRESHOLDS, 1))
    for e in events:  # up to the first moment with an open circuit and a retry waiting
        healer.feed(e)
        snap = json.loads(json.dumps(healer.snapshot()))
        if snap["breakers"].get("provider:G", {}).get("state") == "open" and snap["retries"]["heap"]:
            break
    assert snap["format"] == SNAPSHOT_FORMAT
    assert snap["breakers"]["provider:G"]["state"] == "open" and snap["breakers"]["provider:G"]["window"]
    assert snap["rollbacks"]["changes"][0]["key"] == "providers.G"  # the after-window is still open
    assert snap["retries"]["heap"] and snap["health"]["runs"]
    restored = Healer.restore(snap)
    assert restored.status() == healer.status()
    assert restored.snapshot() == healer.snapshot()
    # the open circuit goes on from where it was: half-open after open_seconds, closed by a good probe
    opened_at = healer.breakers.breakers["provider:G"].opened_at
    assert opened_at is not None
    late = (opened_at - T0).total_seconds() + THRESHOLDS.open_seconds + 1
    probe = _llm(late, "G", "ok", "probe", 1, "r9")
    assert [(d.kind, d.subject) for d in restored.feed(probe) if d.subject == "circuit:provider:G"] == [
        ("circuit_half_open", "circuit:provider:G"),
        ("circuit_closed", "circuit:provider:G"),
    ]


def test_an_escalation_raised_before_a_restore_is_acked_after_it() -> None:
    events = history()
    healer = Healer(HealingConfig(THRESHOLDS, 1))
    out = healer.feed_all(events)
    rollback_esc = next(d for d in out if d.kind == "escalation" and d.subject == "config:providers.G")
    restored = _roundtrip(healer)
    assert set(restored.escalations) == set(healer.escalations) and rollback_esc.id in restored.escalations
    after = restored.ack(rollback_esc.id, by="ana", note="go", at=T0 + timedelta(seconds=400))
    assert [d.kind for d in after] == ["escalation_acked", "rollback"]
    assert after[1].details["to_version"] == 1 and after[1].causation_id == rollback_esc.id
    assert after == healer.ack(rollback_esc.id, by="ana", note="go", at=T0 + timedelta(seconds=400))


def test_rollback_guardrails_hold_across_a_restore() -> None:
    t = THRESHOLDS.model_copy(update={"rollback_mode": "auto", "rollback_max_per_hour": 1, "consecutive_failures": 1000,
                                      "error_rate": 1.0, "min_calls": 1000})  # fmt: skip

    def calls(p: str, a: int, b: int, bad: Any) -> list[dict[str, Any]]:
        return [
            _llm(s, p, "server_error" if bad(s) and s % 2 else "ok", f"{p}{s}", 1, "r") for s in range(a, b)
        ]

    healer = Healer(HealingConfig(t, 1))
    healer.feed_all([_change(-3600, "providers.A", 1, {}), _change(-3600, "providers.B", 1, {})])
    healer.feed_all(calls("A", 0, 60, lambda s: False))
    change = _change(60, "providers.A", 2, {"requests_per_minute": 1})
    healer.feed(change)
    out = healer.feed_all(calls("A", 60, 125, lambda s: True))
    assert [d.kind for d in out if d.subject == "config:providers.A"] == ["rollback"]
    healer = _roundtrip(healer)
    # the same change delivered again (the relay is at least once) is not evaluated again
    assert healer.feed(change) == []
    again = healer.feed_all(calls("A", 125, 200, lambda s: True))
    assert not [d for d in again if d.subject == "config:providers.A"]
    # and the per-hour limit remembers the rollback made before the restore
    healer.feed_all(calls("B", 200, 260, lambda s: False))
    healer.feed(_change(260, "providers.B", 2, {"requests_per_minute": 1}))
    out_b = healer.feed_all(calls("B", 260, 325, lambda s: True))
    [verdict] = [d for d in out_b if d.subject == "config:providers.B"]
    assert verdict.kind == "rollback_suppressed" and "per hour" in verdict.details["reason"]


def test_state_is_pruned_as_event_time_moves_on(monkeypatch: pytest.MonkeyPatch) -> None:
    healer = Healer(HealingConfig(THRESHOLDS, 1))
    out = healer.feed_all(history())
    escalations = [d.id for d in out if d.kind == "escalation"]
    assert len(escalations) > 3 and list(healer.escalations) == escalations
    size = len(json.dumps(healer.snapshot()))
    far = REQUEST_RETENTION_SECONDS + 10
    healer.feed(_llm(300 + far, "S", "ok", "late", 1, "r-late"))
    snap = healer.snapshot()
    # escalations wait for a person whatever the time; everything else has left its window
    assert [d["id"] for d in snap["escalations"]] == escalations
    assert snap["retries"] == {"heap": [], "requests": []}
    assert list(snap["health"]["runs"]) == ["r-late"] and snap["rollbacks"]["changes"] == []
    assert set(snap["rollbacks"]["buckets"]) == {"provider:S", "model:m"}  # only the last call's components
    assert all(len(b["window"]) <= 1 for b in snap["breakers"].values())
    assert len(json.dumps(snap)) < size
    # at most MAX_OPEN_ESCALATIONS wait: one more drops the oldest (and its pending rollback)
    monkeypatch.setattr(healer_module, "MAX_OPEN_ESCALATIONS", 3)
    healer.feed(_llm(400 + far, "S", "auth", "one-more", 1, "r-late"))
    assert len(healer.escalations) == 3 and escalations[0] not in healer.escalations
    assert not set(healer.rollbacks.pending) - set(healer.escalations)
    *_, ack, unmatched = healer.acknowledge(_ack(escalations[0], 500 + far))
    assert (ack.kind, unmatched.kind) == ("escalation_acked", "ack_unmatched")


def _ack(escalation_id: str, s: float) -> Any:
    from processors.healing.decisions import Decision

    return Decision(kind="escalation_acked", subject="x", event_time=T0 + timedelta(seconds=s), config_version=0,
                    causation_id=escalation_id, details={"escalation_id": escalation_id, "by": "ana", "note": "n"})  # fmt: skip


def test_restore_refuses_another_format_and_garbage() -> None:
    snap = Healer().snapshot()
    with pytest.raises(SnapshotError, match="format"):
        Healer.restore({**snap, "format": SNAPSHOT_FORMAT + 1})
    with pytest.raises(SnapshotError, match="not a healer snapshot"):
        Healer.restore({**snap, "breakers": {"provider:X": {"state": "sideways"}}})
    assert Healer.restore(snap).snapshot() == snap


def test_a_format_1_snapshot_is_converted_and_snapshots_again_in_the_current_format() -> None:
    """Format 1 kept the rollback monitor's calls whole; restore puts them into buckets."""
    snap = json.loads(json.dumps(Healer(HealingConfig(THRESHOLDS, 1)).snapshot()))
    rb = {k: v for k, v in snap["rollbacks"].items() if k not in ("buckets", "bucket_seconds", "kept_from")}
    t_us = int(T0.timestamp() * 1_000_000)
    rb["calls"] = {"provider:G": [[t_us, False, 900.0, 0.001], [t_us + 1_000_000, True, 800.0, 0.002]]}
    rb["counted"] = {"provider:G": [[int(T0.timestamp()) + 1, 5, 1]]}
    restored = Healer.restore({**snap, "format": 1, "rollbacks": rb})
    again = restored.snapshot()
    assert again["format"] == SNAPSHOT_FORMAT == 3
    [[_, calls, failures, latency, cost]] = again["rollbacks"]["buckets"]["provider:G"]  # one 3 s bucket
    assert (calls, failures, latency[0], sum(latency[2:]), sum(cost[2:])) == (7, 2, 0, 2, 2)


def test_decisions_made_counts_each_decision_returned_once() -> None:
    """Time-driven decisions (returned by feed after its advance) and acks (matched, releasing a rollback,
    and unmatched) each count once; they were counted twice (108 for 85 returned on this history)."""
    healer = Healer(HealingConfig(THRESHOLDS, 1))
    returned = 0
    escalations = []
    for e in history():
        out = healer.feed(e)
        returned += len(out)
        escalations += [d.id for d in out if d.kind == "escalation"]
    assert returned > 50 and len(escalations) > 3
    for i, eid in enumerate([*escalations, "no-such-escalation"]):
        returned += len(healer.acknowledge(_ack(eid, 400 + i)))
    assert healer.decisions_made == returned
    assert _roundtrip(healer).decisions_made == returned
