"""Streaming anomaly detection: no look-ahead, determinism, serialisable state, alerts and bad input."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from processors.incidents.anomaly import (
    DETECTORS,
    AnomalyProcessor,
    DetectorConfig,
    SeriesState,
    make_detector,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def series(n: int = 600, spike_at: int | None = 500, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    values = [10 + math.sin(i / 20) + rng.gauss(0, 0.1) for i in range(n)]
    if spike_at is not None:
        values[spike_at] += 25.0
    return values


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_no_look_ahead(name: str) -> None:
    """The scores of the first 400 samples do not change when different samples follow them."""
    a, b = series(spike_at=None), series(spike_at=None, seed=8)
    b[:400] = a[:400]
    da, db = make_detector(name), make_detector(name)
    sa = [da.score_learn(v) for v in a]
    sb = [db.score_learn(v) for v in b]
    assert sa[:400] == sb[:400]


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_state_round_trip_through_json_continues_identically(name: str) -> None:
    """State saved after 300 samples (as a table would hold it) and restored scores the rest identically."""
    values = series()
    st = SeriesState("s", DetectorConfig(detector=name))
    ref = SeriesState("s", DetectorConfig(detector=name))
    for i, v in enumerate(values[:300]):
        st.observe(T0 + timedelta(minutes=i), v)
        ref.observe(T0 + timedelta(minutes=i), v)
    restored = SeriesState.from_dict(json.loads(json.dumps(st.to_dict())))
    for i, v in enumerate(values[300:], start=300):
        t = T0 + timedelta(minutes=i)
        assert restored.observe(t, v) == ref.observe(t, v)


def test_likelihood_state_written_with_json_lists_still_restores() -> None:
    """A state written before the histories were packed (``hist``: JSON lists, as a changelog may still
    hold it) restores to the same detector as the packed one (``hist_b64``: the exact doubles)."""
    values = series()
    st = SeriesState("s", DetectorConfig(detector="likelihood"))
    for i, v in enumerate(values[:1200]):
        st.observe(T0 + timedelta(minutes=i), v)
    packed = json.loads(json.dumps(st.to_dict()))
    assert "hist" not in packed["state"] and set(packed["state"]["hist_b64"]) == {"level", "change"}
    legacy = json.loads(json.dumps(packed))
    det = legacy["state"]
    det["hist"] = {k: list(v) for k, v in st.detector.hist.items()}  # type: ignore[attr-defined]
    del det["hist_b64"]
    assert SeriesState.from_dict(legacy).to_dict() == SeriesState.from_dict(packed).to_dict() == st.to_dict()


def test_default_detector_alerts_on_the_spike_once_and_is_deterministic() -> None:
    """A 25-sigma spike raises an anomaly with score, series, window and version; a replay gives the same ids."""
    runs = []
    for _ in range(2):
        st = SeriesState("nab:x/y")
        alerts = [a for i, v in enumerate(series()) if (a := st.observe(T0 + timedelta(minutes=i), v)[1])]
        runs.append([a.insight_id for a in alerts])
        assert any(a.sample_index == 501 for a in alerts)  # confirmed by the sample after the spike
        hit = next(a for a in alerts if a.sample_index == 501)
        insight = hit.to_insight()
        assert insight.data["labels"]["detector_version"] == "confirmed-likelihood/1"
        assert insight.data["metrics"]["score"] >= 0.999
        assert insight.data["metrics"]["window_seconds"] == 3600.0
        assert insight.key == "series:nab:x/y"
    assert runs[0] == runs[1]


def test_duplicates_and_out_of_order_samples_change_nothing() -> None:
    """A redelivered or older sample is counted, not learnt."""
    st = SeriesState("s")
    st.observe(T0, 1.0)
    st.observe(T0 + timedelta(minutes=1), 2.0)
    before = st.to_dict()
    assert st.observe(T0, 5.0) == (0.0, None)
    assert st.out_of_order == 1
    after = st.to_dict()
    assert after["state"] == before["state"] and after["count"] == before["count"]


def test_bad_values_are_refused() -> None:
    """NaN, infinities and naive times raise ValueError; unknown detectors are refused."""
    st = SeriesState("s")
    with pytest.raises(ValueError):
        st.observe(T0, float("nan"))
    with pytest.raises(ValueError):
        st.observe(datetime(2024, 1, 1), 1.0)
    with pytest.raises(ValueError):
        DetectorConfig(detector="nope")


def test_processor_dead_letters_bad_values_and_goes_on() -> None:
    """A non-number is refused with UnprocessableEventError and counted; the series' state is untouched,
    and the next good sample is processed; a restored state continues identically."""
    from processors.errors import UnprocessableEventError
    from processors.incidents.anomaly import AnomalyProcessor

    proc, twin = AnomalyProcessor(), AnomalyProcessor()
    values = series()
    for i, v in enumerate(values[:300]):
        for p in (proc, twin):
            p.process({"series": "s", "observed_at": T0 + timedelta(minutes=i), "value": v}, f"e{i}")
    before = proc.state_of("s")
    for bad in ("12", float("nan"), None, True):
        with pytest.raises(UnprocessableEventError):
            proc.process({"series": "s", "observed_at": T0 + timedelta(minutes=300), "value": bad})
    with pytest.raises(UnprocessableEventError):
        proc.process({"series": "s", "observed_at": datetime(2024, 1, 1), "value": 1.0})
    assert proc.rejected == {"not_a_number": 4, "bad_record": 1}
    assert proc.state_of("s") == before
    restored = AnomalyProcessor()
    restored.restore("s", json.loads(json.dumps(before)))
    out_a, out_b = [], []
    for i, v in enumerate(values[300:], start=300):
        d = {"series": "s", "observed_at": T0 + timedelta(minutes=i), "value": v}
        out_a += restored.process(d, f"e{i}")
        out_b += twin.process(d, f"e{i}")
    assert [e.attributes.id for e in out_a] == [e.attributes.id for e in out_b] and out_a


def test_processor_reads_pod_metric_samples_one_series_per_metric() -> None:
    """A MetricSample (pod, event_time, metrics map) feeds one series per metric; null metrics are skipped."""
    from processors.incidents.anomaly import AnomalyProcessor

    proc = AnomalyProcessor()
    for i, v in enumerate(series()):
        proc.process({"pod": "p1", "service": "s", "event_time": T0 + timedelta(minutes=i),
                      "metrics": {"CpuUsageRate(%)": v, "PodWorkload(Ops)": None}})  # fmt: skip
    assert sorted(proc.states) == ["pod:p1/CpuUsageRate(%)"]
    assert proc.states["pod:p1/CpuUsageRate(%)"].count == 600


def test_ema_likelihood_state_stays_small_and_thresholds_follow_the_detector() -> None:
    """ema-likelihood's JSON state does not grow with the series (constant size, under 1 KB after 5,000
    samples); an unset threshold is the detector's own (0.999 for confirmed-likelihood, 0.995 for the ema
    and seasonal likelihoods, 0.99 for the others), and so is an unset suppression (200, else 150)."""
    det = make_detector("ema-likelihood")
    sizes = []
    for i, v in enumerate(series(5000, spike_at=4000)):
        det.score_learn(v)
        if i in (100, 4999):
            sizes.append(len(json.dumps(det.to_dict())))
    assert sizes[1] < 1024 and sizes[1] - sizes[0] < 64
    assert DetectorConfig().threshold == 0.999 and DetectorConfig().detector == "confirmed-likelihood"
    assert DetectorConfig().suppress == 200 and DetectorConfig(detector="seasonal-likelihood").suppress == 150
    assert DetectorConfig(detector="ema-likelihood").threshold == 0.995
    assert DetectorConfig(detector="likelihood").threshold == 0.99
    assert DetectorConfig(detector="likelihood", threshold=0.5).threshold == 0.5
    assert SeriesState.from_dict(SeriesState("s").to_dict()).config.threshold == 0.999


def weekly(weeks: int = 4, per_day: int = 24, seed: int = 3) -> list[float]:
    """Hourly samples with a weekday/weekend pattern (busy weekday afternoons, quiet weekends)."""
    rng = random.Random(seed)
    out = []
    for i in range(weeks * 7 * per_day):
        day, hour = divmod(i, per_day)
        busy = day % 7 < 5 and 9 <= hour < 18
        out.append((50.0 if busy else 10.0) + rng.gauss(0, 1.0))
    return out


def test_seasonal_likelihood_flags_a_value_wrong_for_its_time_of_week() -> None:
    """A weekday rush level on a weekend afternoon (normal as a value, wrong for the time of week) raises
    a seasonal-likelihood alert; ema-likelihood, which has no weekly model, sees nothing odd in it."""
    values = weekly()
    at = 3 * 7 * 24 + 5 * 24 + 12  # week 4, Saturday 12:00
    for h in range(at, at + 6):
        values[h] = 50.0 + (h - at) * 0.1
    alerts = {}
    for name in ("seasonal-likelihood", "ema-likelihood"):
        st = SeriesState("s", DetectorConfig(detector=name))
        alerts[name] = [i for i, v in enumerate(values) if st.observe(T0 + timedelta(hours=i), v)[1]]
    assert any(at <= i < at + 6 for i in alerts["seasonal-likelihood"]), alerts
    assert not any(at <= i < at + 6 for i in alerts["ema-likelihood"]), alerts
    st = SeriesState("s")
    for i, v in enumerate(values[:400]):
        st.observe(T0 + timedelta(hours=i), v)
    state = st.to_dict()["state"]
    assert state["period"] == 168 and len(state["past"]) == 168


def test_seasonal_likelihood_without_times_or_with_a_long_week_is_ema_likelihood() -> None:
    """Without event times, or when a week spans more than max_period samples (1-minute samples), it scores
    exactly as ema-likelihood and keeps no past values."""
    values = series(3000, spike_at=2500)
    ema = make_detector("ema-likelihood")
    ref = [ema.score_learn(v) for v in values]
    no_time = make_detector("seasonal-likelihood")
    assert [no_time.score_learn(v) for v in values] == ref
    minutely = make_detector("seasonal-likelihood")
    assert [minutely.score_learn(v, 60.0 * i) for i, v in enumerate(values)] == ref
    for det in (no_time, minutely):
        state = det.to_dict()
        assert state["period"] == 0 and state["past"] == []


@pytest.mark.parametrize("cut", [5, 400])
def test_seasonal_state_round_trip_continues_identically(cut: int) -> None:
    """Saved while the period is still unknown (5 samples) or with a full week kept (400), restored from
    JSON, it scores the rest of a weekly series exactly as the uninterrupted state."""
    values = weekly()
    st, ref = SeriesState("s"), SeriesState("s")
    for i, v in enumerate(values[:cut]):
        st.observe(T0 + timedelta(hours=i), v)
        ref.observe(T0 + timedelta(hours=i), v)
    restored = SeriesState.from_dict(json.loads(json.dumps(st.to_dict())))
    for i, v in enumerate(values[cut:], start=cut):
        t = T0 + timedelta(hours=i)
        assert restored.observe(t, v) == ref.observe(t, v)
    assert restored.to_dict() == ref.to_dict()


def test_confirmed_likelihood_is_the_smallest_of_the_last_two_seasonal_scores() -> None:
    """confirmed-likelihood scores min(this, previous) seasonal-likelihood score (with the same long
    horizon, 8,640): the same scores through a two-sample minimum; confirm=1 is seasonal-likelihood itself;
    confirm=3 the minimum of three; a bad confirm is refused."""
    values = weekly(weeks=8)
    values[1000] += 30.0  # one spike, so that scores near 1 occur
    times = [3600.0 * i for i in range(len(values))]
    seasonal = make_detector("seasonal-likelihood", long=8640)
    ref = [seasonal.score_learn(v, t) for v, t in zip(values, times, strict=True)]
    confirmed = make_detector("confirmed-likelihood")
    got = [confirmed.score_learn(v, t) for v, t in zip(values, times, strict=True)]
    assert got == [min(ref[max(0, i - 1) : i + 1]) for i in range(len(ref))]
    one = make_detector("confirmed-likelihood", confirm=1)
    assert [one.score_learn(v, t) for v, t in zip(values, times, strict=True)] == ref
    three = make_detector("confirmed-likelihood", confirm=3)
    got = [three.score_learn(v, t) for v, t in zip(values, times, strict=True)]
    assert got == [min(ref[max(0, i - 2) : i + 1]) for i in range(len(ref))]
    assert got != ref and max(ref) > 0.99  # the minimum does change scores, near the threshold too
    with pytest.raises(ValueError, match="confirm"):
        make_detector("confirmed-likelihood", confirm=0)


@pytest.mark.parametrize("cut", [1, 5, 400])
def test_confirmed_state_round_trip_continues_identically(cut: int) -> None:
    """Saved after ``cut`` samples and restored from JSON, it scores the rest exactly as the uninterrupted
    state (the previous score is part of the state)."""
    values = weekly()
    times = [3600.0 * i for i in range(len(values))]
    whole = make_detector("confirmed-likelihood")
    ref = [whole.score_learn(v, t) for v, t in zip(values, times, strict=True)]
    det = make_detector("confirmed-likelihood")
    for v, t in zip(values[:cut], times[:cut], strict=True):
        det.score_learn(v, t)
    restored = DETECTORS["confirmed-likelihood"].from_dict(json.loads(json.dumps(det.to_dict())))
    rest = [restored.score_learn(v, t) for v, t in zip(values[cut:], times[cut:], strict=True)]
    assert rest == ref[cut:]
    assert restored.to_dict() == whole.to_dict()


def test_gate_scores_is_the_series_state_gate() -> None:
    """gate_scores on a detector's scores flags exactly the samples SeriesState alerts on."""
    from processors.incidents.anomaly_eval import gate_scores

    values = series(3000, spike_at=2500)
    for i in range(1000, 1400, 37):
        values[i] += 6.0
    det = make_detector("confirmed-likelihood")
    scores = [det.score_learn(v, 60.0 * i) for i, v in enumerate(values)]
    for threshold, suppress in ((0.99, 20), (0.999, 200)):
        st = SeriesState("s", DetectorConfig(threshold=threshold, suppress=suppress))
        alerts = [i for i, v in enumerate(values) if st.observe(T0 + timedelta(minutes=i), v)[1]]
        assert alerts and alerts == [i for i, f in enumerate(gate_scores(scores, threshold, suppress)) if f]


# --- AnomalyProcessor.process_many: the same states and insights as process, one record at a time -------

NEZHA_DAY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "incidents" / "nezha"
NAB_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "anomaly" / "nab"


def _pod_records(pods: int = 6, minutes: int = 400, seed: int = 3) -> list[tuple[dict[str, Any], str]]:
    """Nezha-shaped MetricSample data: 1-minute samples of a few pods, metrics sometimes null, spikes and
    level shifts, a redelivered and an older record now and then, constant and zero metrics."""
    rng = random.Random(seed)
    records: list[tuple[dict[str, Any], str]] = []
    for i in range(minutes):
        for p in range(pods):
            at = T0 + timedelta(minutes=i, seconds=p)
            metrics: dict[str, float | None] = {
                "CpuUsageRate(%)": 10
                + math.sin(i / 15 + p)
                + rng.gauss(0, 0.2)
                + (30.0 if i == 250 + p else 0.0),
                "MemoryUsage(Mi)": 400.0 + (50.0 if i > 300 and p % 2 else 0.0) + rng.random(),
                "SyscallRead": 0.0,
                "PodWorkload(Ops)": float(rng.randint(0, 3)),
                "PodServerLatencyP90(s)": None if rng.random() < 0.3 else rng.expovariate(100),
            }
            records.append(
                ({"pod": f"pod-{p}", "service": "s", "event_time": at, "metrics": metrics}, f"e{i}-{p}")
            )
        if i % 97 == 5:
            records.append(records[-3])  # a redelivery
        if i % 131 == 7:
            old, eid = records[-20]
            records.append(
                ({**old, "metrics": {k: 1.0 for k in old["metrics"]}}, eid + "-old")
            )  # older, new values
    return records


def _many_equals_one_at_a_time(records: list[tuple[dict[str, Any], str]], sizes: Callable[[], int],
                               restore_at: int | None = None) -> int:  # fmt: skip
    """Feed ``records`` to one processor with ``process`` and to another with ``process_many`` in batches of
    ``sizes()``; assert the same insights (ids and data, in order), out-of-order flags and states. With
    ``restore_at``, the batched processor's states are replaced by their JSON round trip there (as after a
    restart from the table). Returns the number of insights."""
    one, many = AnomalyProcessor(), AnomalyProcessor()
    expected, got = [], []
    for data, eid in records:
        before = sum(s.out_of_order for s in one.states.values())
        insights = one.process(data, eid)
        expected.append(
            (
                [(e.attributes.id, e.data) for e in insights],
                sum(s.out_of_order for s in one.states.values()) > before,
            )
        )
    i = 0
    while i < len(records):
        if restore_at is not None and i >= restore_at:
            for name in list(many.states):
                many.restore(name, json.loads(json.dumps(many.state_of(name))))
            restore_at = None
        chunk = records[i : i + sizes()]
        i += len(chunk)
        results = many.process_many([(*many.prepare(d, eid), eid) for d, eid in chunk])
        got += [([(e.attributes.id, e.data) for e in insights], ooo) for insights, ooo in results]
    assert got == expected
    assert json.dumps({k: v.to_dict() for k, v in many.states.items()}, sort_keys=True) == json.dumps(
        {k: v.to_dict() for k, v in one.states.items()}, sort_keys=True
    )
    return sum(len(x) for x, _ in expected)


@pytest.mark.parametrize("size", [1, 7, 1000, 0])
def test_process_many_is_process_one_at_a_time_on_pod_samples(size: int) -> None:
    """Scored together (the vectorised steady state of the default detector) or one at a time, the states
    are equal bit for bit and the insights the same, in the same order; also across a restore."""
    rng = random.Random(size)
    records = _pod_records()
    n = _many_equals_one_at_a_time(records, lambda: size or rng.randint(1, 300))
    assert n > 0
    _many_equals_one_at_a_time(records, lambda: size or rng.randint(1, 300), restore_at=len(records) // 2)


@pytest.mark.parametrize("detector", ["confirmed-likelihood", "seasonal-likelihood", "likelihood"])
def test_process_many_is_process_one_at_a_time_on_five_minute_series(detector: str) -> None:
    """SeriesSample data with a weekly seasonal score (5-minute samples: stepped one sample at a time) and
    another detector's config give the same as ``process`` too."""
    rng = random.Random(5)
    records = []
    for i in range(4000):
        for s in range(3):
            v = 10 + math.sin(i / 288 * 2 * math.pi) + rng.gauss(0, 0.1) + (8.0 if i == 3000 + s else 0.0)
            records.append(
                ({"series": f"s{s}", "observed_at": T0 + timedelta(minutes=5 * i), "value": v}, f"e{i}.{s}")
            )

    def check(records: list[tuple[dict[str, Any], str]]) -> None:
        one, many = (
            AnomalyProcessor(DetectorConfig(detector=detector)),
            AnomalyProcessor(DetectorConfig(detector=detector)),
        )
        expected = [[e.attributes.id for e in one.process(d, eid)] for d, eid in records]
        got: list[list[str]] = []
        for i in range(0, len(records), 500):
            chunk = records[i : i + 500]
            got += [
                [e.attributes.id for e in x]
                for x, _ in many.process_many([(*many.prepare(d, e), e) for d, e in chunk])
            ]
        assert got == expected
        assert {k: v.to_dict() for k, v in many.states.items()} == {
            k: v.to_dict() for k, v in one.states.items()
        }

    check(records)


@pytest.mark.skipif(not NEZHA_DAY.is_dir(), reason="no Nezha day under ../shared/data/incidents/nezha")
def test_process_many_is_process_one_at_a_time_on_the_nezha_day() -> None:
    """The Nezha day's 43,193 metric samples (879 series): the same 368 insights and the same states."""
    from connectors.nezha import iter_day

    records = [(e.data, e.attributes.id) for t, e in iter_day(NEZHA_DAY) if t == "telemetry.metrics"]
    rng = random.Random(1)
    assert _many_equals_one_at_a_time(records, lambda: rng.randint(1, 1000)) == 368


@pytest.mark.skipif(not NAB_DATA.is_dir(), reason="no NAB data under ../shared/data/anomaly/nab")
def test_process_many_is_process_one_at_a_time_on_nab() -> None:
    """NAB realKnownCause (7 series, interleaved by time as one stream): the same insights and states."""
    from connectors.nab import read_nab

    samples = [(t, s.series, v) for s in read_nab(NAB_DATA, categories=["realKnownCause"])
               for t, v in zip(s.timestamps, s.values, strict=True)]  # fmt: skip
    samples.sort(key=lambda x: x[0])
    records = [
        ({"series": name, "observed_at": t, "value": v}, f"{name}@{t.isoformat()}") for t, name, v in samples
    ]
    rng = random.Random(2)
    assert _many_equals_one_at_a_time(records, lambda: rng.randint(1, 1000)) > 0


def test_batch_sum_is_the_builtin_sum() -> None:
    """The kernel's 5-value sums are the builtin ``sum`` of this interpreter, and its compensated form
    (CPython 3.12+) is CPython's Neumaier loop."""
    import processors.incidents.anomaly as anomaly

    rng = random.Random(9)
    rows = [
        [rng.choice([0.0, 1e-9, 1e6, 3.0]) * rng.random() + rng.expovariate(1) for _ in range(5)]
        for _ in range(2000)
    ]
    cols = np.array(rows)
    assert anomaly._py_sum(cols).tolist() == [sum(r) for r in rows]

    def neumaier(r: list[float]) -> float:  # CPython 3.12 builtin_sum_impl, float path
        total, comp = r[0], 0.0
        for x in r[1:]:
            t = total + x
            comp += (total - t) + x if abs(total) >= abs(x) else (x - t) + total
            total = t
        return total + comp if comp and math.isfinite(comp) else total

    saved = anomaly._NEUMAIER_SUM
    try:
        anomaly._NEUMAIER_SUM = True
        assert anomaly._py_sum(cols).tolist() == [neumaier(r) for r in rows]
    finally:
        anomaly._NEUMAIER_SUM = saved
