"""Size and cost of the healer's state (``Healer.snapshot()``) on the real agent runs of ``../shared/data/agent_runs``.

The runs' events are fed in event-time order (:func:`processors.healing.evaluation.merged_events`) to a
healer with the default thresholds; after every event the state is dumped as the worker stores it (the
table value: sorted compact JSON, zlib level 1). Reported: events, decisions, the JSON and stored sizes
(final, median, p99, max, in bytes), the bytes of each part in the final state, and the time of one
dump (snapshot + JSON + zlib, in ms). For scale, the JSON size of all the decisions made is given too
(the state cannot be rebuilt from them: it holds the windows of calls, not only their outcomes).

Usage::

    python -m bench.bench_healer_state          # the table
    python -m bench.bench_healer_state --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any

from bench.common import ROOT

__all__ = ["main", "run_benchmark"]

DATA = ROOT.parent / "shared" / "data" / "agent_runs"


def _pct(xs: list[int], q: float) -> int:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


def run_benchmark(every: int = 1) -> dict[str, Any]:
    """Feed the runs and measure the state after every ``every``-th event.

    Raises:
        FileNotFoundError: the data folder is missing.
    """
    from processors.healing.evaluation import load_runs, merged_events
    from processors.healing.healer import Healer

    runs = load_runs(DATA)
    events = list(merged_events(runs))
    healer = Healer()
    json_sizes: list[int] = []
    stored_sizes: list[int] = []
    decisions_bytes = 0
    decisions = 0
    dump_seconds = 0.0
    for i, e in enumerate(events):
        out = healer.feed(e)
        decisions += len(out)
        decisions_bytes += sum(len(json.dumps(d.as_json(), default=str)) for d in out)
        if i % every and i != len(events) - 1:
            continue
        t = time.perf_counter()
        body = {"format": 1, "offsets": {"agent.events:0": i}, "healer": healer.snapshot()}
        raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        stored = zlib.compress(raw, 1)
        dump_seconds += time.perf_counter() - t
        json_sizes.append(len(raw))
        stored_sizes.append(len(stored))
    final = healer.snapshot()
    return {
        "runs": len(runs),
        "events": len(events),
        "decisions": decisions,
        "decisions_json_bytes": decisions_bytes,
        "json_bytes": {"final": json_sizes[-1], "median": _pct(json_sizes, 0.5), "p99": _pct(json_sizes, 0.99),
                       "max": max(json_sizes)},
        "stored_bytes": {"final": stored_sizes[-1], "median": _pct(stored_sizes, 0.5),
                         "p99": _pct(stored_sizes, 0.99), "max": max(stored_sizes)},
        "final_part_bytes": {k: len(json.dumps(v, separators=(",", ":"))) for k, v in final.items()
                             if isinstance(v, (dict, list))},
        "runs_in_state": len(final["health"]["runs"]),
        "circuits": len(final["breakers"]),
        "dump_ms": round(1000 * dump_seconds / len(json_sizes), 3),
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_healer_state", description=__doc__)
    ap.add_argument("--every", type=int, default=1, help="measure after every N-th event")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not (DATA / "results.csv").is_file():
        print(f"skipped: no agent runs at {DATA}")
        return 0
    r = run_benchmark(args.every)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(
        f"{r['runs']} runs, {r['events']} events, {r['decisions']} decisions ({r['decisions_json_bytes']} B as JSON)"
    )
    for kind in ("json_bytes", "stored_bytes"):
        v = r[kind]
        print(
            f"  state {kind:<12} final {v['final']:>8}  median {v['median']:>8}  p99 {v['p99']:>8}  max {v['max']:>8}"
        )
    print(f"  final parts (JSON bytes): {r['final_part_bytes']}")
    print(
        f"  runs kept {r['runs_in_state']}, circuits {r['circuits']}; one dump (snapshot+JSON+zlib) {r['dump_ms']} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
