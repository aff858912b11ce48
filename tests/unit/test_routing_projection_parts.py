"""Pure parts of the routing projection: the shape checks of decisions and outcomes, their deterministic
event ids, and the projection's own decoder of JSON records (no network)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from processors.routing.policy import Outcome, PolicyRequest, RoutingState, next_fallback
from projections.archive import ArchivedRecord
from projections.registry import get_projection
from projections.routing import (
    DECISION_TYPE,
    OUTCOME_TYPE,
    RoutingProjection,
    outcome_id,
    parse_decision,
    parse_outcome,
)
from streams.consumer import ConsumedEvent, DecodeFailure, RawRecord

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CONFIG = {
    "providers": {"p": {"requests_per_minute": 10}},
    "models": {
        "a": {"provider": "p", "capabilities": ["chat"], "context_window_tokens": 8000,
              "usd_per_million_input_tokens": 1.0, "usd_per_million_output_tokens": 1.0},
        "b": {"provider": "p", "capabilities": ["chat"], "context_window_tokens": 8000,
              "usd_per_million_input_tokens": 2.0, "usd_per_million_output_tokens": 2.0},
    },
    "policies": {"cheap": {"kind": "cheapest", "models": ["a", "b"], "quality_target": 0.4}},
    "default_policy": "cheap",
}  # fmt: skip


def _decision_and_fallback() -> tuple[dict, dict]:
    state = RoutingState()
    state.on_config(CONFIG, 7)
    req = PolicyRequest(request_id="r1", requested_at=T0, prompt="hello")
    d = state.on_request(req)
    assert state.setup is not None
    fb = next_fallback(d, state.setup, req, state.health(), state.learner)
    return d.to_json(), fb.to_json()


def _raw(topic: str, value: bytes | None, key: bytes | None = b"r1", offset: int = 0) -> RawRecord:
    return RawRecord(
        topic=topic, partition=0, offset=offset, timestamp_ms=0, key=key, value=value, headers=()
    )


def test_a_real_decision_parses_into_its_row() -> None:
    """The router's own ``to_json`` output gives a row with every field; the fallback names the failed model."""
    d, fb = _decision_and_fallback()
    row = parse_decision(d)
    assert (row["request_id"], row["model"], row["fallbacks"], row["fallback_from"]) == ("r1", "a", ["b"], [])
    assert row["config_version"] == 7 and row["learner_version"] == "none" and row["decided_at"] == T0
    assert row["candidates"] == d["candidates"] and len(row["candidates"]) == 2
    frow = parse_decision(fb)
    assert (
        frow["fallback_from"] == ["a"] and frow["model"] == "b" and frow["decision_id"] != row["decision_id"]
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"decision_id": ""}, "empty 'decision_id'"),
        ({"config_version": "7"}, "'config_version' is str, not int"),
        ({"config_version": True}, "'config_version' is bool"),
        ({"decided_at": "yesterday"}, "not an ISO 8601 time"),
        ({"fallbacks": "b"}, "'fallbacks' is str"),
        ({"fallbacks": ["b", 3]}, "list of model names"),
        ({"candidates": [{"model": "a"}]}, "candidate 0: missing 'provider'"),
        ({"candidates": ["a"]}, "candidate 0 is not an object"),
    ],
)
def test_a_malformed_decision_is_refused_with_the_reason(change: dict, message: str) -> None:
    d, _ = _decision_and_fallback()
    with pytest.raises(ValueError, match=message):
        parse_decision({**d, **change})


def test_decision_without_required_field_and_non_objects_are_refused() -> None:
    d, _ = _decision_and_fallback()
    with pytest.raises(ValueError, match="missing 'policy'"):
        parse_decision({k: v for k, v in d.items() if k != "policy"})
    with pytest.raises(ValueError, match="JSON object"):
        parse_decision([d])
    with pytest.raises(ValueError, match="JSON object"):
        parse_outcome("x")


def test_outcome_row_keeps_cost_exact_and_its_id_is_deterministic() -> None:
    """The same outcome written with another UTC offset has the same id; cost is the float's shortest repr."""
    o = Outcome(request_id="r1", model="a", success=False, occurred_at=T0, latency_ms=12, cost_usd=0.00618)
    row = parse_outcome(o.to_json())
    assert row["cost_usd"] == Decimal("0.00618") and row["latency_ms"] == 12.0 and row["correct"] is None
    shifted = dict(o.to_json(), occurred_at=T0.astimezone(timezone(timedelta(hours=2))).isoformat())
    assert parse_outcome(shifted)["outcome_id"] == row["outcome_id"] == outcome_id("r1", "a", T0)
    assert outcome_id("r1", "b", T0) != row["outcome_id"]
    assert outcome_id("r1", "a", T0 + timedelta(microseconds=1)) != row["outcome_id"]
    with pytest.raises(ValueError, match="naive"):
        outcome_id("r1", "a", T0.replace(tzinfo=None))
    for change, message in (({"success": "yes"}, "'success' is str"), ({"latency_ms": -1}, "negative"),
                            ({"cost_usd": float("nan")}, "finite"), ({"model": ""}, "empty")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_outcome({**o.to_json(), **change})


def test_decode_builds_events_with_deterministic_ids_or_failures() -> None:
    """Decisions and outcomes become events keyed by the decision id / outcome id, with JSON content type;
    bad bytes, a wrong shape, a tombstone and a decision keyed by another request become failures that
    keep the raw bytes."""
    p = RoutingProjection(decisions_topic="dec", outcomes_topic="out")
    d, _ = _decision_and_fallback()
    e = p.decode(_raw("dec", json.dumps(d).encode()))
    assert isinstance(e, ConsumedEvent) and e.attributes.id == d["decision_id"] and e.schema == DECISION_TYPE
    assert (
        e.attributes.datacontenttype == "application/json" and e.attributes.subject == "r1" and e.key == "r1"
    )
    assert e.attributes.time == T0 and e.data["model"] == "a"
    o = Outcome(request_id="r1", model="a", success=True, occurred_at=T0)
    e2 = p.decode(_raw("out", json.dumps(o.to_json()).encode()))
    assert isinstance(e2, ConsumedEvent) and e2.schema == OUTCOME_TYPE
    assert e2.attributes.id == outcome_id("r1", "a", T0)
    # on a topic of another name the shape tells
    assert p.decode(_raw("elsewhere", json.dumps(d).encode())).schema == DECISION_TYPE  # type: ignore[union-attr]
    bad = {
        b"\xff\xfe": "not JSON",
        b"[1, 2]": "not a routing outcome",
        json.dumps({**d, "request_id": "r2"}).encode(): "is not its request id",
    }
    for value, why in bad.items():
        f = p.decode(_raw("out" if value == b"[1, 2]" else "dec", value))
        assert isinstance(f, DecodeFailure) and why in f.reason and f.value == value and f.key == b"r1"
    tomb = p.decode(_raw("dec", None))
    assert isinstance(tomb, DecodeFailure) and "tombstone" in tomb.reason
    # a record without a key is taken as it is
    assert isinstance(p.decode(_raw("dec", json.dumps(d).encode(), key=None)), ConsumedEvent)


def test_raw_record_round_trips_through_a_failure_and_the_archive() -> None:
    """A record read another way (a replay's failure, an archived row) gives the same event when decoded
    by the projection."""
    p = RoutingProjection(decisions_topic="dec", outcomes_topic="out")
    d, _ = _decision_and_fallback()
    raw = _raw("dec", json.dumps(d).encode(), offset=5)
    direct = p.decode(raw)
    failure = raw.failure("not Avro")
    assert RawRecord.of(failure) == raw and p.decode(RawRecord.of(failure)) == direct
    archived = ArchivedRecord(topic="dec", partition=0, offset=5, event_time=T0,
                              record_timestamp=datetime.fromtimestamp(0, UTC), key=b"r1", value=raw.value,
                              headers=())  # fmt: skip
    assert archived.decode(None, p.decode) == direct  # type: ignore[arg-type]


def test_routing_is_registered_with_the_production_topics() -> None:
    p = get_projection("routing")
    assert p.topics == ("routing.policy-decisions", "routing.outcomes") and p.version == 1
    assert callable(getattr(p, "decode", None)) and not hasattr(p, "apply_columns")
