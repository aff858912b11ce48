"""Failing call acknowledged -> circuit-opened event on a subscriber, through the healer on the embedded
stack (issue 11; target: p95 under 100 ms at 1,000 events/s), against a bare relay in the same run.

Run: ``python -m bench --only bench_heal_latency [--quick]`` or ``python bench/bench_heal_latency.py
[--seconds S] [--rate 1000] [--burst-every 0.2] [--json]``. It starts the embedded dev stack and, as
child processes, the healer (``backbone processors heal``, default thresholds, read model and rollbacks
on, log level INFO in JSON so that each decision's ``healing_decision`` line can be read back) and the
bare relay of :mod:`bench.bench_latency`.

Load: ``sophia.agent.LlmCall`` events (Avro, CloudEvents headers, key = run id, event time = schedule)
on ``agent.events`` at ``--rate`` events/s in 5 ms ticks (each flushed, ``acks=all``): background calls
over ``--pairs`` provider/model pairs (8 providers, 40 runs, 5 agents, 1 % failures at random, never
five in a row on one pair), and every ``--burst-every`` seconds a burst for a fresh provider/model pair
(names never seen before, no agent): ``consecutive_failures`` failing calls (the healer's default
thresholds, read from :class:`configuration.schemas.HealingThresholds`) spread 7 slots apart through the
background. The last of them opens the pair's provider and model circuits. The sample is that call:
``sched`` (when the generator was due to send it), ``ack`` (its tick's flush returned), ``opened``
(first ``circuit_opened`` of its provider or model on a subscriber of ``healing.decisions``, assigned,
no group, ``fetch.wait.max.ms`` 10), and, from the healer's log, ``healer sent`` (the ``healing_decision``
line, written once the decision's delivery was acknowledged, its wall time mapped onto this process's
``perf_counter``). The healer does not expose when it took a record (per-record handling is not
logged, its offsets are committed at checkpoints only), so ``counted`` is an estimate: its record counter
(``backbone_healing_records_total`` on its ``/metrics``, polled every 20 ms) passing the tripping call's
position among the phase's records (it takes the six partitions' records in arrival order, fetch by fetch,
so this is late by up to the poll interval and off by up to a fetch). ``ack -> counted`` is the fetch and
the queue before the healer; ``counted -> sent`` is decode, decide, and the decisions' produce (awaited
in turn); ``sent -> seen`` is the subscriber's fetch. The baseline sends the same records to the relay's
input topic with the tripping calls marked; the relay republishes those, and the relayed record is timed.

Also reported: the healer's pace over the phase (records / (first send -> count reached the phase's
last record)), its counters at the end, and one checkpoint of the state it held at the end, remade and
timed in this process (``Healer.snapshot()`` + compact sorted JSON + zlib 1, as ``_HealingShell.save``
does every second or 1,000 records with the agent waiting). Diagnostics (the shared code unchanged; the
setting changed in the healer process only): ``--worker-linger-ms``, ``--worker-fetch-wait-ms``
(``processors.shell`` settings) and ``--checkpoint-seconds`` (no record-count checkpoint either).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Producer

from bench.decision_latency import (
    CounterPoller,
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
    metrics_url,
    print_rows,
    relay_command,
    scrape_metrics,
    stack,
    summarise,
    wait_done,
    worker_prelude,
)

__all__ = ["main"]

EVENTS, DECISIONS = "agent.events", "healing.decisions"
SPACING = 7
"""Slots between two failing calls of one burst."""
PROVIDERS = ("openai", "anthropic", "google", "mistral", "deepseek", "xai", "cohere", "meta")
AGENTS = ("planner", "coder", "reviewer", "tester", "fixer")


def plan(
    n: int, rate: int, burst_every: float, burst_size: int, pairs: int, seed: int
) -> list[dict[str, Any]]:
    """The ``n`` LlmCall descriptions in send order: ``{"run", "step", "provider", "model", "agent",
    "ok", "i", "trip"}`` (``trip``: the burst's pair, on the call that completes the burst; ``i``: slot,
    event time ``i / rate`` s after the start). A burst starts every ``burst_every`` seconds of slots
    while its ``burst_size`` calls, ``SPACING`` slots apart, fit."""
    rng = random.Random(seed)
    slots: list[dict[str, Any] | None] = [None] * n
    every = max(1, round(burst_every * rate))
    for b, start in enumerate(range(every // 2, n - SPACING * (burst_size - 1), every)):
        pair = f"burst{b}"
        for j in range(burst_size):
            slots[start + SPACING * j] = {"run": f"run-{pair}", "step": j + 1, "provider": f"prov-{pair}",
                                          "model": f"model-{pair}", "agent": None, "ok": False,
                                          "trip": pair if j == burst_size - 1 else None}  # fmt: skip
    steps: dict[str, int] = {}
    last_fail: dict[int, int] = {}
    out: list[dict[str, Any]] = []
    for i, s in enumerate(slots):
        if s is None:
            p = rng.randrange(pairs)
            run = f"run-{rng.randrange(40)}"
            steps[run] = steps.get(run, 0) + 1
            ok = rng.random() >= 0.01 or last_fail.get(p, -10) >= i - 50
            if not ok:
                last_fail[p] = i
            s = {"run": run, "step": steps[run], "provider": PROVIDERS[p % len(PROVIDERS)], "model": f"model-{p}",
                 "agent": AGENTS[p % len(AGENTS)], "ok": ok, "trip": None}  # fmt: skip
        out.append({**s, "i": i})
    return out


def _datum(c: dict[str, Any], t0: datetime, rate: int, run_prefix: str) -> dict[str, Any]:
    ok = c["ok"]
    return {"run_id": f"{run_prefix}{c['run']}", "step": c["step"], "event_time": (t0 + timedelta(seconds=c["i"] / rate)).isoformat(),
            "model": c["model"], "provider": c["provider"], "prompt_tokens": 1200, "completion_tokens": 180,
            "cost_usd": 0.0003, "latency_ms": 900 if ok else 30_000, "outcome": "ok" if ok else "timeout",
            "error_kind": None if ok else "timeout", "http_status": None if ok else 504, "agent": c["agent"]}  # fmt: skip


def _log_stamps(path: Path, offset: float) -> dict[str, float]:
    """``{decision subject: perf_counter time}`` of the first ``circuit_opened`` ``healing_decision``
    line of each subject in the healer's JSON log (wall time minus ``offset`` = ``time.time() -
    time.perf_counter()`` of this process)."""
    out: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        if '"healing_decision"' not in line or "circuit_opened" not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") != "healing_decision" or rec.get("kind") != "circuit_opened":
            continue
        ts = datetime.fromisoformat(str(rec["timestamp"]).replace("Z", "+00:00")).timestamp()
        out.setdefault(str(rec["subject"]), ts - offset)
    return out


def _healer_prelude(checkpoint_seconds: float | None, batch_records: int | None = None) -> str | None:
    """The prelude of ``--checkpoint-seconds`` and ``--batch-records`` (``create_healing_app``'s defaults
    replaced in the healer process); None when neither is given."""
    kwargs = []
    lines = ["import functools", "import processors.healing.app as healing_app"]
    if checkpoint_seconds is not None:
        kwargs.append(f"checkpoint_seconds={checkpoint_seconds!r}, checkpoint_records=10**9")
    if batch_records is not None:
        kwargs.append(f"batch_records={int(batch_records)!r}")
    if kwargs:
        lines.append("healing_app.create_healing_app = functools.partial(healing_app.create_healing_app, "
                     f"{', '.join(kwargs)})")  # fmt: skip
    return "\n".join(lines) if len(lines) > 2 else None


def _checkpoint_cost(serde: Any, values: list[bytes]) -> dict[str, Any]:
    """Feed ``values`` (the healer phase's Avro records) to a fresh :class:`Healer` here and time one
    checkpoint of its state as ``_HealingShell.save`` makes it (``Healer.snapshot()``, sorted compact
    JSON, zlib level 1): ``{"events", "feed_per_s" (``Healer.feed`` alone, decoded records, this
    process), "json_bytes", "zlib_bytes", "ms", "part_bytes"}``."""
    from processors.healing.healer import Healer

    decoded = [serde.decode(v) for v in values]
    h = Healer()
    t = time.perf_counter()
    for schema, data in decoded:
        h.feed({"schema": schema, "data": data, "id": None})
    feed_seconds = time.perf_counter() - t
    t = time.perf_counter()
    snap = h.snapshot()
    raw = json.dumps(
        {"format": 1, "offsets": {}, "healer": snap}, sort_keys=True, separators=(",", ":")
    ).encode()
    packed = zlib.compress(raw, 1)
    ms = round((time.perf_counter() - t) * 1000, 1)
    parts = {k: len(json.dumps(v, separators=(",", ":"), default=str)) for k, v in snap.items()}
    return {"events": len(values), "feed_per_s": round(len(values) / feed_seconds), "json_bytes": len(raw),
            "zlib_bytes": len(packed), "ms": ms, "part_bytes": parts}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print the table; return ``{"rows": [...], ...}``."""
    from backbone.client import Client
    from configuration.schemas import HealingThresholds
    from streams.catalogue import CATALOGUE

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds of load per path")
    ap.add_argument("--rate", type=int, default=1000, help="offered rate, events/s")
    ap.add_argument("--burst-every", type=float, default=0.2, help="seconds between two bursts (samples)")
    ap.add_argument("--pairs", type=int, default=40, help="provider/model pairs of the background")
    add_worker_options(ap)
    ap.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=None,
        help="diagnostic: run the healer with this checkpoint interval and no record-count checkpoint "
        "(shipped: every 1 s or 1,000 records, create_healing_app's defaults)",
    )
    ap.add_argument(
        "--batch-records",
        type=int,
        default=None,
        help="diagnostic: the healer's batch_records (shipped 1,000; 1 awaits each record's decisions "
        "before the next record, as before the batching)",
    )
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args(argv)
    th = HealingThresholds()
    burst = th.consecutive_failures  # the fewest failures that open a fresh circuit (rate rule: min_calls)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    worker: dict[str, Any] = {}
    # with --json, stdout is the JSON only (the stack's and the progress lines go to stderr)
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet, stack("bench-heal-latency-") as st:
        tag = uuid.uuid4().hex[:8]
        relay_in, relay_out = f"bench-relay-in-{tag}", f"bench-relay-out-{tag}"
        create_topics(st.boot, {EVENTS: CATALOGUE[EVENTS].partitions, DECISIONS: CATALOGUE[DECISIONS].partitions,
                                "config.changes": CATALOGUE["config.changes"].partitions, "healing.acks": 1,
                                "backbone.dlq": 1, relay_in: CATALOGUE[EVENTS].partitions, relay_out: 3})  # fmt: skip
        healer_env = {**st.env, "BACKBONE_LOG_LEVEL": "INFO", "BACKBONE_LOG_FORMAT": "json"}
        prelude = [
            p
            for p in (
                worker_prelude(args.worker_linger_ms, args.worker_fetch_wait_ms),
                _healer_prelude(args.checkpoint_seconds, args.batch_records),
            )
            if p
        ]
        healer = st.spawn("healer", backbone_command(["processors", "heal", "--app-id", f"bench-healer-{tag}", "--json"],
                                                     "\n".join(prelude) or None), env=healer_env)  # fmt: skip
        st.spawn("relay", relay_command(st.boot, relay_in, relay_out, tag))
        tracker = Tracker()
        client = Client(st.settings)
        serde = client.serde
        subjects: dict[str, tuple[str, str]] = {}  # decision subject -> (sample key, stage)

        def opened(key: bytes | None, value: bytes | None) -> list[tuple[str, str]]:
            hit = subjects.get(key.decode()) if key else None
            if hit is None or value is None:
                return []
            _, data = serde.decode(value)
            if data.get("kind") != "circuit_opened":
                return []
            return [(hit[0], "kafka"), hit]

        def relayed(key: bytes | None, _value: bytes | None) -> list[tuple[str, str]]:
            return [(key.decode(), "kafka")] if key else []

        subs = [
            Subscriber(st.boot, DECISIONS, tracker, opened),
            Subscriber(st.boot, relay_out, tracker, relayed),
        ]
        for s in subs:
            s.start()
            s.ready.wait(30)
        producer = Producer({"bootstrap.servers": st.boot, "linger.ms": 0, "acks": "all"})
        seed = 0
        clock_s = 0.0  # event time of the next phase's first call, seconds after t0 (it only goes forward)

        def items(path: str, rate: int, seconds: float, every: float) -> list[tuple[Any, str | None]]:
            nonlocal seed, clock_s
            seed += 1
            calls = plan(max(1, int(rate * seconds)), rate, every, burst, args.pairs, seed)
            prefix = f"{path}-{seed}-{tag}-"
            for c in calls:
                if c["trip"] is not None:
                    c["trip"] = f"{prefix}{c['trip']}"
                    c["provider"], c["model"] = f"{prefix}{c['provider']}", f"{prefix}{c['model']}"
                elif c["provider"].startswith("prov-"):
                    c["provider"], c["model"] = f"{prefix}{c['provider']}", f"{prefix}{c['model']}"
            events = client.events("sophia.agent.LlmCall", [_datum(c, t0 + timedelta(seconds=clock_s), rate, prefix)
                                                              for c in calls], topic=EVENTS)  # fmt: skip
            clock_s += seconds + 1.0
            topic = EVENTS if path == "healer" else relay_in
            out: list[tuple[Any, str | None]] = []
            for c, e in zip(calls, events, strict=True):
                trip = c["trip"]
                headers = [*e.attributes.to_headers(), ("bench-finished", b"1" if trip else b"0")]
                key = (f"run-{trip}" if trip and path == "bare" else e.key).encode()
                if trip:
                    sample = f"run-{trip}" if path == "bare" else trip
                    subjects[f"circuit:provider:{c['provider']}"] = (sample, "provider")
                    subjects[f"circuit:model:{c['provider']}/{c['model']}"] = (sample, "model")
                out.append(((topic, key, serde.encode(e.schema, e.data), headers), sample if trip else None))
            return out

        fed: list[bytes] = []  # the healer's input values, for the checkpoint measure
        pace: dict[str, float] = {}  # the healer's record count over the measured phase

        def run(
            path: str, rate: int, seconds: float, every: float, timeout: float
        ) -> tuple[Phase, dict[str, Any]]:
            phase = Phase(path, rate)
            its = items(path, rate, seconds, every)
            if path == "healer":
                fed.extend(p[2] for p, _ in its)
            phase.samples = {key: Sample() for _, key in its if key}
            poller = None
            url = metrics_url(st.state_dir / "healer.log", "healing_metrics") if path == "healer" else None
            if url is not None:
                poller = CounterPoller(url, "backbone_healing_records_total")
                poller.start()
                while not poller.series and poller.is_alive():
                    time.sleep(0.01)
            sent_from = time.perf_counter()
            generate(phase, its, producer, tracker)
            sent_to = time.perf_counter()
            wait_done(phase, timeout)
            extra = tracker.extra
            if poller is not None:
                start_count = poller.series[0][1] if poller.series else 0.0
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and poller.first_at_least(start_count + len(its)) is None:
                    time.sleep(0.1)
                poller.stop.set()
                poller.join(3)
                # the healer's record count passed the tripping call's position in the phase's records: about
                # when it took it (it takes the six partitions' records in arrival order, fetch by fetch)
                done_at = poller.first_at_least(start_count + len(its))
                if done_at is not None:
                    pace.update(records=len(its), drained_per_s=len(its) / (done_at - sent_from),
                                drained_after_last_ack_ms=(done_at - sent_to) * 1000)  # fmt: skip
                for j, (_, key) in enumerate(its):
                    if key is not None:
                        at = poller.first_at_least(start_count + j + 1)
                        if at is not None:
                            extra.setdefault(key, {})["counted"] = at
            if healer.poll() is not None:
                raise RuntimeError(f"the healer exited {healer.returncode}; logs in {st.state_dir}")
            return phase, extra

        # warm-up: the healer joins its group and restores its (empty) state, the relay subscribes
        for path in ("bare", "healer"):
            warm, _ = run(path, 100, 1.0, 0.5, 120)
            if not all(s.kafka for s in warm.samples.values()):
                raise RuntimeError(f"warm-up of {path}: nothing seen in 120 s; logs in {st.state_dir}")
        base: list[float] = []
        measured: dict[str, tuple[Phase, dict[str, Any]]] = {}
        for path in ("bare", "healer"):
            measured[path] = run(path, args.rate, args.seconds, args.burst_every, 60)
            print(f"  measured {path} at {args.rate:,} events/s", flush=True)
        for s in subs:
            s.stop.set()
            s.join(3)
            errors += s.errors
        producer.flush(10)
        offset = time.time() - time.perf_counter()
        logged = _log_stamps(st.state_dir / "healer.log", offset)
        worker = scrape_metrics(
            metrics_url(st.state_dir / "healer.log", "healing_metrics"), "backbone_healing_"
        )
        checkpoint = _checkpoint_cost(serde, fed)
        for path in ("bare", "healer"):
            phase, extra = measured[path]
            ss = phase.samples
            achieved = phase.sent_events / phase.send_seconds if phase.send_seconds else 0.0
            lead = {"path": "bare relay" if path == "bare" else "healer", "rate": args.rate, "achieved": achieved,
                    "samples": len(ss)}  # fmt: skip
            e2e = [(s.ack, s.kafka) for s in ss.values()]
            stages: list[tuple[str, list[tuple[float | None, float | None]], list[float] | None]] = [
                ("sched -> ack", [(s.sched, s.ack) for s in ss.values()], None)
            ]
            if path == "bare":
                base = durations_ms(e2e)
                stages.append(("ack -> relayed seen", e2e, base))
            else:
                sent: dict[str, dict[str, float]] = {}
                for subj, at in logged.items():
                    hit = subjects.get(subj)
                    if hit is not None:
                        sent.setdefault(hit[0], {})[hit[1]] = at
                first_sent = {k: min(v.values()) for k, v in sent.items()}
                stages += [
                    ("ack -> circuit opened seen", e2e, base),
                    ("ack -> provider opened seen", [(s.ack, extra.get(k, {}).get("provider")) for k, s in ss.items()], base),
                    ("ack -> model opened seen", [(s.ack, extra.get(k, {}).get("model")) for k, s in ss.items()], base),
                    ("ack -> healer counted (poll)", [(s.ack, extra.get(k, {}).get("counted")) for k, s in ss.items()], None),
                    ("healer counted -> sent", [(extra.get(k, {}).get("counted"), first_sent.get(k)) for k, s in ss.items()], None),
                    ("ack -> healer sent (log)", [(s.ack, first_sent.get(k)) for k, s in ss.items()], None),
                    ("healer sent -> seen", [(first_sent.get(k), s.kafka) for k, s in ss.items()], None),
                ]  # fmt: skip
            for name, pairs, b in stages:
                rows.append({**lead, "stage": name, **summarise(pairs, b)})
    timeline = []
    if "healer" in measured:
        phase, _ = measured["healer"]
        start = min(s.sched for s in phase.samples.values())
        timeline = [[round(s.sched - start, 3), round((s.kafka - s.ack) * 1000, 1) if s.kafka and s.ack else None]
                    for s in sorted(phase.samples.values(), key=lambda s: s.sched)]  # fmt: skip
    result = {"rows": rows, "burst_failures": burst, "worker_linger_ms": args.worker_linger_ms, "worker_fetch_wait_ms": args.worker_fetch_wait_ms,
              "checkpoint": checkpoint, "healer_pace": pace, "healer_samples": timeline, "thresholds": th.model_dump(include={"error_rate", "min_calls",
              "consecutive_failures", "window_seconds"}), "healer": worker, "errors": errors}  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print_rows(
            f"failing call acked -> circuit_opened on a subscriber (embedded stack, {burst} failures per burst)",
            rows,
            "x bare: the healer's percentile over the bare relay's (ack -> relayed seen); target p95 < 100 ms"
            + diagnostic_note(args),
        )
        if worker:
            print(f"healer metrics at the end: {worker}")
        print(f"healer pace over the phase (record count polled): {pace}")
        print(f"checkpoint of the state the healer held at the end, timed here: {checkpoint}")
        for e in errors:
            print(f"error: {e}")
    return result


if __name__ == "__main__":
    main()
