"""Reading a bounded range of history, by offset or by event time.

The record timestamp is the event time (the producer sets it). Finding the first offset at or after
a time asks the broker (``offsets_for_times``) but does not trust it: Kafka answers the first offset
whose running-maximum timestamp reaches the time, while some brokers (Tansu) answer 0 for any time.
The answer is accepted only when the record there is at or after the time and the record before it
(if any) is before it; otherwise the partition is scanned from its start. Because timestamps need
not be monotonic within a partition (events of concurrent runs interleave), every record of the
range is also filtered by its own timestamp.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import cast

from confluent_kafka import TopicPartition

from core.settings import KafkaSettings
from streams.consumer import ConsumedEvent, DecodeFailure, decode_message
from streams.offsets import offset_for_time, private_consumer
from streams.producer import epoch_ms
from streams.serde import AvroSerde

__all__ = ["Bound", "offset_for_time", "read_range"]

Bound = int | datetime | None
"""An offset (int), an event time (aware datetime) or no bound."""


def read_range(
    kafka: KafkaSettings,
    serde: AvroSerde,
    topic: str,
    *,
    start: Bound = None,
    end: Bound = None,
    partitions: list[int] | None = None,
    batch_size: int = 1000,
    idle_timeout_seconds: float = 10.0,
) -> Iterator[ConsumedEvent | DecodeFailure]:
    """Yield the records of a bounded range of ``topic``, in offset order per partition.

    Args:
        kafka: broker settings.
        serde: decodes each record (failures are yielded, not raised).
        topic: the topic.
        start: first offset (inclusive) or event time (inclusive); None = the partition's start.
        end: last offset (exclusive) or event time (exclusive); None = the end of the partition.
        partitions: which partitions (default all), read one after the other.
        batch_size: records per consume call.
        idle_timeout_seconds: give up on a partition that neither delivers nor reports its end.

    Partitions are read together; order holds within each partition, not across them.
    The end of a partition is where the fetch reports end-of-partition (the fetch high watermark),
    not ``ListOffsets``, which some brokers answer wrongly (Tansu: last batch's base offset + 1).

    Raises:
        KeyError: the topic does not exist.
        TimeoutError: a partition stayed silent for ``idle_timeout_seconds``.
    """
    c = private_consumer(kafka)
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            raise KeyError(f"topic {topic!r}: {meta.error}")
        t_from = epoch_ms(start) if isinstance(start, datetime) else None
        t_to = epoch_ms(end) if isinstance(end, datetime) else None
        e = end if isinstance(end, int) else None
        assignment = []
        for p in sorted(partitions if partitions is not None else meta.partitions):
            low, _ = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            s = low
            if isinstance(start, int):
                s = max(low, start)
            elif isinstance(start, datetime):
                s = offset_for_time(kafka, topic, p, start, consumer=c)
            if e is None or s < e:
                assignment.append(TopicPartition(topic, p, s))
        if not assignment:
            return
        c.assign(assignment)
        open_partitions = {tp.partition for tp in assignment}
        idle = 0.0
        while open_partitions:
            msgs = c.consume(batch_size, 0.1)
            if not msgs:
                idle += 0.1
                if idle >= idle_timeout_seconds:
                    raise TimeoutError(
                        f"{topic}{sorted(open_partitions)}: no record and no end in {idle:.0f}s"
                    )
                continue
            idle = 0.0
            for m in msgs:
                p = cast(int, m.partition())
                if p not in open_partitions:
                    continue
                o = cast(int, m.offset())  # set on records and end-of-partition events alike
                if m.error() is not None or (e is not None and o >= e):
                    open_partitions.discard(p)  # end of partition, or past the end bound
                    c.incremental_unassign([TopicPartition(topic, p)])
                    continue
                ts = m.timestamp()[1]
                if (t_from is None or ts >= t_from) and (t_to is None or ts < t_to):
                    yield decode_message(serde, m)
                if e is not None and o >= e - 1:
                    open_partitions.discard(p)
                    c.incremental_unassign([TopicPartition(topic, p)])
    finally:
        c.close()
