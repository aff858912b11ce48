"""Route request -> decision latency of the policy router on the embedded stack (issue 13), against a bare
relay in the same run.

Run: ``python -m bench --only bench_route_latency [--quick]`` or ``python bench/bench_route_latency.py
[--seconds S] [--rates 100,500] [--json]``. It starts the embedded dev stack, stores a ``routing.config``
(four models over three providers, an A/B split of the ``cheapest`` and ``lowest_latency`` policies) in
the config store, and runs as child processes the policy router (``backbone routing policy-worker``, no
learner artifact, log level WARNING) and the bare relay of :mod:`bench.bench_latency`. For each offered
rate, each path in turn produces route requests at that rate (5 ms ticks, each flushed, ``acks=all``):
JSON :class:`processors.routing.policy.PolicyRequest` (key = request id, the real MMLU prompts of
``../shared/data/routing/mmlu`` in file order, event times 2 ms apart in send order) on ``routing.policy-requests``, and a
Kafka subscriber (assigned, no group, ``fetch.wait.max.ms`` 10) on ``routing.policy-decisions`` stamps
each decision's arrival. The baseline path sends the same bytes to the relay's input topic and times the
relayed record. Every request is a sample: ``sched`` (when the generator was due to send it), ``ack``
(when its tick's flush returned), ``decision`` (arrival at the subscriber). The ratio columns divide the
router's ack -> decision percentiles by the relay's at the same rate; ``seen/s`` is the decisions (or
relayed records) seen per second from the first send to the last one seen: the router's pace when it
falls behind. Diagnostics (the shared code unchanged; the setting changed in the worker process only):
``--worker-linger-ms`` and ``--worker-fetch-wait-ms`` (``processors.shell.PRODUCER_LINGER_SECONDS``, 5 ms,
and ``FETCH_MAX_WAIT_MS``, 100 ms, as shipped).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Producer

from bench.decision_latency import (
    Phase,
    Sample,
    Subscriber,
    Tracker,
    add_worker_options,
    backbone_command,
    create_topics,
    diagnostic_note,
    durations_ms,
    generate,
    print_rows,
    relay_command,
    stack,
    summarise,
    wait_done,
    worker_prelude,
)

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "routing" / "mmlu"
REQUESTS, DECISIONS = "routing.policy-requests", "routing.policy-decisions"
ROUTING_CONFIG = {
    "providers": {"openai": {"requests_per_minute": 10_000}, "anthropic": {"requests_per_minute": 10_000},
                  "mistral": {"requests_per_minute": 10_000}},
    "models": {
        "gpt-4o": {"provider": "openai", "capabilities": ["chat", "code"], "context_window_tokens": 128_000,
                   "usd_per_million_input_tokens": 2.5, "usd_per_million_output_tokens": 10.0, "latency_prior_ms": 900.0},
        "gpt-4o-mini": {"provider": "openai", "capabilities": ["chat"], "context_window_tokens": 128_000,
                        "usd_per_million_input_tokens": 0.15, "usd_per_million_output_tokens": 0.6, "latency_prior_ms": 500.0},
        "claude-sonnet": {"provider": "anthropic", "capabilities": ["chat", "code"], "context_window_tokens": 200_000,
                          "usd_per_million_input_tokens": 3.0, "usd_per_million_output_tokens": 15.0, "latency_prior_ms": 1100.0},
        "mistral-small": {"provider": "mistral", "capabilities": ["chat"], "context_window_tokens": 32_000,
                          "usd_per_million_input_tokens": 0.2, "usd_per_million_output_tokens": 0.6, "latency_prior_ms": 400.0},
    },
    "policies": {
        "cheap": {"kind": "cheapest", "models": ["mistral-small", "gpt-4o-mini", "gpt-4o", "claude-sonnet"], "quality_target": 0.4},
        "fast": {"kind": "lowest_latency", "models": ["mistral-small", "gpt-4o-mini", "gpt-4o", "claude-sonnet"],
                 "latency_target_ms": 2000},
    },
    "default_policy": "cheap",
    "ab": {"policy_a": "cheap", "policy_b": "fast", "weight_a": 0.5},
}  # fmt: skip


def _prompts(data: Path) -> list[str]:
    from processors.routing.data import read_mmlu

    return list(read_mmlu(data).prompts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print the table; return ``{"rows": [...], "config": {...}}``."""
    from configuration.store import ConfigStore
    from processors.routing.policy import PolicyRequest
    from streams.catalogue import CATALOGUE

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds of load per path and rate")
    ap.add_argument("--rates", default="100,500", help="offered rates, requests/s, comma-separated")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of RouteLLM's mmlu_*.csv")
    add_worker_options(ap)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    prompts = _prompts(args.data)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    # with --json, stdout is the JSON only (the stack's and the progress lines go to stderr)
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet, stack("bench-route-latency-") as st:
        tag = uuid.uuid4().hex[:8]
        relay_in, relay_out = f"bench-relay-in-{tag}", f"bench-relay-out-{tag}"
        create_topics(st.boot, {REQUESTS: CATALOGUE[REQUESTS].partitions, DECISIONS: CATALOGUE[DECISIONS].partitions,
                                relay_in: CATALOGUE[REQUESTS].partitions, relay_out: CATALOGUE[DECISIONS].partitions})  # fmt: skip
        with ConfigStore(st.settings) as store:
            version = store.set(
                "routing.config", ROUTING_CONFIG, author="bench", reason="route latency"
            ).version
        st.spawn("policy-worker", backbone_command(["routing", "policy-worker", "--app-id", f"bench-policy-{tag}"],
                                                   worker_prelude(args.worker_linger_ms, args.worker_fetch_wait_ms)))  # fmt: skip
        st.spawn("relay", relay_command(st.boot, relay_in, relay_out, tag))
        tracker = Tracker()

        def by_key(key: bytes | None, _value: bytes | None) -> list[tuple[str, str]]:
            return [(key.decode(), "kafka")] if key else []

        subs = [Subscriber(st.boot, t, tracker, by_key) for t in (DECISIONS, relay_out)]
        for s in subs:
            s.start()
            s.ready.wait(30)
        producer = Producer({"bootstrap.servers": st.boot, "linger.ms": 0, "acks": "all"})
        k = 0

        def items(path: str, n: int, rate: int) -> list[tuple[Any, str | None]]:
            nonlocal k
            out: list[tuple[Any, str | None]] = []
            for i in range(n):
                rid = f"{path}-{rate}-{tag}-{i}"
                req = PolicyRequest(request_id=rid, requested_at=t0 + timedelta(seconds=k / 500),
                                    prompt=prompts[k % len(prompts)])  # fmt: skip
                k += 1
                value = json.dumps(req.to_json()).encode()
                topic = REQUESTS if path == "router" else relay_in
                out.append(((topic, rid.encode(), value, [("bench-finished", b"1")]), rid))
            return out

        def run(path: str, rate: int, n: int, timeout: float) -> Phase:
            phase = Phase(path, rate)
            its = items(path, n, rate)
            phase.samples = {key: Sample() for _, key in its if key}
            generate(phase, its, producer, tracker)
            wait_done(phase, timeout)
            st.check_children()
            return phase

        # warm-up: the worker joins its group and reads its first requests, the relay subscribes
        for path in ("bare", "router"):
            warm = run(path, 50, 5, 120)
            if not all(s.kafka for s in warm.samples.values()):
                raise RuntimeError(f"warm-up of {path}: no decision in 120 s; logs in {st.state_dir}")
        for rate in rates:
            base: list[float] = []
            for path in ("bare", "router"):
                n = max(1, int(rate * args.seconds))
                # a router that falls behind drains its queue after the load: wait for it (about 100/s here),
                # so that the percentiles are not those of the early requests only ("seen" tells)
                phase = run(path, rate, n, 30 + n / 50)
                ss = list(phase.samples.values())
                achieved = phase.sent_events / phase.send_seconds if phase.send_seconds else 0.0
                seen_at = [s.kafka for s in ss if s.kafka]
                # decisions seen per second from the first send to the last decision: the router's pace
                seen_rate = len(seen_at) / (max(seen_at) - min(s.sched for s in ss)) if seen_at else 0.0
                e2e = [(s.ack, s.kafka) for s in ss]
                if path == "bare":
                    base = durations_ms(e2e)
                stages = [("sched -> ack", [(s.sched, s.ack) for s in ss], None),
                          ("ack -> relayed seen" if path == "bare" else "ack -> decision seen", e2e, base)]  # fmt: skip
                for name, pairs, b in stages:
                    rows.append({"path": "bare relay" if path == "bare" else "policy router", "rate": rate,
                                 "achieved": achieved, "seen_per_s": seen_rate, "samples": len(ss), "stage": name,
                                 **summarise(pairs, b)})  # fmt: skip
                print(f"  measured {path} at {rate:,} requests/s", flush=True)
            time.sleep(1)
        for s in subs:
            s.stop.set()
            s.join(3)
            errors += s.errors
        producer.flush(10)
    result = {
        "rows": rows,
        "config_version": version,
        "worker_linger_ms": args.worker_linger_ms,
        "worker_fetch_wait_ms": args.worker_fetch_wait_ms,
        "prompts": "MMLU (RouteLLM), file order",
        "errors": errors,
    }
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print_rows(
            f"route request -> policy decision on a subscriber (embedded stack, {len(ROUTING_CONFIG['models'])} models)",
            rows,
            "x bare: router's ack -> decision percentile over the bare relay's at the same rate; seen/s: records seen"
            " per second from the first send to the last one seen" + diagnostic_note(args),
        )
        for e in errors:
            print(f"subscriber error: {e}")
    return result


if __name__ == "__main__":
    main()
