"""Size and cost of the healer's state (``Healer.snapshot()``) on the real agent runs of ``../shared/data/agent_runs``.

The runs' events are fed in event-time order (:func:`processors.healing.evaluation.merged_events`) to a
healer with the default thresholds; after every event the state is dumped as the worker stores it (the
table value: sorted compact JSON, zlib level 1). Reported: events, decisions, the JSON and stored sizes
(final, median, p99, max, in bytes), the bytes of each part in the final state, and the time of one
dump (snapshot + JSON + zlib, in ms). For scale, the JSON size of all the decisions made is given too
(the state cannot be rebuilt from them: it holds the windows' buckets of calls, not only their outcomes).

``--steady SECONDS`` measures instead the rollback monitor's part alone under a steady synthetic load
(the part whose windows are longest): ``--rate`` calls/s of event time for SECONDS over ``--pairs``
provider/model pairs (8 providers, 5 agents, so each call touches a provider, a model and an agent, as
the background of ``bench_heal_latency`` does), 1 % failures, lognormal latencies (median 1,100 ms) and
costs (median 0.0009 USD), default thresholds, the watermark advanced every second. Reported every
``--every-seconds`` of event time: the part's JSON bytes (sorted compact), zlib level 1 bytes, and the
time to dump and serialise it (ms).

Usage::

    python -m bench.bench_healer_state          # the table
    python -m bench.bench_healer_state --json
    python -m bench.bench_healer_state --steady 1500 --rate 1000
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


def run_steady(
    seconds: int, rate: int = 1000, pairs: int = 40, every_seconds: int = 100
) -> list[dict[str, Any]]:
    """The rollback monitor's state under a steady load (see the module docstring).

    Returns:
        ``[{"t_s", "calls", "json_bytes", "zlib_bytes", "dump_ms"}, ...]``, one row every ``every_seconds``
        of event time and one at the end.
    """
    import random
    from datetime import UTC, datetime

    from configuration.schemas import HealingThresholds
    from processors.healing.rollback import RollbackMonitor

    rng = random.Random(7)
    providers = [f"prov-{i}" for i in range(8)]
    comps = [
        [f"provider:{providers[p % 8]}", f"model:model-{p}", f"agent:agent-{p % 5}"] for p in range(pairs)
    ]
    lat = [rng.lognormvariate(7.0, 0.6) for _ in range(4099)]
    cost = [rng.lognormvariate(-7.0, 0.8) for _ in range(4091)]
    pick = [rng.randrange(pairs) for _ in range(4093)]
    m = RollbackMonitor(HealingThresholds())
    t0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    rows: list[dict[str, Any]] = []
    n = 0
    for sec in range(seconds):
        m.advance(t0 + sec)
        for i in range(rate):
            m.on_call(comps[pick[n % 4093]], t0 + sec + i / rate, n % 100 != 0, lat[n % 4099], cost[n % 4091])
            n += 1
        if (sec + 1) % every_seconds == 0 or sec == seconds - 1:
            t = time.perf_counter()
            raw = json.dumps(m.dump_state(), sort_keys=True, separators=(",", ":")).encode()
            ms = (time.perf_counter() - t) * 1000
            rows.append({"t_s": sec + 1, "calls": n, "json_bytes": len(raw), "zlib_bytes": len(zlib.compress(raw, 1)),
                         "dump_ms": round(ms, 1)})  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_healer_state", description=__doc__)
    ap.add_argument("--every", type=int, default=1, help="measure after every N-th event")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--steady",
        type=int,
        default=0,
        metavar="SECONDS",
        help="the rollback monitor under a steady load instead",
    )
    ap.add_argument("--rate", type=int, default=1000, help="--steady: calls per second of event time")
    ap.add_argument("--pairs", type=int, default=40, help="--steady: provider/model pairs")
    ap.add_argument(
        "--every-seconds", type=int, default=100, help="--steady: a row every N seconds of event time"
    )
    args = ap.parse_args(argv)
    if args.steady:
        rows = run_steady(args.steady, args.rate, args.pairs, args.every_seconds)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(
                f"rollback monitor, {args.rate} calls/s over {args.pairs} provider/model pairs (default thresholds)"
            )
            for r in rows:
                print(f"  t {r['t_s']:>6} s  calls {r['calls']:>9}  JSON {r['json_bytes']:>10} B  zlib {r['zlib_bytes']:>9} B"
                      f"  dump {r['dump_ms']:>8} ms")  # fmt: skip
        return 0
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
