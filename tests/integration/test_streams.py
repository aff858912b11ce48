"""The log layer against a real Tansu broker: typed produce and consume, dead letters, range reads."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Producer

from core.settings import KafkaSettings, Settings
from streams.consumer import ConsumedEvent, DecodeFailure, Subscriber
from streams.envelope import Event
from streams.errors import BrokerUnavailableError, DeliveryError, SchemaValidationError
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.replay import offset_for_time, read_range
from streams.serde import AvroSerde

pytestmark = pytest.mark.integration
T0 = datetime(2025, 11, 18, 22, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde(EmbeddedRegistry())


def _tool_call(run: str, step: int, t: datetime) -> Event:
    data = {"run_id": run, "step": step, "event_time": t, "command": f"ls {step}", "return_code": step % 3}
    return Event.create(
        "sophia.agent.ToolCall", run, data, source="/tests", time=t, correlation_id=f"c-{run}"
    )


def test_produce_and_subscribe_round_trip(
    settings: Settings, serde: AvroSerde, create_topic: Callable, unique_name: Callable
) -> None:
    """Typed events come back decoded with their CloudEvents attributes, key, partition and offset."""
    topic = create_topic(unique_name("rt"), 3)
    events = [_tool_call(f"run-{i % 4}", i, T0 + timedelta(seconds=i)) for i in range(40)]
    with EventProducer(settings.kafka, serde) as p:
        assert p.produce_many(topic, events) == 40
    sub = Subscriber(settings.kafka, serde, [topic], start="beginning")
    got: list[ConsumedEvent] = []
    while not sub.caught_up() or len(got) < 40:
        got += [r for r in sub.poll_batch(100, 0.5) if isinstance(r, ConsumedEvent)]
    sub.close()
    assert sorted(r.attributes.id for r in got) == sorted(e.attributes.id for e in events)
    by_id = {e.attributes.id: e for e in events}
    for r in got:
        e = by_id[r.attributes.id]
        assert r.attributes == e.attributes and r.key == e.key
        assert r.data == {"tool": "bash", "output_bytes": 0, "timed_out": False, **e.data}  # defaults filled
        assert r.timestamp_ms == int(e.attributes.time.timestamp() * 1000)
    for run in {e.key for e in events}:  # order per key holds
        steps = [r.data["step"] for r in sorted(got, key=lambda r: r.offset) if r.key == run]
        assert steps == sorted(steps) and len({r.partition for r in got if r.key == run}) == 1


def test_invalid_event_is_not_sent(settings: Settings, serde: AvroSerde) -> None:
    """A datum that fails its schema raises before anything reaches the broker, naming the field."""
    bad = Event.create("sophia.agent.ToolCall", "r", {"run_id": "r", "step": "one", "event_time": T0, "command": "ls"},
                       source="/tests", time=T0)  # fmt: skip
    p = EventProducer(settings.kafka, serde)
    with pytest.raises(SchemaValidationError, match="step"):
        p.produce("never-created", bad)
    p.flush()
    assert p.delivered == 0


def test_unreachable_broker_is_a_clear_error(serde: AvroSerde) -> None:
    """Producing to a broker nobody listens on fails with BrokerUnavailableError naming it, not a hang."""
    p = EventProducer(
        KafkaSettings(bootstrap_servers="127.0.0.1:1"), serde, extra={"message.timeout.ms": 3000}
    )
    p.produce("t", _tool_call("r", 1, T0))
    with pytest.raises(BrokerUnavailableError, match=r"Kafka at 127\.0\.0\.1:1 is unreachable"):
        p.flush(timeout_seconds=10)


def test_failed_delivery_is_raised_by_flush_and_the_rest_are_counted(
    settings: Settings, serde: AvroSerde, create_topic: Callable, unique_name: Callable
) -> None:
    """librdkafka reports failed records only (``delivery.report.only.error``): a record its broker
    cannot take still fails the flush, naming its topic and key, and only the others count as delivered.
    A record refused before it is queued (a partition the producer already knows is not there) raises
    at once, naming the same, and the producer goes on.

    The record of the delivery report goes to a topic that does not exist (topic creation by the
    producer off, so the broker answers UNKNOWN_TOPIC_OR_PART): no producer can know that before its
    first metadata request for the topic, so it fails in a report whatever the timing. A partition
    past a new topic's end is no such case: a producer that already has the topic's metadata refuses
    it in ``produce`` itself (a CI run got there first, 2026-12-07; here, after a 2-s wait it always
    does).
    """
    topic = create_topic(unique_name("dr"), 1)
    missing = unique_name("never-created")
    p = EventProducer(
        settings.kafka,
        serde,
        extra={"allow.auto.create.topics": False, "topic.metadata.propagation.max.ms": 1000},
    )
    p.produce_raw(missing, key=b"lost", value=b"x")
    with pytest.raises(DeliveryError) as info:
        p.produce_many(topic, [_tool_call("r", i, T0) for i in range(299)])  # 299: past one poll of 256
    assert [(t, k) for t, k, _ in info.value.failures] == [(missing, b"lost")]
    # the broker's UNKNOWN_TOPIC_OR_PART, or librdkafka's own unknown topic
    assert "Unknown topic" in info.value.failures[0][2]
    assert p.delivered == 299
    with pytest.raises(DeliveryError) as refused:  # the topic's one partition is known by now
        p.produce_raw(topic, key=b"past-the-end", value=b"x", partition=7)
    assert [(t, k) for t, k, _ in refused.value.failures] == [(topic, b"past-the-end")]
    p.produce(topic, _tool_call("r", 299, T0))
    p.close()  # the next flush carries no old failure
    assert p.delivered == 300


def test_undecodable_record_is_a_failure_not_a_crash(
    settings: Settings, serde: AvroSerde, create_topic: Callable, unique_name: Callable
) -> None:
    """Garbage bytes and a record without CloudEvents headers are yielded as failures; the rest decodes."""
    topic = create_topic(unique_name("bad"), 1)
    p = EventProducer(settings.kafka, serde)
    p.produce(topic, _tool_call("r", 1, T0))
    p.produce_raw(
        topic,
        key=b"r",
        value=b"\x00\x00\x00\x03\xe7garbage",
        headers=_tool_call("r", 2, T0).attributes.to_headers(),
    )
    p.produce_raw(
        topic, key=b"r", value=serde.encode("sophia.agent.ToolCall", dict(_tool_call("r", 3, T0).data))
    )
    p.produce(topic, _tool_call("r", 4, T0))
    p.flush()
    records = list(read_range(settings.kafka, serde, topic))
    assert [type(r).__name__ for r in records] == [
        "ConsumedEvent",
        "DecodeFailure",
        "DecodeFailure",
        "ConsumedEvent",
    ]
    assert isinstance(records[1], DecodeFailure) and records[1].value == b"\x00\x00\x00\x03\xe7garbage"
    assert "unknown schema id 999" in records[1].reason and "ce_id" in records[2].reason


def test_read_range_by_event_time_is_exact_on_tansu(
    settings: Settings, serde: AvroSerde, create_topic: Callable, unique_name: Callable
) -> None:
    """A time range returns exactly the events whose event time is in it, although Tansu's
    offsets_for_times answers 0 and timestamps interleave within partitions."""
    topic = create_topic(unique_name("time"), 3)
    rng = random.Random(7)
    events = [
        _tool_call(f"run-{i % 5}", i, T0 + timedelta(minutes=rng.randrange(0, 120))) for i in range(300)
    ]
    with EventProducer(settings.kafka, serde) as p:
        p.produce_many(topic, events)
    a, b = T0 + timedelta(minutes=30), T0 + timedelta(minutes=75)
    got = [r.attributes.id for r in read_range(settings.kafka, serde, topic, start=a, end=b)]
    want = [e.attributes.id for e in events if a <= e.attributes.time < b]
    assert sorted(got) == sorted(want) and len(got) == len(set(got)) and want
    late = T0 + timedelta(days=1)
    assert list(read_range(settings.kafka, serde, topic, start=late)) == []
    assert offset_for_time(settings.kafka, topic, 0, T0 - timedelta(days=1)) == 0


def test_read_range_by_offsets(
    settings: Settings, serde: AvroSerde, create_topic: Callable, unique_name: Callable
) -> None:
    """An offset range [10, 20) of a one-partition topic yields exactly those ten records in order."""
    topic = create_topic(unique_name("off"), 1)
    with EventProducer(settings.kafka, serde) as p:
        p.produce_many(topic, [_tool_call("r", i, T0) for i in range(30)])
    got = list(read_range(settings.kafka, serde, topic, start=10, end=20))
    assert [r.offset for r in got] == list(range(10, 20))
    assert [r.data["step"] for r in got] == list(range(10, 20))


def test_raw_confluent_producer_interoperates(
    settings: Settings, serde: AvroSerde, create_topic: Callable, unique_name: Callable
) -> None:
    """Bytes produced by plain confluent-kafka with the same framing and headers decode like ours."""
    topic = create_topic(unique_name("raw"), 1)
    e = _tool_call("r", 1, T0)
    raw = Producer(settings.kafka.librdkafka())
    raw.produce(
        topic, key=b"r", value=serde.encode(e.schema, dict(e.data)), headers=e.attributes.to_headers()
    )
    raw.flush()
    (r,) = list(read_range(settings.kafka, serde, topic))
    assert isinstance(r, ConsumedEvent) and r.attributes == e.attributes


def test_consume_ready_hands_over_a_record_when_it_arrives_not_after_the_batch_timeout(
    settings: Settings, create_topic: Callable, unique_name: Callable
) -> None:
    """``consume_ready`` waits for the first record only; librdkafka's ``consume(n, timeout)`` waits out
    the timeout whenever fewer than ``n`` records come (the latency the SSE pump and the projection
    runner had). An idle topic gives [] after the timeout; a backlog comes back in one call."""
    import threading
    import time

    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from streams.offsets import consume_ready, make_consumer

    topic = create_topic(unique_name("ready"), 1)
    c = make_consumer(settings.kafka, unique_name("g"), **{"fetch.wait.max.ms": 10})
    c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    try:
        started = time.monotonic()
        assert consume_ready(c, 100, 1.0) == []
        assert time.monotonic() - started >= 0.9
        p = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})
        threading.Timer(1.0, lambda: (p.produce(topic, b"one"), p.flush(10))).start()
        started = time.monotonic()
        got = consume_ready(c, 100, 20.0)
        waited = time.monotonic() - started
        assert [m.value() for m in got] == [b"one"]
        assert waited < 5.0, waited  # the record's arrival (~1 s), not the 20 s timeout
        for i in range(50):
            p.produce(topic, b"%d" % i)
        p.flush(10)
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 50 and time.monotonic() < deadline:
            got += consume_ready(c, 1000, 1.0)
        assert [m.value() for m in got] == [b"%d" % i for i in range(50)]
        with pytest.raises(ValueError, match="at least 1"):
            consume_ready(c, 0, 1.0)
    finally:
        c.close()


def test_end_offsets_are_exact_where_list_offsets_answers_a_batch_base(
    settings: Settings, create_topic: Callable, unique_name: Callable
) -> None:
    """Eight records in one batch (a producer that lingers): ``end_offsets`` gives 8 for their partition
    whatever ``ListOffsets(latest)`` says (Tansu: the batch's base + 1), 0 for an empty partition, and a
    clear error for a topic that does not exist."""
    from confluent_kafka import TopicPartition

    from streams.offsets import end_offsets, private_consumer

    topic = create_topic(unique_name("ends"), 2)
    p = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers, "linger.ms": 200})
    for i in range(8):
        p.produce(topic, b"%d" % i, partition=0)
    assert p.flush(10) == 0
    c = private_consumer(settings.kafka)
    try:
        listed = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    finally:
        c.close()
    assert 1 <= listed <= 8  # a lower bound (1 on Tansu for one batch of 8, 8 on Apache Kafka)
    assert end_offsets(settings.kafka, topic) == {0: 8, 1: 0}
    assert end_offsets(settings.kafka, topic, [0]) == {0: 8}
    with pytest.raises(KeyError, match="does not exist"):
        end_offsets(settings.kafka, unique_name("nope"), timeout_seconds=5)


def test_a_catalogue_topic_is_made_as_the_catalogue_says_whoever_asks_first(
    settings: Settings, unique_name: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's topic setup asks for a catalogue topic with its own partition count and no config (a
    healer started before `backbone topics create` asks for `agent.events` with 1 partition): Tansu gets
    the catalogue's partitions, retention and cleanup policy; a name outside the catalogue is made as asked."""
    import time

    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

    from streams import catalogue

    name, own = unique_name("catalogue-topic"), unique_name("own-topic")
    monkeypatch.setitem(catalogue.CATALOGUE, name, catalogue.TopicSpec(
        name=name, partitions=3, key="entity", schemas=(), retention_ms=-1, doc="a test's catalogue entry"))  # fmt: skip
    admin = AdminClient(settings.kafka.librdkafka())
    asked = [
        NewTopic(name, num_partitions=1, replication_factor=1),
        NewTopic(own, num_partitions=1, replication_factor=1),
    ]
    assert sorted(catalogue.create_missing_topics(admin, asked)) == sorted([name, own])
    deadline = time.monotonic() + 10
    while True:  # the metadata may answer before the partitions are listed
        topics = admin.list_topics(timeout=10).topics
        counts = {t: len(topics[t].partitions) if t in topics else 0 for t in (name, own)}
        if all(counts.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert counts == {name: 3, own: 1}
    described = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in (name, own)])
    configs = {r.name: {k: c.value for k, c in f.result(timeout=10).items()} for r, f in described.items()}
    assert configs[name]["retention.ms"] == "-1" and configs[name]["cleanup.policy"] == "delete"
    assert configs[own].get("retention.ms") != "-1"  # the broker's default (Tansu: not set)
