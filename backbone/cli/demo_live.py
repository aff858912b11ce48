"""The live part of ``backbone demo``: routing and healing feeding each other on the running stack.

The demo acts as an agent runtime. The routing configuration below goes into the config store (key
``routing.config``, schema-validated) before the policy router starts. Then, for each of the real task
prompts of the runs (the ``<pr_description>`` of each mini-swe-agent trajectory), one tick of event time
(:data:`TICK_SECONDS` apart):

1. a route request goes to ``routing.policy-requests`` and its decision is read from
   ``routing.policy-decisions`` (the policy router, ``backbone routing policy-worker``, a subprocess);
2. the decided model is called through :class:`processors.healing.client.HealingClient` (the client
   agents call models through: it reads the healer's circuits, retries with backoff, falls back along
   the decision's chain and emits every attempt as an ``LlmCall`` on ``agent.events`` with the public
   client); the provider is a local fake of the OpenAI chat-completions API (``POST
   /v1/chat/completions``, an OpenAI-style JSON body with ``usage``; ``503`` with an error object while
   the injected outage lasts);
3. the agent's own next call (``google/gemini-3-pro-preview``, the model of the real runs, with
   ``openai/gpt-5-mini`` as its fallback) goes through the same client;
4. what happened is reported to ``routing.outcomes`` (a failed routed model makes the router send a
   fallback decision).

An outage of the provider ``Google`` is injected from :data:`OUTAGE_TICKS`. The healer (``backbone
processors heal``, a subprocess) sees the failing calls, opens the circuits, writes them to its read
model (Redis, PostgreSQL), and both the router and the client honour them: the router ranks the
blocked models out, the client skips them. Once the cool-down has passed in event time the circuit
turns half-open, the agent's next call is the probe, and its success closes the circuit; the router
goes back to the cheapest model. Event time comes from the demo's clock (the client's retry backoff
advances it), so the circuit transitions do not depend on how fast this machine is; which tick sees a
transition first can move by one, because the client and the router read the read model while the
healer writes it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "DEMO_ROUTING",
    "OUTAGE_PROVIDER",
    "OUTAGE_TICKS",
    "LiveScenario",
    "run_live",
    "short",
    "start_workers",
]

TICK_SECONDS = 5.0
"""Event time between two ticks (one routed request and one agent call each)."""
OUTAGE_PROVIDER = "Google"
OUTAGE_TICKS = (6, 12)
"""The outage lasts from the start of tick 6 to the start of tick 12 (event time); the circuit's cool-down
(``open_seconds``, 30 s by default) ends after it, so the first probe finds the provider back."""
AGENT_MODEL = ("Google", "google/gemini-3-pro-preview")
AGENT_FALLBACK = "OpenAI/openai/gpt-5-mini"
MAX_PROMPTS = 25
"""Ticks of the live part (the first prompts by file name when the data has more)."""
OUTPUT_TOKENS = 512
"""Completion tokens the fake provider answers with."""

DEMO_ROUTING: dict[str, Any] = {
    "providers": {"Google": {"requests_per_minute": 600}, "OpenAI": {"requests_per_minute": 600}},
    "models": {
        "google/gemini-2.5-flash-lite": {
            "provider": "Google", "capabilities": ["chat", "code"], "context_window_tokens": 1_048_576,
            "usd_per_million_input_tokens": 0.10, "usd_per_million_output_tokens": 0.40,
            "expected_output_tokens": OUTPUT_TOKENS, "latency_prior_ms": 800.0,
        },
        "openai/gpt-5-mini": {
            "provider": "OpenAI", "capabilities": ["chat", "code"], "context_window_tokens": 400_000,
            "usd_per_million_input_tokens": 0.25, "usd_per_million_output_tokens": 2.00,
            "expected_output_tokens": OUTPUT_TOKENS, "latency_prior_ms": 1500.0,
        },
        "google/gemini-3-pro-preview": {
            "provider": "Google", "capabilities": ["chat", "code"], "context_window_tokens": 1_048_576,
            "usd_per_million_input_tokens": 2.00, "usd_per_million_output_tokens": 12.00,
            "expected_output_tokens": OUTPUT_TOKENS, "latency_prior_ms": 4000.0,
        },
    },
    "policies": {
        "cheap": {
            "kind": "cheapest", "quality_target": 0.4,
            "models": ["google/gemini-2.5-flash-lite", "openai/gpt-5-mini", "google/gemini-3-pro-preview"],
        },
    },
    "default_policy": "cheap",
}  # fmt: skip
"""The demo's routing configuration (``routing.config``): list prices per million tokens in USD of
late 2025; no learner, so every model's learned quality is the prior 0.5 and ``cheapest`` ranks by
estimated cost."""

_PR = re.compile(
    r"<pr_description>\s*(?:Consider the following PR description:\s*)?(.*?)</pr_description>", re.S
)


def task_prompts(data: Path) -> list[tuple[str, str]]:
    """``(run id, task prompt)`` of each mini-swe-agent trajectory under ``data/trajs``, by file name.

    The prompt is the ``<pr_description>`` of the first user message (the real GitHub issue text);
    a trajectory without one is skipped.
    """
    out = []
    for path in sorted((data / "trajs").glob("*.traj.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            first = next(m for m in doc["messages"] if m.get("role") == "user")
            content = first["content"]
            text = content if isinstance(content, str) else " ".join(c.get("text", "") for c in content)
        except (OSError, ValueError, KeyError, StopIteration, TypeError, AttributeError):
            continue
        m = _PR.search(text)
        if m:
            out.append((path.name.removesuffix(".traj.json"), m.group(1).strip()))
    return out


def start_workers(env: dict[str, str], state_dir: Path) -> dict[str, subprocess.Popen[bytes]]:
    """Start the healer and the policy router as subprocesses (logs in ``state_dir``)."""
    procs = {}
    for name, args in (
        ("healer", ["processors", "heal"]),
        ("router", ["routing", "policy-worker", "--history-dir", str(state_dir / "routing-history")]),
    ):
        log = open(state_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "backbone", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return procs


def set_routing_config(settings: Any) -> int:
    """Save :data:`DEMO_ROUTING` as ``routing.config`` (validated by its schema); return its version."""
    from configuration.store import ConfigStore

    with ConfigStore(settings) as store:
        return int(
            store.set("routing.config", DEMO_ROUTING, author="demo", reason="the demo's routing").version
        )


def _openai_provider(scenario: LiveScenario) -> httpx.AsyncClient:
    """A local fake of ``POST /v1/chat/completions`` (OpenAI's documented request and response): an
    OpenAI-style completion with ``usage``, or ``503`` and an error object during the outage."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        model, provider = body["model"], request.headers["x-provider"]
        if provider == OUTAGE_PROVIDER and scenario.in_outage():
            return httpx.Response(503, json={"error": {"message": "The model is overloaded (injected outage).",
                                                       "type": "server_error", "code": 503}})  # fmt: skip
        chars = sum(len(m.get("content") or "") for m in body.get("messages", []))
        prompt_tokens = math.ceil(chars / 4)
        price = DEMO_ROUTING["models"].get(model, {})
        cost = (prompt_tokens * price.get("usd_per_million_input_tokens", 0.0)
                + OUTPUT_TOKENS * price.get("usd_per_million_output_tokens", 0.0)) / 1e6  # fmt: skip
        return httpx.Response(200, json={
            "id": f"chatcmpl-{uuid.uuid5(uuid.NAMESPACE_URL, f'{model}/{scenario.now}')}", "object": "chat.completion",
            "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": "..."}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": OUTPUT_TOKENS,
                      "total_tokens": prompt_tokens + OUTPUT_TOKENS, "cost": round(cost, 9)},
        })  # fmt: skip

    return httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://provider.invalid")


@dataclass
class LiveScenario:
    """The demo's event-time clock and what each tick saw."""

    start: float
    now: float = 0.0
    ticks: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.now = self.start

    def tick_time(self, k: int) -> float:
        return self.start + k * TICK_SECONDS

    def in_outage(self) -> bool:
        return self.tick_time(OUTAGE_TICKS[0]) <= self.now < self.tick_time(OUTAGE_TICKS[1])

    async def sleep(self, seconds: float) -> None:
        """The client's backoff: event time moves on, the wall clock does not wait."""
        self.now += seconds


class _Decisions:
    """Reads ``routing.policy-decisions`` from its end offsets at construction (assigned, no group)."""

    def __init__(self, settings: Any, topic: str = "routing.policy-decisions") -> None:
        from confluent_kafka import Consumer, TopicPartition

        from streams.offsets import end_offsets

        self.c = Consumer({**settings.kafka.librdkafka(), "group.id": f"demo-{uuid.uuid4().hex}",
                           "enable.auto.commit": False, "fetch.wait.max.ms": 10})  # fmt: skip
        ends = end_offsets(settings.kafka, topic)
        self.c.assign([TopicPartition(topic, p, end) for p, end in ends.items()])
        self.seen: dict[str, list[dict[str, Any]]] = {}

    def wait(self, request_id: str, timeout_seconds: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_seconds
        while request_id not in self.seen and time.monotonic() < deadline:
            m = self.c.poll(0.2)
            if m is None or m.error():
                continue
            d = json.loads(m.value() or b"{}")
            self.seen.setdefault(d["request_id"], []).append(d)
        got = self.seen.get(request_id)
        return got[0] if got else None

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            m = self.c.poll(0.1)
            if m is not None and not m.error():
                d = json.loads(m.value() or b"{}")
                self.seen.setdefault(d["request_id"], []).append(d)

    def close(self) -> None:
        self.c.close()


def short(model: str | None) -> str:
    """A model's name without its vendor prefix (``google/gemini-3-pro-preview`` → ``gemini-3-pro-preview``)."""
    return "none" if model is None else model.rsplit("/", 1)[-1]


def _target_name(provider: str, model: str) -> str:
    return f"{provider}/{model}"


async def _run_ticks(settings: Any, serde: Any, prompts: list[tuple[str, str]], scenario: LiveScenario,
                     procs: dict[str, subprocess.Popen[bytes]], say: Any) -> dict[str, Any]:  # fmt: skip
    import redis
    from confluent_kafka import Producer

    from backbone.client import Client
    from processors.healing.client import CallFailed, HealingClient, ProviderError
    from processors.healing.read_model import HealingReadModel
    from processors.routing.policy import Outcome, PolicyRequest
    from streams.envelope import deterministic_id

    read_model = HealingReadModel(
        settings.postgres.dsn(), redis.Redis.from_url(settings.redis.dsn(), socket_timeout=1.0)
    )
    client = Client(settings, serde)
    json_out = Producer({**settings.kafka.librdkafka(), "linger.ms": 0, "acks": "all"})
    decisions = _Decisions(settings)
    acks: list[float] = []

    def emit(schema: str, key: str, data: dict[str, Any]) -> None:
        eid = deterministic_id("demo", data["request_id"], data["provider"], data["model"], data["attempt"])
        client.produce("agent.events", schema, [data], ids=[eid], source="/demo/agent")
        acks.append(time.perf_counter())

    healing = HealingClient(circuits=read_model.circuit_state, emit=emit, sleep=scenario.sleep,
                            clock=lambda: scenario.now, base_seconds=1.0, max_seconds=4.0)  # fmt: skip
    provider = _openai_provider(scenario)

    async def call(target: Any, messages: list[dict[str, str]]) -> Any:
        r = await provider.post("/v1/chat/completions", json={"model": target.model, "messages": messages},
                                headers={"x-provider": target.provider})  # fmt: skip
        if r.status_code >= 400:
            raise ProviderError("server_error" if r.status_code >= 500 else "rate_limited",
                                r.json()["error"]["message"], http_status=r.status_code)  # fmt: skip
        return r.json()

    opened_wall_ms: float | None = None
    first_failure_ack: float | None = None
    try:
        for k, (run, prompt) in enumerate(prompts):
            scenario.now = max(scenario.now, scenario.tick_time(k))
            at = datetime.fromtimestamp(scenario.now, UTC)
            rid = f"demo-route-{k:03d}"
            request = PolicyRequest(request_id=rid, requested_at=at, prompt=prompt, task_type="code")
            json_out.produce(
                "routing.policy-requests", key=rid.encode(), value=json.dumps(request.to_json()).encode()
            )
            json_out.flush(10)
            decision = decisions.wait(rid, 30.0)
            if decision is None:
                alive = {n: p.poll() is None for n, p in procs.items()}
                raise TimeoutError(f"no routing decision for {rid} in 30 s (workers alive: {alive})")
            row: dict[str, Any] = {"tick": k, "event_time": at, "outage": scenario.in_outage(),
                                   "router_chose": decision["model"], "router_reason": decision["reason"],
                                   "est_cost_usd": next((c["est_cost_usd"] for c in decision["candidates"] if c["chosen"]), None),
                                   "circuits_seen_by_router": {c["model"]: c["circuit_state"] for c in decision["candidates"]}}  # fmt: skip
            messages = [{"role": "user", "content": prompt}]
            served = None
            if decision["model"]:
                chain = [
                    _target_name(DEMO_ROUTING["models"][m]["provider"], m) for m in decision["fallbacks"]
                ]
                n_acks = len(acks)
                async with healing.call(decision["provider"], decision["model"], run_id=rid, request_id=rid,
                                        agent="demo-router", fallbacks=chain) as c:  # fmt: skip
                    try:
                        response = await c.invoke(functools.partial(call, messages=messages))
                        served = c.served_by.model if c.served_by else None
                        row["cost_usd"] = response["usage"]["cost"]
                    except CallFailed:
                        served = None
                if first_failure_ack is None and any(a["outcome"] == "server_error" for a in c.attempts):
                    first_failure_ack = acks[n_acks]
                row["attempts"] = [(a["model"], a["outcome"]) for a in c.attempts]
                tried = list(
                    dict.fromkeys(
                        a["model"] for a in c.attempts if a["outcome"] not in ("ok", "circuit_open")
                    )
                )
                for m in tried:
                    if m != served:
                        o = Outcome(
                            request_id=rid,
                            model=m,
                            success=False,
                            occurred_at=datetime.fromtimestamp(scenario.now, UTC),
                        )
                        json_out.produce(
                            "routing.outcomes", key=rid.encode(), value=json.dumps(o.to_json()).encode()
                        )
                if served:
                    o = Outcome(
                        request_id=rid, model=served, success=True,
                        occurred_at=datetime.fromtimestamp(scenario.now, UTC), cost_usd=row.get("cost_usd"),
                    )  # fmt: skip
                    json_out.produce(
                        "routing.outcomes", key=rid.encode(), value=json.dumps(o.to_json()).encode()
                    )
                json_out.flush(10)
            row["served_by"] = served
            # the agent's own call of this tick, through the same client
            async with healing.call(*AGENT_MODEL, run_id=f"demo-agent-{run}", step=k, request_id=f"demo-agent-{k:03d}",
                                    agent="demo-agent", fallbacks=[AGENT_FALLBACK]) as c:  # fmt: skip
                try:
                    await c.invoke(functools.partial(call, messages=messages))
                    row["agent_served_by"] = c.served_by.model if c.served_by else None
                except CallFailed:
                    row["agent_served_by"] = None
            row["agent_attempts"] = [(a["model"], a["outcome"]) for a in c.attempts]
            row["google_circuit"] = read_model.circuit_state(f"provider:{OUTAGE_PROVIDER}")
            if opened_wall_ms is None and first_failure_ack is not None:
                # how long from the first failing call's acknowledgement until the read model says open
                deadline = time.monotonic() + 15.0
                while time.monotonic() < deadline:
                    if read_model.circuit_state(f"provider:{OUTAGE_PROVIDER}") == "open":
                        opened_wall_ms = (time.perf_counter() - first_failure_ack) * 1000
                        row["google_circuit"] = "open"
                        break
                    await asyncio.sleep(0.005)
            scenario.ticks.append(row)
            say(f"  {at:%H:%M:%S} {'outage' if row['outage'] else '      '} router: {short(decision['model'])}"
                f" → {short(served)}; agent: {short(row['agent_served_by'])}; {OUTAGE_PROVIDER} {row['google_circuit']}")  # fmt: skip
            await asyncio.sleep(0.3)  # the healer's turn
        decisions.drain(1.0)
        fallback_decisions = sum(1 for ds in decisions.seen.values() for d in ds if d.get("fallback_from"))
    finally:
        json_out.flush(10)
        del json_out
        decisions.close()
        client.close()
        await provider.aclose()
    return {"opened_after_first_failure_ms": opened_wall_ms, "router_fallback_decisions": fallback_decisions,
            "read_model": read_model}  # fmt: skip


def run_live(settings: Any, serde: Any, data: Path, procs: dict[str, subprocess.Popen[bytes]],
             say: Any, *, start: datetime) -> dict[str, Any]:  # fmt: skip
    """Run the ticks (see the module docstring) and return the report's ``live`` section."""
    prompts = task_prompts(data)[:MAX_PROMPTS]
    scenario = LiveScenario(start=start.timestamp())
    say(f"live: {len(prompts)} real task prompts routed, an outage of {OUTAGE_PROVIDER} injected at ticks "
        f"{OUTAGE_TICKS[0]}..{OUTAGE_TICKS[1] - 1} ({TICK_SECONDS:.0f} s of event time per tick)")  # fmt: skip
    t = time.perf_counter()
    got = asyncio.run(_run_ticks(settings, serde, prompts, scenario, procs, say))
    read_model = got.pop("read_model")
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(settings.postgres.dsn(), row_factory=dict_row) as conn:
        chain = conn.execute(
            "SELECT kind, subject, event_time, details FROM proj_healing.decisions"
            " WHERE subject = ANY(%s) AND kind LIKE 'circuit_%%' ORDER BY event_time, seq",
            ([f"circuit:provider:{OUTAGE_PROVIDER}", f"circuit:model:{AGENT_MODEL[0]}/{AGENT_MODEL[1]}"],),
        ).fetchall()
        warnings = conn.execute(
            "SELECT signal, count(*) AS n, count(DISTINCT run_id) AS runs FROM proj_healing.warnings"
            " WHERE run_id NOT LIKE 'demo-%%' GROUP BY signal ORDER BY signal"
        ).fetchall()
    del read_model
    ticks = scenario.ticks
    phases: dict[str, dict[str, Any]] = {}
    for row in ticks:
        k = row["tick"]
        phase = "before" if k < OUTAGE_TICKS[0] else "outage" if k < OUTAGE_TICKS[1] else "after"
        p = phases.setdefault(phase, {"requests": 0, "router_chose": Counter(), "served_by": Counter(),
                                      "client_fallbacks": 0, "cost_usd": 0.0, "always_strong_usd": 0.0})  # fmt: skip
        p["requests"] += 1
        p["router_chose"][row["router_chose"]] += 1
        p["served_by"][row["served_by"]] += 1
        p["client_fallbacks"] += int(row["served_by"] is not None and row["served_by"] != row["router_chose"])
        p["cost_usd"] += row.get("cost_usd") or 0.0
    strong = DEMO_ROUTING["models"][AGENT_MODEL[1]]
    for row, (_, prompt) in zip(ticks, prompts, strict=False):
        k = row["tick"]
        phase = "before" if k < OUTAGE_TICKS[0] else "outage" if k < OUTAGE_TICKS[1] else "after"
        phases[phase]["always_strong_usd"] += (math.ceil(len(prompt) / 4) * strong["usd_per_million_input_tokens"]
                                               + OUTPUT_TOKENS * strong["usd_per_million_output_tokens"]) / 1e6  # fmt: skip
    return {
        "prompts": len(prompts), "seconds": round(time.perf_counter() - t, 1),
        "outage": {"provider": OUTAGE_PROVIDER, "from": scenario.tick_time(OUTAGE_TICKS[0]),
                   "until": scenario.tick_time(OUTAGE_TICKS[1])},
        "opened_after_first_failure_ms": got["opened_after_first_failure_ms"],
        "router_fallback_decisions": got["router_fallback_decisions"],
        "phases": {k: {**v, "router_chose": dict(v["router_chose"]), "served_by": {str(m): n for m, n in v["served_by"].items()}}
                   for k, v in phases.items()},
        "circuit_chain": [{"kind": r["kind"], "subject": r["subject"], "event_time": r["event_time"].isoformat(),
                           "details": r["details"]} for r in chain],
        "warnings_live": [dict(r) for r in warnings],
        "final_circuit": ticks[-1]["google_circuit"] if ticks else None,
    }  # fmt: skip


def demo_start_time(last_event: datetime | None) -> datetime:
    """The live part's event-time start: the next full hour after the runs' last event (deterministic)."""
    base = last_event or datetime(2025, 11, 19, tzinfo=UTC)
    return base.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)


def worker_env(settings: Any) -> dict[str, str]:
    """The environment of a worker subprocess on this stack."""
    env = dict(os.environ)
    env["BACKBONE_KAFKA__BOOTSTRAP_SERVERS"] = settings.kafka.bootstrap_servers
    env["BACKBONE_POSTGRES__URL"] = settings.postgres.dsn()
    env["BACKBONE_REDIS__URL"] = settings.redis.dsn()
    env.setdefault("BACKBONE_LOG_FORMAT", "json")
    return env
