"""StackInfo, stack.json and resolve_settings, without starting any server."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from backbone.devstack import StackInfo, read_stack, resolve_settings, stack_file
from core.settings import KafkaSettings, PostgresSettings, RedisSettings, Settings


def _info(state_dir: Path, pid: int, **changes: object) -> StackInfo:
    fields: dict[str, object] = {
        "kafka_bootstrap": "127.0.0.1:19092",
        "postgres_url": "postgresql://postgres@127.0.0.1:15432/backbone",
        "redis_url": "redis://127.0.0.1:16379/0",
        "started_at": datetime.now(UTC),
        "pids": {"kafka": pid, "postgres": pid, "redis": pid},
        "embedded": {"kafka": True, "postgres": True, "redis": True},
        "state_dir": state_dir,
    }
    fields.update(changes)
    return StackInfo(**fields)  # type: ignore[arg-type]


def _empty(state_dir: Path) -> Settings:
    return Settings(
        kafka=KafkaSettings(), postgres=PostgresSettings(), redis=RedisSettings(), state_dir=state_dir
    )


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(proc.stdout)


def test_stack_info_round_trips_through_json(tmp_path: Path) -> None:
    """to_json and from_json give back an equal StackInfo, with an aware started_at."""
    info = _info(tmp_path, 4242, started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    again = StackInfo.from_json(info.to_json())
    assert again == info
    assert again.started_at.utcoffset() == timedelta(0)


def test_stack_info_refuses_a_naive_started_at(tmp_path: Path) -> None:
    """A started_at without UTC offset is refused with ValueError."""
    data = _info(tmp_path, 1).to_dict()
    data["started_at"] = "2026-01-02T03:04:05"
    with pytest.raises(ValueError, match="UTC offset"):
        StackInfo.from_dict(data)


def test_read_stack_returns_a_stack_whose_processes_run(tmp_path: Path) -> None:
    """read_stack returns the recorded stack while its pids are alive (here: this process)."""
    info = _info(tmp_path, os.getpid(), started_at=datetime.now(UTC) + timedelta(seconds=5))
    stack_file(tmp_path).write_text(info.to_json())
    assert read_stack(tmp_path) == info


def test_read_stack_removes_a_stale_file(tmp_path: Path) -> None:
    """A stack.json whose processes have all exited is removed and read_stack returns None."""
    stack_file(tmp_path).write_text(_info(tmp_path, _dead_pid()).to_json())
    assert read_stack(tmp_path) is None
    assert not stack_file(tmp_path).exists()


def test_read_stack_ignores_a_reused_pid(tmp_path: Path) -> None:
    """A pid created after the stack started belongs to another process, so the stack is not running."""
    info = _info(tmp_path, os.getpid(), started_at=datetime(2000, 1, 1, tzinfo=UTC))
    stack_file(tmp_path).write_text(info.to_json())
    assert read_stack(tmp_path) is None


def test_resolve_settings_without_stack_returns_settings_unchanged(tmp_path: Path) -> None:
    """With no stack.json the settings come back as they were."""
    settings = _empty(tmp_path)
    assert resolve_settings(settings) is settings


def test_resolve_settings_fills_empty_and_keeps_configured(tmp_path: Path) -> None:
    """Empty URLs are filled from stack.json, configured ones win, redacted ones are not used."""
    future = datetime.now(UTC) + timedelta(seconds=5)
    info = _info(tmp_path, os.getpid(), started_at=future, postgres_url="postgresql://app:***@db:5432/x")
    stack_file(tmp_path).write_text(info.to_json())
    settings = Settings(
        kafka=KafkaSettings(),
        postgres=PostgresSettings(),
        redis=RedisSettings(url=SecretStr("redis://mine:6379/3")),
        state_dir=tmp_path,
    )
    resolved = resolve_settings(settings)
    assert resolved.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert resolved.redis.dsn() == "redis://mine:6379/3"
    assert resolved.postgres.url is None
    assert resolved.kafka.session_timeout_ms == settings.kafka.session_timeout_ms
