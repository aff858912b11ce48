"""The public client (:class:`backbone.client.Client`) against real Tansu and PostgreSQL, and the README's
Python block run as a user would."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from backbone.client import Client
from core.settings import PostgresSettings, Settings
from streams.consumer import ConsumedEvent
from streams.errors import SchemaValidationError

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CALL = {
    "run_id": "client-run",
    "step": 1,
    "event_time": "2025-11-19T01:00:00Z",
    "command": "pytest -x",
    "return_code": 1,
}


def test_produce_validates_then_acknowledges_and_replay_and_subscribe_read_it(
    settings: Settings, create_topic, unique_name
) -> None:
    topic = create_topic(unique_name("client"), 3)
    with Client(settings) as bb:
        with pytest.raises(SchemaValidationError, match="datum 1") as info:
            bb.produce(topic, "sophia.agent.ToolCall", [CALL, {**CALL, "step": "two"}])
        assert info.value.field == "step"
        ids = bb.produce(topic, "sophia.agent.ToolCall", [CALL, {**CALL, "step": 2}], key_field="run_id")
        assert len(ids) == 2
        replayed = [r for r in bb.replay(topic) if isinstance(r, ConsumedEvent)]
        assert sorted(r.attributes.id for r in replayed) == sorted(
            ids
        )  # nothing of the refused batch was sent
        assert {r.key for r in replayed} == {"client-run"}
        assert sorted(r.data["step"] for r in replayed) == [1, 2]
        seen = [r.attributes.id for r in bb.subscribe([topic], start="beginning", limit=2)]
        assert sorted(seen) == sorted(ids)

        async def first_two() -> list[str]:
            out = []
            async for r in bb.asubscribe([topic], start="beginning", limit=2):
                out.append(r.attributes.id)
            return out

        assert sorted(asyncio.run(first_two())) == sorted(ids)


def test_config_current_history_and_rollback(settings: Settings, pg_url: str) -> None:
    s = settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(pg_url))})
    bb = Client(s)
    from configuration.store import ConfigStore

    store = ConfigStore(s)
    try:
        store.set("demo.client.setting", {"model": "a"}, author="alice", reason="first")
        store.set("demo.client.setting", {"model": "b"}, author="bob", reason="second")
    finally:
        store.close()
    assert bb.config("demo.client.setting")["value"] == {"model": "b"}
    assert [v["version"] for v in bb.config_history("demo.client.setting")] == [1, 2]
    back = bb.rollback("demo.client.setting", to_version=1, author="carol", reason="b broke things")
    assert back["version"] == 3 and back["value"] == {"model": "a"}
    assert bb.config("demo.client.setting", version=2)["value"] == {"model": "b"}
    with pytest.raises(ValueError, match="unknown projection"):
        bb.query("nope")


def test_readme_python_block_runs(settings: Settings, create_topic, unique_name) -> None:
    """The README's Python block, on a topic of its own, prints what it produced."""
    block = re.search(r"```python client\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert block, "README has no ```python client block"
    topic = create_topic(unique_name("readme-client"), 3)
    code = block.group(1).replace('"agent.events"', repr(topic))
    env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
           "BACKBONE_STATE_DIR": str(settings.state_dir)}  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "produced 1 event(s)" in r.stdout and "pytest -x" in r.stdout, r.stdout
