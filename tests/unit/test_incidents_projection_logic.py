"""The pure part of the incidents projection: reading the insights the processors make, and merging an
incident's states independently of their order."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connectors.nezha import iter_day
from processors.correlation.logic import Link, Observation
from processors.incidents.anomaly import Anomaly
from processors.incidents.eval_nezha import TELEMETRY_KINDS
from processors.incidents.incident import EngineConfig, run
from projections.errors import ProjectionApplyError
from projections.incidents import merge_incident, parse_anomaly, parse_correlation, parse_incident

SLICE = Path(__file__).resolve().parents[2] / "datasets" / "nezha"
_KINDS = TELEMETRY_KINDS


@pytest.fixture(scope="module")
def insights() -> list[dict[str, Any]]:
    """The incident engine's insights on the Nezha slice (event_time as the aware datetime Avro gives)."""
    records = sorted(iter_day(SLICE), key=lambda te: te[1].attributes.time)
    # every latency percentile scored (min_tail_requests 0): the slice then has three incidents, one with
    # two updates, which is what the merge tests below need; detection quality is not what they test
    out, _ = run(((_KINDS[t], e.data) for t, e in records), EngineConfig(min_tail_requests=0.0))
    return [{**i, "event_time": datetime.fromtimestamp(i["event_time"] / 1000, UTC)} for i in out]


def _ms(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def test_parse_incident_reads_what_the_engine_writes(insights: list[dict[str, Any]]) -> None:
    closed = [i for i in insights if i["kind"] == "incident.closed"]
    assert len(closed) == 3
    for i in closed:
        st = parse_incident(i, i["entity"])
        r = st.row
        listed = json.loads(i["labels"]["anomalies"])
        cands = json.loads(i["labels"]["candidates"])
        assert st.incident_id == i["entity"].removeprefix("incident:") and st.kind == "incident.closed"
        assert (r["opened_at"], r["closed_at"], r["latest_event_at"]) == (
            None,
            i["event_time"],
            i["event_time"],
        )
        assert r["first_anomaly_at"] == _ms(i["metrics"]["first_anomaly_window_ms"])
        assert r["last_anomaly_at"] == _ms(i["metrics"]["last_anomaly_window_ms"])
        assert (
            r["anomalies_count"] == int(i["metrics"]["anomalies_count"]) == len(st.anomalies) == len(listed)
        )
        assert json.loads(r["candidates"]) == cands and [c["rank"] for c in cands] == list(
            range(1, len(cands) + 1)
        )
        assert r["services"] == sorted({a["service"] for a in listed} | {c["service"] for c in cands})
        assert r["pods"] == sorted({a["pod"] for a in listed} | {c["pod"] for c in cands})
        assert r["top1_pod"] == cands[0]["pod"] == i["labels"]["top1_pod"]
        assert r["priority"] == i["labels"]["priority"] and r["suspect_changes"] == "[]"
        assert st.anomalies[0][0] == _ms(listed[0]["window_start_ms"])


def test_an_incidents_row_does_not_depend_on_the_order_of_its_insights(
    insights: list[dict[str, Any]],
) -> None:
    """Every permutation of the four insights of the second incident merges to the same row: the closed
    state, opened at the opened insight's event time."""
    counts = Counter(i["entity"] for i in insights)
    entity = next(i["entity"] for i in insights if counts[i["entity"]] == 4)
    mine = [parse_incident(i, entity) for i in insights if i["entity"] == entity]
    assert [s.kind for s in mine] == [
        "incident.opened",
        "incident.updated",
        "incident.updated",
        "incident.closed",
    ]
    results = set()
    for perm in itertools.permutations(mine):
        row: dict[str, Any] | None = None
        for st in perm:
            row = merge_incident(row, st.row)
        assert row is not None
        results.add(json.dumps(row, default=str, sort_keys=True))
    assert len(results) == 1
    row = json.loads(results.pop())
    assert row["latest_kind"] == "incident.closed" and row["anomalies_count"] == 8
    assert row["opened_at"] == str(mine[0].row["opened_at"]) and row["closed_at"] == str(
        mine[-1].row["closed_at"]
    )


def test_a_close_outranks_an_update_at_the_same_event_time(insights: list[dict[str, Any]]) -> None:
    """The third incident's last update and its close share an event time; the close is the latest state."""
    entity = insights[-1]["entity"]
    upd, close = (parse_incident(i, entity) for i in insights[-2:])
    assert upd.row["latest_event_at"] == close.row["latest_event_at"] and upd.kind == "incident.updated"
    assert (
        merge_incident(close.row, upd.row)["latest_kind"]
        == merge_incident(upd.row, close.row)["latest_kind"]
        == ("incident.closed")
    )


def _broken(i: dict[str, Any], **labels: str | None) -> dict[str, Any]:
    new = {k: v for k, v in {**i["labels"], **labels}.items() if v is not None}
    return {**i, "labels": new}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"candidates": "{not json"}, "not JSON"),
        ({"candidates": "[1, 2]"}, "not a JSON list of objects"),
        ({"candidates": None}, "no label 'candidates'"),
        ({"priority": None}, "no 'priority'"),
        ({"anomalies": '[{"pod": "p"}]'}, "lacks"),
        ({"suspect_changes": '"x"'}, "not a JSON list of objects"),
    ],
)
def test_a_malformed_incident_insight_is_refused(
    insights: list[dict[str, Any]], change: dict, reason: str
) -> None:
    i = insights[0]
    with pytest.raises(ProjectionApplyError, match=reason):
        parse_incident(_broken(i, **change), i["entity"])


def test_an_incident_insight_under_another_key_or_entity_is_refused(insights: list[dict[str, Any]]) -> None:
    i = insights[0]
    with pytest.raises(ProjectionApplyError, match="does not match key"):
        parse_incident(i, "incident:other")
    with pytest.raises(ProjectionApplyError, match="is not incident:<id>"):
        parse_incident({**i, "entity": "run:x"}, "run:x")
    with pytest.raises(ProjectionApplyError, match="naive"):
        parse_incident({**i, "event_time": datetime(2023, 1, 29)}, i["entity"])
    with pytest.raises(ProjectionApplyError, match="not an incident insight kind"):
        parse_incident({**i, "kind": "run.summary"})


def test_suspect_changes_are_projected_when_the_insight_carries_them(insights: list[dict[str, Any]]) -> None:
    change = [
        {
            "entity": "git:acme/widget@0123456789abcdef0123456789abcdef01234567",
            "reason": "deployed 2 min before",
        }
    ]
    i = _broken(insights[0], suspect_changes=json.dumps(change))
    assert json.loads(parse_incident(i, i["entity"]).row["suspect_changes"]) == change


def test_parse_anomaly_reads_the_anomaly_processors_insight() -> None:
    at = datetime(2023, 1, 29, 8, 43, 25, tzinfo=UTC)
    alert = Anomaly(series="pod:p-1/CpuUsageRate(%)", observed_at=at, value=89.5, score=0.9995,
                    window_start=at - timedelta(hours=1), detector_version="likelihood/1", sample_index=125)  # fmt: skip
    event = alert.to_insight(causation_id="sample-1")
    r = parse_anomaly(event.data, event.key)
    assert r == {
        "insight_id": alert.insight_id, "entity": "series:pod:p-1/CpuUsageRate(%)", "series": alert.series,
        "event_time": at, "score": 0.9995, "value": 89.5, "sample_index": 125, "window_start": at - timedelta(hours=1),
        "window_end": at, "window_seconds": 3600.0, "detector_version": "likelihood/1", "summary": event.data["summary"],
    }  # fmt: skip
    with pytest.raises(ProjectionApplyError, match="is not series:"):
        parse_anomaly({**event.data, "entity": "series:other"}, "series:other")
    with pytest.raises(ProjectionApplyError, match="no 'score'"):
        parse_anomaly({**event.data, "metrics": {"value": 1.0}}, event.key)


def test_parse_correlation_reads_a_link() -> None:
    t0 = datetime(2030, 5, 4, 12, 0, tzinfo=UTC)
    sha = "0123456789abcdef0123456789abcdef01234567"
    message = Observation(entity="slack:acme/dev/1", kind="message", event_time=t0 + timedelta(hours=2),
                          event_id="m1", text="did 0123456 land?")  # fmt: skip
    commit = Observation(entity=f"git:acme/widget@{sha}", kind="commit", event_time=t0, event_id="c1",
                         text="count frobs", repo="acme/widget", sha=sha)  # fmt: skip
    event = Link(
        method="reference", message=message, commit=commit, reference="github:acme/widget@0123456"
    ).to_insight()
    r = parse_correlation(event.data, event.key)
    assert (r["entity"], r["message_entity"], r["method"], r["reference"]) == (
        commit.entity,
        message.entity,
        "reference",
        "github:acme/widget@0123456",
    )
    assert (r["source_a"], r["source_b"], r["lag_seconds"], r["cosine"]) == ("slack", "git", 7200.0, None)
    assert (
        r["commit_sha"] == sha and r["repo"] == "acme/widget" and r["event_time"] == t0 + timedelta(hours=2)
    )
    with pytest.raises(ProjectionApplyError, match="no 'lag_seconds'"):
        parse_correlation({**event.data, "metrics": {}}, event.key)
