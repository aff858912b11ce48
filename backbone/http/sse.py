"""``GET /subscribe/{topic}``: a topic as Server-Sent Events, resumable and with bounded buffering.

Each SSE message is one event of the topic::

    id: 0:17,1:4,2:9
    event: sophia.agent.LlmCall
    data: {"specversion": "1.0", "id": "...", "topic": "agent.events", "partition": 0, "offset": 16, ...}

``data`` is :meth:`streams.consumer.ConsumedEvent.as_json`. ``id`` is a cursor over every partition:
``partition:next offset`` pairs (the offset after the last record sent from that partition, or the
position the stream started from). A client that reconnects with ``Last-Event-ID`` (browsers'
``EventSource`` do it on their own) resumes exactly after the last event it received, on every
partition, without gap or duplicate. Records that cannot be decoded are sent as ``event:
backbone.undecodable`` with the reason, so the cursor still moves past them.

A Kafka consumer thread per stream (partitions assigned directly, no consumer group, nothing committed)
feeds a bounded buffer; when the buffer is full because the client reads slowly, the thread pauses
its partitions (``Consumer.pause``) and resumes them once the client has drained half of it, so a
slow client costs at most ``sse_buffer_events`` events of memory. Heartbeats are SSE comments.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from backbone.http.auth import Principal, authenticate_request, require_scope
from core.settings import KafkaSettings
from streams.consumer import ConsumedEvent, DecodeFailure, decode_message
from streams.envelope import parse_time
from streams.errors import BrokerUnavailableError
from streams.offsets import consume_ready
from streams.replay import offset_for_time
from streams.serde import AvroSerde

__all__ = ["StreamState", "format_cursor", "parse_cursor", "router"]

_log = structlog.get_logger(__name__)

router = APIRouter(tags=["subscribe"])


def parse_cursor(text: str) -> dict[int, int]:
    """Parse a cursor ``"0:17,1:4"`` into ``{partition: next offset}``.

    Raises:
        ValueError: malformed text (not comma-separated ``partition:offset`` pairs of non-negative integers).
    """
    out: dict[int, int] = {}
    for part in text.strip().split(","):
        p, sep, o = part.strip().partition(":")
        if not sep or not p.isdigit() or not o.isdigit():
            raise ValueError(f"malformed cursor {text!r}: expected partition:offset pairs, e.g. 0:17,1:4")
        out[int(p)] = int(o)
    return out


def format_cursor(positions: dict[int, int]) -> str:
    """The cursor text of ``{partition: next offset}`` (sorted by partition)."""
    return ",".join(f"{p}:{o}" for p, o in sorted(positions.items()))


@dataclass(slots=True, eq=False)
class StreamState:
    """Live state of one SSE stream (for tests, ``/healthz`` and metrics).

    Attributes:
        topic: the topic streamed.
        capacity: most events buffered between the consumer thread and the response.
        buffered: events buffered now (handed over by the thread, not yet written to the client).
        paused: whether the consumer's partitions are paused because the buffer is full.
        pauses: how many times the buffer filled up.
        sent: events written to the client.
    """

    topic: str
    capacity: int
    buffered: int = 0
    paused: bool = False
    pauses: int = 0
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    space: threading.Event = field(default_factory=threading.Event, repr=False)


_EOF = object()

FETCH_MAX_WAIT_MS = 100
"""librdkafka ``fetch.wait.max.ms`` of each SSE subscription's consumer. The Tansu broker of dev and tests
answers a fetch only when its wait ends, so this is latency for every record delivered (a run summary's
kafka -> SSE stage at 1,000 events/s: 26 / 54 ms p50 / p95 at 100 ms, 4 / 16 ms at 20 ms). But 20 ms cost
the machine more than it saved: in three runs of ``bench/bench_latency.py --rates 1000`` (2026-12-04) the
run-summary worker, on the same 2 cores as Tansu and the API, then lagged 1.3-4.6 s (p50), against
48-117 ms in the runs at 100 ms around them. On Apache Kafka the wait only bounds an idle fetch."""


class _Pump(threading.Thread):
    """Consumer thread: read records into the loop's queue while the buffer has room."""

    def __init__(
        self,
        kafka: KafkaSettings,
        serde: AvroSerde,
        topic: str,
        starts: dict[int, int],
        state: StreamState,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[Any],
    ) -> None:
        super().__init__(name=f"sse-{topic}", daemon=True)
        self.serde = serde
        self.topic = topic
        self.state = state
        self.loop = loop
        self.queue = queue
        self.stop = threading.Event()
        self.starts = starts
        self.next_offsets: dict[int, int] = {}
        self.consumer = Consumer(
            kafka.librdkafka(
                extra={
                    "group.id": f"backbone-sse-{uuid.uuid4()}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "earliest",
                    "isolation.level": "read_committed",
                    "enable.partition.eof": True,
                    "fetch.wait.max.ms": FETCH_MAX_WAIT_MS,
                    "queued.max.messages.kbytes": 1024,
                    "fetch.max.bytes": 1_048_576,
                    "max.partition.fetch.bytes": 262_144,
                }
            )
        )
        self.partitions = [TopicPartition(topic, p, o) for p, o in sorted(starts.items())]
        self.consumer.assign(self.partitions)

    def _hand_over(self, item: Any) -> None:
        with self.state.lock:
            self.state.buffered += 1
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _free(self) -> int:
        with self.state.lock:
            return self.state.capacity - self.state.buffered

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - reported to the client, then the stream ends
            _log.warning("sse.consumer_failed", topic=self.topic, error=str(exc))
            self.loop.call_soon_threadsafe(self.queue.put_nowait, exc)
        finally:
            self.consumer.close()

    def _run(self) -> None:
        st = self.state
        while not self.stop.is_set():
            free = self._free()
            if free <= 0:
                if not st.paused:
                    self.consumer.pause(self.consumer.assignment())
                    st.paused = True
                    st.pauses += 1
                st.space.clear()
                if self._free() <= 0:
                    st.space.wait(0.5)
                continue
            if st.paused:
                # Resume, then seek each partition to the record after the last one handed over: the
                # fetched-but-unconsumed records were dropped by the pause, and nothing may be skipped.
                assignment = self.consumer.assignment()
                self.consumer.resume(assignment)
                for tp in assignment:
                    if tp.partition in self.next_offsets:
                        self.consumer.seek(
                            TopicPartition(self.topic, tp.partition, self.next_offsets[tp.partition])
                        )
                st.paused = False
            for m in consume_ready(self.consumer, min(free, 500), 0.25):  # a record waits for its fetch only
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        self._hand_over(("eof", m.partition(), m.offset()))
                        continue
                    if not err.retriable() and err.fatal():
                        raise RuntimeError(str(err))
                    continue
                self.next_offsets[m.partition()] = m.offset() + 1
                self._hand_over(decode_message(self.serde, m))


def _resolve_starts(
    kafka: KafkaSettings, topic: str, partitions: int, start: str, cursor: dict[int, int] | None
) -> dict[int, int]:
    """Start offsets per partition: the cursor's where given, else ``start`` (beginning/latest/time)."""
    starts: dict[int, int] = {}
    when: datetime | None = None
    if start not in ("beginning", "latest"):
        when = parse_time(start)
    for p in range(partitions):
        if cursor is not None and p in cursor:
            starts[p] = cursor[p]
        elif start == "beginning":
            starts[p] = OFFSET_BEGINNING
        elif start == "latest":
            starts[p] = OFFSET_END
        else:
            assert when is not None
            starts[p] = offset_for_time(kafka, topic, p, when)
    return starts


def _sse(event_type: str, data: dict[str, Any], cursor: str) -> bytes:
    return f"id: {cursor}\nevent: {event_type}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n".encode()


@router.get(
    "/subscribe/{topic}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The event stream."},
        400: {"description": "Malformed Last-Event-ID or from."},
        401: {"description": "No token, or an unknown or revoked one."},
        403: {"description": "The token lacks subscribe:<topic>."},
        404: {"description": "No such topic."},
        503: {"description": "The broker cannot be reached."},
    },
)
async def subscribe(
    request: Request,
    topic: str,
    from_: str = Query(
        "beginning",
        alias="from",
        description="beginning | latest | an ISO 8601 event time (ignored when resuming).",
    ),
    limit: int = Query(0, ge=0, description="Close the stream after this many events (0: never)."),
    last_event_id: str | None = Header(None, alias="Last-Event-ID", description="Resume after this cursor."),
    principal: Principal = Depends(authenticate_request),
) -> StreamingResponse:
    """Stream ``topic`` as Server-Sent Events; resumable with ``Last-Event-ID`` (see the module doc)."""
    require_scope(principal, f"subscribe:{topic}")
    state = request.app.state
    api = state.api_settings
    cursor = None
    if last_event_id is None:
        last_event_id = request.query_params.get("last_event_id")
    if last_event_id:
        try:
            cursor = parse_cursor(last_event_id)
        except ValueError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, detail={"message": str(exc)}) from exc
    if from_ not in ("beginning", "latest"):
        try:
            parse_time(from_)
        except ValueError as exc:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                detail={"message": f"from={from_!r} is not beginning, latest or an ISO 8601 time"},
            ) from exc
    try:
        n = await run_in_threadpool(state.topics.partitions, topic)
    except BrokerUnavailableError as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail={"message": str(exc)},
            headers={"Retry-After": str(api.retry_after_seconds)},
        ) from exc  # fmt: skip
    if n is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail={"message": f"topic {topic!r} does not exist"})
    if cursor is not None and any(p >= n for p in cursor):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, detail={"message": f"cursor names a partition {topic!r} lacks"}
        )
    starts = await run_in_threadpool(_resolve_starts, state.settings.kafka, topic, n, from_, cursor)
    return StreamingResponse(
        _stream(request, topic, starts, limit),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(request: Request, topic: str, starts: dict[int, int], limit: int) -> AsyncIterator[bytes]:
    state = request.app.state
    api = state.api_settings
    st = StreamState(topic=topic, capacity=api.sse_buffer_events)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    pump = _Pump(state.settings.kafka, state.serde, topic, starts, st, loop, queue)
    # Known positions: concrete start offsets now; logical ones (beginning/end) once a record or EOF shows them.
    positions = {p: o for p, o in starts.items() if o >= 0}
    state.sse_streams.add(st)
    pump.start()
    sent = 0
    try:
        yield f": subscribed to {topic}, {len(starts)} partition(s)\nretry: 2000\n\n".encode()
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), api.sse_heartbeat_seconds)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if isinstance(item, Exception):
                yield f"event: backbone.error\ndata: {json.dumps({'message': str(item)})}\n\n".encode()
                return
            with st.lock:
                st.buffered -= 1
                if st.buffered <= st.capacity // 2:
                    st.space.set()
            if isinstance(item, tuple):  # ("eof", partition, high watermark)
                _, p, hw = item
                positions.setdefault(p, hw)
                continue
            positions[item.partition] = item.offset + 1
            cursor = format_cursor(positions)
            if isinstance(item, DecodeFailure):
                yield _sse("backbone.undecodable", {"topic": item.topic, "partition": item.partition,
                                                    "offset": item.offset, "reason": item.reason}, cursor)  # fmt: skip
            else:
                assert isinstance(item, ConsumedEvent)
                yield _sse(item.attributes.type, item.as_json(), cursor)
            sent += 1
            st.sent = sent
            if limit and sent >= limit:
                return
    finally:
        pump.stop.set()
        st.space.set()
        state.sse_streams.discard(st)
        await asyncio.to_thread(pump.join, 5)
