"""processors.shell.InOrderAcks: events acked in their order once their outputs were delivered (plain
asyncio futures stand in for the producer's delivery futures; the acks are the stream's in the agents)."""

from __future__ import annotations

import asyncio

import pytest

from processors.shell import InOrderAcks, stream_has_more


def test_events_are_acked_in_order_once_delivered() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        acked: list[str] = []
        delivered: list[str] = []

        async def ack(event: str) -> None:
            acked.append(event)

        acks = InOrderAcks(ack, max_inflight=10, on_delivered=lambda item: delivered.append(item))
        first, second = loop.create_future(), loop.create_future()
        acks.add(first, "e1", "i1")
        acks.add(None, "e2")  # nothing to wait for, but behind e1
        acks.add(second, "e3", "i3")
        await acks.settle()
        assert acked == []  # e1's output is not delivered: nothing passes it
        second.set_result(None)
        await acks.settle()
        assert acked == []
        first.set_result(None)
        await asyncio.gather(acks.settle(), acks.settle())  # the agent and the timer at once
        assert acked == ["e1", "e2", "e3"] and delivered == ["i1", None, "i3"]

    asyncio.run(scenario())


def test_settle_waits_for_the_oldest_beyond_max_inflight_and_raises_a_failed_delivery() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        acked: list[str] = []

        async def ack(event: str) -> None:
            acked.append(event)

        acks = InOrderAcks(ack, max_inflight=1)
        slow = loop.create_future()
        loop.call_later(0.05, slow.set_result, None)
        acks.add(slow, "e1")
        acks.add(None, "e2")
        await acks.settle()  # two queued > 1: waits for e1's delivery
        assert acked == ["e1", "e2"]
        failed = loop.create_future()
        failed.set_exception(RuntimeError("broker refused"))
        acks.add(failed, "e3")
        acks.add(None, "e4")
        with pytest.raises(RuntimeError, match="broker refused"):
            await acks.settle()
        assert acked == ["e1", "e2"]  # e3 and what follows stay unacked (read again after a restart)

    asyncio.run(scenario())


def test_stream_has_more_reads_the_iterated_channels_queue() -> None:
    """True only while the stream's channel is the iterated one (``is_iterator``) and its queue holds a
    received event; a stream over anything else reads as having none (its batches end at each event)."""
    from types import SimpleNamespace

    class _Channel:
        def __init__(self, is_iterator: bool, queued: int) -> None:
            self.is_iterator, self.queued = is_iterator, queued

        def empty(self) -> bool:
            return self.queued == 0

    assert stream_has_more(SimpleNamespace(channel=_Channel(True, 2))) is True  # type: ignore[arg-type]
    assert stream_has_more(SimpleNamespace(channel=_Channel(True, 0))) is False  # type: ignore[arg-type]
    assert stream_has_more(SimpleNamespace(channel=_Channel(False, 2))) is False  # type: ignore[arg-type]
    assert stream_has_more(SimpleNamespace(channel=None)) is False  # type: ignore[arg-type]


class _QueueStream:
    """A stand-in for an agent's stream: events from an asyncio queue (None ends it), its channel reading
    that queue (``stream_has_more``), ``noack()`` itself, acks recorded."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.channel = SimpleNamespace(is_iterator=True, empty=self.queue.empty)
        self.acked: list[str] = []

    def noack(self) -> _QueueStream:
        return self

    async def ack(self, event: str) -> None:
        self.acked.append(event)

    async def events(self):  # type: ignore[no-untyped-def]
        while (event := await self.queue.get()) is not None:
            yield event


@pytest.mark.parametrize(("max_batch", "expected"), [(10, [["a", "b", "c", "d"], ["e", "f"]]),
                                                     (3, [["a", "b", "c"], ["d"], ["e", "f"]])])  # fmt: skip
def test_consume_batches_hands_over_what_arrived_and_acks_in_order(
    max_batch: int, expected: list[list[str]]
) -> None:
    """A batch takes the events already received and those arriving within ``wait_seconds`` (at most
    ``max_batch``); a later event starts the next batch; every event is acked in order once the future
    ``handle`` returned for it is done (None: at once)."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        stream = _QueueStream()
        batches: list[list[str]] = []
        checkpoints: list[asyncio.Future[None]] = []

        async def handle(events: list[str]) -> list[tuple[asyncio.Future[None] | None, None]]:
            batches.append(list(events))
            done = loop.create_future()
            checkpoints.append(done)
            return [(None if e == "b" else done, None) for e in events]

        for e in ("a", "b", "c"):
            stream.queue.put_nowait(e)
        loop.call_later(0.005, stream.queue.put_nowait, "d")  # within wait_seconds of "c"
        loop.call_later(0.3, stream.queue.put_nowait, "e")  # long after: the next batch
        loop.call_later(0.3, stream.queue.put_nowait, "f")
        loop.call_later(0.6, stream.queue.put_nowait, None)
        acks = InOrderAcks(max_inflight=100)
        task = asyncio.create_task(
            acks.consume_batches(stream, handle, max_batch=max_batch, wait_seconds=0.1)
        )  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        assert stream.acked == []  # the first batch's futures are not done
        checkpoints[0].set_result(None)
        await asyncio.sleep(0.2)  # "e" and "f" arrive; their batch settles what is done
        await task
        assert batches == expected
        for done in checkpoints:
            if not done.done():
                done.set_result(None)
        await acks.settle()
        assert stream.acked == ["a", "b", "c", "d", "e", "f"]

    asyncio.run(scenario())
