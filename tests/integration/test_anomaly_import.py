"""NAB and GitHub-events imports against real Tansu: what the log holds, and the detector on the log gives the
same anomalies as on the file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from connectors.chat_code import import_events
from connectors.github_events import read_github_events
from connectors.nab import import_nab, read_nab
from core.settings import Settings
from processors.incidents.anomaly import SeriesState
from streams.consumer import ConsumedEvent
from streams.replay import read_range
from streams.serde import serde_from_settings


def _nab(tmp_path: Path) -> Path:
    (tmp_path / "realX").mkdir()
    t0 = datetime(2014, 1, 1)
    rows = (
        ["timestamp,value"]
        + [
            f"{t0 + timedelta(minutes=5 * i):%Y-%m-%d %H:%M:%S},{10 + math.sin(i / 9) + (30 if i == 700 else 0)}"
            for i in range(900)
        ]
        + [f"{t0 + timedelta(minutes=5 * 900):%Y-%m-%d %H:%M:%S},not-a-number"]
    )
    (tmp_path / "realX" / "s.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "combined_windows.json").write_text(
        json.dumps({"realX/s.csv": [["2014-01-03 10:00:00", "2014-01-03 14:00:00"]]})
    )
    return tmp_path


def test_nab_import_round_trip_and_detection_on_the_log(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str], tmp_path: Path
) -> None:
    """900 samples reach the topic with deterministic ids, the bad row is reported, no label is on the log,
    and the detector over the consumed samples raises the same anomalies as over the file."""
    topic = create_topic(unique_name("metrics"), partitions=3)
    serde = serde_from_settings(settings)
    series = read_nab(_nab(tmp_path))
    report = import_nab(settings, serde, series, topic=topic)
    assert (report.events, report.rejected, report.windows) == (900, 1, 1)
    records = [r for r in read_range(settings.kafka, serde, topic) if isinstance(r, ConsumedEvent)]
    assert len(records) == 900
    assert {r.data["series"] for r in records} == {"nab:realX/s"}
    assert all("window" not in json.dumps(r.data, default=str) for r in records)
    samples = sorted((r.data["observed_at"], r.data["value"]) for r in records)
    st_log, st_file = SeriesState("nab:realX/s"), SeriesState("nab:realX/s")
    from_log = [a.insight_id for t, v in samples if (a := st_log.observe(t, v)[1])]
    from_file = [a.insight_id for t, v in zip(series[0].timestamps, series[0].values, strict=True)
                 if (a := st_file.observe(t, v)[1])]  # fmt: skip
    assert from_log == from_file and from_log


def test_github_events_import(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str], tmp_path: Path
) -> None:
    """A push reaches the topic as github.push plus its git.commit events."""
    topic = create_topic(unique_name("external"), partitions=3)
    serde = serde_from_settings(settings)
    push = {"id": "9", "type": "PushEvent", "actor": {"login": "ann"}, "repo": {"name": "o/r"},
            "created_at": "2023-04-01T10:00:00Z",
            "payload": {"ref": "refs/heads/main", "commits": [{"sha": "c" * 40, "message": "Fix (#3)"}]}}  # fmt: skip
    f = tmp_path / "events.json"
    f.write_text(json.dumps([push]))
    events, rejected = read_github_events(f)
    report = import_events(settings, serde, events, topic=topic)
    assert report.events == 2 and rejected == []
    kinds = sorted(
        r.data["kind"] for r in read_range(settings.kafka, serde, topic) if isinstance(r, ConsumedEvent)
    )
    assert kinds == ["git.commit", "github.push"]


def test_import_nab_command_creates_the_topic_and_reports(
    settings: Settings, tmp_path: Path, unique_name: Callable[[str], str]
) -> None:
    """``import nab DIR --json`` against the stack: the topic is created, 900 samples and 1 rejected row reported."""
    env = {
        **os.environ,
        "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BACKBONE_STATE_DIR": str(tmp_path / "state"),
        "BACKBONE_LOG_FORMAT": "json",
    }
    topic = unique_name("metrics")
    code = "from backbone.cli.anomalies import import_app; import_app()"
    res = subprocess.run([sys.executable, "-c", code, "nab", str(_nab(tmp_path)), "--topic", topic, "--json"],
                         env=env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["events"], out["rejected"], out["series"]) == (900, 1, 1)
    assert len(list(read_range(settings.kafka, serde_from_settings(settings), topic))) == 900


def _run_anomaly_worker(
    settings: Settings, tmp_path: Path, app_id: str, metrics: str, insights: str, dlq: str
) -> dict[str, Any]:
    """``backbone processors anomalies`` as a process until idle for 4 s; its ``--json`` counters."""
    env = {
        **os.environ,
        "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "BACKBONE_STATE_DIR": str(tmp_path / "state"),
        "BACKBONE_LOG_FORMAT": "json",
        "BACKBONE_METRICS_PORT": "0",
    }
    code = "from backbone.cli.anomalies import processors_app; processors_app()"
    args = ["anomalies", "--app-id", app_id, "--metrics-topic", metrics, "--insights-topic", insights,
            "--dlq-topic", dlq, "--stop-after-idle", "4", "--json"]  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=180,
                         check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    # the indented JSON after the log lines
    return dict(json.loads(res.stdout[res.stdout.rindex('{\n  "records_count"') :]))


def test_anomaly_worker_on_tansu_matches_the_plain_logic_and_dead_letters_bad_records(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str], tmp_path: Path
) -> None:
    """The Faust worker over 900 samples sends the same anomaly ids as the plain processor; a NaN sample
    and a record that is not Avro go to the dead-letter topic and the worker goes on."""
    from confluent_kafka import Producer

    from connectors.nab import METRIC_SCHEMA, series_events
    from processors.incidents.anomaly import AnomalyProcessor
    from streams.envelope import Event
    from streams.producer import EventProducer

    metrics = create_topic(unique_name("metrics"), partitions=2)
    insights = create_topic(unique_name("anomalies"), partitions=3)
    dlq = create_topic(unique_name("dlq"), partitions=1)
    serde = serde_from_settings(settings)
    (series,) = read_nab(_nab(tmp_path))
    events = list(series_events(series))
    bad = Event.create(METRIC_SCHEMA, series.series, {**events[0].data, "value": float("nan"), "source_id": "x"},
                       source="/test", time=events[0].data["observed_at"])  # fmt: skip
    with EventProducer(settings.kafka, serde) as producer:
        for e in events[:400]:
            producer.produce(metrics, e)
        producer.produce(metrics, bad)
        for e in events[400:]:
            producer.produce(metrics, e)
    raw = Producer(settings.kafka.librdkafka())
    raw.produce(metrics, key=b"nab:realX/s", value=b"not avro")
    raw.flush(10)
    stats = _run_anomaly_worker(settings, tmp_path, unique_name("anom"), metrics, insights, dlq)
    assert stats["records_count"] == 902 and stats["dead_letters_count"] == 2
    # the rate of a run is taken from the first record handled to the last (bench/bench_incidents.py)
    assert 0 < stats["first_record_monotonic"] < stats["last_record_monotonic"]
    got = sorted(
        r.attributes.id for r in read_range(settings.kafka, serde, insights) if isinstance(r, ConsumedEvent)
    )
    plain = AnomalyProcessor()
    want = sorted(i.attributes.id for e in events for i in plain.process(e.data, e.attributes.id))
    assert got == want and got
    assert len(list(read_range(settings.kafka, serde, dlq))) == 2


def test_anomaly_worker_resumes_from_its_checkpoint(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str], tmp_path: Path
) -> None:
    """States are written to the table at checkpoints and records acked only after them: a second run of
    the same app id reads only the records the first did not handle, resumes each series from the table,
    and the two runs together send exactly the plain processor's anomaly ids."""
    from connectors.nab import series_events
    from processors.incidents.anomaly import AnomalyProcessor
    from streams.producer import EventProducer

    metrics = create_topic(unique_name("metrics"), partitions=2)
    insights = create_topic(unique_name("anomalies"), partitions=3)
    dlq = create_topic(unique_name("dlq"), partitions=1)
    serde = serde_from_settings(settings)
    (series,) = read_nab(_nab(tmp_path))
    events = list(series_events(series))
    app_id = unique_name("anom")

    def run() -> dict[str, Any]:
        return _run_anomaly_worker(settings, tmp_path, app_id, metrics, insights, dlq)

    half = 450
    with EventProducer(settings.kafka, serde) as producer:
        for e in events[:half]:
            producer.produce(metrics, e)
    assert run()["records_count"] == half
    with EventProducer(settings.kafka, serde) as producer:
        for e in events[half:]:
            producer.produce(metrics, e)
    assert run()["records_count"] == len(events) - half  # the first run's records were acked, not read again
    got = sorted(
        r.attributes.id for r in read_range(settings.kafka, serde, insights) if isinstance(r, ConsumedEvent)
    )
    plain = AnomalyProcessor()
    first = [i.attributes.id for e in events[:half] for i in plain.process(e.data, e.attributes.id)]
    second = [i.attributes.id for e in events[half:] for i in plain.process(e.data, e.attributes.id)]
    assert second, "the second half must raise anomalies that depend on the first half's state"
    assert got == sorted(first + second)
