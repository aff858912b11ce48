"""The event loop of the backbone's long-running processes: uvloop, with httptools as uvicorn's HTTP
parser (the default, ``BACKBONE_EVENT_LOOP=uvloop``), or the standard library's asyncio loop with h11
(``BACKBONE_EVENT_LOOP=asyncio``).

Measured on 2 shared cores (docs/ARCHITECTURE.md, "Event loop"; medians of alternating pairs): the API's
CPU per ingest request about 12 % lower (its event-loop thread's about 20 %), a bare FastAPI endpoint's
about 30 % lower (the HTTP gain is httptools', not uvloop's); CPU per record of a plain Faust agent about
15 % lower, of the run-summary worker about 10 %, of the healer about 8 %. Where uvloop or httptools cannot
be imported (uvloop has no Windows build), ``uvloop`` falls back to asyncio and h11 with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Literal, TypedDict

import structlog

__all__ = ["EventLoop", "UvicornLoop", "event_loop_policy", "resolve", "uvicorn_options"]

EventLoop = Literal["uvloop", "asyncio"]
"""The choices of ``Settings.event_loop``."""

log = structlog.get_logger(__name__)


class UvicornLoop(TypedDict):
    """uvicorn's ``loop`` and ``http`` arguments (``uvicorn.run(app, **options)``)."""

    loop: str
    http: str


def resolve(choice: EventLoop) -> EventLoop:
    """The loop that ``choice`` runs: ``choice``, or ``"asyncio"`` (with a warning logged) when ``"uvloop"``
    is asked for and uvloop or httptools is not installed."""
    if choice == "uvloop":
        missing = [m for m in ("uvloop", "httptools") if importlib.util.find_spec(m) is None]
        if missing:
            log.warning("event_loop_unavailable", asked="uvloop", used="asyncio", missing=missing)
            return "asyncio"
    return choice


def uvicorn_options(choice: EventLoop) -> UvicornLoop:
    """uvicorn's ``loop`` and ``http`` arguments for ``choice`` (after :func:`resolve`):
    ``{"loop": "uvloop", "http": "httptools"}`` or ``{"loop": "asyncio", "http": "h11"}``."""
    if resolve(choice) == "uvloop":
        return {"loop": "uvloop", "http": "httptools"}
    return {"loop": "asyncio", "http": "h11"}


@contextlib.contextmanager
def event_loop_policy(choice: EventLoop) -> Iterator[EventLoop]:
    """Within the block, asyncio makes ``choice``'s loops (after :func:`resolve`) in every thread: the
    process-wide event loop policy is uvloop's for ``"uvloop"`` and left as it is for ``"asyncio"``; the
    previous policy is restored on exit. Enter it before the loop is made (a Faust worker's loops, its
    consumer thread's included, are made when the worker starts). Yields the loop used."""
    used = resolve(choice)
    if used == "asyncio":
        yield used
        return
    import uvloop

    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield used
    finally:
        asyncio.set_event_loop_policy(previous)
