"""The Faust app every processor runs (processors.shell.make_faust_app), without a broker: its table
manager opens the changelog channels and starts the recovery without Faust's one-second pause, and the
worker closes its stopped loop after a short sentinel instead of mode's second."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.settings import Settings
from processors.shell import SENTINEL_SECONDS, PromptTableManager, _Worker, make_faust_app


def test_the_table_manager_starts_the_recovery_at_once_and_the_worker_stops_its_loop_promptly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(state_dir=tmp_path, kafka={"bootstrap_servers": "127.0.0.1:1"})
    app = make_faust_app(settings, "test-prompt-tables", partitions=1, web_port=None)
    table = app.Table("counts", default=int)
    manager = app.tables
    assert isinstance(manager, PromptTableManager) and manager["counts"] is table
    steps: list[str] = []

    async def paused(seconds: float) -> None:
        raise AssertionError(f"paused {seconds} s")  # Faust's on_start sleeps 1 s here

    async def channels() -> None:  # Faust's own subscribes the changelog topics: it needs a broker
        steps.append("channels")

    class Recovery:
        async def start(self) -> None:
            steps.append("recovery")

    monkeypatch.setattr(manager, "sleep", paused)
    monkeypatch.setattr(manager, "_update_channels", channels)
    monkeypatch.setattr(manager, "_recovery", Recovery())  # the service behind ``manager.recovery``
    asyncio.run(manager.on_start())
    assert steps == ["channels", "recovery"]
    assert SENTINEL_SECONDS < 1.0 and _Worker._sentinel_task is not _Worker.__mro__[1]._sentinel_task
