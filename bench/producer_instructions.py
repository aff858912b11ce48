"""Where a typed produce's work goes, in instructions (noise-free on a shared machine): each part of the
producer's per-record path run under ``valgrind --tool=callgrind`` for 2,000 and for 10,000 real-shaped
agent events, the difference divided by 8,000 (start-up and imports cancel out).

Parts: raw confluent-kafka ``produce`` + ``poll`` of pre-encoded bytes (the producer bench's baseline);
``EventProducer.produce_many`` without and with full validation (its flush skipped: the broker,
``127.0.0.1:1``, is unreachable, so records only queue); and, alone, the CloudEvents headers, fastavro's
``schemaless_writer``, ``AvroSerde.encode`` and ``AvroSerde.check``. Needs ``valgrind`` (Debian's
package); about five minutes. Not in ``make bench``. Run: ``python bench/producer_instructions.py``.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = {
    "raw": "raw confluent-kafka produce + poll, pre-encoded",
    "typed": "EventProducer.produce_many (encode + headers + produce)",
    "strict": "EventProducer.produce_many, full validation",
    "headers": "CloudEvent.to_headers alone",
    "writer": "fastavro schemaless_writer alone",
    "encode": "AvroSerde.encode alone",
    "check": "AvroSerde.check alone",
}
SIZES = (2_000, 10_000)


def child(part: str, n: int) -> None:
    """Run ``part`` over the first ``n`` of 10,000 events, then exit without tearing anything down."""
    import fastavro
    from confluent_kafka import Producer

    from bench.common import realistic_events
    from core.settings import KafkaSettings
    from streams.producer import EventProducer, epoch_ms
    from streams.registry import EmbeddedRegistry
    from streams.serde import AvroSerde

    events = realistic_events(max(SIZES))
    serde = AvroSerde(EmbeddedRegistry(), validate_on_encode=part == "strict")
    for e in events[:10]:  # schemas parsed and cached before the measured part
        serde.encode(e.schema, e.data)
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    queue = {"message.timeout.ms": 600_000, "queue.buffering.max.messages": 1_000_000}
    if part == "raw":
        pre = [(e.key.encode(), serde.encode(e.schema, e.data), e.attributes.to_headers(), epoch_ms(e.attributes.time))
               for e in events]  # fmt: skip  # all of them, whatever n: the encoding is not what is counted
        raw = Producer(kafka.librdkafka(extra={"acks": "all", "enable.idempotence": True, "linger.ms": 5,
                                               "compression.type": "lz4", **queue}))  # fmt: skip
        for key, value, headers, ts in pre[:n]:
            raw.produce("t", key=key, value=value, headers=headers, timestamp=ts)
            raw.poll(0)
    elif part in ("typed", "strict"):
        producer = EventProducer(kafka, serde, extra=queue)
        producer.flush = lambda *a, **k: None  # type: ignore[method-assign]  # nothing would ever be acknowledged
        producer.produce_many("t", events[:n])
    elif part == "headers":
        for e in events[:n]:
            e.attributes.to_headers()
    elif part == "writer":
        parsed = {e.schema: serde._writer(e.schema)[1] for e in events}
        for e in events[:n]:
            fastavro.schemaless_writer(io.BytesIO(), parsed[e.schema], e.data)
    elif part == "encode":
        for e in events[:n]:
            serde.encode(e.schema, e.data)
    elif part == "check":
        for e in events[:n]:
            serde.check(e.schema, e.data)
    os._exit(0)


def instructions(part: str, n: int) -> int:
    """Instructions callgrind collected over the whole child process."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
         "--child", part, str(n)],
        capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    m = re.search(r"Collected\s*:\s*(\d+)", out)
    if m is None:
        raise RuntimeError(f"no callgrind summary for {part}: {out[-500:]}")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", nargs="*", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--child", nargs=2, metavar=("PART", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
    if shutil.which("valgrind") is None:
        print("skipped: valgrind is not installed (apt-get install valgrind)")
        return []
    rows = []
    for part in args.parts:
        low, high = (instructions(part, n) for n in SIZES)
        rows.append((PARTS[part], (high - low) / (SIZES[1] - SIZES[0])))
        print(f"{PARTS[part]:60s} {rows[-1][1]:>10,.0f} instructions a record", flush=True)
    return rows


if __name__ == "__main__":
    main()
