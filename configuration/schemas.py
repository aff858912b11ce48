"""Value schemas of configuration keys: pydantic models registered for a key or a key prefix.

A key's schema is the one registered for the key itself or, failing that, for its longest
registered prefix (``routing.`` matches ``routing.policy.default``). A key with no schema takes any
JSON object. A value is stored as the model's JSON dump, so defaults are filled in and every
reader sees the same shape.

The default registry holds the schemas of the platform's own configuration: routing policies,
provider limits, agent roles and healing thresholds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from configuration.errors import ConfigKeyError, ConfigValueError

__all__ = [
    "KEY_PATTERN",
    "AgentRole",
    "HealingThresholds",
    "ProviderLimits",
    "RoutingABSplit",
    "RoutingConfig",
    "RoutingModel",
    "RoutingPolicy",
    "RoutingPolicyRule",
    "ValueSchemaRegistry",
    "check_key",
    "default_schemas",
]

#: Keys are dotted lower-case paths: ``routing.policy.default``, ``agents.role.reviewer``.
KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]*(\.[a-z0-9_\-]+)*$")
_MAX_KEY_LENGTH = 200


def check_key(key: str) -> str:
    """Return ``key`` when it is a valid configuration key.

    Raises:
        ConfigKeyError: empty, longer than 200 characters, or not dotted lower-case segments
            of ``[a-z0-9_-]``.
    """
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY_LENGTH or not KEY_PATTERN.match(key):
        raise ConfigKeyError(
            f"invalid configuration key {key!r}: use dotted lower-case segments of [a-z0-9_-], "
            f"at most {_MAX_KEY_LENGTH} characters, e.g. routing.policy.default"
        )
    return key


class RoutingPolicy(BaseModel):
    """How the router picks a model for a request.

    Attributes:
        strategy: ``cheapest``, ``fastest`` or ``weighted``.
        models: candidate model names, in preference order.
        weights: per-model weight for ``weighted`` (relative, unitless).
        max_cost_usd: ceiling of the expected cost of one call in US dollars.
        fallback_model: model used when every candidate is unhealthy.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Literal["cheapest", "fastest", "weighted"]
    models: list[str] = Field(min_length=1)
    weights: dict[str, float] = Field(default_factory=dict)
    max_cost_usd: float | None = Field(default=None, gt=0)
    fallback_model: str | None = None


class ProviderLimits(BaseModel):
    """Rate and spend limits of one LLM provider.

    Attributes:
        requests_per_minute: request rate ceiling.
        tokens_per_minute: token rate ceiling (prompt + completion).
        daily_budget_usd: spend ceiling per UTC day in US dollars.
        timeout_seconds: request timeout.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: int = Field(gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    daily_budget_usd: float | None = Field(default=None, ge=0)
    timeout_seconds: float = Field(default=60.0, gt=0)


class AgentRole(BaseModel):
    """An agent's role: its model, prompt version and tools.

    Attributes:
        model: model name.
        prompt_version: version tag of the system prompt.
        tools: names of the tools it may call.
        max_steps: step ceiling of one run.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    prompt_version: str
    tools: list[str] = Field(default_factory=list)
    max_steps: int = Field(default=50, gt=0)


class HealingThresholds(BaseModel):
    """When the healer acts (read by ``processors.healing``; every duration is event time).

    Attributes:
        error_rate: fraction of failed calls (0..1) over the window that opens a circuit.
        window_seconds: length of the sliding event-time window of a circuit breaker.
        latency_p95_seconds: p95 latency above which a provider counts as degraded.
        cooldown_seconds: minimum time between two healing actions on one target.
        min_calls: calls the window must hold before its failure rate can open a circuit.
        consecutive_failures: failures in a row that open a circuit whatever the window says.
        open_seconds: cool-down of an open circuit before it turns half-open.
        half_open_max_probes: calls let through while half-open.
        half_open_successes: successful probes that close a half-open circuit (at most the probes).
        retry_max_attempts: attempts on one target before the request falls back (1 = no retry).
        retry_base_seconds: backoff base; attempt n waits uniform(0, min(max, base * 2**(n-1))).
        retry_max_seconds: backoff cap.
        fallback_chains: ``{provider or provider/model: [next, ...]}``, tried in order after it.
        failing_streak: failed commands in a row that raise an agent warning.
        loop_repeats: occurrences of one command among the last ``loop_window`` that count as a loop.
        loop_window: how many recent commands the loop check looks at. Default 15 (was 10): with the
            trouble gate, 15 gave the best F1 both at the end and at the midpoint of the 120 shared
            runs among 10, 15 and 20 (a choice made on those runs; README, Quality on real data).
        stall_seconds: event time without progress (a new command that succeeds) that raises a warning.
        runaway_factor: a run whose tokens, cost or steps exceed this multiple of its peers' median warns.
            Default 2.0 (was 3.0): on the shared runs 2x the peers' median tokens already flags mostly
            runs that do not resolve (README, Quality on real data).
        runaway_min_peers: finished peer runs needed before the runaway check (and the trouble gate) speaks.
        trouble_min_step_ratio: the trouble gate: ``loop`` and ``failing_streak`` at level ``warn``
            are held until the run's step count exceeds this multiple of the median final step count of
            the finished peer runs (then the highest level reached is raised); higher levels are raised
            at once. 0 raises every level at once, as does a healer with fewer than
            ``runaway_min_peers`` finished peers. Default 1.0 (no tuning: "longer than the typical
            run"): on the 120 shared runs a command run 3 times is as common in runs that resolve (the
            agent reruns its reproduce script after each edit) as in those that do not, except in a
            run already longer than its peers (``backbone eval healing --split time``).
        rollback_mode: ``auto`` (roll back), ``dry_run`` (recommend only) or ``approval`` (escalate, wait for ack).
        rollback_window_seconds: length of the windows before and after a config change that are compared.
        rollback_min_calls: calls each window must hold before the test runs.
        rollback_alpha: significance level of the one-sided tests.
        rollback_max_per_hour: rollbacks the healer may carry out per event-time hour.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    error_rate: float = Field(default=0.5, ge=0, le=1)
    window_seconds: float = Field(default=60.0, gt=0)
    latency_p95_seconds: float | None = Field(default=None, gt=0)
    cooldown_seconds: float = Field(default=60.0, ge=0)
    min_calls: int = Field(default=5, ge=1)
    consecutive_failures: int = Field(default=5, ge=1)
    open_seconds: float = Field(default=30.0, gt=0)
    half_open_max_probes: int = Field(default=1, ge=1)
    half_open_successes: int = Field(default=1, ge=1)
    retry_max_attempts: int = Field(default=3, ge=1)
    retry_base_seconds: float = Field(default=1.0, gt=0)
    retry_max_seconds: float = Field(default=30.0, gt=0)
    fallback_chains: dict[str, list[str]] = Field(default_factory=dict)
    failing_streak: int = Field(default=5, ge=1)
    loop_repeats: int = Field(default=3, ge=2)
    loop_window: int = Field(default=15, ge=2)
    stall_seconds: float = Field(default=600.0, gt=0)
    runaway_factor: float = Field(default=2.0, gt=1)
    runaway_min_peers: int = Field(default=5, ge=1)
    trouble_min_step_ratio: float = Field(default=1.0, ge=0)
    rollback_mode: Literal["auto", "dry_run", "approval"] = "auto"
    rollback_window_seconds: float = Field(default=600.0, gt=0)
    rollback_min_calls: int = Field(default=20, ge=2)
    rollback_alpha: float = Field(default=0.01, gt=0, lt=1)
    rollback_max_per_hour: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> HealingThresholds:
        if self.half_open_successes > self.half_open_max_probes:
            raise ValueError("half_open_successes cannot exceed half_open_max_probes")
        if self.retry_base_seconds > self.retry_max_seconds:
            raise ValueError("retry_base_seconds cannot exceed retry_max_seconds")
        if self.loop_repeats > self.loop_window:
            raise ValueError("loop_repeats cannot exceed loop_window")
        return self


class RoutingModel(BaseModel):
    """One model the router may choose (``routing.config`` → ``models.<name>``).

    Attributes:
        provider: a provider named under ``providers``.
        capabilities: what it can do (``chat``, ``code``, ``vision``, ``json``...).
        context_window_tokens: longest prompt + answer in tokens.
        usd_per_million_input_tokens, usd_per_million_output_tokens: prices in US dollars.
        expected_output_tokens: answer tokens assumed per call for cost estimates.
        latency_prior_ms: latency assumed until outcomes are observed.
        requests_per_minute: the model's rate limit (None: the provider's).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str
    capabilities: list[str] = Field(default_factory=lambda: ["chat"])
    context_window_tokens: int = Field(gt=0)
    usd_per_million_input_tokens: float = Field(ge=0)
    usd_per_million_output_tokens: float = Field(ge=0)
    expected_output_tokens: int = Field(default=256, ge=0)
    latency_prior_ms: float = Field(default=1000.0, gt=0)
    requests_per_minute: int | None = Field(default=None, gt=0)


class RoutingPolicyRule(BaseModel):
    """A routing policy (``routing.config`` → ``policies.<name>``); ``models`` are its candidates and the
    fallback chain is their ranking under ``kind``.

    Attributes:
        kind: ``cheapest`` (meeting ``quality_target``), ``best_quality`` (within ``budget_usd``),
            ``lowest_latency`` (under ``latency_target_ms``) or ``learned`` (``cost_weight`` knob).
        models: candidate model names, each one of ``models``.
        quality_target: learned P(right) in [0, 1] a ``cheapest`` choice must reach.
        budget_usd: ceiling of the estimated cost per request in US dollars.
        latency_target_ms: ceiling of the estimated latency in milliseconds.
        latency_percentile: observed percentile that estimates latency.
        cost_weight: 0 = quality only ... 1 = cost only (``learned``).
        max_fallbacks: models kept after the chosen one in the fallback chain.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["cheapest", "best_quality", "lowest_latency", "learned"]
    models: list[str] = Field(min_length=1)
    quality_target: float = Field(default=0.7, ge=0, le=1)
    budget_usd: float | None = Field(default=None, gt=0)
    latency_target_ms: float | None = Field(default=None, gt=0)
    latency_percentile: Literal["p50", "p95", "p99"] = "p95"
    cost_weight: float = Field(default=0.5, ge=0, le=1)
    max_fallbacks: int = Field(default=2, ge=0)


class RoutingABSplit(BaseModel):
    """A weighted A/B split between two policies, by a hash of the request id.

    Attributes:
        policy_a, policy_b: policy names.
        weight_a: share of requests (0..1) that get ``policy_a``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy_a: str
    policy_b: str
    weight_a: float = Field(default=0.5, ge=0, le=1)


class RoutingConfig(BaseModel):
    """The router's configuration (the key ``routing.config``): providers, models, policies, A/B split.

    A policy naming a model not in ``models``, a model naming a provider not in ``providers``, or a
    default policy or A/B arm naming an unknown policy is refused, the message naming the field
    (``policies.cheap.models.1: unknown model 'gpt-5'``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    providers: dict[str, ProviderLimits] = Field(default_factory=dict)
    models: dict[str, RoutingModel] = Field(min_length=1)
    policies: dict[str, RoutingPolicyRule] = Field(min_length=1)
    default_policy: str
    ab: RoutingABSplit | None = None

    @model_validator(mode="after")
    def _references(self) -> RoutingConfig:
        problems = []
        for name, m in self.models.items():
            if self.providers and m.provider not in self.providers:
                problems.append(f"models.{name}.provider: unknown provider {m.provider!r}")
        for name, p in self.policies.items():
            for i, m in enumerate(p.models):
                if m not in self.models:
                    problems.append(
                        f"policies.{name}.models.{i}: unknown model {m!r}; known: {', '.join(sorted(self.models))}"
                    )
        if self.default_policy not in self.policies:
            problems.append(f"default_policy: unknown policy {self.default_policy!r}")
        if self.ab is not None:
            for f in ("policy_a", "policy_b"):
                if getattr(self.ab, f) not in self.policies:
                    problems.append(f"ab.{f}: unknown policy {getattr(self.ab, f)!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ValueSchemaRegistry:
    """Pydantic models registered for configuration keys or key prefixes.

    Args:
        schemas: ``{key_or_prefix: model}``; a name ending in ``.`` is a prefix, any other is an exact key.
    """

    def __init__(self, schemas: Mapping[str, type[BaseModel]] | None = None) -> None:
        self._schemas: dict[str, type[BaseModel]] = {}
        for name, model in (schemas or {}).items():
            self.register(name, model)

    def register(self, key_or_prefix: str, model: type[BaseModel]) -> None:
        """Register ``model`` for an exact key or a prefix ending in ``.``.

        Raises:
            ConfigKeyError: the name is not a key (or a key followed by ``.``).
        """
        check_key(key_or_prefix.removesuffix("."))
        self._schemas[key_or_prefix] = model

    def __iter__(self) -> Iterator[tuple[str, type[BaseModel]]]:
        return iter(sorted(self._schemas.items()))

    def schema_for(self, key: str) -> tuple[str, type[BaseModel]] | None:
        """The ``(registered name, model)`` that applies to ``key``, or ``None``.

        An exact key wins over a prefix; among prefixes the longest wins.
        """
        if key in self._schemas:
            return key, self._schemas[key]
        best: str | None = None
        for name in self._schemas:
            if name.endswith(".") and key.startswith(name) and (best is None or len(name) > len(best)):
                best = name
        return (best, self._schemas[best]) if best is not None else None

    def schema_name(self, key: str) -> str | None:
        """Name of the model that applies to ``key`` (``RoutingPolicy``), or ``None``."""
        found = self.schema_for(key)
        return found[1].__name__ if found else None

    def validate(self, key: str, value: Any) -> tuple[dict[str, Any], str | None]:
        """Validate ``value`` for ``key``.

        Args:
            key: the configuration key.
            value: the decoded JSON value; it must be a JSON object (a dict).

        Returns:
            ``(value to store, schema name or None)``: with a schema, the model's JSON dump.

        Raises:
            ConfigValueError: not a JSON object, or the schema refuses it (each problem names the field).
        """
        if not isinstance(value, dict):
            raise ConfigValueError(
                key, None, [f"a configuration value is a JSON object, not {type(value).__name__}"]
            )
        found = self.schema_for(key)
        if found is None:
            return value, None
        _, model = found
        try:
            parsed = model.model_validate(value)
        except ValidationError as exc:
            problems = [
                f"{'.'.join(str(p) for p in err['loc']) or '(value)'}: {err['msg']}" for err in exc.errors()
            ]
            raise ConfigValueError(key, model.__name__, problems) from exc
        return parsed.model_dump(mode="json"), model.__name__


def default_schemas() -> ValueSchemaRegistry:
    """The registry of the platform's own keys: ``routing.``, ``providers.``, ``agents.``, ``healing.``."""
    return ValueSchemaRegistry(
        {
            "routing.": RoutingPolicy,
            "routing.config": RoutingConfig,
            "providers.": ProviderLimits,
            "agents.": AgentRole,
            "healing.": HealingThresholds,
        }
    )
