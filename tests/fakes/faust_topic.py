"""A stand-in for a Faust topic in unit tests of the processors' shells (no broker): ``send`` records its
keyword arguments and returns a delivery future already resolved, as Faust's ``Topic.send`` returns the
future of the producer's acknowledgement."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["AckedTopic"]


class AckedTopic:
    """A Faust topic whose ``send`` is acknowledged at once; ``sent`` holds each call's keyword arguments."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, **kw: Any) -> asyncio.Future[None]:
        self.sent.append(kw)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done
