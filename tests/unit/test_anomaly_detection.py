"""Streaming anomaly detection: no look-ahead, determinism, serialisable state, alerts and bad input."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from processors.incidents.anomaly import DETECTORS, DetectorConfig, SeriesState, make_detector

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
