"""The client agents call models through: honours open circuits, retries, falls back, emits every attempt.

Usage in an agent runtime::

    client = HealingClient(circuits=read_model.circuit_state, emit=producer_sink, chains={"Google": ["Google AI Studio"]})
    async with client.call("Google", "google/gemini-3-pro-preview", run_id=run, step=7, agent="coder") as call:
        response = await call.invoke(lambda target: my_llm(target.provider, target.model, messages))

For each target of the chain (the requested ``provider/model`` first, then the fallbacks) the client
reads the circuits ``provider:P`` and ``model:P/M`` (``circuits`` callable: the Redis read model with
PostgreSQL fallback, :meth:`processors.healing.read_model.HealingReadModel.circuit_state`) and skips
the target when one is ``open``. A retryable failure (``rate_limited``, ``timeout``,
``server_error``) is retried on the same target up to ``max_attempts`` times; tenacity does the
waiting, with exponential backoff and full jitter seeded by the request id
(:func:`processors.healing.retry.backoff_seconds`). A failure that is not retryable
(``context_length``, ``content_filter``, ``auth``) moves on to the next target at once. Every attempt
is emitted as a ``sophia.agent.LlmCall`` (outcome, error kind, HTTP status, latency in ms, cost in
USD, request id, attempt number). When no target answers, :class:`CallFailed` is raised with every
attempt.

The model call itself is the caller's: it raises :class:`ProviderError` (or an ``httpx`` error, which
:func:`classify` maps) on failure and returns the provider's response; an OpenAI-style mapping
(``usage.prompt_tokens``, ``usage.completion_tokens``, ``usage.cost``, ``id``,
``choices[0].finish_reason``) fills the token and cost fields.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog
from tenacity import AsyncRetrying, RetryError, retry_if_exception, stop_after_attempt

from processors.healing.breaker import circuit_keys
from processors.healing.retry import RETRYABLE, backoff_seconds

__all__ = ["Call", "CallFailed", "HealingClient", "ProviderError", "Target", "classify"]

log = structlog.get_logger(__name__)

LLM_CALL = "sophia.agent.LlmCall"


class ProviderError(Exception):
    """A failed model call, classified.

    Attributes:
        kind: ``rate_limited``, ``timeout``, ``server_error``, ``context_length``, ``content_filter`` or ``auth``.
        http_status: the provider's HTTP status, when there was one.
    """

    def __init__(self, kind: str, message: str = "", *, http_status: int | None = None) -> None:
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind
        self.http_status = http_status


class CallFailed(Exception):
    """No target of the chain answered.

    Attributes:
        attempts: ``[{"provider", "model", "attempt", "outcome", "http_status"}]`` in order; skipped
            (open) targets appear with outcome ``circuit_open``.
    """

    def __init__(self, request_id: str, attempts: list[dict[str, Any]]) -> None:
        tried = (
            ", ".join(f"{a['provider']}/{a['model']}#{a['attempt']}={a['outcome']}" for a in attempts)
            or "nothing"
        )
        super().__init__(f"request {request_id}: every target failed or was open ({tried})")
        self.request_id = request_id
        self.attempts = attempts


def classify(exc: BaseException) -> ProviderError | None:
    """Map an exception of a model call to a :class:`ProviderError`; ``None`` when it is not a provider failure.

    ``httpx.HTTPStatusError``: 429 -> rate_limited; 408, 504 -> timeout; 401, 403 -> auth; other 5xx ->
    server_error; 400/413/422 whose body mentions the context length -> context_length, a content
    filter or safety block -> content_filter. ``httpx.TimeoutException`` and ``TimeoutError`` -> timeout;
    other ``httpx.TransportError`` -> server_error.
    """
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        text = exc.response.text.lower()
        if status == 429:
            return ProviderError("rate_limited", http_status=status)
        if status in (408, 504):
            return ProviderError("timeout", http_status=status)
        if status in (401, 403):
            return ProviderError("auth", http_status=status)
        if status >= 500:
            return ProviderError("server_error", http_status=status)
        if "context" in text and ("length" in text or "window" in text or "too long" in text):
            return ProviderError("context_length", http_status=status)
        if "content_filter" in text or "content filter" in text or "safety" in text:
            return ProviderError("content_filter", http_status=status)
        return None
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return ProviderError("timeout")
    if isinstance(exc, httpx.TransportError):
        return ProviderError("server_error")
    return None


@dataclass(frozen=True, slots=True)
class Target:
    """One provider and model to try."""

    provider: str
    model: str


def _usage(response: Any) -> dict[str, Any]:
    if not isinstance(response, Mapping):
        return {}
    usage = response.get("usage") or {}
    choices = response.get("choices") or [{}]
    cost = usage.get("cost")
    return {
        "response_id": response.get("id"),
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "cost_usd": float(cost) if cost is not None else None,
        "finish_reason": (choices[0] or {}).get("finish_reason") if isinstance(choices[0], Mapping) else None,
    }


@dataclass(slots=True)
class Call:
    """One request through the client (what ``async with client.call(...)`` yields)."""

    client: HealingClient
    targets: list[Target]
    request_id: str
    run_id: str
    step: int
    agent: str | None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    served_by: Target | None = None

    async def invoke(self, fn: Callable[[Target], Awaitable[Any]]) -> Any:
        """Run ``fn(target)`` along the chain until one answers; return its response.

        Raises:
            CallFailed: every target was open or failed.
            Exception: whatever ``fn`` raised that :func:`classify` does not call a provider failure.
        """
        c = self.client
        for target in self.targets:
            state = c.state_of(target)
            if state == "open":
                self.attempts.append({"provider": target.provider, "model": target.model, "attempt": 0,
                                      "outcome": "circuit_open", "http_status": None})  # fmt: skip
                continue
            n = 0

            async def once(target: Target = target) -> Any:
                nonlocal n
                n += 1
                started = time.monotonic()
                try:
                    response = await fn(target)
                except Exception as exc:
                    err = classify(exc)
                    if err is None:
                        raise
                    self._emit(target, n, started, err.kind, err.http_status, None)
                    raise err from exc
                self._emit(target, n, started, "ok", None, response)
                return response

            retrying = AsyncRetrying(
                stop=stop_after_attempt(c.max_attempts),
                wait=lambda rs: backoff_seconds(
                    self.request_id, rs.attempt_number, c.base_seconds, c.max_seconds
                ),
                retry=retry_if_exception(lambda e: isinstance(e, ProviderError) and e.kind in RETRYABLE),
                sleep=c.sleep,
                reraise=True,
            )
            try:
                response = await retrying(once)
            except (ProviderError, RetryError):
                continue
            self.served_by = target
            return response
        raise CallFailed(self.request_id, self.attempts)

    def _emit(
        self, target: Target, attempt: int, started: float, outcome: str, status: int | None, response: Any
    ) -> None:
        c = self.client
        latency_ms = round((time.monotonic() - started) * 1000)
        data: dict[str, Any] = {
            "run_id": self.run_id,
            "step": self.step,
            "event_time": datetime.fromtimestamp(c.clock(), UTC),
            "model": target.model,
            "provider": target.provider,
            "response_id": None,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_tokens": 0,
            "reasoning_tokens": 0,
            "cost_usd": None,
            "finish_reason": None,
            "latency_ms": latency_ms,
            "outcome": outcome,
            "error_kind": None if outcome == "ok" else outcome,
            "http_status": status,
            "request_id": self.request_id,
            "attempt": attempt,
            "agent": self.agent,
        }
        if outcome == "ok":
            data.update({k: v for k, v in _usage(response).items() if v is not None})
        self.attempts.append({"provider": target.provider, "model": target.model, "attempt": attempt,
                              "outcome": outcome, "http_status": status})  # fmt: skip
        c.emit(LLM_CALL, self.run_id, data)


class HealingClient:
    """Calls models through the healer's circuits.

    Args:
        circuits: ``circuit key -> state`` (``closed``, ``open``, ``half_open``), e.g.
            ``HealingReadModel.circuit_state``; an error there is logged and the circuit read as closed
            (the client fails open: a broken read model must not stop every agent).
        emit: ``(schema, key, data)`` sink for the ``LlmCall`` events, e.g. a producer wrapper.
        chains: fallback chains ``{provider or provider/model: ["provider" or "provider/model", ...]}``.
        max_attempts: attempts per target for retryable failures.
        base_seconds, max_seconds: full-jitter backoff base and cap, in seconds.
        sleep: the async sleep tenacity waits with (tests pass a recorder).
        clock: unix-seconds clock for the events' event time.
    """

    def __init__(
        self,
        *,
        circuits: Callable[[str], str],
        emit: Callable[[str, str, dict[str, Any]], None],
        chains: Mapping[str, list[str]] | None = None,
        max_attempts: int = 3,
        base_seconds: float = 1.0,
        max_seconds: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.circuits = circuits
        self.emit = emit
        self.chains = dict(chains or {})
        self.max_attempts = max_attempts
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self.sleep = sleep
        self.clock = clock

    def state_of(self, target: Target) -> str:
        """The worst state of the target's provider and model circuits."""
        states = []
        for key in circuit_keys(target.provider, target.model):
            try:
                states.append(self.circuits(key))
            except Exception as exc:  # noqa: BLE001 - fail open, said in the log
                log.warning("circuit_state_unreadable", circuit=key, error=str(exc))
                states.append("closed")
        return "open" if "open" in states else ("half_open" if "half_open" in states else "closed")

    def chain_for(self, provider: str, model: str, fallbacks: list[str] | None = None) -> list[Target]:
        """The targets in order: the requested one, then ``fallbacks`` or the configured chain."""
        names = (
            fallbacks
            if fallbacks is not None
            else self.chains.get(f"{provider}/{model}", self.chains.get(provider, []))
        )
        out = [Target(provider, model)]
        for name in names:
            p, _, m = name.partition("/")
            t = Target(p, m or model)
            if t not in out:
                out.append(t)
        return out

    @asynccontextmanager
    async def call(
        self,
        provider: str,
        model: str,
        *,
        run_id: str,
        step: int = 0,
        agent: str | None = None,
        request_id: str | None = None,
        fallbacks: list[str] | None = None,
    ) -> AsyncIterator[Call]:
        """A request to ``provider``/``model`` (see the module docstring); yields a :class:`Call`."""
        yield Call(
            self,
            self.chain_for(provider, model, fallbacks),
            request_id or str(uuid.uuid4()),
            run_id,
            step,
            agent,
        )
