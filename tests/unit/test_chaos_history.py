"""The chaos history checker (``backbone.chaos_history.check_history``): a clean history passes, and each
deliberately broken one is reported under the guarantee it breaks, with its evidence."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from backbone.chaos import _interleave, expected_decisions, expected_insights, run_figures
from backbone.chaos_history import (
    GUARANTEES,
    ChaosHistory,
    ConfigWrite,
    InsightRecord,
    OutputRecord,
    ProducedEvent,
    RunFigures,
    TopicRecord,
    acknowledged_by_path,
    check_history,
    lost_in_window,
    violation_counts,
)
from connectors.agent_runs import ParsedRun, iter_runs
from streams.envelope import CloudEvent

DATA = Path(__file__).resolve().parents[2] / "datasets" / "agent_runs"


def _clean() -> ChaosHistory:
    """Two keys, one redelivered event, everything consistent."""
    produced = [ProducedEvent(f"a{i}", "run-a", True) for i in range(3)] + [
        ProducedEvent("b0", "run-b", True),
        ProducedEvent("a1", "run-a", True),  # a redelivery
        ProducedEvent("b1", "run-b", True),
    ]
    topic = [
        TopicRecord(0, 0, "run-a", "a0"), TopicRecord(0, 1, "run-a", "a1"), TopicRecord(1, 0, "run-b", "b0"),
        TopicRecord(0, 2, "run-a", "a2"), TopicRecord(0, 3, "run-a", "a1"), TopicRecord(1, 1, "run-b", "b1"),
    ]  # fmt: skip
    figures = {"run-a": RunFigures(2, 1, 0.25), "run-b": RunFigures(1, 1, 0.5)}
    rows = {
        "agent_runs": [["run-a", "2", "0.25"], ["run-b", "1", "0.5"]],
        "agent_run_models": [["run-a", "m", "2"]],
    }
    insight = {"run-a": {"metrics": {"llm_calls_count": 2.0}}, "run-b": {"metrics": {"llm_calls_count": 1.0}}}
    return ChaosHistory(
        produced=produced,
        topic=topic,
        expected_runs=figures,
        projected_runs=dict(figures),
        live_rows=copy.deepcopy(rows),
        rebuilt_rows=copy.deepcopy(rows),
        insights=[
            InsightRecord("run-a", "ia", copy.deepcopy(insight["run-a"])),
            InsightRecord("run-b", "ib", copy.deepcopy(insight["run-b"])),
            InsightRecord("run-a", "ia", copy.deepcopy(insight["run-a"])),  # a redelivered insight
        ],
        expected_insights=insight,
        lag_recovered_seconds=4.0,
        lag_bound_seconds=60.0,
    )


def _only(h: ChaosHistory, guarantee: str, n: int = 1) -> list:
    violations = check_history(h)
    counts = violation_counts(violations)
    assert counts == {g: (n if g == guarantee else 0) for g in GUARANTEES}, violations
    return violations


def test_a_clean_history_with_redeliveries_has_no_violation() -> None:
    assert check_history(_clean()) == []
    assert violation_counts([]) == dict.fromkeys(GUARANTEES, 0)


def test_an_acknowledged_event_missing_from_the_topic_is_lost() -> None:
    h = _clean()
    h.topic = [r for r in h.topic if r.event_id != "a2"]
    h.produced.append(ProducedEvent("never", "run-b", False))  # not acknowledged and absent: no violation
    (v,) = _only(h, "acknowledged_lost")
    assert v.evidence == {"event_id": "a2", "key": "run-a", "via": "producer"}


def _with_http(h: ChaosHistory) -> ChaosHistory:
    """``h`` plus a run sent over HTTP ingest: its first request failed (503: not acknowledged), the retry
    with the same Idempotency-Key (so the same ids) was acknowledged; the failed attempt had in fact put
    h0 on the topic, so h0 is there twice."""
    h.produced += [
        ProducedEvent("h0", "run-h", False, "http"),
        ProducedEvent("h1", "run-h", False, "http"),
        ProducedEvent("h0", "run-h", True, "http"),
        ProducedEvent("h1", "run-h", True, "http"),
    ]
    h.topic += [
        TopicRecord(2, 0, "run-h", "h0"),
        TopicRecord(2, 1, "run-h", "h0"),
        TopicRecord(2, 2, "run-h", "h1"),
    ]
    return h


def test_http_acknowledged_events_are_checked_like_the_producers() -> None:
    """A failed HTTP request retried with the same key is clean (the duplicate is removed by id); an event
    the API acknowledged (2xx) that is missing from the topic is lost, and the violation says it came over HTTP."""
    h = _with_http(_clean())
    assert check_history(h) == []
    assert acknowledged_by_path(h.produced) == {"producer": 5, "http": 2}
    h.topic = [r for r in h.topic if r.event_id != "h1"]
    (v,) = _only(h, "acknowledged_lost")
    assert v.evidence == {"event_id": "h1", "key": "run-h", "via": "http"} and "sent by http" in v.detail


def test_an_http_event_out_of_order() -> None:
    """Two HTTP requests acknowledged at the first attempt, h0's then h1's; the topic holds h1 before h0."""
    h = _clean()
    h.produced += [ProducedEvent("h0", "run-h", True, "http"), ProducedEvent("h1", "run-h", True, "http")]
    h.topic += [TopicRecord(2, 0, "run-h", "h1"), TopicRecord(2, 1, "run-h", "h0")]
    (v,) = _only(h, "order_per_key")
    assert v.evidence == {"key": "run-h", "position": 1, "on_topic": "h0", "produced": None}


def test_after_a_broker_restart_only_an_archived_loss_is_a_violation() -> None:
    """a2 was acknowledged but the archive had not taken it when the broker went down: the documented window,
    counted, no violation; b1 was archived and is still missing: the re-seed lost it, a violation."""
    h = _clean()
    h.topic = [r for r in h.topic if r.event_id not in ("a2", "b1")]
    h.broker_restarts = 1
    h.archived_before_restart = frozenset({"a0", "a1", "b0", "b1"})
    assert lost_in_window(h.produced, h.topic, h.archived_before_restart, h.broker_restarts) == {"a2"}
    (v,) = _only(h, "acknowledged_lost")
    assert (
        v.evidence == {"event_id": "b1", "key": "run-b", "via": "producer"} and "archive held it" in v.detail
    )
    # without a restart there is no window: both losses are violations
    h.broker_restarts = 0
    assert lost_in_window(h.produced, h.topic, h.archived_before_restart, 0) == set()
    assert len(_only(h, "acknowledged_lost", 2)) == 2


def test_a_record_counted_twice_by_the_projection() -> None:
    h = _clean()
    h.projected_runs["run-a"] = RunFigures(3, 1, 0.25)
    (v,) = _only(h, "counted_once")
    assert v.evidence["run_id"] == "run-a" and v.evidence["projected"]["llm_calls"] == 3


def test_a_cost_counted_twice_and_a_run_missing_from_the_projection() -> None:
    h = _clean()
    h.projected_runs = {"run-a": RunFigures(2, 1, 0.5)}
    _only(h, "counted_once", 2)


def test_an_out_of_order_key_on_the_topic() -> None:
    h = _clean()
    h.topic[0], h.topic[1] = replace(h.topic[0], event_id="a1"), replace(h.topic[1], event_id="a0")
    (v,) = _only(h, "order_per_key")
    assert v.evidence == {"key": "run-a", "position": 1, "on_topic": "a0", "produced": "a2"}


def test_an_event_lost_in_the_window_and_redelivered_later_is_in_order() -> None:
    """a1's first copy was lost with the broker's log; its redelivery (sent after a2) put it back after a2."""
    h = _clean()
    h.topic = [r for r in h.topic if (r.partition, r.offset) != (0, 1)]
    assert not check_history(h)
    h.topic = [r for r in h.topic if (r.partition, r.offset) != (0, 3)]  # and without the redelivery: lost
    assert {v.guarantee for v in check_history(h)} == {"acknowledged_lost"}


def test_a_key_spread_over_two_partitions() -> None:
    h = _clean()
    h.topic[3] = replace(h.topic[3], partition=2, offset=0)
    (v,) = _only(h, "order_per_key")
    assert v.evidence["partitions"] == [0, 2]


def test_a_projection_row_that_differs_from_the_rebuild() -> None:
    h = _clean()
    h.live_rows["agent_runs"][1] = ["run-b", "2", "0.5"]
    violations = _only(h, "rebuild_equal", 2)  # the live row, and the rebuilt row it should have been
    assert {v.evidence["side"] for v in violations} == {"live only", "rebuild only"}
    assert all(v.evidence["table"] == "agent_runs" for v in violations)


def test_a_row_twice_in_the_live_view() -> None:
    h = _clean()
    h.live_rows["agent_run_models"].append(["run-a", "m", "2"])
    _only(h, "rebuild_equal")


def test_an_insight_that_differs_is_missing_or_extra() -> None:
    h = _clean()
    h.insights[2] = InsightRecord("run-a", "ia", {"metrics": {"llm_calls_count": 3.0}})  # one copy differs
    (v,) = _only(h, "insights_equal")
    assert v.evidence["fields"] == ["metrics"]
    h = _clean()
    h.insights = [i for i in h.insights if i.run_id != "run-b"] + [InsightRecord("run-z", "iz", {})]
    assert {v.evidence["run_id"] for v in _only(h, "insights_equal", 2)} == {"run-b", "run-z"}


def test_lag_not_back_to_zero_within_the_bound() -> None:
    h = _clean()
    h.lag_recovered_seconds = None
    _only(h, "lag_recovered")
    h.lag_recovered_seconds = 61.0
    _only(h, "lag_recovered")


@dataclass(frozen=True)
class _Record:
    """What ``expected_insights`` reads of a consumed record."""

    partition: int
    offset: int
    schema: str
    data: dict[str, Any]
    attributes: CloudEvent
    topic: str = "chaos-events"


@pytest.mark.skipif(not DATA.is_dir(), reason="datasets/agent_runs is missing")
def test_expected_figures_and_insights_of_the_dataset_count_each_event_once() -> None:
    """On the project's 25 runs: the dataset's totals (1,730 events, 856 LLM calls, 824 tool calls,
    7.799117 USD), also with every event twice; one insight per run, the same with redeliveries."""
    events = [e for r in iter_runs(DATA) if isinstance(r, ParsedRun) for e in r.events]
    assert len(events) == 1730
    once = run_figures(events)
    assert run_figures(events + events) == once
    assert len(once) == 25
    assert sum(f.llm_calls for f in once.values()) == 856
    assert sum(f.tool_calls for f in once.values()) == 824
    assert round(sum(f.cost_usd for f in once.values()), 6) == 7.799117
    records = [_Record(0, i, e.schema, e.data, e.attributes) for i, e in enumerate(events)]
    again = records + [replace(r, offset=r.offset + len(records)) for r in records]
    insights = expected_insights(records)  # type: ignore[arg-type]
    assert len(insights) == 25
    assert expected_insights(again) == insights  # type: ignore[arg-type]
    assert sum(i["metrics"]["llm_calls_count"] for i in insights.values()) == 856


def _with_config(h: ChaosHistory) -> ChaosHistory:
    h.config_writes = [
        ConfigWrite("chaos.k0", 1, "c01"),
        ConfigWrite("chaos.k0", 2, "c02"),
        ConfigWrite("chaos.k1", 1, "c11"),
    ]
    h.config_store = {"chaos.k0": [(1, "c01"), (2, "c02")], "chaos.k1": [(1, "c11")]}
    h.config_topic_ids = frozenset({"c01", "c02", "c11"})
    h.config_read_model = {"chaos.k0": 2, "chaos.k1": 1}
    return h


def test_config_changes_published_and_read_model_current() -> None:
    assert not check_history(_with_config(_clean()))


def test_an_acknowledged_config_change_missing_from_the_topic_and_a_stale_read_model() -> None:
    h = _with_config(_clean())
    h.config_topic_ids = frozenset({"c01", "c11"})
    vs = _only(h, "config_current", 2)
    assert {v.evidence.get("version") for v in vs} >= {2}
    h = _with_config(_clean())
    h.config_read_model["chaos.k1"] = None  # Redis flushed and never rebuilt
    (v,) = _only(h, "config_current")
    assert v.evidence == {"key": "chaos.k1", "read_model": None, "topic": 1}


def test_a_config_change_lost_in_the_broker_restart_window_is_not_a_violation() -> None:
    h = _with_config(_clean())
    h.broker_restarts = 1
    h.archived_before_restart = frozenset({"a0", "a1", "a2", "b0", "b1", "c01"})
    h.config_topic_ids = frozenset({"c01", "c11"})  # c02 was published, not yet archived, then lost
    h.config_read_model["chaos.k0"] = 1
    assert not check_history(h)
    h.archived_before_restart = h.archived_before_restart | {"c02"}  # the archive had it: the re-seed lost it
    assert {v.guarantee for v in check_history(h)} == {"config_current"}


@pytest.mark.skipif(not DATA.is_dir(), reason="datasets/agent_runs is missing")
def test_http_requests_of_a_chunk_keep_its_order_and_its_data() -> None:
    """The workload's HTTP requests of a chunk of the interleaved dataset: runs of consecutive events of one
    type, in order, each key unique; the JSON bodies read back as ingest reads them (timestamps coerced)
    pass the schema and equal the events' data; the ids are those ingest derives (api, token id, key,
    index), distinct."""
    import itertools
    import json
    import random

    from backbone.chaos import _HttpIngest, _interleave
    from streams.envelope import deterministic_id
    from streams.registry import EmbeddedRegistry
    from streams.serde import AvroSerde, coerce_json_datum

    serde = AvroSerde(EmbeddedRegistry())
    events = _interleave([r for r in iter_runs(DATA) if isinstance(r, ParsedRun)], random.Random(3))
    chunk = events[100:160]
    http = _HttpIngest("http://127.0.0.1:9", "bb_x_y", "tok1", "t", "chaos-9", 1.0)
    try:
        groups = http.groups(7, chunk)
    finally:
        http.close()
    assert [e for g in groups for e in g.events] == chunk
    assert all({e.schema for e in g.events} == {g.schema} for g in groups)
    assert all(a.schema != b.schema for a, b in itertools.pairwise(groups))
    assert len(groups) > 5 and len({g.key for g in groups}) == len(groups)
    assert groups[2].key == "chaos-9-c7-g2"
    assert groups[2].ids == tuple(
        deterministic_id("api", "tok1", "chaos-9-c7-g2", i) for i in range(len(groups[2].events))
    )
    assert len({i for g in groups for i in g.ids}) == len(chunk)
    for g in groups:
        schema = serde.registry.schema_for(serde.registry.id_for(g.schema))
        for e, item in zip(g.events, json.loads(g.body), strict=True):
            datum = coerce_json_datum(schema, item)
            serde.check(g.schema, datum)
            assert datum == dict(e.data)


def _with_decisions(h: ChaosHistory) -> ChaosHistory:
    d1 = {"id": "d1", "kind": "agent_warning", "subject": "run:run-a", "details_json": "{}"}
    d2 = {"id": "d2", "kind": "agent_warning", "subject": "run:run-b", "details_json": "{}"}
    h.expected_decisions = {"d1": d1, "d2": d2}
    # d1 twice: decided again after a restart from a checkpoint before it, the same decision
    h.decisions = [
        OutputRecord("d1", dict(d1)),
        OutputRecord("d2", dict(d2)),
        OutputRecord("d1", dict(d1)),
    ]
    return h


def test_healer_decisions_equal_the_pure_healer_s_and_a_missing_extra_or_changed_one_is_caught() -> None:
    assert check_history(_with_decisions(_clean())) == []
    h = _with_decisions(_clean())
    h.decisions = [d for d in h.decisions if d.output_id != "d2"]  # dropped: a record skipped, say
    (v,) = _only(h, "decisions_equal")
    assert v.evidence["missing"] == ["d2"]
    h = _with_decisions(_clean())
    h.decisions.append(OutputRecord("d9", {"id": "d9", "kind": "agent_warning"}))
    (v,) = _only(h, "decisions_equal")
    assert v.evidence["extra"] == ["d9"]
    h = _with_decisions(_clean())
    h.decisions[2] = OutputRecord("d1", {**h.expected_decisions["d1"], "details_json": '{"level": "warn"}'})
    (v,) = _only(h, "decisions_equal")
    assert v.evidence["output_id"] == "d1" and list(v.evidence["got"]) == ["details_json"]


@pytest.mark.skipif(not DATA.is_dir(), reason="datasets/agent_runs is missing")
def test_expected_decisions_are_the_pure_healer_s_per_partition_whatever_the_records_order() -> None:
    """The project's 25 runs interleaved as the harness sends them (seed 1) on 6 partitions by run: the pure
    healer's decisions do not depend on the order the records are listed in (each partition is fed in offset
    order), and for about a fifth of the records, dropping that one record changes them (what
    ``decisions_equal`` then catches in a worker that skipped it; the other drops the log checks catch)."""
    import random
    import zlib

    runs = [r for r in iter_runs(DATA) if isinstance(r, ParsedRun)]
    events = _interleave(runs, random.Random(1))
    offsets: dict[int, int] = {}
    records = []
    for e in events:
        p = zlib.crc32(str(e.data["run_id"]).encode()) % 6
        records.append(_Record(p, offsets.setdefault(p, 0), e.schema, e.data, e.attributes))
        offsets[p] += 1
    want = expected_decisions(records)  # type: ignore[arg-type]
    assert len(want) > 100 and {d["kind"] for d in want.values()} == {"agent_warning"}
    shuffled = list(records)
    random.Random(2).shuffle(shuffled)
    assert expected_decisions(shuffled) == want  # type: ignore[arg-type]
    # one record dropped (a worker that skipped it): for about a fifth of them the decisions change
    changed = sum(expected_decisions(records[:i] + records[i + 1 :]) != want for i in range(100))  # type: ignore[arg-type]
    assert changed >= 10


def test_incident_insights_are_held_to_the_pure_engine_s_like_the_healer_s_decisions() -> None:
    opened = {"insight_id": "i1", "kind": "incident.opened", "labels": {"top1_pod": "ts-contacts-1"}}
    closed = {"insight_id": "i2", "kind": "incident.closed", "labels": {"top1_pod": "ts-contacts-1"}}
    h = _clean()
    h.expected_incidents = {"i1": opened, "i2": closed}
    h.incidents = [OutputRecord("i1", dict(opened)), OutputRecord("i2", dict(closed))]
    assert check_history(h) == []
    h.incidents = [OutputRecord("i1", {**opened, "labels": {"top1_pod": "ts-route-1"}})]  # re-learnt, wrong
    violations = _only(h, "incidents_equal", 2)
    assert violations[0].evidence["missing"] == ["i2"] and violations[1].evidence["output_id"] == "i1"


def test_embeddings_answered_once_or_more_within_tolerance_and_each_fault_reported() -> None:
    want = {"r1": [0.6, 0.8], "r2": [1.0, 0.0]}
    ok = replace(_clean(), expected_embeddings=want,
                 inference_results={"r1": [[0.6, 0.8], [0.60002, 0.79999]], "r2": [[1.0, 0.0]]})  # fmt: skip
    assert check_history(ok) == []
    broken = replace(ok, inference_results={"r1": [[0.6, 0.8], [0.6, 0.7]], "r3": [[0.0, 1.0]]})
    found = {(v.evidence["request_id"], v.detail.split(": ", 1)[1][:17]) for v in check_history(broken)}
    assert found == {
        ("r1", "an answer differs"),  # the second copy is off by 0.1
        ("r2", "acknowledged, nev"),
        ("r3", "answered, never r"),
    }
    assert violation_counts(check_history(broken))["inference_equal"] == 3
