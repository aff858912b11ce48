"""A Faust worker that probes the three repairs of :class:`processors.shell.SeekingConsumer`.

Run by ``test_faust_consumer.py`` as ``python faust_seek_probe.py TOPIC APP_ID RESULT_JSON FIRST SECOND``
with ``BACKBONE_KAFKA__BOOTSTRAP_SERVERS`` set; TOPIC (2 partitions) already holds ``FIRST`` records. The app is
made by :func:`processors.shell.make_faust_app` (the processors' own) and never commits, so no
partition of TOPIC ever has a committed offset. Once its agent has seen the first records, the probe:

1. pauses TOPIC's partitions in Faust (as recovery does), produces ``SECOND`` more records, waits until
   the consumer thread has prefetched them, and asks the consumer for records with an *empty* set of
   active partitions (what aiokafka used to read as "every partition"): ``empty_set_records`` is how many
   came back (dropped by Faust had they been real);
2. resumes the partitions; the agent should then see the second records too;
3. calls ``consumer.perform_seek()`` (Faust's "seek stream partitions to committed offsets"): with no
   committed offset, each partition should go back to its start. Records stay held back until the flow
   resumes (``held_after_seek``: how many the agent saw in 3 s after the seek), as recovery's own
   ``flow_control.resume()`` would clear them; then, resumed as recovery does, the agent should see every
   record again.

It writes what the agent saw (``offsets``: ``[partition, offset]`` pairs in the order seen) and stops.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import faust
from confluent_kafka import Producer

from core.settings import Settings
from processors.shell import make_faust_app


def main() -> None:
    topic_name, app_id, result_path = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    first, second = int(sys.argv[4]), int(sys.argv[5])
    settings = Settings()
    app = make_faust_app(settings, app_id, partitions=2, web_port=0)
    app.conf.broker_commit_interval = 3600.0  # never commit: every partition stays without a committed offset
    app.conf.broker_commit_every = 1_000_000
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, partitions=2)
    seen: list[tuple[int, int]] = []
    result: dict = {}

    @app.agent(topic)
    async def count(stream: faust.StreamT) -> None:
        async for event in stream.events():
            seen.append((event.message.partition, event.message.offset))

    async def until(predicate, timeout_seconds: float) -> bool:
        deadline = time.monotonic() + timeout_seconds
        while not predicate():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    @app.task
    async def probe() -> None:
        consumer = app.consumer
        try:
            result["first_seen"] = await until(lambda: len(seen) >= first, 60)
            tps = {tp for tp in consumer.assignment() if tp.topic == topic_name}
            consumer.pause_partitions(tps)
            await asyncio.sleep(0.5)  # let a getmany already under way return
            before = len(seen)
            producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})
            for i in range(second):
                producer.produce(topic_name, key=f"k{i}".encode(), value=b"second", partition=i % 2)
            producer.flush(10)
            await asyncio.sleep(
                3.0
            )  # the consumer thread prefetches them (aiokafka keeps fetching paused ones)
            got = await consumer._getmany(set(), 1.0)
            result["empty_set_records"] = sum(len(records) for records in got.values())
            result["seen_while_paused"] = len(seen) - before
            consumer.resume_partitions(tps)
            result["second_seen"] = await until(lambda: len(seen) >= first + second, 30)
            before = len(seen)
            await consumer.perform_seek()
            await asyncio.sleep(3.0)
            result["held_after_seek"] = len(seen) - before
            app.flow_control.resume()  # what recovery does right after the seek
            consumer.resume_flow()
            result["seen_again"] = await until(lambda: len(seen) >= 2 * (first + second), 30)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result["error"] = repr(exc)
        finally:
            result["offsets"] = seen
            result_path.write_text(json.dumps(result))
            os.kill(os.getpid(), signal.SIGTERM)

    worker = faust.Worker(app, loglevel="info", quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


if __name__ == "__main__":
    main()
