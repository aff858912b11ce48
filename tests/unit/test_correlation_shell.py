"""The correlation worker's shell without a broker: restoring scopes from its table (a Faust table on the
memory store, as the worker's is rebuilt from its changelog)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

import faust

from core.settings import Settings
from processors.correlation.app import PROGRESS_ENTITY, CorrelationTopics, _CorrelationShell
from processors.correlation.logic import CorrelationConfig, Observation
from processors.correlation.masked import MaskedConfig
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde

T0 = datetime(2030, 5, 4, 12, 0, tzinfo=UTC)


def _obs(entity: str, kind: Literal["message", "commit"], at: datetime, text: str) -> dict[str, object]:
    sha = entity.rsplit("@", 1)[-1] if kind == "commit" else None
    obs = Observation(entity=entity, kind=kind, event_time=at, event_id=f"id-{entity}", text=text,
                      repo="acme/widget", sha=sha, pr_number=None, refs=(), actor="Ann", thread=None)  # fmt: skip
    return {"obs": obs.to_dict(), "source": "external.events/0"}


def test_scopes_are_restored_from_one_scan_of_the_table_each_with_its_own_items() -> None:
    """Three scopes' items (and acme's persisted progress on repartition partition 1): the quiet scope is
    adopted from its progress, and each scope's correlator is rebuilt with exactly its own items, all from
    one scan (an item written after it belongs to a scope whose correlator exists, so it is not read)."""
    app = faust.App("test-correlation-shell", broker="kafka://127.0.0.1:1", store="memory://")
    table: faust.Table[bytes, dict[str, object]] = faust.Table(
        app, name="items", default=dict, key_type=bytes, partitions=3
    )
    config = CorrelationConfig(discussion=MaskedConfig(min_history=0))
    shell = _CorrelationShell(Settings(), CorrelationTopics(events_partitions=1), config,
                              AvroSerde(EmbeddedRegistry()), table, {}, request_embeddings=False)  # fmt: skip
    commit = "git:acme/widget@" + "1" * 40
    table.data[f"acme|{commit}".encode()] = _obs(commit, "commit", T0, "expander: fix local-expand")
    table.data[b"acme|slack:acme/dev/1"] = _obs(
        "slack:acme/dev/1", "message", T0 + timedelta(hours=1), "the fix"
    )
    table.data[b"acme2|slack:acme2/dev/1"] = _obs("slack:acme2/dev/1", "message", T0, "other words")
    table.data[f"acme|{PROGRESS_ENTITY}".encode()] = {
        "progress": {"external.events/0": int((T0 + timedelta(days=2)).timestamp() * 1000)},
        "watermark": int((T0 + timedelta(days=2)).timestamp() * 1000), "partition": 1, "idle": [],
    }  # fmt: skip
    shell._adopt_quiet_scopes(1)
    assert shell.scope_partitions == {"acme": 1}  # acme2 has no persisted progress: not adopted
    acme = shell._correlator("acme", 1)
    assert sorted(acme.observations) == sorted([commit, "slack:acme/dev/1"])
    assert acme.clock.watermark_ms == int((T0 + timedelta(days=2)).timestamp() * 1000)
    table.data[b"acme2|slack:acme2/dev/2"] = _obs("slack:acme2/dev/2", "message", T0, "written since")
    assert sorted(shell._correlator("acme2", 0).observations) == ["slack:acme2/dev/1"]  # from the one scan
    shell.forget()  # a rebalance: the next restore scans again
    assert sorted(shell._correlator("acme2", 0).observations) == ["slack:acme2/dev/1", "slack:acme2/dev/2"]
