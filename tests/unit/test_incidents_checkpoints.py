"""The incident worker's correlate stage and its state table (no broker: a dict for the table, fake topics):
checkpoints hold the merged offset with the engine's state; a shell that recovers from them after a crash skips
the merged messages at or below that offset (replayed) and, de-duplicated by insight id, sends what one
uninterrupted shell sends; a commit waits for a written checkpoint; a state of another format crashes the app."""

from __future__ import annotations

import asyncio
import json
import zlib
from types import SimpleNamespace
from typing import Any

import pytest

from core.settings import Settings
from processors.incidents import app as incidents_app
from processors.incidents.app import STATE_FORMAT, STATE_KEY, IncidentTopics, _IncidentShell, pack_bodies
from processors.incidents.incident import IncidentEngine, SnapshotError
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde
from tests.fakes.faust_topic import AckedTopic
from tests.unit.test_incidents_state import _inputs

MERGED = "app-telemetry-repartition"


def _messages() -> tuple[list[SimpleNamespace], list[str]]:
    """The slice's merged messages (200 bodies each, as the input stage packs them) and the declared sources."""
    rows, sources = _inputs()
    bodies = [{"kind": k, "source": src, "drained": d, "record": r} for k, r, src, d in rows]
    packed = [p for i in range(0, len(bodies), 200) for p, _ in pack_bodies(bodies[i : i + 200], 1 << 30)]
    return [SimpleNamespace(topic=MERGED, partition=0, offset=i, key=b"telemetry", value=v, headers=[])
            for i, v in enumerate(packed)], sources  # fmt: skip


class _App(SimpleNamespace):
    crashed: list[BaseException]

    async def crash(self, exc: BaseException) -> None:
        self.crashed.append(exc)


def _shell(
    table: dict[str, Any], sources: list[str], app: _App | None = None
) -> tuple[_IncidentShell, AckedTopic]:
    insights = AckedTopic()
    shell = _IncidentShell(
        Settings(), IncidentTopics(), AvroSerde(EmbeddedRegistry()), IncidentEngine(sources=sources),
        {"merged": AckedTopic(), "insights": insights}, table=table, app=app or _App(crashed=[]),
        merged_key=f"{MERGED}:0", sources=sources,
    )  # fmt: skip
    shell.checkpoints.every_records = 1500  # bodies
    return shell, insights


def _said(shell: _IncidentShell, insights: AckedTopic) -> list[tuple[Any, ...]]:
    out = []
    for sent in insights.sent:
        _, data = shell.serde.decode(sent["value"])
        out.append((data["insight_id"], data["kind"], data["event_time"], data["labels"]["candidates"]))
    return out


async def _feed(shell: _IncidentShell, messages: list[SimpleNamespace]) -> list[asyncio.Future[None] | None]:
    futures = []
    for i in range(0, len(messages), 3):  # batches of three merged messages
        futures.append(await shell.handle_merged_batch(messages[i : i + 3]))
    return futures


@pytest.mark.parametrize("part_bytes", [1 << 30, 20_000], ids=["whole", "in-parts"])
def test_a_recovered_shell_skips_what_its_state_holds_and_sends_the_uninterrupted_insights(
    part_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # states above it are written in parts, then a head naming them (on the slice: up to about 900 KB)
    monkeypatch.setattr(incidents_app, "STATE_PART_BYTES", part_bytes)
    messages, sources = _messages()
    kill_at = len(messages) * 2 // 3

    async def scenario() -> tuple[list[Any], list[Any], list[Any], _IncidentShell]:
        alone, alone_insights = _shell({}, sources)
        await _feed(alone, messages)
        table: dict[str, Any] = {}
        first, first_insights = _shell(table, sources)
        await first.recovered()  # an empty table: the initial engine
        futures = await _feed(first, messages[:kill_at])  # then a crash: no final checkpoint
        assert any(f is not None and f.done() for f in futures) and not futures[-1].done()  # type: ignore[union-attr]
        head = table[STATE_KEY]
        parts = sorted(k for k in table if k != STATE_KEY)
        if part_bytes == 1 << 30:
            assert not parts
        else:  # only the parts of the last write are kept, in the order the head names them
            assert head.startswith(b"parts:") and len(parts) > 1
            named = json.loads(head[len(b"parts:") :])["parts"]
            assert sorted(named) == parts
            head = b"".join(table[k] for k in named)
        stored = json.loads(zlib.decompress(head))
        assert stored["format"] == STATE_FORMAT and 0 <= stored["offsets"][f"{MERGED}:0"] < kill_at - 1
        second, second_insights = _shell(table, sources)
        await second.recovered()
        assert second.stats.restored and second.offset == stored["offsets"][f"{MERGED}:0"]
        await _feed(second, messages)  # read again from the start: what the state holds is skipped
        assert second.stats.replayed_count == stored["offsets"][f"{MERGED}:0"] + 1  # messages 0..offset
        return (
            _said(alone, alone_insights),
            _said(first, first_insights),
            _said(second, second_insights),
            second,
        )

    alone, first, second, shell = asyncio.run(scenario())
    assert alone and {i[1] for i in alone} >= {"incident.opened", "incident.closed"}
    deduplicated = list({i[0]: i for i in first + second}.values())
    assert sorted(deduplicated) == sorted(alone)
    assert len(first) + len(second) >= len(alone)
    assert shell.stats.state_writes_count >= 1 and shell.stats.state_bytes_max > 0


def test_a_state_of_another_format_crashes_the_app() -> None:
    app = _App(crashed=[])
    raw = zlib.compress(json.dumps({"format": 99, "offsets": {}, "engine": {}}).encode())
    shell, _ = _shell({STATE_KEY: raw}, [], app)
    with pytest.raises(SnapshotError, match="format 99"):
        asyncio.run(shell.recovered())
    assert len(app.crashed) == 1
    engine_99 = zlib.compress(
        json.dumps({"format": STATE_FORMAT, "offsets": {}, "engine": {"format": 99}}).encode()
    )
    shell, _ = _shell({STATE_KEY: engine_99}, [], app)
    with pytest.raises(SnapshotError, match="engine snapshot format 99"):
        asyncio.run(shell.recovered())
