"""Detectors, root-cause ranking and the watermarked incident engine (plain Python, no broker)."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from connectors.nezha import iter_day
from processors.incidents.eval_nezha import TELEMETRY_KINDS
from processors.incidents.incident import EngineConfig, IncidentEngine, run
from processors.incidents.nezha_detect import Anomaly, RobustZ
from processors.incidents.rca import VICTIM_FACTOR, WARN_FACTOR, evidence_kind, rank

SLICE = Path(__file__).resolve().parents[2] / "datasets" / "nezha"
T0 = datetime(2023, 1, 29, 8, 0, 9, tzinfo=UTC)
KIND = TELEMETRY_KINDS


def test_robust_z_has_no_look_ahead_and_resists_spikes() -> None:
    d = RobustZ(window=20, min_history=5, direction=1, abs_floor=0.1)
    base = [1.0, 1.1, 0.9, 1.0, 1.05]
    assert [d.update(x)[0] for x in base] == [0.0] * 5  # warm-up
    spike = d.score(50.0)[0]
    assert spike > 100
    # a score depends only on the past: the same prefix gives the same score whatever follows
    e = RobustZ(window=20, min_history=5, direction=1, abs_floor=0.1)
    for x in base:
        e.update(x)
    assert e.update(50.0)[0] == spike
    e.update(60.0)  # one spike in the history barely moves the median
    assert e.score(1.0)[0] == 0.0


def test_robust_z_direction() -> None:
    up = RobustZ(min_history=3, direction=1, abs_floor=1.0)
    down = RobustZ(min_history=3, direction=-1, abs_floor=1.0)
    for x in (10.0, 10.0, 10.0):
        up.update(x)
        down.update(x)
    assert up.score(0.0)[0] == 0.0 and down.score(0.0)[0] == 10.0


def _a(pod: str, signal: str, score: float, w: int = 0) -> Anomaly:
    return Anomaly(pod, pod.rsplit("-", 1)[0], signal, w, score, 1.0, 0.0)


def test_rank_prefers_the_callee_and_explains_why() -> None:
    anomalies = [
        _a("gateway-1", "metric:PodServerLatencyP90(s)", 10.0),
        _a("orders-1", "metric:PodServerLatencyP90(s)", 8.0),
        _a("orders-1", "log:new_template", 9.0),
        _a("frontend", "metric:LatencyP90(s)", 50.0),
    ]
    graph = {"gateway-1": {"orders-1": 12}}
    ranked = rank(anomalies, graph)
    assert [c.pod for c in ranked] == ["orders-1", "gateway-1"]  # frontend is never a candidate
    assert any("likely a victim" in line and f"x{VICTIM_FACTOR}" in line for line in ranked[1].evidence)
    assert any("called by anomalous gateway-1" in line for line in ranked[0].evidence)
    assert ranked[0].evidence[0].startswith("log:new_template")
    # without the call graph the caller with the bigger latency anomaly would not be demoted
    alone = rank(anomalies[:1] + anomalies[1:2], {})
    assert alone[0].pod == "gateway-1"


def test_rank_counts_one_latency_histogram_once() -> None:
    # P90 and P99 of one pod are one piece of latency evidence, not two: a CPU anomaly of about the same
    # strength on another pod is not outweighed by the pair
    anomalies = [
        _a("checkout-1", "metric:PodServerLatencyP90(s)", 6.3),
        _a("checkout-1", "metric:PodServerLatencyP99(s)", 6.3),
        _a("cart-1", "metric:CpuUsageRate(%)", 7.0),
    ]
    ranked = rank(anomalies, {})
    assert [c.pod for c in ranked] == ["cart-1", "checkout-1"]
    assert ranked[1].score == pytest.approx(math.log1p(6.3))
    assert evidence_kind("metric:PodServerLatencyP99(s)") == "latency"
    assert evidence_kind("metric:CpuUsageRate(%)") == "resource"
    assert evidence_kind("log:new_template") == "errors"
    # distinct kinds on one pod add up
    both = rank([*anomalies, _a("checkout-1", "log:new_template", 7.0)], {})
    assert both[0].pod == "checkout-1"


def test_a_cpu_saturated_caller_is_the_cause_not_a_victim_and_blames_nobody() -> None:
    # the caller's own CPU is saturated; its callee only shows latency: the callee inherits nothing from
    # a caller's CPU, and the caller's CPU is not discounted because its callee is slow
    anomalies = [
        _a("preserve-1", "metric:CpuUsageRate(%)", 99.0),
        _a("security-1", "metric:PodServerLatencyP90(s)", 6.3),
        _a("security-1", "metric:PodServerLatencyP99(s)", 6.3),
    ]
    graph = {"preserve-1": {"security-1": 40}}
    ranked = rank(anomalies, graph)
    assert [c.pod for c in ranked] == ["preserve-1", "security-1"]
    assert ranked[0].score == pytest.approx(math.log1p(99.0))
    assert not any("called by" in line for line in ranked[1].evidence)
    # a caller with latency of its own does pass blame to the callee, and is discounted as a victim
    slow = rank([*anomalies, _a("preserve-1", "metric:PodServerLatencyP90(s)", 3.0)], graph)
    assert any("called by anomalous preserve-1" in line for line in slow[1].evidence)
    assert any("likely a victim" in line for line in slow[0].evidence)
    assert slow[0].score == pytest.approx(math.log1p(99.0) + VICTIM_FACTOR * math.log1p(3.0))


def _metric(pod: str, minute: int, cpu: float) -> dict:
    return {"pod": pod, "service": pod.rsplit("-", 1)[0], "event_time": T0 + timedelta(minutes=minute),
            "metrics": {"CpuUsageRate(%)": cpu, "PodServerLatencyP90(s)": 0.02}}  # fmt: skip


def _scenario() -> list[tuple[str, dict]]:
    rng = random.Random(7)
    records = []
    for m in range(40):
        for pod in ("a-1", "b-1", "c-1"):
            cpu = 2.0 + rng.random()
            if pod == "b-1" and 30 <= m < 33:
                cpu = 95.0  # a CPU hog on b from minute 30
            records.append(("metric", _metric(pod, m, cpu)))
    return records


def test_engine_opens_and_closes_an_incident_on_event_time() -> None:
    insights, engine = run(_scenario())
    kinds = [i["kind"] for i in insights]
    assert kinds[0] == "incident.opened" and kinds[-1] == "incident.closed"
    opened = insights[0]
    assert opened["labels"]["top1_pod"] == "b-1"
    # opened at the end of minute 30's window plus the allowed lateness: event time, not wall clock
    assert (
        opened["event_time"]
        == int((T0.replace(second=0) + timedelta(minutes=31)).timestamp() * 1000) + 15_000
    )
    cands = json.loads(insights[-1]["labels"]["candidates"])
    assert cands[0]["pod"] == "b-1" and cands[0]["evidence"]
    assert engine.stats()["late_events"] == {}


def _log(pod: str, minute: int, level: str, logger: str) -> dict:
    return {"pod": pod, "service": pod.rsplit("-", 1)[0], "event_time": T0 + timedelta(minutes=minute),
            "level": level, "logger": logger, "message": "m"}  # fmt: skip


def test_an_error_template_back_after_a_quiet_spell_is_new_again() -> None:
    # one ERROR template on a-1 at minute 1, then only INFO lines; it comes back at minute 4 (quiet 3
    # minutes: still the same occurrence) and at minute 12 (quiet 8 minutes > max_incident_ms 5 minutes)
    records = []
    for m in range(16):
        records.append(("log", _log("a-1", m, "INFO", "a.Main#1")))
        if m in (1, 4, 12):
            records.append(("log", _log("a-1", m, "ERROR", "a.Repo#9")))
    insights, _ = run(records)
    found = {
        (a["window_start_ms"], a["detail"])
        for i in insights
        for a in json.loads(i["labels"]["anomalies"])
        if a["signal"] == "log:new_template"
    }
    start = int(T0.replace(second=0).timestamp() * 1000)
    assert found == {(start + 60_000, "ERROR a.Repo#9"), (start + 12 * 60_000, "ERROR a.Repo#9")}

    # after a gap in the log stream (no line in minutes 3-9) the first window (10) is the baseline:
    # a template already in it goes on (not new at 11); one absent from it and quiet for longer than
    # an incident comes back new (minute 11), as a fault repeated on the same pod does
    def gap(error_minutes: tuple[int, ...]) -> set[int]:
        rs = [("log", _log("a-1", m, "INFO", "a.Main#1")) for m in (0, 1, 2, 10, 11, 12)]
        rs += [("log", _log("a-1", m, "ERROR", "a.Repo#9")) for m in error_minutes]
        insights, _ = run(sorted(rs, key=lambda kr: kr[1]["event_time"]))
        return {a["window_start_ms"] for i in insights for a in json.loads(i["labels"]["anomalies"])
                if a["signal"] == "log:new_template"}  # fmt: skip

    assert gap((1, 10, 11)) == {start + 60_000}
    assert gap((1, 11)) == {start + 60_000, start + 11 * 60_000}


def test_a_latency_percentile_of_too_few_requests_is_not_scored() -> None:
    # a pod's P99 jumps 40x in minute 30; at 0.5 requests/s (30 in the minute) the P99 is the one slowest
    # request and is not scored; at 2 requests/s (120, more than one above the 99th percentile) it is
    def records(load: float) -> list[tuple[str, dict]]:
        out = []
        for m in range(40):
            p99 = 1.0 if m == 30 else 0.025
            out.append(("metric", {"pod": "a-1", "service": "a", "event_time": T0 + timedelta(minutes=m),
                                   "metrics": {"PodServerLatencyP99(s)": p99, "PodWorkload(Ops)": load}}))  # fmt: skip
        return out

    def latency_anomalies(load: float) -> int:
        _, engine = run(records(load))
        return engine.anomaly_count

    assert latency_anomalies(0.5) == 0
    assert latency_anomalies(2.0) == 1
    # without a workload column the percentile is scored as before
    plain = [(k, {**r, "metrics": {"PodServerLatencyP99(s)": r["metrics"]["PodServerLatencyP99(s)"]}})
             for k, r in records(0.5)]  # fmt: skip
    assert run(plain)[1].anomaly_count == 1


def test_span_latency_is_scored_on_self_time_so_the_caller_does_not_inherit_it() -> None:
    # a-1 calls b-1 five times a minute; in minutes 30-32 b-1's spans take 2 s instead of 80 ms, and a-1's
    # spans (which wait for b-1) 2.02 s: only b-1 spends the time
    records = []
    for m in range(40):
        for k in range(5):
            t = T0 + timedelta(minutes=m, seconds=k * 10)
            slow = 30 <= m < 33
            trace = f"t{m}-{k}"
            records.append(("span", {"trace_id": trace, "span_id": "a", "parent_id": None, "pod": "a-1",
                                     "service": "a", "event_time": t, "duration_us": 2_020_000 if slow else 100_000 + k}))  # fmt: skip
            records.append(("span", {"trace_id": trace, "span_id": "b", "parent_id": "a", "pod": "b-1",
                                     "service": "b", "event_time": t, "duration_us": 2_000_000 if slow else 80_000 + k}))  # fmt: skip
    insights, engine = run(records)
    anomalies = {(a["pod"], a["signal"]) for i in insights for a in json.loads(i["labels"]["anomalies"])}
    assert anomalies == {("b-1", "trace:p90_self_ms")}
    assert engine.call_graph == {"a-1": {"b-1": 200}}
    closed = next(i for i in insights if i["kind"] == "incident.closed")
    assert closed["labels"]["top1_pod"] == "b-1"


def test_late_events_are_counted_not_used() -> None:
    engine = IncidentEngine(EngineConfig(allowed_lateness_ms=0))
    engine.feed("metric", _metric("a-1", 10, 1.0))
    engine.feed("metric", _metric("a-1", 12, 1.0))  # watermark passes minute 11
    assert engine.feed("metric", _metric("b-1", 10, 1.0)) == []
    assert engine.late == {"metric": 1}


def test_same_insights_in_any_interleaving_within_lateness() -> None:
    records = _scenario()
    expected, _ = run(records)
    for seed in (1, 2, 3):
        rng = random.Random(seed)
        # each record may arrive up to 10 s (< the 15 s allowed lateness) after its event time
        jittered = sorted(
            records,
            key=lambda kr: (kr[1]["event_time"] + timedelta(seconds=rng.uniform(0, 10)), rng.random()),
        )
        got, engine = run(jittered)
        assert got == expected
        assert engine.late == {}


def test_slice_insights_do_not_depend_on_arrival_order() -> None:
    records = [(KIND[t], e.data) for t, e in iter_day(SLICE)]
    expected, _engine = run(records)
    assert any(i["kind"] == "incident.opened" for i in expected)
    first = next(i for i in expected if i["kind"] == "incident.closed")
    assert first["labels"]["top1_pod"] == "ts-contacts-service-866bd68c97-xcqfx"  # the 08:43:04 fault
    rng = random.Random(42)
    shuffled = sorted(records, key=lambda kr: kr[1]["event_time"] + timedelta(seconds=rng.uniform(0, 14)))
    again, engine2 = run(shuffled)
    assert again == expected and engine2.late == {}


def test_watermark_waits_for_the_slowest_active_source() -> None:
    engine = IncidentEngine(
        EngineConfig(allowed_lateness_ms=0, idle_source_ms=600_000), sources=["metrics/0", "metrics/1"]
    )
    for m in range(0, 8):
        engine.feed("metric", _metric("a-1", m, 1.0), source="metrics/0")
    engine.feed("metric", _metric("b-1", 1, 1.0), source="metrics/1")
    # metrics/1 is 6 minutes behind but not idle: its minute-2 record is still on time
    engine.feed("metric", _metric("b-1", 2, 1.0), source="metrics/1")
    assert engine.late == {}
    for m in range(8, 20):
        engine.feed("metric", _metric("a-1", m, 1.0), source="metrics/0")
    # metrics/1 is 17 minutes behind but still has records to deliver (a backlog): nothing is late
    engine.feed("metric", _metric("b-1", 3, 1.0), source="metrics/1", drained=True)
    assert engine.late == {}
    # drained and more than 10 minutes behind: idle, the watermark moves on without it
    engine.feed("metric", _metric("a-1", 20, 1.0), source="metrics/0")
    engine.feed("metric", _metric("b-1", 4, 1.0), source="metrics/1")
    assert engine.late == {"metric": 1}


def test_a_declared_source_whose_backlog_starts_earlier_makes_nothing_late() -> None:
    """The first record delivered may be minutes younger than another declared input's first record (its
    backlog starts earlier, or its partition is read later): the watermark waits for every declared input
    to speak. (It once took the first record's time as every declared input's start, so records of the
    minute before were late when the first record came more than the allowed lateness after them.)"""
    engine = IncidentEngine(EngineConfig(), sources=["logs/0", "metrics/0"])
    for m in range(3, 12):
        engine.feed("log", _log("a-1", m, "INFO", "a.Main#1"), source="logs/0")
    assert engine.watermark_ms is None
    for m in range(0, 12):
        engine.feed("metric", _metric("b-1", m, 1.0), source="metrics/0")
    assert engine.late == {} and engine.watermark_ms is not None


def test_a_source_found_drained_later_turns_idle_and_late_records_are_reported_by_source() -> None:
    """A partition's last record read while the consumer did not know its end (``drained=False``) keeps
    it holding the watermark; the worker's ``drained`` marker (:meth:`IncidentEngine.mark_drained`) lets
    it turn idle; a record after that is late, counted per source with the first one's times."""
    engine = IncidentEngine(
        EngineConfig(allowed_lateness_ms=0, idle_source_ms=600_000), sources=["metrics/0", "metrics/1"]
    )
    assert engine.mark_drained("metrics/9") == []  # never seen: ignored
    engine.feed("metric", _metric("b-1", 1, 1.0), source="metrics/1")  # its end unknown: not drained
    for m in range(0, 20):
        engine.feed("metric", _metric("a-1", m, 1.0), source="metrics/0")
    before = engine.watermark_ms
    assert before is not None and before < _metric("b-1", 2, 1.0)["event_time"].timestamp() * 1000
    engine.mark_drained("metrics/1")
    assert engine.watermark_ms is not None and engine.watermark_ms > before
    assert engine.mark_drained("metrics/1") == [] and engine.late == {}
    engine.feed("metric", _metric("b-1", 2, 1.0), source="metrics/1")
    assert engine.late == {"metric": 1} and engine.late_sources == {"metrics/1": 1}
    first = engine.first_late
    assert first is not None and first["source"] == "metrics/1" and first["kind"] == "metric"
    assert first["event_time_ms"] < first["closed_below_ms"]


def test_a_source_whose_last_record_is_late_or_a_duplicate_still_turns_idle() -> None:
    """A partition's last record may be one the engine does not use: a redelivery of an older event, late
    or a duplicate in its window. Its ``drained`` still counts: the source turns idle once it falls behind,
    and the watermark moves on. (It was dropped with the record, so the source held the watermark for good:
    the chaos harness's replay of a log with 3 % redeliveries found no incident at all.) A late or
    duplicate record that is not its partition's last un-drains the source, as any record does."""
    for kind in ("late", "duplicate"):
        engine = IncidentEngine(
            EngineConfig(allowed_lateness_ms=0, idle_source_ms=600_000), sources=["metrics/0", "metrics/1"]
        )
        for m in range(0, 5):
            engine.feed("metric", {**_metric("b-1", m, 1.0), "event_id": f"b{m}"}, source="metrics/1")
        for m in range(0, 4):
            engine.feed("metric", {**_metric("a-1", m, 1.0), "event_id": f"a{m}"}, source="metrics/0")
        # metrics/1 ends with a redelivery: of a minute whose window is closed (late) or still open (duplicate)
        again = 0 if kind == "late" else 4
        engine.feed("metric", {**_metric("b-1", again, 1.0), "event_id": f"b{again}"}, source="metrics/1",
                    drained=True)  # fmt: skip
        assert (engine.late.total(), engine.duplicates.total()) == ((1, 0) if kind == "late" else (0, 1))
        for m in range(4, 30):
            engine.feed("metric", {**_metric("a-1", m, 1.0), "event_id": f"a{m}"}, source="metrics/0")
        # metrics/1 is drained and more than 10 minutes behind: idle; the watermark follows metrics/0
        assert engine.watermark_ms == int(_metric("a-1", 29, 1.0)["event_time"].timestamp() * 1000), kind
        # a record after it, not its partition's last: metrics/1 holds the watermark again
        engine.feed("metric", {**_metric("b-1", 2, 1.0), "event_id": "b2"}, source="metrics/1")
        assert "metrics/1" not in engine._drained


def _event_ms(kr: tuple[str, dict]) -> float:
    t = kr[1]["event_time"]
    return t.timestamp() * 1000 if isinstance(t, datetime) else t


def _changes() -> list[tuple[str, dict]]:
    from processors.incidents.changes import change_from_config, change_from_external

    def config(minute: float, key: str, reason: str, cid: str) -> tuple[str, dict]:
        data = {"key": key, "version": 3, "change": "CHANGED", "author": "alice", "reason": reason,
                "changed_at": T0 + timedelta(minutes=minute)}  # fmt: skip
        return "change", change_from_config(data, cid)

    commit = change_from_external(
        {"platform": "git", "kind": "git.commit", "entity": "git:acme/shop@abc123", "actor": "bob",
         "occurred_at": T0 + timedelta(minutes=29, seconds=30), "title": "B-1: hotfix the pool",
         "body_excerpt": None, "refs": [], "source_id": "abc123"}, "commit-1")  # fmt: skip
    comment = change_from_external(
        {"platform": "github", "kind": "github.issue_comment.created", "entity": "github:acme/shop#4",
         "actor": "bob", "occurred_at": T0 + timedelta(minutes=29), "title": "b is slow", "refs": [],
         "source_id": "c1"}, "comment-1")  # fmt: skip
    assert comment is None  # a comment changes nothing
    assert commit is not None
    return [
        config(25, "services.b.pool_size", "smaller pool", "cfg-b"),  # before, on b: a suspect
        ("change", commit),  # 30 s before the first anomaly, names pod b-1: the first suspect
        config(12, "services.c.timeout_ms", "shorter", "cfg-c"),  # c has no anomaly: not a suspect
        config(34, "services.b.pool_size", "revert", "cfg-b-after"),  # after the first anomaly's window
        config(20, "routing.config", "a/b split", "cfg-routing"),  # touches no service
    ]


def test_a_change_before_the_incident_on_its_service_is_a_suspect() -> None:
    records = sorted(_scenario() + _changes(), key=_event_ms)
    insights, engine = run(records)
    for i in insights:
        suspects = json.loads(i["labels"]["suspect_changes"])
        assert [s["change_id"] for s in suspects] == ["commit-1", "cfg-b"]
        assert suspects[0] == {
            "change_id": "commit-1", "origin": "git", "change_kind": "git.commit",
            "summary": "git:acme/shop@abc123: B-1: hotfix the pool", "changed_at": "2023-01-29T08:29:39+00:00",
            "lead_seconds": 21.0, "services": ["b"], "candidate_rank": 1,
        }  # fmt: skip
        # the first anomaly's window starts at 08:30:00 (windows are aligned to the minute; T0 is 08:00:09)
        assert suspects[1]["lead_seconds"] == 291.0 and suspects[1]["summary"].startswith(
            "services.b.pool_size v3"
        )
    assert engine.late == {} and engine.stats()["changes_kept"] == 5
    # without the changes: the same incidents, no suspects
    plain, _ = run(_scenario())
    assert [i["insight_id"] for i in plain] == [i["insight_id"] for i in insights]
    assert all(i["labels"]["suspect_changes"] == "[]" for i in plain)


def test_suspects_do_not_depend_on_arrival_order() -> None:
    records = _scenario() + _changes()
    expected, _ = run(sorted(records, key=_event_ms))
    for seed in (1, 2):
        rng = random.Random(seed)
        jittered = sorted(records, key=lambda kr: _event_ms(kr) + rng.uniform(0, 10_000))
        got, engine = run(jittered)
        assert got == expected and engine.late == {}


def test_a_drained_change_source_holds_nothing_back_and_a_late_change_is_counted() -> None:
    engine = IncidentEngine(EngineConfig(allowed_lateness_ms=0), sources=["metrics/0"])
    (_, change), *_ = _changes()
    # a change source read to its end, far behind (or ahead of) the telemetry: the watermark goes on
    engine.feed("change", {**change, "event_time": T0 + timedelta(days=1)}, source="config/0", drained=True)
    out = []
    for m in range(40):
        out += engine.feed("metric", _metric("a-1", m, 2.0), source="metrics/0")
    assert engine.watermark_ms == int((T0 + timedelta(minutes=39)).timestamp() * 1000)
    assert engine.late == {}
    # a change for a window already processed is late: counted, not used
    engine.feed("change", change, source="config/0", drained=True)
    assert engine.late == {"change": 1}


def test_change_targets_are_the_names_it_mentions() -> None:
    from processors.incidents.changes import change_from_external, targets_of

    assert targets_of("services.ts-order-service.pool_size", "Raise the pool: ts-order-service-5dc8d4f9fd-46997") == [
        "services", "ts-order-service", "pool_size", "raise", "the", "pool", "ts-order-service-5dc8d4f9fd-46997",
    ]  # fmt: skip
    deploy = change_from_external(
        {"platform": "github", "kind": "github.deployment.created", "entity": "github:acme/ts-order-service",
         "occurred_at": 1_700_000_000_000, "title": None, "refs": [], "source_id": "d1"}, "deploy-1")  # fmt: skip
    assert deploy is not None and "ts-order-service" in deploy["targets"]
    assert deploy["summary"] == "github:acme/ts-order-service" and deploy["event_time"] == 1_700_000_000_000


def test_a_record_seen_twice_in_its_window_is_counted_not_used() -> None:
    records = [(k, {**r, "event_id": f"e{i}"}) for i, (k, r) in enumerate(_scenario())]
    expected, _ = run(records)
    again = [x for i, kr in enumerate(records) for x in ([kr, kr] if i % 7 == 0 else [kr])]
    got, engine = run(again)
    assert got == expected
    assert engine.duplicates == {"metric": len(again) - len(records)} and engine.late == {}
    assert engine.stats()["duplicate_events"] == {"metric": len(again) - len(records)}


def test_errors_linked_by_a_trace_move_to_the_callee_that_raised_them() -> None:
    # the caller's new ERROR template is explained by its callee's error in the same traces: the
    # caller keeps VICTIM_FACTOR of that evidence, the callee (old template, no anomaly) gains the rest
    anomalies = [_a("preserve-1", "log:new_template", 12.0), _a("orders-1", "log:new_template", 10.0)]
    ranked = rank(
        anomalies, {}, error_graph={"preserve-1": {"contacts-1": 3}}, services={"contacts-1": "contacts"}
    )
    assert [c.pod for c in ranked][:2] == ["orders-1", "contacts-1"]
    moved = (1 - VICTIM_FACTOR) * 3.0 * math.log1p(12.0)
    by_pod = {c.pod: c for c in ranked}
    assert by_pod["contacts-1"].service == "contacts"
    assert math.isclose(by_pod["contacts-1"].score, moved) and math.isclose(by_pod["preserve-1"].score, moved)
    assert any("propagate" in e for e in by_pod["contacts-1"].evidence)
    # no anomalous caller, no blame: an edge alone makes no candidate
    assert [c.pod for c in rank(anomalies[1:], {}, error_graph={"preserve-1": {"contacts-1": 3}})] == [
        "orders-1"
    ]


def test_engine_links_error_logs_through_the_spans_of_their_trace() -> None:
    # every minute a-1 calls b-1 (trace t<m>); from minute 12 both log an ERROR in those spans: the
    # incident's top candidate is b-1, whose error the trace shows travelling up to a-1
    recs: list[tuple[str, dict]] = []
    for m in range(16):
        t = T0 + timedelta(minutes=m)
        recs.append(("span", {"trace_id": f"t{m}", "span_id": "s1", "parent_id": None, "pod": "a-1",
                              "service": "a", "event_time": t, "duration_us": 2000}))  # fmt: skip
        recs.append(("span", {"trace_id": f"t{m}", "span_id": "s2", "parent_id": "s1", "pod": "b-1",
                              "service": "b", "event_time": t, "duration_us": 1000}))  # fmt: skip
        recs.append(("log", _log("a-1", m, "INFO", "a.Main#1")))
        if m >= 12:
            for pod, span, logger in (("a-1", "s1", "a.Web#175"), ("b-1", "s2", "b.Repo#9")):
                recs.append(("log", {**_log(pod, m, "ERROR", logger), "trace_id": f"t{m}", "span_id": span}))
    insights, _ = run(recs)
    closed = [i for i in insights if i["kind"] == "incident.closed"]
    assert closed and closed[-1]["labels"]["top1_pod"] == "b-1"
    cands = json.loads(closed[-1]["labels"]["candidates"])
    assert any("propagate" in e for e in cands[0]["evidence"])
    # the same records in another order give the same insights
    again, _ = run(sorted(recs, key=lambda kr: (kr[1]["event_time"], kr[0] == "span")))
    assert again == insights


def test_a_new_warn_template_weighs_half_an_error_template() -> None:
    warn = Anomaly("a-1", "a", "log:new_template", 0, 12.0, 6.0, 0.0, "WARN a.Svc#72")
    error = Anomaly("b-1", "b", "log:new_template", 0, 12.0, 6.0, 0.0, "ERROR b.Svc#37")
    by_pod = {c.pod: c.score for c in rank([warn, error], {})}
    assert math.isclose(by_pod["a-1"], WARN_FACTOR * by_pod["b-1"])
