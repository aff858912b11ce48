"""The client: skips open circuits, retries with seeded full jitter, falls back, emits a valid LlmCall per attempt."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from processors.healing.client import CallFailed, HealingClient, ProviderError, Target, classify
from processors.healing.retry import backoff_seconds
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde

SERDE = AvroSerde(EmbeddedRegistry())


class Provider:
    """An OpenAI-style HTTP endpoint per provider (httpx MockTransport) that fails as scripted."""

    def __init__(self, script: dict[str, list[int]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.seen: list[str] = []
        self.http = httpx.AsyncClient(transport=httpx.MockTransport(self.handle), base_url="http://llm")

    def handle(self, request: httpx.Request) -> httpx.Response:
        provider = request.url.path.strip("/")
        self.seen.append(provider)
        todo = self.script.get(provider) or [200]
        status = todo.pop(0) if len(todo) > 1 else todo[0]
        if status == 200:
            return httpx.Response(200, json={"id": f"gen-{len(self.seen)}", "usage": {"prompt_tokens": 10,
                                  "completion_tokens": 3, "cost": 0.002}, "choices": [{"finish_reason": "stop"}]})  # fmt: skip
        if status == 400:
            return httpx.Response(
                400, json={"error": {"message": "This model's maximum context length is 8192 tokens"}}
            )
        return httpx.Response(status, text="busy")

    async def __call__(self, target: Target) -> Any:
        r = await self.http.post(f"/{target.provider}", json={"model": target.model})
        r.raise_for_status()
        return r.json()


def make(
    circuits: dict[str, str] | None = None, **kw: Any
) -> tuple[HealingClient, list[dict[str, Any]], list[float]]:
    events: list[dict[str, Any]] = []
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    def emit(schema: str, key: str, data: dict[str, Any]) -> None:
        SERDE.check(schema, data)  # every attempt is a valid LlmCall of the latest schema
        events.append(data)

    client = HealingClient(circuits=lambda k: (circuits or {}).get(k, "closed"), emit=emit,
                           chains={"A": ["B", "C/m2"]}, sleep=sleep, clock=lambda: 1763506507.0, **kw)  # fmt: skip
    return client, events, sleeps


async def test_retries_with_seeded_full_jitter_then_succeeds() -> None:
    client, events, sleeps = make()
    p = Provider({"A": [503, 429, 200]})
    async with client.call("A", "m1", run_id="r", step=2, request_id="req-1", agent="coder") as call:
        out = await call.invoke(p)
    assert out["id"] == "gen-3" and call.served_by == Target("A", "m1")
    assert [(e["outcome"], e["http_status"], e["attempt"]) for e in events] == [
        ("server_error", 503, 1), ("rate_limited", 429, 2), ("ok", None, 3)
    ]  # fmt: skip
    assert sleeps == [backoff_seconds("req-1", 1, 1.0, 30.0), backoff_seconds("req-1", 2, 1.0, 30.0)]
    assert (
        events[-1]["cost_usd"] == 0.002
        and events[-1]["prompt_tokens"] == 10
        and events[-1]["agent"] == "coder"
    )
    assert all(e["request_id"] == "req-1" and e["latency_ms"] >= 0 for e in events)


async def test_open_circuit_is_skipped_and_fallback_taken() -> None:
    client, events, _ = make({"provider:A": "open"})
    p = Provider({})
    async with client.call("A", "m1", run_id="r") as call:
        await call.invoke(p)
    assert p.seen == ["B"] and call.served_by == Target("B", "m1")
    assert call.attempts[0]["outcome"] == "circuit_open" and [e["provider"] for e in events] == ["B"]


async def test_not_retryable_moves_on_and_exhaustion_raises_call_failed() -> None:
    client, events, sleeps = make({"model:B/m1": "open"})
    p = Provider({"A": [400], "C": [503]})
    with pytest.raises(CallFailed) as exc:
        async with client.call("A", "m1", run_id="r", request_id="q") as call:
            await call.invoke(p)
    assert [(e["provider"], e["outcome"]) for e in events] == [
        ("A", "context_length"), ("C", "server_error"), ("C", "server_error"), ("C", "server_error")
    ]  # fmt: skip
    assert events[1]["model"] == "m2" and len(sleeps) == 2
    assert [a["outcome"] for a in exc.value.attempts][1] == "circuit_open"


async def test_a_non_provider_error_propagates_and_a_broken_read_model_fails_open() -> None:
    def broken(key: str) -> str:
        raise ConnectionError("redis and postgres down")

    client = HealingClient(circuits=broken, emit=lambda *a: None)
    assert client.state_of(Target("A", "m")) == "closed"

    async def bug(target: Target) -> Any:
        raise KeyError("oops")

    with pytest.raises(KeyError):
        async with client.call("A", "m", run_id="r") as call:
            await call.invoke(bug)


def test_classify() -> None:
    req = httpx.Request("POST", "http://x")
    resp = lambda s, body="": httpx.HTTPStatusError(
        "e", request=req, response=httpx.Response(s, text=body, request=req)
    )
    assert classify(resp(429)).kind == "rate_limited"
    assert classify(resp(504)).kind == "timeout" and classify(resp(401)).kind == "auth"
    assert classify(resp(502)).kind == "server_error"
    assert classify(resp(400, "blocked by content_filter")).kind == "content_filter"
    assert classify(resp(404)) is None and classify(ValueError()) is None
    assert classify(httpx.ReadTimeout("t")).kind == "timeout"
    assert classify(ProviderError("auth")).kind == "auth"
