"""processors.shell.InOrderAcks: events acked in their order once their outputs were delivered (plain
asyncio futures stand in for the producer's delivery futures; the acks are the stream's in the agents)."""

from __future__ import annotations

import asyncio

import pytest

from processors.shell import InOrderAcks


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
