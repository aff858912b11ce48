"""Producer throughput: the typed EventProducer (validate + Avro encode + CloudEvents headers +
acks=all, idempotence) against raw confluent-kafka producing the same pre-encoded bytes and headers
with the same librdkafka settings. Run: ``python bench/bench_producer.py [--events N]``."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import bench_stack, print_table, realistic_events
from streams.producer import EventProducer, epoch_ms
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde


def main(argv: list[str] | None = None) -> list[tuple[str, float, str]]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=100_000)
    args = ap.parse_args(argv)
    events = realistic_events(args.events)
    serde = AvroSerde(EmbeddedRegistry())
    with bench_stack() as settings:
        admin = AdminClient(settings.kafka.librdkafka())
        topics = [f"bench-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
        for f in admin.create_topics([NewTopic(t, 6, 1) for t in topics]).values():
            f.result()
        pre = [(e.key.encode(), serde.encode(e.schema, e.data), e.attributes.to_headers(), epoch_ms(e.attributes.time))
               for e in events]  # fmt: skip
        rows = []

        p = EventProducer(settings.kafka, serde)
        conf = settings.kafka.librdkafka(extra={"acks": "all", "enable.idempotence": True, "linger.ms": 5,
                                                "compression.type": "lz4"})  # fmt: skip
        raw = Producer(conf)
        t = time.perf_counter()
        for key, value, headers, ts in pre:
            while True:
                try:
                    raw.produce(topics[0], key=key, value=value, headers=headers, timestamp=ts)
                    break
                except BufferError:
                    raw.poll(0.05)
            raw.poll(0)
        raw.flush()
        rows.append(("raw confluent-kafka, pre-encoded", len(pre) / (time.perf_counter() - t), "events/s"))

        t = time.perf_counter()
        p.produce_many(topics[1], events)
        rows.append(("EventProducer (encode + headers)", len(events) / (time.perf_counter() - t), "events/s"))

        strict = EventProducer(settings.kafka, AvroSerde(EmbeddedRegistry(), validate_on_encode=True))
        t = time.perf_counter()
        strict.produce_many(topics[2], events)
        rows.append(("EventProducer, full validation", len(events) / (time.perf_counter() - t), "events/s"))
    print_table(
        f"producer throughput, {len(events):,} real-shaped agent events",
        rows,
        "raw confluent-kafka, pre-encoded",
    )
    return rows


if __name__ == "__main__":
    main()
