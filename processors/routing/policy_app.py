"""The Faust app of the N-model policy router: route requests + outcomes + config changes -> decisions.

A thin shell around :class:`processors.routing.policy.RoutingState` (all decision logic is there):

* ``policy-config`` reads ``config.changes`` (``sophia.config.ConfigChange``, Avro): a change of the key
  ``routing.config`` (validated at save by ``configuration.schemas.RoutingConfig``) replaces the
  configuration from the next request on (hot reload); each decision records its ``config_version``.
  Other keys are skipped. A value that does not parse is logged and the previous one kept.
* ``policy-outcomes`` reads ``routing.outcomes`` (JSON :class:`~processors.routing.policy.Outcome`):
  per-model statistics (success rate, latency percentiles over the last 256, cost) are kept in the
  table ``routing_model_stats`` (a :class:`processors.tables.TailRecoveringTable`, changelog
  ``<app id>-routing_model_stats-changelog``) and in the state; the online learner learns the outcome
  (``partial_fit``). A failed outcome of the model a request was last routed to sends the fallback
  decision (the next model, every tried one excluded).
* ``policy-requests`` reads ``routing.policy-requests`` (JSON :class:`~processors.routing.policy.PolicyRequest`,
  key request id) and sends the decision (JSON :meth:`PolicyDecision.to_json`, key request id) to
  ``routing.policy-decisions``. Before each decision the circuit state of every model is read from the
  healer's read model (:class:`CircuitReader`: Redis, or PostgreSQL when Redis is down or not ready; the
  model's circuit and its provider's, the more severe wins); when neither answers the last states stay. A request that is not JSON, lacks a prompt and a
  reference, or arrives before any configuration is dead-lettered with its raw bytes and the reason.

Every event the state applies (config, a changed circuit state, outcome, request) is appended, in the
order applied, to ``<history dir>/events.jsonl`` and every decision to ``decisions.jsonl``: the history
folder ``backbone routing simulate`` replays (it reproduces these decisions exactly with the live rule).
Agents run with ``concurrency=1``; values are JSON bytes (``value_serializer="raw"``).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
import structlog
from confluent_kafka.admin import AdminClient, NewTopic

from core.settings import Settings
from processors.errors import UnprocessableEventError
from processors.healing.read_model import DEFAULT_PREFIX as CIRCUIT_PREFIX
from processors.healing.read_model import READY_KEY
from processors.routing.policy import (
    ModelStats,
    Outcome,
    PolicyDecision,
    PolicyRequest,
    RoutingConfigError,
    RoutingState,
    next_fallback,
)
from processors.routing.scorers import OnlineQuality
from processors.shell import (
    FaustDeadLetters,
    InOrderAcks,
    make_faust_app,
    message_headers,
    run_processor_worker,
    tracing_process,
)
from processors.tables import TailRecoveringTable
from streams.catalogue import CATALOGUE, create_missing_topics
from streams.consumer import DLQ_TOPIC
from streams.errors import DeserializationError
from streams.serde import AvroSerde, serde_from_settings

__all__ = [
    "CONFIG_KEY",
    "COUNTERS",
    "PolicyTopics",
    "PolicyWorkerStats",
    "create_policy_app",
    "ensure_policy_topics",
    "run_policy_worker",
]

log = structlog.get_logger("processors.routing.policy_app")

CONFIG_KEY = "routing.config"
DEFAULT_APP_ID = "backbone-routing-policy"
TABLE_NAME = "routing_model_stats"
PROCESSOR_NAME = "routing-policy"


@dataclass(frozen=True, slots=True)
class PolicyTopics:
    """Topic names of the policy router (defaults: the names used in production)."""

    requests: str = "routing.policy-requests"
    outcomes: str = "routing.outcomes"
    config: str = "config.changes"
    decisions: str = "routing.policy-decisions"
    dead_letters: str = DLQ_TOPIC
    partitions: int = 3


@dataclass(slots=True)
class PolicyWorkerStats:
    """Counters of one worker run."""

    records_count: int = 0
    requests_count: int = 0
    decisions_count: int = 0
    unservable_count: int = 0
    fallbacks_count: int = 0
    outcomes_count: int = 0
    config_changes_count: int = 0
    dead_letters_count: int = 0
    circuit_read_errors_count: int = 0
    last_record_monotonic: float | None = None
    config_version: int | None = None
    learner_version: str | None = None


COUNTERS = (
    (
        "backbone_routing_policy_records",
        "records_count",
        "Records handled by the policy agents (every outcome)",
    ),
    ("backbone_routing_policy_requests", "requests_count", "Policy requests decided"),
    ("backbone_routing_policy_decisions", "decisions_count", "Policy decisions sent (fallbacks included)"),
    (
        "backbone_routing_policy_unservable",
        "unservable_count",
        "Decisions that found no model to serve the request",
    ),
    (
        "backbone_routing_policy_fallbacks",
        "fallbacks_count",
        "Fallback decisions sent after a failed outcome",
    ),
    ("backbone_routing_policy_outcomes", "outcomes_count", "Outcomes learned"),
    ("backbone_routing_policy_config_changes", "config_changes_count", "routing.config versions applied"),
    ("backbone_routing_policy_dead_letters", "dead_letters_count", "Records dead-lettered"),
    (
        "backbone_routing_policy_circuit_read_errors",
        "circuit_read_errors_count",
        "Failed reads of the circuit states from Redis",
    ),
)
"""The policy router's counters as Prometheus metrics (label ``app``)."""


def _stats_to_json(s: ModelStats) -> dict[str, Any]:
    return {"outcomes_count": s.outcomes_count, "successes_count": s.successes_count, "correct_count": s.correct_count,
            "labelled_count": s.labelled_count, "cost_usd": s.cost_usd, "latencies_ms": list(s.latencies_ms)}  # fmt: skip


def _stats_from_json(d: dict[str, Any]) -> ModelStats:
    s = ModelStats(int(d["outcomes_count"]), int(d["successes_count"]), int(d["correct_count"]),
                   int(d["labelled_count"]), float(d["cost_usd"]))  # fmt: skip
    s.latencies_ms = deque((float(x) for x in d.get("latencies_ms", ())), maxlen=s.latencies_ms.maxlen)
    return s


_SEVERITY = {"closed": 0, "half_open": 1, "open": 2}


class CircuitReader:
    """Reads the healer's circuit states from its read model (:class:`processors.healing.read_model.
    HealingReadModel`): in Redis, the hashes ``<prefix>model:{provider}/{model}`` and
    ``<prefix>provider:{provider}`` (prefix ``backbone:circuit:``), field ``state``, while the read model has
    marked Redis ready (``<prefix>__ready__``); otherwise (Redis unreachable, or not marked ready: flushed,
    restarted, or a write failed) the table ``proj_healing.circuits`` in PostgreSQL, at most once per
    ``fallback_ttl_seconds``. Of a model's circuit and its provider's, the more severe wins (``open`` >
    ``half_open`` > ``closed``), so a provider-wide outage blocks each of its models. An absent circuit is
    ``closed`` (no transition yet).

    Args:
        url: the Redis URL; None reads PostgreSQL only (or nothing without ``pg_url``: every circuit closed).
        pg_url: the PostgreSQL URL of the read model; None: no fallback.
        prefix: the read model's key prefix.
        fallback_ttl_seconds: how long a PostgreSQL read is reused.
        max_age_seconds: how long a read is reused for the next decisions (one Redis round trip per
            decision cost the worker a sixth of its time at 500 requests/s); a circuit the healer changed
            reaches the decisions at most this much later. 0 reads before every decision.
    """

    def __init__(
        self, url: str | None, *, pg_url: str | None = None, prefix: str = CIRCUIT_PREFIX,
        fallback_ttl_seconds: float = 1.0, max_age_seconds: float = 0.05,
    ) -> None:  # fmt: skip
        self.max_age_seconds = max_age_seconds
        self._last: tuple[float, tuple[tuple[str, str], ...], dict[str, str]] | None = None
        self._client = None
        self.prefix = prefix
        self.pg_url = pg_url
        self.fallback_ttl_seconds = fallback_ttl_seconds
        self._fallback: tuple[float, dict[str, str]] | None = None
        self.fallback_reads = 0
        if url:
            import redis

            self._client = redis.Redis.from_url(url, socket_timeout=0.5)

    def keys(self, model: str, provider: str) -> tuple[str, str]:
        """The model's and its provider's circuit names (the Redis hash names without the prefix)."""
        return f"model:{provider}/{model}", f"provider:{provider}"

    def read(self, models: dict[str, str]) -> dict[str, str] | None:
        """``{model: state}`` for ``{model: provider}`` (absent circuit: ``closed``); None when neither Redis
        nor PostgreSQL answered (the caller keeps the last states); a read younger than ``max_age_seconds``
        of the same models is returned again."""
        now = time.monotonic()
        wanted = tuple(models.items())
        if self._last is not None and now - self._last[0] < self.max_age_seconds and self._last[1] == wanted:
            return self._last[2]
        got = self._read(models)
        if got is not None:
            self._last = (now, wanted, got)
        return got

    def _read(self, models: dict[str, str]) -> dict[str, str] | None:
        values: list[Any] | None = None
        if self._client is not None:
            try:
                pipe = self._client.pipeline(transaction=False)
                pipe.exists(self.prefix + READY_KEY)
                for m, p in models.items():
                    for key in self.keys(m, p):
                        pipe.hget(self.prefix + key, "state")
                got = pipe.execute()
                if got[0]:
                    values = [v.decode() if isinstance(v, bytes) else v for v in got[1:]]
            except Exception as exc:  # noqa: BLE001 - any Redis failure: PostgreSQL, or the last states
                log.warning("circuit_read_failed", error=str(exc))
        if values is None:
            if self.pg_url is None:
                return {m: "closed" for m in models} if self._client is None else None
            table = self._postgres()
            if table is None:
                return None
            values = [table.get(key) for m, p in models.items() for key in self.keys(m, p)]
        out: dict[str, str] = {}
        for i, m in enumerate(models):
            states = [v or "closed" for v in values[2 * i : 2 * i + 2]]
            out[m] = max(states, key=lambda st: _SEVERITY.get(st, 0))
        return out

    def _postgres(self) -> dict[str, str] | None:
        now = time.monotonic()
        if self._fallback is not None and now - self._fallback[0] < self.fallback_ttl_seconds:
            return self._fallback[1]
        import psycopg

        assert self.pg_url is not None
        try:
            with psycopg.connect(self.pg_url, connect_timeout=2) as conn:
                rows = conn.execute("SELECT circuit, state FROM proj_healing.circuits").fetchall()
        except psycopg.errors.UndefinedTable:
            rows = []  # no healer has written yet: every circuit closed
        except psycopg.Error as exc:
            log.warning("circuit_read_postgres_failed", error=str(exc))
            return None
        self.fallback_reads += 1
        self._fallback = (now, {str(c): str(st) for c, st in rows})
        return self._fallback[1]


MAX_INFLIGHT_DECISIONS = 1000
"""Decisions sent and awaiting delivery before the request agent waits for the oldest."""


class _PolicyShell:
    def __init__(self, settings: Settings, serde: AvroSerde, topics: PolicyTopics, table: Any, decisions: Any,
                 learner: OnlineQuality | None, history_dir: Path | None) -> None:  # fmt: skip
        self.serde = serde
        self.table = table
        self.decisions = decisions
        self.state = RoutingState(learner=learner)
        self.stats = PolicyWorkerStats(learner_version=learner.version if learner else None)
        self.dead_letters = FaustDeadLetters(settings, serde, PROCESSOR_NAME, topics.dead_letters)
        self.circuits = CircuitReader(
            settings.redis.dsn() if settings.redis.url else None,
            pg_url=settings.postgres.dsn() if settings.postgres.url else None,
        )
        self.last: OrderedDict[str, tuple[PolicyDecision, PolicyRequest]] = OrderedDict()
        self.acks = InOrderAcks(max_inflight=MAX_INFLIGHT_DECISIONS, on_delivered=self._acked)
        """Request events whose decisions were sent and not yet acknowledged, in order."""
        self.history_dir = history_dir
        if history_dir is not None:
            history_dir.mkdir(parents=True, exist_ok=True)

    def _touch(self) -> None:
        self.stats.records_count += 1
        self.stats.last_record_monotonic = time.monotonic()

    def _history(self, name: str, item: dict[str, Any]) -> None:
        if self.history_dir is not None:
            with (self.history_dir / name).open("a", encoding="utf-8") as f:
                f.write(json.dumps(item, default=str) + "\n")

    async def _dead_letter(self, message: Any, exc: Exception) -> None:
        await self.dead_letters.publish(message, exc, message_headers(message.headers))
        self.stats.dead_letters_count += 1
        log.warning(
            "policy_record_dead_lettered", topic=message.topic, offset=message.offset, reason=str(exc)
        )

    async def recovered(self) -> None:
        for model, value in self.table.items():
            self.state.stats[str(model)] = _stats_from_json(value)
        log.info("routing_model_stats_recovered", models=len(self.state.stats))

    async def handle_config(self, message: Any) -> None:
        self._touch()
        try:
            _, data = self.serde.decode(message.value)
        except DeserializationError as exc:
            await self._dead_letter(message, exc)
            return
        if data.get("key") != CONFIG_KEY or data.get("value_json") is None:
            return
        try:
            self.apply_config(json.loads(data["value_json"]), int(data["version"]))
        except (ValueError, RoutingConfigError) as exc:
            log.error("routing_config_refused", version=data.get("version"), reason=str(exc))

    def apply_config(self, value: dict[str, Any], version: int) -> None:
        """Apply ``routing.config`` ``version`` (an older or equal version than the one in force is skipped:
        the worker may have read it from the store at start).

        Raises:
            RoutingConfigError: it does not parse (the previous one stays).
        """
        if self.state.setup is not None and version <= self.state.setup.config_version:
            return
        self.state.on_config(value, version)
        self.stats.config_changes_count += 1
        self.stats.config_version = version
        self._history("events.jsonl", {"type": "config", "version": version, "value": value})
        log.info("routing_config_applied", version=version)

    async def handle_outcome(self, message: Any) -> None:
        self._touch()
        try:
            outcome = Outcome.from_json(json.loads(message.value))
        except (ValueError, UnprocessableEventError) as exc:
            await self._dead_letter(message, UnprocessableEventError(f"not a routing outcome: {exc}"))
            return
        self.state.on_outcome(outcome)
        self.stats.outcomes_count += 1
        self.stats.learner_version = self.state.learner.version if self.state.learner else None
        self._history("events.jsonl", {"type": "outcome", **outcome.to_json()})
        self.table[outcome.model] = _stats_to_json(self.state.stats[outcome.model])
        prev = self.last.get(outcome.request_id)
        if not outcome.success and prev is not None and prev[0].model == outcome.model and self.state.setup:
            fb = next_fallback(prev[0], self.state.setup, prev[1], self.state.health(), self.state.learner)
            self.last[outcome.request_id] = (fb, prev[1])
            self.stats.fallbacks_count += 1
            await self._send(fb)

    async def handle_request(self, message: Any) -> tuple[Any, PolicyDecision | None] | None:
        """Decide ``message``'s request and send the decision without waiting for its delivery; return
        ``(delivery future, decision)``, or None when the record was dead-lettered."""
        self._touch()
        try:
            request = PolicyRequest.from_json(json.loads(message.value))
            request.validate()
            if self.state.setup is None:
                raise UnprocessableEventError(f"no {CONFIG_KEY} yet", event_id=request.request_id)
        except (ValueError, UnprocessableEventError) as exc:
            await self._dead_letter(
                message,
                exc if isinstance(exc, UnprocessableEventError) else UnprocessableEventError(str(exc)),
            )
            return None
        read = self.circuits.read({m: i.provider for m, i in self.state.setup.models.items()})
        if read is None:
            self.stats.circuit_read_errors_count += 1
        else:
            for model, st in sorted(read.items()):
                if self.state.circuits.get(model, "closed") != st and st in ("closed", "half_open", "open"):
                    self.state.on_circuit(model, st)
                    self._history("events.jsonl", {"type": "circuit", "model": model, "state": st})
        self._history("events.jsonl", {"type": "request", **request.to_json()})
        decision = self.state.on_request(request)
        self.stats.requests_count += 1
        self.last[request.request_id] = (decision, request)
        while len(self.last) > 100_000:
            self.last.popitem(last=False)
        return await self._enqueue(decision), decision

    async def _enqueue(self, decision: PolicyDecision) -> Any:
        body = decision.to_json()
        self._history("decisions.jsonl", body)
        return await self.decisions.send(key=decision.request_id.encode(), value=json.dumps(body).encode(),
                                         timestamp=decision.decided_at.timestamp(), force=True)  # fmt: skip

    def _delivered(self, decision: PolicyDecision) -> None:
        self.stats.decisions_count += 1
        self.stats.unservable_count += decision.model is None
        log.debug("policy_decided", request_id=decision.request_id, model=decision.model, policy=decision.policy,
                 config_version=decision.config_version, reason=decision.reason)  # fmt: skip

    async def _send(self, decision: PolicyDecision) -> None:
        """Send ``decision`` and wait for its delivery (fallback decisions: rare)."""
        await (await self._enqueue(decision))
        self._delivered(decision)

    def _acked(self, decision: PolicyDecision | None) -> None:
        if decision is not None:
            self._delivered(decision)


def create_policy_app(
    settings: Settings,
    *,
    learner: OnlineQuality | None = None,
    app_id: str = DEFAULT_APP_ID,
    topics: PolicyTopics | None = None,
    history_dir: Path | None = None,
    web_port: int = 0,
    initial_config: tuple[dict[str, Any], int] | None = None,
) -> faust.App:
    """Build the policy router app (three agents, the ``routing_model_stats`` table).

    ``initial_config`` (``(value, version)`` of ``routing.config``) is applied before any record is read.

    Returns:
        The app; counters at ``app.policy_stats``, the state at ``app.policy_state``.

    Raises:
        ValueError: no Kafka bootstrap servers are configured.
    """
    topics = topics or PolicyTopics()
    app = make_faust_app(settings, app_id, partitions=topics.partitions, web_port=web_port)
    serde = serde_from_settings(settings)
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    table = app.tables.add(
        TailRecoveringTable(
            app, kafka=settings.kafka, name=TABLE_NAME, default=dict, beacon=app.tables.beacon,
            partitions=topics.partitions, schema=faust.Schema(key_serializer="json", value_serializer="json"),
            help="Per model: outcome counts, cost and the last latencies.",
        )
    )  # fmt: skip
    shell = _PolicyShell(
        settings, serde, topics, table, app.topic(topics.decisions, **raw), learner, history_dir
    )
    table.on_recover(shell.recovered)
    if initial_config is not None:
        shell.apply_config(*initial_config)

    @app.agent(app.topic(topics.config, **raw), name="policy-config", concurrency=1)
    async def policy_config(stream: faust.StreamT) -> None:
        async for event in stream.events():
            with tracing_process(event.message, app.conf.id):
                await shell.handle_config(event.message)

    @app.agent(
        app.topic(topics.outcomes, partitions=topics.partitions, **raw), name="policy-outcomes", concurrency=1
    )
    async def policy_outcomes(stream: faust.StreamT) -> None:
        async for event in stream.events():
            with tracing_process(event.message, app.conf.id):
                await shell.handle_outcome(event.message)

    @app.agent(
        app.topic(topics.requests, partitions=topics.partitions, **raw), name="policy-requests", concurrency=1
    )
    async def policy_requests(stream: faust.StreamT) -> None:
        """Decide each request; decisions are sent back to back (up to :data:`MAX_INFLIGHT_DECISIONS` awaiting
        delivery) and each request acked once its decision was delivered."""

        async def decide(event: Any) -> tuple[Any, PolicyDecision | None]:
            with tracing_process(event.message, app.conf.id):
                sent = await shell.handle_request(event.message)
            return (
                sent if sent is not None else (None, None)
            )  # None: dead-lettered (delivered), acked in turn

        await shell.acks.consume(stream, decide)

    shell.acks.settle_every(app, 0.2)

    app.policy_stats = shell.stats  # type: ignore[attr-defined]
    app.policy_state = shell.state  # type: ignore[attr-defined]
    app.policy_close = shell.dead_letters.close  # type: ignore[attr-defined]
    return app


def ensure_policy_topics(
    settings: Settings, topics: PolicyTopics, *, timeout_seconds: float = 30.0
) -> list[str]:
    """Create the topics the broker lacks; return those created.

    Requests, outcomes and decisions get ``topics.partitions``, the config and dead-letter topics the
    catalogue's counts of those roles. A catalogue name is made as the catalogue says whatever the count
    asked (:func:`streams.catalogue.create_missing_topics`), so these counts only apply to other names (a
    test's own topics).

    Raises:
        StreamsError: the broker did not answer, or refused a topic.
    """
    admin = AdminClient(settings.kafka.librdkafka())
    wanted = [NewTopic(t, num_partitions=topics.partitions, replication_factor=1)
              for t in (topics.requests, topics.outcomes, topics.decisions)]  # fmt: skip
    wanted.append(
        NewTopic(topics.config, num_partitions=CATALOGUE["config.changes"].partitions, replication_factor=1)
    )
    wanted.append(
        NewTopic(
            topics.dead_letters, num_partitions=CATALOGUE["backbone.dlq"].partitions, replication_factor=1
        )
    )
    return create_missing_topics(admin, wanted, timeout_seconds=timeout_seconds)


def run_policy_worker(
    settings: Settings | None = None,
    *,
    learner: OnlineQuality | None = None,
    app_id: str = DEFAULT_APP_ID,
    topics: PolicyTopics | None = None,
    history_dir: Path | None = None,
    stop_after_idle_seconds: float | None = None,
    initial_config: tuple[dict[str, Any], int] | None = None,
    loglevel: str | None = None,
) -> PolicyWorkerStats:
    """Run the policy router in this process until stopped (blocking; from a main thread), in the worker
    shell (:func:`processors.shell.run_processor_worker`: the counters of :data:`COUNTERS` on
    ``/metrics``, ``/healthz`` and ``/readyz`` on ``settings.metrics_host:metrics_port``, stop-when-idle,
    clean stop on SIGTERM/SIGINT).

    ``initial_config`` (``(value, version)`` of ``routing.config``, read from the config store by the
    caller) is the configuration until a newer version arrives on ``config.changes``.

    Raises:
        ValueError: no Kafka bootstrap servers are configured.
        StreamsError: a topic cannot be created.
        SystemExit: the worker exited with a non-zero code.
    """
    if settings is None:
        from core.stack import load_settings

        settings = load_settings()
    topics = topics or PolicyTopics()
    ensure_policy_topics(settings, topics)
    app = create_policy_app(settings, learner=learner, app_id=app_id, topics=topics, history_dir=history_dir,
                            initial_config=initial_config)  # fmt: skip
    stats: PolicyWorkerStats = app.policy_stats  # type: ignore[attr-defined]
    run_processor_worker(
        settings, app, processor=PROCESSOR_NAME, stats=stats, counters=COUNTERS,
        close=app.policy_close,  # type: ignore[attr-defined]
        stop_after_idle_seconds=stop_after_idle_seconds, loglevel=loglevel,
    )  # fmt: skip
    return stats
