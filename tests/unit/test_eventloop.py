"""core.eventloop: the event loop of the API server and the Faust workers (BACKBONE_EVENT_LOOP)."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import uvloop

from core import eventloop
from core.eventloop import event_loop_policy, resolve, uvicorn_options
from core.settings import Settings


def test_uvloop_is_the_default_and_asyncio_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BACKBONE_EVENT_LOOP", raising=False)
    assert Settings().event_loop == "uvloop"
    monkeypatch.setenv("BACKBONE_EVENT_LOOP", "asyncio")
    assert Settings().event_loop == "asyncio"
    monkeypatch.setenv("BACKBONE_EVENT_LOOP", "trio")
    with pytest.raises(ValueError):
        Settings()


def test_uvicorn_options_pair_the_loop_with_its_http_parser() -> None:
    assert uvicorn_options("uvloop") == {"loop": "uvloop", "http": "httptools"}
    assert uvicorn_options("asyncio") == {"loop": "asyncio", "http": "h11"}


def test_the_policy_makes_uvloop_loops_in_every_thread_and_is_restored() -> None:
    before = asyncio.get_event_loop_policy()
    with event_loop_policy("uvloop") as used:
        assert used == "uvloop"
        loop = asyncio.new_event_loop()  # what Faust's consumer thread calls
        try:
            assert isinstance(loop, uvloop.Loop)
        finally:
            loop.close()
    assert asyncio.get_event_loop_policy() is before
    with event_loop_policy("asyncio") as used:
        assert used == "asyncio"
        assert asyncio.get_event_loop_policy() is before


def test_uvloop_missing_falls_back_to_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        eventloop.importlib.util, "find_spec", lambda m: None if m == "httptools" else real(m)
    )
    assert resolve("uvloop") == "asyncio"
    assert uvicorn_options("uvloop") == {"loop": "asyncio", "http": "h11"}
    before = asyncio.get_event_loop_policy()
    with event_loop_policy("uvloop") as used:
        assert used == "asyncio"
        assert asyncio.get_event_loop_policy() is before
