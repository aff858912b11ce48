"""The incident processor on the session's real Tansu: the same Nezha events replayed in two
interleavings give the same insights, suspect changes included (a config change and a commit on the
faulty service before the fault, on ``config.changes`` and ``external.events`` topics); a record that is
not Avro is dead-lettered and changes nothing."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backbone.chaos import telemetry_events
from connectors.nezha import METRIC_SAMPLE
from core.settings import Settings
from processors.incidents.incident import run
from streams.consumer import ConsumedEvent
from streams.envelope import Event
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.replay import read_range
from streams.serde import AvroSerde

pytestmark = pytest.mark.integration

SLICE = Path(__file__).resolve().parents[2] / "datasets" / "nezha"
BAD_VALUE = b"\x00\x00\x00\x00\x07 not an avro record"
FAULTY = "ts-contacts-service"  # the slice's fault: ts-contacts-service-866bd68c97-xcqfx at 08:43:04


def _changes() -> list[tuple[str, Event]]:
    """A config change and a commit on the faulty service before the fault, a config change on another
    key, and a comment (changes nothing): the changes a user's platform would have sent."""
    day = datetime(2023, 1, 29, tzinfo=UTC)

    def config(at: datetime, key: str, version: int, eid: str) -> tuple[str, Event]:
        data = {"key": key, "version": version, "change": "CHANGED", "value_json": "3", "author": "alice",
                "reason": "test", "changed_at": at, "schema_name": None, "restored_version": None,
                "rolled_back_from_version": None, "causation_id": None, "aggregate_id": eid, "notification_id": version}  # fmt: skip
        return "config.changes", Event.create(
            "sophia.config.ConfigChange", key, data, source="/test", time=at, id=eid
        )

    def external(at: datetime, kind: str, entity: str, title: str, eid: str) -> tuple[str, Event]:
        data = {"platform": kind.split(".")[0], "kind": kind, "entity": entity, "actor": "bob", "occurred_at": at,
                "url": None, "title": title, "body_excerpt": None, "refs": [], "source_id": eid}  # fmt: skip
        return "external.events", Event.create(
            "sophia.external.ExternalEvent", entity, data, source="/test", time=at, id=eid
        )

    return [
        config(day.replace(hour=8, minute=30), f"services.{FAULTY}.pool_size", 1, "cfg-contacts"),
        config(day.replace(hour=8, minute=31), "routing.config", 2, "cfg-routing"),
        external(day.replace(hour=8, minute=41), "git.commit", "git:acme/train-ticket@abc", f"{FAULTY}: cache lookups", "commit-1"),
        external(day.replace(hour=8, minute=42), "github.issue_comment.created", "github:acme/train-ticket#7", f"{FAULTY} slow?", "comment-1"),
    ]  # fmt: skip


def incident_topics(create_topic: Callable[..., str], unique_name: Callable[[str], str]) -> dict[str, str]:
    """Fresh topics for one incident worker, by its option names: the three telemetry inputs (6 partitions
    each), the two change topics, its insights and dead-letter topics."""
    return {
        "metrics": create_topic(unique_name("metrics"), partitions=6),
        "logs": create_topic(unique_name("logs"), partitions=6),
        "spans": create_topic(unique_name("spans"), partitions=6),
        "config": create_topic(unique_name("config"), partitions=1),
        "external": create_topic(unique_name("external"), partitions=3),
        "insights": create_topic(unique_name("incidents"), partitions=1),
        "dlq": create_topic(unique_name("dlq"), partitions=1),
    }


def _run(settings: Settings, tmp_path: Path, app_id: str, topics: dict[str, str]) -> dict:
    env = {
        **os.environ,
        "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "BACKBONE_STATE_DIR": str(tmp_path / app_id),
        "BACKBONE_LOG_FORMAT": "json",
    }
    args = [f"--{k}-topic={v}" for k, v in topics.items()]
    done = subprocess.run(
        [sys.executable, "-m", "processors.incidents.app", "--app-id", app_id, *args, "--stop-after-idle", "4"],
        env=env, check=False, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_same_insights_in_another_interleaving(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str], tmp_path: Path
) -> None:
    # the whole slice: the logs and spans end at 08:44:08, the metrics go on to 09:10:09, long enough for
    # the quiet log and span partitions to turn idle (event time) and let the watermark pass 08:43
    # a quarter of the traces (whole traces, by id) keeps the run short; the call graph stays real
    events = telemetry_events(SLICE) + _changes()
    serde = AvroSerde(EmbeddedRegistry())
    rng = random.Random(5)
    # the second interleaving: every record up to 10 s (< the 15 s allowed lateness) out of order
    shuffled = sorted(events, key=lambda te: te[1].attributes.time + timedelta(seconds=rng.uniform(0, 10)))
    # and every 50th telemetry record delivered twice (an at-least-once redelivery): dropped by event id
    twice_ids = {
        te[1].attributes.id for i, te in enumerate(shuffled) if te[0].startswith("telemetry.") and i % 50 == 0
    }
    shuffled = [x for te in shuffled for x in ([te, te] if te[1].attributes.id in twice_ids else [te])]
    results = []
    for order in (events, shuffled):
        topics = incident_topics(create_topic, unique_name)
        with EventProducer(settings.kafka, serde) as producer:
            for topic, e in order:
                producer.produce(
                    topics[
                        {"config.changes": "config", "external.events": "external"}.get(
                            topic, topic.split(".")[1]
                        )
                    ],
                    e,
                )
            producer.produce_raw(topics["metrics"], key=b"broken", value=BAD_VALUE, headers=[("ce_id", b"x")])
            producer.flush()
        stats = _run(settings, tmp_path, unique_name("incidents"), topics)
        twice = len(order) - len(events)
        assert stats["forwarded_count"] == len(order) - 1 and stats["dead_letters_count"] == 1
        assert stats["duplicates_count"] == twice
        assert stats["changes_count"] == 3 and stats["changes_skipped_count"] == 1
        assert stats["late_count"] == 0, (stats["late_sources"], stats["first_late"])
        # the dead-lettered record is its partition's last: a drained marker takes its place
        assert stats["drain_markers_count"] >= 1
        # the rate of a run is taken from the first record handled to the last (bench/bench_incidents.py)
        assert 0 < stats["first_record_monotonic"] < stats["last_record_monotonic"]
        insights = [
            r for r in read_range(settings.kafka, serde, topics["insights"]) if isinstance(r, ConsumedEvent)
        ]
        letters = list(read_range(settings.kafka, serde, topics["dlq"]))
        assert len(letters) == 1 and letters[0].data["value"] == BAD_VALUE
        results.append(sorted((r.data["insight_id"], r.data["kind"], r.data["event_time"], r.data["labels"]["candidates"],
                               r.data["labels"]["suspect_changes"]) for r in insights))  # fmt: skip
        opened = [r for r in insights if r.data["kind"] == "incident.opened"]
        assert opened and opened[0].data["labels"]["top1_pod"] == "ts-contacts-service-866bd68c97-xcqfx"
        suspects = json.loads(opened[0].data["labels"]["suspect_changes"])
        # the commit two minutes before, then the config change; the routing key touches no service
        assert [(s["change_id"], s["services"], s["candidate_rank"]) for s in suspects] == [
            ("commit-1", [FAULTY], 1),
            ("cfg-contacts", [FAULTY], 1),
        ]
        assert all(r.attributes.id == r.data["insight_id"] for r in insights)
    assert results[0] == results[1]


def _cpu_sample(pod: str, at: datetime, cpu_percent: float, event_id: str) -> Event:
    """A Nezha-shaped metric sample of ``pod`` at ``at``: its CPU only."""
    data = {
        "pod": pod,
        "service": pod.rsplit("-", 2)[0],
        "event_time": at,
        "metrics": {"CpuUsageRate(%)": cpu_percent},
    }
    return Event.create(METRIC_SAMPLE, pod, data, source="/test", time=at, id=event_id)


def test_close_at_end_decides_the_last_windows_of_a_finished_history_once(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Three pods' CPU for 16 minutes, one pod at 90 % in the last: the watermark (the latest event time
    less the allowed lateness) never passes the last two windows, so a live worker decides nothing. With
    ``--close-at-end`` the idle stop processes them and closes the incident: the insights of the engine
    replayed and flushed in process (opened, closed). The same group run again decides nothing twice: its
    restored state holds the end, so a record of the last window read then is counted late."""
    start = datetime(2023, 1, 29, 10, 0, 10, tzinfo=UTC)
    events = []
    for minute in range(16):
        for n, pod in enumerate(("ts-a-service-5dc8d4f9fd-46997", "ts-b-service-5dc8d4f9fd-46997", "ts-c-service-5dc8d4f9fd-46997")):  # fmt: skip
            cpu = 90.0 if (minute, n) == (15, 0) else 1.0 + 0.1 * ((minute + n) % 3)
            events.append(_cpu_sample(pod, start + timedelta(minutes=minute), cpu, f"m-{pod}-{minute}"))
    expected, _ = run(("metric", e.data) for e in events)
    assert [i["kind"] for i in expected] == ["incident.opened", "incident.closed"]
    topics = incident_topics(create_topic, unique_name)
    serde = AvroSerde(EmbeddedRegistry())
    with EventProducer(settings.kafka, serde) as producer:
        for e in events:
            producer.produce(topics["metrics"], e)
        producer.flush()
    app_id = unique_name("incidents")
    env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
           "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
           "BACKBONE_STATE_DIR": str(tmp_path / app_id), "BACKBONE_LOG_FORMAT": "json"}  # fmt: skip
    command = [sys.executable, "-m", "processors.incidents.app", "--app-id", app_id,
               *[f"--{k}-topic={v}" for k, v in topics.items()], "--stop-after-idle", "2", "--close-at-end"]  # fmt: skip
    runs = []
    for n in range(2):
        if n == 1:  # a record of the last window, closed by the end: late for the restarted worker
            late = _cpu_sample("ts-c-service-5dc8d4f9fd-46997", events[-1].attributes.time, 95.0, "m-late")
            with EventProducer(settings.kafka, serde) as producer:
                producer.produce(topics["metrics"], late)
                producer.flush()
        done = subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert [(r["forwarded_count"], r["closed_at_end_count"], r["insights_count"], r["late_count"]) for r in runs] == [
        (48, 2, 2, 0), (1, 0, 0, 1)
    ], runs  # fmt: skip
    assert runs[1]["restored"]
    insights = [
        r.data for r in read_range(settings.kafka, serde, topics["insights"]) if isinstance(r, ConsumedEvent)
    ]
    assert [(i["insight_id"], i["labels"]["candidates"]) for i in insights] == [
        (i["insight_id"], i["labels"]["candidates"]) for i in expected
    ]
    assert json.loads(insights[0]["labels"]["candidates"])[0]["pod"] == "ts-a-service-5dc8d4f9fd-46997"
    refused = subprocess.run([*command[: command.index("--stop-after-idle")], "--close-at-end"], env=env,
                             check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode != 0 and "stop_after_idle" in refused.stderr, refused.stderr[-2000:]


def test_partitions_written_in_transactions_drain_and_a_restart_does_not_wait_for_their_markers(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str], tmp_path: Path
) -> None:
    """A transactional producer (Kafka Streams or Kafka Connect with exactly-once) ends each transaction
    with a commit marker, so a partition's high watermark lies one past its last record. Pod a's 30
    minutes (a CPU spike at minute 12) on metrics partition 0, pod b's first 5 on partition 1, each in two
    transactions: b must be found read to its end, turn idle (more than ``idle_source_ms`` behind a) and
    stop holding the watermark, so the worker decides a's incident without ``--close-at-end``, as the
    engine replayed in process does. Before the fetch position counted (``FetchEnds``), b was never
    drained and nothing was decided. The group's committed offsets then lie before the markers: a worker
    starting again has nothing to wait for (``partitions_with_records``). A third partition holds the record
    of a transaction left open while the worker runs: not read (the workers read ``read_committed``), not
    waited for, and listed once committed."""
    from confluent_kafka import Producer

    from processors.shell import partitions_with_records

    start = datetime(2023, 1, 29, 10, 0, 10, tzinfo=UTC)
    pods = ("ts-a-service-5dc8d4f9fd-46997", "ts-b-service-5dc8d4f9fd-46997")
    events: list[tuple[int, int, Event]] = []  # (transaction, partition, event), each partition in time order
    for n, (pod, minutes) in enumerate(zip(pods, (30, 5), strict=True)):
        for minute in range(minutes):
            cpu = 90.0 if (minute, n) == (12, 0) else 1.0 + 0.1 * ((minute + n) % 3)
            sample = _cpu_sample(pod, start + timedelta(minutes=minute), cpu, f"m-{pod}-{minute}")
            events.append((2 * minute // minutes, n, sample))
    expected, _ = run(
        ("metric", e.data) for _, _, e in sorted(events, key=lambda tpe: tpe[2].attributes.time)
    )
    assert [i["kind"] for i in expected] == ["incident.opened", "incident.closed"]
    topics = incident_topics(create_topic, unique_name)
    serde = AvroSerde(EmbeddedRegistry())
    producer = Producer(
        {"bootstrap.servers": settings.kafka.bootstrap_servers, "transactional.id": unique_name("tx")}
    )
    producer.init_transactions(30)
    for transaction in (0, 1):
        producer.begin_transaction()
        for partition, e in [(p, e) for t, p, e in events if t == transaction]:
            producer.produce(topics["metrics"], key=e.key.encode(), value=serde.encode(e.schema, e.data),
                             headers=e.attributes.to_headers(), partition=partition)  # fmt: skip
        producer.commit_transaction(30)
    # another producer's transaction, open while the worker runs: its record is not read (read_committed)
    pod_c = "ts-c-service-5dc8d4f9fd-46997"
    late_c = _cpu_sample(pod_c, start, 99.0, "m-open")
    open_tx = Producer(
        {"bootstrap.servers": settings.kafka.bootstrap_servers, "transactional.id": unique_name("open")}
    )
    open_tx.init_transactions(30)
    open_tx.begin_transaction()
    open_tx.produce(topics["metrics"], key=late_c.key.encode(), value=serde.encode(late_c.schema, late_c.data),
                    headers=late_c.attributes.to_headers(), partition=2)  # fmt: skip
    open_tx.flush()
    app_id = unique_name("incidents")
    assert partitions_with_records(settings.kafka, [topics["metrics"]], app_id) == [
        f"{topics['metrics']}/0", f"{topics['metrics']}/1"
    ]  # fmt: skip
    summary = _run(settings, tmp_path, app_id, topics)
    assert (summary["forwarded_count"], summary["dead_letters_count"]) == (35, 0), summary
    insights = [
        r.data for r in read_range(settings.kafka, serde, topics["insights"]) if isinstance(r, ConsumedEvent)
    ]
    assert [(i["insight_id"], i["labels"]["candidates"]) for i in insights] == [
        (i["insight_id"], i["labels"]["candidates"]) for i in expected
    ]  # fmt: skip
    assert json.loads(insights[0]["labels"]["candidates"])[0]["pod"] == pods[0]
    assert partitions_with_records(settings.kafka, [topics["metrics"]], app_id) == []
    open_tx.commit_transaction(30)  # now its record is there to read
    assert partitions_with_records(settings.kafka, [topics["metrics"]], app_id) == [f"{topics['metrics']}/2"]


def test_a_commit_inside_the_last_batch_of_a_partition_is_listed_with_the_records_after_it(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str]
) -> None:
    """``partitions_with_records`` lists a partition whose group committed inside its last batch. Tansu
    answers ``ListOffsets(latest)`` with the last batch's base offset + 1, so a partition of one
    10-record batch reads as ending at 1: before the start-up read probed such partitions, commits at 1,
    5 and 9 listed nothing, and a restarted worker did not wait for those records (its watermark could
    pass them, making them late). A commit at the real end (10) lists nothing, and so does one past it
    (50, as a group keeps after its topic is made again): the read starts inside the last batch, not at
    an offset that is not there (from 50, librdkafka waited out the 15-s timeout, then it was listed)."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    from processors.shell import partitions_with_records

    topic = create_topic(unique_name("one-batch"), 2)
    producer = Producer(settings.kafka.librdkafka(extra={"linger.ms": 500}))  # the 10 records: one batch
    for i in range(10):
        producer.produce(topic, b"%d" % i, b"k", partition=0)
    assert producer.flush(10) == 0
    group = unique_name("group")
    committer = Consumer(settings.kafka.librdkafka(extra={"group.id": group, "enable.auto.commit": False}))
    try:
        low, high = committer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        assert (low, high) == (0, 1), "the broker's end is no longer the batch's base + 1: the premise moved"
        listed = {}
        for at in (0, 1, 5, 9, 10, 50):
            committer.commit(offsets=[TopicPartition(topic, 0, at)], asynchronous=False)
            listed[at] = partitions_with_records(settings.kafka, [topic], group)
    finally:
        committer.close()
    assert listed == {
        0: [f"{topic}/0"],
        1: [f"{topic}/0"],
        5: [f"{topic}/0"],
        9: [f"{topic}/0"],
        10: [],
        50: [],
    }
