"""``make bench`` / ``python -m bench``: every benchmark, each against its baseline, in one run.

Figures are ratios to a baseline measured in the same run on the same machine (which is shared and
noisy). Pass ``--quick`` for smaller sizes. A benchmark whose optional dependencies are missing (the
``inference`` extra) is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

BENCHES = [
    ("bench.bench_producer", ["--events", "100000"], ["--events", "20000"]),
    ("bench.bench_projections", [], ["--events", "100000"]),
    ("bench.bench_config", [], []),
    ("bench.bench_ingest", ["--ab"], ["--ab"]),
    ("bench.bench_inference", [], []),
    ("bench.bench_correlation", [], []),
    ("bench.bench_correlation_worker", [], []),  # the Racket year either way (skipped without the data)
    ("bench.bench_correlation_restore", [], ["--scopes", "10,100", "--rounds", "2"]),
    ("bench.bench_routing", [], []),
    ("bench.bench_healer_state", [], ["--every", "50"]),
    ("bench.bench_processors", ["--events", "60000"], ["--events", "20000"]),
    ("bench.bench_incidents", [], []),  # the whole Nezha day either way (skipped without the data)
    ("bench.bench_policy_router", ["--requests", "5000"], ["--requests", "1000"]),
    (
        "bench.bench_latency",
        ["--seconds", "15", "--rates", "100,1000,5000"],
        ["--seconds", "4", "--rates", "100,1000"],
    ),
    (
        "bench.bench_route_latency",
        ["--seconds", "15", "--rates", "100,500"],
        ["--seconds", "4", "--rates", "100,500"],
    ),
    ("bench.bench_heal_latency", ["--seconds", "15"], ["--seconds", "6"]),
    ("bench.bench_cli", [], ["--rounds", "3"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--only", nargs="*", help="module names to run, e.g. bench_producer")
    args = ap.parse_args()
    failed = []
    for module, full, quick in BENCHES:
        if args.only and module.split(".")[-1] not in args.only:
            continue
        print(f"\n=== {module}", flush=True)
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            print(f"skipped: {exc}")
            continue
        try:
            mod.main(quick if args.quick else full)
        except SystemExit as exc:
            if exc.code not in (0, None):
                failed.append(module)
        except Exception:  # noqa: BLE001 - report and go on with the others
            traceback.print_exc()
            failed.append(module)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
