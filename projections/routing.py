"""The routing view: the policy router's decisions and their outcomes, per-model statistics, and the
audit of one request.

Built from two topics of plain JSON without CloudEvents headers (the policy router's, see
:mod:`processors.routing.policy_app`):

* ``routing.policy-decisions``: ``PolicyDecision.to_json`` (key: the request id), one row per decision in
  ``routing_decisions``; its event id is the decision id (``deterministic_id("routing.decision", request id,
  config version, learner version, policy, *models already tried)``), so a re-read decision changes nothing.
  A fallback decision (taken after the chosen model failed) is a decision of its own, with
  ``fallback_from`` naming the models tried before.
* ``routing.outcomes``: ``Outcome.to_json``, one row per outcome in ``routing_outcomes``; its event id is
  :func:`outcome_id` (``deterministic_id("routing.outcome", request id, model, occurred_at)``).

The projection decodes these records itself (:meth:`RoutingProjection.decode`, the runner's ``decode``
hook): a record that is not JSON of the right shape (a missing or mistyped field, a time that does not
parse, a decision keyed by another request) becomes a :class:`~streams.consumer.DecodeFailure` and goes
to the dead-letter topic with its raw bytes and the reason.

Rows are keyed by their event id and inserted with ``ON CONFLICT DO NOTHING``; everything derived
(outcomes joined to their decision, per-model statistics) is a view computed at read time, so the
tables do not depend on the order records arrive in and a rebuild equals the live view row for row.

Views:

* ``routing_outcomes_joined``: each outcome with the decision that routed its request to its model (the
  latest fallback level when there are several), or NULL decision columns when none was projected.
* ``routing_model_stats``: per model: ``decisions`` (routed to it), ``fallbacks_taken`` (decisions
  routed to it as a fallback), ``fell_back_from`` (fallback decisions taken after it failed),
  ``outcomes``, ``successes``, ``success_rate``, ``labelled``, ``accuracy``, ``latency_p50_ms``,
  ``latency_p95_ms`` (``percentile_cont`` over the outcomes' latencies) and ``cost_usd`` (exact sum).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row

from projections.errors import ProjectionApplyError
from streams.consumer import ConsumedEvent, DecodeFailure, RawRecord, json_event
from streams.envelope import deterministic_id, format_time, parse_time

__all__ = [
    "DECISIONS_TOPIC",
    "DECISION_TYPE",
    "OUTCOMES_TOPIC",
    "OUTCOME_TYPE",
    "SCHEMA",
    "RequestAudit",
    "RoutingProjection",
    "decisions",
    "model_stats",
    "outcome_id",
    "parse_decision",
    "parse_outcome",
    "request_audit",
]

DECISIONS_TOPIC = "routing.policy-decisions"
OUTCOMES_TOPIC = "routing.outcomes"
DECISION_TYPE = "sophia.routing.PolicyDecision"
OUTCOME_TYPE = "sophia.routing.Outcome"
SOURCE = "/processors/routing-policy"
SCHEMA = "proj_routing"
"""The projection's PostgreSQL schema (``schema_name("routing")``)."""

DDL = """
CREATE TABLE IF NOT EXISTS routing_decisions (
    decision_id     text        PRIMARY KEY,
    request_id      text        NOT NULL,
    policy          text        NOT NULL,
    ab_arm          text,
    model           text,
    provider        text,
    fallbacks       text[]      NOT NULL,
    fallback_from   text[]      NOT NULL,
    candidates      jsonb       NOT NULL,
    reason          text        NOT NULL,
    config_version  integer     NOT NULL,
    learner_version text        NOT NULL,
    decided_at      timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS routing_decisions_request ON routing_decisions (request_id);
CREATE INDEX IF NOT EXISTS routing_decisions_time ON routing_decisions (decided_at DESC);
CREATE INDEX IF NOT EXISTS routing_decisions_model ON routing_decisions (model);
CREATE TABLE IF NOT EXISTS routing_outcomes (
    outcome_id  text             PRIMARY KEY,
    request_id  text             NOT NULL,
    model       text             NOT NULL,
    success     boolean          NOT NULL,
    correct     boolean,
    latency_ms  double precision,
    cost_usd    numeric,
    occurred_at timestamptz      NOT NULL
);
CREATE INDEX IF NOT EXISTS routing_outcomes_request ON routing_outcomes (request_id);
CREATE OR REPLACE VIEW routing_outcomes_joined AS
SELECT o.outcome_id, o.request_id, o.model, o.success, o.correct, o.latency_ms, o.cost_usd, o.occurred_at,
       d.decision_id, d.policy, d.ab_arm, d.provider, d.config_version, d.learner_version, d.decided_at,
       coalesce(cardinality(d.fallback_from) > 0, false) AS after_fallback
FROM routing_outcomes o
LEFT JOIN LATERAL (
    SELECT * FROM routing_decisions d
    WHERE d.request_id = o.request_id AND d.model = o.model
    ORDER BY cardinality(d.fallback_from) DESC, d.decision_id
    LIMIT 1
) d ON true;
CREATE OR REPLACE VIEW routing_model_stats AS
WITH d AS (
    SELECT model, min(provider) AS provider, count(*) AS decisions,
           count(*) FILTER (WHERE cardinality(fallback_from) > 0) AS fallbacks_taken
    FROM routing_decisions WHERE model IS NOT NULL GROUP BY model
), f AS (
    SELECT fallback_from[cardinality(fallback_from)] AS model, count(*) AS fell_back_from
    FROM routing_decisions WHERE cardinality(fallback_from) > 0 GROUP BY 1
), o AS (
    SELECT model, count(*) AS outcomes, count(*) FILTER (WHERE success) AS successes,
           count(correct) AS labelled, count(*) FILTER (WHERE correct) AS correct,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS latency_p50_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS latency_p95_ms,
           coalesce(sum(cost_usd), 0) AS cost_usd
    FROM routing_outcomes GROUP BY model
)
SELECT model, d.provider,
       coalesce(d.decisions, 0)::bigint AS decisions,
       coalesce(d.fallbacks_taken, 0)::bigint AS fallbacks_taken,
       coalesce(f.fell_back_from, 0)::bigint AS fell_back_from,
       coalesce(o.outcomes, 0)::bigint AS outcomes,
       coalesce(o.successes, 0)::bigint AS successes,
       o.successes::double precision / nullif(o.outcomes, 0) AS success_rate,
       coalesce(o.labelled, 0)::bigint AS labelled,
       o.correct::double precision / nullif(o.labelled, 0) AS accuracy,
       o.latency_p50_ms, o.latency_p95_ms,
       coalesce(o.cost_usd, 0) AS cost_usd
FROM d FULL JOIN o USING (model) FULL JOIN f USING (model);
"""

_DECISION_COLS = (
    "decision_id", "request_id", "policy", "ab_arm", "model", "provider", "fallbacks", "fallback_from",
    "candidates", "reason", "config_version", "learner_version", "decided_at",
)  # fmt: skip
_OUTCOME_COLS = (
    "outcome_id", "request_id", "model", "success", "correct", "latency_ms", "cost_usd", "occurred_at",
)  # fmt: skip
_INSERT_DECISION = (
    f"INSERT INTO routing_decisions ({', '.join(_DECISION_COLS)}) VALUES ({', '.join(['%s'] * len(_DECISION_COLS))}) "
    "ON CONFLICT (decision_id) DO NOTHING"
)
_INSERT_OUTCOME = (
    f"INSERT INTO routing_outcomes ({', '.join(_OUTCOME_COLS)}) VALUES ({', '.join(['%s'] * len(_OUTCOME_COLS))}) "
    "ON CONFLICT (outcome_id) DO NOTHING"
)
_CANDIDATE_FIELDS: dict[str, tuple[type, ...]] = {
    "model": (str,), "provider": (str,), "eligible": (bool,), "chosen": (bool,), "rank": (int,),
    "score": (int, float), "est_cost_usd": (int, float), "est_latency_ms": (int, float),
    "learned_quality": (int, float), "circuit_state": (str,), "reasons": (list,),
}  # fmt: skip


def _field(d: Mapping[str, Any], name: str, types: tuple[type, ...], *, optional: bool = False) -> Any:
    """``d[name]`` checked against ``types`` (a bool is not a number here).

    Raises:
        ValueError: missing (unless ``optional``), null when required, or of another type.
    """
    if name not in d or d[name] is None:
        if optional:
            return None
        raise ValueError(f"missing {name!r}")
    v = d[name]
    if isinstance(v, bool) and bool not in types:
        raise ValueError(f"{name!r} is {type(v).__name__}, not {' or '.join(t.__name__ for t in types)}")
    if not isinstance(v, types):
        raise ValueError(f"{name!r} is {type(v).__name__}, not {' or '.join(t.__name__ for t in types)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{name!r} is not a finite number")
    return v


def _time(d: Mapping[str, Any], name: str) -> datetime:
    text = _field(d, name, (str,))
    try:
        return parse_time(text).astimezone(UTC)
    except ValueError as exc:
        raise ValueError(f"{name!r} is not an ISO 8601 time: {text!r}") from exc


def _names(d: Mapping[str, Any], name: str, *, optional: bool = False) -> list[str]:
    v = _field(d, name, (list,), optional=optional)
    if v is None:
        return []
    if not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"{name!r} must be a list of model names")
    return list(v)


def parse_decision(d: Any) -> dict[str, Any]:
    """The ``routing_decisions`` row of a decision (``PolicyDecision.to_json`` output).

    Returns:
        ``{column: value}`` with ``decided_at`` an aware UTC datetime and ``candidates`` the list as given
        (each with model, provider, eligible, chosen, rank, score, est_cost_usd, est_latency_ms,
        learned_quality, circuit_state, reasons).

    Raises:
        ValueError: not an object, a field missing or of the wrong type, an empty id, a time that does
            not parse, a malformed candidate.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"a decision is a JSON object, not {type(d).__name__}")
    row: dict[str, Any] = {}
    for name in ("decision_id", "request_id", "policy", "reason", "learner_version"):
        row[name] = _field(d, name, (str,))
    for name in ("decision_id", "request_id"):
        if not row[name]:
            raise ValueError(f"empty {name!r}")
    for name in ("ab_arm", "model", "provider"):
        row[name] = _field(d, name, (str,), optional=True)
    row["fallbacks"] = _names(d, "fallbacks")
    row["fallback_from"] = _names(d, "fallback_from", optional=True)
    row["config_version"] = _field(d, "config_version", (int,))
    row["decided_at"] = _time(d, "decided_at")
    candidates = _field(d, "candidates", (list,))
    for i, c in enumerate(candidates):
        if not isinstance(c, Mapping):
            raise ValueError(f"candidate {i} is not an object")
        try:
            for name, types in _CANDIDATE_FIELDS.items():
                _field(c, name, types)
        except ValueError as exc:
            raise ValueError(f"candidate {i}: {exc}") from None
    row["candidates"] = candidates
    return row


def parse_outcome(d: Any) -> dict[str, Any]:
    """The ``routing_outcomes`` row of an outcome (``Outcome.to_json`` output), ``outcome_id`` included.

    Returns:
        ``{column: value}``: ``latency_ms`` float or None, ``cost_usd`` a ``Decimal`` (of the float's
        shortest repr, so sums are exact) or None, ``occurred_at`` aware UTC.

    Raises:
        ValueError: not an object, a field missing or of the wrong type, an empty request id or model, a
            negative latency or cost, a time that does not parse.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"an outcome is a JSON object, not {type(d).__name__}")
    request_id, model = _field(d, "request_id", (str,)), _field(d, "model", (str,))
    if not request_id or not model:
        raise ValueError("empty 'request_id' or 'model'")
    success, correct = _field(d, "success", (bool,)), _field(d, "correct", (bool,), optional=True)
    latency = _field(d, "latency_ms", (int, float), optional=True)
    cost = _field(d, "cost_usd", (int, float), optional=True)
    for name, v in (("latency_ms", latency), ("cost_usd", cost)):
        if v is not None and v < 0:
            raise ValueError(f"negative {name!r}: {v}")
    at = _time(d, "occurred_at")
    return {
        "outcome_id": outcome_id(request_id, model, at),
        "request_id": request_id,
        "model": model,
        "success": success,
        "correct": correct,
        "latency_ms": float(latency) if latency is not None else None,
        "cost_usd": Decimal(repr(float(cost))) if cost is not None else None,
        "occurred_at": at,
    }


def outcome_id(request_id: str, model: str, occurred_at: datetime) -> str:
    """The event id of an outcome: ``deterministic_id("routing.outcome", request id, model, time)``, the
    time as UTC ISO 8601 with microseconds (the same instant written with another offset gives the same id).

    Raises:
        ValueError: a naive time.
    """
    if occurred_at.tzinfo is None:
        raise ValueError("naive datetime: times must be timezone-aware")
    return deterministic_id("routing.outcome", request_id, model, occurred_at.astimezone(UTC).isoformat())


class RoutingProjection:
    """The policy router's decisions and outcomes in PostgreSQL (see the module docstring).

    Args:
        topics: the topics to read (default: the decisions and the outcomes topics).
        decisions_topic, outcomes_topic: which topic carries which (a record of another topic is told by
            its shape: a ``decision_id`` makes it a decision).
    """

    name = "routing"
    version = 1
    topics: tuple[str, ...] = (DECISIONS_TOPIC, OUTCOMES_TOPIC)

    def __init__(
        self,
        topics: Sequence[str] | None = None,
        *,
        decisions_topic: str = DECISIONS_TOPIC,
        outcomes_topic: str = OUTCOMES_TOPIC,
    ) -> None:
        self.decisions_topic = decisions_topic
        self.outcomes_topic = outcomes_topic
        self.topics = tuple(topics) if topics is not None else (decisions_topic, outcomes_topic)

    def create(self, conn: psycopg.Connection) -> None:
        """Create ``routing_decisions``, ``routing_outcomes`` and the two views."""
        conn.execute(DDL)

    def decode(self, raw: RawRecord) -> ConsumedEvent | DecodeFailure:
        """Decode a JSON decision or outcome into an event whose id is deterministic (the decision id,
        or :func:`outcome_id`) and whose data is its row; a record of another shape into a failure."""
        if raw.value is None:
            return raw.failure("a tombstone (null value) is neither a decision nor an outcome")
        try:
            d = json.loads(raw.value)
        except (UnicodeDecodeError, ValueError) as exc:
            return raw.failure(f"not JSON: {exc}")
        is_decision = (
            raw.topic == self.decisions_topic
            if raw.topic in (self.decisions_topic, self.outcomes_topic)
            else isinstance(d, Mapping) and "decision_id" in d
        )
        try:
            row = parse_decision(d) if is_decision else parse_outcome(d)
        except ValueError as exc:
            return raw.failure(f"not a routing {'decision' if is_decision else 'outcome'}: {exc}")
        key = raw.key.decode("utf-8", "replace") if raw.key is not None else None
        if is_decision and key is not None and key != row["request_id"]:
            return raw.failure(
                f"decision {row['decision_id']}: key {key!r} is not its request id {row['request_id']!r}"
            )
        if is_decision:
            return json_event(raw, row, event_id=row["decision_id"], event_type=DECISION_TYPE, source=SOURCE,
                              time=row["decided_at"], subject=row["request_id"])  # fmt: skip
        return json_event(raw, row, event_id=row["outcome_id"], event_type=OUTCOME_TYPE, source=SOURCE,
                          time=row["occurred_at"], subject=row["request_id"])  # fmt: skip

    def apply(self, cur: psycopg.Cursor, events: Sequence[ConsumedEvent]) -> None:
        """Insert the batch's decisions and outcomes (a row already there is left as it is).

        Raises:
            ProjectionApplyError: an event that is neither a decision nor an outcome.
        """
        decisions, outcomes = [], []
        for e in events:
            if e.schema == DECISION_TYPE:
                row = dict(e.data, candidates=json.dumps(e.data["candidates"], sort_keys=True))
                decisions.append(tuple(row[c] for c in _DECISION_COLS))
            elif e.schema == OUTCOME_TYPE:
                outcomes.append(tuple(e.data[c] for c in _OUTCOME_COLS))
            else:
                raise ProjectionApplyError(f"event {e.attributes.id}: {e.schema} is not a routing record")
        if decisions:
            cur.executemany(_INSERT_DECISION, decisions)
        if outcomes:
            cur.executemany(_INSERT_OUTCOME, outcomes)


# -- reading ------------------------------------------------------------------------------------------------


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready: Decimal -> float, datetimes as RFC 3339."""
    return {
        k: float(v) if isinstance(v, Decimal) else format_time(v) if isinstance(v, datetime) else v
        for k, v in row.items()
    }


def decisions(
    conn: psycopg.Connection,
    *,
    limit: int = 100,
    offset: int = 0,
    policy: str | None = None,
    model: str | None = None,
    request_id: str | None = None,
    schema: str = SCHEMA,
) -> list[dict[str, Any]]:
    """Decisions, latest first (by ``decided_at``, then the deeper fallback first, then decision id).

    Args:
        conn: PostgreSQL connection.
        limit, offset: paging.
        policy, model, request_id: filters (``model`` is the chosen model).
        schema: the projection's schema.

    Returns:
        JSON-ready rows of ``routing_decisions`` (``decided_at`` RFC 3339, ``candidates`` a list).

    Raises:
        psycopg.errors.UndefinedTable: the projection never ran.
    """
    where, params = [], []
    for col, v in (("policy", policy), ("model", model), ("request_id", request_id)):
        if v is not None:
            where.append(f"{col} = %s")
            params.append(v)
    sql = f"SELECT * FROM {schema}.routing_decisions"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY decided_at DESC, cardinality(fallback_from) DESC, decision_id LIMIT %s OFFSET %s"
    with conn.cursor(row_factory=dict_row) as cur:
        return [_plain(r) for r in cur.execute(sql, [*params, limit, offset]).fetchall()]


def model_stats(conn: psycopg.Connection, *, schema: str = SCHEMA) -> list[dict[str, Any]]:
    """Rows of ``routing_model_stats`` (see the module docstring), most decisions first, then by model.

    Raises:
        psycopg.errors.UndefinedTable: the projection never ran.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT * FROM {schema}.routing_model_stats ORDER BY decisions DESC, outcomes DESC, model"
        ).fetchall()
    return [_plain(r) for r in rows]


@dataclass(frozen=True, slots=True)
class RequestAudit:
    """Everything the routing view knows about one request.

    Attributes:
        request_id: the request.
        decisions: JSON-ready decision rows, the first decision first, then each fallback decision in the
            order taken (by the number of models tried before); each has ``fallback`` (bool).
        outcomes: JSON-ready rows of ``routing_outcomes_joined`` for the request, by event time.
    """

    request_id: str
    decisions: list[dict[str, Any]]
    outcomes: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        """``{"request_id", "decisions", "outcomes"}``."""
        return {"request_id": self.request_id, "decisions": self.decisions, "outcomes": self.outcomes}


def request_audit(conn: psycopg.Connection, request_id: str, *, schema: str = SCHEMA) -> RequestAudit:
    """The decisions (every candidate with its score and reasons, the config and learner versions, the
    fallbacks taken) and the outcomes of ``request_id``; both lists empty for an unknown request.

    Raises:
        ValueError: an empty request id.
        psycopg.errors.UndefinedTable: the projection never ran.
    """
    if not request_id:
        raise ValueError("a request id is required, e.g. request:<id>")
    with conn.cursor(row_factory=dict_row) as cur:
        ds = cur.execute(
            f"SELECT *, cardinality(fallback_from) > 0 AS fallback FROM {schema}.routing_decisions "
            "WHERE request_id = %s ORDER BY cardinality(fallback_from), decided_at, decision_id",
            (request_id,),
        ).fetchall()
        os_ = cur.execute(
            f"SELECT * FROM {schema}.routing_outcomes_joined WHERE request_id = %s "
            "ORDER BY occurred_at, model, outcome_id",
            (request_id,),
        ).fetchall()
    if not conn.autocommit:
        conn.rollback()
    return RequestAudit(request_id, [_plain(r) for r in ds], [_plain(r) for r in os_])
