"""The Healer: routing of events to its parts, hot-reloaded thresholds, ack, and deterministic replay."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from configuration.schemas import HealingThresholds
from processors.healing.healer import Healer, HealingConfig

T0 = datetime(2025, 11, 18, 23, 0, tzinfo=UTC)


def llm(
    s: float,
    provider: str,
    outcome: str = "ok",
    request_id: str | None = None,
    attempt: int = 1,
    run: str = "r1",
) -> dict[str, Any]:
    return {"schema": "sophia.agent.LlmCall", "id": f"llm-{s}-{provider}-{request_id}-{attempt}",
            "data": {"run_id": run, "step": int(s), "event_time": T0 + timedelta(seconds=s), "model": "m",
                     "provider": provider, "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.001,
                     "outcome": outcome, "error_kind": None if outcome == "ok" else outcome,
                     "request_id": request_id, "attempt": attempt}}  # fmt: skip


def config_change(s: float, key: str, version: int, value: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"schema": "sophia.config.ConfigChange", "id": f"cfg-{key}-{version}",
            "data": {"key": key, "version": version, "change": kw.get("change", "CHANGED"), "value_json": json.dumps(value),
                     "author": kw.get("author", "ana"), "reason": "r", "changed_at": T0 + timedelta(seconds=s)}}  # fmt: skip


def history(seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = []
    for i in range(400):
        s = i * 1.5
        down = 100 <= s < 250
        provider = "Google" if i % 3 else "Studio"
        outcome = (
            ("server_error" if rng.random() < 0.5 else "rate_limited")
            if down and provider == "Google" and rng.random() < 0.8
            else "ok"
        )
        events.append(llm(s, provider, outcome, request_id=f"q{i}", run=f"r{i % 4}"))
        events.append({"schema": "sophia.agent.ToolCall", "id": f"t{i}", "data": {"run_id": f"r{i % 4}", "step": i,
                       "event_time": T0 + timedelta(seconds=s), "command": "pytest" if i % 4 == 1 else f"c{i}",
                       "return_code": 1 if i % 4 == 1 else 0, "timed_out": False}})  # fmt: skip
    return events


def test_outage_opens_then_closes_the_provider_circuit_and_schedules_retries() -> None:
    healer = Healer(
        HealingConfig(
            HealingThresholds(
                consecutive_failures=3, open_seconds=20, fallback_chains={"Google": ["Studio"]}
            ),
            4,
        )
    )
    out = healer.feed_all(history())
    google = [d for d in out if d.subject == "circuit:provider:Google"]
    kinds = [d.kind for d in google]
    assert kinds[0] == "circuit_opened" and kinds[-1] == "circuit_closed" and "circuit_half_open" in kinds
    assert 100 <= (google[0].event_time - T0).total_seconds() < 130
    assert (google[-1].event_time - T0).total_seconds() >= 250
    assert not [d for d in out if d.subject == "circuit:provider:Studio"]
    assert any(d.kind == "retry_scheduled" for d in out) and any(d.kind == "retry_due" for d in out)
    assert {d.config_version for d in out} == {4}
    assert any(d.kind == "agent_warning" and d.subject == "run:r1" for d in out)  # the failing pytest loop


def test_replay_of_the_same_history_gives_the_same_decisions() -> None:
    a = [d.as_json() for d in Healer().feed_all(history())]
    b = [d.as_json() for d in Healer().feed_all(history())]
    assert a == b and len(a) > 10
    assert a != [d.as_json() for d in Healer().feed_all(history(seed=2))]


def test_healing_config_change_is_applied_and_a_bad_one_refused() -> None:
    healer = Healer()
    [applied] = healer.feed(config_change(0, "healing.thresholds", 2, {"consecutive_failures": 2}))
    assert applied.kind == "config_applied" and healer.config.version == 2
    [refused] = healer.feed(config_change(1, "healing.thresholds", 3, {"consecutive_failures": 0}))
    assert refused.kind == "config_refused" and healer.config.version == 2 and refused.details["problems"]
    healer.feed(llm(2, "X", "timeout"))
    [opened, _model_opened] = healer.feed(llm(3, "X", "timeout"))
    assert opened.kind == "circuit_opened" and opened.config_version == 2


def test_unknown_provider_creates_a_circuit_and_missing_fields_raise() -> None:
    healer = Healer()
    healer.feed(llm(0, "Brand-New"))
    assert [c["circuit"] for c in healer.status()["circuits"]] == ["model:Brand-New/m", "provider:Brand-New"]
    assert healer.feed({"schema": "sophia.other.Thing", "data": {}}) == []
    with pytest.raises(KeyError):
        healer.feed({"schema": "sophia.agent.LlmCall", "data": {"run_id": "r"}})


def test_rollback_through_the_healer_and_approval_ack() -> None:
    t = HealingThresholds(
        rollback_window_seconds=60,
        rollback_min_calls=10,
        rollback_mode="approval",
        consecutive_failures=1000,
        error_rate=1.0,
        min_calls=1000,
    )
    healer = Healer(HealingConfig(t, 1))
    events = [llm(i, "P") for i in range(60)]
    events.append(config_change(60, "providers.p", 2, {"requests_per_minute": 10}))
    events += [llm(60 + i, "P", "server_error" if i % 2 else "ok") for i in range(61)]
    for e in events:  # the config key names provider p; calls name provider P: make them match
        if e["schema"].endswith("LlmCall"):
            e["data"]["provider"] = "p"
    out = healer.feed_all(events)
    [esc] = [d for d in out if d.kind == "escalation"]
    assert esc.subject == "config:providers.p" and esc.causation_id == "cfg-providers.p-2"
    assert healer.status()["escalations"][0]["id"] == esc.id
    _acked, rb = healer.ack(esc.id, by="ana", note="ok", at=T0 + timedelta(seconds=200))
    assert rb.kind == "rollback" and rb.details["to_version"] == 1 and healer.status()["escalations"] == []


def test_an_ack_event_releases_the_pending_rollback_and_an_unknown_one_is_unmatched() -> None:
    """The person's ack arrives as a ``sophia.healing.Decision`` on the acks topic: fed to the healer it
    comes back unchanged (same id) followed by the rollback it released; fed again, or for an escalation
    this healer never raised, it gives ``ack_unmatched``. A replay of the same stream agrees."""
    from processors.healing.decisions import Decision

    t = HealingThresholds(rollback_window_seconds=60, rollback_min_calls=10, rollback_mode="approval",
                          consecutive_failures=1000, error_rate=1.0, min_calls=1000)  # fmt: skip
    events = [llm(i, "p") for i in range(60)]
    events.append(config_change(60, "providers.p", 2, {"requests_per_minute": 10}))
    events += [llm(60 + i, "p", "server_error" if i % 2 else "ok") for i in range(61)]
    healer = Healer(HealingConfig(t, 1))
    [esc] = [d for d in healer.feed_all(events) if d.kind == "escalation"]
    ack = Decision(kind="escalation_acked", subject=esc.subject, event_time=T0 + timedelta(seconds=200),
                   config_version=0, causation_id=esc.id, details={"escalation_id": esc.id, "by": "ana", "note": "go"})  # fmt: skip
    as_event = {"schema": "sophia.healing.Decision", "id": ack.id, "data": ack.to_avro()}
    out = healer.feed(as_event)
    kinds = [d.kind for d in out]
    assert kinds[-2:] == ["escalation_acked", "rollback"] and out[-2].id == ack.id
    assert out[-1].details["to_version"] == 1 and out[-1].causation_id == esc.id
    assert healer.status()["escalations"] == []
    again = healer.feed(as_event)
    assert [d.kind for d in again] == ["escalation_acked", "ack_unmatched"]
    assert again[-1].causation_id == ack.id and "no open escalation" in again[-1].details["reason"]
    replayed = Healer(HealingConfig(t, 1))
    assert [d.id for d in replayed.feed_all([*events, as_event])] == [
        d.id for d in Healer(HealingConfig(t, 1)).feed_all(events) + out
    ]
    other = {"schema": "sophia.healing.Decision", "data": {**ack.to_avro(), "kind": "circuit_opened"}}
    assert healer.feed(other) == []  # only acks are inputs


def test_a_malformed_threshold_config_is_refused_when_set() -> None:
    from configuration.errors import ConfigValueError
    from configuration.schemas import default_schemas

    schemas = default_schemas()
    stored, name = schemas.validate("healing.thresholds", {"consecutive_failures": 3})
    assert name == "HealingThresholds" and stored["open_seconds"] == 30.0  # defaults filled in
    for bad, field in (
        ({"half_open_max_probes": 1, "half_open_successes": 2}, "half_open_successes"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"rollback_mode": "yolo"}, "rollback_mode"),
        ({"retry_base_seconds": 60, "retry_max_seconds": 30}, "retry_base_seconds"),
        ({"colour": "red"}, "colour"),
    ):
        with pytest.raises(ConfigValueError, match=field):
            schemas.validate("healing.thresholds", bad)
