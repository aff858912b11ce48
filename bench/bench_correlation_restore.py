"""Restoring the correlation worker's scopes from its table after an assignment, against one scan per scope.

After a rebalance or a restart the worker rebuilds each scope's correlator from the table's items of the
scope (:class:`processors.correlation.app._CorrelationShell`), and the first progress marker rebuilds
every scope of its partition at once. This builds a Faust table on the memory store (what the worker's
table is after recovery) with ``S`` scopes of ``k`` items each (``k - 1`` messages and commits and the
scope's ``#progress``), then times restoring every scope, alternating, with:

* ``one scan`` (the worker since 2026-12-07): the first restore indexes the table by scope in one scan,
  each scope takes its bucket;
* ``scan per scope`` (the baseline, the worker before): each scope's restore scans the whole table for
  its keys, O(S x N) for N items.

Both rebuild the same correlators (checked: the same observations per scope). Prints, per size, the best
and median seconds of the rounds and the baseline's median as a multiple of the index's. CPU-bound, no
broker.

Usage::

    python -m bench.bench_correlation_restore [--scopes 10,100,1000] [--items 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faust

from core.observability import configure_logging
from core.settings import Settings
from processors.correlation.app import PROGRESS_ENTITY, CorrelationTopics, _CorrelationShell
from processors.correlation.logic import CorrelationConfig, Observation
from processors.correlation.masked import MaskedConfig
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde

__all__ = ["main", "time_restores"]

T0 = datetime(2030, 5, 4, 12, 0, tzinfo=UTC)


class _ScanPerScope(_CorrelationShell):
    """The baseline: a scope's items found by scanning the whole table each time (the code before)."""

    def _scope_items(self, scope: str) -> list[tuple[bytes, Any]]:
        prefix = f"{scope}|".encode()
        out = []
        for key, value in self.table.data.items():
            raw_key = key if isinstance(key, bytes) else str(key).encode()
            if raw_key.startswith(prefix):
                out.append((raw_key, value))
        return out


def _table(app: faust.App, scopes: int, items: int) -> faust.Table[bytes, dict[str, Any]]:
    table: faust.Table[bytes, dict[str, Any]] = faust.Table(app, name="items", default=dict, key_type=bytes)
    for s in range(scopes):
        scope = f"ws{s}"
        for i in range(items - 1):
            kind: Literal["message", "commit"] = "commit" if i % 3 == 0 else "message"
            entity = f"git:{scope}/repo@{i:040x}" if kind == "commit" else f"slack:{scope}/dev/{i}"
            obs = Observation(entity=entity, kind=kind, event_time=T0 + timedelta(hours=i), event_id=f"id-{s}-{i}",
                              text=f"words {i} of scope {s}", repo=f"{scope}/repo", sha=entity[-40:] if kind == "commit" else None,
                              pr_number=None, refs=(), actor="Ann", thread=None)  # fmt: skip
            table.data[f"{scope}|{entity}".encode()] = {"obs": obs.to_dict(), "source": "external.events/0"}
        table.data[f"{scope}|{PROGRESS_ENTITY}".encode()] = {
            "progress": {"external.events/0": int((T0 + timedelta(days=2)).timestamp() * 1000)},
            "watermark": int((T0 + timedelta(days=2)).timestamp() * 1000), "partition": s % 3, "idle": [],
        }  # fmt: skip
    return table


def _restore_all(shell_type: type[_CorrelationShell], table: Any, scopes: int) -> tuple[float, list[int]]:
    config = CorrelationConfig(discussion=MaskedConfig(min_history=0))
    shell = shell_type(Settings(), CorrelationTopics(events_partitions=1), config, AvroSerde(EmbeddedRegistry()),
                       table, {}, request_embeddings=False)  # fmt: skip
    start = time.perf_counter()
    for partition in range(3):
        shell._adopt_quiet_scopes(partition)
    sizes = [len(shell._correlator(f"ws{s}", s % 3)) for s in range(scopes)]
    return time.perf_counter() - start, sizes


def time_restores(scope_counts: list[int], items: int, rounds: int) -> dict[int, dict[str, list[float]]]:
    """Seconds to restore every scope, per scope count, for the index and the baseline (alternating)."""
    app = faust.App("bench-correlation-restore", broker="kafka://127.0.0.1:1", store="memory://")
    out: dict[int, dict[str, list[float]]] = {}
    _restore_all(_CorrelationShell, _table(app, 1, items), 1)  # warm-up: scikit-learn's analyzer imported
    for scopes in scope_counts:
        table = _table(app, scopes, items)
        times: dict[str, list[float]] = {"one scan": [], "scan per scope": []}
        for _ in range(rounds):
            new, new_sizes = _restore_all(_CorrelationShell, table, scopes)
            old, old_sizes = _restore_all(_ScanPerScope, table, scopes)
            assert new_sizes == old_sizes == [items - 1] * scopes, (new_sizes[:3], old_sizes[:3])
            times["one scan"].append(new)
            times["scan per scope"].append(old)
        out[scopes] = times
    return out


def main(argv: list[str] | None = None) -> dict[int, dict[str, list[float]]]:
    """Time the restores and print the table; return the seconds by scope count and method."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--scopes", default="10,100,1000", help="scope counts, comma-separated (10,100,1000)")
    ap.add_argument("--items", type=int, default=20, help="table items per scope, #progress included (20)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each, alternating (3)")
    args = ap.parse_args(argv)
    configure_logging("WARNING", "auto")  # not a line per scope restored
    from rich.console import Console
    from rich.table import Table

    counts = [int(x) for x in args.scopes.split(",") if x]
    seconds = time_restores(counts, args.items, args.rounds)
    table = Table(
        title=f"Restoring every scope of a table, {args.items} items a scope, {args.rounds} rounds alternating"
    )
    for column in (
        "scopes",
        "items",
        "one scan: best / median s",
        "scan per scope: best / median s",
        "baseline / index",
    ):
        table.add_column(column, justify="right")
    for scopes, times in seconds.items():
        new, old = times["one scan"], times["scan per scope"]
        table.add_row(f"{scopes:,}", f"{scopes * args.items:,}", f"{min(new):.3f} / {statistics.median(new):.3f}",
                      f"{min(old):.3f} / {statistics.median(old):.3f}",
                      f"{statistics.median(old) / statistics.median(new):.1f}x")  # fmt: skip
    Console().print(table)
    return seconds


if __name__ == "__main__":
    main()
