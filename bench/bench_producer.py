"""Producer throughput: the typed EventProducer (validate + Avro encode + CloudEvents headers +
acks=all, idempotence) against raw confluent-kafka producing the same pre-encoded bytes and headers
with the same librdkafka settings, in alternating rounds after a warm-up (the median of each path is
reported). Run: ``python bench/bench_producer.py [--events N] [--rounds R]``.

Two rows bound what a typed producer on these libraries can reach: raw confluent-kafka on bytes
encoded beforehand (no Avro encoding, no headers built: the ratio's baseline), and the same loop
written by hand with the encoding and headers done per record (fastavro's ``schemaless_writer`` behind
the Confluent framing, the same CloudEvents headers, no delivery reports, no checks beyond the writer's
own): the floor of per-record work that the typed producer adds its guarantees to."""

from __future__ import annotations

import argparse
import io
import json
import statistics
import struct
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastavro
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import SchemaRegistryClient, record_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from bench.common import bench_stack, print_table, realistic_events
from streams.producer import EventProducer, epoch_ms
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde
from tests.fakes.schema_registry import FakeSchemaRegistry

PATHS = (
    "raw confluent-kafka, pre-encoded",
    "by hand: fastavro encode + headers + raw produce",
    "EventProducer (encode + headers)",
    "EventProducer, full validation",
    "confluent-kafka AvroSerializer + headers",
)


def main(argv: list[str] | None = None) -> list[tuple[str, float, str]]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3, help="Rounds; each path's median is reported.")
    args = ap.parse_args(argv)
    events = realistic_events(args.events)
    serde = AvroSerde(EmbeddedRegistry())
    with bench_stack() as settings:
        admin = AdminClient(settings.kafka.librdkafka())
        topics = [f"bench-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(PATHS) * args.rounds + 2)]
        for f in admin.create_topics([NewTopic(t, 6, 1) for t in topics]).values():
            f.result()
        pre = [(e.key.encode(), serde.encode(e.schema, e.data), e.attributes.to_headers(), epoch_ms(e.attributes.time))
               for e in events]  # fmt: skip
        conf = settings.kafka.librdkafka(extra={"acks": "all", "enable.idempotence": True, "linger.ms": 5,
                                                "compression.type": "lz4"})  # fmt: skip
        raw = Producer(conf)
        typed = EventProducer(settings.kafka, serde)
        strict = EventProducer(settings.kafka, AvroSerde(EmbeddedRegistry(), validate_on_encode=True))
        # warm each producer (connections, metadata, idempotent producer id) on its first topic
        for key, value, headers, ts in pre[:100]:
            raw.produce(topics[0], key=key, value=value, headers=headers, timestamp=ts)
        raw.flush()
        typed.produce_many(topics[1], events[:100])
        strict.produce_many(topics[2], events[:100])
        # the library path users would otherwise take: confluent-kafka's own AvroSerializer (fastavro
        # underneath) against a Confluent-API registry, one serializer per record type, and the same headers
        sr = FakeSchemaRegistry().__enter__()
        sr_client = SchemaRegistryClient({"url": sr.url})
        serializers = {
            name: AvroSerializer(sr_client, json.dumps(serde.registry.schema_for(serde.registry.id_for(name))),
                                 conf={"subject.name.strategy": record_subject_name_strategy})
            for name in {e.schema for e in events}
        }  # fmt: skip

        def library(topic: str, batch: list) -> None:
            for e in batch:
                value = serializers[e.schema](e.data, SerializationContext(topic, MessageField.VALUE))
                while True:
                    try:
                        raw.produce(topic, key=e.key.encode(), value=value, headers=e.attributes.to_headers(),
                                    timestamp=epoch_ms(e.attributes.time))  # fmt: skip
                        break
                    except BufferError:
                        raw.poll(0.05)
                raw.poll(0)
            raw.flush()

        library(topics[-1], events[:100])
        framing = {
            name: struct.pack(">bI", 0, serde.registry.id_for(name)) for name in {e.schema for e in events}
        }
        parsed = {name: fastavro.parse_schema(serde.registry.schema_for(serde.registry.id_for(name)))
                  for name in framing}  # fmt: skip

        def by_hand(topic: str, batch: list) -> None:
            for e in batch:
                buf = io.BytesIO()
                buf.write(framing[e.schema])
                fastavro.schemaless_writer(buf, parsed[e.schema], e.data)
                a = e.attributes
                while True:
                    try:
                        raw.produce(topic, buf.getvalue(), e.key.encode(), headers=a.to_headers(),
                                    timestamp=epoch_ms(a.time))  # fmt: skip
                        break
                    except BufferError:
                        raw.poll(0.05)
                raw.poll(0)
            raw.flush()

        by_hand(topics[-2], events[:100])
        rates: dict[str, list[float]] = {k: [] for k in PATHS}
        for r in range(args.rounds):  # the paths alternate, so drift on a shared machine hits each alike
            topic = topics[len(PATHS) * r : len(PATHS) * (r + 1)]
            t = time.perf_counter()
            for key, value, headers, ts in pre:
                while True:
                    try:
                        raw.produce(topic[0], key=key, value=value, headers=headers, timestamp=ts)
                        break
                    except BufferError:
                        raw.poll(0.05)
                raw.poll(0)
            raw.flush()
            rates[PATHS[0]].append(len(pre) / (time.perf_counter() - t))
            t = time.perf_counter()
            by_hand(topic[1], events)
            rates[PATHS[1]].append(len(events) / (time.perf_counter() - t))
            t = time.perf_counter()
            typed.produce_many(topic[2], events)
            rates[PATHS[2]].append(len(events) / (time.perf_counter() - t))
            t = time.perf_counter()
            strict.produce_many(topic[3], events)
            rates[PATHS[3]].append(len(events) / (time.perf_counter() - t))
            t = time.perf_counter()
            library(topic[4], events)
            rates[PATHS[4]].append(len(events) / (time.perf_counter() - t))
        sr.__exit__(None, None, None)
        typed.close()
        strict.close()
        rows = [(k, statistics.median(v), "events/s") for k, v in rates.items()]
    print_table(
        f"producer throughput, {len(events):,} real-shaped agent events, median of {args.rounds} alternating rounds",
        rows,
        "raw confluent-kafka, pre-encoded",
    )
    return rows


if __name__ == "__main__":
    main()
