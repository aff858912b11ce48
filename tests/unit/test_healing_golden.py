"""The healer's decisions and final snapshot, byte for byte, against a golden file recorded from main's code
before ``Healer.feed`` was optimised (issue 11).

Two histories:

* ``synthetic``: a seeded high-rate stream (about 500 events/s of event time for 50 s) of LLM calls over
  8 providers, 40 models, 5 agents and 60 runs (1 % failures, requests that fail and are retried, fall
  back or escalate, error kinds retryable and not), bursts that open circuits which then half-open and
  close or re-open, tool calls that loop and fail in streaks, runs that finish (peers for the runaway
  signals and the trouble gate) and stall, late and tied event times, event times in another time zone
  and as unix seconds, configuration changes that make models slower and flakier (so rollbacks are
  made, recommended, escalated, suppressed by the hourly limit, refused as rollbacks of rollbacks), re-
  delivered and retired changes, healing configuration changes (applied, one refused, one that re-buckets
  the rollback monitor), and acks of the escalations raised (the driver acks each escalation 200 events
  later) plus one unmatched ack. Half way through, the healer is snapshotted and restored.
* ``agent_runs``: the real runs of ``../shared/data/agent_runs`` in event-time order (skipped when absent).

For each, what is compared is a chain of SHA-256 hashes over every decision's ``as_json()`` (with the index
of the event that produced it; floats written with 12 significant digits, so a libm of another platform
does not change it), recorded every 1,000 events (so a change is located), the decision count per kind,
and the hash of the final ``snapshot()``.

Regenerate (only on purpose, on code whose decisions are known right):
``PYTHONPATH=$PWD python tests/unit/test_healing_golden.py``.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from processors.healing.decisions import Decision
from processors.healing.healer import Healer

GOLDEN = Path(__file__).parent / "data" / "healing_golden.json"
AGENT_RUNS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "agent_runs"
T0 = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)
SEED = 11
EVENTS = 25_000
RATE = 500  # events per second of event time
CHECK_EVERY = 1_000

PROVIDERS = [f"prov-{i}" for i in range(8)]
AGENTS = [f"agent-{i}" for i in range(5)]
COMMANDS = [
    "ls -la",
    "python reproduce.py",
    "pytest tests/  -x",
    "cat setup.py",
    "git diff",
    "grep -rn foo .",
]


def _healing(version: int, **values: Any) -> dict[str, Any]:
    return {"schema": "sophia.config.ConfigChange", "id": f"cfg-healing-{version}",
            "data": {"key": "healing.thresholds", "version": version, "change": "CHANGED",
                     "value_json": json.dumps(values), "author": "ana", "reason": "tune", "changed_at": None}}  # fmt: skip


# fmt: off
HEALING_CHANGES = {  # event index -> change (event time filled in by the generator)
    0: _healing(1, consecutive_failures=4, open_seconds=2, window_seconds=5, min_calls=8, error_rate=0.4,
                retry_max_attempts=2, retry_base_seconds=0.2, retry_max_seconds=2,
                fallback_chains={"prov-0": ["prov-1", "prov-2"], "prov-3/model-3": ["prov-4"]},
                stall_seconds=3, runaway_min_peers=3, loop_repeats=3, loop_window=8, failing_streak=3,
                rollback_window_seconds=3, rollback_min_calls=15, rollback_mode="auto", rollback_max_per_hour=3),
    7_000: _healing(2, consecutive_failures=4, open_seconds=1.5, window_seconds=5, min_calls=8,
                    retry_max_attempts=3, retry_base_seconds=0.1, retry_max_seconds=1, stall_seconds=4,
                    runaway_min_peers=3, rollback_window_seconds=4, rollback_min_calls=15, rollback_mode="approval",
                    half_open_max_probes=2, half_open_successes=2),
    11_000: _healing(3, error_rate=2.0),  # refused
    15_000: _healing(4, consecutive_failures=3, open_seconds=1, stall_seconds=4, runaway_min_peers=3,
                     rollback_window_seconds=5, rollback_min_calls=15, rollback_mode="dry_run", rollback_max_per_hour=50),
    19_000: _healing(5, consecutive_failures=3, open_seconds=1, stall_seconds=4, runaway_min_peers=3,
                     rollback_window_seconds=40, rollback_min_calls=15, rollback_mode="auto", rollback_max_per_hour=1),
    22_000: _healing(6, consecutive_failures=3, open_seconds=1, stall_seconds=4, runaway_min_peers=3,
                     rollback_window_seconds=3, rollback_min_calls=15, rollback_mode="auto", rollback_max_per_hour=1),
}
# fmt: on


def synthetic_events(n: int = EVENTS, seed: int = SEED) -> Iterator[dict[str, Any]]:
    """The synthetic history (see the module docstring), as ``{"schema", "id", "data"}`` dicts."""
    rng = random.Random(seed)
    steps: dict[str, int] = {}
    generation: dict[int, int] = {}
    degraded: dict[str, tuple[float, float, float]] = {}  # model -> (until_s, latency factor, failure rate)
    retrying: list[tuple[str, str, int]] = []  # (request_id, provider, attempt) failed and to be retried
    config_versions: dict[str, int] = {}
    down: tuple[str, float] | None = None  # provider failing every call until that time
    for i in range(n):
        s = i / RATE
        if rng.random() < 0.01:
            s -= rng.random() * 0.5  # late
        elif rng.random() < 0.05 and i:
            s = (i - 1) / RATE  # tied with the previous slot
        at: Any = T0 + timedelta(seconds=s)
        if i % 997 == 0:
            at = at.astimezone(timezone(timedelta(hours=-5)))
        elif i % 991 == 0:
            at = at.timestamp()
        if i in HEALING_CHANGES:
            ev = json.loads(json.dumps(HEALING_CHANGES[i]))
            ev["data"]["changed_at"] = at
            yield ev
            continue
        if i % 1_300 == 650:  # a routing change that degrades its models for a while
            key = f"routing.policy.p{(i // 1_300) % 3}"
            v = config_versions[key] = config_versions.get(key, 0) + 1
            models = [f"model-{(i // 1_300) % 6}", f"model-{(i // 1_300) % 6 + 6}"]
            change = "ROLLED_BACK" if i % 5_200 == 650 + 2_600 else "CHANGED"
            author = "healer" if change == "ROLLED_BACK" else "bob"
            for m in models:
                degraded[m] = (s + 6, 4.0, 0.25 if (i // 1_300) % 2 else 0.0)
            yield {"schema": "sophia.config.ConfigChange", "id": f"cfg-{key}-{v}",
                   "data": {"key": key, "version": v, "change": change, "author": author, "reason": "r",
                            "value_json": json.dumps({"models": models, "fallback_model": "model-20"}),
                            "restored_version": v - 1 if change == "ROLLED_BACK" else None, "changed_at": at}}  # fmt: skip
            if v % 3 == 2:  # the outbox relay delivers it again
                yield {"schema": "sophia.config.ConfigChange", "id": f"cfg-{key}-{v}",
                       "data": {"key": key, "version": v, "change": change, "author": author, "reason": "r",
                                "value_json": json.dumps({"models": models}), "changed_at": at}}  # fmt: skip
            continue
        if i % 2_100 == 1_000:
            key = f"providers.prov-{(i // 2_100) % 8}"
            v = config_versions[key] = config_versions.get(key, 0) + 1
            yield {"schema": "sophia.config.ConfigChange", "id": None,
                   "data": {"key": key, "version": v, "change": "RETIRED" if v == 3 else "CHANGED", "author": "c",
                            "value_json": None, "changed_at": at}}  # fmt: skip
            continue
        if i % 1_700 == 300:
            down = (PROVIDERS[(i // 1_700) % 8], s + rng.uniform(0.2, 4.0))
        r = rng.random()
        run_no = rng.randrange(60)
        run = f"run-{run_no}-{generation.get(run_no, 0)}"
        step = steps[run] = steps.get(run, 0) + 1
        if step == 1:
            yield {"schema": "sophia.agent.RunLifecycle", "id": f"{run}:start",
                   "data": {"run_id": run, "phase": "STARTED", "event_time": at, "step": 0}}  # fmt: skip
            continue
        if r < 0.004 or step > 400:
            generation[run_no] = generation.get(run_no, 0) + 1
            yield {"schema": "sophia.agent.RunLifecycle", "id": f"{run}:end",
                   "data": {"run_id": run, "phase": "FINISHED", "event_time": at, "step": step,
                            "outcome": "Submitted"}}  # fmt: skip
            continue
        if r < 0.35:
            command = (
                COMMANDS[rng.randrange(len(COMMANDS))]
                if rng.random() < 0.7
                else f"echo {rng.randrange(10**6)}"
            )
            rc = None if rng.random() < 0.02 else (0 if rng.random() < 0.7 else 1)
            yield {"schema": "sophia.agent.ToolCall", "id": f"{run}:{step}:tool",
                   "data": {"run_id": run, "step": step, "event_time": at, "command": command, "return_code": rc,
                            "timed_out": rng.random() < 0.01}}  # fmt: skip
            continue
        p = rng.randrange(40)
        provider: str | None = PROVIDERS[p % 8]
        model, agent = f"model-{p}", AGENTS[p % 5] if rng.random() < 0.9 else None
        if rng.random() < 0.02:
            provider = None
        request_id: str | None = None
        attempt = 1
        if retrying and rng.random() < 0.3:
            request_id, provider, attempt = retrying.pop(0)
            attempt += 1
        elif rng.random() < 0.3:
            request_id = f"req-{i}"
        fail_p = 0.01
        factor = 1.0
        d = degraded.get(model)
        if d is not None and s < d[0]:
            factor, fail_p = d[1], max(fail_p, d[2])
        if down is not None and provider == down[0] and s < down[1]:
            fail_p = 1.0
        ok = rng.random() >= fail_p
        kind = None if ok else rng.choice(["timeout", "rate_limited", "server_error", "server_error", "auth"])
        if not ok and request_id and rng.random() < 0.7:
            retrying.append((request_id, provider or "unknown", attempt))
        yield {"schema": "sophia.agent.LlmCall", "id": f"{run}:{step}:llm" if rng.random() < 0.95 else None,
               "data": {"run_id": run, "step": step, "event_time": at, "provider": provider, "model": model,
                        "agent": agent, "prompt_tokens": rng.randrange(200, 4000), "completion_tokens": rng.randrange(10, 400),
                        "cost_usd": None if rng.random() < 0.05 else round(rng.lognormvariate(-7, 0.8) * factor, 8),
                        "latency_ms": None if rng.random() < 0.05 else round(rng.lognormvariate(7, 0.6) * factor, 1),
                        "outcome": None if ok and rng.random() < 0.1 else ("ok" if ok else kind), "error_kind": kind,
                        "request_id": request_id, "attempt": attempt}}  # fmt: skip


def _canon(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.12g}")
    if isinstance(x, dict):
        return {k: _canon(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_canon(v) for v in x]
    return x


def _text(x: Any) -> str:
    return json.dumps(_canon(x), sort_keys=True, separators=(",", ":"), default=str)


class _Recorder:
    def __init__(self) -> None:
        self.chain = hashlib.sha256()
        self.checkpoints: list[str] = []
        self.kinds: Counter[str] = Counter()
        self.decisions: list[dict[str, Any]] = []  # for a diff when regenerating to /tmp

    def note(self, index: int, decisions: list[Decision]) -> None:
        for d in decisions:
            j = d.as_json()
            self.decisions.append({"event": index, **j})
            self.chain.update(f"{index}:{_text(j)}\n".encode())
            self.kinds[d.kind] += 1
        if (index + 1) % CHECK_EVERY == 0:
            self.checkpoints.append(self.chain.hexdigest()[:24])

    def result(self, healer: Healer) -> dict[str, Any]:
        return {
            "decisions": sum(self.kinds.values()),
            "kinds": dict(sorted(self.kinds.items())),
            "checkpoints": self.checkpoints,
            "final": self.chain.hexdigest(),
            "snapshot": hashlib.sha256(_text(healer.snapshot()).encode()).hexdigest(),
        }


def run_synthetic(recorder: _Recorder | None = None) -> dict[str, Any]:
    """Feed the synthetic history (acking each escalation 200 events later, restoring half way)."""
    rec = recorder or _Recorder()
    healer = Healer()
    acks: dict[int, list[Decision]] = {}
    for i, ev in enumerate(synthetic_events()):
        for ack in acks.pop(i, []):
            rec.note(
                i, healer.feed({"schema": "sophia.healing.Decision", "id": ack.id, "data": ack.to_avro()})
            )
        out = healer.feed(ev)
        rec.note(i, out)
        for d in out:
            if d.kind == "escalation":
                t = d.event_time + timedelta(milliseconds=1)
                by = "bob" if len(acks) % 2 else "ana"
                details = {"escalation_id": d.id, "by": by, "note": "ok"}
                ack = Decision(
                    kind="escalation_acked",
                    subject=d.subject,
                    event_time=t,
                    config_version=0,
                    details=details,
                )
                acks.setdefault(i + 200, []).append(ack)
        if i == 9_000:
            details = {"escalation_id": "no-such-escalation", "by": "ana", "note": "?"}
            t = T0 + timedelta(seconds=18)
            ack = Decision(
                kind="escalation_acked", subject="config:x", event_time=t, config_version=0, details=details
            )
            acks.setdefault(i + 1, []).append(ack)
        if i == EVENTS // 2:
            healer = Healer.restore(json.loads(json.dumps(healer.snapshot())))
    return rec.result(healer)


def run_agent_runs(recorder: _Recorder | None = None) -> dict[str, Any]:
    """Feed the real runs in event-time order."""
    from processors.healing.evaluation import load_runs, merged_events

    rec = recorder or _Recorder()
    healer = Healer()
    for i, ev in enumerate(merged_events(load_runs(AGENT_RUNS))):
        rec.note(i, healer.feed(ev))
    return rec.result(healer)


def _golden() -> dict[str, Any]:
    golden: dict[str, Any] = json.loads(GOLDEN.read_text())
    return golden


def test_synthetic_decisions_match_golden() -> None:
    got = run_synthetic()
    want = _golden()["synthetic"]
    assert got["kinds"] == want["kinds"]
    for k, (a, b) in enumerate(zip(got["checkpoints"], want["checkpoints"], strict=True)):
        assert a == b, f"decisions differ before event {(k + 1) * CHECK_EVERY}"
    assert got == want


def test_synthetic_history_covers_the_decision_kinds() -> None:
    kinds = _golden()["synthetic"]["kinds"]
    for kind in ("circuit_opened", "circuit_half_open", "circuit_closed", "retry_scheduled", "retry_due",
                 "fallback", "escalation", "escalation_acked", "ack_unmatched", "agent_warning", "rollback",
                 "rollback_recommended", "rollback_not_needed", "rollback_suppressed", "config_applied",
                 "config_refused"):  # fmt: skip
        assert kinds.get(kind, 0) > 0, kind


@pytest.mark.skipif(not AGENT_RUNS.is_dir(), reason="../shared/data/agent_runs is absent")
def test_agent_runs_decisions_match_golden() -> None:
    assert run_agent_runs() == _golden()["agent_runs"]


if __name__ == "__main__":  # regenerate; with an argument, also write every decision there (JSON lines)
    recs = {"synthetic": _Recorder(), "agent_runs": _Recorder()}
    golden = {"synthetic": run_synthetic(recs["synthetic"]), "agent_runs": run_agent_runs(recs["agent_runs"])}
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            for name, rec in recs.items():
                for d in rec.decisions:
                    f.write(json.dumps({"stream": name, **d}, sort_keys=True, default=str) + "\n")
    print(json.dumps({k: v["kinds"] for k, v in golden.items()}, indent=1))
